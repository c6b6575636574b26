"""Shared cooldowns: a trip on one replica holds the same breaker on another."""

from __future__ import annotations

import asyncio

import pytest

from chatd.errors import ProviderCoolingDown
from chatd.routing.resilience import Breaker
from chatd.state.cooldowns import SharedCooldowns, cooldown_key
from chatd.state.shared_local import LocalState


async def test_a_trip_is_published_and_held_by_the_other_replica() -> None:
    state = LocalState()  # stands for Redis: both "replicas" see it
    tripped: list[str] = []
    on_a = Breaker("ollama", failures=2, cooldown=30, on_trip=lambda: tripped.append("a"))
    on_b = Breaker("ollama", failures=2, cooldown=30)
    a = SharedCooldowns(state, {cooldown_key("ollama"): on_a})
    b = SharedCooldowns(state, {cooldown_key("ollama"): on_b})
    on_a.failed()
    on_a.failed()
    assert tripped == ["a"]  # the metrics hook still runs
    await asyncio.sleep(0)  # the flag is published off the request path
    assert 29 < await state.flag_remaining("cooldown:ollama") <= 30
    on_b.check()  # B has not synced yet
    await b.sync()
    with pytest.raises(ProviderCoolingDown, match="another replica"):
        on_b.check()
    assert 29 < on_b.remaining() <= 30
    await a.sync()  # A's own flag does not stretch A's cooldown
    assert on_a.remaining() <= 30


async def test_breakers_without_cooldown_are_left_alone() -> None:
    off = Breaker("x", failures=0, cooldown=30)
    shared = SharedCooldowns(LocalState(), {cooldown_key("x"): off})
    assert shared.breakers == {}
    await shared.start()
    await shared.aclose()


def test_cooldown_key_leaves_room_for_an_endpoint() -> None:
    assert cooldown_key("ollama") == "cooldown:ollama"
    assert cooldown_key("ollama", "gpu1:11434") == "cooldown:ollama/gpu1:11434"
