"""Fault injection (docs/routing.md): a real chatd process against real fake upstreams.

Each test counts the calls that reached the fake, so "retried", "not retried" and
"skipped" are observed on the wire, not inferred from chatd's answer.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml

USER = [{"role": "user", "content": "hi"}]


def config_for(fake: FakeUpstream) -> str:
    return (
        """
[models]
tier = ["primary/fail-503", "backup/ok"]
cool_tier = ["cooling/fail-500", "backup/ok"]
dead_tier = ["absent:cloud", "primary/fail-400", "backup/ok"]

[chatd]
timeout_secs = 10
"""
        + provider_toml("ollama", "ollama", fake.url, cooldown_failures=0)
        + provider_toml("primary", "ollama", fake.url, max_retries=1, cooldown_failures=0)
        + provider_toml("backup", "openai", fake.url + "/v1", cooldown_failures=0)
        + provider_toml("hangy", "ollama", fake.url, timeout_secs=0.5, cooldown_failures=0)
        + provider_toml("narrow", "ollama", fake.url, max_concurrency=1, queue_timeout_secs=0.2)
        + provider_toml(
            "cooling", "ollama", fake.url, max_retries=0, cooldown_failures=2, cooldown_secs=30
        )
        + provider_toml("capped", "ollama", fake.url, max_retry_after_secs=5, cooldown_failures=0)
        + provider_toml("patient", "ollama", fake.url, max_retries=5, cooldown_failures=0)
    )


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    with ChatdProcess(config_for(fake), tmp_path_factory.mktemp("resilience")) as process:
        yield process


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeUpstream) -> None:
    fake.reset()


def chat(
    chatd: ChatdProcess, model: str, *, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload = {"model": model, "messages": USER, **body}
    return httpx.post(f"{chatd.url}/v1/chat", json=payload, headers=headers, timeout=30)


def calls(fake: FakeUpstream, model: str) -> int:
    return sum(1 for c in fake.calls if (c.json or {}).get("model") == model)


def error_type(response: httpx.Response) -> str:
    return str(response.json()["error"]["type"])


# -- retries ------------------------------------------------------------------------


def test_flaky_upstream_is_retried_until_it_answers(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "flaky-2")  # two 503s, then an answer; max_retries = 2
    assert response.status_code == 200, response.text
    assert calls(fake, "flaky-2") == 3
    assert response.headers["X-Chatd-Attempts"] == "3"
    assert response.json()["provider"] == "ollama"


def test_retries_give_up_after_max_retries(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "primary/fail-500")  # max_retries = 1
    assert response.status_code == 502
    assert response.json()["error"]["upstream_status"] == 500
    assert calls(fake, "fail-500") == 2
    assert response.headers["X-Chatd-Attempts"] == "2"


def test_a_400_from_upstream_is_not_retried(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "fail-400")
    assert response.status_code == 502
    assert response.json()["error"]["upstream_status"] == 400
    assert calls(fake, "fail-400") == 1


@pytest.mark.parametrize("model", ["badjson", "nochoices"])
def test_bad_answers_are_not_retried(chatd: ChatdProcess, fake: FakeUpstream, model: str):
    response = chat(chatd, "backup/" + model)
    assert response.status_code == 502
    assert error_type(response) == "upstream_error"
    assert calls(fake, model) == 1


def test_a_read_timeout_is_not_retried(chatd: ChatdProcess, fake: FakeUpstream):
    started = time.monotonic()
    response = chat(chatd, "hangy/hang-3000")  # timeout_secs = 0.5, max_retries = 2
    assert response.status_code == 504, response.text
    assert error_type(response) == "upstream_timeout"
    assert time.monotonic() - started < 2
    assert calls(fake, "hang-3000") == 1


def test_a_reset_connection_is_retried(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "primary/reset")
    assert response.status_code == 502
    assert response.json()["error"].get("upstream_status") is None
    assert calls(fake, "reset") == 2


def test_retry_after_is_honoured(chatd: ChatdProcess, fake: FakeUpstream):
    started = time.monotonic()
    response = chat(chatd, "primary/fail-429")  # Retry-After: 1, max_retries = 1
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    assert response.json()["error"]["upstream_status"] == 429
    assert response.headers["Retry-After"] == "1"
    assert calls(fake, "fail-429") == 2
    assert elapsed >= 1.0


def test_retry_after_beyond_the_cap_is_passed_on_without_retrying(
    chatd: ChatdProcess, fake: FakeUpstream
):
    response = chat(chatd, "capped/retryafter-60")  # max_retry_after_secs = 5
    assert response.status_code == 502
    assert response.headers["Retry-After"] == "60"
    assert calls(fake, "retryafter-60") == 1


# -- fallbacks ------------------------------------------------------------------------


def test_fallback_serves_from_the_next_target(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "tier")  # primary/fail-503 (1 retry) then backup/ok
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["provider"], body["model"]) == ("backup", "ok")
    assert response.headers["X-Chatd-Attempts"] == "3"
    assert calls(fake, "fail-503") == 2
    assert calls(fake, "ok") == 1


def test_fallback_stops_at_a_400(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "dead_tier")  # absent:cloud (404), primary/fail-400, backup/ok
    assert response.status_code == 502
    assert response.json()["error"]["upstream_status"] == 400
    assert response.headers["X-Chatd-Attempts"] == "1"
    assert calls(fake, "ok") == 0


def test_fallback_applies_to_streams_before_the_first_event(
    chatd: ChatdProcess, fake: FakeUpstream
):
    response = chat(chatd, "tier", stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["X-Chatd-Attempts"] == "3"
    assert '"provider":"backup"' in response.text
    assert response.text.rstrip().splitlines()[-1].startswith('data: {"done":true')


def test_stream_is_retried_before_its_first_event(chatd: ChatdProcess, fake: FakeUpstream):
    response = chat(chatd, "flaky-1", stream=True)
    assert response.status_code == 200, response.text
    assert response.headers["X-Chatd-Attempts"] == "2"
    assert calls(fake, "flaky-1") == 2


def test_a_stream_that_breaks_after_its_first_event_is_not_retried(
    chatd: ChatdProcess, fake: FakeUpstream
):
    response = chat(chatd, "break", stream=True)
    assert response.status_code == 200
    last = response.text.rstrip().splitlines()[-1]
    assert last.startswith('data: {"error":'), response.text
    assert calls(fake, "break") == 1


# -- limits and cooldown --------------------------------------------------------------


def test_overloaded_provider_answers_503_with_retry_after(chatd: ChatdProcess, fake: FakeUpstream):
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(chat, chatd, "narrow/slow-1000")
        time.sleep(0.2)
        started = time.monotonic()
        second = chat(chatd, "narrow/slow-1000")
        waited = time.monotonic() - started
        assert first.result().status_code == 200
    assert second.status_code == 503, second.text
    assert error_type(second) == "provider_overloaded"
    assert int(second.headers["Retry-After"]) >= 1
    assert 0.15 <= waited < 0.8
    assert calls(fake, "slow-1000") == 1


def test_cooldown_answers_fast_503_and_fallbacks_move_past(chatd: ChatdProcess, fake: FakeUpstream):
    for _ in range(2):  # cooldown_failures = 2
        assert chat(chatd, "cooling/fail-500").status_code == 502
    started = time.monotonic()
    response = chat(chatd, "cooling/fail-500")
    assert time.monotonic() - started < 0.3
    assert response.status_code == 503
    assert error_type(response) == "provider_cooling_down"
    assert 1 <= int(response.headers["Retry-After"]) <= 30
    assert calls(fake, "fail-500") == 2

    served = chat(chatd, "cool_tier")
    assert served.status_code == 200
    assert served.json()["provider"] == "backup"
    assert served.headers["X-Chatd-Attempts"] == "1"
    assert calls(fake, "fail-500") == 2


# -- one deadline per request ---------------------------------------------------------


def test_caller_timeout_header_lowers_the_deadline(chatd: ChatdProcess, fake: FakeUpstream):
    started = time.monotonic()
    response = chat(chatd, "slow-3000", headers={"X-Chatd-Timeout-Ms": "300"})
    assert response.status_code == 504
    assert error_type(response) == "upstream_timeout"
    assert 0.25 <= time.monotonic() - started < 1.5


def test_retries_stop_when_the_next_wait_would_pass_the_deadline(
    chatd: ChatdProcess, fake: FakeUpstream
):
    started = time.monotonic()
    # Retry-After: 1 each time, max_retries = 5, but only 1.5 s of budget: two calls.
    response = chat(chatd, "patient/fail-503", headers={"X-Chatd-Timeout-Ms": "1500"})
    assert time.monotonic() - started < 1.5
    assert response.status_code == 502
    assert calls(fake, "fail-503") == 2
    assert response.headers["X-Chatd-Attempts"] == "2"


@pytest.mark.parametrize("value", ["0", "-1", "soon", "1.5"])
def test_invalid_timeout_header_is_400(chatd: ChatdProcess, value: str):
    response = chat(chatd, "ok", headers={"X-Chatd-Timeout-Ms": value})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "X-Chatd-Timeout-Ms"


# -- graceful shutdown ----------------------------------------------------------------


def test_sigterm_drains_in_flight_requests_and_streams_then_exits_0(
    fake: FakeUpstream, tmp_path: Path
):
    config = "[chatd]\nshutdown_grace_secs = 10\n" + provider_toml("ollama", "ollama", fake.url)
    process = ChatdProcess(config, tmp_path).start()
    results: dict[str, httpx.Response] = {}

    def ask(name: str, stream: bool) -> None:
        results[name] = chat(process, "slow-1500", stream=stream)

    threads = [
        threading.Thread(target=ask, args=("plain", False)),
        threading.Thread(target=ask, args=("stream", True)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.4)
    process.signal(signal.SIGTERM)
    time.sleep(0.2)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(process.url + "/health", timeout=1)
    for thread in threads:
        thread.join(10)
    assert process.proc is not None
    assert process.proc.wait(10) == 0, process.log()
    process.stop()
    assert results["plain"].status_code == 200, results["plain"].text
    assert results["stream"].status_code == 200
    assert '"done":true' in results["stream"].text
    assert "Traceback" not in process.log()
