"""The contract's shared pieces: the error envelope, statuses every route can answer, helpers."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# -- errors ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """What went wrong; `code` repeats `type`, `param` names the bad field."""

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
        default=None, description="The upstream's HTTP status, when it answered one."
    )
    upstream_code: str | None = Field(
        default=None,
        description="The upstream's own error code, beside `upstream_status`: "
        "`context_length_exceeded` for a prompt longer than the model's context.",
    )


class ErrorResponse(BaseModel):
    """Every error, on every route."""

    error: ErrorDetail


ERROR_STATUSES: dict[int, str] = {
    400: "invalid_request: bad JSON, a missing or wrong field (`param` names it); on the "
    "OpenAI surface also a request the upstream refused (`code` `context_length_exceeded` "
    "for a prompt longer than the model's context)",
    401: "unauthorized: inbound auth is on and the bearer token is missing or wrong",
    403: "forbidden: the caller may not use this model",
    404: "provider_not_found: the model resolves to a provider that is not registered; on "
    "the OpenAI surface also model_not_found, a model the upstream does not know",
    405: "method_not_allowed: a wrong method on this route",
    413: "payload_too_large: the body is over `max_body_bytes`",
    429: "rate_limited or budget_exceeded: the caller is over its limits; on the OpenAI "
    "surface also rate_limited by the upstream",
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
    "x-should-retry": {
        "description": "`true` when the same request may succeed later, `false` when it "
        "cannot (both official OpenAI and Anthropic SDKs obey it).",
        "schema": {"type": "string", "enum": ["true", "false"]},
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
    529: ("Retry-After", "X-Chatd-Attempts"),
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
    """FastAPI `responses=` entries for these error statuses, each the error envelope (or,
    on the Anthropic surface, `AnthropicError`)."""
    return {
        status: {
            "model": model,
            "description": descriptions[status],
            "headers": headers("X-Request-ID", "x-should-retry", *STATUS_HEADERS.get(status, ())),
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


# A model name: not empty, not only blanks (the routes refuse both with a 400).
MODEL_NAME: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}
