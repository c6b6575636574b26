"""A `chat.completion` as an Anthropic message, and `chat.completion.chunk`s as the
Anthropic event stream (`message_start` … `message_stop`)."""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from chatd.wire.anthropic_checks import is_int


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
