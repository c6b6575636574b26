"""What a request costs Redis, counted by Redis itself (`INFO commandstats` before and
after): a real chatd, a real redis-server. A caller with limits pays one script before
its call and nothing after it (its tokens and spend go in batches), with the response
cache on too (the cache's question rides in the admission script); a caller without
limits pays nothing; the batch still waiting at SIGTERM reaches Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from tests.redis_server import RedisServer
from tests.support import ChatdProcess, provider_toml

TOKENS = {"COST_LIMITED_TOKEN": "limited-token", "COST_FREE_TOKEN": "free-token"}
FLUSH_EVERY_SECS = 0.05
BUILT_IN = [("ollama", "ollama"), ("ollama_cloud", "ollama_cloud")] + [
    (name, "openai") for name in ("openrouter", "opencode", "kimi")
]


def config(redis_url: str, cache: bool = False) -> str:
    return (
        f'[chatd]\ndefault_provider = "mock"\nusage_db = ""\nredis_url = "{redis_url}"\n\n'
        + ("[chatd.cache]\nenabled = true\n\n" if cache else "")
        + '[chatd.callers.limited]\ntoken_env = "COST_LIMITED_TOKEN"\n'
        'rpm = 100000\ntpm = 10000000\nbudget_usd = 1000000.0\nbudget_period = "day"\n\n'
        '[chatd.callers.free]\ntoken_env = "COST_FREE_TOKEN"\n\n'
        '[chatd.prices]\n"mock/*" = { input = 1000000, output = 1000000 }\n\n'
        # No breaker: the cooldown mirror reads Redis a few times a second, per replica
        # not per request (docs/shared-state.md); here only requests' commands count.
        + provider_toml("mock", "mock", cooldown_failures=0)
        + "".join(provider_toml(name, kind, enabled=False) for name, kind in BUILT_IN)
    )


@pytest.fixture(params=[False], ids=["cache off"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[ChatdProcess, redis.Redis]]:
    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        try:
            with ChatdProcess(config(server.url, request.param), tmp_path, env=TOKENS) as chatd:
                deadline = time.monotonic() + 10
                while b"chatd_shared_state_up 1.0" not in metrics(chatd):
                    assert time.monotonic() < deadline, "chatd never saw Redis"
                    time.sleep(0.05)
                yield chatd, client
        finally:
            client.close()


def metrics(chatd: ChatdProcess) -> bytes:
    return httpx.get(chatd.url + "/metrics", timeout=5).content


def ask(chatd: ChatdProcess, token: str, content: str = "one two three") -> int:
    return answer(chatd, token, content).status_code


def answer(chatd: ChatdProcess, token: str, content: str) -> httpx.Response:
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": content}]}
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.post(chatd.url + "/v1/chat", json=body, headers=headers, timeout=10)


def calls(client: redis.Redis) -> dict[str, int]:
    """Commands Redis ran so far, by name (those scripts ran included)."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    ignored = {"ping", "info"}  # the monitor's ping once a second; our own INFO
    changed = {k: after[k] - before.get(k, 0) for k in after if k not in ignored}
    return {k: v for k, v in changed.items() if v}


def spend(client: redis.Redis) -> float:
    keys = client.keys("chatd:n:spend:limited:*")
    return sum(float(client.get(key) or 0) for key in keys)


def test_a_caller_with_limits_costs_one_script_a_request_and_batched_writes(served):
    chatd, client = served
    for _ in range(3):  # warm: the scripts are loaded once (NOSCRIPT, then EVAL)
        assert ask(chatd, "limited-token") == 200
    time.sleep(0.3)
    warm_spend = spend(client)
    assert warm_spend > 0  # written behind, but written
    before = calls(client)
    n = 40
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: ask(chatd, "limited-token"), range(n)))
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # the last batch
    assert statuses == [200] * n
    used = delta(before, calls(client))
    scripts = used.pop("evalsha")
    flushes = scripts - n
    # One admission script per request, plus at most one batch per FLUSH_EVERY_SECS
    # (however many requests' tokens and spend it carries).
    assert 1 <= flushes <= (elapsed + 0.3) / FLUSH_EVERY_SECS + 2, used
    assert used.pop("get") == n  # the budget's spend, read inside each admission
    assert "eval" not in used and "set" not in used, used  # nothing else from outside
    assert spend(client) == pytest.approx(warm_spend / 3 * (n + 3))  # every call's spend


def test_a_caller_without_limits_costs_redis_nothing(served):
    chatd, client = served
    assert ask(chatd, "free-token") == 200
    time.sleep(0.2)
    before = calls(client)
    for _ in range(20):
        assert ask(chatd, "free-token") == 200
    time.sleep(0.2)
    assert delta(before, calls(client)) == {}


def test_writes_waiting_at_sigterm_reach_redis(served):
    chatd, client = served
    assert ask(chatd, "limited-token") == 200
    time.sleep(0.3)
    one = spend(client)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: ask(chatd, "limited-token"), range(8))) == [200] * 8
    chatd.stop()  # at once: the batch has had no time to go on its own
    assert spend(client) == pytest.approx(one * 9)


@pytest.mark.parametrize("served", [True], ids=["cache on"], indirect=True)
def test_a_cache_miss_of_a_limited_caller_costs_one_script_before_its_call(served):
    """One round trip before the upstream call (docs/shared-state.md): admission asks the
    cache too (the stored answer, or the flight's lock), so a miss is one EVALSHA, not
    two."""
    chatd, client = served
    for i in range(3):  # warm: the scripts are loaded once (NOSCRIPT, then EVAL)
        assert answer(chatd, "limited-token", f"warm {i}").headers["x-chatd-cache"] == "miss"
    time.sleep(0.3)
    before = calls(client)
    n = 40
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: answer(chatd, "limited-token", f"q {i}"), range(n)))
    elapsed = time.monotonic() - started
    time.sleep(0.3)  # the last batch: the answers stored, the locks let go
    assert [(r.status_code, r.headers["x-chatd-cache"]) for r in got] == [(200, "miss")] * n
    used = delta(before, calls(client))
    flushes = used.pop("evalsha") - n
    assert 1 <= flushes <= (elapsed + 0.3) / FLUSH_EVERY_SECS + 2, used  # two a miss: 2n
    assert used.pop("get") == 2 * n  # the spend and the stored answer, in the script
    assert used.pop("set") == 2 * n  # the lock taken in the script; the answer, behind
    assert used.pop("del") == n  # each lock let go, behind
    assert client.keys("chatd:l:*") == []  # no lock left over
    # Asked again: each is a hit from the same single script (the stored answer).
    before = calls(client)
    again = [answer(chatd, "limited-token", f"q {i}") for i in range(5)]
    assert [r.headers["x-chatd-cache"] for r in again] == ["hit"] * 5
    assert [r.json()["content"] for r in again] == [r.json()["content"] for r in got[:5]]
    time.sleep(0.3)
    used = delta(before, calls(client))
    assert used.pop("evalsha") - 5 <= 2 and used.pop("get") == 10, used
    assert "set" not in used, used  # a hit takes no lock
