"""Live callers in PostgreSQL (for fleets): asyncpg, a small pool that reconnects by
itself; the store's `?` placeholders become `$n`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

import asyncpg

from chatd.state.callers_store import CallerStore

CONNECT_TIMEOUT_SECS = 2.0
COMMAND_TIMEOUT_SECS = 5.0


@lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """`?` placeholders → `$1, $2, ...` (the store's SQL has no `?` inside strings)."""
    count = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


class _PostgresTx:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self.conn.execute(numbered(sql), *args)
        tail = status.rsplit(" ", 1)[-1]  # "UPDATE 1", "INSERT 0 1", "CREATE TABLE"
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(r) for r in await self.conn.fetch(numbered(sql), *args)]


class PostgresCallerStore(CallerStore):
    lock_row = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size=0: nothing held open while idle; a server that went away is
            # reconnected to on the next use.
            self._pool = await asyncpg.create_pool(
                self.url, min_size=0, max_size=2, timeout=CONNECT_TIMEOUT_SECS,
                command_timeout=COMMAND_TIMEOUT_SECS,
            )  # fmt: skip
        return self._pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PostgresTx]:
        pool = await self._acquire_pool()
        async with pool.acquire(timeout=CONNECT_TIMEOUT_SECS) as conn, conn.transaction():
            yield _PostgresTx(conn)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        pool = await self._acquire_pool()
        async with pool.acquire(timeout=CONNECT_TIMEOUT_SECS) as conn:
            return [dict(r) for r in await conn.fetch(numbered(sql), *args)]

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except Exception:  # a dead server: nothing left to close politely
                pool.terminate()
