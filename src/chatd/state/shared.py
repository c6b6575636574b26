"""State that replicas share: Redis when `[chatd] redis_url` is set, in process
otherwise.

One small async interface, `SharedState`, with two implementations that pass one test
suite (tests/test_shared.py):

- `LocalState`: dictionaries in this process (limits then hold per replica);
- `RedisState`: the same primitives in Redis, each one atomic (Lua scripts, `SET PX`,
  `INCRBYFLOAT`), so replicas never race on a read-modify-write. Every call is bounded by
  a short timeout; when Redis fails, the call (and those after it) are served by a
  `LocalState` until a background task sees Redis answer again and switches back.

Primitives: a sliding-window counter (rpm/tpm), a float counter with expiry (spend),
cooldown flags, and byte blobs with a TTL (the response cache). Keys are the caller's;
Redis keys get the `chatd:` prefix.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from chatd.tasks import stop

log = logging.getLogger("chatd")

T = TypeVar("T")
PREFIX = "chatd:"
OP_TIMEOUT_SECS = 0.2  # one Redis call; past it, the request goes on with local state
PING_TIMEOUT_SECS = 1.0  # the monitor's judgement: a slow call alone is not an outage
CHECK_EVERY_SECS = 1.0  # how often the monitor asks Redis whether it is (still) there
LOG_EVERY_SECS = 60.0  # "Redis down" at most once a minute


class SharedState(ABC):
    """The primitives replicas agree on. Times are seconds; keys are plain strings."""

    # False: only the async interface. (The callers' in-process MemoryStore says True and
    # offers sync twins, `hit`/`incr`/`value`, that the request path calls without a task.)
    local = False

    @abstractmethod
    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        """Count `amount` in `key`'s sliding window of `window_secs` if it fits under `limit`.

        Returns (allowed, remaining, reset_secs). Allowed when used + amount <= limit (an
        `amount` of 0 only asks: allowed while used < limit); `limit` <= 0 means no limit
        (the amount is always counted, e.g. tokens of a call that already ran). A refused
        hit is not counted. `reset_secs`: until the oldest counted hit leaves the window.
        """

    @abstractmethod
    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        """Add `amount` to the float counter `key` and return its new value. The first add
        fixes its expiry, `ttl_secs` from then (a period's spend ends with the period)."""

    @abstractmethod
    async def get(self, key: str) -> float:
        """The counter's value; 0 when absent or expired."""

    @abstractmethod
    async def set_flag(self, key: str, ttl_secs: float) -> None:
        """Raise the flag `key` for `ttl_secs` (a cooldown); raising it again restarts it."""

    @abstractmethod
    async def flag_remaining(self, key: str) -> float:
        """Seconds left on the flag `key`; 0 when it is down."""

    async def flags_remaining(self, keys: list[str]) -> list[float]:
        """`flag_remaining` of several keys (one round trip where the store allows)."""
        return [await self.flag_remaining(key) for key in keys]

    @abstractmethod
    async def get_blob(self, key: str) -> bytes | None:
        """The bytes stored under `key`, or None when absent or expired."""

    @abstractmethod
    async def set_blob(self, key: str, value: bytes, ttl_secs: float) -> None:
        """Store `value` under `key` for `ttl_secs`."""

    @abstractmethod
    async def claim(self, key: str, ttl_secs: float) -> bool:
        """Take the lock `key` for `ttl_secs` if nobody holds it (single flight)."""

    @abstractmethod
    async def release(self, key: str) -> None:
        """Drop the lock `key` (taken with `claim`)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (the Redis monitor)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and close connections."""

    @property
    def up(self) -> bool:
        """Whether the shared store (not a fallback) is serving."""
        return True

    async def probe(self) -> dict[str, Any]:
        """`/ready?probe=1`'s entry for the store."""
        return {"reachable": True}


class BytesLRU:
    """An in-process LRU of byte values with per-entry expiry, bounded by total bytes."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self.clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def set(self, key: str, value: bytes, ttl_secs: float) -> None:
        self._drop(key)
        size = len(key) + len(value)
        if size > self.max_bytes or ttl_secs <= 0:
            return  # would evict everything and still not fit
        while self.bytes + size > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
        self._entries[key] = (value, self.clock() + ttl_secs)
        self.bytes += size

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(key) + len(entry[0])


class LocalState(SharedState):
    """Everything in this process: for one replica, or while Redis is away."""

    def __init__(
        self, blob_max_bytes: int = 64 * 1024 * 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._windows: dict[str, deque[tuple[float, float]]] = {}
        self._window_used: dict[str, float] = {}
        self._counters: dict[str, tuple[float, float]] = {}  # key -> (value, expires)
        self._flags: dict[str, float] = {}  # key -> until
        self.blobs = BytesLRU(blob_max_bytes, clock)

    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        now = self.clock()
        hits = self._windows.get(key)
        if hits is None:
            hits = self._windows[key] = deque()
        used = self._window_used.get(key, 0.0)
        while hits and hits[0][0] <= now - window_secs:
            used -= hits.popleft()[1]
        allowed = limit <= 0 or (used + amount <= limit if amount > 0 else used < limit)
        if allowed and amount > 0:
            hits.append((now, amount))
            used += amount
        self._window_used[key] = used
        if not hits:  # nothing counted: forget the key (callers come and go)
            del self._windows[key]
            self._window_used.pop(key, None)
        reset = hits[0][0] + window_secs - now if hits else 0.0
        return allowed, max(limit - used, 0.0), reset

    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        now = self.clock()
        value, expires = self._counters.get(key, (0.0, 0.0))
        if expires <= now:
            value, expires = 0.0, now + ttl_secs
        value += amount
        self._counters[key] = (value, expires)
        return value

    async def get(self, key: str) -> float:
        value, expires = self._counters.get(key, (0.0, 0.0))
        return value if expires > self.clock() else 0.0

    async def set_flag(self, key: str, ttl_secs: float) -> None:
        self._flags[key] = self.clock() + ttl_secs

    async def flag_remaining(self, key: str) -> float:
        until = self._flags.get(key)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._flags[key]
            return 0.0
        return left

    async def get_blob(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    async def set_blob(self, key: str, value: bytes, ttl_secs: float) -> None:
        self.blobs.set(key, value, ttl_secs)

    async def claim(self, key: str, ttl_secs: float) -> bool:
        if await self.flag_remaining("lock:" + key) > 0:
            return False
        await self.set_flag("lock:" + key, ttl_secs)
        return True

    async def release(self, key: str) -> None:
        self._flags.pop("lock:" + key, None)


# -- Redis ------------------------------------------------------------------------------

# A sliding log in a sorted set (score: time in µs, member: "<seq>:<amount>") with its
# running total in a companion hash, so a hit costs O(expired entries), not O(window).
# Time comes from Redis (TIME) so every replica measures the same window.
WINDOW_HIT = """
local zkey, hkey = KEYS[1], KEYS[2]
local amount, limit, window_us = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local used = tonumber(redis.call('HGET', hkey, 'used') or '0')
local old = redis.call('ZRANGEBYSCORE', zkey, '-inf', now - window_us)
if #old > 0 then
  for _, member in ipairs(old) do
    used = used - tonumber(string.match(member, ':(.*)$'))
  end
  redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now - window_us)
  if used < 0 then used = 0 end
