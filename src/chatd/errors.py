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
    """Base of every error chatd answers with; subclasses pin status and type.

    The OpenAI and Anthropic surfaces answer some errors with another status (an upstream
    that refused the caller's request is a 400 there, a 502 on the native route): the
    `api_*` attributes say how, None meaning as natively (docs/errors.md)."""

    status: int = 500
    type: str = "internal_error"
    api_status: int | None = None
    api_type: str | None = None
    api_code: str | None = None  # the OpenAI envelope's `code`, when it is not the type
    api_param: str | None = None
    anthropic_status: int | None = None  # when not api_status (an upstream's 529)
    # `x-should-retry`: whether the same request may succeed later; None: only a 5xx may.
    should_retry: bool | None = None

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

    @property
    def retry_hint(self) -> str:
        """The `x-should-retry` header's value: "true" or "false"."""
        hint = self.should_retry
        return "true" if (self.status >= 500 if hint is None else hint) else "false"

    def envelope(self) -> dict[str, Any]:
        """The error body: `{"error": {message, type, code, param, ...}}`."""
        return self._envelope(self.type, self.type, self.param)

    def api_answer(self) -> tuple[int, dict[str, Any]]:
        """Status and error envelope on the OpenAI surface, where an upstream's verdict on the
        caller's request keeps its 4xx (an SDK must not retry what cannot succeed)."""
        if self.api_status is None:
            return self.status, self.envelope()
        kind = self.api_type or self.type
        return self.api_status, self._envelope(kind, self.api_code or kind, self.api_param)

    def _envelope(self, kind: str, code: str, param: str | None) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": kind,
            "code": code,
            "param": param if param is not None else self.param,
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
    should_retry = True


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
    """The provider answered non-2xx, unparseable JSON, no choices, or was unreachable.

    A non-2xx answer is classified once, where the provider call fails
    (`chatd.providers.failures.classify`), into this class or a subclass below that says
    whose fault it was; natively every one is a 502 `upstream_error`."""

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
        upstream_code: str | None = None,
        param: str | None = None,
    ) -> None:
        if upstream_status is not None:
            # `body`: the upstream's own words (its message, or its raw body when nothing
            # parsed); `detail` is unused, the status says it.
            said = abbreviate(body) if body else f"upstream answered {upstream_status}"
            message = f"{provider}: {said} (upstream {upstream_status})"
            summary = f"{provider}: upstream answered {upstream_status}"
            if upstream_code:
                summary += f" ({upstream_code})"
        else:
            message = summary = f"{provider}: {detail}"
            if body:
                message += f": {abbreviate(body)}"
        # What the server log may say: the upstream's words can quote the caller's prompt,
        # so they go to the caller and never to the log.
        self.summary = summary
        extra = None
        if upstream_status is not None:
            extra = {"upstream_status": upstream_status, "upstream_code": upstream_code}
        headers = {"Retry-After": retry_after} if retry_after else None
        super().__init__(message, extra=extra, headers=headers, param=param)
        self.provider = provider
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code
        self.retry_after = retry_after
        # True for connection failures (retryable), False for bad JSON, zero choices, ...
        self.unreachable = unreachable


class UpstreamRejected(UpstreamError):
    """The upstream refused the caller's request itself (400, 413, 422): the caller must
    change it; no retry, no other target (another would say the same)."""

    api_status = 400
    api_type = "invalid_request"
    should_retry = False


class ContextOverflow(UpstreamRejected):
    """The prompt does not fit the model's context: a roomier target may take it."""

    api_code = "context_length_exceeded"
    api_param = "messages"


class UpstreamModelNotFound(UpstreamError):
    """The upstream does not know the model (404)."""

    api_status = 404
    api_type = "model_not_found"
    api_param = "model"
    should_retry = False


class UpstreamKeyRefused(UpstreamError):
    """The upstream refused chatd's own key (401, 403): the operator must act."""

    should_retry = False


class UpstreamRateLimited(UpstreamError):
    """The upstream said 429: later may work (`Retry-After` passed on)."""

    api_status = 429
    api_type = "rate_limited"
    should_retry = True


class UpstreamOverloaded(UpstreamError):
    """The upstream said 529 (Anthropic's "overloaded"): 502 but on the Anthropic surface."""

    anthropic_status = 529


class NotReady(ChatdError):
    """`GET /ready`: chatd cannot serve its default provider (docs/operations.md)."""

    status = 503
    type = "not_ready"


class UsageUnavailable(ChatdError):
    """`GET /v1/usage` while the ledger's database cannot be read."""

    status = 503
    type = "usage_unavailable"


class ProviderDisabled(ChatdError):
    """The provider has no key: asking again changes nothing until an operator acts."""

    status = 503
    type = "provider_disabled"
    should_retry = False


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
    should_retry = True  # a faster connection may get through


class HeadersTooLarge(ChatdError):
    status = 431
    type = "headers_too_large"


class Overloaded(ChatdError):
    """This worker holds `max_connections` already (docs/exposing.md)."""

    status = 503
    type = "overloaded"
