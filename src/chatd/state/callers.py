"""Who is calling (docs/callers-and-usage.md, docs/live-callers.md): callers' tokens,
model allow-lists, and admission.

Callers come from two sources merged behind one look-up keyed by the SHA-256 of a token:
the config file's (`replace_config`, which a reload calls) and live ones from the
database (`put_live`, fed by state/callers_sync.py). The request middleware calls
`Callers.authorize(scope)`: it names the caller (in `scope["state"]["caller"]` and the
log facts) or answers 401. Every model-calling route then awaits `admit(request, model)`
right after parsing (403 / 429, and the `X-RateLimit-*` headers), and
`Operations.finished` calls `settle` with what the call cost. Windows and spend live
behind `MemoryStore` (state/limits.py) or the shared state, whichever is set.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.types import Scope

from chatd.config import ConfigError, Settings
from chatd.errors import (
    ChatdError,
    DatabaseUnavailable,
    Forbidden,
    Unauthorized,
)
from chatd.state.auth import CHALLENGE, PROTECTED, auth_tokens, presented_token
from chatd.state.caller import LIMIT_FIELDS, Caller, token_hash
from chatd.state.limits import (
    REQUESTS,
    TOKENS,
    WINDOW_SECS,
    MemoryStore,
    format_reset,
    period_bounds,
    rate_headers,
)
from chatd.state.refusals import over_budget, over_concurrency, over_rate
from chatd.state.shared import Ask

__all__ = ["Caller", "Callers", "MemoryStore", "format_reset", "period_bounds", "token_hash"]

DEFAULT_CALLER = "default"  # the caller made of `auth_tokens_env`'s tokens: no limits


class Callers:
    """Every caller this process knows: authentication, admission, and settling after."""

    def __init__(self, callers: list[tuple[Caller, list[str]]], store: Any = None) -> None:
        self.callers: dict[str, Caller] = {}  # usable callers by name, both sources
        self._by_hash: dict[bytes, Caller] = {}  # token hash -> caller, both sources
        self._config: dict[str, tuple[Caller, list[bytes]]] = {}
        self._live: dict[str, tuple[Caller, list[bytes]]] = {}
        # Once any live caller has existed, /v1 stays guarded: revoking the last one
        # must not open the gateway (docs/live-callers.md).
        self.live_seen = False
        # False until the live callers were first read (state/callers_sync.py): till then
        # /v1 fails closed, with a 503, rather than open.
        self.loaded = True
        self.store = store if store is not None else MemoryStore()
        self.replace_config(callers)

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None, always: bool = False
    ) -> Callers | None:
        """None when no `[chatd.callers]` table is configured, unless `always` (live
        callers may come from the database: then `auth_tokens_env`'s tokens join too)."""
        entries = config_callers(settings, environ, always)
        if not entries and not always:
            return None
        return cls(entries)

    def replace_config(self, callers: list[tuple[Caller, list[str]]]) -> None:
        """Swap the config file's callers (at start, and on a reload); live ones stay.
        A caller that keeps its name stays the object its requests in flight hold, its
        limits changed in place (as a live caller's are), so its counts stay whole."""
        before = {name: caller for name, (caller, _) in self._config.items()}
        for name, (_, hashes) in self._config.items():
            self._forget(name, hashes)
        self._config = {}
        for caller, tokens in callers:
            old = before.get(caller.name)
            if old is not None:
                old.change(**{f: getattr(caller, f) for f in LIMIT_FIELDS})
                caller = old
            self._config[caller.name] = (caller, [token_hash(t.encode()) for t in tokens])
        for name, (caller, hashes) in self._config.items():
            live = self._live.pop(name, None)  # the config file wins a name
            if live is not None:
                self._forget(name, live[1])
            self._remember(caller, hashes)

    def put_live(self, caller: Caller | None, name: str, hashes: Iterable[bytes] = ()) -> bool:
        """Take a live caller as the database has it now (None: revoked or disabled).
        True when it newly needs its period's spend read back (a budget just set)."""
        self.live_seen = True
        if name in self._config:
            return False  # the config file's caller of that name wins
        old = self._live.pop(name, None)
        if old is not None:
            self._forget(name, old[1])
        if caller is None:
            return False
        needs_spend = bool(caller.budget_usd)
        if old is not None:  # change the object requests hold, so limits apply at once
            current = old[0]
            needs_spend = needs_spend and (
                not current.budget_usd or current.budget_period != caller.budget_period
            )
            current.change(**{f: getattr(caller, f) for f in LIMIT_FIELDS})
            current.expires_at = caller.expires_at
            caller = current
        listed = list(hashes)
        self._live[name] = (caller, listed)
        self._remember(caller, listed)
        return needs_spend

    def _remember(self, caller: Caller, hashes: list[bytes]) -> None:
        self.callers[caller.name] = caller
        for digest in hashes:
            self._by_hash[digest] = caller

    def _forget(self, name: str, hashes: list[bytes]) -> None:
        self.callers.pop(name, None)
        for digest in hashes:
            self._by_hash.pop(digest, None)

    def source_of(self, name: str) -> str | None:
        return "config" if name in self._config else "live" if name in self._live else None

    @property
    def active(self) -> bool:
        """Is /v1 guarded? With any caller configured or ever made live."""
        return bool(self._config) or self.live_seen

    @property
    def named(self) -> bool:
        """Any caller beyond `auth_tokens_env`'s `default`: what spend lists are about."""
        return self.live_seen or any(name != DEFAULT_CALLER for name in self._config)

    def check(self) -> None:
        """Start-up check: a caller without a token could never call; say so."""
        for name, (_, hashes) in self._config.items():
            if not hashes:
                raise ConfigError(f"chatd.callers.{name}.token_env: unset or empty")

    # -- authentication (in the middleware, before any route) ------------------------

    def authorize(self, scope: Scope) -> ChatdError | None:
        path: str = scope["path"]
        if not (path == PROTECTED or path.startswith(PROTECTED + "/")):
            return None
        if not self.active:
            return None if self.loaded else not_loaded()
        token = presented_token(scope["headers"])
        if token is None:
            return Unauthorized(
                "missing Authorization: Bearer <token> (or x-api-key: <token>)",
                headers=dict(CHALLENGE),
            )
        caller = self.identify(token)
        if caller is None:
            if not self.loaded:  # perhaps a live caller's, not yet read
                return not_loaded()
            return Unauthorized("invalid token", headers=dict(CHALLENGE))
        state = scope.setdefault("state", {})
        state["caller"] = caller
        state.setdefault("log", {})["caller"] = caller.name
        return None

    def identify(self, token: bytes) -> Caller | None:
        """The caller holding `token`, None if none does or its keys have expired.

        A dictionary keyed by the token's SHA-256: what the look-up's timing could tell is
        about the digest, which says nothing usable about the token."""
        caller = self._by_hash.get(hashlib.sha256(token).digest())
        if caller is not None and caller.expires_at and time.time() >= caller.expires_at:
            return None
        return caller

    def is_admin(self, token: bytes) -> bool:
        """May this token read everyone's usage (and the dashboard)?"""
        caller = self.identify(token)
        return caller is not None and caller.admin

    # -- admission (each model-calling route, right after parsing) ---------------------

    async def admit(self, request: Request, model: str, ask: Ask | None = None) -> None:
        """403 for a model outside the allow-list; 429 over budget, rpm, tpm or
        concurrency. Leaves the `X-RateLimit-*` headers for the middleware to send. With
        `ask` (the response cache's question) and Redis, the answer is left in the
        request's state as `cache_asked`: one round trip for both (docs/shared-state.md)."""
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
        if not store.local:  # shared (Redis): every limit in one round trip
            await self._admit_shared(state, caller, ask)
            return
        error: ChatdError | None = None  # in process: the sync primitives, no coroutine
        if caller.budget_usd:
            key, ends_at, left = caller.period(time.time())
            spent = store.value(key)
            if spent >= caller.budget_usd:
                error = over_budget(caller, spent, ends_at, left)
        if error is None and caller.max_concurrency and caller.in_flight >= caller.max_concurrency:
            error = over_concurrency(caller)
        token_headers: list[tuple[bytes, bytes]] = []
        if caller.tpm:  # looked at before rpm counts, so a refused request is not counted
            key, tpm = caller.tpm_key, caller.tpm
            allowed, remaining, reset = store.hit(key, 0, tpm, WINDOW_SECS)
            token_headers = rate_headers(TOKENS, caller.tpm_limit, remaining, reset)
            if not allowed and error is None:
                error = over_rate(caller, "tokens", tpm, reset)
        headers: list[tuple[bytes, bytes]] = []
        if caller.rpm:
            key, rpm, count = caller.rpm_key, caller.rpm, 0 if error else 1
            allowed, remaining, reset = store.hit(key, count, rpm, WINDOW_SECS)
            headers = rate_headers(REQUESTS, caller.rpm_limit, remaining, reset)
            if not allowed and error is None:
                error = over_rate(caller, "requests", rpm, reset)
        self._admitted(state, caller, headers + token_headers, error)

    async def _admit_shared(self, state: dict[str, Any], caller: Caller, ask: Ask | None) -> None:
        """`admit` on a shared store: budget, tpm and rpm read and counted in one call
        (docs/shared-state.md)."""
        budget: tuple[str, float] | None = None
        ends_at = ""
        left = 0.0
        if caller.budget_usd:
            key, ends_at, left = caller.period(time.time())
            budget = (key, caller.budget_usd)
        busy = None
        if caller.max_concurrency and caller.in_flight >= caller.max_concurrency:
            busy = over_concurrency(caller)
        spent, tokens, requests, asked = await self.store.admit(
            (caller.rpm_key, caller.rpm) if caller.rpm else None,
            (caller.tpm_key, caller.tpm) if caller.tpm else None,
            budget,
            WINDOW_SECS,
            busy is None,
            ask,
        )
        if asked is not None:
            state["cache_asked"] = asked
        error: ChatdError | None = None
        if budget:
            state["spent"] = spent  # settle: did this call cross the budget?
            if spent >= caller.budget_usd:
                error = over_budget(caller, spent, ends_at, left)
        error = error or busy
        headers: list[tuple[bytes, bytes]] = []
        if requests is not None:
            allowed, remaining, reset = requests
            headers = rate_headers(REQUESTS, caller.rpm_limit, remaining, reset)
        if tokens is not None:
            allowed, remaining, reset = tokens
            headers += rate_headers(TOKENS, caller.tpm_limit, remaining, reset)
            if not allowed and error is None:
                error = over_rate(caller, "tokens", caller.tpm, reset)
        if requests is not None and not requests[0] and error is None:
            error = over_rate(caller, "requests", caller.rpm, requests[2])
        self._admitted(state, caller, headers, error)

    @staticmethod
    def _admitted(
        state: dict[str, Any],
        caller: Caller,
        headers: list[tuple[bytes, bytes]],
        error: ChatdError | None,
    ) -> None:
        """Both stores' last step: the X-RateLimit-* headers, the refusal, or the slot."""
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
        local = store.local  # in process: count now; shared: written behind, batched
        if caller.tpm and tokens:
            key = caller.tpm_key
            if local:
                store.hit(key, tokens, 0, WINDOW_SECS)
            else:
                store.count_later(key, tokens, WINDOW_SECS)
        if caller.budget_usd and cost:
            key, _, left = caller.period(time.time())
            if local:
                store.incr(key, cost, left + 3600)
            else:
                store.add_later(key, cost, left + 3600)
                if state.get("spent", 0.0) + cost >= caller.budget_usd:
                    store.flush_soon()  # this call crossed the budget: tell the fleet now

    async def load_spend(self, spent: Mapping[str, float], now: float | None = None) -> None:
        """At start (and when Redis comes back): each caller's spend in its current
        period, read from the ledger."""
        now = time.time() if now is None else now
        for name, amount in spent.items():
            caller = self.callers.get(name)
            if caller is not None and caller.budget_usd and amount:
                key, _, left = caller.period(now)
                # A shared store (Redis) may hold this period's spend already: another
                # replica put it there. Bring it up to the ledger's figure, never add twice.
                await self.store.raise_to(key, amount, left + 3600)

    def budget_periods(self, now: float | None = None) -> dict[str, datetime]:
        """Callers with a budget → the start of their current period."""
        now = time.time() if now is None else now
        return {c.name: c.period_start(now) for c in self.callers.values() if c.budget_usd}


def not_loaded() -> DatabaseUnavailable:
    return DatabaseUnavailable(
        "live callers have not been read from the database yet; try again shortly",
        headers={"Retry-After": "5"},
    )


def config_callers(
    settings: Settings, environ: Mapping[str, str] | None = None, with_default: bool = False
) -> list[tuple[Caller, list[str]]]:
    """`[chatd.callers]` with each one's tokens, and `auth_tokens_env`'s as `default`
    (alone too when `with_default`)."""
    configured = settings.chatd.callers
    if not configured and not with_default:
        return []
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
        # Alone, they read all usage and the dashboard, as any inbound token did before
        # callers existed; beside named callers they are one more caller. Never /admin
        # (state/admin_auth.py).
        entries.append((Caller(DEFAULT_CALLER, admin=not configured), default))
    return entries
