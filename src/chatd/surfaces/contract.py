"""The published contract: what `/openapi.json` says each route takes and answers.

Routes read their bodies themselves (for speed, strict typing and the §3 errors), so
FastAPI cannot infer their schemas; they declare them here instead. Every status a route
can answer is documented, errors as the one §3 envelope (`ErrorResponse`), with the
headers a caller acts on. Generated clients (openapi-python-client) and contract tests
(schemathesis) read this document, so it must match what the code does: a constraint
the code enforces is in the schema, and the schema promises nothing the code refuses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from chatd.types import ChatRequest

# -- errors ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """SPEC §3: what went wrong; `code` repeats `type`, `param` names the bad field."""

    model_config = ConfigDict(extra="allow")

    message: str
    type: str = Field(
        description="invalid_request, unauthorized, forbidden, not_found, provider_not_found, "
        "method_not_allowed, payload_too_large, rate_limited, budget_exceeded, "
        "upstream_error, provider_disabled, provider_overloaded, provider_cooling_down, "
        "not_ready, upstream_timeout, internal_error"
    )
    code: str
    param: str | None
    upstream_status: int | None = Field(
        default=None, description="The upstream's HTTP status, when it answered one (502)."
    )


class ErrorResponse(BaseModel):
    """Every error, on every route (SPEC §3)."""

    error: ErrorDetail


ERROR_STATUSES: dict[int, str] = {
    400: "invalid_request: bad JSON, a missing or wrong field (`param` names it)",
    401: "unauthorized: inbound auth is on and the bearer token is missing or wrong",
    403: "forbidden: the caller may not use this model",
    404: "provider_not_found: the model resolves to a provider that is not registered",
    405: "method_not_allowed: a wrong method on this route",
    413: "payload_too_large: the body is over `max_body_bytes`",
    429: "rate_limited or budget_exceeded: the caller is over its limits",
    500: "internal_error: a bug (logged with its traceback, answered without one)",
    502: "upstream_error: the provider answered non-2xx or nonsense, or could not be reached",
    503: "provider_disabled, provider_overloaded or provider_cooling_down",
    504: "upstream_timeout: no answer within the request's deadline",
}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The caller's request ID if it sent a valid one, else a new one.",
        "schema": {"type": "string"},
    },
    "X-Chatd-Attempts": {
        "description": "Upstream calls the request took, retries and fallbacks included.",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Retry-After": {
        "description": "Seconds to wait before asking again.",
        "schema": {"type": "string"},
    },
    "WWW-Authenticate": {"description": "`Bearer`.", "schema": {"type": "string"}},
    "Allow": {"description": "The methods this route takes.", "schema": {"type": "string"}},
}
STATUS_HEADERS: dict[int, tuple[str, ...]] = {
    401: ("WWW-Authenticate",),
    405: ("Allow",),
    429: ("Retry-After",),
    502: ("Retry-After", "X-Chatd-Attempts"),
    503: ("Retry-After", "X-Chatd-Attempts"),
    504: ("X-Chatd-Attempts",),
}

# What every route can answer whatever it does: a bug, a wrong method, an unknown path
# under it is the router's 404 (documented on the router, not per route).
ALWAYS = (405, 500)
# Routes under /v1 when inbound auth is on.
PROTECTED = (401,)
# A route that reads a body and calls a provider through the dispatcher.
MODEL_CALL = (400, 401, 403, 404, 405, 413, 429, 500, 502, 503, 504)


def headers(*names: str) -> dict[str, Any]:
    return {name: HEADERS[name] for name in names}


def error_responses(
    *statuses: int,
    model: type[BaseModel] = ErrorResponse,
    descriptions: dict[int, str] = ERROR_STATUSES,
) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries for these error statuses, each the §3 envelope (or,
    on the Anthropic surface, `AnthropicError`)."""
    return {
        status: {
            "model": model,
            "description": descriptions[status],
            "headers": headers("X-Request-ID", *STATUS_HEADERS.get(status, ())),
        }
        for status in sorted(set(statuses) | set(ALWAYS))
    }


