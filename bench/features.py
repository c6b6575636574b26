"""What part two's features cost on the hot path, measured in one run (its own command:
`.venv/bin/python bench/features.py [--secs 6] [--rounds 3]`; needs nginx, wrk and, for
the redis row, redis-server — `bash bench/run.sh` installs them).

Every variant is a chatd process serving `/v1/chat` (ollama kind) from the same static
nginx upstream as bench/run.py; wrk at c=32 visits them in turn, round after round, so
a neighbour's noise lands on all of them alike. Printed: median req/s and its ratio to
`bare` (the part-one configuration: no ledger, no dashboard), and writes
bench/FEATURES.md. With `--fresh`, every process is started anew each round: two
processes of one configuration differ by up to 20% here for their whole life, so a
variant measured in one process carries that luck into every round.

bench/instructions.py counts the same variants' work in instructions, which this
machine's noise does not reach.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from load import VARY, Request, cache_hits, run_wrk, write_lua
from otlp_sink import start_sink
from run import (
    BENCH,
    CHATD,
    CHATD_TOKEN,
    MSGS,
    OUT,
    Gateway,
    chatd_toml,
    cleanup,
    free_port,
    nginx_config,
    spawn,
    start_gateway,
    wait_first_served,
)

# Started anew just before its turn each round, on a copy of a ledger of 1M rows past
# the retention (bench/ledger_scale.py's rows, backfilled), so its pruning runs while
# wrk measures it.
PRUNING = "pruning in progress (1M rows past retention)"
PRUNING_ROWS = 1_000_000
MOCK = '[chatd.providers.mock]\nkind = "mock"\n\n'
CACHE_ON = "[chatd.cache]\nenabled = true\n\n"
# Every limit, the ledger, Redis and the cache, each request a new question (a miss).
FULL = "full gateway (callers + limits + ledger + Redis + cache on, all misses)"
OFF = 'ui = false\nusage_db = ""\n'
# A config caller with a token and nothing else (no rpm, tpm, budget or prices), to part
# the callers' own cost from their limits'; and the same config with LIVE_CALLERS live
# callers in its database, each request bearing one live caller's token.
CALLER_ONLY = "callers, no limits or prices (+ ledger + dashboard)"
LIVE = "live callers on (10,000 in the store, a live caller's token, no limits)"
LIVE_CALLERS = 10_000


def variants(
    up: int, redis_port: int | None, otlp: str | None = None
) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (lakehouse.toml, request headers). With BENCH_BASELINE_SRC=<a checkout's
    src/> a row "baseline" runs that build (e.g. part one's last commit) as `bare`."""
    auth = {"Authorization": f"Bearer {CHATD_TOKEN}"}

    def ledger(name: str) -> str:  # each its own SQLite file, in bench/out
        return f'usage_db = "sqlite:///features-{name}.sqlite3"\n'

    found = {
        "bare": (chatd_toml(up, chatd_extra=OFF), {}),
        "dashboard on": (chatd_toml(up, chatd_extra='usage_db = ""\n'), {}),
        "ledger on": (chatd_toml(up, chatd_extra="ui = false\n" + ledger("a")), {}),
        "as shipped (ledger + dashboard)": (chatd_toml(up, chatd_extra=ledger("b")), {}),
        "callers + limits + prices": (chatd_toml(up, callers=True, chatd_extra=ledger("c")), auth),
        "cache on, a miss each time (temperature 0.5)": (
            chatd_toml(up, chatd_extra=OFF, tables=CACHE_ON + MOCK),
            {},
        ),
    }
    callers = chatd_toml(up, callers=True, chatd_extra=ledger("c"))
    found[CALLER_ONLY] = (caller_only(callers), auth)
    live = caller_only(chatd_toml(up, callers=True, chatd_extra=ledger("l")))
    found[LIVE] = (live, {"Authorization": f"Bearer {live_callers_db()[1]}"})
    found[PRUNING] = (
        chatd_toml(up, chatd_extra="ui = false\n" + ledger("p") + "usage_retention_days = 1\n"),
        {},
    )
    if redis_port is not None:
        url = f'redis_url = "redis://127.0.0.1:{redis_port}/0"\n'
        found["redis_url set (no cache, no callers)"] = (chatd_toml(up, chatd_extra=OFF + url), {})
        found["callers + limits + Redis"] = (
            chatd_toml(up, callers=True, chatd_extra=ledger("d") + url),
            auth,
        )
        found[FULL] = (
            chatd_toml(up, callers=True, chatd_extra=ledger("e") + url, tables=CACHE_ON),
            auth,
        )
    if otlp is not None:  # bench/otlp_sink.py: a collector that keeps nothing
        for ratio in ("1.0", "0.01"):
            tracing = f'[chatd.tracing]\notlp_endpoint = "{otlp}"\nsample_ratio = {ratio}\n\n'
            found[f"tracing on, sample_ratio {ratio}"] = (
                chatd_toml(up, chatd_extra=OFF, tables=tracing),
                {},
            )
        down = f'[chatd.tracing]\notlp_endpoint = "http://127.0.0.1:{free_port()}"\n\n'
        found["tracing on, collector down"] = (chatd_toml(up, chatd_extra=OFF, tables=down), {})
    found["bare, again (a second process, same config: the noise floor)"] = found["bare"]
    return found


