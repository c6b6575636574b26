"""Shared state in Redis (docs/shared-state.md), falling back to a `LocalState` while
Redis is away.

Every call is bounded by a short timeout; when Redis fails, the call (and those after it)
are served by the fallback until a background task sees Redis answer again and switches
back. Before a request's upstream call: at most one script (`admit`). After it: nothing
on the request's path; its writes wait in `Pending` and a loop sends each batch as one
script FLUSH_EVERY_SECS after its first write, and at shutdown. Keys get a `chatd:` prefix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from chatd.state import redis_scripts as lua
from chatd.state.redis_pipe import RedisPipe, RedisReplyError, Script, bulks
from chatd.state.redis_scripts import PREFIX, Admissions, window_keys
from chatd.state.shared import FLUSH_EVERY_SECS, Admission, Ask, SharedState, describe_url
from chatd.state.shared_local import LocalState
from chatd.state.shared_pending import Pending
from chatd.tasks import spawn, stop

log = logging.getLogger("chatd")

T = TypeVar("T")
OP_TIMEOUT_SECS = 0.2  # one Redis call; past it, the request goes on with local state
PING_TIMEOUT_SECS = 1.0  # the monitor's and a batch's bound: off every request's path
CHECK_EVERY_SECS = 1.0  # how often the monitor asks Redis whether it is (still) there
LOG_EVERY_SECS = 60.0  # "Redis down" at most once a minute
SPEND_TTL_SECS = 32 * 86400.0  # a budget key names its period: this only outlives it


class RedisState(SharedState):
    """The primitives in Redis, falling back to a `LocalState` while Redis is away."""

    def __init__(
        self,
        url: str,
        *,
        fallback: LocalState | None = None,
        on_up: Callable[[bool], None] | None = None,
        op_timeout: float = OP_TIMEOUT_SECS,
        check_every: float = CHECK_EVERY_SECS,
        flush_every: float = FLUSH_EVERY_SECS,
    ) -> None:
        self.fallback = fallback or LocalState()
        self.on_up = on_up  # told every change of `up` (the chatd_shared_state_up gauge)
        self.op_timeout = op_timeout
        self.check_every = check_every
        self.flush_every = flush_every
        self.redis = RedisPipe(url, timeout=op_timeout)
        self._admissions = Admissions()  # ADMIT commands, their keys made once
        # budget key -> spend Redis last said: the fallback's start (docs/shared-state.md)
        self._spent: dict[str, float] = {}
        self.where = describe_url(url)
        self._queued = asyncio.Event()  # set by a write: the batch loop sleeps until then
        self.pending = Pending(self._queued.set)
        self._up = False  # until the first answer: start-up never waits for Redis
        self._logged_at = -math.inf
        self._ever_up = False
        self._tasks: list[asyncio.Task[None]] = []
        # Run each time Redis comes back after an outage (not at the first start): a
        # restarted Redis is empty, and budgets' spend must be brought back into it.
        self.when_back: list[Callable[[], Awaitable[None]]] = []

    @property
    def up(self) -> bool:
        return self._up

    async def start(self) -> None:
        await self.check()
        self._tasks = [
            asyncio.create_task(self._watch(), name="chatd-redis-monitor"),
            asyncio.create_task(self._flush_loop(), name="chatd-redis-write-behind"),
        ]

    async def aclose(self) -> None:
        for task in self._tasks:
            await stop(task)
        try:  # the last writes behind requests: within the shutdown's grace
            async with asyncio.timeout(PING_TIMEOUT_SECS):
                await self.flush()
        except TimeoutError:
            pass
        await self.redis.aclose()

    async def check(self) -> bool:
        """Ping Redis once; switch to it (or away from it) accordingly."""
        try:
            async with asyncio.timeout(max(PING_TIMEOUT_SECS, self.op_timeout)):
                await self.redis.call(b"PING", within=max(PING_TIMEOUT_SECS, self.op_timeout))
        except Exception as exc:  # whatever went wrong, Redis is not serving
            self.redis.drop()  # the next try opens a new connection
            self._down(exc)
            return False
        self._set_up(True)
        return True

    async def probe(self) -> dict[str, Any]:
        started = time.perf_counter()
        result: dict[str, Any] = {"reachable": await self.check(), "url": self.where}
        if not result["reachable"]:
            result["error"] = "unreachable"
        result["latency_ms"] = round((time.perf_counter() - started) * 1000)
        return result

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            await self.check()

    def _set_up(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if not up:
            for key, spent in self._spent.items():
                self.fallback.raise_counter(key, spent, SPEND_TTL_SECS)
            self._spent.clear()
        if up and self._ever_up:
            log.warning("shared state: Redis at %s is back; limits are shared again", self.where)
            for back in self.when_back:
                spawn(back())
        elif up:
            log.info("shared state: Redis at %s", self.where)
        self._ever_up = self._ever_up or up
        if self.on_up is not None:
            self.on_up(up)

    def _down(self, exc: BaseException) -> None:
        self._set_up(False)
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_SECS:
            self._logged_at = now
            log.warning(
                "shared state: Redis at %s is down (%s); serving on in-process state",
                self.where,
                type(exc).__name__,
            )

    async def _call(
        self,
        op: Callable[[], Awaitable[T]],
        local: Callable[[], Awaitable[T]],
        slow: Callable[[], Awaitable[T]] | None = None,
    ) -> T:
        """`op()` on Redis (whose pipe bounds each command by op_timeout); on a connection
        failure `local()` (and Redis marked down); on a timeout `slow()` if given, else
        `local()`."""
        if not self._up:
            return await local()
        try:
            value = await op()
        except TimeoutError:
            # This call goes on without Redis; whether Redis is down is the monitor's
            # call (a burst that stalls this process's event loop is not an outage).
            return await (slow or local)()
        except Exception as exc:  # refused, reset, broken: down at once
            self._down(exc)
            return await local()
        return value

    # -- before the call: one script ------------------------------------------------------

    async def admit(
        self,
        rpm: tuple[str, float] | None,
        tpm: tuple[str, float] | None,
        budget: tuple[str, float] | None,
        window_secs: float,
        count: bool,
        ask: Ask | None = None,
    ) -> Admission:
        # The request path's one round trip, so written out without `_call`'s closures.
        if self._up:
            try:
                claim = None if ask is None else (PREFIX + "b:" + ask[0], PREFIX + "l:" + ask[1])
                command = self._admissions.command(
                    rpm, tpm, budget, int(window_secs * 1_000_000), count, claim,
                    _ms(ask[2]) if ask else 0,
                )  # fmt: skip
                reply = await self._run(lua.ADMIT, command)
            except TimeoutError:  # slow, not down: this request goes on with local state;
                # a claim asked for may have landed unseen: taken, unlocked behind the call
                fallback = await self.fallback.admit(rpm, tpm, budget, window_secs, count)
                return fallback._replace(asked=(None, True)) if ask else fallback
            except Exception as exc:
                self._down(exc)
            else:
                spent, ta, tu, tr, ra, ru, rr, *cache = reply.split(b" ", 7)
                if budget:
                    self._spent[budget[0]] = float(spent)
                tokens = requests = None
                if tpm:
                    tokens = ta == b"1", max(tpm[1] - float(tu), 0.0), float(tr) / 1_000_000
                if rpm:
                    requests = ra == b"1", max(rpm[1] - float(ru), 0.0), float(rr) / 1_000_000
                asked = None
                if cache:
                    found = cache[0]
                    asked = (found[1:], False) if found[:1] == b"=" else (None, found == b"+")
                return Admission(float(spent), tokens, requests, asked)
        return await self.fallback.admit(rpm, tpm, budget, window_secs, count)

    async def _run(self, script: Script, command: bytes) -> Any:
        """A packed EVALSHA; loads the script first when this Redis lacks it (restarted)."""
        try:
            return await self.redis.send(command)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.redis.call(b"SCRIPT", b"LOAD", script.text)
        return await self.redis.send(command)

    async def get_or_claim(self, key: str, lock: str, ttl_secs: float) -> tuple[bytes | None, bool]:
        if self._up:  # a cache miss's one round trip: written out without `_call`
            keys = (PREFIX + "b:" + key, PREFIX + "l:" + lock, _ms(ttl_secs))
            command = b"*6\r\n" + bulks((b"EVALSHA", lua.GET_OR_CLAIM.sha, 2, *keys))
            try:
                reply = await self._run(lua.GET_OR_CLAIM, command)
            except TimeoutError:  # slow: our claim may have landed unseen, and waiting on
                return None, True  # it would wait on ourselves; the store unlocks behind
            except Exception as exc:
                self._down(exc)
            else:
                return (reply[1:], False) if reply[:1] == b"=" else (None, reply == b"+")
        return await self.fallback.get_or_claim(key, lock, ttl_secs)

    # -- after the call: written behind, batched ------------------------------------------

    def count_later(self, key: str, amount: float, window_secs: float) -> None:
        if self._up:
            self.pending.count(key, amount, window_secs)
        else:
            self.fallback.count_later(key, amount, window_secs)

    def add_later(self, key: str, amount: float, ttl_secs: float) -> None:
        if self._up:
            self.pending.add(key, amount, ttl_secs)
        else:
            self.fallback.add_later(key, amount, ttl_secs)

    def set_flag_later(self, key: str, ttl_secs: float) -> None:
        if self._up:
            self.pending.flag(key, ttl_secs)
        else:
            self.fallback.set_flag_later(key, ttl_secs)

    def set_blob_later(self, key: str, value: bytes, ttl_secs: float, unlock: str = "") -> None:
        if self._up:
            self.pending.blob(key, value, ttl_secs, unlock)
        else:
            self.fallback.set_blob_later(key, value, ttl_secs, unlock)

    def flush_soon(self) -> None:
        spawn(self.flush())

    async def flush(self) -> None:
        batch = self.pending.take()
        if not batch:
            return

        async def op() -> None:
            keys, args = batch.command(PREFIX)
            await self.redis.script(lua.FLUSH, keys, args, within=PING_TIMEOUT_SECS)

        async def local() -> None:
            batch.apply(self.fallback)

        await self._call(op, local)

    async def _flush_loop(self) -> None:
        while True:
            await self._queued.wait()  # a first write: its batch goes out flush_every later
            await asyncio.sleep(self.flush_every)
            self._queued.clear()  # the writes from here on are the next batch's
            try:
                await self.flush()
            except Exception:  # the loop must outlive any one bad batch
                log.exception("shared state: a batch of writes failed")

    # -- the primitives -------------------------------------------------------------------

    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        async def op() -> tuple[bool, float, float]:
            args = [repr(float(amount)), repr(float(limit)), int(window_secs * 1_000_000)]
            allowed, used, reset_us = await self.redis.script(
                lua.WINDOW_HIT, list(window_keys(key)), args
            )
            return bool(allowed), max(limit - float(used), 0.0), float(reset_us) / 1_000_000

        return await self._call(
            op, lambda: self.fallback.window_hit(key, amount, limit, window_secs)
        )

    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        async def op() -> float:
            args = [repr(float(amount)), _ms(ttl_secs)]
            return float(await self.redis.script(lua.ADD, [PREFIX + "n:" + key], args))

        return await self._call(op, lambda: self.fallback.add(key, amount, ttl_secs))

    async def raise_to(self, key: str, value: float, ttl_secs: float) -> None:
        async def op() -> None:
            args = [repr(float(value)), _ms(ttl_secs)]
            await self.redis.script(lua.RAISE_TO, [PREFIX + "n:" + key], args)

        await self._call(op, lambda: self.fallback.raise_to(key, value, ttl_secs))

    async def get(self, key: str) -> float:
        async def op() -> float:
            value = await self.redis.call(b"GET", PREFIX + "n:" + key)
            return float(value) if value is not None else 0.0

        return await self._call(op, lambda: self.fallback.get(key))

    async def set_flag(self, key: str, ttl_secs: float) -> None:
        async def op() -> None:
            await self.redis.call(b"SET", PREFIX + "f:" + key, b"1", b"PX", _ms(ttl_secs))

        await self._call(op, lambda: self.fallback.set_flag(key, ttl_secs))

    async def flag_remaining(self, key: str) -> float:
        return (await self.flags_remaining([key]))[0]

    async def flags_remaining(self, keys: list[str]) -> list[float]:
        async def op() -> list[float]:
            ttls = await self.redis.script(lua.PTTLS, [PREFIX + "f:" + k for k in keys], [])
            return [max(int(ms), 0) / 1000 for ms in ttls]

        return await self._call(op, lambda: self.fallback.flags_remaining(keys))

    async def get_blob(self, key: str) -> bytes | None:
        async def op() -> bytes | None:
            value = await self.redis.call(b"GET", PREFIX + "b:" + key)
            return bytes(value) if value is not None else None

        return await self._call(op, lambda: self.fallback.get_blob(key))

    async def set_blob(self, key: str, value: bytes, ttl_secs: float) -> None:
        async def op(within: float | None = None) -> None:
            command = (b"SET", PREFIX + "b:" + key, value, b"PX", _ms(ttl_secs))
            await self.redis.call(*command, within=within)

        async def once_more() -> None:  # other replicas wait on this answer: try harder
            try:
                await op(PING_TIMEOUT_SECS)
            except Exception:
                await self.fallback.set_blob(key, value, ttl_secs)

        await self._call(op, lambda: self.fallback.set_blob(key, value, ttl_secs), once_more)

    async def claim(self, key: str, ttl_secs: float) -> bool:
        async def op() -> bool:
            reply = await self.redis.call(
                b"SET", PREFIX + "l:" + key, b"1", b"PX", _ms(ttl_secs), b"NX"
            )
            return reply is not None

        async def not_claimed() -> bool:
            return False  # a slow Redis may well have a holder: the caller asks again

        return await self._call(op, lambda: self.fallback.claim(key, ttl_secs), not_claimed)

    async def release(self, key: str) -> None:
        async def op() -> None:
            await self.redis.call(b"DEL", PREFIX + "l:" + key)

        await self._call(op, lambda: self.fallback.release(key))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
