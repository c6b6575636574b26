"""OpenAI Chat Completions shapes for the OpenAI-compatible surface (docs/http-api.md).

Pure functions: check a caller's body, translate it for Ollama kinds, and turn chatd's
own results and stream events back into `chat.completion` / `chat.completion.chunk`.
Openai-kind providers never see these translations: they get the caller's body as sent,
with only `model` rewritten.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson

from chatd.errors import ChatdError, InvalidRequest
from chatd.types import ChatRequest, ChatResult, Message, StreamEvent

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
NUMBER_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")
TEXT_PART_TYPES = frozenset({"text", "input_text"})
# The content parts chatd passes on: text, and what OpenAI-compatible vendors take besides.
PART_TYPES = ("text", "input_text", "image_url", "input_audio", "file", "refusal")
# What upstreams can take: token limits are int32 (as on /v1/chat), a seed is int64.
INTEGER_RANGES = {
    "max_tokens": (1, 2**31 - 1),
    "max_completion_tokens": (1, 2**31 - 1),
    "seed": (-(2**63), 2**63 - 1),
}
FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})


def check_body(body: Any) -> dict[str, Any]:
    """The caller's body if it is a plausible Chat Completions request, else a 400.

    Only what chatd reads or translates is checked; everything else passes through to
    openai-kind upstreams untouched (they judge their own fields).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: is required (a non-empty string)", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}]: must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: must be one of {', '.join(sorted(ROLES))}",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"messages[{i}].content: must be a string, an array of parts, or null",
                param=f"messages[{i}].content",
            )
        if isinstance(content, list):
            check_parts(content, f"messages[{i}].content")
    for key in NUMBER_FIELDS:
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidRequest(f"{key}: must be a number", param=key)
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise InvalidRequest("temperature: must be between 0 and 2", param="temperature")
    for key in ("max_tokens", "max_completion_tokens", "seed"):
        value = body.get(key)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            body[key] = value = int(value)  # JSON's 64.0 is the integer 64
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InvalidRequest(f"{key}: must be an integer", param=key)
    for key, (low, high) in INTEGER_RANGES.items():
        if body.get(key) is not None and not low <= body[key] <= high:
            raise InvalidRequest(f"{key}: must be between {low} and {high}", param=key)
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise InvalidRequest("stop: must be a string or an array of strings", param="stop")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    for key in ("response_format", "stream_options"):
        value = body.get(key)
        if value is not None and not isinstance(value, dict):
            raise InvalidRequest(f"{key}: must be an object", param=key)
    return body


def error_answer(error: ChatdError) -> tuple[int, dict[str, Any], str]:
    """The OpenAI surface's dialect (`chatd.web.Dialect`): an upstream's verdict on the
    caller's request keeps its 4xx, so an SDK raises `BadRequestError` and does not retry
    (docs/errors.md)."""
    status, body = error.api_answer()
    return status, body, error.api_type or error.type


def check_parts(parts: list[Any], where: str) -> None:
    """Content parts are objects naming their `type` (a text part's `text` a string)."""
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(
                f"{where}[{j}]: must be an object with a string type", param=f"{where}[{j}]"
            )
        if part["type"] not in PART_TYPES:
            raise InvalidRequest(
                f"{where}[{j}].type: must be one of {', '.join(PART_TYPES)}",
                param=f"{where}[{j}].type",
            )
        if "text" in part and not isinstance(part["text"], str):
            raise InvalidRequest(f"{where}[{j}].text: must be a string", param=f"{where}[{j}].text")


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# -- to Ollama ------------------------------------------------------------------------


def text_of(content: Any, where: str) -> str:
    """A message's text: a string as is, text parts joined, null as empty."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and str(part.get("type")) in TEXT_PART_TYPES:
            texts.append(str(part.get("text") or ""))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(
                f"{where}.content[{j}]: only text parts can be sent to an Ollama provider "
                f"(got {kind!s:.40})",
                param=f"{where}.content[{j}]",
            )
    return "".join(texts)


def ollama_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages for /api/chat: roles Ollama knows, text content, tool calls and results."""
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for the tool results
    for i, m in enumerate(body["messages"]):
        role = m["role"]
        role = "system" if role == "developer" else "tool" if role == "function" else role
        message: dict[str, Any] = {
            "role": role,
            "content": text_of(m.get("content"), f"messages[{i}]"),
        }
        calls = m.get("tool_calls")
        if role == "assistant" and isinstance(calls, list) and calls:
            message["tool_calls"] = [ollama_tool_call(call, names) for call in calls]
        if role == "tool":
            name = m.get("name") or names.get(str(m.get("tool_call_id")))
            if isinstance(name, str) and name:
                message["tool_name"] = name
        out.append(message)
    return out


