"""Callers in process: the sliding windows, periods, prices, upstream cost parsing,
config, and that with no callers admission is the do-nothing function."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from chatd.app import create_app
from chatd.config import ConfigError, Price, build_settings
from chatd.providers.openai import parse_openai_response, upstream_cost
from chatd.state.callers import Callers, MemoryStore, format_reset, period_bounds
from chatd.state.usage.prices import Prices
from tests.support import make_settings


def test_a_sliding_window_refuses_past_its_limit_and_says_when_room_frees() -> None:
    store = MemoryStore()
    assert store.hit("k", 1, 2, 60)[:2] == (True, 1)
    assert store.hit("k", 1, 2, 60)[:2] == (True, 0)
    allowed, remaining, reset = store.hit("k", 1, 2, 60)
    assert (allowed, remaining) == (False, 0) and 59 < reset <= 60
    assert store.hit("k", 0, 2, 60)[0] is False  # looking does not count
    assert store.hit("short", 1, 1, 0.05)[0] and not store.hit("short", 1, 1, 0.05)[0]
    time.sleep(0.08)
    assert store.hit("short", 1, 1, 0.05)[0]  # the window slid


def test_a_token_window_counts_past_its_limit_and_waits_for_enough_to_expire() -> None:
    store = MemoryStore()
    store.hit("t", 700, 0, 60)  # limit 0: always counted (a call ends over the limit)
    store.hit("t", 700, 0, 60)
    allowed, remaining, _ = store.hit("t", 0, 1000, 60)
    assert (allowed, remaining) == (False, 0)


def test_counters_expire() -> None:
    store = MemoryStore()
    assert store.incr("s", 0.5, 60) == 0.5 and store.incr("s", 0.25, 60) == 0.75
    store.incr("gone", 1.0, 0.01)
    time.sleep(0.03)
    assert store.value("gone") == 0.0 and store.value("s") == 0.75


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("day", "2026-11-26T00:00:00+00:00", "2026-11-27T00:00:00+00:00"),
        ("week", "2026-11-23T00:00:00+00:00", "2026-11-30T00:00:00+00:00"),
        ("month", "2026-11-01T00:00:00+00:00", "2026-12-01T00:00:00+00:00"),
    ],
)
def test_budget_periods_are_utc_calendar_periods(period: str, start: str, end: str) -> None:
    now = datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC)  # a Thursday
    assert [t.isoformat() for t in period_bounds(period, now)] == [start, end]
    december = period_bounds("month", datetime(2026, 12, 31, 12, tzinfo=UTC))
    assert december[1].isoformat() == "2027-01-01T00:00:00+00:00"


def test_reset_durations_read_like_openais() -> None:
    assert [format_reset(s) for s in (0.25, 1, 59.2, 60, 361)] == [
        "250ms", "1s", "1m0s", "1m0s", "6m1s"
    ]  # fmt: skip


def test_the_most_specific_price_wins() -> None:
    prices = Prices(
        {
            "*": Price(input=1, output=1),
            "openrouter/*": Price(input=2, output=2),
            "openrouter/anthropic/*": Price(input=15, output=75),
            "openrouter/anthropic/claude-opus-4-7": Price(input=20, output=80),
        }
    )
    facts: dict[str, Any] = {"provider": "openrouter", "input_tokens": 1_000_000}
    cost = lambda model: prices.cost({**facts, "upstream_model": model})  # noqa: E731
    assert cost("anthropic/claude-opus-4-7") == (20.0, "price")
    assert cost("anthropic/claude-x") == (15.0, "price")
    assert cost("openai/gpt") == (2.0, "price")
    assert prices.cost({**facts, "provider": "ollama", "upstream_model": "q"}) == (1.0, "price")
    assert prices.cost({**facts, "cost_usd": 0.5}) == (0.5, "upstream")
    assert Prices({}).cost(facts) == (0.0, "none")


def test_openrouters_usage_cost_is_read() -> None:
    body = {
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "cost": 0.00042},
    }
    assert parse_openai_response(None, body).cost == 0.00042  # type: ignore[arg-type]
    assert upstream_cost({"cost": True}) is None and upstream_cost({"cost": "1"}) is None
    assert upstream_cost({}) is None and upstream_cost(None) is None


def test_callers_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="chatd.callers.a.rpm"):
        build_settings({"chatd": {"callers": {"a": {"token_env": "T", "rpm": -1}}}})
    with pytest.raises(ConfigError, match="chatd.callers.a.colour"):
        build_settings({"chatd": {"callers": {"a": {"token_env": "T", "colour": 1}}}})
    with pytest.raises(ConfigError, match="chatd.usage_db"):
        build_settings({"chatd": {"usage_db": "mysql://u:pw@h/db"}})
    settings = build_settings({"chatd": {"callers": {"a": {"token_env": "T"}}}})
    with pytest.raises(ConfigError, match="chatd.callers.a.token_env"):
        Callers.from_settings(settings, {}).check()  # type: ignore[union-attr]
    both = build_settings(
        {"chatd": {"auth_tokens_env": "D", "callers": {"default": {"token_env": "T"}}}}
    )
    with pytest.raises(ConfigError, match="chatd.callers.default"):
        Callers.from_settings(both, {"D": "x", "T": "y"})


def test_auth_tokens_env_tokens_are_the_default_caller_with_no_limits() -> None:
    settings = build_settings(
        {"chatd": {"auth_tokens_env": "D", "callers": {"a": {"token_env": "T", "rpm": 1}}}}
    )
    callers = Callers.from_settings(settings, {"D": "dtok", "T": "atok"})
    assert callers is not None
    default = callers.identify(b"dtok")
    assert default is not None and default.name == "default" and not default.limited
    assert callers.identify(b"atok").name == "a"  # type: ignore[union-attr]
    assert callers.identify(b"nope") is None


def test_with_no_callers_there_is_no_admission_to_await() -> None:
    app = create_app(make_settings())
    assert app.state.admit is None
    assert app.state.operations.callers is None and app.state.operations.ledger is None


async def test_tokens_count_when_a_call_ends_and_tpm_then_refuses(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("T_TPM", "tok-tpm")
    settings = make_settings(
        providers={"mock": {"kind": "mock"}},
        default_provider="mock",
        callers={"t": {"token_env": "T_TPM", "tpm": 10}},
    )
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "one two three four"}]}
    headers = {"x-api-key": "tok-tpm"}
    async with app_client(settings) as client:
        first = await client.post("/v1/chat", json=body, headers=headers)  # 4 in + 4 out
        second = await client.post("/v1/chat", json=body, headers=headers)  # 16: over, admitted
        third = await client.post("/v1/chat", json=body, headers=headers)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "10"
    assert second.status_code == 200 and second.headers["x-ratelimit-remaining-tokens"] == "2"
    assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limited"
    assert 55 <= int(third.headers["retry-after"]) <= 60
    assert third.headers["x-ratelimit-limit-tokens"] == "10"


async def test_max_concurrency_refuses_the_extra_call_and_gives_slots_back(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    monkeypatch.setenv("T_CONC", "tok-conc")
    settings = make_settings(
        providers={"mock": {"kind": "mock", "latency_ms": 300}},
        default_provider="mock",
        callers={"c": {"token_env": "T_CONC", "max_concurrency": 1}},
    )
    body = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": "Bearer tok-conc"}
    async with app_client(settings) as client:
        slow = asyncio.ensure_future(client.post("/v1/chat", json=body, headers=headers))
        await asyncio.sleep(0.1)
        refused = await client.post("/v1/chat", json=body, headers=headers)
        assert (await slow).status_code == 200
        again = await client.post("/v1/chat", json=body, headers=headers)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert again.status_code == 200


def test_check_config_never_shows_the_ledgers_password() -> None:
    from chatd.check_config import describe_usage_db

    shown = describe_usage_db("postgresql://chatd:s3cret-pw@db.internal:5432/usage")
    assert "s3cret-pw" not in shown and shown.startswith("postgresql://chatd:***@db.internal")
    assert describe_usage_db("") == "off"


async def test_a_flush_cancelled_mid_write_neither_loses_nor_repeats_rows() -> None:
    """`/v1/usage` gives up on a slow flush (wait_for): the batch in flight must land once."""
    import asyncio

    from chatd.state.usage.writer import UsageWriter

    class SlowBackend:  # like the SQLite one: the write runs on a thread, uncancellable
        def __init__(self) -> None:
            self.rows: list[tuple[int]] = []

        def _write(self, rows: list[tuple[int]]) -> None:
            time.sleep(0.2)
            self.rows.extend(rows)

        async def write(self, rows: list[tuple[int]], key: str = "") -> None:
            await asyncio.get_running_loop().run_in_executor(None, self._write, rows)

    backend = SlowBackend()
    writer = UsageWriter(backend, max_rows=1000)  # type: ignore[arg-type]
    for n in range(5):
        writer.enqueue((n,))  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(writer.flush(), 0.05)
    writer.enqueue((5,))  # type: ignore[arg-type]
    assert await writer.flush()
    await asyncio.sleep(0.3)  # the shielded first write ends
    assert sorted(backend.rows) == [(n,) for n in range(6)]
    assert writer.written == 6 and not writer.rows
