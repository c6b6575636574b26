"""Balancing benchmark: chatd in front of a farm of fake Ollama hosts (docs/balancing.md).

    .venv/bin/python bench/farm.py [--secs 12] [--concurrency 24] [--hedge-ms 150]
        [--policies p2c,round_robin,hedge] [--scenarios healthy,slow,...] [--rounds 1]
        [--compare SRC]

Three hosts, each serving at most 4 requests at once (the rest queue, as Ollama does)
with ~50 ms per answer. For each balancing policy (p2c, round_robin, and p2c with
hedging) and each scenario, a fresh chatd process takes `--concurrency` closed-loop
callers for `--secs` seconds. Scenarios:

- healthy: all three hosts at 50 ms.
- slow: one host 10x slower (500 ms) for the whole run.
- removed: that slow host left out of the config: the two healthy hosts alone, the
  floor a perfect balancer reaches with a 10x slower host.
- killed: one host killed half way.
- recovers: one host 10x slower for 20 s, then healthy for 30 s; prints its share in
  each 10-s window after it recovers.

Prints requests, req/s, p50, p99, failed requests and each host's share. `--compare SRC`
runs every row a second time with chatd imported from SRC (another checkout's `src`),
alternating which goes first, for paired before/after figures; `--rounds N` repeats
each pair. Not part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.farm import Farm  # noqa: E402
from tests.support import ChatdProcess  # noqa: E402

SLOTS, LATENCY, HOSTS = 4, 0.05, 3
SLOW = 2  # the host made slower, killed or removed
RECOVER_AFTER, WINDOW, WINDOWS = 20.0, 10.0, 3
BODY = {"model": "farm:latest", "messages": [{"role": "user", "content": "hi"}]}
SCENARIOS = ["healthy", "slow", "removed", "killed", "recovers"]
TITLES = {
    "healthy": "healthy",
    "slow": "one 10x slower",
    "removed": "10x slower removed",
    "killed": "one killed half way",
    "recovers": "slow 20s, recovers",
}

Events = list[tuple[float, Callable[[], object]]]


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


async def drive(url: str, secs: float, concurrency: int, events: Events) -> dict[str, Any]:
    """Closed-loop callers for `secs`; each event's function runs at its offset."""
    latencies: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        for _ in range(concurrency):  # warm the pools
            await client.post("/v1/chat", json=BODY)
        started = time.perf_counter()
        end = started + secs

        async def caller() -> None:
            nonlocal failures
            while time.perf_counter() < end:
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

        async def timeline() -> None:
            for offset, event in events:
                await asyncio.sleep(max(0.0, started + offset - time.perf_counter()))
                await asyncio.to_thread(event)

        await asyncio.gather(timeline(), *(caller() for _ in range(concurrency)))
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


class Bench:
    """The farm process, one scenario at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pipe, theirs = multiprocessing.Pipe()
        self.farm = multiprocessing.Process(target=serve_farm, args=(theirs,), daemon=True)
        self.farm.start()
        self.urls: list[str] = self.pipe.recv()
        self.tmp = Path(tempfile.mkdtemp(prefix="chatd-farm-"))

    def tell(self, command: str, index: int = 0, value: float = 0.0) -> Any:
        self.pipe.send((command, index, value))
        return self.pipe.recv()

    def close(self) -> None:
        self.pipe.send(("stop", 0, 0.0))
        self.farm.join(5)
        if self.farm.is_alive():
            self.farm.terminate()

    def run(self, scenario: str, balance: str, hedge_ms: int, src: str | None) -> str:
        """One row: a fresh chatd (from `src` when given) through one scenario."""
        secs = RECOVER_AFTER + WINDOW * WINDOWS if scenario == "recovers" else self.args.secs
        slow = scenario in ("slow", "recovers")
        self.tell("restart", SLOW)
        self.tell("latency", SLOW, LATENCY * 10 if slow else LATENCY)
        urls = self.urls[:SLOW] if scenario == "removed" else self.urls
        windows: list[list[int]] = []
        events = self.events(scenario, secs, windows)
        env = {"PYTHONPATH": src} if src else None
        chatd = ChatdProcess(config(urls, balance, hedge_ms), self.tmp, env=env)
        chatd.start(timeout=60)  # a busy machine starts a process slowly
        try:
            self.tell("counts")  # zero the hosts' counts
            result = asyncio.run(drive(chatd.url, secs, self.args.concurrency, events))
        finally:
            chatd.stop()
        windows.append(self.tell("counts"))
        served = [sum(column) for column in zip(*windows, strict=True)]
        row = (
            f"{result['requests']:>8} {result['rps']:>7.0f} {result['p50']:>7.1f} "
            f"{result['p99']:>7.1f} {result['failures']:>6}  {percent(served)}"
        )
        if scenario == "recovers":
            after = [percent(w, only=SLOW) for w in windows[1:WINDOWS + 1]]  # fmt: skip
            row += "  h3 after: " + " ".join(after)
        return row

    def events(self, scenario: str, secs: float, windows: list[list[int]]) -> Events:
        """What happens during the run; `windows` gathers the hosts' counts by window."""
        if scenario == "killed":
            return [(secs / 2, lambda: self.tell("kill", SLOW))]
        if scenario != "recovers":
            return []

        def recover() -> None:
            windows.append(self.tell("counts"))
            self.tell("latency", SLOW, LATENCY)

        timed: Events = [(RECOVER_AFTER, recover)]
        for n in range(1, WINDOWS):
            timed.append((RECOVER_AFTER + n * WINDOW, lambda: windows.append(self.tell("counts"))))
        return timed


def percent(served: list[int], only: int | None = None) -> str:
    total = sum(served) or 1
    if only is not None:
        return f"{100 * served[only] / total:.0f}%"
    return "/".join(f"{100 * n / total:.1f}" for n in served) + "%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--secs", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--hedge-ms", type=int, default=150)
    parser.add_argument("--policies", default="p2c,round_robin,hedge")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--compare", metavar="SRC", help="also run chatd from this src dir")
    args = parser.parse_args()

    known = {
        "p2c": ("p2c", "p2c", 0),
        "round_robin": ("round_robin", "round_robin", 0),
        "hedge": (f"p2c+hedge{args.hedge_ms}", "p2c", args.hedge_ms),
    }
    policies = [known[name] for name in args.policies.split(",")]
    scenarios = args.scenarios.split(",")
    builds: list[tuple[str, str | None]] = [("this", None)]
    if args.compare:
        builds.append(("compare", args.compare))
    print(
        f"{HOSTS} hosts x {SLOTS} slots, {LATENCY * 1000:.0f} ms per answer, "
        f"concurrency {args.concurrency}, {args.secs:g} s per run"
    )
    print(f"{'build':<8} {'policy':<14} {'scenario':<20} {'requests':>8} {'req/s':>7} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'failed':>6}  share h1/h2/h3")  # fmt: skip
    bench = Bench(args)
    try:
        for label, balance, hedge_ms in policies:
            for scenario in scenarios:
                for round_ in range(args.rounds):
                    order = builds if round_ % 2 == 0 else builds[::-1]
                    for build, src in order:
                        row = bench.run(scenario, balance, hedge_ms, src)
                        print(f"{build:<8} {label:<14} {TITLES[scenario]:<20} {row}", flush=True)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
