"""The response cache: keys, Cache-Control, X-Chatd-Cache, replayed streams and
single flight — in process, against the real fake upstream (calls counted on the wire)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from chatd.config import CacheConfig
from chatd.routing.registry import Registry
from chatd.state.cache import Asked, ResponseCache, lock_key
from chatd.state.shared_local import LocalState
from tests.fakes.upstream import ANSWER, FakeUpstream
from tests.support import make_settings

USER = [{"role": "user", "content": "hi"}]


def settings_for(fake: FakeUpstream, **cache: Any) -> Any:
    return make_settings(
        {
            "ollama": {"kind": "ollama", "base_url": fake.url, "cooldown_failures": 0},
            "vendor": {"kind": "openai", "base_url": fake.url + "/v1", "cooldown_failures": 0},
        },
        models={"hot": "ollama/ok"},
        cache={"enabled": True, **cache},
    )


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream) -> None:
    fake.reset()


def upstream_calls(fake: FakeUpstream) -> int:
    return len([c for c in fake.calls if c.method == "POST"])


async def chat(client: httpx.AsyncClient, headers: dict[str, str] | None = None, **body: Any):
    payload = {"model": "ollama/ok", "messages": USER, **body}
    return await client.post("/v1/chat", json=payload, headers=headers)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")
    ]


async def test_second_identical_request_is_a_hit_without_an_upstream_call(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        first = await chat(client)
        second = await chat(client)
        via_alias = await chat(client, model="hot")  # the same resolved target: same entry
        metrics = (await client.get("/metrics")).text
    assert first.headers["x-chatd-cache"] == "miss"
    assert second.headers["x-chatd-cache"] == "hit" and via_alias.headers["x-chatd-cache"] == "hit"
    assert second.headers["x-chatd-attempts"] == "0"
    assert upstream_calls(fake) == 1
    a, b = first.json(), second.json()
    assert {**a, "latency_ms": 0} == {**b, "latency_ms": 0}
    assert b["content"] == ANSWER and b["provider"] == "ollama"
    assert 'chatd_cache_total{result="hit"} 2.0' in metrics
    assert 'chatd_cache_total{result="miss"} 1.0' in metrics


async def test_non_zero_temperature_is_never_cached_and_has_no_header(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        answers = [await chat(client, temperature=0.5) for _ in range(2)]
    assert upstream_calls(fake) == 2
    assert all("x-chatd-cache" not in r.headers for r in answers)


async def test_no_cache_skips_the_lookup_and_stores_no_store_does_neither(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        fresh_store = await chat(client, {"Cache-Control": "no-store"})
        after_no_store = await chat(client)  # nothing was stored: a miss
        hit = await chat(client)
        no_cache = await chat(client, {"Cache-Control": "no-cache"})
        still_hit = await chat(client)
    assert fresh_store.headers["x-chatd-cache"] == "bypass"
    assert after_no_store.headers["x-chatd-cache"] == "miss"
    assert hit.headers["x-chatd-cache"] == "hit"
    assert no_cache.headers["x-chatd-cache"] == "miss"
    assert still_hit.headers["x-chatd-cache"] == "hit"
    assert upstream_calls(fake) == 3  # no-store, the first miss, no-cache


async def test_every_parameter_is_part_of_the_key(app_client, fake):
    variants: list[dict[str, Any]] = [
        {},
        {"messages": [{"role": "user", "content": "hello"}]},
        {"max_tokens": 5},
        {"format": "json"},
        {"think": True},
        {"model": "ollama/ok:latest"},
        {"model": "vendor/ok"},
    ]
    async with app_client(settings_for(fake)) as client:
        firsts = [await chat(client, **v) for v in variants]
        seconds = [await chat(client, **v) for v in variants]
    assert [r.headers["x-chatd-cache"] for r in firsts] == ["miss"] * len(variants)
    assert [r.headers["x-chatd-cache"] for r in seconds] == ["hit"] * len(variants)
    assert upstream_calls(fake) == len(variants)


async def test_a_finished_stream_is_stored_and_replayed_as_one_delta_then_done(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        live = await chat(client, stream=True)
        await asyncio.sleep(0.05)  # the entry is stored off the answer's path
        replay = await chat(client, stream=True)
        plain = await chat(client)  # a stream and a plain request share the entry
    assert live.headers["x-chatd-cache"] == "miss"
    assert replay.headers["x-chatd-cache"] == "hit"
    assert replay.headers["content-type"].startswith("text/event-stream")
    replayed = events(replay)
    assert [list(e)[0] for e in replayed] == ["delta", "done"]
    assert replayed[0]["delta"] == ANSWER == "".join(e.get("delta", "") for e in events(live))
    assert replayed[1]["done"] is True and replayed[1]["provider"] == "ollama"
    assert replayed[1]["output_tokens"] == events(live)[-1]["output_tokens"]
    assert plain.headers["x-chatd-cache"] == "hit" and plain.json()["content"] == ANSWER
    assert upstream_calls(fake) == 1


async def test_an_error_is_not_cached_and_says_miss(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        answers = [await chat(client, model="ollama/fail-400") for _ in range(2)]
    assert [r.status_code for r in answers] == [502, 502]
    assert [r.headers["x-chatd-cache"] for r in answers] == ["miss", "miss"]
    assert upstream_calls(fake) == 2


async def test_completions_cache_only_explicit_temperature_zero(app_client, fake):
    base = {"model": "vendor/ok", "messages": USER}
    async with app_client(settings_for(fake)) as client:
        omitted = [await client.post("/v1/chat/completions", json=base) for _ in range(2)]
        zero = [
            await client.post("/v1/chat/completions", json={**base, "temperature": 0})
            for _ in range(2)
        ]
        streamed = await client.post(
            "/v1/chat/completions",
            json={
                **base,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        tools = await client.post(
            "/v1/chat/completions",
            json={
                **base,
                "temperature": 0,
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
        )
    assert upstream_calls(fake) == 4  # two omitted, one zero, one with tools
    assert all("x-chatd-cache" not in r.headers for r in omitted)
    assert [r.headers["x-chatd-cache"] for r in zero] == ["miss", "hit"]
    assert zero[1].json() == zero[0].json()
    assert zero[1].headers["x-chatd-provider"] == "vendor"
    assert streamed.headers["x-chatd-cache"] == "hit"
    lines = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-1]["usage"] == zero[0].json()["usage"]
    assert tools.headers["x-chatd-cache"] == "miss"


async def test_cache_off_changes_nothing(app_client, fake):
    settings = make_settings({"ollama": {"kind": "ollama", "base_url": fake.url}})
    async with app_client(settings) as client:
        answers = [await chat(client) for _ in range(2)]
        metrics = (await client.get("/metrics")).text
    assert upstream_calls(fake) == 2
    assert all("x-chatd-cache" not in r.headers for r in answers)
    assert "chatd_shared_state_up" not in metrics


# -- get_or_run: the API other routes (embeddings) use ---------------------------------------


def bare_cache(state: Any = None, max_bytes: int = 1 << 20) -> ResponseCache:
    settings = make_settings({"m": {"kind": "mock"}})
    return ResponseCache(
        CacheConfig(enabled=True, max_bytes=max_bytes),
        Registry.from_settings(settings),
        state=state,
    )


@pytest.mark.parametrize("shared", [False, True])
async def test_get_or_run_single_flight_runs_once_for_concurrent_callers(shared: bool) -> None:
    cache = bare_cache(LocalState() if shared else None)
    runs = 0

    async def run() -> bytes:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.1)
        return b"vector"

    answers = await asyncio.gather(*(cache.get_or_run("embed:x", run) for _ in range(20)))
    assert runs == 1
    assert [value for value, _ in answers] == [b"vector"] * 20
    assert sorted(result for _, result in answers) == ["hit"] * 19 + ["miss"]
    assert await cache.get_or_run("embed:x", run) == (b"vector", "hit")
    assert await cache.get_or_run("embed:y", run) == (b"vector", "miss")
    assert runs == 2


async def test_a_lock_taken_in_admission_is_let_go_when_this_process_already_has_the_flight() -> (
    None
):
    """Admission took the single-flight lock for B (docs/shared-state.md), but A, in this
    process, began the flight first: B joins it and lets its lock go, so A's flight can
    claim it and call once, rather than wait out the lock's 30 s."""
    cache = bare_cache(LocalState())
    runs = 0

    async def run() -> bytes:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        return b"answer"

    assert await cache.state.claim(lock_key("k"), 30)  # B's, landed before A's own look
    first = asyncio.create_task(cache.get_or_run("k", run))
    await asyncio.sleep(0)  # A's flight is there; its look found the lock held
    asked = Asked(None, True)
    second = await asyncio.wait_for(cache.get_or_run("k", run, asked=asked), 2)
    assert second == (b"answer", "hit") and await first == (b"answer", "miss")
    assert runs == 1 and not asked.claimed


