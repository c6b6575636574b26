"""Retention and daily rollups (docs/usage-ledger.md), on SQLite and a real PostgreSQL: a ledger in
the format written before the daily table, upgraded in place, backfilled and pruned
without losing a figure; reports that read whole days from the daily table; budgets
exact from pruned rows across a restart; a ledger that stops growing on disk; two
replicas sharing one daily table; one pruner at a time."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatd.state.usage import COLUMNS, open_backend
from chatd.state.usage.maintenance import Maintenance
from chatd.state.usage.report import iso
from chatd.state.usage.rollup import DAY, floor_day, plan
from chatd.state.usage.writer import UsageWriter
from tests.fakes.upstream import FakeUpstream
from tests.servers import PostgresServer
from tests.support import ChatdProcess
from tests.test_callers_e2e import auth, chat, config_for, env
from tests.test_usage_ledger import empty_postgres, row

# The ledger as chatd wrote it before the daily table existed ("today's format").
LEGACY_SQLITE = """
CREATE TABLE chatd_usage (
  time TEXT NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, cost_source TEXT,
  latency_ms REAL, ttft_ms REAL, attempts INTEGER, cache TEXT
);
CREATE INDEX chatd_usage_time ON chatd_usage (time);
CREATE INDEX chatd_usage_caller_time ON chatd_usage (caller, time);
"""
LEGACY_POSTGRES = (
    LEGACY_SQLITE.replace("time TEXT", "time TIMESTAMPTZ")
    .replace("REAL", "DOUBLE PRECISION")
    .replace("CREATE INDEX chatd", "CREATE INDEX IF NOT EXISTS chatd")
)
ROWS = 12_000
SPAN_DAYS = 120


def legacy_rows(now: float, count: int = ROWS, seed: int = 28) -> list[tuple[Any, ...]]:
    """`count` rows over the last SPAN_DAYS days: NULL keys, errors, odd costs."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        at = now - SPAN_DAYS * DAY + (SPAN_DAYS * DAY - 60) * i / count
        failed = rng.random() < 0.1
        rows.append(
            row(
                at,
                rng.choice(["a", "b", "c", None]),
                rng.choice(["m1", "m2", None]),
                provider=rng.choice(["p1", "p2", None]),
                route=rng.choice(["/v1/chat", "/v1/embeddings"]),
                error="upstream_error" if failed else None,
                input_tokens=rng.choice([None, rng.randrange(5000)]),
                output_tokens=rng.randrange(3000),
                cost_usd=rng.choice([None, rng.random() / 7]),
            )
        )
    return rows


def raw_sums(rows: list[tuple[Any, ...]], since: float, until: float) -> dict[Any, list[Any]]:
    """(caller, day) → [requests, errors, input_tokens, output_tokens, cost_usd]."""
    c = {name: COLUMNS.index(name) for name in COLUMNS}
    sums: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for r in rows:
        if since <= r[0] < until:
            acc = sums[(r[c["caller"]], iso(r[0])[:10])]
            acc[0] += 1
            acc[1] += r[c["error"]] is not None
            acc[2] += r[c["input_tokens"]] or 0
            acc[3] += r[c["output_tokens"]] or 0
            acc[4] += r[c["cost_usd"]] or 0.0
    return sums


