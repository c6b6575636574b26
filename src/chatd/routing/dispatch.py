"""The dispatcher: resolve a request's model, call its provider(s) under SPEC §8's policy.

This is the one place a chat request meets a provider — for `/v1/chat`, its streams and
the OpenAI-compatible surface — so retries, fallback tiers, per-provider concurrency
limits, cooldowns and the one deadline per request all live here (policy pieces in
`resilience.py`).

A stream is retried only until its first event arrives: nothing has gone to the caller
before that, everything after it belongs to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from chatd.errors import (
    ChatdError,
    ProviderCoolingDown,
    ProviderDisabled,
    ProviderNotFound,
    UpstreamError,
    UpstreamTimeout,
)
from chatd.providers import Provider
from chatd.routing.balancer import Balancer, Endpoint
from chatd.routing.hedging import race
from chatd.routing.registry import Registry, Route
from chatd.routing.resilience import (
    Guard,
    backoff_delay,
    is_retryable,
    may_fall_back,
    parse_retry_after,
)
from chatd.telemetry.observer import Observer
from chatd.types import ChatRequest, ChatResult, StreamEvent

R = TypeVar("R")
E = TypeVar("E")
ATTEMPTS_HEADER = "X-Chatd-Attempts"


@dataclass(slots=True)
class Tally:
    """What one request cost: upstream calls made, retries among them, targets moved past."""

    attempts: int = 0
    retries: int = 0
    fallbacks: int = 0
    endpoint: str | None = None  # the endpoint that answered, for balanced providers


@dataclass(slots=True)
class Served(Generic[R]):
    """A finished call: what answered (provider and upstream model) and what it said."""

    route: Route
    result: R
    tally: Tally

    @property
    def attempts(self) -> int:
        return self.tally.attempts

    @property
    def endpoint(self) -> str | None:
        return self.tally.endpoint


@dataclass(slots=True)
class OpenStream(Generic[E]):
    """A stream whose first event has arrived (so its HTTP status is settled).

    Holds the provider's concurrency slot until closed: always `aclose()` it.
    """

    route: Route
    first: E
    rest: AsyncIterator[E]
    tally: Tally

    @property
    def attempts(self) -> int:
        return self.tally.attempts

    @property
    def endpoint(self) -> str | None:
        return self.tally.endpoint

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


class Dispatcher:
    """Turns a validated request into provider calls: retries, fallbacks, limits, deadline."""

    def __init__(
        self,
        registry: Registry,
        *,
        backoff: Callable[[int], float] = backoff_delay,
        observer: Observer | None = None,
        previous: Dispatcher | None = None,
    ) -> None:
        self.registry = registry
        self.backoff = backoff  # seconds before the n-th retry (0-based) absent a Retry-After
        self.observer = observer or Observer()
        # A reload (docs/reload.md): a provider that is `previous`'s very instance keeps
        # its limiter, breaker and (balanced) latency estimates.
        self.guards: dict[str, Guard] = {}
        if previous is not None:
            self.guards = {
                name: guard
                for name, guard in previous.guards.items()
                if previous.registry.providers.get(name) is registry.providers.get(name)
            }
        # SPEC §10: providers configured with `endpoints` (and those a balanced alias
        # weighs) are served through a Balancer; every other provider takes the plain path.
        self.alias_options = registry.alias_options  # table-form aliases only
        self.balancers: dict[str, Balancer] = {}
        for name, providers in registry.endpoints.items():
            self.balancers[name] = kept_balancer(previous, name, providers) or Balancer(
                name, providers[0].config, providers, observer=self.observer
            )
        for alias, options in self.alias_options.items():
            if options.mode == "balance":
                for target in registry.aliases.get(alias, ()):
                    self._balance(target, previous)

    def _balance(self, target: str, previous: Dispatcher | None = None) -> None:
        """Track the load of `target`'s provider (a balanced alias orders by it)."""
        try:
            provider = self.registry.resolve(target).provider
        except ChatdError:
            return
        if provider.name not in self.balancers:
            self.balancers[provider.name] = kept_balancer(
                previous, provider.name, [provider]
            ) or Balancer(
                provider.name,
                provider.config,
                [provider],
                guards=[self.guard(provider.name)],
                observer=self.observer,
            )

    def guard(self, provider_name: str) -> Guard:
        """The provider's limiter and breaker, made on first use and kept for the app's life."""
        guard = self.guards.get(provider_name)
        if guard is None:
            provider = self.registry.providers[provider_name]
            guard = self.guards[provider_name] = Guard(
                provider_name,
                provider.config,
                on_busy=partial(self.observer.busy, provider_name),
                on_trip=partial(self.observer.cooled_down, provider_name),
            )
        return guard

    async def chat(self, request: ChatRequest, budget: float | None = None) -> Served[ChatResult]:
        """One non-streamed answer for `request.model`."""
        return await self.call(
            request.model, lambda route: route.provider.chat(request, route.model), budget
        )

    async def stream(
        self, request: ChatRequest, budget: float | None = None
    ) -> OpenStream[StreamEvent]:
        """Start the stream and wait for its first event within the deadline."""
        return await self.open(
            request.model, lambda route: route.provider.stream(request, route.model), budget
        )

    async def call(
        self,
        model: str,
        send: Callable[[Route], Awaitable[R]],
        budget: float | None = None,
    ) -> Served[R]:
        """Run `send(route)` for `model`'s targets under the policy; any result type."""

        async def attempt(route: Route, guard: Guard) -> R:
            try:
                result = await send(route)
            finally:
                guard.limiter.release()
            return result

        route, result, tally = await self._run(model, attempt, budget)
        return Served(route, result, tally)

    async def open(
        self,
        model: str,
        start: Callable[[Route], AsyncIterator[E]],
        budget: float | None = None,
    ) -> OpenStream[E]:
        """Open `start(route)` for `model`'s targets under the policy, up to its first event."""

        async def attempt(route: Route, guard: Guard) -> tuple[E, AsyncIterator[E]]:
            events: AsyncIterator[E] | None = None
            try:
                events = aiter(start(route))
                first = await anext(events)
            except StopAsyncIteration:
                guard.limiter.release()
                raise UpstreamError(route.provider.name, "stream ended without an answer") from None
            except BaseException:
                guard.limiter.release()
                if events is not None:
                    await _aclose(events)
                raise
            return first, GuardedEvents(events, guard)

        route, (first, rest), tally = await self._run(model, attempt, budget)
        return OpenStream(route, first, rest, tally)

    # -- the policy ------------------------------------------------------------

    async def _run(
        self,
        model: str,
        attempt: Callable[[Route, Guard], Awaitable[Any]],
        budget: float | None,
    ) -> tuple[Route, Any, Tally]:
        """Try each target in order; return the first success or raise the telling error."""
        targets = self.registry.targets(model)
        hedge_after = 0.0
        spent: set[str] | None = None  # a hedged alias: the targets its hedges called
        if self.alias_options:  # table-form aliases (SPEC §10); none: nothing to do
            options = self.alias_options.get(model.strip())
            if options is not None:
                if options.mode == "balance":
                    targets = self._lightest_first(targets)
                if options.hedge_after_ms:
                    hedge_after, spent = options.hedge_after_ms / 1000, set()
        loop = asyncio.get_running_loop()
        tally = Tally()
        deadline: float | None = None
        errors: list[ChatdError] = []
        for index, target in enumerate(targets):
            if spent is not None and target in spent:
                continue
            if index:
                if deadline is not None and loop.time() >= deadline:
                    break
                tally.fallbacks += 1
                self.observer.fell_back()
            try:
                route = self.registry.resolve(target)
            except (ProviderNotFound, ProviderDisabled) as exc:
                errors.append(exc)
                continue
            if deadline is None:  # the budget: the first target's timeout, or the caller's
                timeout = route.provider.timeout
                deadline = loop.time() + (min(timeout, budget) if budget else timeout)
            try:
                if spent is not None:
                    later = targets[index + 1 :]
                    route, result = await self._hedge_targets(
                        route, later, spent, attempt, deadline, tally, hedge_after
                    )
                else:
                    route, result = await self._try_target(route, attempt, deadline, tally)
            except ChatdError as exc:
                if getattr(exc, "provider", None) is None:  # for the request log and metrics
                    exc.provider = route.provider.name  # type: ignore[attr-defined]
                if not may_fall_back(exc):
                    raise _with_tally(exc, tally) from None
                errors.append(exc)
                continue
            return route, result, tally
        raise _with_tally(_most_telling(errors), tally) from None

    async def _hedge_targets(
        self,
        route: Route,
        later: list[str],
        spent: set[str],
        attempt: Callable[[Route, Guard], Awaitable[Any]],
        deadline: float,
        tally: Tally,
        after: float,
    ) -> tuple[Route, Any]:
        """An alias with `hedge_after_ms`: the target, hedged on the next one (SPEC §10)."""

        async def hedge() -> Any:
            for target in later:
                if target in spent:
                    continue
                spent.add(target)
                try:
                    other = self.registry.resolve(target)
                except (ProviderNotFound, ProviderDisabled):
                    continue
                return self._try_target(other, attempt, deadline, tally)
            return None

        first = self._try_target(route, attempt, deadline, tally)
        (served, result), won = await race(first, hedge, after, _discard)
        if won is not None:
            self.observer.hedged(route.provider.name, "won" if won else "lost")
        return served, result

    def _lightest_first(self, targets: list[str]) -> list[str]:
        """A balanced alias's targets by their providers' load, lightest first (SPEC §10)."""

        def load(target: str) -> float:
            try:
                balancer = self.balancers.get(self.registry.resolve(target).provider.name)
            except ChatdError:
                return float("inf")  # tried last; its error is reported if all fail
            return balancer.load() if balancer is not None else 0.0

        return sorted(targets, key=load)

    async def _try_target(
        self,
        route: Route,
        attempt: Callable[[Route, Guard], Awaitable[Any]],
        deadline: float,
        tally: Tally,
    ) -> tuple[Route, Any]:
        """One target with its retries, each call inside the request's deadline; returns
        the route that answered (for a balanced provider: the endpoint's) and the result."""
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
                    result = await attempt(route, guard)
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

    # -- balanced providers (SPEC §10) -------------------------------------------

    async def _try_endpoints(
        self,
        balancer: Balancer,
        model: str,
        attempt: Callable[[Route, Guard], Awaitable[Any]],
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
                    served = await self._call_endpoint(balancer, endpoint, model, attempt, deadline)
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
        attempt: Callable[[Route, Guard], Awaitable[Any]],
        deadline: float,
    ) -> tuple[Route, Any]:
        """One call on an endpoint whose slot is taken; its outcome feeds the balancer."""
        loop = asyncio.get_running_loop()
        route = Route(endpoint.provider, model)
        called = loop.time()
        remaining = deadline - called
        error: BaseException | None = None
        outcome = "other"  # "ok" | "failed" | "cut" (cancelled, or a deadline not its own)
        try:
            async with asyncio.timeout_at(deadline) as window:
                result = await attempt(route, endpoint.guard)
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
                balancer.finished(endpoint, seconds, error)  # error is None when ok
            elif outcome == "cut":
                balancer.abandoned(endpoint, seconds)
            self.observer.upstream_call(balancer.name, seconds)
            self.observer.endpoint_call(balancer.name, endpoint.name, seconds)

    async def _hedged(
        self,
        balancer: Balancer,
        endpoint: Endpoint,
        model: str,
        attempt: Callable[[Route, Guard], Awaitable[Any]],
        deadline: float,
        tally: Tally,
    ) -> tuple[Route, Any]:
        """The call on `endpoint`, hedged on another endpoint after `hedge_after_ms`."""

        async def hedge() -> Any:
            other = await balancer.try_acquire(endpoint)
            if other is None:
                return None
            tally.attempts += 1
            return self._call_endpoint(balancer, other, model, attempt, deadline)

        first = self._call_endpoint(balancer, endpoint, model, attempt, deadline)
        (route, result), won = await race(first, hedge, balancer.hedge_after, _discard)
        if won is not None:
            self.observer.hedged(balancer.name, "won" if won else "lost")
        return route, result