async def test_get_or_run_shares_an_error_and_stores_nothing() -> None:
    cache = bare_cache()
    runs = 0

    async def run() -> bytes:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.05)
        raise RuntimeError("upstream broke")

    results = await asyncio.gather(
        *(cache.get_or_run("k", run) for _ in range(5)), return_exceptions=True
    )
    assert runs == 1 and all(isinstance(r, RuntimeError) for r in results)
    assert await cache.get("k") is None


async def test_a_waiter_leaving_does_not_cancel_the_others_call() -> None:
    cache = bare_cache()

    async def run() -> bytes:
        await asyncio.sleep(0.2)
        return b"done"

    leaver = asyncio.ensure_future(cache.get_or_run("k", run))
    stayer = asyncio.ensure_future(cache.get_or_run("k", run))
    await asyncio.sleep(0.05)
    leaver.cancel()
    assert await stayer == (b"done", "hit")


async def test_the_last_waiter_leaving_cancels_the_call_and_the_next_one_runs_anew() -> None:
    cache = bare_cache()
    started, cancelled = [], []

    async def run() -> bytes:
        started.append(1)
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            cancelled.append(1)
            raise
        return b"done"

    waiters = [asyncio.ensure_future(cache.get_or_run("k", run)) for _ in range(2)]
    await asyncio.sleep(0.05)
    for waiter in waiters:
        waiter.cancel()
    await asyncio.sleep(0.01)
    assert (started, cancelled) == ([1], [1])
    assert await cache.get_or_run("k", run) == (b"done", "miss")
    assert started == [1, 1]


