"""The Anthropic Messages surface: `POST /v1/messages`, its events and errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from chatd.surfaces.contract.common import (
    MODEL_NAME,
    TIMEOUT_PARAMETER,
    error_responses,
    nullable,
    ok,
)

# -- the Anthropic Messages surface -------------------------------------------


class AnthropicErrorDetail(BaseModel):
    type: Literal[
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "overloaded_error",
    ]
    message: str


class AnthropicError(BaseModel):
    """Every error on `/v1/messages`: Anthropic's shape, with chatd's statuses."""

    type: Literal["error"]
    error: AnthropicErrorDetail


ANTHROPIC_ERROR_STATUSES: dict[int, str] = {
    400: "invalid_request_error: bad JSON, a missing or wrong field (named in `message`), "
    "an unsupported block (image, document), a `tool_result` answering no earlier "
    "`tool_use`, a request the upstream refused (a prompt longer than the model's context)",
    401: "authentication_error: inbound auth is on and the token (`Authorization: Bearer` "
    "or `x-api-key`) is missing or wrong",
    403: "permission_error: the caller may not use this model",
    404: "not_found_error: the model resolves to a provider that is not registered, or the "
    "upstream does not know it",
    405: "invalid_request_error: a wrong method on this route",
    413: "request_too_large: the body is over `max_body_bytes`",
    429: "rate_limit_error: the caller is over its limits, or the upstream said 429",
    500: "api_error: a bug (logged with its traceback, answered without one)",
    502: "api_error: the provider answered non-2xx or nonsense, or could not be reached",
    503: "overloaded_error: the provider is disabled, overloaded or cooling down",
    504: "api_error: no answer within the request's deadline",
    529: "overloaded_error: the upstream said it is overloaded (529)",
}


def anthropic_error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`error_responses` in Anthropic's shape, for `/v1/messages`."""
    return error_responses(*statuses, model=AnthropicError, descriptions=ANTHROPIC_ERROR_STATUSES)


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ThinkingBlock(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str = Field(description="Always empty: chatd's providers sign nothing.")


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int


ContentBlock = Annotated[TextBlock | ToolUseBlock | ThinkingBlock, Field(discriminator="type")]


class AnthropicMessage(BaseModel):
    """`POST /v1/messages`'s answer: an Anthropic message. (`Message` is
    `/v1/chat`'s conversation turn in this document.)"""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str = Field(description="The model sent upstream (prefix stripped).")
    content: list[ContentBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: MessageUsage


MESSAGE_EVENTS = (
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
)


def anthropic_ok() -> dict[int | str, dict[str, Any]]:
    """`/v1/messages`' 200: a message, or with `stream: true` Anthropic's named events."""
    entry = ok(
        AnthropicMessage,
        "An Anthropic message, or with `stream: true` its events: `message_start`, per "
        "block `content_block_start` / `_delta` / `_stop`, `message_delta`, `message_stop` "
        "(`ping` may come between; a failure mid-stream is an `error` event)",
        stream=True,
        extra_headers=("X-Chatd-Attempts",),
    )
    entry[200]["content"]["text/event-stream"]["schema"] = {
        "type": "object",
        "description": "One Server-Sent Event: `event: <name>`, `data: <json>`.",
        "required": ["event", "data"],
        "properties": {
            "event": {"type": "string", "enum": list(MESSAGE_EVENTS)},
            "data": {"type": "string"},
        },
    }
    return entry


# The Messages request as chatd checks it (wire/anthropic_checks.py, anthropic_request.py).
# Everything it checks is here; a rule JSON Schema cannot say (a `tool_result` answers
# an earlier `tool_use`) is in the descriptions, and in schemathesis.toml.
INT32_MAX = 2**31 - 1


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def tagged(tag: str, value: str, required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    """An object whose `tag` property is the constant `value` (one arm of a union)."""
    return {
        "type": "object",
        "required": [tag, *required],
        "properties": {tag: {"type": "string", "const": value}, **properties},
    }


def union(tag: str, arms: dict[str, str]) -> dict[str, Any]:
    """`oneOf` the named schemas, told apart by `tag` (`value -> schema name`)."""
    return {
        "oneOf": [ref(name) for name in arms.values()],
        "discriminator": {
            "propertyName": tag,
            "mapping": {value: f"#/components/schemas/{name}" for value, name in arms.items()},
        },
    }


NON_EMPTY = {"type": "string", "minLength": 1}
TEXT_BLOCKS = {"type": "array", "items": ref("TextBlockParam")}
USER_BLOCKS = {"tool_result": "ToolResultBlockParam", "text": "TextBlockParam"}
ASSISTANT_BLOCKS = {
    "text": "TextBlockParam",
    "tool_use": "ToolUseBlockParam",
    "thinking": "ThinkingBlockParam",
    "redacted_thinking": "RedactedThinkingBlockParam",
}
TOOL_CHOICES = {
    "auto": "ToolChoiceAutoParam",
    "any": "ToolChoiceAnyParam",
    "tool": "ToolChoiceToolParam",
    "none": "ToolChoiceNoneParam",
}
THINKING_CONFIGS = {
    "enabled": "ThinkingConfigEnabledParam",
    "adaptive": "ThinkingConfigAdaptiveParam",
    "disabled": "ThinkingConfigDisabledParam",
}
NO_PARALLEL = {
    "disable_parallel_tool_use": nullable(
        {"type": "boolean", "description": "`true`: `parallel_tool_calls: false` upstream."}
    )
}


def user_content() -> dict[str, Any]:
    return {"type": "array", "items": union("type", USER_BLOCKS)}


MESSAGES_SCHEMAS: dict[str, Any] = {
    "MessagesRequest": {
        "type": "object",
        "title": "MessagesRequest",
        "description": "The Anthropic Messages request, translated into Chat "
        'Completions for any provider kind. `null` is "not set" for optional fields.',
        "required": ["model", "max_tokens", "messages"],
        "properties": {
            "model": MODEL_NAME,
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": INT32_MAX},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": union(
                    "role", {"user": "UserMessageParam", "assistant": "AssistantMessageParam"}
                ),
            },
            "system": {
                "description": "A string, or text blocks (joined by a blank line).",
                "anyOf": [{"type": "string"}, TEXT_BLOCKS, {"type": "null"}],
            },
            "stop_sequences": nullable({"type": "array", "items": {"type": "string"}}),
            "temperature": nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
            "top_k": nullable(
                {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": INT32_MAX,
                    "description": "Checked, then ignored.",
                }
            ),
            "stream": {"type": "boolean"},
            "metadata": nullable({"type": "object", "description": "Accepted and ignored."}),
            "tools": nullable({"type": "array", "items": ref("ToolParam")}),
            "tool_choice": {"anyOf": [union("type", TOOL_CHOICES), {"type": "null"}]},
            "thinking": {
                "description": "Thinking on: `reasoning_effort` for openai kinds, `think` "
                "for Ollama kinds (budget below 4096: low, 16384: medium, else high).",
                "anyOf": [union("type", THINKING_CONFIGS), {"type": "null"}],
            },
            "output_config": nullable(ref("OutputConfigParam")),
        },
    },
    "UserMessageParam": tagged(
        "role",
        "user",
        ("content",),
        content={
            "description": "A string, or `text` and `tool_result` blocks (image and document "
            "blocks are a 400).",
            "anyOf": [{"type": "string"}, user_content()],
        },
    ),
    "AssistantMessageParam": tagged(
        "role",
        "assistant",
        ("content",),
        content={
            "description": "A string, or `text`, `tool_use` and (skipped) thinking blocks.",
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": union("type", ASSISTANT_BLOCKS)},
            ],
        },
    ),
    "TextBlockParam": tagged("type", "text", ("text",), text={"type": "string"}),
    "ToolUseBlockParam": tagged(
        "type",
        "tool_use",
        ("id", "name"),
        id=NON_EMPTY,
        name=NON_EMPTY,
        input={"type": "object", "description": "The call's arguments (default `{}`)."},
    ),
    "ToolResultBlockParam": tagged(
        "type",
        "tool_result",
        ("tool_use_id",),
        tool_use_id={
            **NON_EMPTY,
            "description": "The `id` of a `tool_use` block in an earlier message (else a 400).",
        },
        content={"anyOf": [{"type": "string"}, TEXT_BLOCKS]},
        is_error=nullable({"type": "boolean"}),
    ),
    "ThinkingBlockParam": tagged(
        "type",
        "thinking",
        ("thinking",),
        thinking={"type": "string"},
        signature={"type": "string"},
    ),
    "RedactedThinkingBlockParam": tagged(
        "type", "redacted_thinking", ("data",), data={"type": "string"}
    ),
    "ToolParam": {
        "type": "object",
        "description": "A client tool, sent as an OpenAI function tool (Anthropic's server "
        "tools are a 400).",
        "required": ["name", "input_schema"],
        "properties": {
            "type": nullable({"type": "string", "const": "custom"}),
            "name": NON_EMPTY,
            "description": nullable({"type": "string"}),
            "input_schema": {"type": "object", "description": "A JSON Schema."},
        },
    },
    "ToolChoiceAutoParam": tagged("type", "auto", (), **NO_PARALLEL),
    "ToolChoiceAnyParam": tagged("type", "any", (), **NO_PARALLEL),
    "ToolChoiceToolParam": tagged("type", "tool", ("name",), name=NON_EMPTY, **NO_PARALLEL),
    "ToolChoiceNoneParam": tagged("type", "none", (), **NO_PARALLEL),
    "ThinkingConfigEnabledParam": tagged(
        "type",
        "enabled",
        ("budget_tokens",),
        budget_tokens={"type": "integer", "minimum": 1, "maximum": INT32_MAX},
    ),
    "ThinkingConfigAdaptiveParam": tagged("type", "adaptive", ()),
    "ThinkingConfigDisabledParam": tagged("type", "disabled", ()),
    "OutputConfigParam": {
        "type": "object",
        "properties": {
            "effort": nullable(
                {
                    "type": "string",
                    "enum": ["low", "medium", "high", "xhigh", "max"],
                    "description": "Used when thinking is on (xhigh and max count as high).",
                }
            ),
            "format": nullable(ref("JsonOutputFormatParam")),
        },
    },
    "JsonOutputFormatParam": tagged("type", "json_schema", ("schema",), schema={"type": "object"}),
}

MESSAGES_PARAMETERS = [
    TIMEOUT_PARAMETER,
    {
        "name": "anthropic-version",
        "in": "header",
        "required": False,
        "description": "Accepted, not required, not read.",
        "schema": {"type": "string"},
    },
]
