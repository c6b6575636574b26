"""Anthropic's error shape: `{"type": "error", "error": {"type", "message"}}`, with the
statuses of chatd's own errors (docs/http-api.md)."""

from __future__ import annotations

from typing import Any

from chatd.errors import ChatdError

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


def error_type(status: int) -> str:
    """Anthropic's error `type` for one of chatd's error statuses."""
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
