"""Shared state end to end: two real chatd processes behind a real nginx (round robin),
one real redis-server, the real fake upstream. What one replica learns, the other knows,
within the bounds docs/shared-state.md gives: cooldowns (250 ms), cached answers,
answers in flight, a caller's rpm (exact) and budget (100 ms plus one request); Redis
killed and restarted mid-run.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import ANSWER, FakeUpstream
from tests.redis_server import RedisServer
from tests.support import ChatdProcess, nginx_conf, provider_toml, running_nginx

NGINX_HTTP = """\
    upstream chatd {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chatd;
            proxy_http_version 1.1;
        }}
    }}
"""


def config_for(fake: FakeUpstream, redis_url: str) -> str:
    return (
        f'[chatd]\ntimeout_secs = 15\nredis_url = "{redis_url}"\n\n'
        "[chatd.cache]\nenabled = true\n\n"
        + provider_toml("ollama", "ollama", fake.url, max_retries=0, cooldown_failures=0)
        + provider_toml("vendor", "openai", fake.url + "/v1", max_retries=0, cooldown_failures=0)
        + provider_toml(
            "dead", "ollama", fake.url, max_retries=0, cooldown_failures=2, cooldown_secs=30
        )
    )


@dataclass
class Fleet:
    a: ChatdProcess
    b: ChatdProcess
    nginx: str
    redis: RedisServer


@contextmanager
def running_fleet(
    config: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory, **env: str
) -> Iterator[Fleet]:
    """Two chatd replicas, `config(redis_url)` each, one real Redis, a real nginx."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as redis:
        tmp = tmp_path_factory.mktemp("replicas")
        with (
            ChatdProcess(config(redis.url), tmp, env=env) as a,
            ChatdProcess(config(redis.url), tmp, env=env) as b,
        ):

            def proxy(ngx: Path, port: int) -> str:
                return nginx_conf(ngx, NGINX_HTTP.format(port=port, a=a.port, b=b.port))

            with running_nginx(tmp_path_factory.mktemp("nginx"), proxy) as url:
                fleet = Fleet(a, b, url, redis)
                wait_until(lambda: shared_up(a) == 1 and shared_up(b) == 1, 10)
                yield fleet


@pytest.fixture(scope="module")
def fleet(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(partial(config_for, fake), tmp_path_factory) as replicas:
        yield replicas


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeUpstream) -> None:
    fake.reset()


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def shared_up(chatd: ChatdProcess) -> float | None:
    text = httpx.get(chatd.url + "/metrics", timeout=5).text
    match = re.search(r"^chatd_shared_state_up (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def unique() -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {uuid.uuid4().hex[:8]}"}]


def chat(url: str, messages: list[dict[str, str]], **body: Any) -> httpx.Response:
    headers = body.pop("headers", None)
    payload = {"model": "ollama/ok", "messages": messages, **body}
    return httpx.post(url + "/v1/chat", json=payload, headers=headers, timeout=30)


def calls_with(fake: FakeUpstream, text: str) -> int:
    return sum(1 for c in fake.calls if text in c.body.decode(errors="replace"))


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]


def json_lines(chatd: ChatdProcess) -> list[dict[str, Any]]:
    lines = []
    for line in chatd.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(entry)
    return lines


def log_lines(chatd: ChatdProcess) -> list[dict[str, Any]]:
    """The request lines."""
    return [entry for entry in json_lines(chatd) if "route" in entry]


# -- cooldowns ----------------------------------------------------------------------------


def test_a_cooldown_tripped_on_a_stops_b_without_calling_the_dead_upstream(fleet, fake):
    for _ in range(2):  # cooldown_failures = 2, straight to A
        assert chat(fleet.a.url, unique(), model="dead/fail-500").status_code == 502
    assert calls_with(fake, "fail-500") == 2
    time.sleep(0.25)  # the trip is written behind (50 ms); B's mirror is at most 150 ms old
    on_b = chat(fleet.b.url, unique(), model="dead/fail-500")
    assert on_b.status_code == 503, on_b.text
    assert on_b.json()["error"]["type"] == "provider_cooling_down"
    through_nginx = [chat(fleet.nginx, unique(), model="dead/fail-500") for _ in range(4)]
    assert [r.status_code for r in through_nginx] == [503] * 4
    assert calls_with(fake, "fail-500") == 2  # nobody called the dead upstream again
    assert chat(fleet.b.url, unique()).status_code == 200  # other providers unaffected