async def build_legacy(url: str, rows: list[tuple[Any, ...]]) -> None:
    if url.startswith("sqlite://"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        db.executescript(LEGACY_SQLITE)
        marks = ", ".join("?" * len(COLUMNS))
        db.executemany(
            f"INSERT INTO chatd_usage VALUES ({marks})", [(iso(r[0]), *r[1:]) for r in rows]
        )
        db.commit()
        db.close()
        return
    from datetime import UTC, datetime

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(LEGACY_POSTGRES)
        await conn.copy_records_to_table(
            "chatd_usage",
            records=[(datetime.fromtimestamp(r[0], UTC), *r[1:]) for r in rows],
            columns=list(COLUMNS),
        )
    finally:
        await conn.close()


def assert_same(report: list[dict[str, Any]], expected: dict[Any, list[Any]]) -> None:
    got = {(r["caller"], r["day"]): r for r in report}
    assert set(got) == set(expected)
    for key, (requests, errors, tokens_in, tokens_out, cost) in expected.items():
        r = got[key]
        assert (r["requests"], r["errors"]) == (requests, errors), key
        assert (r["input_tokens"], r["output_tokens"]) == (tokens_in, tokens_out), key
        assert abs(r["cost_usd"] - cost) < 1e-6, key


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    server: PostgresServer = request.getfixturevalue("pg")
    await empty_postgres(server.dsn)
    return server.dsn


async def test_an_old_ledger_is_upgraded_backfilled_and_pruned_without_losing_a_figure(
    url: str,
) -> None:
    now = time.time()
    rows = legacy_rows(now)
    await build_legacy(url, rows)
    since, until = floor_day(now) - 100 * DAY, floor_day(now)  # 100 whole days
    expected = raw_sums(rows, since, until)

    backend = open_backend(url)
    await backend.open()  # the upgrade: a column and two tables, nothing read
    pending: list[float] = []
    pruned: list[int] = []
    upkeep = Maintenance(backend, 1, pruned.append, pending.append)
    try:
        assert_same((await backend.report(since, until, None, ["caller", "day"])).rows, expected)
        async with backend.maintenance() as turn:  # part way: the answer is the same
            for _ in range(30):
                await turn.backfill_step()
        assert_same((await backend.report(since, until, None, ["caller", "day"])).rows, expected)

        assert await upkeep.once()  # the rest of the backfill, then pruning
        assert pending[-1] == 0 and max(pending) > 60
        assert "backfill_to" not in await backend.ledger_state()  # done, and said so
        cutoff = floor_day(now - DAY)
        kept = sum(1 for r in rows if r[0] >= cutoff)
        assert sum(pruned) == ROWS - kept and await backend.count() == kept
        answer = await backend.report(since, until, None, ["caller", "day"])
        assert_same(answer.rows, expected)
        assert not answer.rounded
        first = floor_day(now) - (SPAN_DAYS + 1) * DAY  # every day, the oldest included
        every = await backend.report(first, until, None, ["caller", "day"])
        assert_same(every.rows, raw_sums(rows, first, until))

        # An edge inside a pruned day is widened to the whole day, and says so.
        day = floor_day(now) - 50 * DAY
        edge = await backend.report(day + 3600, day + 2 * DAY, None, ["caller", "day"])
        assert edge.rounded
        assert_same(edge.rows, raw_sums(rows, day, day + 2 * DAY))
        # Spend at start: whole days, from the daily table.
        spent = await backend.spend_since({"a": since, "zz": since})
        whole = sum(v[4] for k, v in raw_sums(rows, since, now + 1).items() if k[0] == "a")
        assert abs(spent["a"] - whole) < 1e-6 and spent["zz"] == 0
    finally:
        await backend.aclose()


def test_plan_reads_whole_days_from_the_daily_table_and_edges_from_rows() -> None:
    d = 1_000 * DAY
    now = d + 10 * DAY + 3600
    # Mid-day to mid-day: two partial edges from rows, whole days between from daily.
    p = plan(d + 100, d + 5 * DAY + 200, now, float("-inf"), 0)
    assert p.days == [(d + DAY, d + 5 * DAY)] and not p.rounded
    assert p.spans == [(d + 100, d + DAY), (d + 5 * DAY, d + 5 * DAY + 200)]
    # Up to now: today is the daily table's row so far.
    p = plan(d, now + 1, now, float("-inf"), 0)
    assert p.days == [(d, d + 11 * DAY)] and p.spans == []
    # An edge before the rows pruned: its whole day, rounded.
    p = plan(d + 100, d + 3 * DAY, now, float("-inf"), d + 2 * DAY)
    assert p.days == [(d, d + 3 * DAY)] and p.rounded
    # Backfill pending below d + 2 days: those days from rows.
    p = plan(d, d + 4 * DAY, now, d + 2 * DAY, 0)
    assert p.spans == [(d, d + 2 * DAY)] and p.days == [(d + 2 * DAY, d + 4 * DAY)]
    assert plan(d + 5, d + 5, now, 0, 0).days == []


def test_the_ledger_stops_growing_on_disk_at_a_steady_rate(tmp_path: Path) -> None:
    """30 simulated days, 7-day retention: the page count is flat after day 8."""
    path = tmp_path / "ledger.sqlite3"
    start = floor_day(time.time()) - 40 * DAY
    per_day = 3000
    pages: list[int] = []

    async def run() -> None:
        backend = open_backend(f"sqlite:///{path}")
        upkeep = Maintenance(backend, 7)
        try:
            for day in range(30):
                base = start + day * DAY
                batch = [
                    row(base + i * DAY / per_day, f"c{i % 7}", f"m{i % 3}", request_id=f"{i:032x}")
                    for i in range(per_day)
                ]
                for i in range(0, per_day, 500):
                    await backend.write(batch[i : i + 500])
                await upkeep.once(now=base + DAY)
                db = sqlite3.connect(path)
                pages.append(db.execute("PRAGMA page_count").fetchone()[0])
                db.close()
        finally:
            await backend.aclose()

    asyncio.run(run())
    assert pages[-1] <= pages[8] * 1.10, pages
    assert pages[8] > pages[3] * 1.5  # it did grow until the retention filled


async def test_two_replicas_sum_exactly_and_one_prunes_at_a_time(pg: PostgresServer) -> None:
    await empty_postgres(pg.dsn)
    a, b = open_backend(pg.dsn), open_backend(pg.dsn)
    await asyncio.gather(a.open(), b.open())
    now = time.time()

    async def replica(backend: Any, name: str) -> None:
        writer = UsageWriter(backend, 10_000, flush_secs=0.01)
        writer.start()
        for i in range(5000):
            # The same daily keys from both replicas, in different orders.
            caller = ["x", "y", "z"][(i if name == "a" else -i) % 3]
            writer.enqueue(row(now - (i % 3) * DAY, caller, f"m{i % 2}"))
            if i % 250 == 0:
                await asyncio.sleep(0.005)
        await writer.aclose()

    try:
        await asyncio.gather(replica(a, "a"), replica(b, "b"))
        conn = await asyncpg.connect(pg.dsn)
        try:
            assert await conn.fetchval("SELECT SUM(requests) FROM chatd_usage_daily") == 10_000
        finally:
            await conn.close()
        a, b = open_backend(pg.dsn), open_backend(pg.dsn)
        async with a.maintenance() as first:
            assert first is not None
            async with b.maintenance() as second:
                assert second is None  # the other replica has the turn
        async with b.maintenance() as later:
            assert later is not None
    finally:
        await a.aclose()
        await b.aclose()


def test_budgets_stay_exact_when_the_month_is_in_pruned_rows(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """$0.95 of a $1.00 month spent in rows a 1-day retention prunes: the daily table
    still holds it, before and after a restart."""
    now = time.time()
    month = floor_day(now - (time.gmtime(now).tm_mday - 1) * DAY)
    if now - month < 3 * DAY:
        pytest.skip("the month's first two days: nothing in it is past a 1-day retention")
    path = tmp_path / "old.sqlite3"
    old = [row(month + 60 + i, "spender", "ok", cost_usd=0.095) for i in range(10)]
    asyncio.run(build_legacy(f"sqlite:///{path}", old))
    config = config_for(fake, f"sqlite:///{path}", budget=1.0).replace(
        "[chatd]\n", "[chatd]\nusage_retention_days = 1\n", 1
    )
    with ChatdProcess(config, tmp_path, env=env()) as gw:
        assert wait_for(lambda: pruned(gw) == 10), gw.log()
        db = sqlite3.connect(path)
        assert db.execute("SELECT COUNT(*) FROM chatd_usage").fetchone()[0] == 0
        db.close()
        answers = [chat(gw, headers=auth("spender")).status_code for _ in range(5)]
        assert answers[:3] == [200, 200, 200] and 429 in answers  # ~$0.017 a call
    with ChatdProcess(config, tmp_path, env=env()) as again:
        refused = chat(again, headers=auth("spender"))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "budget_exceeded"
        usage = httpx.get(again.url + "/v1/usage", headers=auth("root"), timeout=10).json()
        assert usage["rounded_to_days"] is False
        spender = next(r for r in usage["rows"] if r["caller"] == "spender")
        assert spender["cost_usd"] > 1.0
        bad = httpx.get(
            again.url + "/v1/usage?since=2026-02-01&until=2026-01-01",
            headers=auth("root"),
            timeout=10,
        )
        assert bad.status_code == 400


def pruned(gw: ChatdProcess) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("chatd_usage_rows_pruned_total "):
            return float(line.split()[1])
    return 0.0


def wait_for(check: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


async def test_a_ledger_written_before_the_trigger_gets_it_and_its_days_keep_adding_up(
    tmp_path: Path,
) -> None:
    """The SQLite daily sums are a trigger's (docs/usage-ledger.md): a ledger made by a
    chatd that upserted them itself (no trigger) gets it when opened, and every batch
    after (one statement, or several in one transaction) lands in its days."""
    path = tmp_path / "usage.sqlite3"
    backend: Any = open_backend(f"sqlite:///{path}")
    await backend.open()
    await backend.aclose()
    db = sqlite3.connect(path)
    db.execute("DROP TRIGGER chatd_usage_rollup")  # as the chatd before it left the file
    db.close()
    backend = open_backend(f"sqlite:///{path}")
    await backend.open()
    now = time.time()
    try:
        for size in (3, 4000):  # one statement; three, in one transaction
            await backend.write([row(now - i, f"c{i % 2}", "m", request_id=f"{size}-{i}")
                                 for i in range(size)])  # fmt: skip
    finally:
        await backend.aclose()
    db = sqlite3.connect(path)
    days = db.execute(
        "SELECT caller, SUM(requests), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd) "
        "FROM chatd_usage_daily GROUP BY caller ORDER BY caller"
    ).fetchall()
    rows = db.execute(
        "SELECT caller, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd) "
        "FROM chatd_usage GROUP BY caller ORDER BY caller"
    ).fetchall()
    db.close()
    assert [d[:4] for d in days] == [r[:4] for r in rows] and sum(d[1] for d in days) == 4003
    assert [d[4] for d in days] == pytest.approx([r[4] for r in rows], abs=1e-9)
