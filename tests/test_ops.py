"""Operations in process: the request log line, inbound auth, /metrics, /ready and the
per-provider counters, through the ASGI app and the pieces it is built from."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chatd.config import ConfigError
from chatd.routing.resilience import Breaker, Limiter
from chatd.state.auth import BearerAuth, auth_tokens, check_auth_config
from chatd.telemetry.metrics import Metrics, ProviderStats
from chatd.telemetry.requestlog import JsonFormatter, TextFormatter, log_request, request_line
from tests.support import make_settings

SECRET_CONTENT = "purple-walrus-content-8812"
TOKEN = "tok-inbound-1234567890"


def settings(**chatd: Any) -> Any:
    providers = {"mock": {"kind": "mock"}, "ollama": {"enabled": False}}
    providers.update(chatd.pop("providers", {}))
    chatd.setdefault("default_provider", "mock")
    return make_settings(providers=providers, **chatd)


def chat_body(content: str = "one two three", **extra: Any) -> dict[str, Any]:
    return {"model": "mock/echo", "messages": [{"role": "user", "content": content}], **extra}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text → {(sample name, sorted labels): value}."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def scope(path: str, authorization: bytes | None = None) -> dict[str, Any]:
    headers = [(b"authorization", authorization)] if authorization is not None else []
    return {"type": "http", "path": path, "headers": headers}


# -- inbound auth ----------------------------------------------------------------------


def test_auth_is_off_unless_auth_tokens_env_is_set() -> None:
    assert auth_tokens(settings()) is None
    check_auth_config(settings())  # off is fine


def test_auth_tokens_are_comma_separated_and_trimmed() -> None:
    on = settings(auth_tokens_env="CHATD_TEST_TOKENS")
    assert auth_tokens(on, {"CHATD_TEST_TOKENS": " a1 , b2,, "}) == ["a1", "b2"]


def test_auth_on_without_tokens_refuses_to_start_without_printing_values() -> None:
    on = settings(auth_tokens_env="CHATD_TEST_TOKENS")
    with pytest.raises(ConfigError, match="auth_tokens_env") as caught:
        check_auth_config(on, {"CHATD_TEST_TOKENS": " , "})
    assert "CHATD_TEST_TOKENS" in str(caught.value)


@pytest.mark.parametrize(
    ("path", "header", "refused"),
    [
        ("/v1/chat", None, "missing"),
        ("/v1/chat", b"Basic " + TOKEN.encode(), "Bearer"),
        ("/v1/chat", b"Bearer", "Bearer"),
        ("/v1/chat", b"Bearer wrong-token", "invalid"),
        ("/v1/chat", b"Bearer " + TOKEN.encode() + b"x", "invalid"),
        ("/v1/anything/added/later", None, "missing"),
        ("/v1", None, "missing"),
        ("/v1/chat", b"Bearer " + TOKEN.encode(), None),
        ("/v1/chat", b"bearer  " + TOKEN.encode() + b" ", None),
        ("/v1/chat", b"Bearer other-token", None),
        ("/health", None, None),
        ("/ready", None, None),
        ("/metrics", None, None),
        ("/v1x", None, None),
    ],
)
def test_bearer_auth_guards_every_v1_path(path: str, header: bytes | None, refused: str | None):
    authorize = BearerAuth([TOKEN, "other-token"])
    error = authorize(scope(path, header))
    if refused is None:
        assert error is None
    else:
        assert error is not None and error.status == 401 and error.type == "unauthorized"
        assert refused in error.message
        assert error.headers == {"WWW-Authenticate": "Bearer"}
        assert TOKEN not in error.message


async def test_auth_through_the_app(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATD_TEST_TOKENS", TOKEN)
    async with app_client(settings(auth_tokens_env="CHATD_TEST_TOKENS")) as client:
        refused = await client.post("/v1/chat", json=chat_body())
        allowed = await client.post(
            "/v1/chat", json=chat_body(), headers={"Authorization": f"Bearer {TOKEN}"}
        )
        health = await client.get("/health")
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "unauthorized"
    assert refused.headers["x-request-id"]
    assert allowed.status_code == 200
    assert health.status_code == 200


# -- the request log line ------------------------------------------------------------------


def test_request_line_holds_facts_never_content() -> None:
    request_scope = {
        "method": "POST",
        "path": "/v1/chat",
        "headers": [(b"authorization", b"Bearer " + TOKEN.encode())],
        "state": {
            "request_id": "req-1",
            "log": {
                "model": "hot",
                "provider": "mock",
                "upstream_model": "echo",
                "input_tokens": 3,
                "output_tokens": 2,
                "attempts": 1,
                "messages": SECRET_CONTENT,  # a fact no route should note: still not logged
            },
        },
    }
    line = request_line(request_scope, 200, 0.0123)
    assert line == {
        "request_id": "req-1",
        "method": "POST",
        "route": "/v1/chat",
        "status": 200,
        "latency_ms": 12.3,
        "model": "hot",
        "provider": "mock",
        "upstream_model": "echo",
        "input_tokens": 3,
        "output_tokens": 2,
        "ttft_ms": None,
        "attempts": 1,
        "error": None,
    }
    assert SECRET_CONTENT not in repr(line) and TOKEN not in repr(line)


def test_request_line_clips_a_huge_model_name() -> None:
    line = request_line({"path": "/v1/chat", "state": {"log": {"model": "m" * 60_000}}}, 200, 0)
    assert len(line["model"]) <= 200


def record_for(line: dict[str, Any]) -> logging.LogRecord:
    captured: list[logging.LogRecord] = []
    logger = logging.getLogger("chatd.test-requests")
    logger.propagate = False
    handler = logging.Handler()
    handler.emit = captured.append  # type: ignore[method-assign]
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    log_request(logger, line)
    return captured[0]


def test_json_format_is_one_object_per_line_with_a_utc_time() -> None:
    line = request_line({"method": "GET", "path": "/health", "state": {}}, 200, 0.001)
    text = JsonFormatter().format(record_for(line))
    assert "\n" not in text
    parsed = orjson.loads(text)
    assert parsed["time"].endswith("Z") and parsed["status"] == 200
    assert {k: v for k, v in parsed.items() if k != "time"} == line


def test_json_format_of_other_lines_keeps_level_and_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("chatd", logging.ERROR, "", 0, "bad %s", ("x",), sys.exc_info())
    parsed = orjson.loads(JsonFormatter().format(record))
    assert parsed["level"] == "error" and parsed["message"] == "bad x"
    assert "ValueError: boom" in parsed["traceback"]


def test_text_format_reads_as_one_line() -> None:
    line = request_line(
        {"method": "POST", "path": "/v1/chat", "state": {"request_id": "r9", "log": {}}}, 502, 0.5
    )
    text = TextFormatter().format(record_for(line))
    assert " POST /v1/chat 502 500.0ms request_id=r9" in text and "\n" not in text


# -- metrics and counters ---------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_policy_events() -> None:
    metrics = Metrics(["mock"], multiprocess=False)
    metrics.request_finished("/v1/chat", "mock", 200, 0.02, None, 3, 2)
    metrics.request_finished("/v1/chat", "mock", 200, 0.03, 7, 1, 1)
    metrics.request_finished("/health", "none", 200, 0.001)
    metrics.retried("mock")
    metrics.fell_back()
    metrics.cooled_down("mock")
    metrics.upstream_call("mock", 0.01)
    metrics.busy("mock", 3)
    assert metrics.registry is not None
    text = generate_latest(metrics.registry).decode()
    assert value(text, "chatd_requests_total", route="/v1/chat", provider="mock", status="200") == 2
    assert value(text, "chatd_requests_total", route="/health", provider="none", status="200") == 1
    assert value(text, "chatd_request_duration_seconds_count", provider="mock") == 2
    assert value(text, "chatd_request_duration_seconds_count", provider="none") == 0
    assert value(text, "chatd_stream_ttft_seconds_count", provider="mock") == 1
    assert value(text, "chatd_tokens_total", provider="mock", direction="in") == 4
    assert value(text, "chatd_tokens_total", provider="mock", direction="out") == 3
    assert value(text, "chatd_retries_total", provider="mock") == 1
    assert value(text, "chatd_fallbacks_total") == 1
    assert value(text, "chatd_cooldowns_total", provider="mock") == 1
    assert value(text, "chatd_upstream_duration_seconds_count", provider="mock") == 1
    assert value(text, "chatd_in_flight_requests", provider="mock") == 3


def test_two_apps_in_one_process_keep_their_own_counts() -> None:
    first, second = Metrics(multiprocess=False), Metrics(multiprocess=False)
    first.request_finished("/v1/chat", "mock", 200, 0.01)
    assert second.registry is not None
    text = generate_latest(second.registry).decode()
    assert value(text, "chatd_requests_total", route="/v1/chat", provider="mock", status="200") == 0


def test_provider_stats_median_over_a_window() -> None:
    stats = ProviderStats()
    assert stats.describe("p") == {"requests": 0, "errors": 0, "p50_latency_ms": None}
    for ms, failed in [(10, False), (30, True), (20, False)]:
        stats.record("p", ms, failed)
    assert stats.describe("p") == {"requests": 3, "errors": 1, "p50_latency_ms": 20}
    for _ in range(ProviderStats.WINDOW):
        stats.record("p", 500, False)
    assert stats.describe("p")["p50_latency_ms"] == 500  # old samples fell out


def test_breaker_and_limiter_report_to_their_observers() -> None:
    trips: list[int] = []
    breaker = Breaker("p", failures=2, cooldown=30, on_trip=lambda: trips.append(1))
    breaker.failed()
    assert trips == []
    breaker.failed()
    assert trips == [1]


async def test_limiter_reports_busy_slots_even_when_unlimited() -> None:
    seen: list[int] = []
    limiter = Limiter("p", max_concurrency=0, queue_timeout=0, on_busy=seen.append)
    await limiter.acquire()
    await limiter.acquire()
    limiter.release()
    limiter.release()
    assert seen == [1, 2, 1, 0]


async def test_metrics_route_moves_with_requests(app_client: Callable[..., Any]) -> None:
    async with app_client(settings()) as client:
        before = (await client.get("/metrics")).text
        for _ in range(3):
            assert (await client.post("/v1/chat", json=chat_body())).status_code == 200
        assert (await client.post("/v1/chat", json={"model": ""})).status_code == 400
        after = await client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    labels = {"route": "/v1/chat", "provider": "mock", "status": "200"}
    assert value(before, "chatd_requests_total", **labels) == 0
    assert value(after.text, "chatd_requests_total", **labels) == 3
    bad = {"route": "/v1/chat", "provider": "none", "status": "400"}
    assert value(after.text, "chatd_requests_total", **bad) == 1
    assert value(after.text, "chatd_tokens_total", provider="mock", direction="in") == 9
    assert value(after.text, "chatd_upstream_duration_seconds_count", provider="mock") == 3


async def test_providers_listing_adds_counters(app_client: Callable[..., Any]) -> None:
    dead = {"kind": "ollama", "base_url": "http://127.0.0.1:9", "max_retries": 0}
    providers = {"spare": {"kind": "mock"}, "dead": dead}
    async with app_client(settings(providers=providers)) as client:
        for _ in range(4):
            assert (await client.post("/v1/chat", json=chat_body())).status_code == 200
        failed = await client.post("/v1/chat", json=chat_body(model="dead/x"))
        listing = (await client.get("/v1/chat/providers")).json()
    assert failed.status_code == 502
    entries = {p["name"]: p for p in listing["providers"]}
    assert entries["mock"]["requests"] == 4 and entries["mock"]["errors"] == 0
    assert isinstance(entries["mock"]["p50_latency_ms"], int)
    assert entries["dead"]["requests"] == 1 and entries["dead"]["errors"] == 1
    assert entries["spare"] == {
        "name": "spare",
        "kind": "mock",
        "base_url": "",
        "available": True,
        "requests": 0,
        "errors": 0,
        "p50_latency_ms": None,
    }


async def test_ready_is_503_envelope_without_the_default_provider(
    app_client: Callable[..., Any],
) -> None:
    async with app_client(settings(default_provider="ollama")) as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["type"] == error["code"] == "not_ready"
    assert "ollama" in error["message"]


async def test_ready_with_probe_reports_each_provider(app_client: Callable[..., Any]) -> None:
    dead = {"kind": "ollama", "base_url": "http://127.0.0.1:9"}
    async with app_client(settings(providers={"dead": dead})) as client:
        plain = await client.get("/ready")
        probed = await client.get("/ready", params={"probe": "1"})
    assert plain.status_code == 200
    config = plain.json().pop("config")  # the configuration in force (docs/reload.md)
    assert plain.json() == {"status": "ready", "default": "mock", "config": config}
    assert config["generation"] == 1 and set(config) == {"generation", "loaded_at", "sha256"}
    body = probed.json()
    assert probed.status_code == 200
    assert body["providers"]["mock"]["reachable"] is True
    assert body["providers"]["dead"]["reachable"] is False
    assert body["providers"]["dead"]["error"] == "connection failed"


def test_the_server_log_never_gets_the_upstream_body() -> None:
    from chatd.errors import UpstreamError

    error = UpstreamError("openrouter", "", upstream_status=500, body="echo: my secret prompt")
    assert "my secret prompt" in error.message  # the caller sees the quote
    assert "my secret prompt" not in error.summary  # the 5xx warning logs only this
    assert error.summary == "openrouter: upstream answered 500"
