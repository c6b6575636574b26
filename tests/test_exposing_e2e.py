"""Exposed safely (docs/exposing.md), against real chatd processes and real sockets: no
open gateway on the network by accident, and no slow or greedy client holding it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import REPO, ChatdProcess, clean_env, free_port, provider_toml

MOCK = '[chatd]\ndefault_provider = "mock"\n' + provider_toml("mock", "mock")
CHAT = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
TOKEN = "tok-exposed-4242-secret"


def serve(config: str, tmp_path: Path, bind: str) -> subprocess.CompletedProcess[str]:
    """`chatd --bind <bind>` expected to refuse: its exit and its output."""
    path = tmp_path / "chatd.toml"
    path.write_text(config)
    cmd = [sys.executable, "-m", "chatd", "--config", str(path), "--bind", bind]
    env = clean_env(CHATD_USAGE_DB=f"sqlite:///{tmp_path / 'usage.sqlite3'}")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)


def on_the_network(config: str, tmp_path: Path, **env: str) -> ChatdProcess:
    port = free_port()
    args = ("--bind", f"0.0.0.0:{port}")
    return ChatdProcess(config, tmp_path, port=port, args=args, env=env)


@pytest.fixture(scope="module")
def brisk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    """On the network with authentication off, said outright; short deadlines, so slowness
    shows within seconds."""
    config = MOCK.replace(
        "[chatd]\n",
        "[chatd]\nallow_unauthenticated = true\n"
        "header_timeout_secs = 1\nkeep_alive_secs = 1\ntimeout_secs = 2\n",
    )
    with on_the_network(config, tmp_path_factory.mktemp("brisk")) as chatd:
        yield chatd


# -- who may reach it -------------------------------------------------------------------


def test_an_open_bind_without_authentication_refuses_to_start_in_one_line(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = serve(MOCK, tmp_path, f"0.0.0.0:{port}")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "allow_unauthenticated = true" in lines[0]
    assert "[chatd.callers." in lines[0] and "auth_tokens_env" in lines[0]
    assert "Traceback" not in proc.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    path = tmp_path / "chatd.toml"
    cmd = [sys.executable, "-m", "chatd", "check-config", "--config", str(path)]
    checked = subprocess.run(
        [*cmd, "--bind", f"0.0.0.0:{port}"], capture_output=True, text=True, env=clean_env()
    )
    assert checked.returncode != 0 and "allow_unauthenticated" in checked.stderr


def test_allow_unauthenticated_serves_with_a_warning_and_ready_says_auth_off(
    brisk: ChatdProcess,
) -> None:
    ready = httpx.get(brisk.url + "/ready").json()
    answered = httpx.post(brisk.url + "/v1/chat", json=CHAT)
    assert ready.pop("config")["generation"] == 1
    assert ready == {"status": "ready", "default": "mock", "auth": "off"}
    assert answered.status_code == 200
    warnings = [line for line in brisk.log().splitlines() if "authentication off" in line]
    assert len(warnings) == 1 and '"level":"warning"' in warnings[0]


def test_a_caller_turns_authentication_on_for_an_open_bind(tmp_path: Path) -> None:
    config = MOCK + '[chatd.callers.app]\ntoken_env = "APP_TOKEN"\n'
    with on_the_network(config, tmp_path, APP_TOKEN=TOKEN) as chatd:
        ready = httpx.get(chatd.url + "/ready")
        refused = httpx.post(chatd.url + "/v1/chat", json=CHAT)
        answered = httpx.post(
            chatd.url + "/v1/chat", json=CHAT, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert {k: v for k, v in ready.json().items() if k != "config"} == {
        "status": "ready",
        "default": "mock",
    }  # no "auth": "off"
    assert refused.status_code == 401 and answered.status_code == 200
    assert "authentication off" not in chatd.log() and TOKEN not in chatd.log()


def test_a_live_caller_made_with_the_cli_turns_authentication_on_for_an_open_bind(
    tmp_path: Path,
) -> None:
    """The first admin is made before the server runs; its database then holds a caller."""
    db = f"sqlite:///{tmp_path / 'live.sqlite3'}"
    config = MOCK.replace("[chatd]\n", f'[chatd]\nusage_db = "{db}"\n')
    path = tmp_path / "live.toml"
    path.write_text(config)
    made = subprocess.run(
        [sys.executable, "-m", "chatd", "callers", "--config", str(path),
         "create", "ops", "--admin"],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = next(word for word in made.stdout.split() if word.startswith("ck-"))
    with on_the_network(config, tmp_path) as chatd:
        assert httpx.post(chatd.url + "/v1/chat", json=CHAT).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert httpx.post(chatd.url + "/v1/chat", json=CHAT, headers=auth).status_code == 200


def test_check_config_shows_the_effective_limits(tmp_path: Path) -> None:
    path = tmp_path / "chatd.toml"
    path.write_text(MOCK.replace("[chatd]\n", "[chatd]\nmax_connections = 300\n"))
    cmd = [sys.executable, "-m", "chatd", "check-config", "--config", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), cwd=REPO).stdout
    for line in (
        "allow_unauthenticated: false",
        "max_connections: 300 (per worker)",
        "header_timeout_secs: 10",
        "keep_alive_secs: 5",
        "max_header_bytes: 65536",
    ):
        assert line in out.splitlines(), out


# -- slow and greedy clients ------------------------------------------------------------


async def trickle(port: int, started: float) -> tuple[float, bytes]:
    """Send a request head one header line every 0.2 s; when was the connection closed,
    and what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def drip() -> None:
        writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n")
        for n in range(100):
            await asyncio.sleep(0.2)
            writer.write(b"X-Trickle-%d: slow\r\n" % n)

    dripping = asyncio.ensure_future(drip())
    answer = b""
    try:
        while chunk := await reader.read(65536):
            answer += chunk
    except ConnectionError:
        pass
    closed = time.monotonic() - started
    dripping.cancel()
    writer.close()
    return closed, answer


