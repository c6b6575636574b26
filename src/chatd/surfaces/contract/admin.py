"""`/admin/callers`: live callers' answers (docs/live-callers.md). Bodies come from
state/caller_fields.py's models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ADMIN_STATUSES: dict[int, str] = {
    400: "invalid_request: a bad field (`param` names it)",
    401: "unauthorized: no admin token, or an unknown one",
    403: "forbidden: the token is a caller's that is not an admin",
    404: "not_found: no such caller (or token)",
    405: "method_not_allowed: a wrong method on this route",
    409: "caller_exists, config_caller (a config-file caller is changed in the file), or "
    "no_database (live callers need `usage_db`)",
    500: "internal_error: a bug (logged with its traceback, answered without one)",
    503: "database_unavailable: the callers' database cannot be reached; nothing changed",
}


class TokenInfo(BaseModel):
    id: str = Field(description="Public: names the token in lists and the audit trail.")
    created_at: str | None


class CallerInfo(BaseModel):
    """One caller as `/admin` shows it: its limits, its state, its tokens' ids; never a
    token."""

    model_config = ConfigDict(extra="allow")

    name: str
    source: str = Field(description="config (the config file) or live (made here or by CLI)")
    state: str = Field(description="active, disabled, expired or revoked")
    models: list[str]
    rpm: int
    tpm: int
    budget_usd: float
    budget_period: str
    max_concurrency: int
    admin: bool
    expires_at: str | None
    metadata: dict[str, str]
    disabled: bool
    tokens: list[TokenInfo]


class CallerDetail(CallerInfo):
    spend_usd: float | None = Field(description="Spent in the current budget period.")
    period_start: str | None


class CallerList(BaseModel):
    callers: list[CallerInfo]


class IssuedToken(BaseModel):
    """The full token, in this answer only: it is stored as a hash and never shown again."""

    name: str
    token_id: str
    token: str = Field(description="ck-<id>-<secret>; shown this once.")
    caller: CallerInfo


def created(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    return {201: {"model": model, "description": description}}