def caller_only(toml: str) -> str:
    """The callers config with the caller's limits and the prices taken out."""
    kept = []
    for line in toml.splitlines():
        if line.startswith(("rpm =", "tpm =", "budget_usd =", "[chatd.prices]", '"*" =')):
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


def live_callers_db() -> tuple[Path, str]:
    """A database (made once, kept in bench/out) holding LIVE_CALLERS live callers, made
    through chatd's own store; returns it and the token of one of them (the middle one)."""
    import asyncio

    from chatd.state.callers_store import open_store

    path = OUT / f"live-callers-{LIVE_CALLERS}.sqlite3"
    saved = path.with_suffix(".token")
    if path.exists() and saved.exists():
        return path, saved.read_text().strip()

    async def make() -> str:
        for stale in OUT.glob(path.name + "*"):
            stale.unlink()
        store = open_store(f"sqlite:///{path}")
        await store.open()
        kept = ""
        for i in range(LIVE_CALLERS):
            _, token = await store.create(f"live-{i:05d}", {}, "bench")
            kept = token if i == LIVE_CALLERS // 2 else kept
        await store.aclose()
        return kept

    print(f"making {LIVE_CALLERS:,} live callers in {path} (once) ...", flush=True)
    OUT.mkdir(exist_ok=True)
    token = asyncio.run(make())
    saved.write_text(token + "\n")
    return path, token


def prepared(name: str) -> Path | None:
    """The database a variant starts from (a copy of it), when not an empty one."""
    if name == PRUNING:
        return pruning_ledger()
    if name == LIVE:
        return live_callers_db()[0]
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2]).split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paired(values: list[float], base: list[float]) -> str:
    """Median and quartiles of round-by-round ratios `values[i] / base[i]`."""
    ratios = sorted(v / b for v, b in zip(values, base, strict=True) if b)
    if not ratios:
        return "n/a"
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    return f"{statistics.median(ratios):.3f} [{q1:.3f}, {q3:.3f}]"


def chat_request(name: str, port: int, headers: dict[str, str]) -> Request:
    """The `/v1/chat` request a variant serves: temperature 0.5 for "cache on" (not
    cacheable), a new question each time for the full gateway (a miss), else the same."""
    temperature = 0.5 if name.startswith("cache on") else 0
    messages = MSGS
    if name == FULL:
        messages = [{"role": "user", "content": f"hi {VARY}"}]
    body = {"model": "qwen3.5:latest", "messages": messages, "temperature": temperature}
    return Request(port, "/v1/chat", body, headers, vary=name == FULL)


def start_redis() -> int | None:
    """A throwaway redis-server on a free port (None when not installed)."""
    if not shutil.which("redis-server"):
        return None
    port = free_port()
    spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(OUT)])  # fmt: skip
    time.sleep(0.5)
    return port