# -- the cache across replicas -------------------------------------------------------------


def test_an_answer_from_a_is_a_hit_on_b(fleet, fake):
    messages = unique()
    first = chat(fleet.a.url, messages)
    second = chat(fleet.b.url, messages)
    assert first.headers["x-chatd-cache"] == "miss"
    assert second.headers["x-chatd-cache"] == "hit"
    assert second.json()["content"] == first.json()["content"] == ANSWER
    assert calls_with(fake, messages[0]["content"]) == 1
    hits: list[dict[str, Any]] = []  # the log is written off the request path: wait for it
    assert wait_until(
        lambda: bool(hits.extend(x for x in log_lines(fleet.b) if x.get("cache") == "hit") or hits),
        5,
    )
    hit_line = hits[-1]  # the log (and the ledger) see a free hit
    assert hit_line["input_tokens"] == 0 and hit_line["output_tokens"] == 0
    assert hit_line["provider"] == "ollama"


def test_cache_control_and_temperature_through_nginx(fleet, fake):
    messages = unique()
    results = [
        chat(fleet.nginx, messages).headers["x-chatd-cache"],  # miss (one replica)
        chat(fleet.nginx, messages).headers["x-chatd-cache"],  # hit (the other)
        chat(fleet.nginx, messages, headers={"Cache-Control": "no-cache"}).headers["x-chatd-cache"],
        chat(fleet.nginx, messages, headers={"Cache-Control": "no-store"}).headers["x-chatd-cache"],
        chat(fleet.nginx, messages).headers["x-chatd-cache"],
    ]
    assert results == ["miss", "hit", "miss", "bypass", "hit"]
    assert calls_with(fake, messages[0]["content"]) == 3

    warm = unique()
    answers = [chat(fleet.nginx, warm, temperature=0.7) for _ in range(4)]
    assert all(r.status_code == 200 and "x-chatd-cache" not in r.headers for r in answers)
    assert calls_with(fake, warm[0]["content"]) == 4


def test_a_stream_finished_on_one_replica_replays_on_the_other(fleet, fake):
    messages = unique()
    live = chat(fleet.a.url, messages, stream=True)
    assert live.headers["x-chatd-cache"] == "miss"
    time.sleep(0.3)  # stored off the answer's path
    replay = chat(fleet.b.url, messages, stream=True)
    assert replay.headers["x-chatd-cache"] == "hit"
    replayed = events(replay)
    assert [next(iter(e)) for e in replayed] == ["delta", "done"]
    assert replayed[0]["delta"] == ANSWER
    assert replayed[1]["done"] is True and replayed[1]["finish_reason"] == "stop"
    assert calls_with(fake, messages[0]["content"]) == 1


# -- single flight --------------------------------------------------------------------------


def test_twenty_identical_requests_at_once_reach_the_upstream_once(fleet, fake):
    messages = unique()
    with ThreadPoolExecutor(20) as pool:
        answers = list(
            pool.map(lambda _: chat(fleet.nginx, messages, model="ollama/slow-1000"), range(20))
        )
    assert [r.status_code for r in answers] == [200] * 20
    assert all(r.json()["content"] == ANSWER for r in answers)
    assert calls_with(fake, messages[0]["content"]) == 1
    assert sorted(r.headers["x-chatd-cache"] for r in answers) == ["hit"] * 19 + ["miss"]


