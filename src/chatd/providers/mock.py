"""The `mock` kind: answers without any upstream, for trying chatd and load tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson

from ..types import ChatRequest, ChatResult, StreamEvent
from .base import Provider


def mock_answer(request: ChatRequest, reply: str | None) -> ChatResult:
    """Echo the last user message (or `reply`), cut to `max_tokens` words."""
    text = reply
    if text is None:
        text = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    words = text.split()
    finish = "stop"
    if request.max_tokens is not None and len(words) > request.max_tokens:
        words, finish = words[: request.max_tokens], "length"
    content = " ".join(words)
    if request.format == "json":
        content = orjson.dumps({"echo": content}).decode()
    return ChatResult(
        content=content,
        input_tokens=sum(len(m.content.split()) for m in request.messages),
        output_tokens=len(words),
        finish_reason=finish,
    )


class MockProvider(Provider):
    """Calls no upstream; waits `latency_ms`, then echoes."""

    kind = "mock"

    async def start(self) -> None:  # no client to open
        return None

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        return mock_answer(request, self.config.reply)

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        answer = mock_answer(request, self.config.reply)
        pieces = answer.content.split(" ") if answer.content else []
        delay = self.config.latency_ms / 1000 / max(len(pieces), 1)
        for i, piece in enumerate(pieces):
            if delay:
                await asyncio.sleep(delay)
            yield StreamEvent(delta=piece if i == 0 else " " + piece)
        yield StreamEvent(
            done=True,
            input_tokens=answer.input_tokens,
            output_tokens=answer.output_tokens,
            finish_reason=answer.finish_reason,
        )
