"""Tracing's sampling and configuration, in process (docs/tracing.md); the spans
themselves are read back from a real Phoenix in test_tracing_e2e.py."""

from __future__ import annotations

from typing import Any

import pytest

from chatd.config import ConfigError
from chatd.telemetry.tracing import SPAN_STATE, Tracing, build_tracing, traces_url
from tests.support import make_settings

TRACE = "0af7651916cd43dd8448eb211c80319c"


def scope(traceparent: str | None = None) -> dict[str, Any]:
    headers = [(b"traceparent", traceparent.encode())] if traceparent else []
    return {"type": "http", "method": "POST", "path": "/v1/chat", "headers": headers}


@pytest.fixture
def never() -> Any:
    tracing = Tracing("http://127.0.0.1:9/v1/traces", "test", 0.0)
    yield tracing
    tracing.shutdown()


def test_a_request_left_out_by_the_ratio_gets_no_span_and_no_trace_id(never: Tracing) -> None:
    request = scope()
    never.started(request)
    assert SPAN_STATE not in request.get("state", {})
    assert "trace_id" not in request.get("state", {}).get("log", {})
    never.finished(request, 200)  # nothing to close, nothing raised


def test_a_callers_sampled_trace_is_kept_whatever_the_ratio(never: Tracing) -> None:
    request = scope(f"00-{TRACE}-b7ad6b7169203331-01")
    never.started(request)
    assert request["state"]["log"]["trace_id"] == TRACE
    never.finished(request, 200)


def test_a_callers_unsampled_trace_stays_unsampled() -> None:
    always = Tracing("http://127.0.0.1:9/v1/traces", "test", 1.0)
    request = scope(f"00-{TRACE}-b7ad6b7169203331-00")
    always.started(request)
    assert "state" not in request  # no span, no trace id: nothing recorded at all
    mangled = scope("00-not-a-trace-01")  # unreadable: chatd starts a trace of its own
    always.started(mangled)
    assert len(mangled["state"]["log"]["trace_id"]) == 32
    always.finished(mangled, 200)
    always.shutdown()


def test_the_endpoint_comes_from_the_config_or_the_standard_variable() -> None:
    assert build_tracing(make_settings(), environ={}) is None
    configured = build_tracing(
        make_settings(tracing={"otlp_endpoint": "http://collector:4318"}), environ={}
    )
    assert configured is not None and configured.url == "http://collector:4318/v1/traces"
    from_env = build_tracing(
        make_settings(), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318/"}
    )
    assert from_env is not None and from_env.url == "http://otel:4318/v1/traces"
    assert traces_url("http://x:4318/v1/traces") == "http://x:4318/v1/traces"


@pytest.mark.parametrize(
    ("tracing", "named"),
    [
        ({"otlp_endpoint": "collector:4318"}, "chatd.tracing.otlp_endpoint"),
        ({"sample_ratio": 1.5}, "chatd.tracing.sample_ratio"),
        ({"sampel_ratio": 0.5}, "chatd.tracing.sampel_ratio"),
    ],
)
def test_a_bad_tracing_value_is_a_config_error_naming_the_key(
    tracing: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        make_settings(tracing=tracing)
