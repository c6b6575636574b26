"""Live callers in SQLite (the default): the ledger's file, a connection of its own on a
thread of its own; one transaction at a time, `BEGIN IMMEDIATE` so processes sharing the
file (a server and the CLI) take turns instead of failing."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from chatd.state.callers_store import CallerStore
from chatd.state.usage.sqlite import sqlite_path

BUSY_TIMEOUT_SECS = 5.0


class _SQLiteTx:
    def __init__(self, store: SQLiteCallerStore) -> None:
        self.store = store

    async def execute(self, sql: str, *args: Any) -> int:
        return int(await self.store._run(_execute, self.store._connect(), sql, args))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return await self.store._run(_fetch, self.store._connect(), sql, args)  # type: ignore[no-any-return]


def _execute(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> int:
    return db.execute(sql, args).rowcount


def _fetch(db: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    cursor = db.execute(sql, args)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class SQLiteCallerStore(CallerStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatd-callers-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()  # one transaction (or read) at a time on the connection

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECS, check_same_thread=False,
                isolation_level=None,
            )  # fmt: skip
            db.execute("PRAGMA journal_mode=WAL")
            self._db = db
        return self._db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SQLiteTx]:
        async with self._lock:
            await self._run(lambda: self._connect().execute("BEGIN IMMEDIATE"))
            try:
                yield _SQLiteTx(self)
            except BaseException:
                await self._run(lambda: self._connect().execute("ROLLBACK"))
                raise
            await self._run(lambda: self._connect().execute("COMMIT"))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self._lock:
            return await self._run(lambda: _fetch(self._connect(), sql, args))  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._thread.shutdown(wait=True)
