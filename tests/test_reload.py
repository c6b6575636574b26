"""Reload's reuse rules (docs/reload.md), in process: what a new snapshot keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatd.app import create_app
from chatd.config import ConfigError, load_settings
from chatd.state.callers import Callers, config_callers
from tests.support import make_settings

BASE = """
[models]
hot = "a/x"

[chatd]
upstream_transport = "httpx"
usage_db = ""

[chatd.providers.a]
kind = "mock"

[chatd.providers.b]
kind = "mock"
latency_ms = 1

[chatd.providers.pool]
kind = "openai"
endpoints = [{base_url = "http://127.0.0.1:9/v1"}, {base_url = "http://127.0.0.1:10/v1"}]
"""


async def test_unchanged_providers_keep_their_pool_guard_and_balancer(tmp_path: Path) -> None:
    path = tmp_path / "lakehouse.toml"
    path.write_text(BASE)
    app = create_app(load_settings(path))
    async with app.router.lifespan_context(app):
        reloader = app.state.reloader
        old = reloader.current.snapshot
        guard = old.dispatcher.guard("a")
        path.write_text(
            BASE.replace("latency_ms = 1", "latency_ms = 2")
            + '[chatd.providers.c]\nkind = "mock"\n'
        )
        new = await reloader.reload("test")
        assert reloader.current.snapshot is new and new.generation == 2
        assert new.registry.providers["a"] is old.registry.providers["a"]
        assert new.dispatcher.guard("a") is guard
        assert new.dispatcher.balancers["pool"] is old.dispatcher.balancers["pool"]
        assert new.registry.providers["b"] is not old.registry.providers["b"]
        assert new.registry.providers["b"].config.latency_ms == 2
        assert "c" in new.registry.providers and "c" not in old.registry.providers
        assert new.registry.resolve("hot").provider is old.registry.providers["a"]


async def test_a_bad_file_leaves_the_snapshot_in_force(tmp_path: Path) -> None:
    path = tmp_path / "lakehouse.toml"
    path.write_text(BASE)
    app = create_app(load_settings(path))
    async with app.router.lifespan_context(app):
        reloader = app.state.reloader
        old = reloader.current.snapshot
        path.write_text(BASE + "[chatd.providers.d]\nkind = 'nope'\n")
        with pytest.raises(ConfigError, match=r"^chatd: config error: chatd.providers.d.kind"):
            await reloader.reload("test")
        assert reloader.current.snapshot is old


def test_a_reload_swaps_config_callers_and_their_tokens_keeping_what_is_in_flight() -> None:
    env = {"T_A": "tok-a", "T_B": "tok-b", "T_B2": "tok-b2"}
    first = make_settings(callers={"a": {"token_env": "T_A", "rpm": 5}, "b": {"token_env": "T_B"}})
    callers = Callers.from_settings(first, env)
    assert callers is not None
    a, b = callers.callers["a"], callers.callers["b"]
    a.in_flight = 2  # two requests of a's still running: they hold this object
    second = make_settings(
        callers={"a": {"token_env": "T_A", "rpm": 5}, "b": {"token_env": "T_B2", "rpm": 1}}
    )
    callers.replace_config(config_callers(second, env))
    assert callers.identify(b"tok-a") is a and a.in_flight == 2
    assert callers.callers["b"] is b and b.rpm == 1  # changed in place, seen at once
    assert callers.identify(b"tok-b") is None  # the old token went with the old config
    assert callers.identify(b"tok-b2") is callers.callers["b"]


async def test_a_dropped_provider_closes_only_when_its_snapshot_has_drained(
    tmp_path: Path,
) -> None:
    import asyncio

    gone = '[chatd.providers.gone]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\n'
    path = tmp_path / "lakehouse.toml"
    path.write_text(BASE + gone)
    app = create_app(load_settings(path))
    async with app.router.lifespan_context(app):
        reloader = app.state.reloader
        old = reloader.current.snapshot
        provider = old.registry.providers["gone"]
        assert provider._client is not None
        old.in_flight += 1  # a request (a stream, say) still running on the old snapshot
        path.write_text(BASE)
        await reloader.reload("test")
        await asyncio.sleep(0.3)
        assert provider._client is not None  # still in use
        old.in_flight -= 1
        for _ in range(50):
            if provider._client is None:
                break
            await asyncio.sleep(0.05)
        assert provider._client is None


async def test_a_provider_that_will_not_build_is_refused_like_a_bad_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lakehouse.toml"
    path.write_text(BASE)
    app = create_app(load_settings(path))
    async with app.router.lifespan_context(app):
        reloader = app.state.reloader
        old = reloader.current.snapshot
        path.write_text(BASE + '[chatd.providers.odd]\nkind = "openai"\nbase_url = "http://[::1"\n')
        with pytest.raises(ConfigError, match=r"^chatd: config error: "):
            await reloader.reload("test")
        assert reloader.current.snapshot is old
