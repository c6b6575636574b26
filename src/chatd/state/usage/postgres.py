"""The PostgreSQL ledger (for fleets): asyncpg, a small pool that reconnects by itself.

Replicas share one database: each batch upserts the daily table (keys in one order, so
two replicas never deadlock), and the backfill and pruning run in one replica at a time,
the one holding a session advisory lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime
from typing import Any

import asyncpg

from chatd.state.usage import COLUMNS, Row
from chatd.state.usage.report import POSTGRES, summary_query
from chatd.state.usage.rollup import (
    BACKFILL_TO,
    DAY,
    PRUNED_BEFORE,
    Reads,
    daily,
    daily_query,
    floor_day,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS chatd_usage (
  time TIMESTAMPTZ NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd DOUBLE PRECISION, cost_source TEXT,
  latency_ms DOUBLE PRECISION, ttft_ms DOUBLE PRECISION, attempts INTEGER, cache TEXT,
  rolled BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS chatd_usage_time ON chatd_usage (time);
CREATE INDEX IF NOT EXISTS chatd_usage_caller_time ON chatd_usage (caller, time);
CREATE TABLE IF NOT EXISTS chatd_usage_daily (
  day DATE NOT NULL, caller TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL,
  provider TEXT NOT NULL, requests BIGINT NOT NULL, errors BIGINT NOT NULL,
  input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
  cost_usd DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (day, caller, route, model, provider)
);
CREATE TABLE IF NOT EXISTS chatd_usage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chatd_usage_batches (key TEXT PRIMARY KEY, time TIMESTAMPTZ NOT NULL);
CREATE INDEX IF NOT EXISTS chatd_usage_batches_time ON chatd_usage_batches (time);
"""
# Each batch leaves its key, in its own transaction: a batch sent again after a lost
# answer to COMMIT finds its key and is skipped. Keys are kept a day (docs/usage-ledger.md).
MARK = "INSERT INTO chatd_usage_batches VALUES ($1, now()) ON CONFLICT DO NOTHING RETURNING true"
FORGET_MARKS = "DELETE FROM chatd_usage_batches WHERE time < now() - interval '1 day'"
FORGET_EVERY_SECS = 600.0
# Schema changes and maintenance take turns across replicas through these locks.
SCHEMA_LOCK = 0x63686174_64000001
MAINTENANCE_LOCK = 0x63686174_64000002
INSERT = (
    f"INSERT INTO chatd_usage ({', '.join(COLUMNS)}, rolled) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(COLUMNS) + 1))}, true)"
)
UPSERT = (
    "INSERT INTO chatd_usage_daily VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
    "ON CONFLICT (day, caller, route, model, provider) DO UPDATE SET "
    "requests = chatd_usage_daily.requests + excluded.requests, "
    "errors = chatd_usage_daily.errors + excluded.errors, "
    "input_tokens = chatd_usage_daily.input_tokens + excluded.input_tokens, "
    "output_tokens = chatd_usage_daily.output_tokens + excluded.output_tokens, "
    "cost_usd = chatd_usage_daily.cost_usd + excluded.cost_usd"
)
LEGACY_SUMS = (
    "SELECT (time AT TIME ZONE 'UTC')::date, COALESCE(caller, ''), COALESCE(route, ''), "
    "COALESCE(model, ''), COALESCE(provider, ''), COUNT(*), "
    "SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END), COALESCE(SUM(input_tokens), 0), "
    "COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0) FROM chatd_usage "
    "WHERE time >= $1 AND time < $2 AND NOT rolled GROUP BY 1, 2, 3, 4, 5"
)
PRUNE = (
    "DELETE FROM chatd_usage WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM chatd_usage WHERE time < $1 ORDER BY time LIMIT $2))"
)
CONNECT_TIMEOUT_SECS = 5.0


