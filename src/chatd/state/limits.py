"""What callers' limits count with: the in-process store of sliding windows and
expiring counters, budget periods, and OpenAI's `X-RateLimit-*` headers."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

WINDOW_SECS = 60.0


@dataclass(slots=True)
class _Window:
    log: deque[tuple[float, float]] = field(default_factory=deque)
    total: float = 0.0


class MemoryStore:
    """In-process shared-state primitives. The async methods are the interface (a Redis
    store implements the same); the sync ones let in-process callers skip a task."""

    local = True

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._counters: dict[str, tuple[float, float]] = {}
        self._flags: dict[str, float] = {}

    # the interface
    async def window_hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        return self.hit(key, amount, limit, window_secs)

    async def add(self, key: str, amount: float, ttl_secs: float) -> float:
        return self.incr(key, amount, ttl_secs)

    async def get(self, key: str) -> float:
        return self.value(key)

    async def raise_to(self, key: str, value: float, ttl_secs: float) -> None:
        missing = value - self.value(key)
        if missing > 0:
            self.incr(key, missing, ttl_secs)

    async def set_flag(self, key: str, ttl_secs: float) -> None:
        self._flags[key] = time.monotonic() + ttl_secs

    async def flag_remaining(self, key: str) -> float:
        until = self._flags.get(key)
        return max(0.0, until - time.monotonic()) if until is not None else 0.0

    # in-process, synchronous
    def hit(
        self, key: str, amount: float, limit: float, window_secs: float
    ) -> tuple[bool, float, float]:
        """Count `amount` in the sliding window unless that would pass `limit` (0: no
        limit; amount 0: just look). Returns (allowed, remaining, reset_secs): when
        refused, the seconds until it would be allowed; else until the window is empty."""
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        log = window.log
        cutoff = now - window_secs
        while log and log[0][0] <= cutoff:
            window.total -= log.popleft()[1]
        if limit and (window.total + amount > limit if amount else window.total >= limit):
            # Walk the log to the entry whose expiry frees enough room.
            need = window.total + max(amount, 1e-9) - limit
            freed = 0.0
            reset = window_secs
            for at, counted in log:
                freed += counted
                if freed >= need:
                    reset = at + window_secs - now
                    break
            return False, max(0.0, limit - window.total), reset
        if amount:
            log.append((now, amount))
            window.total += amount
        reset = log[-1][0] + window_secs - now if log else 0.0
        return True, max(0.0, limit - window.total) if limit else 0.0, reset

    def incr(self, key: str, amount: float, ttl_secs: float) -> float:
        now = time.monotonic()
        value, expires = self._counters.get(key, (0.0, 0.0))
        if expires <= now:
            value = 0.0
        value += amount
        self._counters[key] = (value, now + ttl_secs)
        return value

    def value(self, key: str) -> float:
        value, expires = self._counters.get(key, (0.0, 0.0))
        return value if expires > time.monotonic() else 0.0


# -- periods -------------------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar day, week (from Monday) or month holding `now`."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    return start, (start + timedelta(days=32)).replace(day=1)


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


# OpenAI's `X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens}`, names encoded once.
PARTS = ("limit", "remaining", "reset")
REQUESTS = tuple(f"x-ratelimit-{part}-requests".encode() for part in PARTS)
TOKENS = tuple(f"x-ratelimit-{part}-tokens".encode() for part in PARTS)


def rate_headers(
    names: tuple[bytes, ...], limit: bytes, remaining: float, reset: float
) -> list[tuple[bytes, bytes]]:
    """One limit's three headers: `names` is REQUESTS or TOKENS, `limit` encoded."""
    return [
        (names[0], limit),
        (names[1], str(int(remaining)).encode()),
        (names[2], format_reset(reset).encode()),
    ]
