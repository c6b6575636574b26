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
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import NamedTuple

from features import publish, select, start_upstream, variants
from load import Request
from otlp_sink import start_sink
from run import (
    CHATD,
    CHATD_TOKEN,
    MSGS,
    OAI_KEY,
    OUT,
    cleanup,
    free_port,
    spawn,
    wait_first_served,
)

CONNECTIONS = 8
WARMUP = 200
START_TIMEOUT_S = 180.0  # chatd's imports run under valgrind's translator


def drive(req: Request, total: int) -> int:
    """`total` requests over CONNECTIONS keep-alive connections; returns the 2xx count."""
    body = json.dumps(req.body)
    headers = {"Content-Type": "application/json", **req.headers}
    ok = [0] * CONNECTIONS

    def worker(slot: int, count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", req.port, timeout=60)
        for _ in range(count):
            conn.request("POST", req.path, body, headers)
            response = conn.getresponse()
            response.read()
            ok[slot] += 200 <= response.status < 300
        conn.close()

    share, extra = divmod(total, CONNECTIONS)
    threads = [
        threading.Thread(target=worker, args=(slot, share + (slot < extra)))
        for slot in range(CONNECTIONS)
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


def count(
    name: str,
    toml: str,
    headers: dict[str, str],
    up: int,
    n: int,
    index: int,
    route: tuple[str, dict] | None = None,
) -> Count:
    """Instructions per request of one variant: warm it, zero the counters, serve `n`,
    dump."""
    path = OUT / f"instructions-{index}.toml"
    path.write_text(toml)
    ledger = re.search(r'sqlite:///([^"]+)', toml)
    if ledger:
        for stale in OUT.glob(ledger[1] + "*"):
            stale.unlink()
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
    temperature = 0.5 if name.startswith("cache on") else 0
    path, body = route or ("/v1/chat", {"model": "qwen3.5:latest", "messages": MSGS,
                                        "temperature": temperature})  # fmt: skip
    req = Request(port, path, body, headers)
    # valgrind runs Python ~50x slower: importing a feature's libraries takes minutes
    deadline = time.monotonic() + 4 * START_TIMEOUT_S
    while True:  # wait_first_served's own timeout is for native speed
        try:
            wait_first_served(proc, time.monotonic(), req)
            break
        except RuntimeError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
    drive(req, WARMUP)
    callgrind(proc.pid, "--zero")
    began = time.monotonic()
    served = drive(req, n)
    rate = n / (time.monotonic() - began)
    out = callgrind(proc.pid, "--dump")
    proc.terminate()
    proc.wait(60)
    if served != n:
        raise RuntimeError(f"{name}: {served} of {n} requests answered 2xx ({out.strip()})")
    # The dump asked for after --zero (part 1) holds only the measured requests, a file
    # per thread: thread 1 runs the event loop, the others are the ledger's writer and
    # the like.
    threads = [0.0, 0.0]
    for part in OUT.glob(f"{dump.name}.1-*"):
        match = re.search(r"^(?:totals|summary): (\d+)", part.read_text(), re.MULTILINE)
        if match is None:
            raise RuntimeError(f"{name}: no totals in {part}")
        threads[part.name != f"{dump.name}.1-01"] += int(match[1]) / n
    if not threads[0]:
        raise RuntimeError(f"{name}: no dump of the event-loop thread ({dump}.1-01)")
    return Count(threads[0], threads[1], rate)


def caller_only(toml: str) -> str:
    """features.py's callers config with the caller's limits and the prices taken out."""
    kept = []
    for line in toml.splitlines():
        if line.startswith(("rpm =", "tpm =", "budget_usd =", "[chatd.prices]", '"*" =')):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--only", default="", help="comma-separated substrings (bare always runs)")
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        print("valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("instructions-*"):
        stale.unlink()
    up = start_upstream()
    found = variants(up, None, start_sink())
    found.pop("bare, again (a second process, same config: the noise floor)")
    # One more row, to part the callers' own cost from their limits': a caller with a
    # token and nothing else (no rpm, tpm, budget or prices).
    toml, headers = found["callers + limits + prices"]
    found["callers, no limits or prices (+ ledger + dashboard)"] = (caller_only(toml), headers)
    found = select(found, args.only)
    per_request: dict[str, Count] = {}
    for index, (name, (toml, headers)) in enumerate(found.items()):
        per_request[name] = count(name, toml, headers, up, args.requests, index)
        loop, others, _ = per_request[name]
        print(f"  {name}: {loop:,.0f} + {others:,.0f} instructions per request", flush=True)
    bare = per_request["bare"].loop + per_request["bare"].others
    rate = statistics.median(c.rate for c in per_request.values())
    lines = [
        "# What part two's features cost, in instructions (bench/instructions.py)",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: each variant a chatd under valgrind's "
        f"callgrind; after {WARMUP} warm-up requests, {args.requests} `/v1/chat` requests "
        f"(ollama kind, {CONNECTIONS} keep-alive connections) from a static nginx upstream",
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
        "",
        "| chatd | event loop | other threads | total per request | ÷ bare | throughput left |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (loop, others, _) in per_request.items():
        total = loop + others
        lines.append(
            f"| {name} | {loop:,.0f} | {others:,.0f} | {total:,.0f} | {total / bare:.3f} "
            f"| {bare / total:.3f} |"
        )
    publish(lines, "INSTRUCTIONS.md", args.only)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
