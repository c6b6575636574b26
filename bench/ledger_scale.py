"""The usage ledger at scale (docs/usage-ledger.md).

    .venv/bin/python bench/ledger_scale.py [--rows 1000000 3000000] [--days 120]

For each size: a SQLite ledger in the format written before the daily table (built
with SQL, as an older chatd left it) over `--days` days; then a real chatd process
opens it with `usage_retention_days = 1`. Printed, per size:

- the file's bytes a row;
- /ready after start: the upgrade start, and a start once backfilled and pruned, each
  against an empty ledger's (median of `--starts` starts; goal: within 0.5 s);
- backfill time (spawn → the daily table complete) and pruning time;
- the 90-day caller × day `/v1/usage` report: median and worst of 10 (goal < 100 ms),
  and whether 100 whole days grouped by caller and day equal the raw rows' sums taken
  before chatd opened the file (requests, errors, tokens exact; cost to 1e-6);
- batch-write waits while pruning runs (in process, 200-row batches every 20 ms on a
  ledger with the rows past retention; goal: none waiting over 50 ms behind a prune
  transaction), against as long with no pruning; the prune transactions' rows and times.
  `--writes-only`: only this part.

Files go to bench/out/. Stdlib and chatd only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out" / "ledger"
sys.path.insert(0, str(REPO / "src"))

from chatd.state.usage import COLUMNS, open_backend  # noqa: E402
from chatd.state.usage.maintenance import Maintenance  # noqa: E402
from chatd.state.usage.report import iso, month_start  # noqa: E402
from chatd.state.usage.rollup import DAY, floor_day  # noqa: E402

ROOT = "tok-bench-root"
LEGACY = """
CREATE TABLE chatd_usage (
  time TEXT NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, cost_source TEXT,
  latency_ms REAL, ttft_ms REAL, attempts INTEGER, cache TEXT
);
CREATE INDEX chatd_usage_time ON chatd_usage (time);
CREATE INDEX chatd_usage_caller_time ON chatd_usage (caller, time);
"""
# Rows as chatd writes them: 20 callers, 6 models on 3 providers, 2 routes, 1 in 10 an
# error, some without tokens; the request id a 32-hex-digit string.
FILL = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :rows - 1)
INSERT INTO chatd_usage SELECT
  strftime('%Y-%m-%dT%H:%M:%fZ', :start + i * :step, 'unixepoch'),
  lower(hex(randomblob(16))), 'caller' || (i * 7 % 20),
  CASE WHEN i % 9 = 0 THEN '/v1/embeddings' ELSE '/v1/chat' END,
  'model-' || (i % 6), 'provider' || (i % 3), NULL, 'upstream/model-' || (i % 6),
  CASE WHEN i % 10 = 0 THEN 502 ELSE 200 END,
  CASE WHEN i % 10 = 0 THEN 'upstream_error' ELSE NULL END,
  CASE WHEN i % 13 = 0 THEN NULL ELSE i % 4000 END, i % 1500,
  (i % 1000) * 0.0000137 + 0.000001, 'price', 100.0 + i % 900, 40.0 + i % 300, 1, NULL
FROM n
"""


def build(path: Path, rows: int, days: int, now: float) -> None:
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(LEGACY)
    start = now - days * DAY
    db.execute(FILL, {"rows": rows, "start": start, "step": (days * DAY - 60) / rows})
    db.commit()
    db.close()


def raw_sums(path: Path, since: float, until: float) -> dict[tuple[str, str], list[Any]]:
    db = sqlite3.connect(path)
    found = db.execute(
        "SELECT caller, substr(time, 1, 10), COUNT(*), "
        "SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END), COALESCE(SUM(input_tokens), 0), "
        "COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0) FROM chatd_usage "
        "WHERE time >= ? AND time < ? GROUP BY 1, 2",
        (iso(since), iso(until)),
    ).fetchall()
    db.close()
    return {(r[0], r[1]): list(r[2:]) for r in found}


