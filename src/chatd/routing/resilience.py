"""Resilience policy (docs/routing.md): what to retry, how long to wait, and per-provider guards.

The Dispatcher applies these; nothing here knows about HTTP routes. A provider's guard
holds its concurrency limiter and its cooldown breaker for the life of the app.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from chatd.config import ProviderConfig
from chatd.errors import (
    ChatdError,
    ContextOverflow,
    InvalidRequest,
    ProviderCoolingDown,
    ProviderOverloaded,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
)
from chatd.providers.failures import CALLER_FAULT_STATUSES

BACKOFF_BASE_SECS = 0.5
BACKOFF_CAP_SECS = 8.0
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
TIMEOUT_HEADER = "x-chatd-timeout-ms"


def backoff_delay(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**retry)) for the `retry`-th retry (0-based)."""
    ceiling = min(BACKOFF_CAP_SECS, BACKOFF_BASE_SECS * 2 ** min(retry, 32))
    return ceiling * rand()


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP-date); None if absent
    or unreadable. A date in the past means 0."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max((when - now).total_seconds(), 0.0)


def is_retryable(error: BaseException) -> bool:
    """Connection failures and upstream 429/5xx-transients; never timeouts, bad answers or
    a verdict on the caller's request (an overflow said with a 500 included)."""
    if not isinstance(error, UpstreamError) or error.should_retry is False:
        return False
    if error.upstream_status is None:
        return error.unreachable
    return error.upstream_status in RETRYABLE_STATUSES


def is_upstream_failure(error: BaseException) -> bool:
    """Failures that count towards a provider's cooldown: 5xx, 429, unreachable, timeout;
    never the caller's own fault."""
    if isinstance(error, UpstreamTimeout):
        return True
    if not isinstance(error, UpstreamError) or isinstance(error, UpstreamRejected):
        return False
    if error.upstream_status is None:
        return error.unreachable
    return error.upstream_status >= 500 or error.upstream_status == 429


def may_fall_back(error: ChatdError) -> bool:
    """Whether the next fallback target should be tried after `error`: never on a fault of
    the caller's, but a context overflow, which a roomier target may take."""
    if isinstance(error, ContextOverflow):
        return True
    if isinstance(error, InvalidRequest | UpstreamRejected):
        return False
    if isinstance(error, UpstreamError):
        return error.upstream_status not in CALLER_FAULT_STATUSES
    return error.status in (404, 503, 504)


def parse_timeout_header(value: str | None) -> float | None:
    """`X-Chatd-Timeout-Ms` as a budget in seconds; None when absent; 400 when not a
    positive integer."""
    if value is None:
        return None
    text = value.strip().lstrip("0")
    if not (text.isascii() and text.isdigit()):  # "²" is a digit to str.isdigit, not to int
        raise InvalidRequest(
            "X-Chatd-Timeout-Ms must be a positive integer (milliseconds)",
            param="X-Chatd-Timeout-Ms",
        )
    # Past thirty thousand years the figure means "no tighter deadline"; int() of
    # thousands of digits would refuse to convert at all.
    return int(text) / 1000 if len(text) <= 15 else 1e12


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class Limiter:
    """At most `max_concurrency` upstream calls at once (0 = unlimited); the rest queue."""

    def __init__(
        self,
        provider: str,
        max_concurrency: int,
        queue_timeout: float,
        on_busy: Callable[[int], None] | None = None,
    ) -> None:
        self.provider = provider
        self.max_concurrency = max_concurrency
        self.queue_timeout = queue_timeout
        self.busy = 0  # calls holding a slot (counted even when unlimited)
        self.on_busy = on_busy  # told the new `busy` after every change (metrics)
        self._slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def acquire(self, within: float | None = None) -> None:
        """Take a slot, waiting up to `queue_timeout` (or `within`, if shorter); else 503."""
        await self._take(within)
        self._count(1)

    async def _take(self, within: float | None) -> None:
        if self._slots is None:
            return
        wait = self.queue_timeout if within is None else min(self.queue_timeout, within)
        if not self._slots.locked():
            await self._slots.acquire()
            return
        if wait > 0:
            try:
                async with asyncio.timeout(wait):
                    await self._slots.acquire()
                return
            except TimeoutError:
                pass
        raise ProviderOverloaded(
            f"{self.provider}: all {self.max_concurrency} upstream slots busy "
            f"for {self.queue_timeout:g}s",
            headers=retry_after_header(self.queue_timeout),
        )

    def has_room(self) -> bool:
        """Would `acquire` get a slot without waiting?"""
        return self._slots is None or not self._slots.locked()

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
        self._count(-1)

    def _count(self, delta: int) -> None:
        self.busy += delta
        if self.on_busy is not None:
            self.on_busy(self.busy)


class Breaker:
    """Cooldown: after `failures` consecutive failed calls, refuse calls for `cooldown` secs.

    When the cooldown ends one more failure reopens it at once (the count is still
    over the threshold); one success closes it and resets the count.
    """

    def __init__(
        self,
        provider: str,
        failures: int,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        on_trip: Callable[[], None] | None = None,
    ) -> None:
        self.provider = provider
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self.consecutive = 0
        self.open_until = 0.0
        self.trips = 0
        self.on_trip = on_trip  # told of every cooldown that starts (metrics)

    @property
    def enabled(self) -> bool:
        return self.threshold > 0 and self.cooldown > 0

    def remaining(self) -> float:
        """Seconds left in the current cooldown, 0 when calls may go through."""
        return max(self.open_until - self.clock(), 0.0) if self.enabled else 0.0

    def check(self) -> None:
        """Raise `503 provider_cooling_down` while cooling down."""
        left = self.remaining()
        if left > 0:
            why = (
                f"after {self.consecutive} consecutive failures"
                if self.consecutive >= self.threshold
                else "(tripped by another replica)"
            )
            raise ProviderCoolingDown(
                f"{self.provider}: cooling down {why}; {left:.1f}s left",
                headers=retry_after_header(left),
            )

    def hold(self, seconds: float) -> None:
        """Honour a cooldown another replica began: refuse calls for `seconds` from now
        (never shortening one already running here)."""
        if self.enabled:
            self.open_until = max(self.open_until, self.clock() + seconds)

    def succeeded(self) -> None:
        self.consecutive = 0
        self.open_until = 0.0

    def failed(self) -> None:
        self.consecutive += 1
        if self.enabled and self.consecutive >= self.threshold and self.remaining() == 0:
            self.open_until = self.clock() + self.cooldown
            self.trips += 1
            if self.on_trip is not None:
                self.on_trip()


class Guard:
    """One provider's limiter, breaker and retry settings."""

    def __init__(
        self,
        provider: str,
        config: ProviderConfig,
        *,
        on_busy: Callable[[int], None] | None = None,
        on_trip: Callable[[], None] | None = None,
    ) -> None:
        self.max_retries = config.max_retries
        self.max_retry_after = config.max_retry_after_secs
        self.limiter = Limiter(
            provider, config.max_concurrency, config.queue_timeout_secs, on_busy=on_busy
        )
        self.breaker = Breaker(
            provider, config.cooldown_failures, config.cooldown_secs, on_trip=on_trip
        )

    def record(self, error: BaseException | None) -> None:
        """Feed one call's outcome to the breaker: None is a success."""
        if error is None:
            self.breaker.succeeded()
        elif is_upstream_failure(error):
            self.breaker.failed()
