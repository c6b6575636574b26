"""What part two's features cost one request, counted in instructions: the deterministic
twin of bench/features.py (`.venv/bin/python bench/instructions.py [--requests 600]`;
needs nginx, which `bash bench/run.sh` installs, and valgrind: `apt-get install -y valgrind`).

Throughput on this shared 2-core VM moves ±10–20% between two processes of one
configuration, so req/s cannot settle a 10% or 15% claim. Instructions can: each variant
of features.py runs as a chatd under valgrind's callgrind, serves the same warm-up, and
then the same N `/v1/chat` requests (8 connections, keep-alive) from the same static nginx
upstream while callgrind counts every instruction chatd executes in user space, in all
its threads (the ledger writer's too). Printed, and written to bench/INSTRUCTIONS.md:
instructions per request and their ratio to `bare`. Requests per second at saturation go
as the inverse of the work per request, so 1 ÷ that ratio is the throughput the feature
leaves, less only the kernel's share, which is the same socket work in every variant.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from features import (
    LIVE,
    PRUNING,
    PRUNING_ROWS,
    chat_request,
    live_callers_db,
    pruned_so_far,
    pruning_ledger,
    publish,
    select,
    start_redis,
    start_upstream,
    variants,
)
from load import Request
from otlp_sink import start_sink
from run import (
    CHATD,
    CHATD_TOKEN,
    OAI_KEY,
    OUT,
    cleanup,
    free_port,
    spawn,
    wait_first_served,
)

CONNECTIONS = 8
WARMUP = 200
IDLE_SECS = 5.0
START_TIMEOUT_S = 180.0  # chatd's imports run under valgrind's translator


def drive(req: Request, total: int, connections: int = CONNECTIONS) -> int:
    """`total` requests over `connections` keep-alive connections; returns the 2xx count."""
    headers = {"Content-Type": "application/json", **req.headers}
    ok = [0] * connections
    run = uuid.uuid4().hex[:8]  # a varied body never repeats across runs (a shared cache)

    def worker(slot: int, count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", req.port, timeout=60)
        for i in range(count):
            conn.request("POST", req.path, req.body_for(f"{run}-{slot}-{i}"), headers)
            response = conn.getresponse()
            response.read()
            ok[slot] += 200 <= response.status < 300
        conn.close()

    share, extra = divmod(total, connections)
    threads = [
        threading.Thread(target=worker, args=(slot, share + (slot < extra)))
        for slot in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(ok)


def callgrind(pid: int, *args: str) -> str:
    return subprocess.run(
        ["callgrind_control", *args, str(pid)], capture_output=True, text=True, check=True
    ).stdout


class Count(NamedTuple):
    loop: float  # instructions per request on the event loop's thread
    others: float  # ... on every other thread (the ledger's database thread)
    rate: float  # requests a second while counted (callgrind runs ~30× slower)
    idle: float  # instructions a second with no request (timers: Redis ping, mirror, ...)

    @property
    def busy(self) -> float:
        """Per request, less the timers' share: at callgrind's few requests a second a
        once-a-second timer weighs ~80 times what it does at a real rate."""
        return self.loop + self.others - self.idle / self.rate


def count(
    name: str,
    toml: str,
    headers: dict[str, str],
    up: int,
    n: int,
    index: int,
    route: tuple[str, dict] | None = None,
    connections: int = CONNECTIONS,
) -> Count:
    """Instructions per request of one variant: warm it, zero the counters, serve `n`,
    dump."""
    path = OUT / f"instructions-{index}.toml"
    path.write_text(toml)
    ledger = re.search(r'sqlite:///([^"]+)', toml)
    if ledger:
        for stale in OUT.glob(ledger[1] + "*"):
            stale.unlink()
        if name == LIVE:  # its live callers are in its database
            shutil.copy(live_callers_db()[0], OUT / ledger[1])
        elif name == PRUNING:  # as in features.py: its pruning runs while it is counted
            shutil.copy(pruning_ledger(), OUT / ledger[1])
    port = free_port()
    dump = OUT / f"instructions-{index}.callgrind"
    argv = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", "--dump-line=no",
        "--separate-threads=yes",
        str(CHATD.parent / "python"), "-m", "chatd", "--config", str(path),
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
    ]  # fmt: skip
    env = {"BENCH_CALLER_TOKEN": CHATD_TOKEN, "BENCH_OAI_KEY": OAI_KEY, "PYTHONHASHSEED": "0"}
    proc = spawn(f"instructions-{index}", argv, env)
    req = chat_request(name, port, headers)
    if route is not None:
        req = Request(port, route[0], route[1], headers)
    # valgrind runs Python ~50x slower: importing a feature's libraries takes minutes
    deadline = time.monotonic() + 4 * START_TIMEOUT_S
    while True:  # wait_first_served's own timeout is for native speed
        try:
            wait_first_served(proc, time.monotonic(), req)
            break
        except RuntimeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
    drive(req, WARMUP, connections)
    callgrind(proc.pid, "--zero")
    began = time.monotonic()
    served = drive(req, n, connections)
    rate = n / (time.monotonic() - began)
    out = callgrind(proc.pid, "--dump")
    # Then the same process idle: what its timers cost a second with no request at all.
    callgrind(proc.pid, "--zero")
    time.sleep(IDLE_SECS)
    callgrind(proc.pid, "--dump")
    if name == PRUNING:  # still under way when counted: not all of them gone
        print(f"  ({pruned_so_far(port):,.0f} of {PRUNING_ROWS:,} rows pruned by the end)")
    proc.terminate()
    proc.wait(60)
    if served != n:
        raise RuntimeError(f"{name}: {served} of {n} requests answered 2xx ({out.strip()})")
    # The dump asked for after --zero (part 1) holds only the measured requests, a file
    # per thread: thread 1 runs the event loop, the others are the ledger's writer and
    # the like. Part 2 is the idle seconds.
    loop, others = totals(name, dump, 1)
    idle = sum(totals(name, dump, 2)) / IDLE_SECS
    return Count(loop / n, others / n, rate, idle)


def totals(name: str, dump: Path, part: int) -> tuple[float, float]:
    """Instructions of one dump: (event-loop thread, every other thread)."""
    threads = [0.0, 0.0]
    for found in OUT.glob(f"{dump.name}.{part}-*"):
        match = re.search(r"^(?:totals|summary): (\d+)", found.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{name}: no totals in {found}")
        threads[found.name != f"{dump.name}.{part}-01"] += int(match[1])
    if not threads[0]:
        raise RuntimeError(f"{name}: no dump of the event-loop thread ({dump}.{part}-01)")
    return threads[0], threads[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help="keep-alive connections driving chatd (under callgrind, more connections make "
        "longer event-loop turns, and Redis calls may pass their 200 ms timeout)",
    )
    ap.add_argument("--only", default="", help="comma-separated substrings (bare always runs)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("instructions-*"):
        stale.unlink()
    up = start_upstream()
    found = variants(up, start_redis(), start_sink())
    found.pop("bare, again (a second process, same config: the noise floor)")
    found = select(found, args.only)
    per_request: dict[str, Count] = {}
    for index, (name, (toml, headers)) in enumerate(found.items()):
        per_request[name] = count(
            name, toml, headers, up, args.requests, index, connections=args.connections
        )
        got = per_request[name]
        print(
            f"  {name}: {got.loop:,.0f} + {got.others:,.0f} instructions per request; "
            f"{got.idle:,.0f} a second idle; {got.busy:,.0f} less the timers",
            flush=True,
        )
    bare = per_request["bare"].loop + per_request["bare"].others
    bare_busy = per_request["bare"].busy
    rate = statistics.median(c.rate for c in per_request.values())
    lines = [
        "# What part two's features cost, in instructions (bench/instructions.py)",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: each variant a chatd under valgrind's "
        f"callgrind; after {WARMUP} warm-up requests, {args.requests} `/v1/chat` requests "
        f"(ollama kind, {args.connections} keep-alive connections) from a static nginx upstream",
        "- instructions: what chatd executed in user space while serving them, ÷ requests; "
        "the event loop's thread, and the others (the ledger's SQLite writer). "
        "Deterministic to about 0.2% run to run (bare: 1,667,507–1,671,494 over five "
        "runs), where req/s here moves 10–20%",
        "- the writer's figure is pessimistic: it writes a batch every 0.5 s, and under "
        f"callgrind chatd serves ~{rate:.0f} requests a second instead of ~1,000, so each "
        "batch's fixed cost (a transaction, a thread hand-off) is shared by that many fewer "
        "rows (bench/costs.py: ~15 µs a row in batches of 500)",
        "- throughput left: bare's instructions ÷ the variant's, the req/s a CPU-bound "
        "chatd keeps with the feature on (the kernel's socket work, alike in every "
        "variant, is not counted, so the true figure is nearer 1)",
        f"- less timers: the same process idle for {IDLE_SECS:g} s (no request) is counted "
        "too, and that rate ÷ the measured req/s is taken off: the Redis monitor's ping, "
        "the cooldown mirror (every 0.15 s) and the like cost the same each second "
        f"whatever the rate, so at callgrind's ~{rate:.0f} req/s they weigh ~{1000 / rate:.0f} "
        "times what they do at ~1,000 req/s. The 50 ms write-behind batch is left in: "
        "here it carries one request or two, at a real rate fifty",
        "",
        "| chatd | event loop | other threads | total per request | ÷ bare | throughput left "
        "| less timers | throughput left, less timers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, got in per_request.items():
        total = got.loop + got.others
        lines.append(
            f"| {name} | {got.loop:,.0f} | {got.others:,.0f} | {total:,.0f} | "
            f"{total / bare:.3f} | {bare / total:.3f} | {got.busy:,.0f} | "
            f"{bare_busy / got.busy:.3f} |"
        )
    publish(lines, "INSTRUCTIONS.md", args.only)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
