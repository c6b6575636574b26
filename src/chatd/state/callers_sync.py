"""Keeps this process's live callers in step with the database (docs/live-callers.md).

At start every live caller is read into memory; then the database is asked every
POLL_SECS for what changed (each ask re-reads the last OVERLAP_SECS, so a write whose
transaction committed late, or a replica's clock a little behind, is not missed). With
`redis_url`, a change is also announced on a Redis channel and the other replicas read
that caller at once. Authentication never waits on any of it: it reads the look-up in
`Callers`. With the database down, the last copy keeps serving; writes answer 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from chatd.errors import ChatdError, DatabaseUnavailable
from chatd.state.callers import Callers
from chatd.state.callers_store import CallerStore, LiveRecord
from chatd.state.usage.writer import describe
from chatd.tasks import spawn, stop

log = logging.getLogger("chatd")

POLL_SECS = 0.5
OVERLAP_SECS = 10.0
LOG_EVERY_SECS = 60.0
CHANNEL = "chatd:callers"


class LiveCallers:
    """The live callers' records (for `/admin` and `/ui`) and the task that refreshes them."""

    def __init__(
        self,
        store: CallerStore,
        callers: Callers,
        load_spend: Callable[[list[str]], Awaitable[None]] | None = None,
        redis_url: str = "",
    ) -> None:
        self.store = store
        self.callers = callers
        self.records: dict[str, LiveRecord] = {}
        self.up = False
        self._load_spend = load_spend
        self._redis_url = redis_url
        self._cursor = 0.0
        self._loaded = False
        self._logged = 0.0
        self._poller: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._redis: Any = None
        callers.loaded = False  # /v1 fails closed until the first read

    async def start(self) -> None:
        """Read every live caller (when the database answers), then keep polling."""
        try:
            await self.store.open()
            await self.poll()
        except Exception as exc:
            self._down(exc)
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop())
        if self._redis_url:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def poll(self) -> None:
        began = time.time()
        changed = await self.store.changed_since(self._cursor)
        self.apply(changed, spend=self._loaded)
        self._loaded = self.callers.loaded = True
        self._cursor = began - OVERLAP_SECS
        if not self.up:
            if self._logged:
                log.warning("live callers: the database answers again")
            self.up, self._logged = True, 0.0

    def apply(self, changed: list[LiveRecord], spend: bool = True) -> None:
        """Take the database's copy of these callers (an older copy than ours is ignored)."""
        need_spend = []
        for record in changed:
            known = self.records.get(record.name)
            if known is not None and known.changed_at > record.changed_at:
                continue
            self.records[record.name] = record
            if self.callers.put_live(record.caller(), record.name, record.hashes()):
                need_spend.append(record.name)
        if spend and need_spend and self._load_spend is not None:
            spawn(self._load_spend(need_spend))

    async def write(self, work: Awaitable[Any]) -> Any:
        """Run one store write; take its result into memory at once and tell the others.
        A database that fails is a 503, never a traceback."""
        try:
            result = await work
        except ChatdError:
            raise
        except Exception as exc:
            log.warning("live callers: a write failed (%s)", describe(exc))
            raise DatabaseUnavailable(
                "the callers' database cannot be reached; nothing was changed",
                headers={"Retry-After": "5"},
            ) from None
        record = result[0] if isinstance(result, tuple) else result
        if isinstance(record, LiveRecord):
            self.apply([record])
            if self._redis is not None:
                spawn(self._announce(record.name))
        return result

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(POLL_SECS)
            try:
                if not self._loaded:
                    await self.store.open()
                await self.poll()
            except Exception as exc:
                self._down(exc)

    def _down(self, exc: Exception) -> None:
        self.up = False
        now = time.monotonic()
        if not self._logged or now - self._logged >= LOG_EVERY_SECS:
            self._logged = now
            log.warning(
                "live callers: the database cannot be read (%s); serving the last copy",
                describe(exc),
            )

    # -- Redis: a change announced to every replica -----------------------------------

    async def _announce(self, name: str) -> None:
        try:
            await asyncio.wait_for(self._redis.publish(CHANNEL, name), 1.0)
        except Exception:  # polling still brings the change within a second
            pass

    async def _listen(self) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(self._redis_url, socket_timeout=None)
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                async for message in pubsub.listen():
                    name = message.get("data")
                    if isinstance(name, bytes):
                        record = await self.store.get(name.decode())
                        if record is not None:
                            self.apply([record])
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis or the database away: polling carries on
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def aclose(self) -> None:
        await stop(self._poller)
        await stop(self._listener)
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass
        await self.store.aclose()
