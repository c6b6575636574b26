"""Operations (docs/operations.md) against real chatd processes: /metrics (one process and
`--workers 2`), the one JSON log line per request, /ready with and without probes,
`chatd check-config`, and inbound bearer auth."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, clean_env, provider_toml

SECRET_CONTENT = "zebra-quartz-content-7731"  # must never reach the log
PLANTED_KEY = "sk-or-planted-ops-key-5150"
TOKENS = ("tok-alpha-0123456789", "tok-bravo-9876543210")
LOG_FIELDS = {
    "time", "request_id", "method", "route", "status", "latency_ms", "model", "provider",
    "upstream_model", "input_tokens", "output_tokens", "ttft_ms", "attempts", "error",
}  # fmt: skip
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


def config_for(fake: FakeUpstream) -> str:
    return (
        """
[models]
tier = ["nowhere:cloud", "mock/echo"]

[chatd]
default_provider = "mock"
timeout_secs = 10
"""
        + provider_toml("mock", "mock")
        + provider_toml("ollama", "ollama", fake.url, cooldown_failures=0)
        + provider_toml(
            "cooling", "ollama", fake.url, max_retries=0, cooldown_failures=2, cooldown_secs=60
        )
        + provider_toml("openrouter", "openai", fake.url + "/v1", cooldown_failures=0)
        + provider_toml("dead", "ollama", DEAD, max_retries=0, cooldown_failures=0)
    )


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    env = {"OPENROUTER_API_KEY": PLANTED_KEY}
    with ChatdProcess(config_for(fake), tmp_path_factory.mktemp("ops"), env=env) as process:
        yield process


def chat(
    chatd: ChatdProcess,
    model: str = "mock/echo",
    content: str = "one two three",
    *,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": content}], **body}
    return httpx.post(f"{chatd.url}/v1/chat", json=payload, headers=headers, timeout=30)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


def log_lines(process: ChatdProcess) -> list[dict[str, Any]]:
    """The JSON objects chatd wrote to stderr (uvicorn's own start-up lines are text)."""
    lines = []
    for raw in process.log().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


def request_lines(process: ChatdProcess, request_id: str, timeout: float = 5.0) -> list[dict]:
    """The log lines of one request; waits for the first (written as the response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in log_lines(process) if line.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# -- /metrics -------------------------------------------------------------------------------------


def test_metrics_move_as_requests_are_made(chatd: ChatdProcess, fake: FakeUpstream) -> None:
    fake.reset()
    before = scrape(chatd.url)
    for _ in range(5):
        assert chat(chatd).status_code == 200  # 3 words in, 3 out
    streamed = chat(chatd, content="a streamed answer", stream=True)
    assert streamed.status_code == 200 and '"done":true' in streamed.text
    assert chat(chatd, "ollama/flaky-1").status_code == 200  # one 503, one retry
    assert chat(chatd, "tier").status_code == 200  # nowhere:cloud → falls back to mock
    assert chat(chatd, "cooling/fail-500").status_code == 502
    assert chat(chatd, "cooling/fail-500").status_code == 502  # second failure: cooldown
    assert chat(chatd, "cooling/fail-500").status_code == 503  # skipped while cooling
    assert chat(chatd, model="").status_code == 400
    after = scrape(chatd.url)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    ok = {"route": "/v1/chat", "provider": "mock", "status": "200"}
    assert moved("chatd_requests_total", **ok) == 7  # 5 + the stream + the fallback
    assert moved("chatd_requests_total", route="/v1/chat", provider="ollama", status="200") == 1
    assert moved("chatd_requests_total", route="/v1/chat", provider="cooling", status="502") == 2
    assert moved("chatd_requests_total", route="/v1/chat", provider="cooling", status="503") == 1
    assert moved("chatd_requests_total", route="/v1/chat", provider="none", status="400") == 1
    assert moved("chatd_request_duration_seconds_count", provider="mock") == 7
    assert moved("chatd_tokens_total", provider="mock", direction="in") == 5 * 3 + 3 + 3
    assert moved("chatd_tokens_total", provider="mock", direction="out") == 5 * 3 + 3 + 3
    assert moved("chatd_stream_ttft_seconds_count", provider="mock") == 1
    assert moved("chatd_upstream_duration_seconds_count", provider="ollama") == 2
    assert moved("chatd_upstream_duration_seconds_count", provider="cooling") == 2
    assert moved("chatd_retries_total", provider="ollama") == 1
    assert moved("chatd_fallbacks_total") == 1
    assert moved("chatd_cooldowns_total", provider="cooling") == 1
    assert metric(after, "chatd_in_flight_requests", provider="mock") == 0


def test_in_flight_gauge_counts_a_call_while_it_runs(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    fake.reset()
    slow = threading.Thread(target=chat, args=(chatd, "ollama/slow-1500"))
    slow.start()
    try:
        assert fake.wait_for(lambda: fake.calls_to("/api/chat")), "the slow call never started"
        during = scrape(chatd.url)
    finally:
        slow.join()
    assert metric(during, "chatd_in_flight_requests", provider="ollama") == 1
    assert metric(scrape(chatd.url), "chatd_in_flight_requests", provider="ollama") == 0


def test_metrics_are_summed_across_workers(tmp_path: Path) -> None:
    config = '[chatd]\ndefault_provider = "mock"\n' + provider_toml("mock", "mock", latency_ms=20)
    process = ChatdProcess(config, tmp_path, args=("--workers", "2")).start(timeout=45)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: chat(process, content=f"w{i} x"), range(20)))
        assert [a.status_code for a in answers] == [200] * 20
        ok = {"route": "/v1/chat", "provider": "mock", "status": "200"}
        # Each scrape is answered by whichever worker accepts it: every one has the total.
        for _ in range(8):
            scraped = scrape(process.url)
            assert metric(scraped, "chatd_requests_total", **ok) == 20
            assert metric(scraped, "chatd_tokens_total", provider="mock", direction="in") == 40
            assert metric(scraped, "chatd_request_duration_seconds_count", provider="mock") == 20
            assert metric(scraped, "chatd_in_flight_requests", provider="mock") == 0
        chats = [line for line in log_lines(process) if line.get("route") == "/v1/chat"]
        assert len(chats) == 20  # the workers log too, and in JSON
    finally:
        assert process.stop() == 0
    assert "Traceback" not in process.log()


# -- the request log ------------------------------------------------------------------------------


def test_every_request_has_exactly_one_json_log_line(chatd: ChatdProcess) -> None:
    def rid(name: str) -> dict[str, str]:
        return {"X-Request-ID": f"ops-log-{name}-{time.monotonic_ns()}"}

    ids = {name: rid(name) for name in ("ok", "stream", "bad", "missing", "upstream", "health")}
    assert chat(chatd, content=SECRET_CONTENT, headers=ids["ok"]).status_code == 200
    streamed = chat(chatd, content=f"{SECRET_CONTENT} streamed", headers=ids["stream"], stream=True)
    assert SECRET_CONTENT in streamed.text
    assert chat(chatd, content=SECRET_CONTENT, headers=ids["bad"], temperature=9).status_code == 400
    missing = httpx.get(f"{chatd.url}/v1/nothing", headers=ids["missing"])
    assert missing.status_code == 404
    failed = chat(chatd, "openrouter/fail-400", SECRET_CONTENT, headers=ids["upstream"])
    assert failed.status_code == 502
    assert httpx.get(f"{chatd.url}/health", headers=ids["health"]).status_code == 200

    lines = {}
    for name, header in ids.items():
        found = request_lines(chatd, header["X-Request-ID"])
        assert len(found) == 1, (name, found)
        assert set(found[0]) == LOG_FIELDS, found[0]
        lines[name] = found[0]

    ok = lines["ok"]
    assert (ok["route"], ok["status"], ok["provider"], ok["model"]) == (
        "/v1/chat", 200, "mock", "mock/echo"
    )  # fmt: skip
    assert ok["upstream_model"] == "echo" and ok["attempts"] == 1 and ok["error"] is None
    assert ok["input_tokens"] == 1 and ok["output_tokens"] == 1
    assert isinstance(ok["latency_ms"], int | float) and ok["time"].endswith("Z")
    stream = lines["stream"]
    assert stream["status"] == 200 and stream["provider"] == "mock" and stream["error"] is None
    assert isinstance(stream["ttft_ms"], int) and stream["output_tokens"] == 2
    assert lines["bad"]["status"] == 400 and lines["bad"]["error"] == "invalid_request"
    assert lines["missing"]["status"] == 404 and lines["missing"]["error"] == "not_found"
    upstream = lines["upstream"]
    assert (upstream["status"], upstream["error"], upstream["provider"]) == (
        502, "upstream_error", "openrouter"
    )  # fmt: skip
    assert upstream["attempts"] == 1
    assert lines["health"]["route"] == "/health" and lines["health"]["provider"] is None

    log = chatd.log()
    assert SECRET_CONTENT not in log
    assert PLANTED_KEY not in log and PLANTED_KEY[:12] not in log


def test_text_log_format_is_one_readable_line(tmp_path: Path) -> None:
    config = '[chatd]\ndefault_provider = "mock"\n' + provider_toml("mock", "mock")
    with ChatdProcess(config, tmp_path, args=("--log-format", "text")) as process:
        response = chat(process, content=SECRET_CONTENT, headers={"X-Request-ID": "text-line-1"})
        assert response.status_code == 200
        deadline = time.monotonic() + 5
        while "request_id=text-line-1" not in process.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    found = [line for line in process.log().splitlines() if "request_id=text-line-1" in line]
    assert len(found) == 1
    assert " POST /v1/chat 200 " in found[0] and "provider=mock" in found[0]
    assert SECRET_CONTENT not in process.log()


# -- /ready ---------------------------------------------------------------------------------------


def test_ready_when_the_default_provider_is_registered(chatd: ChatdProcess) -> None:
    response = httpx.get(f"{chatd.url}/ready")
    assert response.status_code == 200
    config = response.json()["config"]  # the configuration in force (docs/reload.md)
    assert response.json() == {"status": "ready", "default": "mock", "config": config}
    assert config["generation"] == 1 and len(config["sha256"]) == 64


def test_ready_probe_reports_each_provider(chatd: ChatdProcess, fake: FakeUpstream) -> None:
    fake.reset()
    response = httpx.get(f"{chatd.url}/ready", params={"probe": "1"}, timeout=10)
    assert response.status_code == 200
    providers = response.json()["providers"]
    assert set(providers) == {"mock", "ollama", "cooling", "openrouter", "dead"}
    assert providers["mock"]["reachable"] is True
    assert providers["ollama"]["reachable"] is True
    assert providers["ollama"]["upstream_status"] == 200
    assert providers["openrouter"]["upstream_status"] == 200
    assert providers["dead"]["reachable"] is False
    assert providers["dead"]["error"] == "connection failed"
    assert {c.path for c in fake.calls} >= {"/api/tags", "/v1/models"}
    assert fake.calls_to("/v1/models")[-1].headers["authorization"] == f"Bearer {PLANTED_KEY}"
    assert PLANTED_KEY not in response.text


def test_not_ready_without_the_default_provider(tmp_path: Path) -> None:
    config = (
        '[chatd]\ndefault_provider = "ollama"\n'
        + provider_toml("ollama", "ollama", enabled=False)
        + provider_toml("mock", "mock")
    )
    with ChatdProcess(config, tmp_path) as process:
        response = httpx.get(f"{process.url}/ready")
        probed = httpx.get(f"{process.url}/ready", params={"probe": "1"})
        health = httpx.get(f"{process.url}/health")
    assert response.status_code == 503 and probed.status_code == 503
    error = response.json()["error"]
    assert error["type"] == error["code"] == "not_ready"
    assert "ollama" in error["message"] and "param" in error
    assert health.status_code == 200  # alive, just not ready


# -- chatd check-config ----------------------------------------------------------------------------


def check_config(tmp_path: Path, config: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "lakehouse.toml"
    path.write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "chatd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(**env),
    )


def test_check_config_prints_the_resolved_config_with_keys_as_set_or_unset(
    tmp_path: Path,
) -> None:
    config = (
        '[models]\nhot = "mock/echo"\n\n[chatd]\nauth_tokens_env = "INBOUND_TOKENS"\n'
        + provider_toml("mock", "mock")
        + provider_toml("kimi", "openai", "https://api.kimi.com/coding/v1", key_file="")
    )
    proc = check_config(
        tmp_path, config, OPENROUTER_API_KEY=PLANTED_KEY, INBOUND_TOKENS=",".join(TOKENS)
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "OPENROUTER_API_KEY set" in out and "KIMI_API_KEY unset" in out
    assert "hot = mock/echo" in out
    assert "auth: bearer tokens from INBOUND_TOKENS (set)" in out
    assert "mock: kind=mock" in out and "registered=yes" in out
    for secret in (PLANTED_KEY, PLANTED_KEY[:12], *TOKENS):
        assert secret not in out + proc.stderr


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ('[chatd.providers.x]\nkind = "carrier-pigeon"\n', "chatd.providers.x.kind"),
        ("[chatd\nbind = 1", "malformed TOML"),
        ('[chatd]\ndefault_provider = "nope"\n', "chatd.default_provider"),
        ('[chatd]\nbind = "no-port"\n', "chatd.bind"),
        ('[chatd]\nauth_tokens_env = "INBOUND_TOKENS_UNSET"\n', "chatd.auth_tokens_env"),
    ],
)
def test_check_config_exits_non_zero_on_a_bad_config(
    tmp_path: Path, config: str, names: str
) -> None:
    proc = check_config(tmp_path, config, OPENROUTER_API_KEY=PLANTED_KEY)
    assert proc.returncode != 0
    assert names in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and PLANTED_KEY not in proc.stdout + proc.stderr


# -- inbound auth ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        '[chatd]\ndefault_provider = "mock"\nauth_tokens_env = "INBOUND_TOKENS"\n'
        + provider_toml("mock", "mock")
    )
    env = {"INBOUND_TOKENS": " , ".join(TOKENS)}
    with ChatdProcess(config, tmp_path_factory.mktemp("auth"), env=env) as process:
        yield process


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {TOKENS[0]}", "Bearer", f"Bearer {TOKENS[0]}x"],
)
def test_auth_refuses_a_missing_or_wrong_token(
    guarded: ChatdProcess, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = chat(guarded, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert error["type"] == error["code"] == "unauthorized"
    assert error["param"] is None and error["message"]


@pytest.mark.parametrize("token", TOKENS)
def test_auth_accepts_each_configured_token(guarded: ChatdProcess, token: str) -> None:
    response = chat(guarded, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    listing = httpx.get(
        f"{guarded.url}/v1/chat/providers", headers={"Authorization": f"Bearer {token}"}
    )
    assert listing.status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/providers"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
     ("GET", "/v1/not-a-route-yet")],
)  # fmt: skip
def test_auth_covers_every_v1_route(guarded: ChatdProcess, method: str, path: str) -> None:
    response = httpx.request(method, f"{guarded.url}{path}", json={})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "unauthorized"


def test_health_ready_and_metrics_stay_open(guarded: ChatdProcess) -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{guarded.url}{path}").status_code == 200, path


def test_refused_requests_are_logged_without_the_token(guarded: ChatdProcess) -> None:
    headers = {"Authorization": f"Bearer {TOKENS[1]}-wrong", "X-Request-ID": "auth-refused-1"}
    assert chat(guarded, headers=headers).status_code == 401
    [line] = request_lines(guarded, "auth-refused-1")
    assert line["status"] == 401 and line["error"] == "unauthorized"
    assert line["route"] == "/v1/chat"
    scraped = scrape(guarded.url)
    refused = {"route": "/v1/chat", "provider": "none", "status": "401"}
    assert metric(scraped, "chatd_requests_total", **refused) >= 1
    log = guarded.log()
    for token in TOKENS:
        assert token not in log
