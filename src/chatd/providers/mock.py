"""The `mock` kind: answers without any upstream, for trying chatd and load tests."""

from __future__ import annotations

import asyncio
import hashlib
import math
from array import array
from collections.abc import AsyncIterator
from typing import Any

import orjson

from chatd.providers.base import Provider
from chatd.types import ChatRequest, ChatResult, EmbedResult, StreamEvent

MOCK_DIMENSIONS = 8


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


def mock_embedding(text: str, dimensions: int = MOCK_DIMENSIONS) -> list[float]:
    """A deterministic unit vector from a hash of `text`: the same text, the same vector.
    Values are float32-exact, so a base64 answer decodes to exactly the float one."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = [
        int.from_bytes(raw[i : i + 2], "little") / 32767.5 - 1.0 for i in range(0, len(raw), 2)
    ]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", [v / norm for v in values]).tolist()


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

    async def embed(
        self, inputs: list[str], model: str, dimensions: int | None, body: dict[str, Any]
    ) -> EmbedResult:
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        vectors = [mock_embedding(text, dimensions or MOCK_DIMENSIONS) for text in inputs]
        return EmbedResult(vectors, sum(len(text.split()) for text in inputs))
