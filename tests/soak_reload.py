"""Reloads under load (docs/reload.md): callers stream and ask while the config is
reloaded over and over by SIGHUP, `POST /admin/reload` and `watch_config`.

Each config generation `g` points the alias `hot` at a provider the one before did not
have (`p0`, `p1` in turn, so every reload removes the provider requests are streaming
from) with the upstream model `slow-<400+g>` (the fake answers it over 400+g ms), and
prices only that model, at g USD per million tokens. Afterwards every request must have
answered 200 (a stream: ended with `done`), and every ledger row must be priced by the
generation its own upstream model names — a row priced by a later config would find no
price for its model and cost 0.

    python -m tests.soak_reload [--seconds 20] [--reloads 20] [--callers 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml

ADMIN = "soak-admin-token"
TRIGGERS = ("SIGHUP", "admin", "file")
USER = [{"role": "user", "content": "say something"}]


def config(fake: FakeUpstream, g: int, usage_db: Path) -> str:
    model = f"slow-{400 + g}"
    return (
        f'[models]\nhot = "p{g % 2}/{model}"\n\n'
        "[chatd]\n"
        'admin_token_env = "SOAK_ADMIN"\nwatch_config = true\ntimeout_secs = 10\n'
        f'usage_db = "sqlite:///{usage_db}"\n\n'
        f'[chatd.prices."*/{model}"]\ninput = {g}\noutput = {g}\n\n'
        + provider_toml("ollama", "ollama", fake.url)
        + provider_toml(f"p{g % 2}", "ollama", fake.url)
    )


@dataclass
class Tally:
    sent: int = 0
    streams: int = 0
    failed: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def caller(url: str, stream: bool, until: float, tally: Tally) -> None:
    with httpx.Client(base_url=url, timeout=15) as client:
        while time.monotonic() < until:
            body = {"model": "hot", "messages": USER, "stream": stream}
            try:
                if stream:
                    done = False
                    with client.stream("POST", "/v1/chat", json=body) as response:
                        status = response.status_code
                        for line in response.iter_lines():
                            if line.startswith("data: ") and json.loads(line[6:]).get("done"):
                                done = True
                    problem = None if status == 200 and done else f"stream {status} done={done}"
                else:
                    response = client.post("/v1/chat", json=body)
                    ok = response.status_code == 200 and response.json().get("content")
                    problem = None if ok else f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with tally.lock:
                tally.sent += 1
                tally.streams += stream
                if problem is not None:
                    (tally.cut if stream else tally.failed).append(problem)


def wait_for_sha(url: str, sha: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/ready", timeout=5).json()["config"]["sha256"] == sha:
            return True
        time.sleep(0.02)
    return False


def run(seconds: float, reloads: int, callers: int, tmp: Path) -> dict[str, Any]:
    """The soak; returns its report (`ok` says whether everything held)."""
    usage_db = tmp / "usage.sqlite3"
    with FakeUpstream() as fake:
        chatd = ChatdProcess(config(fake, 1, usage_db), tmp, env={"SOAK_ADMIN": ADMIN})
        with chatd:
            tally = Tally()
            until = time.monotonic() + seconds
            threads = [
                threading.Thread(target=caller, args=(chatd.url, i % 2 == 0, until, tally))
                for i in range(callers)
            ]
            for thread in threads:
                thread.start()
            taken: dict[str, int] = dict.fromkeys(TRIGGERS, 0)
            missed = []
            every = seconds / (reloads + 1)
            for g in range(2, reloads + 2):
                time.sleep(max(0.0, until - seconds + every * (g - 1) - time.monotonic()))
                text = config(fake, g, usage_db)
                chatd.config_path.write_text(text)
                sha = hashlib.sha256(text.encode()).hexdigest()
                trigger = TRIGGERS[g % 3]
                if trigger == "SIGHUP":
                    chatd.signal(signal.SIGHUP)
                elif trigger == "admin":
                    answer = httpx.post(
                        chatd.url + "/admin/reload",
                        headers={"Authorization": f"Bearer {ADMIN}"},
                        timeout=15,
                    )
                    if answer.status_code != 200:
                        missed.append(f"admin reload {answer.status_code}")
                if wait_for_sha(chatd.url, sha):
                    taken[trigger] += 1
                else:
                    missed.append(f"generation {g} by {trigger} never took")
            for thread in threads:
                thread.join(30)
            metrics = httpx.get(chatd.url + "/metrics", timeout=5).text
        log = chatd.log()
    rows = (
        sqlite3.connect(usage_db)
        .execute(
            "SELECT upstream_model, status, input_tokens, output_tokens, cost_usd, cost_source "
            "FROM chatd_usage WHERE route = '/v1/chat'"
        )
        .fetchall()
    )
    mispriced = []
    for model, status, tokens_in, tokens_out, cost, source in rows:
        g = int(model.rsplit("-", 1)[1]) - 400
        expected = ((tokens_in or 0) + (tokens_out or 0)) * g / 1_000_000
        if status != 200 or source != "price" or abs(cost - expected) > 1e-12:
            mispriced.append((model, status, tokens_in, tokens_out, cost, source))
    report = {
        "seconds": seconds,
        "callers": callers,
        "requests": tally.sent,
        "streams": tally.streams,
        "failed": len(tally.failed),
        "cut_streams": len(tally.cut),
        "reloads_taken": taken,
        "reloads_missed": missed,
        "ledger_rows": len(rows),
        "mispriced_rows": len(mispriced),
        "tracebacks": log.count("Traceback"),
        "reloads_ok_metric": next(
            (line for line in metrics.splitlines() if 'reloads_total{outcome="ok"}' in line), ""
        ),
        "examples": (tally.failed + tally.cut + [str(m) for m in mispriced])[:5],
    }
    report["ok"] = (
        not tally.failed
        and not tally.cut
        and not missed
        and not mispriced
        and len(rows) == tally.sent
        and tally.sent > 0
        and report["tracebacks"] == 0
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--reloads", type=int, default=20)
    parser.add_argument("--callers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatd-reload-soak-") as tmp:
        report = run(args.seconds, args.reloads, args.callers, Path(tmp))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
