"""The dispatcher: resolve a request's model and call its provider(s) under the policy.

This is the one place a request meets a provider — for every surface and for streams —
so the fallback tiers, balanced and hedged aliases and the one deadline per request are
decided here. One target's calls (its retries, endpoints and hedges) are made by
`calls.py`; the policy's pieces (limits, breakers, backoff) are in `resilience.py`
(docs/routing.md).

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
    ProviderDisabled,
    ProviderNotFound,
    UpstreamError,
)
from chatd.providers import Provider
from chatd.routing.balancer import Balancer
from chatd.routing.calls import GuardedEvents, Tally, TargetCalls, aclose_events, discard
from chatd.routing.hedging import race
from chatd.routing.registry import Registry, Route
from chatd.routing.resilience import (
    Guard,
    backoff_delay,
    may_fall_back,
)
from chatd.telemetry.observer import Observer
from chatd.types import ChatRequest, ChatResult, StreamEvent

R = TypeVar("R")
E = TypeVar("E")
ATTEMPTS_HEADER = "X-Chatd-Attempts"


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
        tracing: Any = None,
        previous: Dispatcher | None = None,
    ) -> None:
        self.registry = registry
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
        # providers configured with `endpoints` (and those a balanced alias
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
        self.calls = TargetCalls(self.guard, self.balancers, backoff, self.observer, tracing)

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
                    await aclose_events(events)
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
        if self.alias_options:  # table-form aliases (docs/routing.md); none: nothing to do
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
                    route, result = await self.calls.try_target(route, attempt, deadline, tally)
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
        """An alias with `hedge_after_ms`: the target, hedged on the next one (docs/routing.md)."""

        async def hedge() -> Any:
            for target in later:
                if target in spent:
                    continue
                spent.add(target)
                try:
                    other = self.registry.resolve(target)
                except (ProviderNotFound, ProviderDisabled):
                    continue
                return self.calls.try_target(other, attempt, deadline, tally, hedge=True)
            return None

        first = self.calls.try_target(route, attempt, deadline, tally)
        (served, result), won = await race(first, hedge, after, discard)
        if won is not None:
            self.observer.hedged(route.provider.name, "won" if won else "lost")
        return served, result

    def _lightest_first(self, targets: list[str]) -> list[str]:
        """A balanced alias's targets by their providers' load, lightest first (docs/routing.md)."""

        def load(target: str) -> float:
            try:
                balancer = self.balancers.get(self.registry.resolve(target).provider.name)
            except ChatdError:
                return float("inf")  # tried last; its error is reported if all fail
            return balancer.load() if balancer is not None else 0.0

        return sorted(targets, key=load)


def kept_balancer(
    previous: Dispatcher | None, name: str, providers: list[Provider]
) -> Balancer | None:
    """On a reload: `previous`'s balancer for `name` if it balanced these very instances."""
    old = previous.balancers.get(name) if previous is not None else None
    if old is None or [e.provider for e in old.endpoints] != providers:
        return None
    return old


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
