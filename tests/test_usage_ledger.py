"""The usage ledger, one suite over both back ends: SQLite (a file) and a real
PostgreSQL server started here (tests/servers.py), killed and restarted mid-run."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatd.state.usage import COLUMNS, open_backend
from chatd.state.usage.report import iso
from chatd.state.usage.writer import UsageWriter
from tests.servers import PostgresServer

DAY = 86_400.0


async def empty_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DROP TABLE IF EXISTS chatd_usage, chatd_usage_daily, chatd_usage_meta, "
            "chatd_usage_batches"
        )
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg")
    await empty_postgres(server.dsn)
    return server.dsn


def row(at: float, caller: str | None, model: str, **over: Any) -> tuple[Any, ...]:
    fields = dict.fromkeys(COLUMNS)
    fields.update(
        time=at, request_id=f"r{at}", caller=caller, route="/v1/chat", model=model,
        provider="mock", upstream_model=model, status=200, input_tokens=10, output_tokens=5,
        cost_usd=0.25, cost_source="price", latency_ms=12.5, attempts=1,
    )  # fmt: skip
    fields.update(over)
    return tuple(fields[c] for c in COLUMNS)


async def test_rows_are_written_and_grouped_by_caller_model_provider_day(url: str) -> None:
    backend = open_backend(url)
    await backend.open()
    writer = UsageWriter(backend, 100)
    now = time.time()
    yesterday = now - DAY
    writer.enqueue(row(now, "a", "hot"))
    writer.enqueue(row(now, "a", "hot", status=502, error="upstream_error", cost_usd=0.0))
    writer.enqueue(row(now, "b", "cold"))
    writer.enqueue(row(yesterday, "a", "cold"))
    writer.enqueue(row(now, None, None, status=401, error="unauthorized", cost_usd=0.0))
    assert await writer.flush()
    try:
        assert await backend.count() == 5
        by_caller = await backend.summary(now - 2 * DAY, now + 1, None, ["caller"])
        got = {r["caller"]: r for r in by_caller}
        assert int(got["a"]["requests"]) == 3 and int(got["a"]["errors"]) == 1
        assert int(got["a"]["input_tokens"]) == 30 and float(got["a"]["cost_usd"]) == 0.5
        assert int(got["b"]["requests"]) == 1 and int(got[None]["errors"]) == 1
        by_day = await backend.summary(now - 2 * DAY, now + 1, "a", ["model", "day"])
        keys = {(r["model"], r["day"]) for r in by_day}
        assert keys == {("hot", iso(now)[:10]), ("cold", iso(yesterday)[:10])}
        only_today = await backend.summary(now - 60, now + 1, "a", [])
        assert int(only_today[0]["requests"]) == 2
        spent = await backend.spend_since({"a": now - 60, "b": now - 60, "c": now - 60})
        assert spent == {"a": 0.25, "b": 0.25, "c": 0.0}
    finally:
        await writer.aclose()


async def test_the_writer_flushes_by_itself_within_a_second(url: str) -> None:
    backend = open_backend(url)
    writer = UsageWriter(backend, 100)
    await backend.open()
    writer.start()
    try:
        for i in range(20):
            writer.enqueue(row(time.time(), "a", f"m{i}"))
        for _ in range(50):  # up to 5 s
            if await backend.count() >= 20:
                break
            await asyncio.sleep(0.1)
        assert await backend.count() == 20
        assert not writer.rows
    finally:
        await writer.aclose()


async def test_a_full_buffer_drops_and_counts_the_rest(url: str) -> None:
    dropped: list[int] = []
    backend = open_backend(url)
    await backend.open()
    writer = UsageWriter(backend, 5, lambda: dropped.append(1))
    for i in range(8):
        writer.enqueue(row(time.time(), "a", f"m{i}"))
    assert len(dropped) == 3 and writer.dropped == 3
    await writer.aclose()
    backend = open_backend(url)
    assert await backend.count() == 5
    await backend.aclose()


async def test_close_writes_what_is_buffered(url: str) -> None:
    backend = open_backend(url)
    writer = UsageWriter(backend, 1000, flush_secs=3600)  # the loop never gets to it
    writer.start()
    for i in range(300):
        writer.enqueue(row(time.time(), "a", f"m{i}"))
    await writer.aclose(5)
    backend = open_backend(url)
    assert await backend.count() == 300
    await backend.aclose()


def test_sqlite_ledger_is_a_wal_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"

    async def write() -> None:
        backend = open_backend(f"sqlite:///{path}")
        await backend.write([row(time.time(), "a", "hot")])
        await backend.aclose()

    asyncio.run(write())
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT caller, model, cost_source FROM chatd_usage").fetchall() == [
        ("a", "hot", "price")
    ]


def test_a_batch_past_one_statement_lands_whole_and_in_order(tmp_path: Path) -> None:
    """SQLite takes a batch as `INSERT … VALUES (…), (…)` of up to CHUNK_ROWS rows each:
    a longer batch is several statements, every row lands once, values intact."""
    from chatd.state.usage.sqlite import CHUNK_ROWS

    path = tmp_path / "ledger.sqlite3"
    total = 2 * CHUNK_ROWS + 7
    rows = [row(1_700_000_000 + i, f"c{i}", "hot", input_tokens=i) for i in range(total)]

    async def write() -> None:
        backend = open_backend(f"sqlite:///{path}")
        await backend.write(rows)
        await backend.aclose()

    asyncio.run(write())
    db = sqlite3.connect(path)
    got = db.execute("SELECT time, caller, input_tokens, status FROM chatd_usage").fetchall()
    assert len(got) == total
    assert sorted(got, key=lambda r: r[2]) == [
        (iso(1_700_000_000 + i), f"c{i}", i, 200) for i in range(total)
    ]


async def test_postgres_killed_mid_run_loses_no_row(pg: PostgresServer) -> None:
    await empty_postgres(pg.dsn)
    backend = open_backend(pg.dsn)
    await backend.open()
    writer = UsageWriter(backend, 10_000, flush_secs=0.2)
    writer.start()
    try:
        for i in range(50):
            writer.enqueue(row(time.time(), "a", f"before{i}"))
        await asyncio.sleep(0.8)
        assert await backend.count() == 50
        await asyncio.to_thread(pg.kill)
        for i in range(70):  # the database is gone: these wait in memory
            writer.enqueue(row(time.time(), "a", f"during{i}"))
        await asyncio.sleep(1.5)
        assert len(writer.rows) == 70
        await asyncio.to_thread(pg.start)
        for _ in range(100):  # up to 20 s
            # Written, not only out of the buffer: a batch leaves it before its write
            # ends (and comes back if the write fails).
            if writer.written == 120:
                break
            await asyncio.sleep(0.2)
        assert not writer.rows and writer.written == 120
        assert await backend.count() == 120
    finally:
        await writer.aclose()


async def test_a_batch_whose_commit_answer_was_lost_is_not_written_twice(
    pg: PostgresServer,
) -> None:
    # Found by the gateway soak: PostgreSQL killed right after it committed a batch, the
    # writer saw the connection drop, wrote the batch again, and the ledger held those
    # requests twice (and their daily sums doubled).
    await empty_postgres(pg.dsn)
    backend = open_backend(pg.dsn)
    await backend.open()
    lost: list[bool] = []

    class AnswerLost:  # the real write, which commits; then the connection "drops"
        async def write(self, rows: list, key: str = "") -> None:
            await backend.write(rows, key)
            if not lost:
                lost.append(True)
                raise ConnectionResetError("connection lost waiting for COMMIT's answer")

    writer = UsageWriter(AnswerLost(), 1000, flush_secs=3600)  # type: ignore[arg-type]
    now = time.time()
    for i in range(30):
        writer.enqueue(row(now + i / 1000, "a", "hot"))
    assert await writer.flush() is False and len(writer.rows) == 30  # kept, to try again
    writer.enqueue(row(now + 1, "a", "hot"))  # a new row behind them goes in its own batch
    assert await writer.flush() is True and not writer.rows
    assert await backend.count() == 31
    conn = await asyncpg.connect(pg.dsn)
    try:  # the daily sums, added in the batch's own transaction, once too
        assert await conn.fetchval("SELECT SUM(requests) FROM chatd_usage_daily") == 31
    finally:
        await conn.close()
    await backend.aclose()
