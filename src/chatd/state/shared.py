"""State that replicas share: Redis when `[chatd] redis_url` is set, in process otherwise
(docs/shared-state.md).

One small async interface, `SharedState`, with two implementations that pass one test
suite (tests/test_shared.py): `LocalState` (state/shared_local.py: dictionaries in this
process, limits then hold per replica) and `RedisState` (state/shared_redis.py: the same
primitives in Redis, each atomic, falling back to a `LocalState` while Redis is away).

Primitives: a sliding-window counter (rpm/tpm), a float counter with expiry (spend),
cooldown flags, byte blobs with a TTL (the response cache) and locks (single flight).
Two composites keep Redis off the request's path: `admit` checks and counts all of a
caller's limits at once (one round trip), and the `*_later` writes are applied behind the
request, batched (at most FLUSH_EVERY_SECS late).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from chatd.tasks import spawn

FLUSH_EVERY_SECS = 0.05  # writes behind the request reach Redis at most this late

Window = tuple[bool, float, float]  # (allowed, remaining, reset_secs), as window_hit says


# The response cache's question asked within admission: (blob key, lock key, lock secs).
Ask = tuple[str, str, float]


class Admission(NamedTuple):
    """What `admit` found: the period's spend, and the tpm look and rpm hit (None for a
    limit the caller does not have); `asked`: the cache's answer when it was asked along
    (as `get_or_claim` gives it), else None."""

    spent: float
    tokens: Window | None
    requests: Window | None
    asked: tuple[bytes | None, bool] | None = None


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

    async def raise_to(self, key: str, value: float, ttl_secs: float) -> None:
        """Bring the counter `key` up to `value` if it holds less (spend from the ledger:
        replicas doing it at once never add it twice)."""
        missing = value - await self.get(key)
        if missing > 0:
            await self.add(key, missing, ttl_secs)

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

    # -- composites: one round trip before the call, none after it ----------------------

    async def admit(
        self,
        rpm: tuple[str, float] | None,
        tpm: tuple[str, float] | None,
        budget: tuple[str, float] | None,
        window_secs: float,
        count: bool,
        ask: Ask | None = None,
    ) -> Admission:
        """All of a caller's limits at once: each given as (key, limit). Reads the spend
        under budget's key; asks the tpm window (amount 0); counts one request in the rpm
        window only when `count` and neither the budget nor tpm refuses. `ask`: a store
        with round trips (Redis) asks the cache's `get_or_claim` in the same one, for a
        request admitted; others leave it to the cache."""
        spent = await self.get(budget[0]) if budget else 0.0
        tokens = await self.window_hit(tpm[0], 0, tpm[1], window_secs) if tpm else None
        counted = count and not (budget and spent >= budget[1]) and (not tokens or tokens[0])
        requests = None
        if rpm:
            requests = await self.window_hit(rpm[0], 1 if counted else 0, rpm[1], window_secs)
        return Admission(spent, tokens, requests)

    async def get_or_claim(self, key: str, lock: str, ttl_secs: float) -> tuple[bytes | None, bool]:
        """The blob `key`; when absent, try to take `lock` too. Returns (blob, claimed)."""
        value = await self.get_blob(key)
        if value is not None:
            return value, False
        return None, await self.claim(lock, ttl_secs)

    def count_later(self, key: str, amount: float, window_secs: float) -> None:
        """`window_hit(key, amount, 0, window_secs)` behind the request (a call's tokens)."""
        spawn(self.window_hit(key, amount, 0, window_secs))

    def add_later(self, key: str, amount: float, ttl_secs: float) -> None:
        """`add` behind the request (a call's spend)."""
        spawn(self.add(key, amount, ttl_secs))

    def set_flag_later(self, key: str, ttl_secs: float) -> None:
        """`set_flag` behind the request (a breaker's trip)."""
        spawn(self.set_flag(key, ttl_secs))

    def set_blob_later(self, key: str, value: bytes, ttl_secs: float, unlock: str = "") -> None:
        """`set_blob` behind the request, and `release(unlock)` with it (single flight)."""

        async def both() -> None:
            await self.set_blob(key, value, ttl_secs)
            if unlock:
                await self.release(unlock)

        spawn(both())

    def flush_soon(self) -> None:  # noqa: B027 - optional hook
        """Send what waits without waiting for the next batch (a budget just crossed)."""

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Send the writes that wait behind requests now (at shutdown; tests)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin background work (the Redis monitor, the write-behind loop)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Flush what waits, stop background work and close connections."""

    @property
    def up(self) -> bool:
        """Whether the shared store (not a fallback) is serving."""
        return True

    async def probe(self) -> dict[str, Any]:
        """`/ready?probe=1`'s entry for the store."""
        return {"reachable": True}


def build_state(
    redis_url: str,
    blob_max_bytes: int,
    on_up: Callable[[bool], None],
    when_back: list[Callable[[], Awaitable[None]]] | None = None,
) -> SharedState:
    """The Redis store for `[chatd] redis_url`, with its in-process fallback; `on_up` told
    of every change, `when_back` run each time Redis returns after an outage."""
    from chatd.state.shared_local import LocalState
    from chatd.state.shared_redis import RedisState

    state = RedisState(redis_url, fallback=LocalState(blob_max_bytes), on_up=on_up)
    state.when_back += when_back or []
    return state


def describe_url(url: str) -> str:
    """`redis://host:port/db` without any user or password, for logs and /ready."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "?"
    rest = rest.rpartition("@")[2]
    return f"{scheme}://{rest}"