def ok(
    model: type[BaseModel] | None,
    description: str,
    *,
    stream: bool = False,
    extra_headers: tuple[str, ...] = (),
) -> dict[int | str, dict[str, Any]]:
    """The 200 entry: JSON of `model`, and `text/event-stream` when the route streams."""
    entry: dict[str, Any] = {
        "description": description,
        "headers": headers("X-Request-ID", *extra_headers),
    }
    if model is not None:
        entry["model"] = model
    if stream:
        entry["content"] = {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "One Server-Sent Event: `data: <json>`.",
                    "required": ["data"],
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            }
        }
    return {200: entry}


def json_body(schema_name: str) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its JSON body itself."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
            },
        }
    }


TIMEOUT_PARAMETER = {
    "name": "X-Chatd-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "Lower the request's deadline, in milliseconds (retries and fallbacks "
    "included).",
    "schema": {"type": "integer", "minimum": 1},
}


def model_call(schema_name: str) -> dict[str, Any]:
    """`openapi_extra` for a route that calls a provider: its body and the timeout header."""
    return {**json_body(schema_name), "parameters": [TIMEOUT_PARAMETER]}


# -- bodies ------------------------------------------------------------------------------


class ChatResponse(BaseModel):
    """`POST /v1/chat`'s answer (SPEC §3)."""

    model: str = Field(description="The model sent upstream (prefix stripped).")
    content: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    provider: str
    latency_ms: int
    thinking: str | None = Field(default=None, description="Reasoning text, when returned.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    default: str
    providers: dict[str, dict[str, Any]] | None = Field(
        default=None, description="With ?probe=1: each registered provider's reachability."
    )


class ProviderEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    base_url: str
    available: bool
    requests: int
    errors: int
    p50_latency_ms: float | None


class ProviderListing(BaseModel):
    default: str
    providers: list[ProviderEntry]


class ModelEntry(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str
    data: list[ModelEntry]


class DashboardAccess(BaseModel):
    token_required: bool


class DashboardOverview(BaseModel):
    """What `/ui` draws (ui/overview.py): this worker's view."""

    model_config = ConfigDict(extra="allow")

    time: float
    refresh_ms: int
    worker: dict[str, Any]
    default: str
    providers: list[dict[str, Any]]
    series: dict[str, Any]
    errors: list[dict[str, Any]]
    spend: list[dict[str, Any]] | None


GROUP = "(caller|model|provider|day)"
TIME = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
USAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "RFC 3339 date (midnight UTC) or date-time; default: this month's start.",
        "schema": TIME,
    },
    {
        "name": "until",
        "in": "query",
        "required": False,
        "description": "RFC 3339 date or date-time, exclusive; default: now.",
        "schema": TIME,
    },
    {
        "name": "caller",
        "in": "query",
        "required": False,
        "description": "Only this caller's rows (admins; others see only their own).",
        "schema": {"type": "string"},
    },
    {
        "name": "group_by",
        "in": "query",
        "required": False,
        "description": "Comma-separated, no spaces: caller, model, provider, day.",
        "schema": {"type": "string", "pattern": f"^{GROUP}(,{GROUP})*$"},
    },
]


class UsageReport(BaseModel):
    """`GET /v1/usage` (SPEC §12): rows with their group keys and sums, and the totals."""

    since: str
    until: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    rounded_to_days: bool = False  # an edge's rows were pruned: widened to its whole day


