"""Who is calling (docs/callers-and-usage.md): callers' tokens, model allow-lists, rpm/tpm windows,
per-period budgets and per-caller concurrency.

The request middleware calls `Callers.authorize(scope)`: it names the caller (in
`scope["state"]["caller"]` and the log facts) or answers 401. Every model-calling route
then awaits `admit(request, model)` right after parsing (403 / 429, and the
`X-RateLimit-*` headers), and `Operations.finished` calls `settle` with what the call
cost. Windows and spend live behind `MemoryStore`, whose primitives are the shared-state
interface (design point 5), so a Redis store can take its place.
"""

from __future__ import annotations

import hmac
import math
import os
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from chatd.config import CallerConfig, ConfigError, Settings
from chatd.errors import BudgetExceeded, ChatdError, Forbidden, RateLimited, Unauthorized
from chatd.state.auth import CHALLENGE, PROTECTED, auth_tokens
from chatd.tasks import spawn

DEFAULT_CALLER = "default"  # the caller made of `auth_tokens_env`'s tokens: no limits
WINDOW_SECS = 60.0


# -- the store: sliding windows, expiring counters, flags --------------------------------


@dataclass(slots=True)
class _Window:
    log: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0


class MemoryStore:
    """In-process shared-state primitives. The async methods are the interface (a Redis
    store implements the same); the sync ones let in-process callers skip a task."""

    local = True

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, tuple[float, float]] = {}
        self._flags: dict[str, float] = {}

    # the interface
    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        return self.hit(key, amount, limit, window_secs)

    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        return self.incr(key, amount, ttl_secs)

    async def get(self, key: str) -> float:
        return self.value(key)

    async def set_flag(self, key: str, ttl_secs: float) -> None:
        self._flags[key] = time.monotonic() + ttl_secs

    async def flag_remaining(self, key: str) -> float:
        until = self._flags.get(key)
        return max(0.0, until - time.monotonic()) if until is not None else 0.0

    # in-process, synchronous
    def hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        """Count `amount` in the sliding window unless that would pass `limit` (0: no
        limit; amount 0: just look). Returns (allowed, remaining, reset_secs): when
        refused, the seconds until it would be allowed; else until the window is empty."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        log = window.log
        cutoff = now - window_secs
        while log and log[0][0] <= cutoff:
            window.total -= log.popleft()[1]
        if limit and (window.total + amount > limit if amount else window.total >= limit):
            # Walk the log to the entry whose expiry frees enough room.
            need = window.total + max(amount, 1e-9) - limit
            freed = 0.0
            reset = window_secs
            for at, counted in log:
                freed += counted
                if freed >= need:
                    reset = at + window_secs - now
                    break
            return False, max(0.0, limit - window.total), reset
        if amount:
            log.append((now, amount))
            window.total += amount
        reset = log[-1][0] + window_secs - now if log else 0.0
        return True, max(0.0, limit - window.total) if limit else 0.0, reset

    def incr(self, key: str, amount: float, ttl_secs: float) -> float:
        now = time.monotonic()
        value, expires = self._counters.get(key, (0.0, 0.0))
        if expires <= now:
            value = 0.0
        value += amount
        self._counters[key] = (value, now + ttl_secs)
        return value

    def value(self, key: str) -> float:
        value, expires = self._counters.get(key, (0.0, 0.0))
        return value if expires > time.monotonic() else 0.0


# -- periods -------------------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar day, week (from Monday) or month holding `now`."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


# -- callers ---------------------------------------------------------------------------


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


class Callers:
    """The configured callers: authentication, admission, and settling after the call."""

    def __init__(self, callers: list[tuple[Caller, list[str]]], store: Any = None) -> None:
        self.callers = {caller.name: caller for caller, _ in callers}
        self._tokens = [(token.encode(), caller) for caller, tokens in callers for token in tokens]
        self.store = store if store is not None else MemoryStore()

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> Callers | None:
        """None when no `[chatd.callers]` table is configured."""
        configured = settings.chatd.callers
        if not configured:
            return None
        environ = os.environ if environ is None else environ
        entries: list[tuple[Caller, list[str]]] = []
        for name, config in configured.items():
            tokens = [t.strip() for t in environ.get(config.token_env, "").split(",")]
            entries.append((Caller.from_config(name, config), [t for t in tokens if t]))
        default = auth_tokens(settings, environ)
        if default:
            if DEFAULT_CALLER in configured:
                raise ConfigError(
                    f"chatd.callers.{DEFAULT_CALLER}: the name is taken by auth_tokens_env's "
                    "tokens; name this caller otherwise"
                )
            entries.append((Caller(DEFAULT_CALLER), default))
        return cls(entries)

    def check(self) -> None:
        """Start-up check: a caller without a token could never call; say so."""
        named = {caller.name for _, caller in self._tokens}
        for name in self.callers:
            if name not in named:
                raise ConfigError(f"chatd.callers.{name}.token_env: unset or empty")

    # -- authentication (in the middleware, before any route) ------------------------

    def authorize(self, scope: Scope) -> ChatdError | None:
        path: str = scope["path"]
        if not (path == PROTECTED or path.startswith(PROTECTED + "/")):
            return None
        token = presented_token(scope["headers"])
        if token is None:
            return Unauthorized(
                "missing Authorization: Bearer <token> (or x-api-key: <token>)",
                headers=dict(CHALLENGE),
            )
        caller = self.identify(token)
        if caller is None:
            return Unauthorized("invalid token", headers=dict(CHALLENGE))
        state = scope.setdefault("state", {})
        state["caller"] = caller
        state.setdefault("log", {})["caller"] = caller.name
        return None

    def identify(self, token: bytes) -> Caller | None:
        # Compare with every token, so the time taken says nothing about which one matched.
        found: Caller | None = None
        for known, caller in self._tokens:
            if hmac.compare_digest(known, token):
                found = caller
        return found

    def is_admin(self, token: bytes) -> bool:
        """May this token read everyone's usage (and the dashboard)?"""
        caller = self.identify(token)
        return caller is not None and caller.admin

    # -- admission (each model-calling route, right after parsing) ---------------------

    async def admit(self, request: Request, model: str) -> None:
        """403 for a model outside the allow-list; 429 over budget, rpm, tpm or
        concurrency. Leaves the `X-RateLimit-*` headers for the middleware to send."""
        state = request.scope.setdefault("state", {})
        caller: Caller | None = state.get("caller")
        if caller is None:
            return
        model = model.strip()
        if not caller.allows(model):
            raise Forbidden(f"caller {caller.name} may not use model {model!r}", param="model")
        if not caller.limited:
            return
        store = self.store
        local = store.local  # in process: the sync primitives, no coroutine per call
        error: ChatdError | None = None
        if caller.budget_usd:
            key, ends_at, left = caller.period(time.time())
            spent = store.value(key) if local else await store.get(key)
            if spent >= caller.budget_usd:
                error = BudgetExceeded(
                    f"caller {caller.name} has spent ${spent:.4f} of its "
                    f"${caller.budget_usd:g} {caller.budget_period} budget; "
                    f"the period ends {ends_at}",
                    headers={"Retry-After": str(max(1, math.ceil(left)))},
                )
        if error is None and caller.max_concurrency and caller.in_flight >= caller.max_concurrency:
            error = RateLimited(
                f"caller {caller.name} has {caller.in_flight} requests in flight "
                f"(max_concurrency {caller.max_concurrency})",
                headers={"Retry-After": "1"},
            )
        token_headers: list[tuple[bytes, bytes]] = []
        if caller.tpm:  # looked at before rpm counts, so a refused request is not counted
            key, tpm = caller.tpm_key, caller.tpm
            allowed, remaining, reset = (
                store.hit(key, 0, tpm, WINDOW_SECS)
                if local
                else await store.window_hit(key, 0, tpm, WINDOW_SECS)
            )
            token_headers = rate_headers(TOKENS, caller.tpm_limit, remaining, reset)
            if not allowed and error is None:
                error = RateLimited(
                    f"caller {caller.name} is over its {tpm} tokens per minute",
                    headers={"Retry-After": str(max(1, math.ceil(reset)))},
                )
        headers: list[tuple[bytes, bytes]] = []
        if caller.rpm:
            key, rpm, count = caller.rpm_key, caller.rpm, 0 if error else 1
            allowed, remaining, reset = (
                store.hit(key, count, rpm, WINDOW_SECS)
                if local
                else await store.window_hit(key, count, rpm, WINDOW_SECS)
            )
            headers = rate_headers(REQUESTS, caller.rpm_limit, remaining, reset)
            if not allowed and error is None:
                error = RateLimited(
                    f"caller {caller.name} is over its {rpm} requests per minute",
                    headers={"Retry-After": str(max(1, math.ceil(reset)))},
                )
        headers += token_headers
        if headers:
            state["headers"] = headers
        if error is not None:
            raise error
        if caller.max_concurrency:
            caller.in_flight += 1
            state["caller_slot"] = True

    # -- after the call (Operations.finished) ---------------------------------------

    def settle(self, scope: Scope, tokens: int, cost: float) -> None:
        """Count the call's tokens and spend; give back its concurrency slot."""
        state = scope.get("state") or {}
        caller: Caller | None = state.get("caller")
        if caller is None:
            return
        if state.get("caller_slot"):
            caller.in_flight -= 1
        store = self.store
        local = store.local  # in process: count now, no task needed
        if caller.tpm and tokens:
            key = caller.tpm_key
            if local:
                store.hit(key, tokens, 0, WINDOW_SECS)
            else:  # Redis (docs/replicas-and-cache.md): off the request's end
                spawn(store.window_hit(key, tokens, 0, WINDOW_SECS))
        if caller.budget_usd and cost:
            key, _, left = caller.period(time.time())
            if local:
                store.incr(key, cost, left + 3600)
            else:  # Redis (docs/replicas-and-cache.md): off the request's end
                spawn(store.add(key, cost, left + 3600))

    async def load_spend(self, spent: Mapping[str, float], now: float | None = None) -> None:
        """At start: each caller's spend in its current period, read from the ledger."""
        now = time.time() if now is None else now
        for name, amount in spent.items():
            caller = self.callers.get(name)
            if caller is not None and caller.budget_usd and amount:
                key, _, left = caller.period(now)
                # A shared store (Redis) may hold this period's spend already: another
                # replica put it there. Bring it up to the ledger's figure, never add twice.
                missing = amount - await self.store.get(key)
                if missing > 0:
                    await self.store.add(key, missing, left + 3600)

    def budget_periods(self, now: float | None = None) -> dict[str, datetime]:
        """Callers with a budget → the start of their current period."""
        now = time.time() if now is None else now
        return {c.name: c.period_start(now) for c in self.callers.values() if c.budget_usd}


def presented_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """`Authorization: Bearer <token>`, else `x-api-key: <token>`."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            if scheme.lower() == b"bearer" and token:
                return token
        elif name == b"x-api-key":
            api_key = value.strip() or None
    return api_key


# OpenAI's `X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens}`, names encoded once.
PARTS = ("limit", "remaining", "reset")
REQUESTS = tuple(f"x-ratelimit-{part}-requests".encode() for part in PARTS)
TOKENS = tuple(f"x-ratelimit-{part}-tokens".encode() for part in PARTS)


def rate_headers(
    names: tuple[bytes, ...], limit: bytes, remaining: float, reset: float
) -> list[tuple[bytes, bytes]]:
    """One limit's three headers: `names` is REQUESTS or TOKENS, `limit` encoded."""
    return [
        (names[0], limit),
        (names[1], str(int(remaining)).encode()),
        (names[2], format_reset(reset).encode()),
    ]
