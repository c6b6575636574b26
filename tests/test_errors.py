"""Upstream errors a client can act on: real servers' error bodies, classified once, and
answered in each surface's dialect (docs/errors.md)."""

from __future__ import annotations

import pytest

from chatd.errors import (
    BudgetExceeded,
    ContextOverflow,
    InvalidRequest,
    PayloadTooLarge,
    ProviderCoolingDown,
    ProviderDisabled,
    ProviderNotFound,
    RateLimited,
    Unauthorized,
    UpstreamError,
    UpstreamKeyRefused,
    UpstreamModelNotFound,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from chatd.providers.failures import classify
from chatd.routing.resilience import is_retryable, is_upstream_failure, may_fall_back
from chatd.web import native
from chatd.wire import anthropic_errors, openai_compat
from tests.fakes.recorded import RECORDED

# name in fakes/recorded.py -> the upstream's own words the message must carry
OVERFLOWS = {
    "llamacpp_overflow": "request (1257 tokens) exceeds the available context size (256 tokens)",
    "llamacpp_overflow_unsized": "try increasing it (4263 prompt tokens, context 4096)",
    "llamacpp_embed_overflow": "input (1004 tokens) is too large to process",
    "openai_overflow": "maximum context length is 128000 tokens",
    "openrouter_overflow": "maximum context length is 131072 tokens",
    "vllm_overflow": "maximum context length is 4096 tokens",
    "anthropic_overflow": "prompt is too long: 208310 tokens > 200000 maximum",
    "ollama_overflow": "the input length exceeds the context length",
    "ollama_overflow_500": "the input length exceeds the context length",
}


def recorded(name: str) -> UpstreamError:
    answer = RECORDED[name]
    return classify(
        "vendor", answer.status, answer.body.decode(), answer.headers.get("Retry-After")
    )


@pytest.mark.parametrize("name", sorted(OVERFLOWS))
def test_each_context_overflow_dialect_is_recognised(name: str) -> None:
    error = recorded(name)
    status = RECORDED[name].status
    assert isinstance(error, ContextOverflow)
    assert error.message.startswith("vendor: ") and OVERFLOWS[name] in error.message
    assert error.message.endswith(f"(upstream {status})") and "{" not in error.message
    assert error.upstream_status == status and error.upstream_code == "context_length_exceeded"
    status_answered, body = error.api_answer()
    assert status_answered == 400
    assert body["error"]["type"] == "invalid_request"
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages"
    assert native(error)[0] == 502
    assert native(error)[1]["error"]["upstream_code"] == "context_length_exceeded"
    assert anthropic_errors.error_answer(error)[:2] == (
        400,
        {"type": "error", "error": {"type": "invalid_request_error", "message": error.message}},
    )
    assert error.retry_hint == "false"
    assert not is_retryable(error) and not is_upstream_failure(error)
    assert may_fall_back(error)  # a roomier target may take it


# name -> class, OpenAI (status, type), Anthropic (status, type), x-should-retry
ROWS = {
    "llamacpp_bad_param": (
        UpstreamRejected,
        (400, "invalid_request"),
        (400, "invalid_request_error"),
        "false",
    ),
    "openai_bad_param": (
        UpstreamRejected,
        (400, "invalid_request"),
        (400, "invalid_request_error"),
        "false",
    ),
    "nginx_413": (
        UpstreamRejected,
        (400, "invalid_request"),
        (400, "invalid_request_error"),
        "false",
    ),
    "vllm_422": (
        UpstreamRejected,
        (400, "invalid_request"),
        (400, "invalid_request_error"),
        "false",
    ),
    "openai_model_not_found": (
        UpstreamModelNotFound,
        (404, "model_not_found"),
        (404, "not_found_error"),
        "false",
    ),
    "ollama_model_not_found": (
        UpstreamModelNotFound,
        (404, "model_not_found"),
        (404, "not_found_error"),
        "false",
    ),
    "llamacpp_bad_key": (UpstreamKeyRefused, (502, "upstream_error"), (502, "api_error"), "false"),
    "anthropic_forbidden": (
        UpstreamKeyRefused,
        (502, "upstream_error"),
        (502, "api_error"),
        "false",
    ),
    "openai_rate_limited": (
        UpstreamRateLimited,
        (429, "rate_limited"),
        (429, "rate_limit_error"),
        "true",
    ),
    "openai_server_error": (UpstreamError, (502, "upstream_error"), (502, "api_error"), "true"),
    "anthropic_overloaded": (
        UpstreamOverloaded,
        (502, "upstream_error"),
        (529, "overloaded_error"),
        "true",
    ),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_row_of_the_table_answers_per_surface(name: str) -> None:
    kind, (api_status, api_type), (anthropic_status, anthropic_type), hint = ROWS[name]
    error = recorded(name)
    assert type(error) is kind
    assert not isinstance(error, ContextOverflow)
    status, body = error.api_answer()
    assert (status, body["error"]["type"]) == (api_status, api_type)
    assert body["error"]["code"] == api_type  # code repeats type but for an overflow
    assert anthropic_errors.error_answer(error)[0] == anthropic_status
    assert anthropic_errors.error_body(error)["error"]["type"] == anthropic_type
    assert native(error)[:1] == (502,) and native(error)[1]["error"]["type"] == "upstream_error"
    assert native(error)[1]["error"]["upstream_status"] == RECORDED[name].status
    assert error.retry_hint == hint
    assert openai_compat.error_answer(error)[0] == api_status


def test_the_message_is_the_upstreams_own_words_not_its_json() -> None:
    assert recorded("llamacpp_bad_param").message == (
        'vendor: response_format type must be one of "text" or "json_object", but got: bogus'
        " (upstream 400)"
    )
    bad = recorded("openai_bad_param")
    assert bad.param == "temperature" and bad.api_answer()[1]["error"]["param"] == "temperature"
    assert bad.upstream_code == "invalid_type"
    # FastAPI's validation list said as loc: msg, never its `input` (it can quote the prompt)
    assert recorded("vllm_422").message == "vendor: body.messages: Field required (upstream 422)"
    # nothing parses: the raw body, cut to 300 characters
    html = recorded("nginx_413").message
    assert html.startswith("vendor: <html>") and "413 Request Entity Too Large" in html
    assert recorded("llamacpp_bad_key").message == "vendor: Invalid API Key (upstream 401)"


def test_the_server_log_summary_keeps_out_the_upstreams_words() -> None:
    error = recorded("anthropic_overflow")
    assert error.summary == "vendor: upstream answered 400 (context_length_exceeded)"
    assert "208310" not in error.summary


def test_an_upstream_429_passes_its_retry_after_on() -> None:
    error = recorded("openai_rate_limited")
    assert error.headers == {"Retry-After": "2"}
    assert is_retryable(error) and may_fall_back(error)


def test_caller_faults_never_fall_back_nor_trip_the_breaker() -> None:
    for name in ("llamacpp_bad_param", "nginx_413", "vllm_422"):
        error = recorded(name)
        assert not may_fall_back(error) and not is_retryable(error)
        assert not is_upstream_failure(error)
    # what chatd's key or the upstream's load caused may go elsewhere
    for name in ("openai_model_not_found", "llamacpp_bad_key", "openai_server_error"):
        assert may_fall_back(recorded(name))


def test_an_overflow_said_inside_a_stream_is_recognised() -> None:
    from chatd.providers.failures import stream_error

    error = stream_error("vendor", {"message": "prompt is too long: 300 tokens > 200 maximum"})
    assert isinstance(error, ContextOverflow) and error.api_answer()[0] == 400
    other = stream_error("vendor", {"message": "upstream overloaded", "code": 502})
    assert type(other) is UpstreamError and other.upstream_status == 502


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        (InvalidRequest("bad"), "false"),
        (Unauthorized("who"), "false"),
        (ProviderNotFound("none"), "false"),
        (PayloadTooLarge("big"), "false"),
        (BudgetExceeded("spent"), "false"),
        (ProviderDisabled("no key"), "false"),
        (RateLimited("slow"), "true"),
        (ProviderCoolingDown("later"), "true"),
        (UpstreamTimeout("slow"), "true"),
        (UpstreamError("p", "could not reach upstream", unreachable=True), "true"),
    ],
)
def test_chatds_own_answers_say_whether_retrying_can_help(error: Exception, hint: str) -> None:
    assert error.retry_hint == hint  # type: ignore[attr-defined]
