"""Anthropic Messages shapes for the `/v1/messages` surface (SPEC §14).

Pure functions: check a caller's Messages request, translate it into an OpenAI-shaped
Chat Completions body (which every provider kind already speaks, SPEC §7: openai kinds
forward it, Ollama kinds translate it, mock echoes it), and turn the `chat.completion`
or its chunks back into an Anthropic message or Anthropic stream events. Errors take
Anthropic's shape here too.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from chatd.errors import ChatdError, InvalidRequest
from chatd.types import integral

INT32_MAX = 2**31 - 1  # upstreams take max_tokens as an int32
ROLES = ("user", "assistant")
# Blocks of an earlier answer that carry nothing an other model can use: skipped.
SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
EFFORTS = ((4096, "low"), (16384, "medium"))  # thinking budget_tokens below → effort
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


# -- errors -------------------------------------------------------------------------


def error_type(status: int) -> str:
    """Anthropic's error `type` for one of §3's statuses."""
    known = ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def error_status(error: ChatdError) -> int:
    """The status the Anthropic surface answers `error` with (docs/errors.md)."""
    return error.anthropic_status or error.api_status or error.status


def error_body(error: ChatdError) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` for any chatd error."""
    kind = error_type(error_status(error))
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_answer(error: ChatdError) -> tuple[int, dict[str, Any], str]:
    """The surface's dialect (`chatd.web.Dialect`): status, body, and the type logged."""
    return error_status(error), error_body(error), error.api_type or error.type


# -- checking -----------------------------------------------------------------------