class ChatCompletion(BaseModel):
    """An OpenAI `chat.completion`; from openai-kind vendors, relayed as they sent it."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


# The OpenAI Chat Completions request as chatd checks it (openai_compat.check_body):
# only what chatd reads or translates is constrained; other fields pass through to
# openai-kind vendors, which judge them.
# A model name: not empty, not only blanks (the routes refuse both with a 400).
MODEL_NAME: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


CHAT_COMPLETION_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "ChatCompletionRequest",
    "required": ["model", "messages"],
    "properties": {
        "model": MODEL_NAME,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {
                        "type": "string",
                        "enum": ["assistant", "developer", "function", "system", "tool", "user"],
                    },
                    "content": {
                        "description": "A string, or an array of content parts (only text "
                        "parts can go to Ollama and mock providers: others are a 400).",
                        "anyOf": [
                            {"type": "string"},
                            {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/ContentPart"},
                            },
                            {"type": "null"},
                        ],
                    },
                },
            },
        },
        "stream": {"type": "boolean"},
        # null is "not set" for every optional field chatd reads (OpenAI's SDKs send it)
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": nullable({"type": "number"}),
        "frequency_penalty": nullable({"type": "number"}),
        "presence_penalty": nullable({"type": "number"}),
        "max_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 1, "maximum": 2**31 - 1}),
        "seed": nullable({"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}),
        "stop": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "null"},
            ]
        },
        "response_format": nullable({"type": "object"}),
        "stream_options": nullable({"type": "object"}),
    },
}

MAX_INPUTS = 2048  # SPEC §11
MAX_DIMENSIONS = 65_536  # well past any model's; bounds the mock's work
EMBEDDINGS_REQUEST: dict[str, Any] = {
    "type": "object",
    "title": "EmbeddingsRequest",
    "required": ["model", "input"],
    "properties": {
        "model": MODEL_NAME,
        "input": {
            "description": "A string, or a list of strings (token-id arrays are refused).",
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                    "items": {"type": "string", "minLength": 1},
                },
            ],
        },
        "encoding_format": nullable({"type": "string", "enum": ["float", "base64"]}),
        "dimensions": nullable({"type": "integer", "minimum": 1, "maximum": MAX_DIMENSIONS}),
        "user": {"description": "Ignored."},
    },
}


class Embedding(BaseModel):
    object: str
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 LE.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """`POST /v1/embeddings`'s answer (SPEC §11), `data` in input order."""

    object: str
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- the Anthropic Messages surface (SPEC §14) -------------------------------------------


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
    """Every error on `/v1/messages`: Anthropic's shape, with §3's statuses (SPEC §14)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


ANTHROPIC_ERROR_STATUSES: dict[int, str] = {
    400: "invalid_request_error: bad JSON, a missing or wrong field (named in `message`), "
    "an unsupported block (image, document), a `tool_result` answering no earlier "
    "`tool_use`",
    401: "authentication_error: inbound auth is on and the token (`Authorization: Bearer` "
    "or `x-api-key`) is missing or wrong",
    403: "permission_error: the caller may not use this model",
    404: "not_found_error: the model resolves to a provider that is not registered",
    405: "invalid_request_error: a wrong method on this route",
    413: "request_too_large: the body is over `max_body_bytes`",
    429: "rate_limit_error: the caller is over its limits",
    500: "api_error: a bug (logged with its traceback, answered without one)",
    502: "api_error: the provider answered non-2xx or nonsense, or could not be reached",
    503: "overloaded_error: the provider is disabled, overloaded or cooling down",
    504: "api_error: no answer within the request's deadline",
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
    """`POST /v1/messages`'s answer: an Anthropic message (SPEC §14). (`Message` is
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


# The Messages request as chatd checks it (anthropic_compat.check_body and to_openai).
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
        "description": "The Anthropic Messages request (SPEC §14), translated into Chat "
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


CONTENT_PART: dict[str, Any] = {
    "type": "object",
    "title": "ContentPart",
    "description": '`{"type": "text", "text": ...}`, or any other part an '
    "openai-kind vendor takes (images, audio).",
    "required": ["type"],
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
}

REQUEST_SCHEMAS: dict[str, Any] = {
    "ChatCompletionRequest": CHAT_COMPLETION_REQUEST,
    "ContentPart": CONTENT_PART,
    "EmbeddingsRequest": EMBEDDINGS_REQUEST,
    **MESSAGES_SCHEMAS,
}


def request_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A pydantic request model's JSON Schema with its `$defs` moved to the components."""
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def install_openapi(app: FastAPI, extra_schemas: dict[str, Any] | None = None) -> None:
    """Serve an OpenAPI document that also holds the request schemas routes refer to."""
    schemas: dict[str, Any] = dict(REQUEST_SCHEMAS)
    chat = request_schema(ChatRequest)
    schemas.update(chat.pop("$defs", {}))
    schemas["ChatRequest"] = chat
    schemas.update(extra_schemas or {})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=DESCRIPTION,
                routes=app.routes,
            )
            components = document.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI documents a 422 wherever it validates a parameter; chatd answers
            # those as 400 invalid_request (documented), never 422.
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components.pop("HTTPValidationError", None)
            components.pop("ValidationError", None)
            for name, schema in schemas.items():
                components.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


DESCRIPTION = (
    "One address for every LLM a platform calls. Errors on every route are the "
    "`ErrorResponse` envelope (SPEC §3); an unknown path is `404 not_found`."
)