async def test_trickling_connections_are_closed_while_ordinary_requests_succeed(
    brisk: ChatdProcess,
) -> None:
    started = time.monotonic()
    tricklers = [asyncio.ensure_future(trickle(brisk.port, started)) for _ in range(150)]
    statuses = []
    async with httpx.AsyncClient(base_url=brisk.url, timeout=10) as client:
        while not all(t.done() for t in tricklers) and time.monotonic() - started < 15:
            statuses.append((await client.post("/v1/chat", json=CHAT)).status_code)
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*tricklers)
    closed = [seconds for seconds, _ in results]
    assert max(closed) < 1 + 2, closed  # header_timeout_secs + 2 s
    assert min(closed) > 0.9  # not before the deadline
    assert all(b"408 Request Timeout" in answer for _, answer in results)
    assert b'"type":"request_timeout"' in results[0][1]
    assert len(statuses) >= 5 and set(statuses) == {200}


async def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_secs(
    brisk: ChatdProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", brisk.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    answered = time.monotonic()
    rest = await asyncio.wait_for(reader.read(), 10)  # until chatd closes it
    closed_after = time.monotonic() - answered
    writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and rest == b""
    assert 0.8 < closed_after < 3, closed_after  # keep_alive_secs = 1


def test_headers_over_64_kb_are_431(brisk: ChatdProcess) -> None:
    big = httpx.get(brisk.url + "/health", headers={"X-Pad": "a" * 70_000})
    fine = httpx.get(brisk.url + "/health", headers={"X-Pad": "a" * 60_000})
    assert big.status_code == 431
    assert big.json()["error"]["type"] == "headers_too_large"
    assert fine.status_code == 200


async def test_headers_growing_past_the_limit_are_431_before_they_end(
    brisk: ChatdProcess,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", brisk.port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n")
    try:
        for n in range(20):  # 20 x 8 KB, never finished
            writer.write(b"X-Pad-%d: %s\r\n" % (n, b"a" * 8192))
            await writer.drain()
            await asyncio.sleep(0.01)
    except ConnectionError:
        pass
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ") and b'"type":"headers_too_large"' in answer


async def test_a_body_slower_than_timeout_secs_is_408(brisk: ChatdProcess) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", brisk.port)
    started = time.monotonic()
    writer.write(
        b"POST /v1/chat HTTP/1.1\r\nHost: chatd\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"model": "mock/echo"'
    )
    answer = await asyncio.wait_for(reader.read(4096), 10)
    waited = time.monotonic() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in answer
    assert 1.8 < waited < 2 + 2, waited  # timeout_secs = 2


def metric(chatd: ChatdProcess, name: str, **labels: str) -> float:
    text = httpx.get(chatd.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_slow_connections_are_counted(brisk: ChatdProcess) -> None:
    assert metric(brisk, "chatd_connections_closed_slow_total", phase="headers") >= 1
    assert metric(brisk, "chatd_connections_open") >= 1  # the scrape's own


# -- the connection limit -----------------------------------------------------------------


async def hold(port: int, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` open connections, one after the other."""
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def ask(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> tuple[float, bytes]:
    """One request on an open connection: how long until its answer, and the answer."""
    reader, writer = connection
    started = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(4096), 5)
    return time.monotonic() - started, answer


async def knock(port: int) -> tuple[float, bytes]:
    """One request on a fresh connection: how long until its answer, and the answer."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return time.monotonic() - started, answer


async def test_at_max_connections_per_worker_the_next_is_503_and_service_returns(
    tmp_path: Path,
) -> None:
    config = MOCK.replace("[chatd]\n", "[chatd]\nmax_connections = 3\nheader_timeout_secs = 30\n")
    with ChatdProcess(config, tmp_path, args=("--workers", "2")) as chatd:
        async with httpx.AsyncClient() as client:
            ready = (await client.get(chatd.url + "/ready")).json()
        held = await hold(chatd.port, 10)  # kept open: a keep-alive connection counts
        answers = await asyncio.gather(*(ask(writer) for writer in held))
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.3)
        _, after = await knock(chatd.port)
        # both workers' sum
        counted = await asyncio.to_thread(metric, chatd, "chatd_connections_refused_total")
    refused = [(waited, answer) for waited, answer in answers if b" 503 " in answer[:16]]
    assert 3 <= len(answers) - len(refused) <= 2 * 3  # each of 2 workers holds at most 3
    for waited, answer in refused:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"retry-after: 1" in head.lower().split(b"\r\n")
        assert b'"type":"overloaded"' in body
        assert waited < 1, waited
    assert after.startswith(b"HTTP/1.1 200 ")
    assert counted == len(refused)
    assert {k: v for k, v in ready.items() if k != "config"} == {
        "status": "ready",
        "default": "mock",
    }  # a loopback bind, as before
