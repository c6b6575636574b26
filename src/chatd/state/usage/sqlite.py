"""The SQLite ledger (the default): stdlib sqlite3, WAL mode. Every write (batches, the
backfill's upserts, pruning's deletes) goes through one connection on one thread, in
turn, batches first (a prune transaction waits, or is interrupted), never on a lock; reads
(reports, the backfill's sums) use connections of their own on two other threads."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from chatd.state.usage import COLUMNS, Row
from chatd.state.usage.report import SQLITE, iso, summary_query
from chatd.state.usage.rollup import (
    BACKFILL_TO,
    DAY,
    PRUNED_BEFORE,
    Reads,
    daily_query,
    floor_day,
)
from chatd.state.usage.sqlite_schema import LEGACY_SUMS, PRUNE, UPSERT, create_schema, epoch

# A batch goes in as few statements as SQLite's parameter limit allows (32,766 since
# 3.32; 1,800 rows of 18 columns is 32,400), each `INSERT … VALUES (…), (…), …`: one
# statement up to 1,800 rows (3,600 requests a second at a flush every 0.5 s). The
# database thread gives up the GIL for each statement and waits to take it back behind
# the event loop (docs/usage-ledger.md#what-a-row-costs).
CHUNK_ROWS = 1800
CHECKPOINT_SECS = 1.0
ROW = f"({', '.join('?' * len(COLUMNS))}, 1)"
# A None is bound as NULL either way, but with no adapter for it the sqlite3 module looks
# one up for each None (~2K instructions; a row has three or four): `{}.get` is found at
# once and answers None, in C (docs/usage-ledger.md#what-a-row-costs).
sqlite3.register_adapter(type(None), {}.get)


@functools.lru_cache(maxsize=8)
def insert(rows: int) -> str:
    """`INSERT` of `rows` rows. A batch is full chunks of CHUNK_ROWS (always cached) and
    one shorter remainder, whose size changes from flush to flush."""
    names = ", ".join(COLUMNS)
    return f"INSERT INTO chatd_usage ({names}, rolled) VALUES {', '.join([ROW] * rows)}"


def parameters(rows: list[Row]) -> list[list[Any]]:
    """A batch as the statements take it: each chunk's rows, flattened, time as ISO text
    (the daily sums are the trigger's, ROLLUP)."""
    return [
        [value for row in rows[i : i + CHUNK_ROWS] for value in (iso(row[0]), *row[1:])]
        for i in range(0, len(rows), CHUNK_ROWS)
    ]


def sqlite_path(url: str) -> str:
    """`sqlite:///chatd-usage.sqlite3` (relative) or `sqlite:////var/lib/x.db` (absolute)."""
    path = url.removeprefix("sqlite://")
    return path[1:] if path.startswith("/") else path


class SQLiteBackend(Reads):
    """Writes on one thread (one connection), reads on two others (one connection each)."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chatd-usage-sqlite")
        self._readers = ThreadPoolExecutor(2, thread_name_prefix="chatd-usage-read")
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._db: sqlite3.Connection | None = None
        self._checkpointed = 0.0
        self._checkpointing: asyncio.Future[None] | None = None
        # A batch write goes before pruning: while one waits, a prune transaction does not
        # begin, and one under way is interrupted (rolled back, tried again after it).
        self._turns = threading.Lock()
        self._writes_waiting = 0
        self._deleting = False
        self._closing = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=10, check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints (the WAL's pages copied into the file) run on a reader's
            # connection, passive, so writes go on meanwhile: never in a batch's commit.
            db.execute("PRAGMA wal_autocheckpoint=0")
            create_schema(db)
            self._db = db
        return self._db

    def _reader(self) -> sqlite3.Connection:
        if self.path == ":memory:":  # one database only while this connection lives
            return self._connect()
        db = getattr(self._local, "db", None)
        if db is None:
            self._connect_once()
            db = self._local.db = sqlite3.connect(
                self.path, timeout=10, check_same_thread=False, isolation_level=None
            )
            self._opened.append(db)
        return db

    def _connect_once(self) -> None:
        if self._db is None:  # the schema is made by the writer's connection first
            self._thread.submit(self._connect).result()

    async def _read(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        def query() -> list[dict[str, Any]]:
            cursor = self._reader().execute(sql, args)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

        return await asyncio.get_running_loop().run_in_executor(self._readers, query)

    async def open(self) -> None:
        await self._run(self._connect)

    def _write(self, chunks: list[list[Any]]) -> None:
        db = self._connect()
        width = len(COLUMNS)
        if len(chunks) == 1:  # one statement, a transaction of its own (its sums in it)
            db.execute(insert(len(chunks[0]) // width), chunks[0])
            return
        db.execute("BEGIN")
        try:
            for values in chunks:
                db.execute(insert(len(values) // width), values)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def write(self, rows: list[Row], key: str = "") -> None:
        # `key` is not needed here: a failed SQLite write never committed.
        # The parameters are made here, on the event loop (a few µs a row, once a flush),
        # so the database thread runs no Python loop while it holds the GIL.
        made = parameters(rows)
        with self._turns:
            self._writes_waiting += 1
            if self._deleting and self._db is not None:
                self._db.interrupt()
        try:
            await self._run(self._write, made)
        finally:
            with self._turns:
                self._writes_waiting -= 1
        self._checkpoint_soon()

    def _checkpoint_soon(self, now_anyway: bool = False) -> None:
        """At most one passive checkpoint a second, on a reader's thread, not waited for."""
        now = time.monotonic()
        if (now - self._checkpointed < CHECKPOINT_SECS and not now_anyway) or self._closing:
            return
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._checkpointed = now
        loop = asyncio.get_running_loop()
        self._checkpointing = loop.run_in_executor(self._readers, self._checkpoint)

    def _checkpoint(self) -> None:
        try:
            self._reader().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:  # busy, or closing: the next one does it
            pass

    # -- reads ------------------------------------------------------------------------

    async def ledger_state(self) -> dict[str, float]:
        rows = await self._read("SELECT key, value FROM chatd_usage_meta", ())
        return {row["key"]: float(row["value"]) for row in rows}

    async def rows_summary(
        self, span: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql, _ = summary_query(SQLITE, group_by, caller)
        args: tuple[Any, ...] = (iso(span[0]), iso(span[1]))
        return await self._read(sql, args + ((caller,) if caller is not None else ()))

    async def daily_summary(
        self, days: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        sql = daily_query(group_by, caller, "?", "day")
        args: tuple[Any, ...] = (iso(days[0])[:10], iso(days[1] - DAY)[:10])
        return await self._read(sql, args + ((caller,) if caller is not None else ()))

    async def count(self) -> int:
        rows = await self._read("SELECT COUNT(*) AS n FROM chatd_usage", ())
        return int(rows[0]["n"])

    # -- maintenance: the backfill and pruning (maintenance.py runs them) ----------------

    @asynccontextmanager
    async def maintenance(self) -> Any:
        yield self  # one process per file, as a rule: nothing to take turns with

    async def backfill_step(self) -> float:
        """Sum the last not yet backfilled day(s) of old rows into the daily table; the
        days left to backfill after it (0: done)."""
        state = await self.ledger_state()
        mark = state.get(BACKFILL_TO)
        if mark is None:
            return 0
        span = await self._read(
            "SELECT MIN(time) AS low, (SELECT MAX(time) FROM chatd_usage WHERE time < ?) "
            "AS high FROM chatd_usage",
            (iso(mark),),
        )
        low, high = span[0]["low"], span[0]["high"]
        if high is None:
            await self._run(self._advance, mark, None, [])
            return 0
        start = floor_day(epoch(high))
        sums = await self._read_raw(LEGACY_SUMS, (iso(start), iso(mark)))
        left = max(0.0, (start - floor_day(epoch(low))) / DAY)
        # The oldest day summed: the backfill is done, in the same transaction.
        await self._run(self._advance, mark, start if left else None, sums)
        return left

    async def _read_raw(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        read = lambda: self._reader().execute(sql, args).fetchall()  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(self._readers, read)

    def _advance(self, mark: float, start: float | None, sums: list[tuple[Any, ...]]) -> None:
        """Add the sums and move the mark in one transaction, if no one moved it first."""
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            (value,) = db.execute(
                "SELECT value FROM chatd_usage_meta WHERE key = ?", (BACKFILL_TO,)
            ).fetchone() or (None,)
            if value is not None and float(value) == mark:
                db.executemany(UPSERT, sums)
                if start is None:
                    db.execute("DELETE FROM chatd_usage_meta WHERE key = ?", (BACKFILL_TO,))
                else:
                    db.execute(
                        "UPDATE chatd_usage_meta SET value = ? WHERE key = ?",
                        (repr(start), BACKFILL_TO),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def mark_pruned(self, cutoff: float) -> bool:
        """Before deleting: reports learn that rows before `cutoff` may be gone. False
        when there is nothing before it to delete."""
        if BACKFILL_TO in await self.ledger_state():  # rows not yet summed stay
            return False
        oldest = await self._read("SELECT MIN(time) AS low FROM chatd_usage", ())
        if oldest[0]["low"] is None or oldest[0]["low"] >= iso(cutoff):
            return False

        def mark() -> None:
            self._connect().execute(
                "INSERT INTO chatd_usage_meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                "value = MAX(CAST(value AS REAL), CAST(excluded.value AS REAL))",
                (PRUNED_BEFORE, repr(cutoff)),
            )

        await self._run(mark)
        return True

    async def prune_chunk(self, cutoff: float, limit: int) -> tuple[int, float]:
        """Delete up to `limit` of the oldest rows before `cutoff`, in one transaction:
        the rows deleted, and the seconds it took on the database thread.

        Not while a checkpoint runs: its writes and fsync slow a delete, and a batch
        write would queue behind both (docs/usage-ledger.md). The pages deleted reach the
        file with the next checkpoint (one at once after the last chunk)."""
        while True:
            if self._checkpointing is not None and not self._checkpointing.done():
                await asyncio.shield(self._checkpointing)
            done = await self._run(self._delete, iso(cutoff), limit)
            if done is not None:
                break
            await asyncio.sleep(0.001)  # a batch write went first
        self._checkpoint_soon(now_anyway=done[0] < limit)
        return done

    def _delete(self, before: str, limit: int) -> tuple[int, float] | None:
        """The prune transaction, on the writer's thread; None when a batch write came
        first (it waited, or it interrupted this one: nothing was deleted)."""
        with self._turns:
            if self._writes_waiting:
                return None
            self._deleting = True
        began = time.perf_counter()
        try:
            deleted = self._connect().execute(PRUNE, (before, limit)).rowcount
            return int(deleted), time.perf_counter() - began
        except sqlite3.OperationalError as exc:
            if "interrupt" not in str(exc):
                raise
            return None
        finally:
            with self._turns:
                self._deleting = False

    async def aclose(self) -> None:
        self._closing = True

        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        # The readers' threads finish what they were given (a checkpoint, say) first.
        await asyncio.to_thread(self._readers.shutdown, True)
        for db in self._opened:
            db.close()
        self._opened.clear()
        await self._run(close)
        self._thread.shutdown(wait=True)
