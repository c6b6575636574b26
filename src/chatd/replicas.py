"""What replicas share, built only when configured: the shared state (Redis,
with in-process fallback), the breakers it keeps in step across replicas, and the
response cache."""

from __future__ import annotations

import asyncio
import logging
from functools import partial

from chatd.config import Settings
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.routing.resilience import Breaker
from chatd.state.cache import ResponseCache
from chatd.state.callers import Callers
from chatd.state.cooldowns import SharedCooldowns, cooldown_key
from chatd.state.shared import SharedState, build_state
from chatd.state.usage.ledger import Ledger
from chatd.surfaces.operations import Operations

log = logging.getLogger("chatd")
RELOAD_AFTER_SECS = 1.5  # the ledger's writer flushes at least once a second
RELOAD_RETRY_SECS = 1.0


def replica_state(
    settings: Settings, registry: Registry, dispatcher: Dispatcher, ops: Operations
) -> tuple[SharedState | None, SharedCooldowns | None, ResponseCache | None]:
    """The shared state (with `redis_url`), the breakers it keeps in step across
    replicas, and the response cache (with `[chatd.cache] enabled`). Nothing without them."""
    chatd = settings.chatd
    state: SharedState | None = None
    cooldowns = None
    if chatd.redis_url:
        ops.metrics.shared_up(False)  # until Redis first answers
        back = []
        if ops.callers is not None and ops.ledger is not None:
            back.append(partial(reload_spend, ops.callers, ops.ledger))
        state = build_state(chatd.redis_url, chatd.cache.max_bytes, ops.metrics.shared_up, back)
        cooldowns = SharedCooldowns(state, shared_breakers(registry, dispatcher))
        if ops.callers is not None:  # one rpm/tpm window and one spend for the fleet
            ops.callers.store = state
        ops.shared = state
    return state, cooldowns, build_cache(settings, registry, state, ops)


def build_cache(
    settings: Settings,
    registry: Registry,
    state: SharedState | None,
    ops: Operations,
    previous: ResponseCache | None = None,
) -> ResponseCache | None:
    """The response cache for `registry` (with `[chatd.cache] enabled`); on a reload,
    over `previous`'s entries (docs/reload.md)."""
    if not settings.chatd.cache.enabled:
        return None
    return ResponseCache(
        settings.chatd.cache,
        registry,
        state=state,
        count=ops.metrics.cache_result,
        size=ops.metrics.cache_bytes.set,
        previous=previous,
    )


async def reload_spend(callers: Callers, ledger: Ledger) -> None:
    """Redis is back, perhaps restarted empty: bring each budget's spend up to the ledger's
    figure again, once this replica's rows of the outage are in it; while the ledger is
    away too, try again every second (docs/shared-state.md)."""
    await asyncio.sleep(RELOAD_AFTER_SECS)
    waited = False
    while True:
        try:
            if await ledger.writer.flush():
                # the spend of the rows just written goes to Redis first: a row the ledger
                # holds and Redis does not yet would be counted twice
                await callers.store.flush()
                await ledger.load_spend(callers)
                say = log.warning if waited else log.info
                say("shared state: spend reloaded from the ledger")
                return
            reason = "rows still wait for the database"
        except Exception as exc:  # the ledger is away too
            reason = type(exc).__name__
        if not waited:
            log.warning("shared state: spend not reloaded from the ledger yet (%s)", reason)
            waited = True
        await asyncio.sleep(RELOAD_RETRY_SECS)


def shared_breakers(registry: Registry, dispatcher: Dispatcher) -> dict[str, Breaker]:
    """Every breaker a trip of which other replicas must honour: one per endpoint of a
    provider with `endpoints` (docs/routing.md), else the provider's own."""
    breakers: dict[str, Breaker] = {}
    for name in registry.providers:
        if name in registry.endpoints:
            for endpoint in dispatcher.balancers[name].endpoints:
                key = cooldown_key(name, endpoint.provider.endpoint)
                breakers[key] = endpoint.guard.breaker
        else:
            breakers[cooldown_key(name)] = dispatcher.guard(name).breaker
    return breakers