def start_upstream() -> int:
    """The static nginx upstream of bench/run.py, on a free port; returns the port."""
    up = free_port()
    conf = OUT / "nginx.conf"
    conf.write_text(nginx_config(OUT, up))
    nginx = spawn("nginx", ["nginx", "-p", str(OUT), "-e", str(OUT / "nginx-error.log"),
                            "-c", str(conf)])  # fmt: skip
    wait_first_served(nginx, time.monotonic(), Request(up, "/api/chat", {}))
    return up


def select(found: dict[str, Any], only: str) -> dict[str, Any]:
    """`--only`: the variants whose name holds one of the comma-separated words, and bare."""
    words = [w.strip() for w in only.split(",") if w.strip()]
    if not words:
        return found
    return {k: v for k, v in found.items() if k == "bare" or any(w in k for w in words)}


def publish(lines: list[str], name: str, only: str) -> None:
    """Print the table; write it to bench/<name> when every variant ran."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not only:
        (BENCH / name).write_text(text)


def start_variants(
    found: dict[str, tuple[str, dict[str, str]]],
    baseline: str | None,
    ports: dict[str, int] | None = None,
) -> tuple[dict[str, Request], dict[str, subprocess.Popen]]:
    """Start one chatd per variant (each with its own config and, when on, its own empty
    ledger file), on `ports` when given (a restart: the same port, so the same wrk
    script); return the requests that reach them and their processes."""
    requests: dict[str, Request] = {}
    procs: dict[str, subprocess.Popen] = {}
    for i, (name, (toml, headers)) in enumerate(found.items()):
        ledger = re.search(r'sqlite:///([^"]+)', toml)
        if ledger:  # each start begins with an empty ledger
            for stale in OUT.glob(ledger[1] + "*"):
                stale.unlink()
            template = prepared(name)
            if template is not None:
                shutil.copy(template, OUT / ledger[1])
        gw = Gateway(f"features-{i}", port=ports[name] if ports else free_port())
        path = OUT / f"features-{i}.toml"
        path.write_text(toml)
        req = chat_request(name, gw.port, headers)
        argv = [str(CHATD), "--config", str(path), "--bind", f"127.0.0.1:{gw.port}",
                "--log-level", "warning"]  # fmt: skip
        env = {"BENCH_CALLER_TOKEN": CHATD_TOKEN}
        if name == "baseline":
            env["PYTHONPATH"] = str(baseline)
            argv = [str(CHATD.parent / "python"), "-m", "chatd", *argv[1:]]
        start_gateway(gw, argv, env, req)
        if gw.na is None and gw.proc is not None:
            requests[name] = req
            procs[name] = gw.proc
    return requests, procs


def pruning_ledger() -> Path:
    """A ledger (made once, kept in bench/out) of PRUNING_ROWS rows, all older than two
    days, already backfilled: chatd with a 1-day retention begins pruning at start."""
    import asyncio

    from ledger_scale import DAY, build, open_backend

    path = OUT / f"pruning-template-{PRUNING_ROWS}.sqlite3"
    if path.exists():
        return path

    async def backfill() -> None:
        backend = open_backend(f"sqlite:///{path}")
        await backend.open()
        async with backend.maintenance() as turn:
            while await turn.backfill_step():
                pass
        await backend.aclose()

    build(path, PRUNING_ROWS, 30, time.time() - 3 * DAY)
    asyncio.run(backfill())
    return path


def pruned_so_far(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("chatd_usage_rows_pruned_total "):
                return float(line.split()[1])
    return 0.0


def stop_all(procs: Iterable[subprocess.Popen]) -> None:
    """SIGTERM each (its ledger rows land), then wait for all of them."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def in_process_costs() -> list[str]:
    """Microseconds of CPU that callers and the ledger add to one request, measured in
    this process (bench/costs.py): free of the machine's noise, to read beside the table."""
    from costs import measure  # imports chatd: the checkout's .venv runs this script

    rows = measure()
    lines = [
        "## The same features' own code, timed in process (bench/costs.py)",
        "",
        "µs of CPU per request (median of 5 runs of 20,000 calls), on the same machine; "
        "compare with the CPU-µs a bare request costs here: 10⁶ ÷ bare's req per CPU-second.",
        "",
        "| code | µs per request |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {micros:.1f} |" for name, micros in rows]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: only the variants whose name holds one (and "
        "always bare); the table is printed, bench/FEATURES.md is left as it is",
    )
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="start every variant's process anew each round (and warm it for 1 s): the "
        "process-to-process spread then lands in the quartiles instead of biasing a row",
    )
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("features-*.sqlite3*"):
        stale.unlink()
    up = start_upstream()
    redis_port = start_redis()
    found = select(variants(up, redis_port, start_sink()), args.only)
    baseline = os.environ.get("BENCH_BASELINE_SRC")
    if baseline:
        found = {"baseline": (chatd_toml(up), {}), **found}  # it knows no part-two keys
    requests, procs = start_variants(found, baseline)
    scripts = {name: write_lua(req, OUT / f"features-{i}.lua")
               for i, (name, req) in enumerate(requests.items())}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in requests}
    per_cpu: dict[str, list[float]] = {name: [] for name in requests}
    shuffle = random.Random(20261126)  # a fixed seed: the same visiting orders every run
    for n in range(args.rounds):
        if args.fresh and n:
            # New processes each round: a process's own luck (where its memory and its
            # thread land) lasts its lifetime, so only new draws average it out.
            stop_all(procs.values())
            ports = {name: req.port for name, req in requests.items()}
            procs = start_variants({k: found[k] for k in requests}, baseline, ports)[1]
        if args.fresh:
            for name in requests:  # warm every new process alike before measuring
                run_wrk(requests[name], scripts[name], 32, 1)
        # A new order each round: no variant always runs first, or right after another.
        for name in shuffle.sample(list(requests), len(requests)):
            if name == PRUNING:
                # Its pruning must be under way while wrk measures: a new process on a
                # new copy of the ledger now, warmed for 1 s.
                stop_all([procs[name]])
                started = start_variants({name: found[name]}, baseline, {name: requests[name].port})
                procs[name] = started[1][name]
                run_wrk(requests[name], scripts[name], 32, 1)
            pid = procs[name].pid
            hits = cache_hits(requests[name].port) if name == FULL else 0.0
            before = cpu_seconds(pid)
            result = run_wrk(requests[name], scripts[name], 32, args.secs)
            used = cpu_seconds(pid) - before
            if name == PRUNING:
                pruned = pruned_so_far(requests[name].port)
                print(f"  ({pruned:,.0f} of {PRUNING_ROWS:,} rows pruned by the end)", flush=True)
            if name == FULL and cache_hits(requests[name].port) > hits:
                raise RuntimeError(f"{FULL}: cache hits under wrk; the row measures misses")
            rates[name].append(result.rps)
            per_cpu[name].append(result.rps * args.secs / used if used else 0.0)
            print(
                f"  round {n + 1}: {name}: {result.rps:,.0f} req/s, "
                f"{per_cpu[name][-1]:,.0f} req per CPU-second",
                flush=True,
            )
    lines = [
        "# What part two's features cost on the hot path (bench/features.py)",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, wrk c=32, {args.rounds} rounds of "
        f"{args.secs} s, every variant once a round in a shuffled order"
        + (", every process started anew each round (--fresh)" if args.fresh else "")
        + ", `/v1/chat` "
        "(ollama kind) from a static nginx upstream",
        "- ÷ bare: each round's figure over bare's in the same round, then the median of "
        "those ratios over the rounds, [first quartile, third quartile]. Pairing within a "
        "round cancels the machine's drift between rounds; the quartiles show what is left. "
        "The last row, a second process with bare's configuration, is the noise floor: a "
        "difference inside its spread is no difference",
        "- req per CPU-second: requests answered ÷ the CPU time chatd's process used "
        "(all its threads) during the run: the hot path's cost, less exposed than req/s "
        "to the scheduler on a shared 2-core machine",
        "",
        "| chatd | req/s (median) | ÷ bare [q1, q3] | req per CPU-second (median) "
        "| ÷ bare [q1, q3] |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in requests:
        lines.append(
            f"| {name} | {statistics.median(rates[name]):,.0f} | "
            f"{paired(rates[name], rates['bare'])} | "
            f"{statistics.median(per_cpu[name]):,.0f} | {paired(per_cpu[name], per_cpu['bare'])} |"
        )
    lines += ["", *in_process_costs()]
    publish(lines, "FEATURES.md", args.only)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
