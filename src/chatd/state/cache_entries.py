"""What the cache stores for each chat route, and how it gives it back: the key's
parameters, the stored entry, a stream recorded as it passes and a hit replayed as one
(docs/replicas-and-cache.md)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from chatd.state.cache import ResponseCache
from chatd.types import ChatRequest
from chatd.web import sse

# -- /v1/chat entries ---------------------------------------------------------------------


# Every field of the request but these two (model is in the key's targets).
CHAT_PARAMS = tuple(name for name in ChatRequest.model_fields if name not in ("model", "stream"))


def chat_params(body: ChatRequest) -> dict[str, Any]:
    """What makes two `/v1/chat` requests the same answer: `body.model_dump()` less model
    and stream, read off the fields rather than through the serializer (once a request)."""
    params = {name: getattr(body, name) for name in CHAT_PARAMS}
    params["messages"] = [message.__dict__ for message in body.messages]
    return params


def chat_entry(
    provider: str,
    model: str,
    *,
    content: str,
    thinking: str | None,
    input_tokens: int,
    output_tokens: int,
    finish_reason: str,
) -> bytes:
    """A `/v1/chat` answer as stored: what the JSON answer and a replayed stream need."""
    return orjson.dumps(
        {
            "provider": provider,
            "model": model,
            "content": content,
            "thinking": thinking,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "finish_reason": finish_reason,
        }
    )


def served_chat_entry(served: Any) -> bytes:
    """`chat_entry` of a dispatcher `Served[ChatResult]`."""
    result = served.result
    return chat_entry(
        served.route.provider.name,
        served.route.model,
        content=result.content,
        thinking=result.thinking,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        finish_reason=result.finish_reason,
    )


async def replay_chat(entry: dict[str, Any], started: float) -> AsyncIterator[bytes]:
    """A stored `/v1/chat` answer as stream events: thinking, one delta, then done."""
    if entry.get("thinking"):
        yield sse({"thinking": entry["thinking"]})
    ttft_ms = round((time.perf_counter() - started) * 1000)
    yield sse({"delta": entry["content"]})
    yield sse(
        {
            "done": True,
            "model": entry["model"],
            "provider": entry["provider"],
            "input_tokens": entry["input_tokens"],
            "output_tokens": entry["output_tokens"],
            "finish_reason": entry["finish_reason"],
            "latency_ms": round((time.perf_counter() - started) * 1000),
            "ttft_ms": ttft_ms,
        }
    )


class RecordedChatStream:
    """The rest of a `/v1/chat` stream, passed through while the answer is gathered; a
    stream that reaches `done` is stored."""

    def __init__(self, cache: ResponseCache, key: str, opened: Any) -> None:
        self.cache = cache
        self.key = key
        self.provider = opened.route.provider.name
        self.model = opened.route.model
        self.rest = opened.rest
        self.content: list[str] = []
        self.thinking: list[str] = []
        self.see(opened.first)

    def __aiter__(self) -> RecordedChatStream:
        return self

    async def __anext__(self) -> Any:
        event = await anext(self.rest)
        self.see(event)
        return event

    def see(self, event: Any) -> None:
        if event.done:
            entry = chat_entry(
                self.provider,
                self.model,
                content="".join(self.content),
                thinking="".join(self.thinking) or None,
                input_tokens=event.input_tokens,
                output_tokens=event.output_tokens,
                finish_reason=event.finish_reason,
            )
            self.cache.put_later(self.key, entry)
            return
        if event.delta:
            self.content.append(event.delta)
        if event.thinking:
            self.thinking.append(event.thinking)

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


# -- /v1/chat/completions entries ---------------------------------------------------------

NOT_GENERATION = ("model", "stream", "stream_options", "user")


def completion_params(body: dict[str, Any]) -> dict[str, Any] | None:
    """The key's parameters of a cacheable completions request (explicit temperature 0),
    or None when it is not cacheable."""
    temperature = body.get("temperature")
    if isinstance(temperature, bool) or temperature != 0:
        return None
    return {k: v for k, v in body.items() if k not in NOT_GENERATION}


def completion_entry(provider: str, model: str, completion: dict[str, Any]) -> bytes:
    return orjson.dumps({"provider": provider, "model": model, "body": completion})


def replay_completion(entry: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A stored `chat.completion` as `chat.completion.chunk`s (before `[DONE]`)."""
    body = entry["body"]
    base = {
        "id": body.get("id", "chatcmpl-cached"),
        "object": "chat.completion.chunk",
        "created": body.get("created", int(time.time())),
        "model": body.get("model", entry["model"]),
    }
    chunks = []
    for choice in body.get("choices") or ():
        message = dict(choice.get("message") or {})
        delta = {k: v for k, v in message.items() if v is not None}
        if "tool_calls" in delta:
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(delta["tool_calls"])
            ]
        index = choice.get("index", 0)
        chunks.append({**base, "choices": [{"index": index, "delta": delta}]})
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
                ],
            }
        )
    if include_usage and body.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": body["usage"]})
    return chunks


class RecordedCompletionStream:
    """The rest of a completions stream, passed through while the answer is gathered into
    a `chat.completion`; stored when the stream ends with a finish reason. Streams with
    tool-call deltas or several choices are passed through and not stored."""

    def __init__(self, cache: ResponseCache, key: str, opened: Any) -> None:
        self.cache = cache
        self.key = key
        self.provider = opened.route.provider.name
        self.model = opened.route.model
        self.rest = opened.rest
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.finish: str | None = None
        self.usage: Any = None
        self.head: dict[str, Any] = {}
        self.storable = True
        self.see(opened.first)

    def __aiter__(self) -> RecordedCompletionStream:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = await anext(self.rest)
        except StopAsyncIteration:
            self.store()
            raise
        self.see(chunk)
        return chunk

    def see(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            self.storable = False
            return
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("index", 0) != 0 or delta.get("tool_calls"):
                self.storable = False
            if delta.get("content"):
                self.content.append(delta["content"])
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                self.reasoning.append(reasoning)
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]

    def store(self) -> None:
        if not self.storable or self.finish is None:
            return
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        completion = {
            "id": self.head.get("id", "chatcmpl-cached"),
            "object": "chat.completion",
            "created": self.head.get("created", int(time.time())),
            "model": self.head.get("model", self.model),
            "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
        }
        if self.usage is not None:
            completion["usage"] = self.usage
        self.cache.put_later(self.key, completion_entry(self.provider, self.model, completion))

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()
