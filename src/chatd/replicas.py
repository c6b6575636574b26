"""What replicas share, built only when configured: the shared state (Redis,
with in-process fallback), the breakers it keeps in step across replicas, and the
response cache."""

from __future__ import annotations

from chatd.config import Settings
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.routing.resilience import Breaker
from chatd.state.cache import ResponseCache
from chatd.state.cooldowns import SharedCooldowns, cooldown_key
from chatd.state.shared import SharedState, build_state
from chatd.surfaces.operations import Operations


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
        state = build_state(chatd.redis_url, chatd.cache.max_bytes, ops.metrics.shared_up)
        cooldowns = SharedCooldowns(state, shared_breakers(registry, dispatcher))
        if ops.callers is not None:  # one rpm/tpm window and one spend for the fleet
            ops.callers.store = state
        ops.shared = state
    cache = None
    if chatd.cache.enabled:
        cache = ResponseCache(
            chatd.cache,
            registry,
            state=state,
            count=ops.metrics.cache_result,
            size=ops.metrics.cache_bytes.set,
        )
    return state, cooldowns, cache


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
