"""Shared fixtures: isolated apps from Settings, in-process clients, the fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from chatd.app import create_app
from chatd.config import Settings
from tests.fakes.upstream import FakeUpstream
from tests.servers import PostgresServer, skip_reason
from tests.support import make_settings  # noqa: F401  (re-exported for tests)


@pytest.fixture
def app_client() -> Callable[..., Any]:
    """`async with app_client(settings) as client:` — the app with its lifespan, over ASGI."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def open_client(settings: Settings, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings, **kw)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
                yield client

    return open_client


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    """A real fake Ollama + OpenAI upstream on 127.0.0.1, one per test module."""
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (initdb in a tmp dir, the postgres user, a free port),
    one per test module, stopped and removed after it."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer().init()
    try:
        yield server
    finally:
        server.stop()