def ollama_tool_call(call: Any, names: dict[str, str]) -> dict[str, Any]:
    """An OpenAI tool call (arguments as a JSON string) as Ollama's (arguments an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    function = function if isinstance(function, dict) else {}
    name = str(function.get("name") or "")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                "tool_calls[].function.arguments: must be a JSON string", param="messages"
            ) from None
    if isinstance(call, dict) and call.get("id"):
        names[str(call["id"])] = name
    return {"function": {"name": name, "arguments": arguments or {}}}


def openai_tool_calls(calls: list[dict[str, Any]], *, streamed: bool) -> list[dict[str, Any]]:
    """Ollama's tool calls as OpenAI's: ids made up, arguments as a JSON string."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments", {})
        entry: dict[str, Any] = {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {
                "name": str(function.get("name") or ""),
                "arguments": arguments
                if isinstance(arguments, str)
                else orjson.dumps(arguments).decode(),
            },
        }
        if streamed:
            entry["index"] = index
        out.append(entry)
    return out


def options_from_openai(body: dict[str, Any]) -> dict[str, Any]:
    """`options` for Ollama from the OpenAI sampling fields that are present."""
    options: dict[str, Any] = {}
    for key in (*NUMBER_FIELDS, "seed"):
        if body.get(key) is not None:
            options[key] = body[key]
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["num_predict"] = limit
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    return options


def ollama_format(body: dict[str, Any]) -> Any:
    """`format` for Ollama: "json" for json_object, the schema itself for json_schema."""
    response_format = body.get("response_format") or {}
    kind = response_format.get("type")
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "response_format.json_schema.schema: must be an object",
                param="response_format",
            )
        return schema
    return None


def ollama_think(body: dict[str, Any]) -> bool:
    """Reasoning stays off unless asked for by `think` or `reasoning_effort`."""
    think = body.get("think")
    if isinstance(think, bool):
        return think
    return body.get("reasoning_effort") in ("minimal", "low", "medium", "high")


def to_ollama_chat(body: dict[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
    """An /api/chat body for an OpenAI-shaped request."""
    out: dict[str, Any] = {
        "model": model,
        "messages": ollama_messages(body),
        "stream": stream,
        "think": ollama_think(body),
        "options": options_from_openai(body),
    }
    fmt = ollama_format(body)
    if fmt is not None:
        out["format"] = fmt
    if isinstance(body.get("tools"), list) and body["tools"]:
        out["tools"] = body["tools"]
    return out


def as_messages(body: dict[str, Any]) -> list[Message]:
    """The body's messages as chatd's own, for providers that take a ChatRequest."""
    return [
        Message.model_construct(role=m["role"], content=m["content"]) for m in ollama_messages(body)
    ]


def to_chat_request(body: dict[str, Any], model: str) -> ChatRequest:
    """A ChatRequest carrying what chatd's own request can (for the mock kind)."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    fmt = (body.get("response_format") or {}).get("type")
    return ChatRequest.model_construct(
        model=model,
        messages=as_messages(body),
        temperature=body.get("temperature") or 0.0,
        max_tokens=limit,
        format="json" if fmt in ("json_object", "json_schema") else "",
        think=ollama_think(body),
        stream=bool(body.get("stream")),
    )


# -- from chatd's results -----------------------------------------------------------


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def finish_reason(reason: str) -> str:
    return reason if reason in FINISH_REASONS else "stop"


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def completion(result: ChatResult, model: str) -> dict[str, Any]:
    """A `chat.completion` from a ChatResult."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.thinking:
        message["reasoning_content"] = result.thinking
    finish = finish_reason(result.finish_reason)
    if result.tool_calls:
        message["tool_calls"] = openai_tool_calls(result.tool_calls, streamed=False)
        finish = "tool_calls"
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": usage(result.input_tokens, result.output_tokens),
    }


async def chunks(
    events: AsyncIterator[StreamEvent], model: str, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """`chat.completion.chunk`s from chatd's stream events (without the `[DONE]`)."""
    ident = completion_id()
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    first = True
    called = False
    async for event in events:
        if event.done:
            yield chunk({}, "tool_calls" if called else finish_reason(event.finish_reason))
            if include_usage:
                yield {
                    **chunk({}),
                    "choices": [],
                    "usage": usage(event.input_tokens, event.output_tokens),
                }
            return
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        first = False
        if event.thinking:
            delta["reasoning_content"] = event.thinking
        if event.delta:
            delta["content"] = event.delta
        if event.extra.get("tool_calls"):
            delta["tool_calls"] = openai_tool_calls(event.extra["tool_calls"], streamed=True)
            called = True
        yield chunk(delta)
