"""What a live caller may be given (docs/live-callers.md): the body of `POST /admin/callers` and of
`PATCH`, checked once here for the routes and the CLI alike. Every refusal names its field.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME_RULE = "must match [a-z0-9][a-z0-9._-]{0,63}"
MAX_METADATA = 32  # keys; a label set, not a document

LARGEST = 10**12  # past any real limit, inside every database's integer
Count = Annotated[int, Field(ge=0, le=LARGEST, strict=True)]
Money = Annotated[float, Field(ge=0, le=LARGEST, strict=True, allow_inf_nan=False)]
Glob = Annotated[StrictStr, Field(min_length=1, max_length=200)]


def parse_expiry(value: Any) -> float | None:
    """RFC 3339 text (with a zone) in the future → epoch seconds; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError("must be an RFC 3339 date-time, e.g. 2027-01-31T00:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError("must carry a time zone, e.g. 2027-01-31T00:00:00Z")
    epoch = moment.timestamp()
    if epoch <= time.time():
        raise ValueError("must be in the future")
    return epoch


def rfc3339(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


class CallerChange(BaseModel):
    """`PATCH /admin/callers/{name}`: any of these; what is left out stays as it is."""

    model_config = ConfigDict(extra="forbid")

    models: list[Glob] | None = Field(default=None, min_length=1, max_length=100)
    rpm: Count | None = Field(default=None, description="Requests per minute; 0 = unlimited.")
    tpm: Count | None = Field(default=None, description="Tokens per minute; 0 = unlimited.")
    budget_usd: Money | None = Field(default=None, description="Spend per period; 0 = no cap.")
    budget_period: Literal["day", "week", "month"] | None = None
    max_concurrency: Count | None = None
    admin: StrictBool | None = None
    expires_at: str | None = Field(
        default=None, description="RFC 3339; after it the caller's tokens are refused."
    )
    metadata: dict[StrictStr, Annotated[StrictStr, Field(max_length=500)]] | None = Field(
        default=None, description="A flat object of strings: team, owner, ..."
    )
    disabled: StrictBool | None = None

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expiry(cls, value: Any) -> Any:
        parse_expiry(value)
        return value

    @field_validator(
        "models", "rpm", "tpm", "budget_usd", "budget_period", "max_concurrency", "admin",
        "disabled",
    )  # fmt: skip
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        # Runs only on fields that were sent: a null sent is refused, one left out is not.
        if value is None:
            raise ValueError("may not be null")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and len(value) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} keys")
        return value

    def fields(self) -> dict[str, Any]:
        """The fields sent, as stored: `expires_at` in epoch seconds."""
        sent = self.model_dump(exclude_unset=True)
        if "metadata" in sent and sent["metadata"] is None:
            sent["metadata"] = {}
        if "expires_at" in sent:
            sent["expires_at"] = parse_expiry(sent["expires_at"])
        return sent


class NewCaller(CallerChange):
    """`POST /admin/callers`: a name, and any of the limits (defaults as for config)."""

    name: StrictStr = Field(description="[a-z0-9][a-z0-9._-]{0,63}")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(NAME_RULE)
        return value
