"""What callers and the usage ledger cost one request, timed in process: CPU microseconds
of their own code, free of the machine's noise (`.venv/bin/python bench/costs.py`;
bench/features.py prints the same table under its own).

Throughput on a shared 2-core VM moves ±10–20% between runs of one configuration, more
than these features cost; so alongside the req/s table, this times the code each feature
adds to a request: authenticating the caller, admitting it (allow-list, rpm, tpm, budget,
the `X-RateLimit-*` headers), billing it at the end (price, spend, tokens, the ledger row
onto the writer's buffer), and the writer putting the row into SQLite on its own thread.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN = "bench-costs-token"
CONFIG = """
[chatd]
usage_db = "sqlite:///{db}"

[chatd.providers.ollama]
kind = "ollama"
base_url = "http://127.0.0.1:9"

[chatd.callers.bench]
token_env = "BENCH_COSTS_TOKEN"
rpm = 100000000
tpm = 1000000000
budget_usd = 1000000.0

[chatd.prices]
"*" = {{ input = 1.0, output = 2.0 }}
"""
LIVE = 10_000  # live callers loaded for the second authentication figure
CALLS = 20_000
RUNS = 5


def scope() -> dict[str, Any]:
    """A finished /v1/chat request's scope, as the middleware and the route leave it."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", b"Bearer " + TOKEN.encode()),
        ],
        "state": {
            "request_id": "0123456789abcdef0123456789abcdef",
            "log": {
                "model": "qwen3.5:latest",
                "provider": "ollama",
                "upstream_model": "qwen3.5:latest",
                "input_tokens": 12,
                "output_tokens": 4,
                "attempts": 1,
            },
        },
    }


def per_call(run: Callable[[list[Any]], None], make: Callable[[], Any]) -> float:
    """Median over RUNS of CPU µs per call of `run` over CALLS fresh arguments."""
    samples = []
    for _ in range(RUNS):
        args = [make() for _ in range(CALLS)]
        began = time.thread_time()
        run(args)
        samples.append((time.thread_time() - began) / CALLS * 1e6)
    return statistics.median(samples)


def measure() -> list[tuple[str, float]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from starlette.requests import Request

    from chatd.config import load_settings
    from chatd.routing.registry import Registry
    from chatd.state.usage.sqlite import parameters
    from chatd.surfaces.operations import Operations

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chatd.toml"
        path.write_text(CONFIG.format(db=Path(tmp) / "usage.sqlite3"))
        os.environ["BENCH_COSTS_TOKEN"] = TOKEN
        settings = load_settings(path)
        ops = Operations(settings, Registry.from_settings(settings))
        callers, ledger = ops.callers, ops.ledger
        assert callers is not None and ledger is not None

        def authorized() -> Request:
            s = scope()
            assert callers.authorize(s) is None
            return Request(s)

        def authorize(scopes: list[Any]) -> None:
            for s in scopes:
                callers.authorize(s)

        def admit(requests: list[Request]) -> None:
            async def all_of_them() -> None:
                for request in requests:
                    await callers.admit(request, "qwen3.5:latest")

            asyncio.run(all_of_them())

        def bill(requests: list[Request]) -> None:
            for request in requests:
                ops._bill(request.scope, 200, 0.012)
            ledger.writer.rows.clear()

        rows: list[Any] = []

        def collect(requests: list[Request]) -> None:
            for request in requests:
                ops._bill(request.scope, 200, 0.012)
            rows.extend(ledger.writer.rows)
            ledger.writer.rows.clear()

        collect([authorized() for _ in range(500)])
        backend = ledger.backend
        backend._write(parameters(rows))  # type: ignore[attr-defined]  # schema, first pages

        def write(batches: list[Any]) -> None:
            for batch in batches:  # the rows (their daily sums by the trigger), one statement
                backend._write(batch)  # type: ignore[attr-defined]

        from chatd.state.caller import Caller, token_hash

        live_token = b"ck-000000001388-" + b"5" * 40  # the last of LIVE
        for i in range(LIVE):
            token = b"ck-%012x-" % (i + 1) + b"5" * 40
            callers.put_live(Caller(f"live-{i}", rpm=1000, source="live"), f"live-{i}",
                             [token_hash(token)])  # fmt: skip
        callers.loaded = True

        def live_scope() -> dict[str, Any]:
            s = scope()
            s["headers"][1] = (b"authorization", b"Bearer " + live_token)
            return s

        assert callers.authorize(live_scope()) is None
        found = [
            ("callers: authenticate the token (middleware)", per_call(authorize, scope)),
            (
                f"callers: authenticate a live token, {LIVE:,} live callers loaded",
                per_call(authorize, live_scope),
            ),
            (
                "callers: admit (allow-list, budget, tpm, rpm, X-RateLimit-* headers)",
                per_call(admit, authorized),
            ),
            (
                "billing at the end: price, spend, tokens, the ledger row onto the buffer",
                per_call(bill, authorized),
            ),
        ]
        batches = 40
        began = time.thread_time()
        made = [parameters(rows) for _ in range(batches)]
        found.append(
            (
                "ledger: a batch's parameters made, on the event loop, once a flush",
                (time.thread_time() - began) / (batches * len(rows)) * 1e6,
            )
        )
        began = time.thread_time()
        write(made)
        found.append(
            (
                "ledger: one row into SQLite (WAL, batches of 500), its own thread",
                (time.thread_time() - began) / (batches * len(rows)) * 1e6,
            )
        )
        asyncio.run(backend.aclose())
    return found


def main() -> int:
    print("| code | µs per request |\n|---|---:|")
    for name, micros in measure():
        print(f"| {name} | {micros:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
