"""What part two's features cost on the hot path, measured in one run (its own command:
`.venv/bin/python bench/features.py [--secs 6] [--rounds 3]`; needs nginx, wrk and, for
the redis row, redis-server — `bash bench/run.sh` installs them).

Every variant is a chatd process serving `/v1/chat` (ollama kind) from the same static
nginx upstream as bench/run.py; wrk at c=32 visits them in turn, round after round, so
a neighbour's noise lands on all of them alike. Printed: median req/s and its ratio to
`bare` (the part-one configuration: no ledger, no dashboard), and writes
bench/FEATURES.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from load import Request, run_wrk, write_lua
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

MOCK = '[chatd.providers.mock]\nkind = "mock"\n\n'
OFF = 'ui = false\nusage_db = ""\n'


def variants(up: int, redis_port: int | None) -> dict[str, tuple[str, dict[str, str]]]:
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
            chatd_toml(up, chatd_extra=OFF, tables="[chatd.cache]\nenabled = true\n\n" + MOCK),
            {},
        ),
    }
    if redis_port is not None:
        url = f'redis_url = "redis://127.0.0.1:{redis_port}/0"\n'
        found["redis_url set (no cache, no callers)"] = (chatd_toml(up, chatd_extra=OFF + url), {})
    found["bare, again (the noise: same config, last in each round)"] = found["bare"]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2]).split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secs", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("features-*.sqlite3*"):
        stale.unlink()
    up = free_port()
    conf = OUT / "nginx.conf"
    conf.write_text(nginx_config(OUT, up))
    nginx = spawn("nginx", ["nginx", "-p", str(OUT), "-e", str(OUT / "nginx-error.log"),
                            "-c", str(conf)])  # fmt: skip
    wait_first_served(nginx, time.monotonic(), Request(up, "/api/chat", {}))
    redis_port = None
    if shutil.which("redis-server"):
        redis_port = free_port()
        spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                        "--save", "", "--appendonly", "no", "--dir", str(OUT)])  # fmt: skip
        time.sleep(0.5)
    requests: dict[str, Request] = {}
    pids: dict[str, int] = {}
    found = variants(up, redis_port)
    baseline = os.environ.get("BENCH_BASELINE_SRC")
    if baseline:
        found = {"baseline": (chatd_toml(up), {}), **found}  # it knows no part-two keys
    for i, (name, (toml, headers)) in enumerate(found.items()):
        gw = Gateway(f"features-{i}", port=free_port())
        path = OUT / f"features-{i}.toml"
        path.write_text(toml)
        temperature = 0.5 if name.startswith("cache on") else 0
        body = {"model": "qwen3.5:latest", "messages": MSGS, "temperature": temperature}
        req = Request(gw.port, "/v1/chat", body, headers)
        argv = [str(CHATD), "--config", str(path), "--bind", f"127.0.0.1:{gw.port}",
                "--log-level", "warning"]  # fmt: skip
        env = {"BENCH_CALLER_TOKEN": CHATD_TOKEN}
        if name == "baseline":
            env["PYTHONPATH"] = str(baseline)
            argv = [str(CHATD.parent / "python"), "-m", "chatd", *argv[1:]]
        start_gateway(gw, argv, env, req)
        if gw.na is None and gw.proc is not None:
            requests[name] = req
            pids[name] = gw.proc.pid
    scripts = {name: write_lua(req, OUT / f"features-{i}.lua")
               for i, (name, req) in enumerate(requests.items())}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in requests}
    per_cpu: dict[str, list[float]] = {name: [] for name in requests}
    for n in range(args.rounds):
        for name, req in requests.items():
            before = cpu_seconds(pids[name])
            result = run_wrk(req, scripts[name], 32, args.secs)
            used = cpu_seconds(pids[name]) - before
            rates[name].append(result.rps)
            per_cpu[name].append(result.rps * args.secs / used if used else 0.0)
            print(
                f"  round {n + 1}: {name}: {result.rps:,.0f} req/s, "
                f"{per_cpu[name][-1]:,.0f} req per CPU-second",
                flush=True,
            )
    base = statistics.median(rates["bare"])
    base_cpu = statistics.median(per_cpu["bare"])
    lines = [
        "# What part two's features cost on the hot path (bench/features.py)",
        "",
        f"- {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, wrk c=32, {args.rounds} interleaved "
        f"rounds of {args.secs} s, `/v1/chat` (ollama kind) from a static nginx upstream",
        "- req per CPU-second: requests answered ÷ the CPU time chatd's process used "
        "(all its threads) during the run: the hot path's cost, less exposed to the "
        "scheduler's noise on a shared 2-core machine than req/s",
        "",
        "| chatd | req/s (median) | ÷ bare | req per CPU-second (median) | ÷ bare |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, values in rates.items():
        rps, cpu = statistics.median(values), statistics.median(per_cpu[name])
        lines.append(
            f"| {name} | {rps:,.0f} | {rps / base:.3f} | {cpu:,.0f} | {cpu / base_cpu:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (BENCH / "FEATURES.md").write_text(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        cleanup()