def bad(param: str, problem: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {problem}", param=param)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_body(body: Any) -> dict[str, Any]:
    """The caller's body if it is a Messages request chatd can serve, else a 400 naming
    the field. The blocks themselves are checked as they are translated (`to_openai`)."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", "is required (a non-empty string)")
    if "max_tokens" not in body:
        raise bad("max_tokens", "is required")
    # JSON's 64.0 is the integer 64 (the schema says `integer`, which takes it too)
    body["max_tokens"] = max_tokens = integral(body["max_tokens"])
    if not is_int(max_tokens) or not 1 <= max_tokens <= INT32_MAX:
        raise bad("max_tokens", f"must be an integer from 1 to {INT32_MAX}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "must be a non-empty array")
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and not (is_number(value) and 0 <= value <= 1):
            raise bad(key, "must be a number from 0 to 1")
    top_k = integral(body.get("top_k"))
    if top_k is not None and not (is_int(top_k) and 0 <= top_k <= INT32_MAX):
        raise bad("top_k", f"must be an integer from 0 to {INT32_MAX}")
    stop = body.get("stop_sequences")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad("stop_sequences", "must be an array of strings")
    if not isinstance(body.get("stream", False), bool):
        raise bad("stream", "must be a boolean")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad("metadata", "must be an object")
    return body


# -- to an OpenAI-shaped body ---------------------------------------------------------


def to_openai(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The Chat Completions body for a checked Messages request (`model` as sent: the
    provider rewrites it)."""
    out: dict[str, Any] = {
        "model": body["model"],
        "messages": [*system_messages(body.get("system")), *chat_messages(body["messages"])],
        "max_tokens": body["max_tokens"],
        "stream": stream,
    }
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad("tools", "must be an array")
        if tools:
            out["tools"] = [openai_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None:
        out.update(openai_tool_choice(choice))
    effort = reasoning_effort(body.get("thinking"))
    config = output_config(body.get("output_config"))
    asked = config.pop("reasoning_effort", None)  # an effort counts only with thinking on
    if effort is not None:
        out["reasoning_effort"] = asked or effort
    out.update(config)
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


def system_messages(system: Any) -> list[dict[str, Any]]:
    """`system` (a string or text blocks) as one system message; none when empty."""
    if system is None:
        return []
    if isinstance(system, str):
        text = system
    elif isinstance(system, list):
        text = "\n\n".join(block_text(block, f"system[{i}]") for i, block in enumerate(system))
    else:
        raise bad("system", "must be a string or an array of text blocks")
    return [{"role": "system", "content": text}] if text else []


def block_text(block: Any, where: str) -> str:
    """A `text` block's text (anything else here is refused, naming the block)."""
    if not isinstance(block, dict):
        raise bad(where, "must be a content block object")
    kind = block.get("type")
    if kind != "text":
        raise unsupported_block(kind, where, "only text blocks are allowed here")
    text = block.get("text")
    if not isinstance(text, str):
        raise bad(f"{where}.text", "must be a string")
    return text


def unsupported_block(kind: Any, where: str, why: str) -> InvalidRequest:
    if kind in ("image", "document"):
        return bad(where, f"{kind} blocks are not supported by chatd (text only)")
    return bad(where, f"{why} (got type {str(kind)[:40]!r})")


def chat_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """The conversation as Chat Completions messages: assistant `tool_use` blocks become
    `tool_calls`, user `tool_result` blocks become `tool` messages (before the user's text,
    as OpenAI wants results right after the call)."""
    out: list[dict[str, Any]] = []
    called: set[str] = set()  # tool_use ids seen so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, "must be an object")
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", "must be user or assistant (system goes in `system`)")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            if role == "assistant":
                out.append(assistant_message(content, where, called))
            else:
                out.extend(user_messages(content, where, called))
        else:
            raise bad(f"{where}.content", "must be a string or an array of content blocks")
    return out


def assistant_message(blocks: list[Any], where: str, called: set[str]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block_text(block, at))
        elif kind == "tool_use":
            calls.append(tool_call(block, at))
            called.add(calls[-1]["id"])
        elif isinstance(kind, str) and kind in SKIPPED_BLOCKS:  # a {} type is unhashable
            check_skipped(block, at)
        else:
            if not isinstance(block, dict):
                raise bad(at, "must be a content block object")
            raise unsupported_block(kind, at, "assistant blocks may be text or tool_use")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def check_skipped(block: dict[str, Any], at: str) -> None:
    """A thinking block of an earlier answer is dropped, but must be well formed: its
    text a string (`thinking`, or a redacted block's `data`), its `signature` too."""
    field = "thinking" if block["type"] == "thinking" else "data"
    if not isinstance(block.get(field), str):
        raise bad(f"{at}.{field}", "must be a string")
    if block["type"] == "thinking" and not isinstance(block.get("signature", ""), str):
        raise bad(f"{at}.signature", "must be a string")


def tool_call(block: dict[str, Any], at: str) -> dict[str, Any]:
    ident, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(ident, str) or not ident:
        raise bad(f"{at}.id", "must be a non-empty string")
    if not isinstance(name, str) or not name:
        raise bad(f"{at}.name", "must be a non-empty string")
    if not isinstance(arguments, dict):
        raise bad(f"{at}.input", "must be an object")
    return {
        "id": ident,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
    }


def user_messages(blocks: list[Any], where: str, called: set[str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_result":
            results.append(tool_message(block, at, called))
        else:
            texts.append(block_text(block, at))
    if texts or not results:
        return [*results, {"role": "user", "content": "".join(texts)}]
    return results


def tool_message(block: dict[str, Any], at: str, called: set[str]) -> dict[str, Any]:
    ident = block.get("tool_use_id")
    if not isinstance(ident, str) or not ident:
        raise bad(f"{at}.tool_use_id", "must be a non-empty string")
    if ident not in called:
        raise bad(f"{at}.tool_use_id", f"no earlier tool_use block has id {ident[:80]!r}")
    content = block.get("content", "")
    if isinstance(content, list):
        content = "".join(block_text(b, f"{at}.content[{k}]") for k, b in enumerate(content))
    elif not isinstance(content, str):
        raise bad(f"{at}.content", "must be a string or an array of text blocks")
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise bad(f"{at}.is_error", "must be a boolean")
    if is_error:
        content = f"Error: {content}"  # a Chat Completions tool message has no error flag
    return {"role": "tool", "tool_call_id": ident, "content": content}


def openai_tool(tool: Any, where: str) -> dict[str, Any]:
    """A client tool (`name`, `description`, `input_schema`) as an OpenAI function tool;
    Anthropic's own server tools (web search, code execution, ...) are refused."""
    if not isinstance(tool, dict):
        raise bad(where, "must be an object")
    if tool.get("type") not in (None, "custom"):
        raise bad(f"{where}.type", f"only custom tools are supported (got {tool['type']!s:.40})")
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not name:
        raise bad(f"{where}.name", "must be a non-empty string")
    if not isinstance(schema, dict):
        raise bad(f"{where}.input_schema", "must be an object (a JSON Schema)")
    function: dict[str, Any] = {"name": name, "parameters": schema}
    description = tool.get("description")
    if description is not None:
        if not isinstance(description, str):
            raise bad(f"{where}.description", "must be a string")
        function["description"] = description
    return {"type": "function", "function": function}


def openai_tool_choice(choice: Any) -> dict[str, Any]:
    """`tool_choice` (and `parallel_tool_calls`) in Chat Completions terms."""
    if not isinstance(choice, dict):
        raise bad("tool_choice", "must be an object")
    kind = choice.get("type")
    out: dict[str, Any]
    if kind == "auto":
        out = {"tool_choice": "auto"}
    elif kind == "any":
        out = {"tool_choice": "required"}
    elif kind == "none":
        out = {"tool_choice": "none"}
    elif kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise bad("tool_choice.name", "must be a non-empty string")
        out = {"tool_choice": {"type": "function", "function": {"name": name}}}
    else:
        raise bad("tool_choice.type", "must be auto, any, tool or none")
    no_parallel = choice.get("disable_parallel_tool_use")
    if no_parallel is not None and not isinstance(no_parallel, bool):
        raise bad("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if no_parallel:
        out["parallel_tool_calls"] = False
    return out


def reasoning_effort(thinking: Any) -> str | None:
    """`thinking` as `reasoning_effort` (Ollama kinds turn any effort into `think: true`);
    None when thinking is off or not asked for."""
    if thinking is None:
        return None
    if not isinstance(thinking, dict):
        raise bad("thinking", "must be an object")
    kind = thinking.get("type")
    if kind == "disabled":
        return None
    if kind == "adaptive":
        return "medium"
    if kind != "enabled":
        raise bad("thinking.type", "must be enabled, adaptive or disabled")
    budget = integral(thinking.get("budget_tokens"))
    if not is_int(budget) or not 1 <= budget <= INT32_MAX:
        raise bad("thinking.budget_tokens", f"must be an integer from 1 to {INT32_MAX}")
    return next((effort for below, effort in EFFORTS if budget < below), "high")


def output_config(config: Any) -> dict[str, Any]:
    """`output_config`: `effort` (used when thinking is on) and a JSON-schema `format`
    as `response_format` (Ollama kinds turn that into `format: <schema>`)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise bad("output_config", "must be an object")
    out: dict[str, Any] = {}
    effort = config.get("effort")
    if effort is not None:
        if effort not in ("low", "medium", "high", "xhigh", "max"):
            raise bad("output_config.effort", "must be low, medium, high, xhigh or max")
        out["reasoning_effort"] = effort if effort in ("low", "medium") else "high"
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise bad("output_config.format", "must be {type: json_schema, schema}")
        if not isinstance(fmt.get("schema"), dict):
            raise bad("output_config.format.schema", "must be an object (a JSON Schema)")
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"]},
        }
    return out


# -- from a chat.completion ----------------------------------------------------------


def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def usage_of(completion: dict[str, Any]) -> tuple[int, int]:
    """(input_tokens, output_tokens) from an OpenAI `usage`, 0 where it says nothing."""
    usage = completion.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return count(usage.get("prompt_tokens")), count(usage.get("completion_tokens"))


def count(value: Any) -> int:
    return value if is_int(value) and value >= 0 else 0


def stop_reason(
    finish: Any, matched: Any, stop_sequences: list[str] | None
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from a finish_reason. Which stop sequence ended the
    answer is known only when the upstream says (vLLM's `stop_reason`); else `end_turn`."""
    if finish == "length":
        return "max_tokens", None
    if finish in ("tool_calls", "function_call"):
        return "tool_use", None
    if isinstance(matched, str) and stop_sequences and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


def tool_input(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (a JSON string, or Ollama's object) as `input`."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str) and arguments.strip():
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            raise ValueError("tool call arguments are not JSON") from None
        if isinstance(parsed, dict):
            return parsed
        raise ValueError("tool call arguments are not a JSON object")
    return {}


def to_message(
    completion: dict[str, Any], model: str, stop_sequences: list[str] | None = None
) -> dict[str, Any]:
    """The Anthropic message for a `chat.completion`. Raises ValueError on a completion
    that cannot be read (the route answers 502)."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
        raise ValueError("completion has no message")
    message = choice["message"]
    content: list[dict[str, Any]] = []
    thinking = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(thinking, str) and thinking:
        content.append({"type": "thinking", "thinking": thinking, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise ValueError("tool call without a function")
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or "toolu_" + uuid.uuid4().hex[:24]),
                "name": str(function.get("name") or ""),
                "input": tool_input(function.get("arguments")),
            }
        )
    finish = "tool_calls" if any(b["type"] == "tool_use" for b in content) else None
    reason, sequence = stop_reason(
        finish or choice.get("finish_reason"), choice.get("stop_reason"), stop_sequences
    )
    input_tokens, output_tokens = usage_of(completion)
    return {
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }


# -- from chat.completion.chunks ------------------------------------------------------

Event = tuple[str, dict[str, Any]]  # (event name, data)


class StreamTranslator:
    """Turns `chat.completion.chunk`s into Anthropic stream events: `message_start`,
    per block `content_block_start` / `_delta` / `_stop`, then `message_delta` (with
    stop_reason and usage) and `message_stop`. Feed chunks in order, then `finish()`."""

    def __init__(self, model: str, stop_sequences: list[str] | None = None) -> None:
        self.model = model
        self.stop_sequences = stop_sequences
        self.index = -1  # the open block's index; -1 before the first
        self.open: str | None = None  # the open block's type
        self.tools: dict[Any, int] = {}  # OpenAI tool-call index -> block index
        self.finish: Any = None
        self.matched: Any = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.has_text = False  # the first text or thinking arrived (for the ttft)

    def start(self) -> list[Event]:
        message = {
            "id": message_id(),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message}), PING]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        input_tokens, output_tokens = usage_of(chunk)
        self.input_tokens = input_tokens or self.input_tokens
        self.output_tokens = output_tokens or self.output_tokens
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            self.finish = choice.get("finish_reason") or self.finish
            self.matched = choice.get("stop_reason") or self.matched
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(thinking, str) and thinking:
                events += self._text("thinking", thinking)
            text = delta.get("content")
            if isinstance(text, str) and text:
                events += self._text("text", text)
            calls = delta.get("tool_calls")
            for position, call in enumerate(calls if isinstance(calls, list) else ()):
                if isinstance(call, dict):
                    events += self._tool(call, position)
        return events

    def finish_events(self) -> list[Event]:
        events = self._close()
        finish = "tool_calls" if self.tools else self.finish
        reason, sequence = stop_reason(finish, self.matched, self.stop_sequences)
        usage = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": usage,
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _text(self, kind: str, text: str) -> list[Event]:
        self.has_text = True
        events: list[Event] = []
        if self.open != kind:
            events += self._close()
            events.append(self._start({"type": kind, kind: "", **SIGNED.get(kind, {})}))
            self.open = kind
        delta = {"type": f"{kind}_delta", kind: text}
        events.append(("content_block_delta", self._delta(delta)))
        return events

    def _tool(self, call: dict[str, Any], position: int) -> list[Event]:
        events: list[Event] = []
        key = call.get("index")
        key = key if is_int(key) else position
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        if key in self.tools:
            if self.open != "tool_use" or self.tools[key] != self.index:
                return events  # a late piece of a call whose block is already closed
        else:
            events += self._close()
            self.tools[key] = self.index + 1
            block = {
                "type": "tool_use",
                "id": str(call.get("id") or "toolu_" + uuid.uuid4().hex[:24]),
                "name": str(function.get("name") or ""),
                "input": {},
            }
            events.append(self._start(block))
            self.open = "tool_use"
        arguments = function.get("arguments")
        if isinstance(arguments, dict):  # Ollama's: the whole object at once
            arguments = orjson.dumps(arguments).decode() if arguments else ""
        if isinstance(arguments, str) and arguments:
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append(("content_block_delta", self._delta(delta)))
        return events

    def _start(self, block: dict[str, Any]) -> Event:
        self.index += 1
        data = {"type": "content_block_start", "index": self.index, "content_block": block}
        return ("content_block_start", data)

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}

    def _close(self) -> list[Event]:
        if self.open is None:
            return []
        self.open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self.index})]


PING: Event = ("ping", {"type": "ping"})
SIGNED = {"thinking": {"signature": ""}}  # a thinking block carries a (here empty) signature


def sse_event(event: Event) -> bytes:
    """One Anthropic SSE event: `event: <name>`, `data: <json>`, a blank line."""
    name, data = event
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
