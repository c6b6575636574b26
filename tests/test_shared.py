"""Shared state: one suite, run against `LocalState` and against `RedisState` on
a real redis-server; then Redis going away and coming back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chatd.state.shared import SharedState
from chatd.state.shared_local import BytesLRU, LocalState
from chatd.state.shared_redis import RedisState, describe_url
from tests.redis_server import RedisServer


@pytest.fixture(params=["local", "redis"])
async def state(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SharedState]:
    if request.param == "local":
        yield LocalState(blob_max_bytes=1 << 20)
        return
    with RedisServer(tmp_path) as server:
        store = RedisState(server.url, op_timeout=1.0)
        await store.start()
        assert store.up
        try:
            yield store
        finally:
            await store.aclose()


# -- sliding window ---------------------------------------------------------------------


async def test_window_allows_exactly_limit_then_refuses(state: SharedState) -> None:
    results = [await state.window_hit("c:rpm", 1, 3, 60) for _ in range(5)]
    assert [allowed for allowed, _, _ in results] == [True, True, True, False, False]
    assert [remaining for _, remaining, _ in results] == [2, 1, 0, 0, 0]
    reset = results[-1][2]
    assert 55 < reset <= 60


async def test_window_counts_amounts_and_a_refused_hit_is_not_counted(state: SharedState):
    assert (await state.window_hit("c:tpm", 70, 100, 60))[:2] == (True, 30)
    assert (await state.window_hit("c:tpm", 40, 100, 60))[:2] == (False, 30)
    assert (await state.window_hit("c:tpm", 30, 100, 60))[:2] == (True, 0)


async def test_window_amount_zero_only_asks(state: SharedState) -> None:
    assert (await state.window_hit("c:t", 0, 10, 60))[:2] == (True, 10)
    await state.window_hit("c:t", 10, 10, 60)
    assert (await state.window_hit("c:t", 0, 10, 60))[0] is False


async def test_window_without_limit_always_counts(state: SharedState) -> None:
    await state.window_hit("c:u", 5, 10, 60)
    allowed, _, _ = await state.window_hit("c:u", 50, 0, 60)  # a finished call's tokens
    assert allowed
    assert (await state.window_hit("c:u", 0, 10, 60))[0] is False  # now over


async def test_window_slides(state: SharedState) -> None:
    assert (await state.window_hit("c:s", 1, 1, 0.3))[0]
    assert not (await state.window_hit("c:s", 1, 1, 0.3))[0]
    await asyncio.sleep(0.4)
    assert (await state.window_hit("c:s", 1, 1, 0.3))[0]


async def test_windows_are_per_key(state: SharedState) -> None:
    assert (await state.window_hit("a", 1, 1, 60))[0]
    assert (await state.window_hit("b", 1, 1, 60))[0]


async def test_concurrent_hits_never_exceed_the_limit(state: SharedState) -> None:
    results = await asyncio.gather(*(state.window_hit("c:race", 1, 7, 60) for _ in range(30)))
    assert sum(allowed for allowed, _, _ in results) == 7


# -- counters -----------------------------------------------------------------------------


async def test_add_accumulates_floats_and_expires(state: SharedState) -> None:
    assert await state.get("spend") == 0
    assert await state.add("spend", 0.25, 0.5) == pytest.approx(0.25)
    assert await state.add("spend", 1.5, 0.5) == pytest.approx(1.75)
    assert await state.get("spend") == pytest.approx(1.75)
    await asyncio.sleep(0.7)
    assert await state.get("spend") == 0
    assert await state.add("spend", 1, 60) == pytest.approx(1)


async def test_raise_to_brings_a_counter_up_never_down_nor_twice(state: SharedState) -> None:
    await state.add("spend:r", 1.5, 60)
    await state.raise_to("spend:r", 1.0, 60)
    assert await state.get("spend:r") == pytest.approx(1.5)
    await asyncio.gather(*(state.raise_to("spend:r", 4.0, 60) for _ in range(5)))
    assert await state.get("spend:r") == pytest.approx(4.0)


async def test_admit_counts_a_request_only_when_every_limit_allows(state: SharedState) -> None:
    await state.add("spend:a", 5.0, 60)
    over = await state.admit(("rpm:a", 10), ("tpm:a", 100), ("spend:a", 5.0), 60, True)
    assert over.spent == pytest.approx(5.0) and over.requests == (True, 10, 0)
    fine = await state.admit(("rpm:b", 2), ("tpm:b", 100), ("spend:b", 5.0), 60, True)
    assert fine.spent == 0 and fine.tokens is not None and fine.tokens[:2] == (True, 100)
    assert fine.requests is not None and fine.requests[:2] == (True, 1)
    busy = await state.admit(("rpm:b", 2), None, None, 60, False)  # refused in process
    assert busy.requests is not None and busy.requests[:2] == (True, 1) and busy.tokens is None
    await state.admit(("rpm:b", 2), None, None, 60, True)
    full = await state.admit(("rpm:b", 2), None, None, 60, True)
    assert full.requests is not None and full.requests[:2] == (False, 0)


async def test_writes_behind_arrive_merged_after_flush(state: SharedState) -> None:
    for _ in range(3):
        state.count_later("tpm:c", 10, 60)
        state.add_later("spend:c", 0.25, 60)
    state.set_flag_later("cooldown:x", 30)
    await state.flush()
    assert (await state.window_hit("tpm:c", 0, 100, 60))[:2] == (True, 70)
    assert await state.get("spend:c") == pytest.approx(0.75)
    assert await state.flag_remaining("cooldown:x") > 29


async def test_get_or_claim_then_stored_behind_with_its_unlock(state: SharedState) -> None:
    assert await state.get_or_claim("blob:q", "lock:q", 30) == (None, True)
    assert await state.get_or_claim("blob:q", "lock:q", 30) == (None, False)  # held
    state.set_blob_later("blob:q", b"answer", 60, unlock="lock:q")
    await state.flush()
    assert await state.get_or_claim("blob:q", "lock:q", 30) == (b"answer", False)
    assert await state.claim("lock:q", 30)  # released with the store


async def test_concurrent_adds_are_not_lost(state: SharedState) -> None:
    await asyncio.gather(*(state.add("n", 0.5, 60) for _ in range(40)))
    assert await state.get("n") == pytest.approx(20)


# -- flags ----------------------------------------------------------------------------------


async def test_flag_counts_down_and_drops(state: SharedState) -> None:
    assert await state.flag_remaining("cool:x") == 0
    await state.set_flag("cool:x", 0.5)
    left = await state.flag_remaining("cool:x")
    assert 0.2 < left <= 0.5
    assert await state.flags_remaining(["cool:x", "cool:y"]) == [pytest.approx(left, abs=0.2), 0]
    await asyncio.sleep(0.6)
    assert await state.flag_remaining("cool:x") == 0


# -- blobs and locks ------------------------------------------------------------------------


async def test_blob_round_trip_and_ttl(state: SharedState) -> None:
    assert await state.get_blob("k") is None
    await state.set_blob("k", b"\x00answer\xff", 0.4)
    assert await state.get_blob("k") == b"\x00answer\xff"
    await asyncio.sleep(0.5)
    assert await state.get_blob("k") is None


async def test_claim_is_exclusive_until_released_or_expired(state: SharedState) -> None:
    assert await state.claim("job", 0.4)
    assert not await state.claim("job", 0.4)
    await state.release("job")
    assert await state.claim("job", 0.3)
    await asyncio.sleep(0.4)
    assert await state.claim("job", 0.3)


# -- two replicas on one Redis ----------------------------------------------------------------


async def test_two_replicas_share_one_window_and_spend(tmp_path: Path) -> None:
    """What callers' rpm and budget rely on: the limit is the fleet's, not each's."""
    with RedisServer(tmp_path) as server:
        a, b = RedisState(server.url, op_timeout=1.0), RedisState(server.url, op_timeout=1.0)
        await a.start()
        await b.start()
        try:
            hits = await asyncio.gather(*(s.window_hit("caller:rpm", 1, 5, 60) for s in (a, b) * 6))
            assert sum(allowed for allowed, _, _ in hits) == 5
            await a.add("caller:spend", 2.5, 3600)
            assert await b.get("caller:spend") == pytest.approx(2.5)
            await b.set_flag("cooldown:ollama", 30)
            assert await a.flag_remaining("cooldown:ollama") > 29
        finally:
            await a.aclose()
            await b.aclose()


