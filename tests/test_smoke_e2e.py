"""End to end: a real chatd process, a real fake Ollama, and scripts/chatd_smoke.sh."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.support import REPO, ChatdProcess, clean_env, provider_toml

PLANTED_KEY = "sk-planted-never-print-me-4242"


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        '[models]\nhot = "qwen3.5:latest"\n\n[chatd]\ntimeout_secs = 10\n\n'
        + provider_toml("ollama", "ollama", fake.url)
        # a keyed provider registered by its key: the key must never be printed anywhere
        + provider_toml("openrouter", "openai", fake.url + "/v1")
    )
    env = {"OPENROUTER_API_KEY": PLANTED_KEY}
    with ChatdProcess(config, tmp_path_factory.mktemp("smoke"), env=env) as proc:
        yield proc


def run_smoke(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "chatd_smoke.sh"), url],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(**env),
    )


def test_smoke_script_passes_6_of_6(chatd: ChatdProcess, fake: FakeUpstream) -> None:
    fake.reset()
    proc = run_smoke(chatd.url, CHATD_SMOKE_PROVIDERS="ollama,openrouter")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "6/6 PASS", proc.stdout
    assert sum(line.startswith("PASS ") for line in lines) == 6
    # check 3 reached the upstream with the prefix stripped; check 5 unrewritten
    models = [c.json["model"] for c in fake.calls_to("/api/chat")]
    assert "qwen3.5:latest" in models
    assert "ollama/qwen3.5:latest" not in models
    assert "unknown/qwen3.5:latest" in models


def test_smoke_script_reports_failures_and_exits_nonzero(chatd: ChatdProcess) -> None:
    # expecting a provider that is not registered makes check 1 fail
    proc = run_smoke(chatd.url, CHATD_SMOKE_PROVIDERS="ollama")
    assert proc.returncode != 0
    assert proc.stdout.strip().splitlines()[-1] == "5/6 PASS"
    assert "FAIL 1." in proc.stdout


def test_smoke_script_against_nothing_fails_cleanly() -> None:
    proc = run_smoke("http://127.0.0.1:9")
    assert proc.returncode != 0
    assert proc.stdout.strip().splitlines()[-1] == "0/6 PASS"


def test_real_process_answers_through_fake_ollama(chatd: ChatdProcess) -> None:
    response = httpx.post(
        chatd.url + "/v1/chat",
        json={"model": "hot", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-ID": "e2e-1"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["provider"] == "ollama" and body["model"] == "qwen3.5:latest"
    assert body["content"] and body["input_tokens"] > 0 and body["output_tokens"] > 0
    assert response.headers["x-request-id"] == "e2e-1"


def test_openai_kind_sends_the_key_upstream_but_never_prints_it(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    response = httpx.post(
        chatd.url + "/v1/chat",
        json={"model": "openrouter/vendor/model", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 200, response.text
    call = fake.calls_to("/v1/chat/completions")[-1]
    assert call.json["model"] == "vendor/model"
    assert call.headers["authorization"] == f"Bearer {PLANTED_KEY}"
    # an upstream failure on the keyed provider: the error body must not carry the key
    failed = httpx.post(
        chatd.url + "/v1/chat",
        json={"model": "openrouter/fail-500", "messages": [{"role": "user", "content": "x"}]},
    )
    assert failed.status_code == 502
    listing = httpx.get(chatd.url + "/v1/chat/providers")
    for text in (response.text, failed.text, listing.text, chatd.log()):
        assert PLANTED_KEY not in text
        assert PLANTED_KEY[:12] not in text


def test_check_config_shows_keys_only_as_set(tmp_path: Path) -> None:
    path = tmp_path / "lakehouse.toml"
    path.write_text(provider_toml("ollama", "ollama", "http://127.0.0.1:9"))
    proc = subprocess.run(
        [sys.executable, "-m", "chatd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_env(OPENROUTER_API_KEY=PLANTED_KEY),
    )
    assert proc.returncode == 0, proc.stderr
    assert "OPENROUTER_API_KEY set" in proc.stdout
    assert PLANTED_KEY not in proc.stdout + proc.stderr
    assert json.dumps(PLANTED_KEY)[1:-1] not in proc.stdout
