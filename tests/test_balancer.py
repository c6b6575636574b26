"""Unit tests: the balancer's estimates and choice, its queue, hedging, and the config."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatd.config import ConfigError, ProviderConfig, build_settings
from chatd.errors import ProviderCoolingDown, ProviderOverloaded, UpstreamError
from chatd.routing.balancer import IDLE_SECS, Balancer, Endpoint
from chatd.routing.dispatch import Dispatcher
from chatd.routing.hedging import race
from chatd.routing.registry import Registry
from chatd.types import ChatRequest, StreamEvent
from tests.test_resilience import Scripted, ask, status, unreachable


def endpoints(*names: str, weights: tuple[float, ...] = (), **config: Any) -> list[Scripted]:
    made = []
    for i, name in enumerate(names):
        provider = Scripted("p", "ok", **config)
        provider.endpoint = name
        provider.weight = weights[i] if weights else 1.0
        made.append(provider)
    return made


def balancer(*names: str, rand: Any = None, clock: Any = None, **config: Any) -> Balancer:
    weights = config.pop("weights", ())
    providers = endpoints(*names, weights=weights, **config)
    cfg = ProviderConfig(kind="mock", **config)
    given = {"rand": rand, "clock": clock}
    return Balancer("p", cfg, providers, **{k: v for k, v in given.items() if v})


def by_name(b: Balancer) -> dict[str, Endpoint]:
    return {e.name: e for e in b.endpoints}


def seed(endpoint: Endpoint, seconds: float, now: float | None = None) -> None:
    """Set both estimates to `seconds` per call, as if sampled at `now` (default: now)."""
    endpoint.forget()
    endpoint.observe(seconds, time.monotonic() if now is None else now)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- choosing --------------------------------------------------------------------


def test_p2c_sends_to_the_lower_load_of_two() -> None:
    b = balancer("a", "b")
    e = by_name(b)
    seed(e["a"], 0.5)
    seed(e["b"], 0.05)
    assert {b.choose().name for _ in range(50)} == {"b"}
    e["b"].guard.limiter.busy = 20  # 0.05 × 21 > 0.5 × 1
    assert {b.choose().name for _ in range(50)} == {"a"}


def test_an_endpoint_with_no_sample_counts_as_fastest_once() -> None:
    b = balancer("a", "b")
    e = by_name(b)
    seed(e["a"], 0.001)
    assert {b.choose().name for _ in range(20)} == {"b"}
    e["b"].guard.limiter.busy = 1  # its first call has not answered yet: try the others
    assert {b.choose().name for _ in range(20)} == {"a"}


def test_p2c_weights_bias_the_draw() -> None:
    b = balancer("a", "b", "c", weights=(1, 1, 4))
    counts = Counter(b.choose().name for _ in range(3000))
    assert counts["c"] > 1.5 * max(counts["a"], counts["b"])


def test_load_divides_by_weight() -> None:
    b = balancer("a", "b", weights=(1, 4))
    e = by_name(b)
    seed(e["a"], 0.1)
    seed(e["b"], 0.1)
    e["b"].guard.limiter.busy = 2  # 0.1 × 3 ÷ 4 < 0.1 × 1 ÷ 1
    assert {b.choose().name for _ in range(20)} == {"b"}


def test_round_robin_is_smooth_and_weighted() -> None:
    b = balancer("a", "b", "c", balance="round_robin", weights=(1, 1, 2))
    picks = [b.choose().name for _ in range(8)]
    assert picks == ["c", "a", "b", "c"] * 2


def test_a_retry_excludes_the_endpoint_that_failed_when_there_is_another() -> None:
    b = balancer("a", "b", "c")
    a = by_name(b)["a"]
    assert all(b.choose(exclude=a).name != "a" for _ in range(50))
    only = balancer("a")
    assert only.choose(exclude=only.endpoints[0]) is only.endpoints[0]


def test_cooling_endpoints_are_skipped_and_all_cooling_is_503() -> None:
    b = balancer("a", "b", cooldown_failures=1, cooldown_secs=30)
    e = by_name(b)
    e["a"].guard.breaker.failed()
    assert {b.choose().name for _ in range(20)} == {"b"}
    e["b"].guard.breaker.failed()
    with pytest.raises(ProviderCoolingDown) as caught:
        b.choose()
    assert "every endpoint" in caught.value.message
    assert caught.value.headers["Retry-After"] == "30"


def test_a_cooldown_forgets_the_latency_estimate() -> None:
    b = balancer("a", cooldown_failures=1, cooldown_secs=30)
    a = b.endpoints[0]
    seed(a, 3.0)
    b.finished(a, 0.001, unreachable())
    assert a.latency.value is None and a.service.value is None  # counts as new once back


def test_peak_ewma_takes_a_slow_sample_at_once_and_forgets_it_with_time() -> None:
    a = balancer("a").endpoints[0]
    a.observe(0.05, now=0.0)
    a.observe(0.5, now=0.1)
    assert a.ewma == 0.5
    a.observe(0.05, now=0.2)
    assert a.ewma > 0.45  # one fast sample soon after barely moves it
    a.observe(0.05, now=10.0)
    assert a.ewma < 0.06  # much later, it does


# -- the service estimate, on the balancer's own clock ------------------------------------


def test_a_host_that_queues_is_not_counted_twice() -> None:
    clock = Clock()
    b = balancer("queues", "slow", clock=clock)
    e = by_name(b)
    # 50 ms a call, one at a time: the 8th call sent waits for 7, answers after 400 ms
    for sent_with in range(1, 9):
        clock.now += 0.05
        b.finished(e["queues"], 0.05 * sent_with, None, sent_with)
    b.finished(e["slow"], 0.5, None, 1)  # 10x slower, idle
    e["queues"].guard.limiter.busy = 8
    assert e["queues"].service.read(clock.now) == pytest.approx(0.05)
    assert e["queues"].load(clock.now) == pytest.approx(0.45)  # 9 calls × 50 ms
    assert e["queues"].ewma == pytest.approx(0.4)  # the latency estimate is kept as seen
    assert {b.choose().name for _ in range(20)} == {"queues"}  # 0.45 s < 0.5 s


def test_a_host_whose_latency_does_not_grow_is_loaded_by_its_latency() -> None:
    clock = Clock()
    b = balancer("wide", "queues", clock=clock)
    e = by_name(b)
    for _ in range(8):  # both with 8 calls in flight: 100 ms each, against 400 ms queued
        clock.now += 0.01
        b.finished(e["wide"], 0.1, None, 8)
        b.finished(e["queues"], 0.4, None, 8)
    e["wide"].guard.limiter.busy = e["queues"].guard.limiter.busy = 8
    assert e["wide"].load(clock.now) == pytest.approx(0.1 * 9 / 8)  # ≈ its 100 ms
    assert e["queues"].load(clock.now) == pytest.approx(0.45)  # 9 calls × 50 ms
    assert {b.choose().name for _ in range(20)} == {"wide"}


def test_service_fades_while_the_endpoint_answers_nothing() -> None:
    clock = Clock()
    b = balancer("fast", "slow", clock=clock)
    e = by_name(b)
    seed(e["slow"], 0.5, now=0.0)
    seed(e["fast"], 0.05, now=0.0)
    e["fast"].guard.limiter.busy = 8  # fast: 0.05 × 9 = 0.45 s
    assert {b.choose().name for _ in range(20)} == {"fast"}
    clock.now = IDLE_SECS
    assert e["slow"].service.read(clock.now) == pytest.approx(0.5 / 2.718281828, rel=1e-6)
    seed(e["fast"], 0.05, now=clock.now)  # fast keeps answering
    assert {b.choose().name for _ in range(20)} == {"slow"}  # 0.18 s: tried again
    assert e["slow"].latency.value == 0.5  # the latency estimate does not fade
    assert b.describe()[1]["service_ms"] == pytest.approx(183.9, abs=0.1)


def test_a_first_sample_is_taken_as_it_is_and_replaced_by_the_next() -> None:
    clock = Clock()
    b = balancer("new", "old", clock=clock)
    e = by_name(b)
    seed(e["old"], 0.001, now=0.0)
    assert e["new"].load(0.0) == 0.0  # never sampled: fastest
    e["new"].guard.limiter.busy = 1
    assert e["new"].load(0.0) > 1000  # once: its first call has not answered yet
    clock.now = 1.0
    b.finished(e["new"], 0.3, None, 3)
    assert e["new"].service.value == pytest.approx(0.1)
    assert e["new"].ewma == pytest.approx(0.3)
    assert b.describe()[0]["service_ms"] == 100.0
    # a lone first answer is a probe (it may have opened the connection): the next replaces it
    clock.now = 1.01
    b.finished(e["new"], 0.04, None, 2)
    assert (e["new"].service.value, e["new"].ewma) == (0.02, 0.04)
    b.finished(e["new"], 0.002, None, 1)  # from the second on, a dip pulls slowly
    assert e["new"].service.value == pytest.approx(0.02, rel=0.01)


def test_a_peak_is_taken_at_once_and_a_dip_pulls_slowly() -> None:
    clock = Clock()
    b = balancer("a", clock=clock)
    a = b.endpoints[0]
    b.finished(a, 0.05, None, 1)
    clock.now = 0.1
    b.finished(a, 1.0, None, 2)  # 500 ms a call, at once
    assert a.service.value == 0.5
    clock.now = 0.2
    b.finished(a, 0.05, None, 1)
    assert 0.45 < a.service.value < 0.5  # one fast sample soon after barely moves it
    clock.now = 10.0
    b.finished(a, 0.05, None, 1)
    assert a.service.value < 0.06  # much later, it does


def test_a_failure_is_a_peak_but_never_a_dip() -> None:
    clock = Clock()
    b = balancer("a", clock=clock)
    a = b.endpoints[0]
    b.finished(a, 0.2, None, 1)
    clock.now = 5.0
    faded = a.service.read(clock.now)
    b.finished(a, 0.001, unreachable(), 1)  # a quick refusal: ignored
    assert a.service.read(clock.now) == faded and a.ewma == 0.2
    b.finished(a, 2.0, status(500), 2)  # a slow failure: a peak
    assert (a.service.value, a.ewma) == (1.0, 2.0)


# -- queueing ----------------------------------------------------------------------


async def test_full_endpoints_queue_for_the_first_free_slot() -> None:
    b = balancer("a", "b", max_concurrency=1, queue_timeout_secs=0.1)
    first = await b.acquire(None, 5)
    second = await b.acquire(None, 5)
    assert {first.name, second.name} == {"a", "b"}
    started = time.monotonic()
    with pytest.raises(ProviderOverloaded):
        await b.acquire(None, 5)
    assert 0.09 <= time.monotonic() - started < 1

    async def free_soon() -> None:
        await asyncio.sleep(0.02)
        second.guard.limiter.release()

    task = asyncio.create_task(free_soon())
    third = await b.acquire(None, 5)
    assert third is second
    await task


# -- the dispatcher with endpoints ----------------------------------------------


def dispatcher(providers: list[Scripted], **options: Any) -> Dispatcher:
    registry = Registry(
        {"p": providers[0]},
        configured=["p"],
        default="p",
        endpoints={"p": providers},
        **options,
    )
    return Dispatcher(registry, backoff=lambda n: 30.0)  # a backoff would show


async def test_a_retry_goes_at_once_to_another_endpoint() -> None:
    a, b = endpoints("a", "b")
    a.script, b.script = [unreachable()], ["from b"]
    d = dispatcher([a, b])
    for _ in range(10):
        served = await asyncio.wait_for(d.chat(ask("p/m")), 2)
        assert served.result.content == "from b"
        assert served.route.provider.endpoint == "b"
    assert a.calls <= 5  # its breaker (5 failures) stops it being chosen


async def test_hedge_answers_from_the_other_endpoint_and_cancels_the_stalled_call() -> None:
    a, b = endpoints("a", "b", hedge_after_ms=50, balance="round_robin")
    a.script, b.script = [5.0], ["from b"]
    d = dispatcher([a, b])
    started = time.monotonic()
    served = await d.chat(ask("p/m"))  # round robin: a first
    assert served.result.content == "from b"
    assert served.attempts == 2
    assert time.monotonic() - started < 1
    assert by_name(d.balancers["p"])["a"].in_flight == 0  # the stalled call was cancelled


async def test_a_hedged_stream_closes_the_loser() -> None:
    closed: list[str] = []

    class Tracked(Scripted):
        async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
            try:
                async for event in super().stream(request, model):
                    yield event
            finally:
                closed.append(self.endpoint)

    a, b = Tracked("p", 5.0, hedge_after_ms=50), Tracked("p", "from b", hedge_after_ms=50)
    a.endpoint, b.endpoint = "a", "b"
    a.config = b.config = ProviderConfig(kind="mock", hedge_after_ms=50, balance="round_robin")
    d = dispatcher([a, b])
    opened = await d.stream(ask("p/m"))
    assert opened.first.delta == "from b"
    assert closed == ["a"]
    await opened.aclose()


async def test_one_error_waits_for_the_other_call() -> None:
    async def fails() -> str:
        await asyncio.sleep(0.05)
        raise UpstreamError("p", "", upstream_status=500)

    async def answers() -> str:
        await asyncio.sleep(0.1)
        return "late answer"

    async def second() -> Any:
        return fails()

    result, won = await race(answers(), second, 0.01)
    assert (result, won) == ("late answer", False)


async def test_both_failing_raises() -> None:
    async def fails() -> str:
        await asyncio.sleep(0.02)
        raise UpstreamError("p", "", upstream_status=502)

    async def second() -> Any:
        return fails()

    with pytest.raises(UpstreamError):
        await race(fails(), second, 0.01)


async def test_a_balanced_alias_tries_the_lightest_provider_first() -> None:
    from chatd.config import AliasOptions

    x, y = Scripted("x", "from x"), Scripted("y", "from y")
    registry = Registry(
        {"x": x, "y": y},
        configured=["x", "y"],
        default="x",
        aliases={"t": ["x/m", "y/m"]},
        alias_options={"t": AliasOptions(mode="balance")},
    )
    d = Dispatcher(registry)
    seed(d.balancers["x"].endpoints[0], 1.0)
    seed(d.balancers["y"].endpoints[0], 0.1)
    assert (await d.chat(ask("t"))).result.content == "from y"
    seed(d.balancers["y"].endpoints[0], 0.1)  # (its fast answer lowered it)
    d.balancers["y"].endpoints[0].guard.limiter.busy = 30  # 0.1 × 31 > 1.0
    assert (await d.chat(ask("t"))).result.content == "from x"
    d.balancers["y"].endpoints[0].guard.limiter.busy = 0


# -- config and registration ------------------------------------------------------------


def test_endpoints_take_what_they_leave_out_from_their_provider(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEY_A", "sk-a")
    monkeypatch.setenv("KEY_B", "sk-b")
    monkeypatch.delenv("KEY_C", raising=False)
    table = {
        "kind": "openai",
        "base_url": "https://vendor.example/v1",
        "key_env": "KEY_A",
        "max_concurrency": 3,
        "endpoints": [
            {"key_env": "KEY_A"},
            {"key_env": "KEY_C"},  # does not resolve: left out
            {"key_env": "KEY_B", "weight": 2, "max_concurrency": 7},
            {"base_url": "https://other.example/v1", "name": "spare"},
        ],
    }
    registry = Registry.from_settings(build_settings({"chatd": {"providers": {"v": table}}}))
    made = registry.endpoints["v"]
    assert [p.endpoint for p in made] == ["vendor.example", "vendor.example#3", "spare"]
    assert [p.weight for p in made] == [1, 2, 1]
    assert [p.config.max_concurrency for p in made] == [3, 7, 3]
    assert [p.auth_headers()["Authorization"] for p in made] == [
        "Bearer sk-a",
        "Bearer sk-b",
        "Bearer sk-a",
    ]
    assert registry.providers["v"] is made[0]
    assert len(registry.instances()) == len(registry.providers) + 2


def test_a_keyed_provider_with_no_keyed_endpoint_is_not_registered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KEY_C", raising=False)
    table = {"kind": "openai", "base_url": "https://v/v1", "endpoints": [{"key_env": "KEY_C"}]}
    registry = Registry.from_settings(build_settings({"chatd": {"providers": {"v": table}}}))
    assert "v" not in registry.providers


def test_alias_tables_parse_and_plain_aliases_stay_lists() -> None:
    settings = build_settings(
        {
            "models": {
                "hot": "a/x",
                "tier": ["a/x", "b/y"],
                "coder": {"targets": ["a/x", "b/y"], "mode": "balance", "hedge_after_ms": 200},
                "plain": {"targets": "a/x"},
            }
        }
    )
    assert settings.models == {
        "hot": ["a/x"],
        "tier": ["a/x", "b/y"],
        "coder": ["a/x", "b/y"],
        "plain": ["a/x"],
    }
    assert set(settings.alias_options) == {"coder"}
    assert settings.alias_options["coder"].mode == "balance"
    assert settings.alias_options["coder"].hedge_after_ms == 200


@pytest.mark.parametrize(
    ("models", "named"),
    [
        ({"coder": {"mode": "balance"}}, "models.coder.targets"),
        ({"coder": {"targets": [], "mode": "balance"}}, "models.coder.targets"),
        ({"coder": {"targets": "a/x", "mode": "x"}}, "models.coder.mode"),
        ({"coder": {"targets": "a/x", "hedge_after_ms": -1}}, "models.coder.hedge_after_ms"),
        ({"coder": {"targets": "a/x", "speed": 1}}, "models.coder.speed"),
    ],
)
def test_bad_alias_tables_name_the_key(models: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_settings({"models": models})


def test_providers_without_endpoints_take_the_plain_path() -> None:
    settings = build_settings({"chatd": {"providers": {"m": {"kind": "mock"}}}})
    d = Dispatcher(Registry.from_settings(settings))
    assert d.balancers == {}
    assert list(itertools.islice(iter(d.registry.instances()), 0, None)) == list(
        d.registry.providers.values()
    )


def test_a_provider_with_one_status_error_keeps_other_endpoints_busy() -> None:
    # 4xx are the caller's fault: they count as errors but do not trip the breaker
    b = balancer("a", cooldown_failures=1, cooldown_secs=30)
    a = b.endpoints[0]
    b.finished(a, 0.01, status(400))
    assert (a.errors, a.cooling()) == (1, 0)


def test_no_keyed_endpoint_and_enabled_true_is_registered_but_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KEY_C", raising=False)
    monkeypatch.setenv("KEY_A", "sk-a")
    table = {
        "kind": "openai",
        "base_url": "https://v/v1",
        "key_env": "KEY_A",  # the provider's own key does not stand in for its endpoints'
        "endpoints": [{"key_env": "KEY_C"}],
    }
    auto = Registry.from_settings(build_settings({"chatd": {"providers": {"v": table}}}))
    assert "v" not in auto.providers
    table["enabled"] = True
    forced = Registry.from_settings(build_settings({"chatd": {"providers": {"v": table}}}))
    assert forced.providers["v"].available is False


async def test_an_alias_with_hedge_after_ms_hedges_across_its_targets() -> None:
    from chatd.config import AliasOptions

    x, y = Scripted("x", 5.0), Scripted("y", "from y")
    registry = Registry(
        {"x": x, "y": y},
        configured=["x", "y"],
        default="x",
        aliases={"t": ["x/m", "y/m"]},
        alias_options={"t": AliasOptions(hedge_after_ms=50)},
    )
    d = Dispatcher(registry)
    started = time.monotonic()
    served = await d.chat(ask("t"))
    assert (served.result.content, served.route.provider.name) == ("from y", "y")
    assert served.attempts == 2
    assert time.monotonic() - started < 1
    assert d.guard("x").limiter.busy == 0  # the stalled call was cancelled


def test_one_configured_endpoint_is_still_listed_and_balanced() -> None:
    table = {"kind": "mock", "endpoints": [{"name": "only"}]}
    settings = build_settings({"chatd": {"providers": {"m": table}}})
    d = Dispatcher(Registry.from_settings(settings))
    assert [e["name"] for e in d.balancers["m"].describe()] == ["only"]
