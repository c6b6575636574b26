"""Local Ollama: `POST /api/chat` (docs/routing.md), `POST /api/embed` (docs/http-api.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from chatd.providers.base import Provider, as_int, check_vectors, loads_line
from chatd.types import ChatRequest, ChatResult, EmbedResult, StreamEvent
from chatd.wire.openai_compat import chunks, completion, to_ollama_chat, wants_usage


def ollama_options(request: ChatRequest) -> dict[str, Any]:
    options: dict[str, Any] = {"temperature": request.temperature}
    if request.max_tokens is not None:
        options["num_predict"] = request.max_tokens
    return options


def to_ollama_body(request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
    """The /api/chat body; `think` is false unless the caller asked for reasoning."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": stream,
        "think": request.think,
        "options": ollama_options(request),
    }
    if request.format == "json":
        body["format"] = "json"
    return body


def parse_ollama_response(provider: Provider, data: Any, text_field: str) -> ChatResult:
    """Read an /api/chat (text in `message`) or /api/generate (text at top level) answer."""
    if not isinstance(data, dict):
        raise provider.bad_shape("unexpected response shape", data)
    source = data.get("message") if text_field == "message" else data
    if not isinstance(source, dict):
        raise provider.bad_shape("response has no message", data)
    content = source.get("content" if text_field == "message" else "response")
    if not isinstance(content, str):
        raise provider.bad_shape("response has no content", data)
    thinking = source.get("thinking")
    tool_calls = source.get("tool_calls")
    return ChatResult(
        content=content,
        input_tokens=as_int(data.get("prompt_eval_count")),
        output_tokens=as_int(data.get("eval_count")),
        finish_reason=str(data.get("done_reason") or "stop"),
        thinking=thinking if isinstance(thinking, str) and thinking else None,
        tool_calls=tool_calls if isinstance(tool_calls, list) and tool_calls else None,
    )


def to_ollama_embed_body(inputs: list[str], model: str, dimensions: int | None) -> dict[str, Any]:
    """The /api/embed body (Ollama and Ollama Cloud): over-long inputs are truncated
    upstream rather than refused, as OpenAI-style callers expect."""
    body: dict[str, Any] = {"model": model, "input": inputs, "truncate": True}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return body


def parse_ollama_embed(
    provider: Provider, data: Any, expected: int, raw: bytes = b""
) -> EmbedResult:
    """Read /api/embed's `embeddings` and `prompt_eval_count` (`raw`: the answer's bytes,
    for the vectors' own text)."""
    if not isinstance(data, dict):
        raise provider.bad_shape("unexpected response shape", data)
    embeddings = data.get("embeddings")
    vectors, texts = check_vectors(provider, embeddings, expected, raw, "embeddings", nested=True)
    return EmbedResult(vectors, as_int(data.get("prompt_eval_count")), texts)


async def read_ndjson_stream(
    provider: Provider, path: str, body: dict[str, Any], text_field: str
) -> AsyncIterator[StreamEvent]:
    """Relay Ollama's NDJSON stream as StreamEvents, one per upstream line."""
    async with provider.open_stream(path, body) as response:
        async for line in provider.lines(response):
            if not line.strip():
                continue
            data = loads_line(provider, line)
            if not isinstance(data, dict):
                raise provider.bad_shape("unexpected stream line", data)
            if "error" in data:
                raise provider.stream_error(data["error"])
            source = data.get("message") if text_field == "message" else data
            source = source if isinstance(source, dict) else {}
            text = source.get("content" if text_field == "message" else "response") or ""
            thinking = source.get("thinking") or ""
            if text or thinking:
                yield StreamEvent(delta=text, thinking=thinking)
            tool_calls = source.get("tool_calls")
            if isinstance(tool_calls, list) and tool_calls:
                yield StreamEvent(extra={"tool_calls": tool_calls})
            if data.get("done"):
                yield StreamEvent(
                    done=True,
                    input_tokens=as_int(data.get("prompt_eval_count")),
                    output_tokens=as_int(data.get("eval_count")),
                    finish_reason=str(data.get("done_reason") or "stop"),
                )
                return
    raise provider.bad_shape("stream ended before done", "")


class OllamaProvider(Provider):
    """A local (or self-hosted) Ollama server."""

    kind = "ollama"
    models_path = "/api/tags"

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        data = await self.post_json("/api/chat", to_ollama_body(request, model))
        return parse_ollama_response(self, data, "message")

    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = to_ollama_body(request, model, stream=True)
        return read_ndjson_stream(self, "/api/chat", body, "message")

    async def complete(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        data = await self.post_json("/api/chat", to_ollama_chat(body, model, stream=False))
        return completion(parse_ollama_response(self, data, "message"), model)

    def complete_stream(self, body: dict[str, Any], model: str) -> AsyncIterator[dict[str, Any]]:
        upstream = to_ollama_chat(body, model, stream=True)
        events = read_ndjson_stream(self, "/api/chat", upstream, "message")
        return chunks(events, model, wants_usage(body))

    async def list_models(self) -> list[str]:
        return ollama_tags(await self.get_json(self.models_path))

    async def embed(
        self, inputs: list[str], model: str, dimensions: int | None, body: dict[str, Any]
    ) -> EmbedResult:
        upstream = to_ollama_embed_body(inputs, model, dimensions)
        data, raw = await self.post_for_json("/api/embed", upstream)
        return parse_ollama_embed(self, data, len(inputs), raw)


def ollama_tags(data: Any) -> list[str]:
    models = data.get("models") if isinstance(data, dict) else None
    return [
        m["name"] for m in models or () if isinstance(m, dict) and isinstance(m.get("name"), str)
    ]
