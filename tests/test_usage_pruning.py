"""Pruning beside the writer (docs/usage-ledger.md): each prune transaction bounded in
rows, and smaller while they take long; on SQLite, no prune transaction while a
checkpoint runs, and batch writes go through meanwhile."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from chatd.state.usage import open_backend
from chatd.state.usage.maintenance import (
    CHUNK_SECS,
    PRUNE_MAX_ROWS,
    PRUNE_MIN_ROWS,
    PRUNE_ROWS,
    Maintenance,
    next_rows,
)
from chatd.state.usage.rollup import DAY, floor_day
from tests.servers import PostgresServer
from tests.test_usage_ledger import empty_postgres, row


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg")
    await empty_postgres(server.dsn)
    return server.dsn


class Recording:
    """A maintenance turn that notes each prune transaction's row limit."""

    def __init__(self, turn: Any) -> None:
        self.turn = turn
        self.limits: list[int] = []
        self.deleted: list[int] = []

    async def mark_pruned(self, cutoff: float) -> bool:
        return bool(await self.turn.mark_pruned(cutoff))

    async def prune_chunk(self, cutoff: float, limit: int) -> tuple[int, float]:
        self.limits.append(limit)
        deleted, took = await self.turn.prune_chunk(cutoff, limit)
        self.deleted.append(deleted)
        return deleted, took


async def test_old_rows_go_in_transactions_of_bounded_rows(url: str) -> None:
    now = time.time()
    old = now - 10 * DAY
    backend = open_backend(url)
    await backend.open()
    try:
        rows = [row(old + i, f"c{i % 7}", "m", request_id=f"o{i}") for i in range(3000)]
        for i in range(0, len(rows), 500):
            await backend.write(rows[i : i + 500])
        await backend.write([row(now - i, "c1", "m", request_id=f"n{i}") for i in range(10)])
        async with backend.maintenance() as turn:
            recording = Recording(turn)
            assert await Maintenance(backend, 1).prune(recording, now) == 3000
        assert await backend.count() == 10
        assert recording.limits[0] == PRUNE_ROWS
        assert all(PRUNE_MIN_ROWS <= n <= PRUNE_MAX_ROWS for n in recording.limits)
        assert all(d <= n for d, n in zip(recording.deleted, recording.limits, strict=True))
        assert len(recording.limits) >= 3000 // PRUNE_MAX_ROWS
    finally:
        await backend.aclose()


class SlowDisk:
    """A turn whose prune transactions take 40 µs a row."""

    def __init__(self, rows: int) -> None:
        self.left = rows
        self.limits: list[int] = []

    async def mark_pruned(self, cutoff: float) -> bool:
        return True

    async def prune_chunk(self, cutoff: float, limit: int) -> tuple[int, float]:
        self.limits.append(limit)
        deleted = min(limit, self.left)
        self.left -= deleted
        return deleted, deleted * 40e-6