def moment(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def day_of(epoch: float) -> date:
    return moment(epoch).date()


async def create_schema(conn: asyncpg.Connection) -> None:
    """A new ledger, or one written before the daily table, upgraded in place: a column
    added (no rewrite) and two tables; the backfill reads the old rows later."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        legacy = await conn.fetchval(
            "SELECT count(*) = 1 FROM information_schema.columns WHERE table_name = "
            "'chatd_usage' AND column_name = 'time' AND table_schema = current_schema() "
            "AND NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_name = "
            "'chatd_usage' AND column_name = 'rolled' AND table_schema = current_schema())"
        )
        if legacy:
            await conn.execute(
                "ALTER TABLE chatd_usage ADD COLUMN rolled BOOLEAN NOT NULL DEFAULT false"
            )
        await conn.execute(SCHEMA)
        if legacy:
            last = await conn.fetchval("SELECT MAX(time) FROM chatd_usage")
            if last is not None:
                end = floor_day(last.timestamp()) + DAY
                await conn.execute(
                    "INSERT INTO chatd_usage_meta VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    BACKFILL_TO,
                    repr(end),
                )


class PostgresBackend(Reads):
    """Rows go in one transaction per batch, with their daily sums: whole or not at all."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._schema = False
        self._forgot_at = -FORGET_EVERY_SECS

    async def _acquire_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            # min_size=0: no connection is held open while idle, and a server that went
            # away is reconnected to on the next use.
            self._pool = await asyncpg.create_pool(
                self.url, min_size=0, max_size=4, timeout=CONNECT_TIMEOUT_SECS
            )
        if not self._schema:
            async with self._pool.acquire() as conn:
                await create_schema(conn)
            self._schema = True
        return self._pool

    async def open(self) -> None:
        await self._acquire_pool()

    async def write(self, rows: list[Row], key: str = "") -> None:
        pool = await self._acquire_pool()
        records = []
        days = []
        for row in rows:
            at = moment(row[0])
            records.append((at, *row[1:]))
            days.append(at.date())
        sums = daily(rows, days)
        async with pool.acquire() as conn:
            async with conn.transaction():
                if key and not await conn.fetchval(MARK, key):
                    return  # an earlier try of this batch was committed
                await conn.executemany(INSERT, records)
                await conn.executemany(UPSERT, sums)
            if time.monotonic() - self._forgot_at >= FORGET_EVERY_SECS:
                self._forgot_at = time.monotonic()
                await conn.execute(FORGET_MARKS)

    async def _fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        pool = await self._acquire_pool()
        async with pool.acquire() as conn:
            return [dict(record) for record in await conn.fetch(sql, *args)]

    async def ledger_state(self) -> dict[str, float]:
        rows = await self._fetch("SELECT key, value FROM chatd_usage_meta")
        return {row["key"]: float(row["value"]) for row in rows}

    async def rows_summary(
        self, span: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql, _ = summary_query(POSTGRES, group_by, caller)
        args: list[Any] = [moment(span[0]), moment(span[1])]
        return await self._fetch(sql, *args, *([caller] if caller is not None else []))

    async def daily_summary(
        self, days: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql = daily_query(group_by, caller, "$", "to_char(day, 'YYYY-MM-DD')")
        args: list[Any] = [day_of(days[0]), day_of(days[1] - DAY)]
        return await self._fetch(sql, *args, *([caller] if caller is not None else []))

    async def count(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) AS n FROM chatd_usage")
        return int(rows[0]["n"])

    @asynccontextmanager
    async def maintenance(self) -> AsyncIterator[Maintainer | None]:
        """This replica's turn at the backfill and pruning, or None: another has it."""
        pool = await self._acquire_pool()
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK):
                yield None
                return
            try:
                yield Maintainer(conn)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except Exception:  # a dead server: nothing left to close politely
                pool.terminate()


class Maintainer:
    """The backfill and pruning, on the connection that holds the maintenance lock."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def backfill_step(self) -> float:
        """Sum the last not yet backfilled day(s) of old rows into the daily table; the
        days left to backfill after it (0: done)."""
        conn = self.conn
        value = await conn.fetchval(
            "SELECT value FROM chatd_usage_meta WHERE key = $1", BACKFILL_TO
        )
        if value is None:
            return 0
        mark = float(value)
        low, high = await conn.fetchrow(
            "SELECT MIN(time), (SELECT MAX(time) FROM chatd_usage WHERE time < $1) "
            "FROM chatd_usage",
            moment(mark),
        )
        if high is None:
            await conn.execute("DELETE FROM chatd_usage_meta WHERE key = $1", BACKFILL_TO)
            return 0
        start = floor_day(high.timestamp())
        sums = await conn.fetch(LEGACY_SUMS, moment(start), moment(mark))
        left = max(0.0, (start - floor_day(low.timestamp())) / DAY)
        async with conn.transaction():
            if left:
                moved = await conn.execute(
                    "UPDATE chatd_usage_meta SET value = $1 WHERE key = $2 AND value = $3",
                    repr(start),
                    BACKFILL_TO,
                    value,
                )
            else:  # the oldest day summed: the backfill is done, in the same transaction
                moved = await conn.execute(
                    "DELETE FROM chatd_usage_meta WHERE key = $1 AND value = $2",
                    BACKFILL_TO,
                    value,
                )
            if moved.endswith(" 1"):
                # In the writers' order (Python's, not the collation's): no deadlock.
                await conn.executemany(UPSERT, sorted(tuple(r) for r in sums))
        return left

    async def mark_pruned(self, cutoff: float) -> bool:
        """Before deleting: reports learn that rows before `cutoff` may be gone. False
        when there is nothing before it to delete."""
        backfilling = await self.conn.fetchval(
            "SELECT count(*) FROM chatd_usage_meta WHERE key = $1", BACKFILL_TO
        )
        if backfilling:  # rows not yet summed stay
            return False
        low = await self.conn.fetchval("SELECT MIN(time) FROM chatd_usage")
        if low is None or low.timestamp() >= cutoff:
            return False
        await self.conn.execute(
            "INSERT INTO chatd_usage_meta VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET "
            "value = GREATEST(chatd_usage_meta.value::float8, excluded.value::float8)::text",
            PRUNED_BEFORE,
            repr(cutoff),
        )
        return True

    async def prune_chunk(self, cutoff: float, limit: int) -> tuple[int, float]:
        """Delete up to `limit` of the oldest rows before `cutoff`, in one transaction:
        the rows deleted, and the seconds it took (the round trip's)."""
        began = time.monotonic()
        done = await self.conn.execute(PRUNE, moment(cutoff), limit)
        return int(done.split()[-1]), time.monotonic() - began
