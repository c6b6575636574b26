"""The OpenAI-compatible family (OpenRouter, OpenCode, Kimi, and any added): `/chat/completions`,
`/embeddings`."""

from __future__ import annotations

import base64
import binascii
import sys
from array import array
from collections.abc import AsyncIterator
from typing import Any

from chatd.providers.base import Provider, as_int, check_vectors, loads_line
from chatd.types import ChatRequest, ChatResult, EmbedResult, StreamEvent


def to_openai_body(request: ChatRequest, model: str, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "stream": stream,
        "temperature": request.temperature,
    }
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.format == "json":
        body["response_format"] = {"type": "json_object"}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def upstream_cost(usage: Any) -> float | None:
    """OpenRouter's `usage.cost` (USD) when the upstream reports one."""
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if isinstance(cost, int | float) and not isinstance(cost, bool) and 0 <= cost < 1e9:
        return float(cost)
    return None


def parse_openai_response(provider: Provider, data: Any) -> ChatResult:
    if not isinstance(data, dict):
        raise provider.bad_shape("unexpected response shape", data)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise provider.bad_shape("zero choices", data)
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    thinking = message.get("reasoning_content") or message.get("reasoning")
    return ChatResult(
        content=message.get("content") or "",
        input_tokens=as_int(usage.get("prompt_tokens")),
        output_tokens=as_int(usage.get("completion_tokens")),
        finish_reason=str(choice.get("finish_reason") or "stop"),
        thinking=thinking if isinstance(thinking, str) and thinking else None,
        cost=upstream_cost(usage),
    )


def to_openai_embed_body(body: dict[str, Any], inputs: list[str], model: str) -> dict[str, Any]:
    """The caller's /v1/embeddings body but for `model` and `input` (this batch), asking
    for float vectors: chatd reassembles batches and does any base64 encoding itself."""
    return {**body, "model": model, "input": inputs, "encoding_format": "float"}


def parse_openai_embed(
    provider: Provider, data: Any, expected: int, raw: bytes = b""
) -> EmbedResult:
    """Read `data[].embedding` in `index` order and `usage.prompt_tokens` (`raw`: the
    answer's bytes, for the vectors' own text). A vendor that answers base64 although
    floats were asked for is decoded, not refused."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise provider.bad_shape("unexpected response shape", data)
    embeddings = [as_vector(provider, item.get("embedding")) for item in items]
    vectors, texts = check_vectors(provider, embeddings, expected, raw, "embedding")  # doc order
    indices = [item.get("index") for item in items]
    if sorted(i for i in indices if isinstance(i, int)) == list(range(len(items))):
        order = sorted(range(len(items)), key=indices.__getitem__)
        vectors = [vectors[i] for i in order]
        texts = [texts[i] for i in order] if texts is not None else None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return EmbedResult(vectors, as_int(usage.get("prompt_tokens")), texts)


def as_vector(provider: Provider, embedding: Any) -> Any:
    if not isinstance(embedding, str):
        return embedding
    try:
        floats = array("f", base64.b64decode(embedding, validate=True))
    except (binascii.Error, ValueError):
        raise provider.bad_shape("answered an embedding that is not a vector", "") from None
    if sys.byteorder == "big":
        floats.byteswap()
    return floats.tolist()


class OpenAIProvider(Provider):
    """Any vendor speaking OpenAI Chat Completions."""

    kind = "openai"
    models_path = "/models"

    def auth_headers(self) -> dict[str, str]:
        headers = super().auth_headers()
        if self.attribution.app_url:
            headers["HTTP-Referer"] = self.attribution.app_url
        if self.attribution.app_name:
            headers["X-Title"] = self.attribution.app_name
        return headers

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        data = await self.post_json("/chat/completions", to_openai_body(request, model))
        return parse_openai_response(self, data)

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        body = to_openai_body(request, model, stream=True)
        finish_reason = ""
        input_tokens = output_tokens = 0
        cost: float | None = None
        async with self.open_stream("/chat/completions", body) as response:
            async for data in sse_events(self, response):
                if data is None:  # [DONE]
                    yield StreamEvent(
                        done=True,
                        input_tokens=input_tokens,
                        output_tokens=output_tokens,
                        finish_reason=finish_reason or "stop",
                        extra={"cost": cost} if cost is not None else {},
                    )
                    return
                if isinstance(data.get("error"), dict | str):
                    raise self.stream_error(data["error"])
                usage = data.get("usage")
                if isinstance(usage, dict):
                    input_tokens = as_int(usage.get("prompt_tokens")) or input_tokens
                    output_tokens = as_int(usage.get("completion_tokens")) or output_tokens
                    cost = upstream_cost(usage) if "cost" in usage else cost
                for choice in data.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if text or thinking:
                        yield StreamEvent(delta=text, thinking=thinking)
                    finish_reason = choice.get("finish_reason") or finish_reason
        raise self.bad_shape("stream ended before [DONE]", "")

    async def complete(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """The caller's body as sent but for `model`; the answer as received."""
        data = await self.post_json("/chat/completions", {**body, "model": model})
        if not isinstance(data, dict):
            raise self.bad_shape("unexpected response shape", data)
        if not isinstance(data.get("choices"), list) or not data["choices"]:
            raise self.bad_shape("zero choices", data)
        return data

    async def complete_stream(
        self, body: dict[str, Any], model: str
    ) -> AsyncIterator[dict[str, Any]]:
        async with self.open_stream("/chat/completions", {**body, "model": model}) as response:
            async for data in sse_events(self, response):
                if data is None:
                    return
                if isinstance(data.get("error"), dict | str):
                    raise self.stream_error(data["error"])
                yield data
        raise self.bad_shape("stream ended before [DONE]", "")

    async def embed(
        self, inputs: list[str], model: str, dimensions: int | None, body: dict[str, Any]
    ) -> EmbedResult:
        upstream = to_openai_embed_body(body, inputs, model)
        data, raw = await self.post_for_json("/embeddings", upstream)
        return parse_openai_embed(self, data, len(inputs), raw)

    async def list_models(self) -> list[str]:
        data = await self.get_json(self.models_path)
        items = data.get("data") if isinstance(data, dict) else None
        return [
            d["id"] for d in items or () if isinstance(d, dict) and isinstance(d.get("id"), str)
        ]


async def sse_events(provider: Provider, response: Any) -> AsyncIterator[dict[str, Any] | None]:
    """Parsed `data:` payloads of an SSE stream; `None` for `[DONE]`; comments skipped."""
    async for line in provider.lines(response):
        if not line.startswith("data:"):
            continue  # blank separators, `: OPENROUTER PROCESSING` keep-alives, event names
        payload = line[5:].strip()
        if payload == "[DONE]":
            yield None
            return
        data = loads_line(provider, payload)
        if isinstance(data, dict):
            yield data
