"""Cooldowns that every replica honours, when `[chatd] redis_url` is set
(docs/shared-state.md).

Each replica keeps its own breakers (`resilience.Breaker`) and asks nothing of Redis per
request. A breaker that trips publishes a flag, `cooldown:<provider>`, for its cooldown,
written behind with the next batch (at most FLUSH_EVERY_SECS late); a background loop
reads the flags of all breakers every SYNC_EVERY_SECS in one script (the local mirror)
and holds any breaker whose flag outlives its own cooldown. So a trip on one replica
stops calls from all of them within FLUSH_EVERY_SECS + SYNC_EVERY_SECS (0.2 s).

Keyed by provider today; `cooldown_key(provider, endpoint)` is the one place an
endpoint name joins the key when breakers become per endpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from chatd.routing.resilience import Breaker
from chatd.state.shared import SharedState
from chatd.tasks import stop

log = logging.getLogger("chatd")

SYNC_EVERY_SECS = 0.15  # the mirror's age at most; with a batch's 0.05 s, 0.2 s
EPSILON_SECS = 0.05  # a flag that outlives our own cooldown by less is our own trip


def cooldown_key(provider: str, endpoint: str | None = None) -> str:
    return f"cooldown:{provider}" + (f"/{endpoint}" if endpoint else "")


class SharedCooldowns:
    """Publishes local trips as shared flags and holds breakers on others' flags."""

    def __init__(
        self,
        state: SharedState,
        breakers: dict[str, Breaker],
        every: float = SYNC_EVERY_SECS,
    ) -> None:
        self.state = state
        self.breakers = {key: b for key, b in breakers.items() if b.enabled}
        self.every = every
        self._task: asyncio.Task[None] | None = None
        for key, breaker in self.breakers.items():
            breaker.on_trip = self._chain(breaker.on_trip, key, breaker)

    def watch(self, breakers: dict[str, Breaker]) -> None:
        """A reload (docs/reload.md): share the trips of breakers not watched yet."""
        for key, breaker in breakers.items():
            if breaker.enabled and self.breakers.get(key) is not breaker:
                breaker.on_trip = self._chain(breaker.on_trip, key, breaker)
                self.breakers[key] = breaker
        if self._task is None and self.breakers:
            self._task = asyncio.create_task(self._loop(), name="chatd-cooldown-sync")

    def _chain(
        self, told: Callable[[], None] | None, key: str, breaker: Breaker
    ) -> Callable[[], None]:
        def tripped() -> None:
            if told is not None:
                told()
            self.state.set_flag_later(key, breaker.cooldown)

        return tripped

    async def sync(self) -> None:
        """Hold every breaker whose shared flag has longer to run than its own cooldown."""
        keys = list(self.breakers)
        for key, left in zip(keys, await self.state.flags_remaining(keys), strict=True):
            breaker = self.breakers[key]
            if left > breaker.remaining() + EPSILON_SECS:
                breaker.hold(left)

    async def start(self) -> None:
        if self.breakers:
            self._task = asyncio.create_task(self._loop(), name="chatd-cooldown-sync")

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync()
            except Exception:  # the loop must outlive any one bad round
                log.exception("shared cooldowns: sync failed")
            await asyncio.sleep(self.every)

    async def aclose(self) -> None:
        await stop(self._task)
