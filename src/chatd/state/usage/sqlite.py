"""The SQLite ledger (the default): stdlib sqlite3 on a thread of its own, WAL mode."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from chatd.state.usage import COLUMNS, Row
from chatd.state.usage.report import SQLITE, iso, summary_query

SCHEMA = """
CREATE TABLE IF NOT EXISTS chatd_usage (
  time TEXT NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, cost_source TEXT,
  latency_ms REAL, ttft_ms REAL, attempts INTEGER, cache TEXT
);
CREATE INDEX IF NOT EXISTS chatd_usage_time ON chatd_usage (time);
CREATE INDEX IF NOT EXISTS chatd_usage_caller_time ON chatd_usage (caller, time);
"""
# A batch goes in as few statements as SQLite's parameter limit allows (32,766 since
# 3.32; 500 rows of 18 columns is 9,000), each `INSERT … VALUES (…), (…), …`. One
# statement is one step, and the database thread gives up the GIL for each step and
# takes it back: once a row with executemany, which at c=32 made ~4 context switches per
# request between it and the event loop's thread.
CHUNK_ROWS = 500
ROW = f"({', '.join('?' * len(COLUMNS))})"


@functools.lru_cache(maxsize=8)
def insert(rows: int) -> str:
    """`INSERT` of `rows` rows. A batch is full chunks of CHUNK_ROWS (always cached) and
    one shorter remainder, whose size changes from flush to flush."""
    return f"INSERT INTO chatd_usage ({', '.join(COLUMNS)}) VALUES {', '.join([ROW] * rows)}"


def parameters(rows: list[Row]) -> list[list[Any]]:
    """A batch as the statements take it: each chunk's rows, flattened, time as ISO text."""
    return [
        [value for row in rows[i : i + CHUNK_ROWS] for value in (iso(row[0]), *row[1:])]
        for i in range(0, len(rows), CHUNK_ROWS)
    ]


def sqlite_path(url: str) -> str:
    """`sqlite:///chatd-usage.sqlite3` (relative) or `sqlite:////var/lib/x.db` (absolute)."""
    path = url.removeprefix("sqlite://")
    return path[1:] if path.startswith("/") else path


class SQLiteBackend:
    """All database work happens on one thread, so the event loop never blocks on it."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatd-usage-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def open(self) -> None:
        await self._run(self._connect)

    def _write(self, chunks: list[list[Any]]) -> None:
        db = self._connect()
        width = len(COLUMNS)
        with db:
            for values in chunks:
                db.execute(insert(len(values) // width), values)

    async def write(self, rows: list[Row]) -> None:
        # The parameters are made here, on the event loop (a few µs a row, once a flush),
        # so the database thread runs no Python loop while it holds the GIL.
        await self._run(self._write, parameters(rows))

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        cursor = self._connect().execute(sql, args)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    async def summary(
        self, since: float, until: float, caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql, _ = summary_query(SQLITE, group_by, caller)
        args: tuple[Any, ...] = (iso(since), iso(until))
        if caller is not None:
            args += (caller,)
        return await self._run(self._query, sql, args)

    async def spend_since(self, starts: dict[str, float]) -> dict[str, float]:
        spent: dict[str, float] = {}
        for caller, start in starts.items():
            rows = await self._run(
                self._query,
                "SELECT COALESCE(SUM(cost_usd), 0) AS spent FROM chatd_usage "
                "WHERE caller = ? AND time >= ?",
                (caller, iso(start)),
            )
            spent[caller] = float(rows[0]["spent"])
        return spent

    async def count(self) -> int:
        rows = await self._run(self._query, "SELECT COUNT(*) AS n FROM chatd_usage", ())
        return int(rows[0]["n"])

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)
