"""One named caller and its limits (docs/live-callers.md): from the config file or live
from the database, checked by the same code either way."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from chatd.config import CallerConfig
from chatd.state.limits import period_bounds

LIMIT_FIELDS = (
    "models", "rpm", "tpm", "budget_usd", "budget_period", "max_concurrency", "admin",
)  # fmt: skip


def token_hash(token: bytes) -> bytes:
    """What the look-up (and the database) keys a token by: its SHA-256."""
    return hashlib.sha256(token).digest()


@dataclass(slots=True, eq=False)
class Caller:
    """One named caller and its limits."""

    name: str
    models: tuple[str, ...] = ("*",)
    rpm: int = 0
    tpm: int = 0
    budget_usd: float = 0.0
    budget_period: str = "month"
    max_concurrency: int = 0
    admin: bool = False
    source: str = "config"  # or "live": made through /admin or the CLI
    expires_at: float = 0.0  # epoch seconds; 0: never
    in_flight: int = 0
    _period_end: float = 0.0
    _spend_key: str = ""
    _period_ends_at: str = ""
    # Made once, not per request: the window keys and the encoded header limits.
    rpm_key: str = field(init=False, default="")
    tpm_key: str = field(init=False, default="")
    rpm_limit: bytes = field(init=False, default=b"")
    tpm_limit: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        self.rpm_key, self.tpm_key = f"rpm:{self.name}", f"tpm:{self.name}"
        self.rpm_limit, self.tpm_limit = str(self.rpm).encode(), str(self.tpm).encode()

    @classmethod
    def from_config(cls, name: str, config: CallerConfig) -> Caller:
        return cls(
            name=name,
            models=tuple(m.strip() for m in config.models),
            rpm=config.rpm,
            tpm=config.tpm,
            budget_usd=config.budget_usd,
            budget_period=config.budget_period,
            max_concurrency=config.max_concurrency,
            admin=config.admin,
        )

    def change(self, **limits: Any) -> None:
        """Take new limits in place: windows, spend and requests in flight carry on, so a
        lowered rpm holds from the next request."""
        for name, value in limits.items():
            setattr(self, name, tuple(value) if name == "models" else value)
        self._period_end = 0.0  # the period may have changed: recomputed on next use
        self.__post_init__()

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.budget_usd or self.max_concurrency)

    def allows(self, model: str) -> bool:
        """Globs over the model as sent: an alias is checked by its own name."""
        return "*" in self.models or any(fnmatchcase(model, glob) for glob in self.models)

    def period(self, now: float) -> tuple[str, str, float]:
        """(spend key, period end as ISO text, seconds left) for the period holding `now`."""
        if now >= self._period_end:
            start, end = period_bounds(self.budget_period, datetime.fromtimestamp(now, UTC))
            self._period_end = end.timestamp()
            self._spend_key = f"spend:{self.name}:{start.isoformat()}"
            self._period_ends_at = end.isoformat().replace("+00:00", "Z")
        return self._spend_key, self._period_ends_at, self._period_end - now

    def period_start(self, now: float) -> datetime:
        return period_bounds(self.budget_period, datetime.fromtimestamp(now, UTC))[0]
