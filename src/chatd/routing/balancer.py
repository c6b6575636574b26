"""Which host gets this call: a provider's endpoints and the choice among them.

A provider configured with `endpoints` has one Provider instance per endpoint (its own
base_url, key and pooled client). The Balancer keeps each endpoint's state — in-flight
calls (its limiter's count), two peak-EWMA estimates (latency, and service: latency ÷ the
calls in flight when the call was sent), request and error counts, its own limiter and
cooldown breaker — and picks one per attempt (docs/balancing.md):

- p2c: two distinct endpoints drawn at random (weighted), the one with the lower
  load = service × (in-flight + 1) ÷ weight wins: the time one more call would take.
  Service fades toward zero while no answer comes. No sample yet = fastest (once).
- round_robin: smooth weighted round robin (nginx's).

Eligible: not cooling down and under its `max_concurrency`. When every endpoint that is
not cooling down is full, the call queues for the first slot freed (`queue_timeout_secs`).
Providers without `endpoints` never get here: the dispatcher's fast path serves them.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from chatd.config import ProviderConfig
from chatd.errors import ProviderCoolingDown, ProviderOverloaded
from chatd.providers import Provider
from chatd.routing.resilience import Guard, is_upstream_failure, retry_after_header

# How fast an estimate forgets a peak: a sample's weight halves in ~1.4 s.
DECAY_SECS = 2.0
# While an endpoint answers nothing, its service estimate fades toward zero with this time
# constant, so a host left alone is tried again.
IDLE_SECS = 10.0
# An endpoint with no sample and a call already in flight: try the others first (Finagle's
# rule), so a new host is not flooded before its first answer says how fast it is.
UNSAMPLED_BUSY = 1e6


class PeakEwma:
    """A peak-EWMA: a sample above the estimate is taken at once, one below pulls it down
    with a weight that grows with the time since the last sample. A lone first sample is
    a probe: the next one replaces it (docs/balancing.md, "The first answers")."""

    __slots__ = ("idle_secs", "samples", "stamp", "value")

    def __init__(self, idle_secs: float = 0.0) -> None:
        self.value: float | None = None  # None = no sample yet
        self.samples = 0  # taken since the estimate began (or was forgotten)
        self.stamp = 0.0  # when the last sample came
        self.idle_secs = idle_secs  # > 0: fades toward zero while no sample comes

    def read(self, now: float) -> float | None:
        """The estimate at `now`: faded by the time since the last sample, if it fades."""
        if self.value is None or not self.idle_secs:
            return self.value
        return self.value * math.exp(-max(now - self.stamp, 0.0) / self.idle_secs)

    def observe(self, sample: float, now: float, *, peak_only: bool = False) -> None:
        """One sample; with `peak_only`, a sample below the estimate is ignored."""
        current = self.read(now)
        if current is not None and sample < current and peak_only:
            return
        if current is None or sample >= current or self.samples == 1:
            self.value = sample
        else:
            keep = math.exp(-max(now - self.stamp, 0.0) / DECAY_SECS)
            self.value = current * keep + sample * (1 - keep)
        self.samples += 1
        self.stamp = now

    def forget(self) -> None:
        self.value = None
        self.samples = 0


class Endpoint:
    """One endpoint's live state."""

    __slots__ = ("current", "errors", "guard", "latency", "name", "provider", "requests", "service")

    def __init__(self, provider: Provider, guard: Guard) -> None:
        self.provider = provider
        self.name = provider.endpoint
        self.guard = guard
        self.latency = PeakEwma()  # seconds per call, as callers see it
        self.service = PeakEwma(IDLE_SECS)  # seconds per call ÷ calls in flight at send
        self.requests = 0
        self.errors = 0
        self.current = 0.0  # smooth weighted round robin's running score

    @property
    def weight(self) -> float:
        return self.provider.weight

    @property
    def in_flight(self) -> int:
        return self.guard.limiter.busy

    @property
    def ewma(self) -> float | None:
        """The latency estimate in seconds (None: no sample yet)."""
        return self.latency.value

    def cooling(self) -> float:
        """Seconds left in this endpoint's cooldown (0 = may be called)."""
        return self.guard.breaker.remaining()

    def has_room(self) -> bool:
        return self.guard.limiter.has_room()

    def load(self, now: float) -> float:
        """The time one more call would take, ÷ weight: service × (in-flight + 1) ÷ weight;
        0 for an idle endpoint never sampled."""
        busy = self.guard.limiter.busy
        service = self.service.read(now)
        if service is None:
            return UNSAMPLED_BUSY + busy if busy else 0.0
        return service * (busy + 1) / self.provider.weight

    def observe(
        self, seconds: float, now: float, sent_with: int = 1, *, peak_only: bool = False
    ) -> None:
        """One call took `seconds`, sent when `sent_with` calls (itself included) were in
        flight here: feeds the latency and the service estimates."""
        self.latency.observe(seconds, now, peak_only=peak_only)
        self.service.observe(seconds / max(sent_with, 1), now, peak_only=peak_only)

    def forget(self) -> None:
        """A cooldown began: once it ends the endpoint counts as new (fastest, once)."""
        self.latency.forget()
        self.service.forget()

    def describe(self, now: float) -> dict[str, Any]:
        """The `/v1/chat/providers` entry: never a key."""
        return {
            "name": self.name,
            "base_url": self.provider.base_url,
            "available": self.provider.available,
            "state": "cooling_down" if self.cooling() > 0 else "ok",
            "in_flight": self.in_flight,
            "ewma_ms": milliseconds(self.latency.value),
            "service_ms": milliseconds(self.service.read(now)),
            "requests": self.requests,
            "errors": self.errors,
        }


