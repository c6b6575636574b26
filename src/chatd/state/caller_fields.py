"""What a live caller may be given (docs/live-callers.md): the body of `POST /admin/callers` and of
`PATCH`, checked once here for the routes and the CLI alike. Every refusal names its field.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    field_validator,
)

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_METADATA = 32  # keys; a label set, not a document

LARGEST = 10**12  # past any real limit, inside every database's integer


def whole_number(value: Any) -> Any:
    """An integer, or a float with nothing after the point (JSON's 5.0 is an integer);
    never a string or a boolean."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number")
    return value


Count = Annotated[int, Field(ge=0, le=LARGEST), BeforeValidator(whole_number)]
Money = Annotated[float, Field(ge=0, le=LARGEST, strict=True, allow_inf_nan=False)]
Glob = Annotated[StrictStr, Field(min_length=1, max_length=200)]
Label = Annotated[StrictStr, Field(max_length=500)]


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
    """`PATCH /admin/callers/{name}`: any of these; what is left out stays as it is. A
    null is refused except for `expires_at` (never expires) and `metadata` (none)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    # Typed without None, defaulting to None: a field left out is None, one sent as null
    # is a 400 naming it, and the published schema says so.
    models: list[Glob] = Field(default=None, min_length=1, max_length=100)  # type: ignore[assignment]
    rpm: Count = Field(default=None, description="Requests per minute; 0 = unlimited.")  # type: ignore[assignment]
    tpm: Count = Field(default=None, description="Tokens per minute; 0 = unlimited.")  # type: ignore[assignment]
    budget_usd: Money = Field(default=None, description="Spend per period; 0 = no cap.")  # type: ignore[assignment]
    budget_period: Literal["day", "week", "month"] = None  # type: ignore[assignment]
    max_concurrency: Count = None  # type: ignore[assignment]
    admin: StrictBool = None  # type: ignore[assignment]
    expires_at: str | None = Field(
        default=None,
        description="RFC 3339, in the future; after it the caller's tokens are refused.",
        json_schema_extra={"format": "date-time"},
    )
    metadata: dict[StrictStr, Label] | None = Field(
        default=None, max_length=MAX_METADATA, description="A flat object of strings."
    )
    disabled: StrictBool = None  # type: ignore[assignment]

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expiry(cls, value: Any) -> Any:
        parse_expiry(value)
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

    name: StrictStr = Field(pattern=NAME.pattern, description="[a-z0-9][a-z0-9._-]{0,63}")