class GuardedEvents(AsyncIterator[E]):
    """The rest of a stream: feeds the provider's breaker and frees its slot when done."""

    def __init__(self, events: AsyncIterator[E], guard: Guard) -> None:
        self._events = events
        self._guard = guard
        self._closed = False

    def __aiter__(self) -> GuardedEvents[E]:
        return self

    async def __anext__(self) -> E:
        if self._closed:
            raise StopAsyncIteration
        try:
            return await anext(self._events)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except (UpstreamError, UpstreamTimeout) as exc:
            self._guard.record(exc)
            await self.aclose()
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await _aclose(self._events)
        finally:
            self._guard.limiter.release()


def kept_balancer(
    previous: Dispatcher | None, name: str, providers: list[Provider]
) -> Balancer | None:
    """On a reload: `previous`'s balancer for `name` if it balanced these very instances."""
    old = previous.balancers.get(name) if previous is not None else None
    if old is None or [e.provider for e in old.endpoints] != providers:
        return None
    return old


def had_whole_timeout(remaining: float, provider: Provider) -> bool:
    """Only a stall that had the provider's whole timeout counts against it, not one cut
    short by a caller's tighter X-Chatd-Timeout-Ms."""
    return remaining >= 0.95 * provider.timeout


async def _discard(served: tuple[Route, Any]) -> None:
    """A hedge loser that answered anyway: close its stream (a plain answer needs nothing)."""
    result = served[1]
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], GuardedEvents):
        await result[1].aclose()


def _most_telling(errors: list[ChatdError]) -> ChatdError:
    """The error to answer with when every target failed: the last one an upstream call
    (or a provider guard) produced, else the last resolution error."""
    for error in reversed(errors):
        if not isinstance(error, ProviderNotFound | ProviderDisabled):
            return error
    return errors[-1]


def _with_tally(error: ChatdError, tally: Tally) -> ChatdError:
    """Attach the request's cost to its error: the header, and `attempts` for the log."""
    error.headers[ATTEMPTS_HEADER] = str(tally.attempts)
    error.attempts = tally.attempts  # type: ignore[attr-defined]
    return error


async def _aclose(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