# -- Redis away and back ------------------------------------------------------------------------


async def test_redis_down_falls_back_then_recovers_by_itself(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as redis_server:
        await down_and_back(redis_server)


async def down_and_back(redis_server: RedisServer) -> None:
    changes: list[bool] = []
    store = RedisState(redis_server.url, on_up=changes.append, check_every=0.1)
    await store.start()
    try:
        assert store.up and changes == [True]
        await store.set_blob("k", b"shared", 60)
        redis_server.kill()
        started = time.monotonic()
        assert (await store.window_hit("w", 1, 1, 60))[0]  # served locally, at once
        assert await store.get_blob("k") is None  # the local fallback never saw it
        assert time.monotonic() - started < 1.0
        assert not store.up and changes == [True, False]
        assert (await store.probe())["reachable"] is False
        redis_server.start()
        for _ in range(50):
            if store.up:
                break
            await asyncio.sleep(0.1)
        assert store.up and changes == [True, False, True]
        await store.set_blob("k", b"again", 60)
        assert await redis_server_value(redis_server, "chatd:b:k") == b"again"
    finally:
        await store.aclose()


async def test_a_budget_spent_in_redis_stays_spent_when_redis_dies(tmp_path: Path) -> None:
    """The fallback starts from the spend Redis last reported: an outage does not give a
    budget back to every replica."""
    with RedisServer(tmp_path) as redis_server:
        store = RedisState(redis_server.url, check_every=0.1)
        await store.start()
        try:
            await store.add("spend:team", 4.5, 3600)  # spent through other replicas
            seen = await store.admit(None, None, ("spend:team", 5.0), 60, True)
            assert seen.spent == pytest.approx(4.5)
            redis_server.kill()
            while store.up:
                await store.check()
            after = await store.admit(None, None, ("spend:team", 5.0), 60, True)
            assert after.spent == pytest.approx(4.5)  # served locally, spend kept
            await store.add("spend:team", 0.6, 3600)  # a call settled during the outage
            over = await store.admit(None, None, ("spend:team", 5.0), 60, True)
            assert over.spent == pytest.approx(5.1)  # over budget: the caller is refused
        finally:
            await store.aclose()


async def test_writes_behind_reach_a_redis_that_is_slow_for_a_moment(tmp_path: Path) -> None:
    """A batch is off every request's path: a Redis that answers it late (here: paused
    for 0.4 s, past a request's 200 ms bound) still gets it, once. Kept in process only,
    that spend would be missing from every replica's budget (docs/shared-state.md)."""
    import os
    import signal

    with RedisServer(tmp_path) as redis_server:
        store = RedisState(redis_server.url, check_every=30)
        await store.start()
        try:
            store.add_later("spend:team", 0.25, 3600)
            assert redis_server.proc is not None
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                flushing = asyncio.ensure_future(store.flush())
                await asyncio.sleep(0.4)
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await flushing
            held = await redis_server_value(redis_server, "chatd:n:spend:team")
            assert held is not None and float(held) == pytest.approx(0.25)
        finally:
            await store.aclose()


async def test_start_with_redis_unreachable_serves_locally(tmp_path: Path) -> None:
    from tests.support import free_port

    store = RedisState(f"redis://127.0.0.1:{free_port()}/0", check_every=0.1)
    await store.start()  # must not raise nor hang
    try:
        assert not store.up
        assert (await store.window_hit("w", 1, 1, 60))[0]
        assert not (await store.window_hit("w", 1, 1, 60))[0]
    finally:
        await store.aclose()


async def test_the_batch_loop_sends_writes_by_itself_after_idle_stretches(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    with RedisServer(tmp_path) as server:
        store = RedisState(server.url, op_timeout=1.0, flush_every=0.05)
        await store.start()
        client = Redis.from_url(server.url)

        async def scripts() -> int:  # EVALSHA run so far (the monitor only PINGs)
            return (await client.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)

        try:
            store.add_later("spend:idle", 0.5, 60)
            await asyncio.sleep(0.3)  # no flush() from here: the loop sends the batch
            assert float(await client.get("chatd:n:spend:idle") or 0) == 0.5
            idle = await scripts()
            await asyncio.sleep(0.3)  # six intervals with nothing written: nothing sent
            assert await scripts() == idle
            store.add_later("spend:idle", 0.25, 60)
            await asyncio.sleep(0.3)
            assert float(await client.get("chatd:n:spend:idle") or 0) == 0.75
            assert await scripts() == idle + 1  # one batch
        finally:
            await client.aclose()
            await store.aclose()


async def redis_server_value(server: RedisServer, key: str) -> bytes | None:
    from redis.asyncio import Redis

    client = Redis.from_url(server.url)
    try:
        value = await client.get(key)
        return bytes(value) if value is not None else None
    finally:
        await client.aclose()


# -- pieces ----------------------------------------------------------------------------------------


def test_bytes_lru_never_exceeds_max_bytes_and_evicts_least_recent() -> None:
    lru = BytesLRU(100)
    lru.set("a", b"x" * 40, 60)
    lru.set("b", b"x" * 40, 60)
    assert lru.get("a") is not None  # a is now the most recent
    lru.set("c", b"x" * 40, 60)
    assert lru.bytes <= 100
    assert lru.get("b") is None and lru.get("a") is not None and lru.get("c") is not None
    lru.set("huge", b"x" * 200, 60)  # larger than the whole cache: not stored, nothing evicted
    assert lru.get("huge") is None and len(lru) == 2


def test_redis_url_is_described_without_credentials() -> None:
    assert describe_url("redis://user:s3cret@cache:6379/0") == "redis://cache:6379/0"
    assert "s3cret" not in describe_url("rediss://:s3cret@h/1")


# -- configuration ----------------------------------------------------------------------------


def test_redis_url_and_cache_config_keys() -> None:
    from chatd.check_config import describe_settings
    from chatd.config import ConfigError, build_settings

    settings = build_settings(
        {"chatd": {"redis_url": "redis://:hunter2@cache:6379/0", "cache": {"enabled": True}}}
    )
    assert settings.chatd.cache.ttl_secs == 600 and settings.chatd.cache.max_bytes == 64 << 20
    described = describe_settings(settings)
    assert "hunter2" not in described and "redis://cache:6379/0" in described
    assert "cache: on, ttl_secs=600, redis" in described
    assert build_settings({}).chatd.redis_url == "" and not build_settings({}).chatd.cache.enabled
    with pytest.raises(ConfigError, match="chatd.redis_url") as bad:
        build_settings({"chatd": {"redis_url": "http://:hunter2@cache"}})
    assert "hunter2" not in str(bad.value)
    with pytest.raises(ConfigError, match="chatd.cache.ttl: unknown key"):
        build_settings({"chatd": {"cache": {"ttl": 5}}})