def milliseconds(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Balancer:
    """The endpoints of one provider and the choice among them."""

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        providers: Sequence[Provider],
        *,
        guards: Sequence[Guard] | None = None,
        observer: Any = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.policy = config.balance
        self.hedge_after = config.hedge_after_ms / 1000
        self.queue_timeout = config.queue_timeout_secs
        self.max_retries = config.max_retries
        self.max_retry_after = config.max_retry_after_secs
        self.observer = observer
        self.clock = clock
        self.rand = rand
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.endpoints: list[Endpoint] = []
        for index, provider in enumerate(providers):
            guard = guards[index] if guards is not None else self._guard(provider)
            self.endpoints.append(Endpoint(provider, guard))
        for endpoint in self.endpoints:
            self._watch(endpoint)

    def _guard(self, provider: Provider) -> Guard:
        return Guard(f"{self.name} ({provider.endpoint})", provider.config)

    def _watch(self, endpoint: Endpoint) -> None:
        """Hear the endpoint's slot changes (metrics, queued calls) and cooldowns."""
        limiter, breaker = endpoint.guard.limiter, endpoint.guard.breaker
        told_busy, told_trip = limiter.on_busy, breaker.on_trip

        def busy(calls: int) -> None:
            if told_busy is not None:  # the provider's own guard: it reports itself
                told_busy(calls)
            if self.observer is not None:
                self.observer.endpoint_busy(self.name, endpoint.name, calls)
                if told_busy is None:
                    self.observer.busy(self.name, sum(e.in_flight for e in self.endpoints))
            if self._waiters:
                self._wake()

        def tripped() -> None:
            endpoint.forget()
            if told_trip is not None:
                told_trip()
            elif self.observer is not None:
                self.observer.cooled_down(self.name)

        limiter.on_busy = busy
        breaker.on_trip = tripped

    # -- choosing ---------------------------------------------------------------

    def choose(self, exclude: Endpoint | None = None) -> Endpoint | None:
        """The endpoint for the next call, or None when every usable one is full.

        Skips `exclude` (the one that just failed) when another is eligible. Raises
        `503 provider_cooling_down` when every endpoint is cooling down.
        """
        eligible: list[Endpoint] = []
        usable = 0
        for endpoint in self.endpoints:
            if endpoint.cooling() > 0:
                continue
            usable += 1
            if endpoint.has_room() and endpoint is not exclude:
                eligible.append(endpoint)
        if not usable:
            left = min(e.cooling() for e in self.endpoints)
            raise ProviderCoolingDown(
                f"{self.name}: every endpoint is cooling down; {left:.1f}s left",
                headers=retry_after_header(left),
            )
        if not eligible:
            if exclude is not None and exclude.cooling() == 0 and exclude.has_room():
                return exclude
            return None
        if len(eligible) == 1:
            return eligible[0]
        if self.policy == "round_robin":
            return self._round_robin(eligible)
        return self._p2c(eligible)

    def _p2c(self, eligible: list[Endpoint]) -> Endpoint:
        first = self._pick(eligible, None)
        second = self._pick(eligible, first)
        now = self.clock()
        return first if first.load(now) <= second.load(now) else second

    def _pick(self, endpoints: list[Endpoint], skip: Endpoint | None) -> Endpoint:
        """One endpoint at random, weighted, other than `skip`."""
        total = sum(e.weight for e in endpoints if e is not skip)
        point = self.rand() * total
        chosen = None
        for endpoint in endpoints:
            if endpoint is skip:
                continue
            chosen = endpoint
            point -= endpoint.weight
            if point < 0:
                break
        assert chosen is not None
        return chosen

    def _round_robin(self, eligible: list[Endpoint]) -> Endpoint:
        total = 0.0
        best = eligible[0]
        for endpoint in eligible:
            endpoint.current += endpoint.weight
            total += endpoint.weight
            if endpoint.current > best.current:
                best = endpoint
        best.current -= total
        return best

    def has_other(self, exclude: Endpoint) -> bool:
        """Is an endpoint other than `exclude` usable right now (not cooling, has room)?"""
        return any(e is not exclude and e.cooling() == 0 and e.has_room() for e in self.endpoints)

    def load(self) -> float:
        """The provider's load for ordering balanced aliases: its lightest usable endpoint."""
        now = self.clock()
        loads = [e.load(now) for e in self.endpoints if e.cooling() == 0]
        return min(loads) if loads else math.inf

    # -- slots --------------------------------------------------------------------

    async def acquire(self, exclude: Endpoint | None, within: float) -> Endpoint:
        """Choose an endpoint and take one of its slots; queue for the first slot freed
        when all are full (up to `queue_timeout_secs`, or `within` if shorter)."""
        endpoint = self.choose(exclude)
        if endpoint is not None:
            await endpoint.guard.limiter.acquire()
            return endpoint
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(self.queue_timeout, within)
        while True:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                raise ProviderOverloaded(
                    f"{self.name}: every endpoint's upstream slots busy "
                    f"for {self.queue_timeout:g}s",
                    headers=retry_after_header(self.queue_timeout),
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            endpoint = self.choose(exclude)
            if endpoint is not None:
                await endpoint.guard.limiter.acquire()
                return endpoint

    async def try_acquire(self, exclude: Endpoint) -> Endpoint | None:
        """An endpoint other than `exclude` with a free slot, now, or None (for a hedge)."""
        try:
            endpoint = self.choose(exclude)
        except ProviderCoolingDown:
            return None
        if endpoint is None or endpoint is exclude:
            return None
        await endpoint.guard.limiter.acquire()
        return endpoint

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- outcomes -----------------------------------------------------------------

    def finished(
        self, endpoint: Endpoint, seconds: float, error: BaseException | None, sent_with: int = 1
    ) -> None:
        """One call on `endpoint` ended, sent when `sent_with` calls (itself included) were
        in flight there: feed its estimates, counters and breaker."""
        now = self.clock()
        endpoint.requests += 1
        if error is None:
            endpoint.observe(seconds, now, sent_with)
            endpoint.guard.record(None)
            return
        endpoint.errors += 1
        # A failure never makes an endpoint look faster (a refusal is quick), but a slow
        # one is a peak. A failing host keeps its share until its breaker trips, so a
        # dead host is found and cooled down within `cooldown_failures` calls.
        if is_upstream_failure(error):
            endpoint.observe(seconds, now, sent_with, peak_only=True)
        endpoint.guard.record(error)

    def abandoned(self, endpoint: Endpoint, seconds: float, sent_with: int = 1) -> None:
        """A call lost a hedge race and was cancelled: it took at least `seconds`."""
        endpoint.observe(seconds, self.clock(), sent_with)

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [e.describe(now) for e in self.endpoints]
