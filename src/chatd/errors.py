"""chatd's errors: each knows its HTTP status and `type`.

Routes and providers raise these; one handler in `app.py` renders them as the
OpenAI-style error envelope. Nothing else builds error JSON.
"""

from __future__ import annotations

from typing import Any

QUOTE_LIMIT = 300


def abbreviate(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Cut `text` to at most `limit` characters, marking the cut with an ellipsis."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


class ChatdError(Exception):
    """Base of every error chatd answers with; subclasses pin status and type."""

    status: int = 500
    type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}

    def envelope(self) -> dict[str, Any]:
        """The error body: `{"error": {message, type, code, param, ...}}`."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.type,
            "param": self.param,
        }
        error.update(self.extra)
        return {"error": error}


class InvalidRequest(ChatdError):
    status = 400
    type = "invalid_request"


class ConfigRefused(ChatdError):
    """A reload's config file is bad: refused whole, the old configuration serves on."""

    status = 400
    type = "invalid_config"


class Unauthorized(ChatdError):
    status = 401
    type = "unauthorized"


class Forbidden(ChatdError):
    """The caller may not use this model (or read that caller's usage)."""

    status = 403
    type = "forbidden"


class RateLimited(ChatdError):
    """Over the caller's rpm, tpm or concurrency; `Retry-After` says when."""

    status = 429
    type = "rate_limited"


class BudgetExceeded(ChatdError):
    """The caller has spent its budget for the period."""

    status = 429
    type = "budget_exceeded"


class CallerExists(ChatdError):
    """a live caller of that name exists (or existed: names are not reused)."""

    status = 409
    type = "caller_exists"


class ConfigCaller(ChatdError):
    """the caller comes from the config file; /admin cannot change it."""

    status = 409
    type = "config_caller"


class NoDatabase(ChatdError):
    """live callers need `usage_db`, and it is off."""

    status = 409
    type = "no_database"


class DatabaseUnavailable(ChatdError):
    """an admin write while the callers' database cannot be reached."""

    status = 503
    type = "database_unavailable"


class NotFound(ChatdError):
    status = 404
    type = "not_found"


class ProviderNotFound(ChatdError):
    status = 404
    type = "provider_not_found"


class MethodNotAllowed(ChatdError):
    status = 405
    type = "method_not_allowed"


class PayloadTooLarge(ChatdError):
    status = 413
    type = "payload_too_large"


class InternalError(ChatdError):
    status = 500
    type = "internal_error"


class UpstreamError(ChatdError):
    """The provider answered non-2xx, unparseable JSON, no choices, or was unreachable."""

    status = 502
    type = "upstream_error"

    def __init__(
        self,
        provider: str,
        detail: str,
        *,
        upstream_status: int | None = None,
        body: str | None = None,
        retry_after: str | None = None,
        unreachable: bool = False,
    ) -> None:
        message = f"{provider}: {detail}"
        if upstream_status is not None:
            message = f"{provider}: upstream answered {upstream_status}"
            if detail:
                message += f" ({detail})"
        # What the server log may say: the upstream's body can quote the caller's prompt,
        # so it goes to the caller (abbreviated) and never to the log.
        self.summary = message
        if body:
            message += f": {abbreviate(body)}"
        extra = {"upstream_status": upstream_status} if upstream_status is not None else None
        headers = {"Retry-After": retry_after} if retry_after else None
        super().__init__(message, extra=extra, headers=headers)
        self.provider = provider
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        # True for connection failures (retryable), False for bad JSON, zero choices, ...
        self.unreachable = unreachable


class NotReady(ChatdError):
    """`GET /ready`: chatd cannot serve its default provider (docs/operations.md)."""

    status = 503
    type = "not_ready"


class UsageUnavailable(ChatdError):
    """`GET /v1/usage` while the ledger's database cannot be read."""

    status = 503
    type = "usage_unavailable"


class ProviderDisabled(ChatdError):
    status = 503
    type = "provider_disabled"


class ProviderOverloaded(ChatdError):
    status = 503
    type = "provider_overloaded"


class ProviderCoolingDown(ChatdError):
    status = 503
    type = "provider_cooling_down"


class UpstreamTimeout(ChatdError):
    status = 504
    type = "upstream_timeout"


class RequestTimeout(ChatdError):
    """A connection too slow to send its request (docs/exposing.md)."""

    status = 408
    type = "request_timeout"


class HeadersTooLarge(ChatdError):
    status = 431
    type = "headers_too_large"


class Overloaded(ChatdError):
    """This worker holds `max_connections` already (docs/exposing.md)."""

    status = 503
    type = "overloaded"
