"""The PostgreSQL ledger (for fleets): asyncpg, a small pool that reconnects by itself."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from chatd.state.usage import COLUMNS, Row
from chatd.state.usage.report import POSTGRES, summary_query

SCHEMA = """
CREATE TABLE IF NOT EXISTS chatd_usage (
  time TIMESTAMPTZ NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd DOUBLE PRECISION, cost_source TEXT,
  latency_ms DOUBLE PRECISION, ttft_ms DOUBLE PRECISION, attempts INTEGER, cache TEXT
);
CREATE INDEX IF NOT EXISTS chatd_usage_time ON chatd_usage (time);
CREATE INDEX IF NOT EXISTS chatd_usage_caller_time ON chatd_usage (caller, time);
"""
INSERT = (
    f"INSERT INTO chatd_usage ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))})"
)
CONNECT_TIMEOUT_SECS = 5.0


def moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class PostgresBackend:
    """Rows go in one transaction per batch: a batch lands whole or not at all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._schema = False

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size=0: no connection is held open while idle, and a server that went
            # away is reconnected to on the next use.
            self._pool = await asyncpg.create_pool(
                self.url, min_size=0, max_size=4, timeout=CONNECT_TIMEOUT_SECS
            )
        if not self._schema:
            async with self._pool.acquire() as conn:
                await conn.execute(SCHEMA)
            self._schema = True
        return self._pool

    async def open(self) -> None:
        await self._acquire_pool()

    async def write(self, rows: list[Row]) -> None:
        pool = await self._acquire_pool()
        records = [(moment(row[0]), *row[1:]) for row in rows]
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(INSERT, records)

    async def _fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        pool = await self._acquire_pool()
        async with pool.acquire() as conn:
            return [dict(record) for record in await conn.fetch(sql, *args)]

    async def summary(
        self, since: float, until: float, caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql, _ = summary_query(POSTGRES, group_by, caller)
        args: list[Any] = [moment(since), moment(until)]
        if caller is not None:
            args.append(caller)
        return await self._fetch(sql, *args)

    async def spend_since(self, starts: dict[str, float]) -> dict[str, float]:
        spent: dict[str, float] = {}
        for caller, start in starts.items():
            rows = await self._fetch(
                "SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM chatd_usage "
                "WHERE caller = $1 AND time >= $2",
                caller,
                moment(start),
            )
            spent[caller] = float(rows[0]["spent"])
        return spent

    async def count(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) AS n FROM chatd_usage")
        return int(rows[0]["n"])

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except Exception:  # a dead server: nothing left to close politely
                pool.terminate()