end
local allowed
if limit <= 0 then allowed = true
elseif amount > 0 then allowed = used + amount <= limit
else allowed = used < limit end
if allowed and amount > 0 then
  local seq = redis.call('HINCRBY', hkey, 'seq', 1)
  redis.call('ZADD', zkey, now, seq .. ':' .. ARGV[1])
  used = used + amount
end
local reset = 0
local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
if #first > 0 then
  reset = tonumber(first[2]) + window_us - now
  redis.call('HSET', hkey, 'used', tostring(used))
  local ttl = math.ceil(window_us / 1000) + 1000
  redis.call('PEXPIRE', zkey, ttl)
  redis.call('PEXPIRE', hkey, ttl)
else
  redis.call('DEL', zkey, hkey)
  used = 0
end
return {allowed and 1 or 0, tostring(used), tostring(reset)}
"""

# INCRBYFLOAT, and the expiry only when the key has none yet (the first add fixes it).
ADD = """
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""


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
    ) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.fallback = fallback or LocalState()
        self.on_up = on_up  # told every change of `up` (the chatd_shared_state_up gauge)
        self.op_timeout = op_timeout
        self.check_every = check_every
        # No client-side retries: one bounded try, then local state; the monitor retries.
        self.redis = Redis.from_url(
            url,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self.where = describe_url(url)
        self._up = False  # until the first answer: start-up never waits for Redis
        self._logged_at = -math.inf
        self._ever_up = False
        self._monitor: asyncio.Task[None] | None = None
        self._window_hit = self.redis.register_script(WINDOW_HIT)
        self._add = self.redis.register_script(ADD)

    @property
    def up(self) -> bool:
        return self._up

    async def start(self) -> None:
        await self.check()
        self._monitor = asyncio.create_task(self._watch(), name="chatd-redis-monitor")

    async def aclose(self) -> None:
        await stop(self._monitor)
        await self.redis.aclose()

    async def check(self) -> bool:
        """Ping Redis once; switch to it (or away from it) accordingly."""
        try:
            async with asyncio.timeout(max(PING_TIMEOUT_SECS, self.op_timeout)):
                await self.redis.ping()
        except Exception as exc:  # whatever the client raised, Redis is not serving
            self._down(exc)
            return False
        if not self._up:
            # Connections pooled before an outage are dead (Redis restarted); drop them,
            # or the first calls after it fail on them and mark Redis down again.
            await self.redis.connection_pool.disconnect()
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
        if up and self._ever_up:
            log.warning("shared state: Redis at %s is back; limits are shared again", self.where)
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
        """`op()` on Redis within the timeout; on a connection failure `local()` (and
        Redis marked down); on a timeout `slow()` if given, else `local()`."""
        if not self._up:
            return await local()
        try:
            async with asyncio.timeout(self.op_timeout):
                value = await op()
        except TimeoutError:
            # This call goes on without Redis; whether Redis is down is the monitor's
            # call (a burst that stalls this process's event loop is not an outage).
            return await (slow or local)()
        except Exception as exc:  # refused, reset, broken: down at once
            self._down(exc)
            return await local()
        return value

    # -- the primitives ---------------------------------------------------------------

    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        async def op() -> tuple[bool, float, float]:
            allowed, used, reset_us = await self._window_hit(
                keys=[PREFIX + "w:" + key, PREFIX + "w:" + key + ":m"],
                args=[repr(float(amount)), repr(float(limit)), int(window_secs * 1_000_000)],
            )
            return bool(allowed), max(limit - float(used), 0.0), float(reset_us) / 1_000_000

        return await self._call(
            op, lambda: self.fallback.window_hit(key, amount, limit, window_secs)
        )

    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        async def op() -> float:
            value = await self._add(
                keys=[PREFIX + "n:" + key], args=[repr(float(amount)), _ms(ttl_secs)]
            )
            return float(value)

        return await self._call(op, lambda: self.fallback.add(key, amount, ttl_secs))

    async def get(self, key: str) -> float:
        async def op() -> float:
            value = await self.redis.get(PREFIX + "n:" + key)
            return float(value) if value is not None else 0.0

        return await self._call(op, lambda: self.fallback.get(key))

    async def set_flag(self, key: str, ttl_secs: float) -> None:
        async def op() -> None:
            await self.redis.set(PREFIX + "f:" + key, b"1", px=_ms(ttl_secs))

        await self._call(op, lambda: self.fallback.set_flag(key, ttl_secs))

    async def flag_remaining(self, key: str) -> float:
        return (await self.flags_remaining([key]))[0]

    async def flags_remaining(self, keys: list[str]) -> list[float]:
        async def op() -> list[float]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pttl(PREFIX + "f:" + key)
                ttls = await pipe.execute()
            return [max(int(ms), 0) / 1000 for ms in ttls]

        return await self._call(op, lambda: self.fallback.flags_remaining(keys))

    async def get_blob(self, key: str) -> bytes | None:
        async def op() -> bytes | None:
            value = await self.redis.get(PREFIX + "b:" + key)
            return bytes(value) if value is not None else None

        return await self._call(op, lambda: self.fallback.get_blob(key))

    async def set_blob(self, key: str, value: bytes, ttl_secs: float) -> None:
        async def op() -> None:
            await self.redis.set(PREFIX + "b:" + key, value, px=_ms(ttl_secs))

        async def once_more() -> None:  # other replicas wait on this answer: try harder
            try:
                async with asyncio.timeout(PING_TIMEOUT_SECS):
                    await op()
            except Exception:
                await self.fallback.set_blob(key, value, ttl_secs)

        await self._call(op, lambda: self.fallback.set_blob(key, value, ttl_secs), once_more)

    async def claim(self, key: str, ttl_secs: float) -> bool:
        async def op() -> bool:
            return bool(await self.redis.set(PREFIX + "l:" + key, b"1", px=_ms(ttl_secs), nx=True))

        async def not_claimed() -> bool:
            return False  # a slow Redis may well have a holder: the caller asks again

        return await self._call(op, lambda: self.fallback.claim(key, ttl_secs), not_claimed)

    async def release(self, key: str) -> None:
        async def op() -> None:
            await self.redis.delete(PREFIX + "l:" + key)

        await self._call(op, lambda: self.fallback.release(key))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def describe_url(url: str) -> str:
    """`redis://host:port/db` without any user or password, for logs and /ready."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "?"
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{rest}"


def build_state(redis_url: str, blob_max_bytes: int, on_up: Callable[[bool], None]) -> RedisState:
    """The Redis store for `[chatd] redis_url`, with its in-process fallback."""
    return RedisState(redis_url, fallback=LocalState(blob_max_bytes), on_up=on_up)
