"""Resilience: backoff, Retry-After, breaker, limiter, and the Dispatcher's policy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from chatd.config import ProviderConfig
from chatd.errors import (
    ChatdError,
    InvalidRequest,
    ProviderCoolingDown,
    ProviderOverloaded,
    UpstreamError,
    UpstreamTimeout,
)
from chatd.providers.base import Provider
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.routing.resilience import (
    Breaker,
    Limiter,
    backoff_delay,
    is_retryable,
    parse_retry_after,
    parse_timeout_header,
)
from chatd.types import ChatRequest, ChatResult, StreamEvent

# -- policy pieces ---------------------------------------------------------------


def test_backoff_is_full_jitter_doubling_from_half_a_second_capped_at_eight() -> None:
    assert [backoff_delay(n, rand=lambda: 0.999999) for n in range(6)] == pytest.approx(
        [0.5, 1, 2, 4, 8, 8], rel=1e-3
    )
    assert backoff_delay(3, rand=lambda: 0.0) == 0
    assert backoff_delay(1000, rand=lambda: 0.5) == 4.0
    for n in range(10):
        assert 0 <= backoff_delay(n) <= 8


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (UpstreamError("p", "", upstream_status=429), True),
        (UpstreamError("p", "", upstream_status=500), True),
        (UpstreamError("p", "", upstream_status=502), True),
        (UpstreamError("p", "", upstream_status=503), True),
        (UpstreamError("p", "", upstream_status=504), True),
        (UpstreamError("p", "", upstream_status=400), False),
        (UpstreamError("p", "", upstream_status=401), False),
        (UpstreamError("p", "", upstream_status=501), False),
        (UpstreamError("p", "could not reach upstream", unreachable=True), True),
        (UpstreamError("p", "unparseable JSON"), False),
        (UpstreamError("p", "zero choices"), False),
        (UpstreamTimeout("p: no answer"), False),
        (InvalidRequest("bad"), False),
    ],
)
def test_what_is_retried(error: ChatdError, retryable: bool) -> None:
    assert is_retryable(error) is retryable


def test_timeout_header_is_positive_milliseconds() -> None:
    assert parse_timeout_header(None) is None
    assert parse_timeout_header("1500") == 1.5
    for bad in ("0", "-5", "1.5", "soon", ""):
        with pytest.raises(InvalidRequest):
            parse_timeout_header(bad)


def test_breaker_opens_after_consecutive_failures_and_a_success_resets() -> None:
    now = [100.0]
    breaker = Breaker("p", failures=3, cooldown=30, clock=lambda: now[0])
    breaker.failed()
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    breaker.failed()
    breaker.check()  # 2 consecutive: still closed
    breaker.failed()
    with pytest.raises(ProviderCoolingDown) as caught:
        breaker.check()
    assert caught.value.headers["Retry-After"] == "30"
    now[0] += 12.2
    with pytest.raises(ProviderCoolingDown) as caught:
        breaker.check()
    assert caught.value.headers["Retry-After"] == "18"
    now[0] += 18
    breaker.check()  # cooled down: one trial call may go
    breaker.failed()  # ...and one more failure reopens it
    with pytest.raises(ProviderCoolingDown):
        breaker.check()
    now[0] += 30
    breaker.succeeded()
    breaker.failed()
    breaker.check()


def test_breaker_with_zero_threshold_never_opens() -> None:
    breaker = Breaker("p", failures=0, cooldown=30)
    for _ in range(100):
        breaker.failed()
    breaker.check()


async def test_limiter_queues_then_answers_overloaded_with_retry_after() -> None:
    limiter = Limiter("p", max_concurrency=1, queue_timeout=0.1)
    await limiter.acquire()
    started = time.monotonic()
    with pytest.raises(ProviderOverloaded) as caught:
        await limiter.acquire()
    assert 0.09 <= time.monotonic() - started < 1
    assert caught.value.headers == {"Retry-After": "1"}
    assert caught.value.status == 503

    async def release_soon() -> None:
        await asyncio.sleep(0.02)
        limiter.release()

    task = asyncio.create_task(release_soon())
    await limiter.acquire()  # the queued caller gets the freed slot
    await task
    limiter.release()


async def test_unlimited_limiter_never_waits() -> None:
    limiter = Limiter("p", max_concurrency=0, queue_timeout=0)
    for _ in range(1000):
        await limiter.acquire()


# -- the Dispatcher, with scripted providers --------------------------------------


class Scripted(Provider):
    """A provider whose calls play a script: a string answers, an exception is raised,
    a float sleeps that long first. The last entry repeats."""

    kind = "scripted"

    def __init__(self, name: str, *script: Any, timeout: float = 5.0, **config: Any) -> None:
        super().__init__(name, ProviderConfig(kind="mock", **config), timeout=timeout)
        self.script = list(script)
        self.calls = 0

    async def _next(self) -> str:
        self.calls += 1
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, float):
            await asyncio.sleep(step)
            return "slept"
        if isinstance(step, BaseException):
            raise step
        return str(step)

    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        return ChatResult(content=await self._next())

    async def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        text = await self._next()
        yield StreamEvent(delta=text)
        yield StreamEvent(done=True)


def status(code: int, retry_after: str | None = None) -> UpstreamError:
    return UpstreamError("p", "", upstream_status=code, retry_after=retry_after)


def unreachable() -> UpstreamError:
    return UpstreamError("p", "could not reach upstream: refused", unreachable=True)


def dispatcher(*providers: Provider, tiers: dict[str, list[str]] | None = None) -> Dispatcher:
    registry = Registry(
        {p.name: p for p in providers},
        configured=[p.name for p in providers] + ["absent"],
        default=providers[0].name,
        aliases=tiers or {},
    )
    return Dispatcher(registry, backoff=lambda n: 0.0)


def ask(model: str = "a/m") -> ChatRequest:
    return ChatRequest(model=model, messages=[{"role": "user", "content": "hi"}])


async def test_retries_transient_failures_then_serves() -> None:
    a = Scripted("a", status(503), unreachable(), "ok", max_retries=2)
    served = await dispatcher(a).chat(ask())
    assert served.result.content == "ok"
    assert (a.calls, served.attempts, served.tally.retries, served.tally.fallbacks) == (3, 3, 2, 0)


async def test_gives_up_after_max_retries_with_the_last_error() -> None:
    a = Scripted("a", status(500), status(502), status(503), status(504), max_retries=2)
    with pytest.raises(UpstreamError) as caught:
        await dispatcher(a).chat(ask())
    assert caught.value.upstream_status == 503
    assert caught.value.headers["X-Chatd-Attempts"] == "3"
    assert a.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        status(400),
        status(401),
        status(404),
        UpstreamError("p", "unparseable JSON"),
        UpstreamError("p", "zero choices"),
        UpstreamTimeout("p: no answer within 5s"),
    ],
)
async def test_no_retry_for_caller_errors_bad_answers_and_timeouts(error: ChatdError) -> None:
    a = Scripted("a", error, "ok", max_retries=3)
    with pytest.raises(type(error)):
        await dispatcher(a).chat(ask())
    assert a.calls == 1


async def test_retry_after_is_honoured() -> None:
    a = Scripted("a", status(429, "0.3"), "ok", max_retries=1)
    started = time.monotonic()
    served = await dispatcher(a).chat(ask())
    assert time.monotonic() - started >= 0.3
    assert served.attempts == 2


async def test_retry_after_beyond_the_cap_is_not_waited_for_and_is_passed_on() -> None:
    a = Scripted("a", status(429, "60"), "ok", max_retries=2, max_retry_after_secs=30)
    with pytest.raises(UpstreamError) as caught:
        await dispatcher(a).chat(ask())
    assert a.calls == 1
    assert caught.value.headers["Retry-After"] == "60"


async def test_backoff_never_sleeps_past_the_deadline() -> None:
    a = Scripted("a", status(503, "2"), "ok", max_retries=2)
    started = time.monotonic()
    with pytest.raises(UpstreamError):
        await dispatcher(a).chat(ask(), budget=0.5)
    assert time.monotonic() - started < 0.2
    assert a.calls == 1


async def test_deadline_cuts_a_slow_call_with_504() -> None:
    a = Scripted("a", 5.0, max_retries=2)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await dispatcher(a).chat(ask(), budget=0.2)
    assert 0.2 <= time.monotonic() - started < 0.5
    assert caught.value.status == 504
    assert a.calls == 1


async def test_the_budget_is_the_first_targets_timeout() -> None:
    a = Scripted("a", 5.0, timeout=0.2)
    with pytest.raises(UpstreamTimeout):
        await dispatcher(a).chat(ask(), budget=10)


async def test_fallback_moves_on_after_retries_and_names_who_served() -> None:
    a = Scripted("a", status(503), max_retries=1)
    b = Scripted("b", "from b")
    served = await dispatcher(a, b, tiers={"t": ["a/m1", "b/m2"]}).chat(ask("t"))
    assert (served.route.provider.name, served.route.model) == ("b", "m2")
    assert served.result.content == "from b"
    assert (served.attempts, served.tally.retries, served.tally.fallbacks) == (3, 1, 1)


async def test_fallback_moves_past_unregistered_and_disabled_targets() -> None:
    b = Scripted("b", "ok")
    keyless = Scripted("k", "never", key_env="K_KEY")
    d = dispatcher(b, keyless, tiers={"t": ["absent/x", "k/y", "b/z"]})
    served = await d.chat(ask("t"))
    assert served.route.provider.name == "b"
    assert (served.attempts, served.tally.fallbacks) == (1, 2)
    assert keyless.calls == 0


async def test_no_fallback_on_an_upstream_400() -> None:
    a = Scripted("a", status(400))
    b = Scripted("b", "ok")
    with pytest.raises(UpstreamError) as caught:
        await dispatcher(a, b, tiers={"t": ["a/m", "b/m"]}).chat(ask("t"))
    assert caught.value.upstream_status == 400
    assert b.calls == 0


async def test_when_every_target_fails_the_upstream_error_is_reported() -> None:
    a = Scripted("a", status(502), max_retries=0)
    with pytest.raises(UpstreamError) as caught:
        await dispatcher(a, tiers={"t": ["a/m", "absent/m"]}).chat(ask("t"))
    assert caught.value.upstream_status == 502
    assert caught.value.headers["X-Chatd-Attempts"] == "1"


async def test_cooldown_after_consecutive_failures_then_fast_503_and_fallback() -> None:
    a = Scripted("a", status(500), max_retries=0, cooldown_failures=2, cooldown_secs=30)
    b = Scripted("b", "ok")
    d = dispatcher(a, b, tiers={"t": ["a/m", "b/m"]})
    for _ in range(2):
        with pytest.raises(UpstreamError):
            await d.chat(ask("a/m"))
    with pytest.raises(ProviderCoolingDown) as caught:
        await d.chat(ask("a/m"))
    assert caught.value.status == 503
    assert 29 <= int(caught.value.headers["Retry-After"]) <= 30
    assert a.calls == 2
    served = await d.chat(ask("t"))
    assert served.route.provider.name == "b"
    assert (served.attempts, a.calls) == (1, 2)


async def test_4xx_do_not_count_towards_cooldown() -> None:
    a = Scripted("a", status(404), max_retries=0, cooldown_failures=1, cooldown_secs=30)
    d = dispatcher(a)
    for _ in range(3):
        with pytest.raises(UpstreamError):
            await d.chat(ask())
    assert a.calls == 3


async def test_overloaded_provider_answers_503_and_fallback_moves_on() -> None:
    a = Scripted("a", 0.5, max_concurrency=1, queue_timeout_secs=0.05)
    b = Scripted("b", "ok")
    d = dispatcher(a, b, tiers={"t": ["a/m", "b/m"]})
    first = asyncio.create_task(d.chat(ask("a/m")))
    await asyncio.sleep(0.01)
    with pytest.raises(ProviderOverloaded) as caught:
        await d.chat(ask("a/m"))
    assert caught.value.headers["Retry-After"] == "1"
    served = await d.chat(ask("t"))
    assert served.route.provider.name == "b"
    assert (await first).result.content == "slept"


async def test_a_cancelled_call_frees_its_slot() -> None:
    a = Scripted("a", 5.0, "ok", max_concurrency=1, queue_timeout_secs=0.05)
    d = dispatcher(a)
    task = asyncio.create_task(d.chat(ask()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await d.chat(ask())).result.content == "ok"


async def test_stream_is_retried_before_its_first_event_and_holds_its_slot() -> None:
    a = Scripted("a", unreachable(), "hello", max_retries=1, max_concurrency=1)
    d = dispatcher(a)
    opened = await d.stream(ask())
    assert opened.first.delta == "hello"
    assert (opened.attempts, opened.tally.retries) == (2, 1)
    with pytest.raises(ProviderOverloaded):
        await d.guard("a").limiter.acquire(within=0.01)
    assert [e.done async for e in opened.rest] == [True]
    await opened.aclose()
    await d.guard("a").limiter.acquire(within=0.01)  # freed


async def test_an_unconsumed_stream_frees_its_slot_on_aclose() -> None:
    a = Scripted("a", "hello", max_concurrency=1)
    d = dispatcher(a)
    opened = await d.stream(ask())
    await opened.aclose()
    await opened.aclose()  # idempotent
    await d.guard("a").limiter.acquire(within=0.01)
    d.guard("a").limiter.release()
    await d.guard("a").limiter.acquire(within=0.01)


async def test_stream_falls_back_when_the_first_target_cannot_start() -> None:
    a = Scripted("a", status(429), max_retries=0)
    b = Scripted("b", "from b")
    opened = await dispatcher(a, b, tiers={"t": ["a/m", "b/m"]}).stream(ask("t"))
    assert opened.route.provider.name == "b"
    assert (opened.first.delta, opened.attempts, opened.tally.fallbacks) == ("from b", 2, 1)
    await opened.aclose()
