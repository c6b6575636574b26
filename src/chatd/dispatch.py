"""The dispatcher: resolve a request's model, call the provider within its deadline.

This is the one place a chat request meets a provider, for both `/v1/chat` and the
streaming path, so per-call policy (deadline, and later retries and fallbacks) lives here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from .errors import UpstreamError, UpstreamTimeout
from .registry import Registry, Route
from .types import ChatRequest, ChatResult, StreamEvent


@dataclass(slots=True)
class Served:
    """A finished call: what answered and what it said."""

    route: Route
    result: ChatResult
    attempts: int = 1


@dataclass(slots=True)
class OpenStream:
    """A stream whose first event has arrived (so its HTTP status is settled)."""

    route: Route
    first: StreamEvent
    rest: AsyncIterator[StreamEvent]
    attempts: int = 1

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


class Dispatcher:
    """Turns a validated ChatRequest into a provider call."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def chat(self, request: ChatRequest, budget: float | None = None) -> Served:
        route = self.registry.resolve(request.model)
        timeout = budget if budget is not None else route.provider.timeout
        try:
            async with asyncio.timeout(timeout):
                result = await route.provider.chat(request, route.model)
        except TimeoutError:
            raise UpstreamTimeout(
                f"{route.provider.name}: no answer within {timeout:g}s"
            ) from None
        return Served(route, result)

    async def stream(self, request: ChatRequest, budget: float | None = None) -> OpenStream:
        """Start the stream and wait for its first event within the deadline."""
        route = self.registry.resolve(request.model)
        timeout = budget if budget is not None else route.provider.timeout
        events = aiter(route.provider.stream(request, route.model))
        try:
            async with asyncio.timeout(timeout):
                first = await anext(events)
        except TimeoutError:
            await _aclose(events)
            raise UpstreamTimeout(
                f"{route.provider.name}: no first token within {timeout:g}s"
            ) from None
        except StopAsyncIteration:
            raise UpstreamError(route.provider.name, "stream ended without an answer") from None
        except BaseException:
            await _aclose(events)
            raise
        return OpenStream(route, first, events)


async def _aclose(events: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
