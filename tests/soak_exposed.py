"""The exposed soak (docs/exposing.md): one chatd worker, thousands of connections that
send their request headers a line at a time, and ordinary callers beside them.

    scripts/soak.sh exposed [--slow 2000] [--secs 60] [--callers 20] [--quiet-secs 20]

First the ordinary callers alone (`--quiet-secs`), then the same callers for `--secs`
while another process keeps `--slow` trickling connections open (each closed by chatd
at header_timeout_secs and opened again). Prints both runs' latency percentiles, failures,
the trickling connections chatd closed and chatd's RSS; exits non-zero when an ordinary
request failed or the loaded p99 is over twice the quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop

from tests.support import ChatdProcess, provider_toml

BODY = {"model": "mock/echo", "messages": [{"role": "user", "content": "hi"}]}


def config(latency_ms: int) -> str:
    return '[chatd]\ndefault_provider = "mock"\nusage_db = ""\n' + provider_toml(
        "mock", "mock", latency_ms=latency_ms
    )


def cpu_secs(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- the slow side (its own process, so its work does not slow the callers' loop) ---------


async def trickler(port: int, until: float, live: set[Any], tally: dict[str, Any]) -> None:
    """One slow connection after another: each sends a request line and then, when the
    ticker says, one more header line; chatd closes it, and it opens again."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally["connect_errors"] += 1
            await asyncio.sleep(0.5)
            continue
        opened = time.monotonic()
        tally["opened"] += 1
        writer.write(b"GET /health HTTP/1.1\r\nHost: chatd\r\n")
        live.add(writer)
        try:
            while await reader.read(4096):
                pass  # its 408; the close follows
        except OSError:
            pass
        live.discard(writer)
        if time.monotonic() < until:
            tally["closed_by_chatd"] += 1
            tally["longest_secs"] = max(tally["longest_secs"], time.monotonic() - opened)
        writer.close()


def slow_side(port: int, count: int, secs: float, interval: float, out: Any) -> None:
    # Load generation, not the system under test: on a shared 2-core machine it must not
    # take the CPU chatd and the ordinary callers need (a real slow client is elsewhere).
    os.nice(10)

    async def main() -> dict[str, Any]:
        tally = {"opened": 0, "closed_by_chatd": 0, "connect_errors": 0, "longest_secs": 0.0}
        until = time.monotonic() + secs
        live: set[Any] = set()
        tasks = []
        for _ in range(count):  # ramped over about two seconds
            tasks.append(asyncio.ensure_future(trickler(port, until, live, tally)))
            await asyncio.sleep(2 / count)
        n = 0
        while time.monotonic() < until:
            await asyncio.sleep(interval)
            n += 1
            for writer in list(live):
                writer.write(b"X-Slow-%d: still coming\r\n" % n)
        for writer in list(live):
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        return tally

    out.put(uvloop.run(main()))


# -- the ordinary callers ---------------------------------------------------------------


async def callers(url: str, count: int, secs: float) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = 0
    until = time.monotonic() + secs
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one() -> None:
            nonlocal failures
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    ok = (await client.post("/v1/chat", json=BODY)).status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failures += not ok

        await asyncio.gather(*(one() for _ in range(count)))
    return latencies, failures


def percentiles(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return {"p50_ms": cuts[49] * 1000, "p99_ms": cuts[98] * 1000, "n": len(latencies)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", type=int, default=2000)
    parser.add_argument("--secs", type=float, default=60)
    parser.add_argument("--callers", type=int, default=20)
    parser.add_argument("--quiet-secs", type=float, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="between header lines")
    parser.add_argument("--latency-ms", type=int, default=50, help="the mock upstream's")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        ChatdProcess(config(args.latency_ms), Path(tmp)) as chatd,
    ):
        assert chatd.proc is not None
        pid = chatd.proc.pid
        asyncio.run(callers(chatd.url, args.callers, 2))  # warm-up
        rss_start = rss_mb(pid)
        cpu = cpu_secs(pid)
        quiet, quiet_failures = uvloop.run(callers(chatd.url, args.callers, args.quiet_secs))
        quiet_cpu, cpu = cpu_secs(pid) - cpu, cpu_secs(pid)
        out: Any = multiprocessing.get_context("spawn").Queue()
        slow = multiprocessing.get_context("spawn").Process(
            target=slow_side, args=(chatd.port, args.slow, args.secs + 3, args.interval, out)
        )
        slow.start()
        time.sleep(3)  # the slow connections ramp up
        rss_samples: list[float] = []

        async def loaded_run() -> tuple[list[float], int]:
            async def sample() -> None:
                while True:
                    rss_samples.append(rss_mb(pid))
                    await asyncio.sleep(5)

            sampler = asyncio.ensure_future(sample())
            try:
                return await callers(chatd.url, args.callers, args.secs)
            finally:
                sampler.cancel()

        loaded, loaded_failures = uvloop.run(loaded_run())
        loaded_cpu = cpu_secs(pid) - cpu
        tally = out.get(timeout=60)
        slow.join(30)
        metrics = httpx.get(chatd.url + "/metrics").text
        rss_end = rss_mb(pid)
    quiet_p, loaded_p = percentiles(quiet), percentiles(loaded)
    slow_closed = [line for line in metrics.splitlines() if line.startswith("chatd_connections_")]
    print(f"quiet run  ({args.callers} callers, {args.quiet_secs:g} s): {quiet_p}, "
          f"failed {quiet_failures}")  # fmt: skip
    print(f"loaded run ({args.callers} callers + {args.slow} slow, {args.secs:g} s): "
          f"{loaded_p}, failed {loaded_failures}")  # fmt: skip
    print(f"slow side: {tally}")
    print(
        f"chatd CPU: quiet {quiet_cpu:.1f} s ({quiet_cpu / args.quiet_secs:.0%} of a core, "
        f"{quiet_cpu / len(quiet) * 1e6:.0f} µs a request); loaded {loaded_cpu:.1f} s "
        f"({loaded_cpu / args.secs:.0%}, {loaded_cpu / len(loaded) * 1e6:.0f} µs a request "
        "with the slow connections' share)"
    )
    print("chatd's counters: " + "; ".join(slow_closed))
    print(f"chatd RSS MB: start {rss_start:.1f}, during {[round(r, 1) for r in rss_samples]}, "
          f"end {rss_end:.1f}")  # fmt: skip
    ratio = loaded_p["p99_ms"] / quiet_p["p99_ms"]
    print(f"p99 loaded / quiet: {ratio:.2f} (limit 2.0)")
    return 0 if loaded_failures == 0 and quiet_failures == 0 and ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
