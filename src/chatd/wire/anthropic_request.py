"""A checked Messages request as an OpenAI-shaped Chat Completions body, which every
provider kind already speaks: openai kinds forward it, Ollama kinds translate it, mock
echoes it (docs/http-api.md has the field-by-field table)."""

from __future__ import annotations

from typing import Any

import orjson

from chatd.types import integral
from chatd.wire.anthropic_checks import (
    INT32_MAX,
    bad,
    block_text,
    check_skipped,
    is_int,
    unsupported_block,
)

ROLES = ("user", "assistant")
# Blocks of an earlier answer that carry nothing an other model can use: skipped.
SKIPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
EFFORTS = ((4096, "low"), (16384, "medium"))  # thinking budget_tokens below → effort


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
