"""Does a collector that is down move a request's latency? (`.venv/bin/python
bench/tracing_p50.py [--rounds 10] [--requests 200]`; needs nginx, which `bash
bench/run.sh` installs.)

Five chatd processes serve `/v1/chat` (ollama kind) from the static nginx upstream of
bench/run.py: tracing off, tracing on (sample_ratio 1.0) toward a collector that takes
every export (bench/otlp_sink.py), toward a port nobody listens on (refused), toward one
that accepts the connection and never answers (each export waits out its timeout), and
tracing off again in a second process (two processes of one configuration differ by
this machine's noise).
One caller at a time (c=1, keep-alive) sends each of them one request in turn, so a busy
neighbour lands on all of them alike (the order turns each round). Printed: each one's
p50 and p90 in ms, and its p50 ÷ off's. Wall-clock on a shared machine: read the ratios,
not the milliseconds, and the second "off" for how far two alike processes differ.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import statistics
import sys
import time

import orjson
from features import OFF, start_upstream
from load import Request
from otlp_sink import start_sink
from run import CHATD, OUT, Gateway, chatd_toml, cleanup, free_port, start_gateway


def silent_collector() -> tuple[str, socket.socket]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=200, help="per variant per round")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    up = start_upstream()
    silent, held = silent_collector()
    collectors = {
        "tracing off": None,
        "tracing on, collector up": start_sink(),
        "tracing on, collector down (refused)": f"http://127.0.0.1:{free_port()}",
        "tracing on, collector silent (never answers)": silent,
        "tracing off, again (a second process: the noise floor)": None,
    }
    chat = {"model": "qwen3.5:latest", "messages": [{"role": "user", "content": "hi"}]}
    body = orjson.dumps(chat)
    conns: dict[str, http.client.HTTPConnection] = {}
    try:
        for i, (name, collector) in enumerate(collectors.items()):
            tables = ""
            if collector is not None:
                tables = f'[chatd.tracing]\notlp_endpoint = "{collector}"\nsample_ratio = 1.0\n\n'
            gw = Gateway(f"tracing-p50-{i}", port=free_port())
            path = OUT / f"tracing-p50-{i}.toml"
            path.write_text(chatd_toml(up, chatd_extra=OFF, tables=tables))
            argv = [str(CHATD), "--config", str(path), "--bind", f"127.0.0.1:{gw.port}",
                    "--log-level", "warning"]  # fmt: skip
            start_gateway(gw, argv, {}, Request(gw.port, "/v1/chat", chat))
            if gw.na is not None:
                print(f"{name}: {gw.na}", file=sys.stderr)
                return 1
            conns[name] = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        times: dict[str, list[float]] = {name: [] for name in conns}
        headers = {"content-type": "application/json"}
        order = list(conns.items())
        for round_ in range(args.rounds + 1):  # the first round warms up, and is not kept
            order = order[1:] + order[:1]  # each round a different one goes first
            for _ in range(args.requests):
                for name, conn in order:  # one request each, in turn
                    began = time.perf_counter()
                    conn.request("POST", "/v1/chat", body, headers)
                    response = conn.getresponse()
                    response.read()
                    if round_:
                        times[name].append(time.perf_counter() - began)
                    if response.status != 200:
                        print(f"{name}: status {response.status}", file=sys.stderr)
                        return 1
        off = None
        print(f"c=1, {args.rounds} rounds x {args.requests} requests each, interleaved")
        print(f"{'chatd':56} {'p50 ms':>8} {'p90 ms':>8} {'p50 / off':>10}")
        for name, kept in times.items():
            flat = sorted(kept)
            p50 = statistics.median(flat) * 1000
            p90 = flat[int(len(flat) * 0.9)] * 1000
            off = off or p50
            print(f"{name:56} {p50:8.3f} {p90:8.3f} {p50 / off:10.3f}")
        return 0
    finally:
        for conn in conns.values():
            conn.close()
        held.close()
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
