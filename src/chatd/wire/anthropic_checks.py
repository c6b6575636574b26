"""What a Messages request must be: its top-level fields and the shape of a content
block, each refused as a 400 naming the field (docs/http-api.md). The blocks are checked
as `anthropic_request` translates them."""

from __future__ import annotations

from typing import Any

from chatd.errors import InvalidRequest
from chatd.types import integral

INT32_MAX = 2**31 - 1  # upstreams take max_tokens as an int32


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


def check_skipped(block: dict[str, Any], at: str) -> None:
    """A thinking block of an earlier answer is dropped, but must be well formed: its
    text a string (`thinking`, or a redacted block's `data`), its `signature` too."""
    field = "thinking" if block["type"] == "thinking" else "data"
    if not isinstance(block.get(field), str):
        raise bad(f"{at}.{field}", "must be a string")
    if block["type"] == "thinking" and not isinstance(block.get("signature", ""), str):
        raise bad(f"{at}.signature", "must be a string")
