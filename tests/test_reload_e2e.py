"""Reloading the configuration (docs/reload.md): real chatd processes, real fake upstreams.

Every test starts its own chatd on a config file in a tmp dir, rewrites the file, and
reloads it by SIGHUP, `POST /admin/reload` or `watch_config`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.support import REPO, ChatdProcess, clean_env, provider_toml

ADMIN = "admin-secret-1"
ADMIN_ENV = {"CHATD_TEST_ADMIN": ADMIN}
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
USER = [{"role": "user", "content": "hi"}]


def base(fake: FakeUpstream, extra: str = "", models: str = "") -> str:
    return (
        f"[models]\n{models}\n"
        '[chatd]\nadmin_token_env = "CHATD_TEST_ADMIN"\ntimeout_secs = 10\n'
        + extra
        + provider_toml("ollama", "ollama", fake.url)
    )


def chat(process: ChatdProcess, model: str, **more: Any) -> httpx.Response:
    body = {"model": model, "messages": USER, **more}
    return httpx.post(process.url + "/v1/chat", json=body, timeout=15)


def admin_reload(process: ChatdProcess) -> httpx.Response:
    return httpx.post(process.url + "/admin/reload", headers=HEADERS, timeout=15)


def generation(process: ChatdProcess) -> int:
    return int(httpx.get(process.url + "/ready", timeout=5).json()["config"]["generation"])


def wait_generation(process: ChatdProcess, wanted: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if generation(process) >= wanted:
            return
        time.sleep(0.05)
    raise AssertionError(f"generation {generation(process)}, wanted {wanted}: {process.log()}")


def wait_log(process: ChatdProcess, line: str, times: int, timeout: float = 10.0) -> None:
    """Until `line` is in the log `times` times (no more), or fail."""
    deadline = time.monotonic() + timeout
    while process.log().count(line) < times and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.log().count(line) == times, (line, process.log()[-2000:])


def check_config_line(path: Path) -> str:
    """What `chatd check-config` prints for the file (its one stderr line)."""
    done = subprocess.run(
        [sys.executable, "-m", "chatd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=clean_env(**ADMIN_ENV),
        cwd=REPO,
        timeout=30,
    )
    assert done.returncode == 2, done
    return done.stderr.strip()


def metric(process: ChatdProcess, name: str) -> list[tuple[str, float]]:
    text = httpx.get(process.url + "/metrics", timeout=5).text
    return [
        (labels, float(value))
        for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
    ]


def test_a_reload_adds_a_provider_and_moves_an_alias(fake: FakeUpstream, tmp_path: Path) -> None:
    config = base(fake, models='hot = "ollama/ok"')
    with ChatdProcess(config, tmp_path, env=ADMIN_ENV) as chatd:
        first = httpx.get(chatd.url + "/v1/chat/providers", timeout=5).json()
        assert first["config"]["generation"] == 1
        assert [p["name"] for p in first["providers"]] == ["ollama"]
        assert chat(chatd, "hot").json()["provider"] == "ollama"

        chatd.config_path.write_text(
            base(fake, models='hot = "extra/ok"')
            + provider_toml("extra", "openai", fake.url + "/v1")
        )
        answer = admin_reload(chatd)
        assert answer.status_code == 200, answer.text
        sha = hashlib.sha256(chatd.config_path.read_bytes()).hexdigest()
        assert answer.json()["config"]["generation"] == 2
        assert answer.json()["config"]["sha256"] == sha

        listing = httpx.get(chatd.url + "/v1/chat/providers", timeout=5).json()
        assert [p["name"] for p in listing["providers"]] == ["extra", "ollama"]
        assert listing["config"]["generation"] == 2 and listing["config"]["sha256"] == sha
        assert listing["config"]["loaded_at"].endswith("Z")
        ready = httpx.get(chatd.url + "/ready", timeout=5).json()
        assert ready["config"] == listing["config"]
        moved = chat(chatd, "hot")
        assert moved.status_code == 200 and moved.json()["provider"] == "extra"
        assert ('{outcome="ok"}', 1.0) in metric(chatd, "chatd_config_reloads_total")
        assert metric(chatd, "chatd_config_generation") == [("", 2.0)]


def test_a_rotated_key_is_used_after_the_reload_and_never_before(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    keys = tmp_path / "vendor.env"
    keys.write_text("VENDOR_KEY=key-old\n")
    vendor = provider_toml("vendor", "openai", fake.url + "/v1", key_env="VENDOR_KEY")
    vendor += f'key_file = "{keys}"\n'
    with ChatdProcess(base(fake) + vendor, tmp_path, env=ADMIN_ENV) as chatd:

        def sent_key() -> str:
            fake.reset()
            assert chat(chatd, "vendor/ok").status_code == 200
            return fake.calls_to("/v1/chat/completions")[-1].headers["authorization"]

        assert sent_key() == "Bearer key-old"
        keys.write_text("VENDOR_KEY=key-new\n")
        for _ in range(3):  # the file changed, but nothing was reloaded
            assert sent_key() == "Bearer key-old"
        chatd.signal(signal.SIGHUP)
        wait_generation(chatd, 2)
        for _ in range(3):
            assert sent_key() == "Bearer key-new"
        assert "key-new" not in chatd.log() and "key-old" not in chatd.log()


def test_an_open_stream_finishes_when_the_reload_removes_its_provider(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    doomed = provider_toml("doomed", "ollama", fake.url)
    with ChatdProcess(base(fake) + doomed, tmp_path, env=ADMIN_ENV) as chatd:
        events: list[str] = []
        first = threading.Event()

        def stream() -> None:
            body = {"model": "doomed/slow-1500", "messages": USER, "stream": True}
            with httpx.stream("POST", chatd.url + "/v1/chat", json=body, timeout=15) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(10)
        chatd.config_path.write_text(base(fake))
        assert admin_reload(chatd).status_code == 200
        reader.join(15)
        assert not reader.is_alive()
        assert '"done":true' in events[-1].replace(" ", ""), events[-3:]
        assert len(events) > 3  # a stream, not one piece
        names = [p["name"] for p in httpx.get(chatd.url + "/v1/chat/providers").json()["providers"]]
        assert names == ["ollama"]
        assert "Traceback" not in chatd.log()


def test_a_cooling_down_provider_stays_cooling_down_across_an_unrelated_reload(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    cooling = provider_toml(
        "cooling", "ollama", fake.url, max_retries=0, cooldown_failures=2, cooldown_secs=60
    )
    with ChatdProcess(base(fake) + cooling, tmp_path, env=ADMIN_ENV) as chatd:
        assert [chat(chatd, "cooling/fail-500").status_code for _ in range(2)] == [502, 502]
        assert chat(chatd, "cooling/ok").json()["error"]["type"] == "provider_cooling_down"
        chatd.config_path.write_text(base(fake, models='hot = "ollama/ok"') + cooling)
        assert admin_reload(chatd).status_code == 200
        fake.reset()
        refused = chat(chatd, "cooling/ok")
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "provider_cooling_down"
        assert fake.calls_to("/api/chat") == []  # the breaker held: nothing went upstream
        assert chat(chatd, "hot").status_code == 200  # the reload did take


BAD_CONFIGS = {
    "broken TOML": "[chatd\nbind = ",
    "an unknown kind": '[chatd.providers.weird]\nkind = "telepathy"\n',
    "a bad value": "[chatd.cache]\nttl_secs = -1\n",
}


def test_a_bad_config_is_refused_whole_and_the_old_one_keeps_answering(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    good = base(fake, models='hot = "ollama/ok"')
    with ChatdProcess(good, tmp_path, env=ADMIN_ENV) as chatd:
        for name, text in BAD_CONFIGS.items():
            # A good change and a bad one in the same file: neither is taken.
            chatd.config_path.write_text(base(fake, models='hot = "ollama/missing"') + text)
            line = check_config_line(chatd.config_path)
            assert line.startswith("chatd: config error: "), (name, line)
            answer = admin_reload(chatd)
            assert answer.status_code == 400, (name, answer.text)
            error = answer.json()["error"]
            assert error["type"] == "invalid_config" and error["message"] == line, name
            wait_log(chatd, line, 1)  # the log is written off the event loop: a moment
            chatd.signal(signal.SIGHUP)  # refused the same way, by signal
            wait_log(chatd, line, 2)
            assert generation(chatd) == 1
            assert chat(chatd, "hot").status_code == 200, name  # the old alias still
        assert ('{outcome="rejected"}', 6.0) in metric(chatd, "chatd_config_reloads_total")
        assert "Traceback" not in chatd.log()


def test_keys_that_need_a_restart_are_logged_and_left_alone(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    first = f'usage_db = "sqlite:///{tmp_path / "first.sqlite3"}"\n'
    with ChatdProcess(base(fake, first), tmp_path, env=ADMIN_ENV) as chatd:
        usage_db = f"sqlite:///{tmp_path / 'elsewhere.sqlite3'}"
        moved = base(
            fake,
            f'bind = "127.0.0.1:1"\nredis_url = "redis://127.0.0.1:1/0"\nusage_db = "{usage_db}"\n',
        )
        chatd.config_path.write_text(moved)
        assert admin_reload(chatd).status_code == 200
        for key in ("bind", "redis_url", "usage_db"):  # logged off the event loop: a moment
            wait_log(chatd, f"chatd.{key} changed; it needs a restart", 1)
        assert "elsewhere" not in chatd.log()  # names, never values
        assert chat(chatd, "ollama/ok").status_code == 200  # same port, same state
        assert not (tmp_path / "elsewhere.sqlite3").exists()


def test_admin_reload_wants_the_admin_token(fake: FakeUpstream, tmp_path: Path) -> None:
    with ChatdProcess(base(fake), tmp_path, env=ADMIN_ENV) as chatd:
        url = chatd.url + "/admin/reload"
        assert httpx.post(url).status_code == 401
        wrong = httpx.post(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        assert generation(chatd) == 1
        assert admin_reload(chatd).status_code == 200


def test_watch_config_follows_a_configmap_style_symlink_swap(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Kubernetes mounts a ConfigMap as `file -> ..data/file`, `..data -> ..<stamp>`, and
    updates it by pointing `..data` at a new directory (a rename over the symlink)."""
    mount = tmp_path / "mount"
    mount.mkdir()

    def publish(stamp: str, text: str) -> None:
        version = mount / f"..{stamp}"
        version.mkdir()
        (version / "lakehouse.toml").write_text(text)
        (mount / "..data_tmp").symlink_to(version.name)
        os.replace(mount / "..data_tmp", mount / "..data")

    watching = base(fake, "watch_config = true\n", models='hot = "ollama/ok"')
    publish("v1", watching)
    (mount / "lakehouse.toml").symlink_to("..data/lakehouse.toml")
    process = ChatdProcess("", tmp_path, env=ADMIN_ENV)
    process.config_path = mount / "lakehouse.toml"
    with process as chatd:
        publish("v2", watching.replace('"ollama/ok"', '"ollama/slow-10"'))
        wait_generation(chatd, 2)
        fake.reset()
        assert chat(chatd, "hot").status_code == 200
        assert json.loads(fake.calls_to("/api/chat")[-1].body)["model"] == "slow-10"


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
def test_sighup_to_the_workers_parent_reloads_every_worker(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    chatd = ChatdProcess(base(fake), tmp_path, env=ADMIN_ENV, args=("--workers", "2"))
    chatd.start(timeout=60)  # two workers start slowly on a busy machine
    try:

        def generations() -> list[float]:
            return sorted(v for _, v in metric(chatd, "chatd_config_generation"))

        deadline = time.monotonic() + 60
        while generations() != [1.0, 1.0] and time.monotonic() < deadline:
            time.sleep(0.1)  # both workers up
        assert generations() == [1.0, 1.0]
        chatd.config_path.write_text(base(fake, models='hot = "ollama/ok"'))
        chatd.signal(signal.SIGHUP)
        while generations() != [2.0, 2.0] and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        assert generations() == [2.0, 2.0], chatd.log()[-2000:]
        assert chat(chatd, "hot").status_code == 200

        chatd.config_path.write_text(BAD_CONFIGS["an unknown kind"])
        chatd.signal(signal.SIGHUP)
        wait_log(chatd, check_config_line(chatd.config_path), 2, timeout=30)  # one per worker
        assert ('{outcome="rejected"}', 2.0) in metric(chatd, "chatd_config_reloads_total")
        assert generations() == [2.0, 2.0]
        assert chat(chatd, "hot").status_code == 200

    finally:
        chatd.stop()
