"""One target's calls: its retries, or its balanced endpoints and their hedges.

The dispatcher (`dispatch.py`) decides which targets a request tries and in what order;
this module makes the calls for one of them within the request's deadline, and feeds
each outcome to the provider's breaker, the balancer and the observer
(docs/routing.md, docs/balancing.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from chatd.errors import ChatdError, ProviderCoolingDown, UpstreamError, UpstreamTimeout
from chatd.providers import Provider
from chatd.routing.balancer import Balancer, Endpoint
from chatd.routing.hedging import race
from chatd.routing.registry import Route
from chatd.routing.resilience import Guard, is_retryable, parse_retry_after
from chatd.telemetry.observer import Observer
from chatd.telemetry.propagation import TRACED_REQUEST, UPSTREAM_TRACEPARENT

E = TypeVar("E")
Attempt = Callable[[Route, Guard], Awaitable[Any]]


@dataclass(slots=True)
class Tally:
    """What one request cost: upstream calls made, retries among them, targets moved past."""

    attempts: int = 0
    retries: int = 0
    fallbacks: int = 0
    endpoint: str | None = None  # the endpoint that answered, for balanced providers


class TargetCalls:
    """Calls one target under its guard or balancer, retrying within the deadline."""

    def __init__(
        self,
        guard: Callable[[str], Guard],
        balancers: dict[str, Balancer],
        backoff: Callable[[int], float],
        observer: Observer,
        tracing: Any = None,
    ) -> None:
        self.guard = guard
        self.balancers = balancers
        self.backoff = backoff  # seconds before the n-th retry (0-based) absent a Retry-After
        self.observer = observer
        self.tracing = tracing  # telemetry.tracing.Tracing, or None: no spans, no cost

    async def try_target(
        self,
        route: Route,
        attempt: Attempt,
        deadline: float,
        tally: Tally,
        hedge: bool = False,
    ) -> tuple[Route, Any]:
        """One target with its retries, each call inside the request's deadline; returns
        the route that answered (for a balanced provider: the endpoint's) and the result.
        `hedge`: this target was started as another's hedge (a hedged alias)."""
        name = route.provider.name
        balancer = self.balancers.get(name)
        if balancer is not None:
            return await self._try_endpoints(balancer, route.model, attempt, deadline, tally)
        loop = asyncio.get_running_loop()
        guard = self.guard(name)
        last: ChatdError | None = None
        for retry in range(guard.max_retries + 1):
            try:
                guard.breaker.check()
            except ChatdError:
                if last is not None:  # tripped by our own failures: report the real one
                    raise last from None
                raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamTimeout(f"{name}: request deadline passed") from None
            await guard.limiter.acquire(within=remaining)
            tally.attempts += 1
            called = loop.time()
            remaining = deadline - called
            try:
                async with asyncio.timeout_at(deadline) as window:
                    number = tally.attempts
                    result = await self._call(attempt, route, guard, number, hedge, deadline)
            except TimeoutError:
                if not window.expired():
                    raise
                if had_whole_timeout(remaining, route.provider):
                    guard.record(UpstreamTimeout(name))
                raise UpstreamTimeout(f"{name}: no answer within the request's deadline") from None
            except (UpstreamError, UpstreamTimeout) as exc:
                guard.record(exc)
                last = exc
            else:
                guard.record(None)
                return route, result
            finally:
                self.observer.upstream_call(name, loop.time() - called)
            if not is_retryable(last) or retry == guard.max_retries:
                raise last
            await self._wait_before_retry(last, guard.max_retry_after, retry, deadline)
            tally.retries += 1
            self.observer.retried(name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _wait_before_retry(
        self, error: ChatdError, limit: float, retry: int, deadline: float
    ) -> None:
        """Sleep before the next try: the upstream's Retry-After, else backoff. Raises
        `error` instead when the upstream asks for longer than `limit`
        (`max_retry_after_secs`) or the wait would pass the request's deadline."""
        hint = parse_retry_after(error.retry_after if isinstance(error, UpstreamError) else None)
        if hint is not None and hint > limit:
            raise error
        delay = self.backoff(retry) if hint is None else hint
        if asyncio.get_running_loop().time() + delay >= deadline:
            raise error
        await asyncio.sleep(delay)

    async def _try_endpoints(
        self,
        balancer: Balancer,
        model: str,
        attempt: Attempt,
        deadline: float,
        tally: Tally,
    ) -> tuple[Route, Any]:
        """Like the plain path, but each try asks the balancer for an endpoint; a retry
        goes to another endpoint (at once: its backoff protects an upstream that is not
        being called again) and, with `hedge_after_ms`, a stalled call is hedged."""
        loop = asyncio.get_running_loop()
        name = balancer.name
        last: ChatdError | None = None
        failed: Endpoint | None = None
        for retry in range(balancer.max_retries + 1):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UpstreamTimeout(f"{name}: request deadline passed") from None
            try:
                endpoint = await balancer.acquire(failed, remaining)
            except ProviderCoolingDown:
                if last is not None:  # tripped by our own failures: report the real one
                    raise last from None
                raise
            tally.attempts += 1
            try:
                if balancer.hedge_after:
                    served = await self._hedged(balancer, endpoint, model, attempt, deadline, tally)
                else:
                    served = await self._call_endpoint(
                        balancer, endpoint, model, attempt, deadline, tally.attempts
                    )
            except (UpstreamError, UpstreamTimeout) as exc:
                last = exc
            else:
                tally.endpoint = served[0].provider.endpoint
                return served
            if not is_retryable(last) or retry == balancer.max_retries:
                raise last
            failed = endpoint
            if not balancer.has_other(endpoint):
                await self._wait_before_retry(last, balancer.max_retry_after, retry, deadline)
            tally.retries += 1
            self.observer.retried(name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_endpoint(
        self,
        balancer: Balancer,
        endpoint: Endpoint,
        model: str,
        attempt: Attempt,
        deadline: float,
        number: int,
        hedge: bool = False,
    ) -> tuple[Route, Any]:
        """One call on an endpoint whose slot is taken; its outcome feeds the balancer.
        `number`: the request's attempt count with this call (for its span)."""
        loop = asyncio.get_running_loop()
        route = Route(endpoint.provider, model)
        called = loop.time()
        remaining = deadline - called
        sent_with = endpoint.in_flight  # this call's slot included (docs/balancing.md)
        error: BaseException | None = None
        outcome = "other"  # "ok" | "failed" | "cut" (cancelled, or a deadline not its own)
        try:
            async with asyncio.timeout_at(deadline) as window:
                guard = endpoint.guard
                result = await self._call(attempt, route, guard, number, hedge, deadline)
            outcome = "ok"
            return route, result
        except TimeoutError:
            if not window.expired():
                raise
            error = UpstreamTimeout(f"{balancer.name}: no answer within the request's deadline")
            outcome = "failed" if had_whole_timeout(remaining, endpoint.provider) else "cut"
            raise error from None
        except (UpstreamError, UpstreamTimeout) as exc:
            error, outcome = exc, "failed"
            raise
        except asyncio.CancelledError:
            outcome = "cut"
            raise
        finally:
            seconds = loop.time() - called
            if outcome in ("ok", "failed"):
                balancer.finished(endpoint, seconds, error, sent_with)  # error: None when ok
            elif outcome == "cut":
                balancer.abandoned(endpoint, seconds, sent_with)
            self.observer.upstream_call(balancer.name, seconds)
            self.observer.endpoint_call(balancer.name, endpoint.name, seconds)

    async def _hedged(
        self,
        balancer: Balancer,
        endpoint: Endpoint,
        model: str,
        attempt: Attempt,
        deadline: float,
        tally: Tally,
    ) -> tuple[Route, Any]:
        """The call on `endpoint`, hedged on another endpoint after `hedge_after_ms`."""

        async def hedge() -> Any:
            other = await balancer.try_acquire(endpoint)
            if other is None:
                return None
            tally.attempts += 1
            return self._call_endpoint(
                balancer, other, model, attempt, deadline, tally.attempts, hedge=True
            )

        first = self._call_endpoint(balancer, endpoint, model, attempt, deadline, tally.attempts)
        (route, result), won = await race(first, hedge, balancer.hedge_after, discard)
        if won is not None:
            self.observer.hedged(balancer.name, "won" if won else "lost")
        return route, result

    def _call(
        self,
        attempt: Attempt,
        route: Route,
        guard: Guard,
        number: int,
        hedge: bool,
        deadline: float,
    ) -> Awaitable[Any]:
        """`attempt(route, guard)`, in a client span when this request is traced. Returns
        the awaitable itself (no coroutine of its own) when it is not: nothing on the
        untraced path (docs/tracing.md)."""
        if self.tracing is None or TRACED_REQUEST.get() is None:
            return attempt(route, guard)
        return self._traced(attempt, route, guard, number, hedge, deadline)

    async def _traced(
        self,
        attempt: Attempt,
        route: Route,
        guard: Guard,
        number: int,
        hedge: bool,
        deadline: float,
    ) -> Any:
        """`attempt(route, guard)` inside a client span (docs/tracing.md)."""
        span, token = self.tracing.call_started(route, number, hedge)
        try:
            result = await attempt(route, guard)
        except asyncio.CancelledError:
            late = asyncio.get_running_loop().time() >= deadline
            self.tracing.call_failed(span, UpstreamTimeout("deadline") if late else None)
            raise
        except BaseException as exc:
            self.tracing.call_failed(span, exc)
            raise
        finally:
            UPSTREAM_TRACEPARENT.reset(token)
        self.tracing.call_answered(span, route, result)
        return result


class GuardedEvents(AsyncIterator[E]):
    """The rest of a stream: feeds the provider's breaker and frees its slot when done."""

    def __init__(self, events: AsyncIterator[E], guard: Guard) -> None:
        self._events = events
        self._guard = guard
        self._closed = False
        # Told how the stream ended (its last event, or the error) when it closes: the
        # call's client span when tracing is on.
        self.on_close: Callable[[E | None, BaseException | None], None] | None = None
        self._last: E | None = None
        self._error: BaseException | None = None

    def __aiter__(self) -> GuardedEvents[E]:
        return self

    async def __anext__(self) -> E:
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except (UpstreamError, UpstreamTimeout) as exc:
            self._guard.record(exc)
            self._error = exc
            await self.aclose()
            raise
        except BaseException as exc:
            self._error = exc
            await self.aclose()
            raise
        if self.on_close is not None:
            self._last = event
        return event

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await aclose_events(self._events)
        finally:
            self._guard.limiter.release()
            if self.on_close is not None:
                self.on_close(self._last, self._error)


def had_whole_timeout(remaining: float, provider: Provider) -> bool:
    """Only a stall that had the provider's whole timeout counts against it, not one cut
    short by a caller's tighter X-Chatd-Timeout-Ms."""
    return remaining >= 0.95 * provider.timeout


async def discard(served: tuple[Route, Any]) -> None:
    """A hedge loser that answered anyway: close its stream (a plain answer needs nothing)."""
    result = served[1]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], GuardedEvents):
        await result[1].aclose()


async def aclose_events(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
