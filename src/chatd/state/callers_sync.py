"""Keeps this process's live callers in step with the database (docs/live-callers.md).

At start every live caller is read into memory. With `redis_url`, a change is announced
on a Redis channel and every replica reads that caller at once; while this process's
subscription is healthy (confirmed, and Redis answered a ping within DEAD_SECS) the
database is polled only every SAFETY_POLL_SECS, as a safety net. Without Redis, or while
the subscription is down, the database is asked every POLL_SECS for what changed (each
ask re-reads the last OVERLAP_SECS, so a write whose transaction committed late, or a
replica's clock a little behind, is not missed); a subscription that comes back is
followed by one poll at once, for what it missed. Authentication never waits on any of
it: it reads the look-up in `Callers`. With the database down, the last copy keeps
serving; writes answer 503.
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
SAFETY_POLL_SECS = 15.0
PING_SECS = 1.0
DEAD_SECS = 3.0
OVERLAP_SECS = 10.0
LOG_EVERY_SECS = 60.0
CHANNEL = "chatd:callers"


def _ignore(*_: Any) -> None:
    pass


class LiveCallers:
    """The live callers' records (for `/admin` and `/ui`) and the tasks that refresh them."""

    def __init__(
        self,
        store: CallerStore,
        callers: Callers,
        load_spend: Callable[[list[str]], Awaitable[None]] | None = None,
        redis_url: str = "",
        changed: Callable[[str], None] = _ignore,
        push_up: Callable[[bool], None] = _ignore,
    ) -> None:
        self.store = store
        self.callers = callers
        self.records: dict[str, LiveRecord] = {}
        self.up = False
        self._load_spend = load_spend
        self._redis_url = redis_url
        self._changed = changed  # told "push" or "poll" for each change taken from elsewhere
        self._push_up = push_up
        self._cursor = 0.0
        self._loaded = False
        self._logged = 0.0
        self._poller: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._redis: Any = None
        self._subscribed_at = 0.0  # monotonic: when the subscription was last confirmed
        self._heard = 0.0  # monotonic: when Redis last spoke on it
        self._polled_at = 0.0  # monotonic: when the last good poll began
        self._pushed = False
        self._push_logged = 0.0
        self._missed = False  # a pushed change could not be read: poll till one succeeds
        callers.loaded = False  # /v1 fails closed until the first read

    async def start(self) -> None:
        """Read every live caller (when the database answers), then keep them fresh."""
        try:
            await self.store.open()
            await self.poll()
        except Exception as exc:
            self._down(exc)
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop())
        if self._redis_url:
            self._push_up(False)
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    def pushed(self) -> bool:
        """Is the Redis subscription healthy: confirmed, and heard from within DEAD_SECS?"""
        return bool(self._subscribed_at) and time.monotonic() - self._heard < DEAD_SECS

    async def poll(self) -> None:
        began, since = time.time(), time.monotonic()
        self._missed = False  # a push this read may not cover sets it again
        changed = await self.store.changed_since(self._cursor)
        self.apply(changed, spend=self._loaded, via="poll" if self._loaded else "")
        self._loaded = self.callers.loaded = True
        self._cursor = began - OVERLAP_SECS
        self._polled_at = since
        if not self.up:
            if self._logged:
                log.warning("live callers: the database answers again")
            self.up, self._logged = True, 0.0

    def apply(self, changed: list[LiveRecord], spend: bool = True, via: str = "") -> None:
        """Take the database's copy of these callers (an older copy than ours is ignored).
        `via` names how a change made elsewhere arrived (counted once, when first seen)."""
        need_spend = []
        for record in changed:
            known = self.records.get(record.name)
            if known is not None and known.changed_at > record.changed_at:
                continue
            if via and (known is None or known.changed_at < record.changed_at):
                self._changed(via)
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
            self._note_push(self.pushed())
            if self._pushed and not self._missed and self._subscribed_at <= self._polled_at:
                if time.monotonic() - self._polled_at < SAFETY_POLL_SECS:
                    continue  # changes arrive by push; the safety net is not due
            try:
                if not self._loaded:
                    await self.store.open()
                await self.poll()
            except Exception as exc:
                self._missed = True
                self._down(exc)

    def _note_push(self, pushed: bool) -> None:
        if pushed == self._pushed:
            return
        self._pushed = pushed
        self._push_up(pushed)
        now = time.monotonic()
        if pushed:
            log.info("live callers: pushed through Redis; polling every %gs", SAFETY_POLL_SECS)
        elif not self._push_logged or now - self._push_logged >= LOG_EVERY_SECS:
            self._push_logged = now  # Redis flapping: once a minute
            log.warning("live callers: no push from Redis; polling every %gs", POLL_SECS)

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
        except Exception:  # the others' subscriptions are then down too, or the safety net
            pass

    async def _listen(self) -> None:
        from redis.asyncio import Redis

        self._redis = Redis.from_url(self._redis_url, socket_timeout=None, socket_connect_timeout=2)
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(CHANNEL)
                pinged = self._heard = time.monotonic()
                while True:
                    message = await pubsub.get_message(timeout=PING_SECS)
                    now = time.monotonic()
                    if message is not None:
                        self._heard = now
                        await self._heard_of(message)
                    if now - pinged >= PING_SECS:
                        pinged = now
                        await pubsub.ping()
                    if now - self._heard >= DEAD_SECS:
                        raise ConnectionError("Redis went silent")
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: the poll loop polls every POLL_SECS meanwhile
                self._subscribed_at = 0.0
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def _heard_of(self, message: dict[str, Any]) -> None:
        kind, data = message.get("type"), message.get("data")
        if kind == "subscribe":  # also after redis-py reconnected by itself: poll once at once
            self._subscribed_at = time.monotonic()
        elif kind == "message" and isinstance(data, bytes):
            try:
                record = await self.store.get(data.decode())
            except Exception:  # the database away: poll every POLL_SECS till it answers
                self._missed = True
                return
            if record is not None:
                self.apply([record], via="push")

    async def aclose(self) -> None:
        await stop(self._poller)
        await stop(self._listener)
        if self._redis is not None:
            try:
                await self._redis.aclose()
            except Exception:
                pass
        await self.store.aclose()


async def announce(redis_url: str, name: str) -> bool:
    """Tell running replicas that `name` changed (for `chatd callers`); False if Redis
    could not be told."""
    from redis.asyncio import Redis

    redis = Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    try:
        await asyncio.wait_for(redis.publish(CHANNEL, name), 3.0)
        return True
    except Exception:
        return False
    finally:
        try:
            await redis.aclose()
        except Exception:
            pass
