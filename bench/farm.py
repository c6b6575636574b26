"""Balancing benchmark (docs/routing.md): chatd in front of a farm of fake Ollama hosts.

    .venv/bin/python bench/farm.py [--secs 12] [--concurrency 24] [--hedge-ms 150]

Three hosts, each serving at most 4 requests at once (the rest queue, as Ollama does)
with ~50 ms per answer. For each balancing policy (p2c, round_robin, and p2c with
hedging) and each scenario — all hosts healthy; one host 10× slower; one host killed
half way — a fresh chatd process takes `--concurrency` closed-loop callers for `--secs`
seconds. Prints requests, req/s, p50, p99 and failed requests. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.farm import Farm  # noqa: E402
from tests.support import ChatdProcess  # noqa: E402

SLOTS, LATENCY, HOSTS = 4, 0.05, 3
BODY = {"model": "farm:latest", "messages": [{"role": "user", "content": "hi"}]}


def serve_farm(control: Connection) -> None:
    """The farm in its own process (its own GIL), driven over a pipe."""
    with Farm() as farm:
        hosts = [farm.add(f"h{i + 1}", slots=SLOTS, latency=LATENCY) for i in range(HOSTS)]
        control.send([h.url for h in hosts])
        while True:
            command, index, value = control.recv()
            if command == "stop":
                break
            if command == "counts":
                control.send([h.served for h in hosts])
                farm.reset()
                continue
            host = hosts[index]
            if command == "latency":
                host.latency = value
            elif command == "kill":
                host.kill()
            elif command == "restart" and host._server is None:
                host.restart()
            control.send("ok")


def config(urls: list[str], balance: str, hedge_ms: int) -> str:
    endpoints = ", ".join(f'{{ base_url = "{u}" }}' for u in urls)
    return f"""
[chatd]
default_provider = "farm"
timeout_secs = 30

[chatd.providers.farm]
kind = "ollama"
balance = "{balance}"
hedge_after_ms = {hedge_ms}
endpoints = [{endpoints}]
"""


async def drive(url: str, secs: float, concurrency: int, halfway: object = None) -> dict:
    """Closed-loop callers for `secs`; `halfway()` runs once at the half."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for _ in range(concurrency):  # warm the pools
            await client.post("/v1/chat", json=BODY)
        started = time.perf_counter()
        end = started + secs
        fired = False

        async def caller() -> None:
            nonlocal failures, fired
            while (now := time.perf_counter()) < end:
                if halfway is not None and not fired and now >= started + secs / 2:
                    fired = True
                    await asyncio.to_thread(halfway)  # type: ignore[arg-type]
                t0 = time.perf_counter()
                try:
                    response = await client.post("/v1/chat", json=BODY)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures += 1

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies) + failures,
        "rps": (len(latencies) + failures) / elapsed,
        "p50": quantiles[49] * 1000,
        "p99": quantiles[98] * 1000,
        "failures": failures,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secs", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--hedge-ms", type=int, default=150)
    args = parser.parse_args()

    ours, theirs = multiprocessing.Pipe()
    farm = multiprocessing.Process(target=serve_farm, args=(theirs,), daemon=True)
    farm.start()
    urls = ours.recv()

    def tell(command: str, index: int = 0, value: float = 0.0) -> object:
        ours.send((command, index, value))
        return ours.recv()

    policies = [("p2c", "p2c", 0), ("round_robin", "round_robin", 0)]
    if args.hedge_ms:
        policies.append((f"p2c+hedge{args.hedge_ms}", "p2c", args.hedge_ms))
    scenarios = ["healthy", "one 10x slower", "one killed half way"]
    print(
        f"{HOSTS} hosts x {SLOTS} slots, {LATENCY * 1000:.0f} ms per answer, "
        f"concurrency {args.concurrency}, {args.secs:g} s per run"
    )
    print(f"{'policy':<16} {'scenario':<20} {'requests':>8} {'req/s':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'failed':>6}  share h1/h2/h3")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="chatd-farm-"))
    try:
        for label, balance, hedge_ms in policies:
            for scenario in scenarios:
                tell("restart", 2)
                tell("latency", 2, LATENCY * 10 if scenario.startswith("one 10x") else LATENCY)
                halfway = (lambda: tell("kill", 2)) if "killed" in scenario else None
                with ChatdProcess(config(urls, balance, hedge_ms), tmp) as chatd:
                    tell("counts")  # zero the hosts' counts
                    result = asyncio.run(drive(chatd.url, args.secs, args.concurrency, halfway))
                served = tell("counts")
                total = sum(served) or 1  # type: ignore[arg-type]
                share = "/".join(f"{100 * n / total:.0f}" for n in served)  # type: ignore[union-attr]
                print(
                    f"{label:<16} {scenario:<20} {result['requests']:>8} {result['rps']:>7.0f} "
                    f"{result['p50']:>7.1f} {result['p99']:>7.1f} {result['failures']:>6}  "
                    f"{share}%",
                    flush=True,
                )
    finally:
        ours.send(("stop", 0, 0.0))
        farm.join(5)
        if farm.is_alive():
            farm.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
