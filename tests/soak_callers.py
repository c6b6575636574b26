"""The callers soak: many callers at once, with limits, through a real chatd
writing its SQLite ledger; afterwards the ledger must hold exactly one row per request
answered, and each caller's spend in it must equal what the fake upstream was asked to
report (`openrouter/cost-<micro>` answers carry `usage.cost = micro / 1e6`).

    python -m tests.soak_callers [--requests 3000] [--concurrency 40] [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml

# (name, rpm, tpm, budget_usd, max_concurrency): some never limited, some often.
CALLERS = [
    ("free", 0, 0, 0.0, 0),
    ("steady", 100_000, 0, 0.0, 0),
    ("tight", 30, 0, 0.0, 0),
    ("tokens", 0, 3_000, 0.0, 0),
    ("budget", 0, 0, 0.05, 0),
    ("narrow", 0, 0, 0.0, 2),
    ("mixed", 200, 50_000, 1.0, 4),
    ("admin", 0, 0, 0.0, 0),
]
COSTS = (0, 250, 1_000, 4_321, 12_000)  # micro-USD a fake answer reports


def config_for(fake: FakeUpstream, db: Path) -> str:
    text = f'[chatd]\ndefault_provider = "ollama"\nusage_db = "sqlite:///{db}"\n\n'
    for name, rpm, tpm, budget, conc in CALLERS:
        text += (
            f'[chatd.callers.{name}]\ntoken_env = "SOAK_TOK_{name.upper()}"\n'
            f"rpm = {rpm}\ntpm = {tpm}\nbudget_usd = {budget}\nmax_concurrency = {conc}\n"
            f"admin = {'true' if name == 'admin' else 'false'}\n\n"
        )
    return (
        text
        + provider_toml("ollama", "ollama", fake.url, max_retries=0)
        + provider_toml("openrouter", "openai", fake.url + "/v1", key_env="SOAK_OR_KEY")
    )


def token(name: str) -> str:
    return f"soak-token-{name}-7f3a9c"


@dataclass
class Report:
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    ledger_rows: int = 0
    problems: list[str] = field(default_factory=list)
    spend: dict[str, tuple[float, float]] = field(default_factory=dict)  # asked, ledger
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"requests {self.requests} in {self.seconds:.1f}s, ledger rows {self.ledger_rows}",
            "statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
        ]
        for name, (asked, got) in sorted(self.spend.items()):
            lines.append(f"  {name:8} spend asked ${asked:.6f}  ledger ${got:.6f}")
        lines += [f"PROBLEM: {p}" for p in self.problems[:20]]
        return "\n".join(lines)


async def drive(url: str, requests: int, concurrency: int, rng: random.Random) -> tuple:
    answered: dict[str, int] = {}
    asked: dict[str, float] = defaultdict(float)
    statuses: Counter[str] = Counter()
    plans = []
    for i in range(requests):
        caller = rng.choice(CALLERS)[0]
        micro = rng.choice(COSTS)
        route = rng.choice(("/v1/chat", "/v1/chat/completions"))
        stream = rng.random() < 0.3
        plans.append((f"soak-{i}-{rng.getrandbits(32):08x}", caller, micro, route, stream))
    queue: asyncio.Queue = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                rid, caller, micro, route, stream = queue.get_nowait()
                body: dict = {
                    "model": f"openrouter/cost-{micro}",
                    "messages": [{"role": "user", "content": "soak"}],
                    "stream": stream,
                }
                if stream and route.endswith("completions"):
                    body["stream_options"] = {"include_usage": True}
                headers = {"Authorization": f"Bearer {token(caller)}", "X-Request-ID": rid}
                response = await client.post(route, json=body, headers=headers)
                text = response.text
                kind = str(response.status_code)
                if response.status_code != 200:
                    kind += " " + response.json()["error"]["type"]
                elif stream and ("[DONE]" not in text and '"done": true' not in text
                                 and '"done":true' not in text):  # fmt: skip
                    kind += " unfinished stream"
                statuses[kind] += 1
                answered[rid] = response.status_code
                if response.status_code == 200:
                    asked[caller] += micro / 1e6

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answered, asked, statuses


def run_soak(requests: int, concurrency: int, seed: int | None = None,
             workdir: Path | None = None) -> Report:  # fmt: skip
    rng = random.Random(seed)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="chatd-soak-callers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "ledger.sqlite3"
    report = Report(requests=requests)
    env = {f"SOAK_TOK_{name.upper()}": token(name) for name, *_ in CALLERS}
    env["SOAK_OR_KEY"] = "sk-soak-upstream-key"
    with FakeUpstream() as fake:
        gw = ChatdProcess(config_for(fake, db), workdir, env=env).start()
        try:
            started = time.monotonic()
            answered, asked, statuses = asyncio.run(drive(gw.url, requests, concurrency, rng))
            report.seconds = time.monotonic() - started
        finally:
            code = gw.stop(timeout=30)  # SIGTERM: the writer flushes what it holds
        if code != 0:
            report.problems.append(f"chatd exited {code}")
        if "Traceback" in gw.log():
            report.problems.append("a traceback in chatd's log")
    report.statuses = statuses
    rows = sqlite3.connect(db).execute("SELECT request_id, caller, status, cost_usd, "
                                       "cost_source FROM chatd_usage").fetchall()  # fmt: skip
    report.ledger_rows = len(rows)
    seen = Counter(r[0] for r in rows)
    if len(answered) != requests:
        report.problems.append(f"{requests - len(answered)} requests got no answer")
    if len(rows) != len(answered):
        report.problems.append(f"ledger rows {len(rows)} != requests answered {len(answered)}")
    dupes = [rid for rid, n in seen.items() if n > 1]
    missing = [rid for rid in answered if rid not in seen]
    if dupes or missing:
        report.problems.append(f"{len(dupes)} duplicated, {len(missing)} missing request ids")
    for rid, _caller, status, _cost, _source in rows:
        if answered.get(rid) != status:
            report.problems.append(f"{rid}: ledger status {status} != {answered.get(rid)}")
    spent: dict[str, float] = defaultdict(float)
    for _rid, caller, _status, cost, _source in rows:
        spent[caller] += cost or 0.0
    for name, *_ in CALLERS:
        report.spend[name] = (asked.get(name, 0.0), spent.get(name, 0.0))
        if abs(asked.get(name, 0.0) - spent.get(name, 0.0)) > 1e-9:
            report.problems.append(f"{name}: ledger spend differs from what the fake reported")
    if any(k.startswith("5") for k in statuses):
        report.problems.append("5xx answers: " + str(dict(statuses)))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak_callers")
    parser.add_argument(
        "--requests", type=int, default=int(os.environ.get("SOAK_REQUESTS", "3000"))
    )
    parser.add_argument("--concurrency", type=int,
                        default=int(os.environ.get("SOAK_CONCURRENCY", "40")))  # fmt: skip
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    report = run_soak(args.requests, args.concurrency, args.seed)
    print(report.format())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