def test_different_requests_are_never_merged(fleet, fake):
    messages = unique()
    text = messages[0]["content"]
    other = [{"role": "user", "content": text + " and more"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    chat_variants: list[dict[str, Any]] = [
        {},
        {"messages": other},
        {"temperature": 0.3},
        {"max_tokens": 7},
        {"format": "json"},
    ]
    completion_variants: list[dict[str, Any]] = [{}, {"tools": tools}]

    def send_chat(variant: dict[str, Any]) -> httpx.Response:
        body = {"messages": messages, **variant}
        return chat(fleet.nginx, body.pop("messages"), model="ollama/slow-800", **body)

    def send_completion(variant: dict[str, Any]) -> httpx.Response:
        payload = {"model": "vendor/slow-800", "messages": messages, "temperature": 0, **variant}
        return httpx.post(fleet.nginx + "/v1/chat/completions", json=payload, timeout=30)

    with ThreadPoolExecutor(len(chat_variants) + len(completion_variants)) as pool:
        futures = [pool.submit(send_chat, v) for v in chat_variants]
        futures += [pool.submit(send_completion, v) for v in completion_variants]
        answers = [f.result() for f in futures]
    assert [r.status_code for r in answers] == [200] * len(answers)
    assert calls_with(fake, text) == len(answers)  # one upstream call per distinct request
    sent = [c.json for c in fake.calls if text in c.body.decode()]
    assert any(c.get("options", {}).get("num_predict") == 7 for c in sent)
    assert any(c.get("format") == "json" for c in sent)
    assert any(c.get("tools") == tools for c in sent)
    assert any(c["messages"][0]["content"] == other[0]["content"] for c in sent)


# -- Redis away and back (last: it empties Redis) -------------------------------------------


def test_redis_killed_mid_run_nothing_fails_and_it_comes_back(fleet, fake):
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            cacheable = chat(fleet.nginx, [{"role": "user", "content": "steady traffic"}])
            warm = chat(fleet.nginx, unique(), temperature=0.5)
            statuses.extend((cacheable.status_code, warm.status_code))

    driver = threading.Thread(target=traffic)
    driver.start()
    try:
        time.sleep(0.5)
        fleet.redis.kill()
        assert wait_until(lambda: shared_up(fleet.a) == 0 and shared_up(fleet.b) == 0, 10)
        down = httpx.get(fleet.a.url + "/ready?probe=1", timeout=10).json()
        assert down["redis"]["reachable"] is False
        time.sleep(1.0)  # keep serving on in-process state
        fleet.redis.start()
        assert wait_until(lambda: shared_up(fleet.a) == 1 and shared_up(fleet.b) == 1, 10)
        time.sleep(0.5)
    finally:
        stop.set()
        driver.join(30)
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    up = httpx.get(fleet.b.url + "/ready?probe=1", timeout=10).json()
    assert up["redis"]["reachable"] is True and "@" not in up["redis"]["url"]
    # shared again, without restarting chatd
    messages = unique()
    assert chat(fleet.a.url, messages).headers["x-chatd-cache"] == "miss"
    assert chat(fleet.b.url, messages).headers["x-chatd-cache"] == "hit"
    assert calls_with(fake, messages[0]["content"]) == 1
    downs = [
        datetime.fromisoformat(entry["time"].rstrip("Z"))
        for entry in json_lines(fleet.a)
        if "is down" in entry.get("message", "")
    ]
    assert downs  # logged, and at most once a minute
    assert all((b - a).total_seconds() >= 60 for a, b in zip(downs, downs[1:], strict=False))


# -- in process: the cache's memory bound ----------------------------------------------------


def test_in_process_cache_never_exceeds_max_bytes(fake, tmp_path: Path):
    config = (
        "[chatd]\ntimeout_secs = 15\n\n[chatd.cache]\nenabled = true\nmax_bytes = 2048\n\n"
        + provider_toml("ollama", "ollama", fake.url, max_retries=0, cooldown_failures=0)
    )
    with ChatdProcess(config, tmp_path) as chatd:
        first = unique()
        assert chat(chatd.url, first).headers["x-chatd-cache"] == "miss"
        for _ in range(20):
            assert chat(chatd.url, unique()).headers["x-chatd-cache"] == "miss"
            text = httpx.get(chatd.url + "/metrics", timeout=5).text
            size = float(re.search(r"^chatd_cache_bytes (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
            assert 0 < size <= 2048
        assert chat(chatd.url, first).headers["x-chatd-cache"] == "miss"  # evicted
        assert "chatd_shared_state_up" not in httpx.get(chatd.url + "/metrics").text


# -- callers' limits and budgets across replicas ----------------------

CALLER_TOKENS = {
    "REPLICA_APP_TOKEN": "app-replica-token",
    "REPLICA_BIG_TOKEN": "big-token",
    "REPLICA_BURST_TOKEN": "burst-token",
    "REPLICA_STEADY_TOKEN": "steady-token",
}


def callers_config(fake: FakeUpstream, redis_url: str) -> str:
    return (
        f'[chatd]\ndefault_provider = "mock"\nredis_url = "{redis_url}"\n\n'
        '[chatd.callers.app]\ntoken_env = "REPLICA_APP_TOKEN"\nrpm = 5\n\n'
        '[chatd.callers.big]\ntoken_env = "REPLICA_BIG_TOKEN"\n'
        'budget_usd = 10.0\nbudget_period = "day"\n\n'
        '[chatd.callers.burst]\ntoken_env = "REPLICA_BURST_TOKEN"\nrpm = 10\n\n'
        '[chatd.callers.steady]\ntoken_env = "REPLICA_STEADY_TOKEN"\n'
        "rpm = 100000\ntpm = 100000000\nbudget_usd = 1000000000.0\n\n"
        '[chatd.prices]\n"mock/*" = { input = 1000000, output = 1000000 }\n\n'
        + provider_toml("mock", "mock")
    )


@pytest.fixture(scope="module")
def callers_fleet(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    config = partial(callers_config, fake)
    with running_fleet(config, tmp_path_factory, **CALLER_TOKENS) as replicas:
        yield replicas


def as_caller(url: str, token: str, text: str = "one two") -> httpx.Response:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": text}]}
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(url + "/v1/chat", json=body, headers=headers, timeout=10)


def test_a_callers_rpm_holds_for_the_fleet_not_per_replica(callers_fleet: Fleet) -> None:
    """rpm = 5: exactly 5 successes in the window across both replicas together."""
    statuses = [as_caller(callers_fleet.nginx, "app-replica-token").status_code for _ in range(12)]
    assert statuses.count(200) == 5, statuses
    assert statuses.count(429) == 7, statuses
    # Both replicas answered some of them (nginx round robin), and both refused some.
    for replica in (callers_fleet.a, callers_fleet.b):
        seen = [line["status"] for line in log_lines(replica) if line.get("caller") == "app"]
        assert seen, f"replica {replica.port} answered none of the caller's requests"
    refused = as_caller(callers_fleet.b.url, "app-replica-token")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


def test_rpm_is_exact_across_the_fleet_under_concurrency(callers_fleet: Fleet) -> None:
    """rpm = 10, 30 requests at once through nginx: exactly 10 answered, each with its own
    X-RateLimit-Remaining-Requests (9 down to 0), the other 20 refused."""
    with ThreadPoolExecutor(15) as pool:
        answers = list(pool.map(lambda _: as_caller(callers_fleet.nginx, "burst-token"), range(30)))
    ok = [r for r in answers if r.status_code == 200]
    assert len(ok) == 10, [r.status_code for r in answers]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))
    assert [r.json()["error"]["type"] for r in answers if r.status_code != 200] == [
        "rate_limited"
    ] * 20


def test_a_budget_crossed_on_a_refuses_on_b_within_100_ms_plus_one_request(
    callers_fleet: Fleet,
) -> None:
    """$1 per token at these prices: 6 tokens a call, so the $10 budget is gone after two
    calls through replica A. Spend is written behind, so B may admit one more request at
    once; 100 ms later it refuses with budget_exceeded."""
    for _ in range(2):
        assert as_caller(callers_fleet.a.url, "big-token", "one two three").status_code == 200
    at_once = as_caller(callers_fleet.b.url, "big-token")  # the "plus one": 200 or 429
    assert at_once.status_code in (200, 429), at_once.text
    time.sleep(0.1)
    refused = as_caller(callers_fleet.b.url, "big-token")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "budget_exceeded"


def test_redis_killed_under_callers_traffic_nothing_fails(callers_fleet: Fleet) -> None:
    """A caller with every limit, through nginx, while Redis dies and comes back: every
    request answered 200, both replicas report the outage and the return."""
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            statuses.append(as_caller(callers_fleet.nginx, "steady-token").status_code)

    driver = threading.Thread(target=traffic)
    driver.start()
    fleet = callers_fleet
    try:
        time.sleep(0.5)
        fleet.redis.kill()
        assert wait_until(lambda: shared_up(fleet.a) == 0 and shared_up(fleet.b) == 0, 10)
        time.sleep(0.5)
        fleet.redis.start()
        assert wait_until(lambda: shared_up(fleet.a) == 1 and shared_up(fleet.b) == 1, 10)
        time.sleep(0.5)
    finally:
        stop.set()
        driver.join(30)
    assert len(statuses) > 10 and set(statuses) == {200}, statuses

    # The restarted Redis is empty; the budget spent before (test above) comes back
    # from the ledger, so "big" is refused again without any new spend.
    def refused_for_budget() -> bool:
        answer = as_caller(fleet.b.url, "big-token")
        return answer.status_code == 429 and answer.json()["error"]["type"] == "budget_exceeded"

    assert wait_until(refused_for_budget, 10)
