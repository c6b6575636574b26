"""Ollama Cloud: `POST /api/generate` with a Bearer key and flattened messages (docs/routing.md);
`POST /api/embed` as local Ollama (docs/http-api.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from chatd.providers.base import Provider
from chatd.providers.ollama import (
    ollama_options,
    ollama_tags,
    parse_ollama_embed,
    parse_ollama_response,
    read_ndjson_stream,
    to_ollama_embed_body,
)
from chatd.types import ChatRequest, ChatResult, EmbedResult, Message, StreamEvent
from chatd.wire.openai_compat import (
    as_messages,
    chunks,
    completion,
    ollama_format,
    ollama_think,
    options_from_openai,
    wants_usage,
)

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


def generate_body_from_openai(body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """An /api/generate body for an OpenAI-shaped request (the OpenAI surface's translation)."""
    system, prompt = flatten_messages(as_messages(body))
    out: dict[str, Any] = {"model": model, "prompt": prompt}
    if system:
        out["system"] = system
    out["stream"] = stream
    out["think"] = ollama_think(body)
    out["options"] = options_from_openai(body)
    fmt = ollama_format(body)
    if fmt is not None:
        out["format"] = fmt
    return out


class OllamaCloudProvider(Provider):
    """ollama.com's own API (model names without a `:cloud` tag)."""

    kind = "ollama_cloud"
    models_path = "/api/tags"

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        data = await self.post_json("/api/generate", to_generate_body(request, model))
        return parse_ollama_response(self, data, "response")

    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = to_generate_body(request, model, stream=True)
        return read_ndjson_stream(self, "/api/generate", body, "response")

    async def complete(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        upstream = generate_body_from_openai(body, model, stream=False)
        data = await self.post_json("/api/generate", upstream)
        return completion(parse_ollama_response(self, data, "response"), model)

    def complete_stream(self, body: dict[str, Any], model: str) -> AsyncIterator[dict[str, Any]]:
        upstream = generate_body_from_openai(body, model, stream=True)
        events = read_ndjson_stream(self, "/api/generate", upstream, "response")
        return chunks(events, model, wants_usage(body))

    async def list_models(self) -> list[str]:
        return ollama_tags(await self.get_json(self.models_path))

    async def embed(
        self, inputs: list[str], model: str, dimensions: int | None, body: dict[str, Any]
    ) -> EmbedResult:
        upstream = to_ollama_embed_body(inputs, model, dimensions)
        data, raw = await self.post_for_json("/api/embed", upstream)
        return parse_ollama_embed(self, data, len(inputs), raw)