async def test_prune_transactions_shrink_until_each_takes_under_the_bound() -> None:
    disk = SlowDisk(20_000)
    assert await Maintenance(None, 1).prune(disk, time.time()) == 20_000
    assert disk.limits[:3] == [PRUNE_ROWS, PRUNE_ROWS // 2, PRUNE_ROWS // 2]  # 8, 4, 4 ms
    # From then on, every one takes at most the bound.
    assert all(n * 40e-6 <= CHUNK_SECS for n in disk.limits[1:])
    assert next_rows(PRUNE_MIN_ROWS, 1.0) == PRUNE_MIN_ROWS  # never below the floor
    assert next_rows(PRUNE_MAX_ROWS, 0.0) == PRUNE_MAX_ROWS  # nor above the ceiling
    assert next_rows(PRUNE_ROWS, 0.0) == 2 * PRUNE_ROWS  # quick ones grow


async def old_rows(tmp_path: Path) -> Any:
    """An open SQLite ledger holding 500 rows ten days old (past any retention here)."""
    backend: Any = open_backend(f"sqlite:///{tmp_path / 'usage.sqlite3'}")
    await backend.open()
    old = time.time() - 10 * DAY
    await backend.write([row(old + i, "a", "m", request_id=f"o{i}") for i in range(500)])
    return backend


async def test_no_prune_transaction_while_a_checkpoint_runs_and_writes_go_on(
    tmp_path: Path,
) -> None:
    backend = await old_rows(tmp_path)
    release = threading.Event()
    try:
        started = threading.Event()
        checkpoint = backend._checkpoint

        def held_checkpoint() -> None:  # a checkpoint that takes as long as the test says
            started.set()
            release.wait(30)
            checkpoint()

        backend._checkpoint = held_checkpoint
        await backend._checkpointing  # the one the write began
        backend._checkpoint_soon(now_anyway=True)
        assert await asyncio.to_thread(started.wait, 10)
        chunk = asyncio.create_task(backend.prune_chunk(floor_day(time.time() - DAY), 100))
        await asyncio.sleep(0.1)
        # The batch write goes through; the prune transaction waits its turn.
        await backend.write([row(time.time(), "b", "m", request_id="new")])
        assert not chunk.done()
        assert await backend.count() == 501
        release.set()
        assert (await chunk)[0] == 100
        assert await backend.count() == 401
    finally:
        release.set()
        await backend.aclose()


async def test_a_batch_write_goes_before_a_prune_transaction_queued_ahead_of_it(
    tmp_path: Path,
) -> None:
    backend = await old_rows(tmp_path)
    release = threading.Event()
    try:
        order: list[str] = []
        write, delete = backend._write, backend._delete

        def noted_write(*args: Any) -> None:
            write(*args)
            order.append("write")

        def noted_delete(before: str, limit: int) -> tuple[int, float] | None:
            done = delete(before, limit)
            order.append("nothing deleted" if done is None else "deleted")
            return done

        backend._write, backend._delete = noted_write, noted_delete
        busy = backend._thread.submit(release.wait, 30)  # the database thread, busy
        chunk = asyncio.create_task(backend.prune_chunk(floor_day(time.time() - DAY), 100))
        await asyncio.sleep(0.1)  # its transaction is queued first ...
        batch = asyncio.create_task(backend.write([row(time.time(), "b", "m")]))
        await asyncio.sleep(0.1)  # ... and the batch behind it
        release.set()
        await batch
        assert (await chunk)[0] == 100
        # Nothing deleted before the batch was written (tried again until it was).
        assert order[:2] == ["nothing deleted", "write"] and order[-1] == "deleted"
        assert order.count("deleted") == 1 and order.count("write") == 1
        assert busy.done() and await backend.count() == 401
    finally:
        release.set()
        await backend.aclose()


async def test_a_batch_write_interrupts_a_prune_transaction_under_way(tmp_path: Path) -> None:
    backend = await old_rows(tmp_path)
    go = threading.Event()
    try:
        order: list[str] = []
        write, delete = backend._write, backend._delete
        backend._write = lambda *args: (write(*args), order.append("write"))

        def noted_delete(*args: Any) -> tuple[int, float] | None:
            done = delete(*args)
            order.append("None" if done is None else str(done[0]))
            return done

        backend._delete = noted_delete
        inside = threading.Event()

        def stalled() -> int:  # SQLite calls it while a statement runs: a slow disk
            if backend._deleting and not go.is_set():
                inside.set()
                go.wait(30)
            return 0

        backend._db.set_progress_handler(stalled, 50)
        chunk = asyncio.create_task(backend.prune_chunk(floor_day(time.time() - DAY), 100))
        assert await asyncio.to_thread(inside.wait, 10)  # the prune transaction, under way
        batch = asyncio.create_task(backend.write([row(time.time(), "b", "m")]))
        await asyncio.sleep(0.1)
        go.set()
        await batch
        assert (await chunk)[0] == 100
        assert order[:2] == ["None", "write"] and order[-1] == "100"  # rolled back, then again
        assert await backend.count() == 401
    finally:
        go.set()
        await backend.aclose()
