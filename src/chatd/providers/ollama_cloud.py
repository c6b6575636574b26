"""Ollama Cloud: `POST /api/generate` with a Bearer key and flattened messages (SPEC §4)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..types import ChatRequest, ChatResult, Message, StreamEvent
from .base import Provider
from .ollama import ollama_options, parse_ollama_response, read_ndjson_stream

SPEAKERS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def flatten_messages(messages: Sequence[Message]) -> tuple[str, str]:
    """`(system, prompt)` for /api/generate.

    System messages are joined by a blank line. A lone user message is the prompt
    verbatim; anything else becomes a `User:` / `Assistant:` transcript ending in
    `Assistant:` so the model continues as the assistant.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if len(turns) == 1 and turns[0].role == "user":
        return system, turns[0].content
    lines = [f"{SPEAKERS[m.role]}: {m.content}" for m in turns]
    lines.append("Assistant:")
    return system, "\n\n".join(lines)


def to_generate_body(request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
    system, prompt = flatten_messages(request.messages)
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    if system:
        body["system"] = system
    body["stream"] = stream
    body["think"] = request.think
    body["options"] = ollama_options(request)
    if request.format == "json":
        body["format"] = "json"
    return body


class OllamaCloudProvider(Provider):
    """ollama.com's own API (model names without a `:cloud` tag)."""

    kind = "ollama_cloud"

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        data = await self.post_json("/api/generate", to_generate_body(request, model))
        return parse_ollama_response(self, data, "response")

    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = to_generate_body(request, model, stream=True)
        return read_ndjson_stream(self, "/api/generate", body, "response")