def config(path: Path) -> str:
    callers = "".join(
        f'[chatd.callers.caller{i}]\ntoken_env = "BENCH_CALLER{i}"\nbudget_usd = 100000.0\n\n'
        for i in range(5)
    )  # spend read back at start for these
    return (
        f'[chatd]\ndefault_provider = "mock"\nui = false\nusage_db = "sqlite:///{path}"\n'
        f'usage_retention_days = 1\n\n[chatd.callers.root]\ntoken_env = "BENCH_ROOT"\n'
        f'admin = true\n\n{callers}[chatd.providers.mock]\nkind = "mock"\n'
    )


class Chatd:
    def __init__(self, path: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        toml = OUT / f"chatd-{port}.toml"
        toml.write_text(config(path))
        env = {**os.environ, "BENCH_ROOT": ROOT}
        env.update({f"BENCH_CALLER{i}": f"tok-bench-{i}" for i in range(5)})
        self.began = time.monotonic()
        self.log = open(OUT / f"chatd-{port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatd", "--config", str(toml), "--bind",
             f"127.0.0.1:{port}", "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=OUT,
        )  # fmt: skip
        self.ready = self._wait_ready()

    def _wait_ready(self) -> float:
        while time.monotonic() - self.began < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited: see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=1) as answer:
                    if answer.status == 200:
                        return time.monotonic() - self.began
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError("chatd not ready in 120 s")

    def get(self, path: str) -> tuple[float, Any]:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {ROOT}"}
        )
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=60) as answer:
            body = answer.read()
        return time.perf_counter() - began, json.loads(body) if path != "/metrics" else body

    def metric(self, name: str) -> float:
        _, body = self.get("/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def ready_times(path: Path | None, template: Path | None, starts: int, port: int) -> str:
    """/ready after spawn, median over `starts` starts, each right after an empty
    ledger's start (paired: this machine's load drifts more than the gap measured).
    `template`: each start on a fresh copy of it; else on `path` as it is."""
    seen, empty = [], []
    for n in range(starts):
        for stale in OUT.glob("start-*.sqlite3*"):
            stale.unlink()
        gw = Chatd(OUT / f"start-empty-{n}.sqlite3", port)
        empty.append(gw.ready)
        gw.stop()
        target = path or OUT / f"start-{n}.sqlite3"
        if template is not None:
            shutil.copy(template, target)
        gw = Chatd(target, port)
        seen.append(gw.ready)
        gw.stop()
    gap = statistics.median(a - b for a, b in zip(seen, empty, strict=True))
    return (
        f"{statistics.median(seen):.2f} s vs an empty ledger's {statistics.median(empty):.2f} s"
        f" (paired gap, median: {gap:+.2f} s)"
    )


def ledger_start(path: Path | None, template: Path | None) -> str:
    """In process, the ledger's own share of a start: open (the upgrade, if any) and the
    five budgeted callers' spend; median of 5, each on a fresh copy of `template`."""

    async def once(target: Path) -> float:
        began = time.perf_counter()
        backend = open_backend(f"sqlite:///{target}")
        await backend.open()
        await backend.spend_since({f"caller{i}": month_start(time.time()) for i in range(5)})
        took = time.perf_counter() - began
        await backend.aclose()
        return took

    seen = []
    for _ in range(5):
        target = path or OUT / "start-inproc.sqlite3"
        if template is not None:
            for stale in OUT.glob("start-inproc.sqlite3*"):
                stale.unlink()
            shutil.copy(template, target)
        seen.append(asyncio.run(once(target)))
    return f"{statistics.median(seen) * 1000:.0f} ms"


def wait(check: Any, timeout: float = 600.0) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise RuntimeError("timed out")
        time.sleep(0.02)
    return time.monotonic() - began


def meta(path: Path, key: str) -> str | None:
    db = sqlite3.connect(path)
    try:
        found = db.execute("SELECT value FROM chatd_usage_meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError:
        found = ("not yet",)
    db.close()
    return found[0] if found else None


def compare(report: list[dict[str, Any]], raw: dict[tuple[str, str], list[Any]]) -> str:
    got = {(r["caller"], r["day"]): r for r in report}
    if set(got) != set(raw):
        return f"NO: groups differ ({len(got)} vs {len(raw)})"
    for key, (req, err, tin, tout, cost) in raw.items():
        r = got[key]
        if (r["requests"], r["errors"], r["input_tokens"], r["output_tokens"]) != (
            req, err, tin, tout,
        ) or abs(r["cost_usd"] - cost) > 1e-6:  # fmt: skip
            return f"NO: {key} {r} vs {raw[key]}"
    return f"yes ({len(raw)} caller × day groups)"


class Waits:
    """Batch writes (200 rows every 20 ms) while pruning runs, or for `seconds` without."""

    def __init__(self) -> None:
        self.total: list[float] = []  # a batch's write, as the writer awaits it
        self.behind: list[float] = []  # ... of which queued behind a prune delete
        self.deletes: list[float] = []  # each prune transaction, on the database thread
        self.rows: list[int] = []  # each prune transaction's row limit
        self.seconds = 0.0

    def line(self, what: str) -> str:
        total = sorted(self.total)
        return (
            f"{what} ({self.seconds:.0f} s, {len(total)} batches): worst "
            f"{total[-1] * 1000:.1f} ms, p99 {pct(total, 0.99) * 1000:.1f} ms"
        )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def write_waits(path: Path, prune: bool, seconds: float = 0.0) -> Waits:
    """Write 200-row batches every 20 ms while a whole prune runs (or for `seconds`
    without). A batch's wait behind a prune is the part of its time between being handed
    to the database thread and beginning there that a prune transaction held that thread
    (the thread runs one thing at a time: batches, and pruning's deletes)."""
    backend: Any = open_backend(f"sqlite:///{path}")
    await backend.open()
    clock = time.perf_counter
    began_at: list[float] = []
    deleting: list[tuple[float, float]] = []  # each prune transaction: start, end
    write_in_thread, delete_in_thread = backend._write, backend._delete

    def timed_write(*args: Any) -> None:
        began_at.append(clock())
        write_in_thread(*args)

    def timed_delete(before: str, limit: int) -> Any:
        began = clock()
        try:
            return delete_in_thread(before, limit)
        finally:
            deleting.append((began, clock()))
            found.rows.append(limit)

    found = Waits()
    backend._write, backend._delete = timed_write, timed_delete
    async with backend.maintenance() as turn:
        while await turn.backfill_step():
            pass
    done = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not done.is_set():
            now = time.time()
            rows = [
                tuple(
                    {
                        "time": now,
                        "caller": f"caller{i % 20}",
                        "route": "/v1/chat",
                        "model": "m",
                        "provider": "p",
                        "status": 200,
                        "input_tokens": 10,
                        "output_tokens": 5,
                        "cost_usd": 0.001,
                        "request_id": f"{n}-{i}",
                    }.get(c)
                    for c in COLUMNS
                )  # fmt: skip
                for i in range(200)
            ]
            began = clock()
            await backend.write(rows)
            found.total.append(clock() - began)
            start = began_at[-1]
            found.behind.append(
                sum(max(0.0, min(end, start) - max(first, began)) for first, end in deleting[-8:])
            )
            n += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(writer())
    began = time.monotonic()
    if prune:
        upkeep = Maintenance(backend, 1)
        async with backend.maintenance() as turn:
            await upkeep.prune(turn, time.time())
    else:
        await asyncio.sleep(seconds)
    found.seconds = time.monotonic() - began
    done.set()
    await task
    await backend.aclose()
    found.deletes = [end - first for first, end in deleting]
    return found


def waits_lines(template: Path, expected: int) -> list[str]:
    """Batch writes while pruning `expected` rows, and as long without pruning."""
    busy = asyncio.run(write_waits(_copy(template, "busy"), True))
    quiet = asyncio.run(write_waits(_copy(template, "quiet"), False, min(busy.seconds, 60.0)))
    behind = sorted(busy.behind)
    return [
        busy.line(f"- batch writes (200 rows, every 20 ms) while pruning {expected:,} rows"),
        f"  waiting behind a prune transaction: worst {behind[-1] * 1000:.1f} ms, p99 "
        f"{pct(behind, 0.99) * 1000:.1f} ms; {sum(1 for b in behind if b > 0.05)} batches "
        f"over 50 ms (goal: none)",
        f"  prune transactions: {len(busy.deletes):,}, {min(busy.rows)}-{max(busy.rows)} rows "
        f"each; each took median {statistics.median(busy.deletes) * 1000:.1f} ms, p99 "
        f"{pct(busy.deletes, 0.99) * 1000:.1f} ms, worst {max(busy.deletes) * 1000:.1f} ms",
        quiet.line("  the same writes with no pruning"),
    ]


def one_size(rows: int, days: int, starts: int, port: int) -> list[str]:
    now = time.time()
    template = OUT / f"legacy-{rows}.sqlite3"
    began = time.monotonic()
    build(template, rows, days, now)
    built = time.monotonic() - began
    size = template.stat().st_size
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    say(f"## {rows:,} rows over {days} days")
    say(f"- built in {built:.1f} s: {size / 1e6:.0f} MB, {size / rows:.0f} bytes a row")
    whole = floor_day(now) - 100 * DAY, floor_day(now)
    raw = raw_sums(template, *whole)

    say(
        "- /ready after the upgrade start (spend read from the rows): "
        + ready_times(None, template, starts, port)
    )
    say(f"  the ledger's share in process (open, upgrade, spend): {ledger_start(None, template)}")

    path = OUT / f"live-{rows}.sqlite3"
    for stale in OUT.glob(f"live-{rows}.sqlite3*"):
        stale.unlink()
    shutil.copy(template, path)
    gw = Chatd(path, port)
    backfill = wait(lambda: meta(path, "backfill_to") is None) + gw.ready
    cutoff = floor_day(now - DAY)
    db = sqlite3.connect(template)
    expected = db.execute(
        "SELECT COUNT(*) FROM chatd_usage WHERE time < ?", (iso(cutoff),)
    ).fetchone()[0]
    db.close()
    pruning = wait(lambda: gw.metric("chatd_usage_rows_pruned_total") >= expected)
    say(f"- backfill: done {backfill:.2f} s after spawn (/ready at {gw.ready:.2f} s)")
    say(f"- pruning: {expected:,} rows in a further {pruning:.1f} s")
    since = iso(floor_day(now) - 90 * DAY)
    path_90 = f"/v1/usage?since={since}&group_by=caller,day"
    timings = sorted(gw.get(path_90)[0] for _ in range(10))
    say(
        f"- 90-day caller × day report over HTTP: median "
        f"{statistics.median(timings) * 1000:.1f} ms, worst {timings[-1] * 1000:.1f} ms"
    )
    _, answer = gw.get(f"/v1/usage?since={iso(whole[0])}&until={iso(whole[1])}&group_by=caller,day")
    say(f"- 100 whole days equal the raw rows' sums: {compare(answer['rows'], raw)}")
    gw.stop()
    say(f"- after: {path.stat().st_size / 1e6:.0f} MB on disk (free pages reused)")
    say("- /ready after a start once backfilled: " + ready_times(path, None, starts, port))
    say(f"  the ledger's share in process (open, spend): {ledger_start(path, None)}")

    for line in waits_lines(template, expected):
        say(line)
    return lines


def writes_only(rows: int, days: int) -> None:
    now = time.time()
    template = OUT / f"legacy-{rows}.sqlite3"
    build(template, rows, days, now)
    db = sqlite3.connect(template)
    (expected,) = db.execute(
        "SELECT COUNT(*) FROM chatd_usage WHERE time < ?", (iso(floor_day(now - DAY)),)
    ).fetchone()
    db.close()
    print(f"## {rows:,} rows over {days} days: batch writes while pruning", flush=True)
    for line in waits_lines(template, expected):
        print(line, flush=True)


def _copy(template: Path, name: str) -> Path:
    for stale in OUT.glob(f"{name}.sqlite3*"):
        stale.unlink()
    return Path(shutil.copy(template, OUT / f"{name}.sqlite3"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--starts", type=int, default=3, help="starts per /ready median")
    parser.add_argument("--port", type=int, default=18_428)
    parser.add_argument(
        "--writes-only", action="store_true", help="only the batch writes while pruning"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for rows in args.rows:
        if args.writes_only:
            writes_only(rows, args.days)
        else:
            one_size(rows, args.days, args.starts, args.port)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
