"""In-process shared state (docs/shared-state.md): the store of a single replica, and
every replica's fallback while Redis is away. Limits then hold per replica."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from chatd.state.shared import SharedState, Window


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
        return self.hit(key, amount, limit, window_secs)

    def hit(self, key: str, amount: float, limit: float, window_secs: float) -> Window:
        """`window_hit`, without a coroutine."""
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
        return self.incr(key, amount, ttl_secs)

    def incr(self, key: str, amount: float, ttl_secs: float) -> float:
        """`add`, without a coroutine."""
        now = self.clock()
        value, expires = self._counters.get(key, (0.0, 0.0))
        if expires <= now:
            value, expires = 0.0, now + ttl_secs
        value += amount
        self._counters[key] = (value, expires)
        return value

    def raise_counter(self, key: str, value: float, ttl_secs: float) -> None:
        """`raise_to`, without a coroutine."""
        now = self.clock()
        held, expires = self._counters.get(key, (0.0, 0.0))
        if expires <= now or held < value:
            self._counters[key] = (value, expires if expires > now else now + ttl_secs)

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
        self.unlock(key)

    def unlock(self, key: str) -> None:
        """`release`, without a coroutine."""
        self._flags.pop("lock:" + key, None)

    # Nothing to batch in process: the writes behind a request happen at once.

    def count_later(self, key: str, amount: float, window_secs: float) -> None:
        self.hit(key, amount, 0, window_secs)

    def add_later(self, key: str, amount: float, ttl_secs: float) -> None:
        self.incr(key, amount, ttl_secs)

    def set_flag_later(self, key: str, ttl_secs: float) -> None:
        self._flags[key] = self.clock() + ttl_secs

    def set_blob_later(self, key: str, value: bytes, ttl_secs: float, unlock: str = "") -> None:
        self.blobs.set(key, value, ttl_secs)
        if unlock:
            self.unlock(unlock)