async def test_in_process_cache_never_exceeds_max_bytes() -> None:
    cache = bare_cache(max_bytes=10_000)
    for i in range(100):
        await cache.get_or_run(f"k{i}", lambda: asyncio.sleep(0, b"x" * 900))
        assert cache.lru.bytes <= 10_000
    assert await cache.get("k99") is not None and await cache.get("k0") is None


# -- embeddings: cached per input ----------------------------------------------------------


async def embed(client: httpx.AsyncClient, inputs: list[str], **extra: Any) -> httpx.Response:
    body = {"model": "ollama/ok", "input": inputs, **extra}
    return await client.post("/v1/embeddings", json=body)


def embed_inputs_sent(fake: FakeUpstream) -> list[list[str]]:
    return [c.json["input"] for c in fake.calls if c.path == "/api/embed"]


async def test_embeddings_are_cached_per_input(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        first = await embed(client, ["alpha", "beta"])
        await asyncio.sleep(0.05)  # vectors are stored off the answer's path
        again = await embed(client, ["beta", "alpha"])
        partly = await embed(client, ["alpha", "gamma", "beta"])
        await asyncio.sleep(0.05)
        based = await embed(client, ["gamma"], encoding_format="base64")
    assert first.status_code == again.status_code == partly.status_code == 200
    assert first.headers["x-chatd-cache"] == "miss"
    assert again.headers["x-chatd-cache"] == "hit" and again.headers["x-chatd-attempts"] == "0"
    assert again.json()["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    vectors = {d["index"]: d["embedding"] for d in first.json()["data"]}
    swapped = {d["index"]: d["embedding"] for d in again.json()["data"]}
    assert swapped == {0: vectors[1], 1: vectors[0]}  # in the caller's order
    # Only the input never seen went upstream; the answer keeps the request's order.
    assert embed_inputs_sent(fake) == [["alpha", "beta"], ["gamma"]]
    assert partly.headers["x-chatd-cache"] == "miss"
    data = partly.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert data[0]["embedding"] == vectors[0] and data[2]["embedding"] == vectors[1]
    assert based.headers["x-chatd-cache"] == "hit"
    assert isinstance(based.json()["data"][0]["embedding"], str)  # base64 of the stored floats


async def test_embeddings_no_store_reaches_the_upstream_every_time(app_client, fake):
    async with app_client(settings_for(fake)) as client:
        for _ in range(2):
            response = await client.post(
                "/v1/embeddings",
                json={"model": "ollama/ok", "input": "same"},
                headers={"Cache-Control": "no-store"},
            )
            assert response.headers["x-chatd-cache"] == "bypass"
    assert embed_inputs_sent(fake) == [["same"], ["same"]]
