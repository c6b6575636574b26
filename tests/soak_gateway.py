"""The full-gateway chaos soak: two real chatd replicas behind a real nginx (round
robin, the config docs/replicas-and-cache.md shows), callers with rpm/tpm/budget limits,
the ledger in a real PostgreSQL, a real Redis (`redis_url`), the response cache on, and a
fake upstream that answers, fails, resets, hangs and breaks streams off. While the
requests run, Redis is killed (SIGKILL) and started again (empty), PostgreSQL is killed
and started again, and one replica gets SIGTERM (it drains) and is started again.

    python -m tests.soak_gateway [--requests 20000] [--concurrency 48] [--seed N]

Afterwards it checks, prints, and exits non-zero on any violation:

- every request answered exactly once, its own X-Request-ID echoed, well formed (a 200 of
  the right shape, a stream that ends in one final event, or the one error envelope with a
  status its type allows, and a status its scenario allows), no 500, nothing from nginx;
- the ledger (PostgreSQL, read directly once both replicas have stopped) holds exactly
  one row per request answered, by request_id, with the status the caller saw. The rule
  (docs/callers-and-usage.md): a row for every request that reached the dispatcher and
  for every 401/403/429 refusal; every request this soak sends is one or the other;
- each caller's spend in the ledger equals what the fake upstream reported for its
  answered calls: OpenRouter's `usage.cost` (`cost-<micro>` models) or the usage's tokens
  times `[chatd.prices]`; a cache hit costs 0;
- the spend each replica enforces for each budgeted caller (`GET /admin/callers/{name}`,
  asked of each replica directly) equals the ledger's within `--agree-secs` (1 s) of the
  last answer.

Deadline overruns (a 504 where the scenario expects an answer) go to `Report.timing`:
on a shared machine a neighbour's burst can stall any process.
`tests/test_soak_gateway.py` runs it small; `scripts/soak.sh gateway` runs it full size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.upstream import ANSWER, FakeUpstream, behaviour
from tests.redis_server import RedisServer
from tests.servers import PostgresServer
from tests.support import ChatdProcess, free_port, nginx_conf, provider_toml, wait_for_port

TIMEOUT_SECS = 2.0
ADMIN = "soak-operator-token-51c2e0"
PRICE_IN, PRICE_OUT = 3.0, 15.0  # USD per million tokens, `paid/*`
# (name, rpm, tpm, budget_usd, max_concurrency)
CALLERS = [
    ("free", 0, 0, 0.0, 0),
    ("steady", 100_000, 1_000_000, 500.0, 0),
    ("tight", 40, 0, 0.0, 0),
    ("tokens", 0, 4_000, 0.0, 0),
    ("budget", 0, 0, 0.04, 0),
    ("narrow", 0, 0, 0.0, 2),
    ("mixed", 300, 60_000, 2.0, 4),
]
LIMITED = {name for name, rpm, tpm, budget, conc in CALLERS if rpm or tpm or budget or conc}
COSTS = (0, 250, 1_000, 4_321, 12_000)  # micro-USD a `cost-<micro>` answer reports
CACHED_PROMPTS = 12  # the cached scenario asks one of these, so most are hits
E502, E504 = "502 upstream_error", "504 upstream_timeout"
ERROR_TYPES = {
    401: {"unauthorized"},
    429: {"rate_limited", "budget_exceeded"},
    502: {"upstream_error"},
    503: {"provider_overloaded", "provider_cooling_down"},
    504: {"upstream_timeout"},
}


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # `{tag}` becomes the request's own tag, `{micro}` a cost
    route: str
    stream: bool
    weight: int
    allowed: frozenset[str]  # besides a caller's 429 and a late 504


def _s(name: str, model: str, route: str, stream: bool, weight: int, *allowed: str) -> Scenario:
    return Scenario(name, model, route, stream, weight, frozenset(allowed))


SCENARIOS = (
    _s("paid", "paid/ok:{tag}", "/v1/chat", False, 12, "200"),
    _s("paid/stream", "paid/ok:{tag}", "/v1/chat", True, 8, "200 done"),
    _s("paid/completions", "paid/ok:{tag}", "/v1/chat/completions", False, 6, "200"),
    _s("paid/flaky", "paid/flaky-1:{tag}", "/v1/chat", False, 4, "200"),
    _s("cost", "openrouter/cost-{micro}:{tag}", "/v1/chat", False, 8, "200"),
    _s("cost/stream", "openrouter/cost-{micro}:{tag}", "/v1/chat/completions", True, 6, "200 done"),
    _s("cached", "paid/ok", "/v1/chat", False, 14, "200"),
    _s("500", "ollama/fail-500:{tag}", "/v1/chat", False, 3, E502),
    _s("429", "ollama/fail-429:{tag}", "/v1/chat", False, 2, E502),
    _s("reset", "ollama/reset:{tag}", "/v1/chat", False, 2, E502),
    _s("break/stream", "ollama/break:{tag}", "/v1/chat", True, 3, "200 error:upstream_error"),
    _s("hang", "ollama/hang-6000:{tag}", "/v1/chat", False, 1, E504),
    _s("bad-token", "paid/ok:{tag}", "/v1/chat", False, 1, "401 unauthorized"),
)


def config_for(fake: FakeUpstream, redis_url: str, dsn: str) -> str:
    text = (
        f'[chatd]\ndefault_provider = "paid"\ntimeout_secs = {TIMEOUT_SECS}\n'
        f'redis_url = "{redis_url}"\nusage_db = "{dsn}"\nadmin_token_env = "SOAK_ADMIN"\n'
        "shutdown_grace_secs = 20\n\n[chatd.cache]\nenabled = true\n\n"
        f'[chatd.prices]\n"paid/*" = {{ input = {PRICE_IN}, output = {PRICE_OUT} }}\n'
        '"ollama/*" = { input = 0, output = 0 }\n\n'
    )
    for name, rpm, tpm, budget, conc in CALLERS:
        text += (
            f'[chatd.callers.{name}]\ntoken_env = "SOAK_TOK_{name.upper()}"\n'
            f"rpm = {rpm}\ntpm = {tpm}\nbudget_usd = {budget}\nmax_concurrency = {conc}\n\n"
        )
    return (
        text
        + provider_toml("paid", "openai", fake.url + "/v1", max_retries=1, cooldown_failures=0)
        + provider_toml("ollama", "ollama", fake.url, max_retries=1, cooldown_failures=0)
        + provider_toml(
            "openrouter",
            "openai",
            fake.url + "/v1",
            key_env="SOAK_OR_KEY",
            max_retries=0,
            cooldown_failures=0,
        )  # fmt: skip
    )


def token(name: str) -> str:
    return f"soak-gw-token-{name}-9d2b"


NGINX_HTTP = """\
    upstream chatd {{
        server 127.0.0.1:{a};
        server 127.0.0.1:{b}{b_down};
    }}
    server {{
        listen 127.0.0.1:{port};
        # a reload closes the old worker's idle keep-alive connections, racing a client's
        # next request on one (an error no server can answer): one connection a request
        keepalive_timeout 0;
        location / {{
            proxy_pass http://chatd;
            proxy_http_version 1.1;
        }}
    }}
"""


class Nginx:
    """A real nginx with a master process (so `route(b_down=...)` reloads it: the way to
    take a replica out of rotation before it is stopped), on a free port, in `tmp`."""

    def __init__(self, tmp: Path, a: int, b: int) -> None:
        self.tmp, self.a, self.b = tmp, a, b
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write(self, b_down: bool) -> None:
        http = NGINX_HTTP.format(port=self.port, a=self.a, b=self.b,
                                 b_down=" down" if b_down else "")  # fmt: skip
        conf = nginx_conf(self.tmp, http).replace("master_process off;", "master_process on;")
        (self.tmp / "nginx.conf").write_text(conf)

    def start(self) -> Nginx:
        binary = shutil.which("nginx")
        if binary is None:
            raise RuntimeError("nginx is not on PATH")
        self._write(False)
        self._log = open(self.tmp / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.tmp), "-e", str(self.tmp / "error.log"),
             "-c", str(self.tmp / "nginx.conf")],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(self.proc, self.port, self.tmp)
        return self

    def workers(self) -> int:
        assert self.proc is not None
        count = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            count += fields[1] == str(self.proc.pid)  # its parent is the master
        return count

    def route(self, b_down: bool) -> None:
        """Reload with replica b in or out of rotation. Returns once a new worker serves
        and the old one has had 0.5 s to stop sending: it may still wait for answers."""
        assert self.proc is not None
        self._write(b_down)
        before = self.workers()
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while self.workers() <= before and self.workers() != 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the new worker comes before the old one leaves
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()


@dataclass
class Plan:
    rid: str
    caller: str
    scenario: Scenario
    model: str
    body: dict[str, Any]


@dataclass
class Answer:
    status: int = 0
    outcome: str = "lost"
    echoed: str | None = None
    cache: str | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    cache: Counter[str] = field(default_factory=Counter)  # X-Chatd-Cache of the answers
    ledger_rows: int = 0
    spend: dict[str, tuple[float, float]] = field(default_factory=dict)  # fakes, ledger
    enforced: dict[str, dict[str, float | None]] = field(default_factory=dict)
    agreed_after: float | None = None
    disagreed: str = ""  # what the replicas enforced, and the ledger said, at first
    in_flight_at_sigterm: int | None = None  # b's upstream calls in flight when stopped
    events: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    timing: list[str] = field(default_factory=list)

    def format(self) -> str:
        rate = self.requests / self.seconds if self.seconds else 0.0
        lines = [
            f"requests {self.requests} in {self.seconds:.1f}s ({rate:.0f} req/s), "
            f"ledger rows {self.ledger_rows}",
            "statuses " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            "outcomes " + ", ".join(f"{k}: {v}" for k, v in sorted(self.outcomes.items())),
            "cache " + ", ".join(f"{k}: {v}" for k, v in sorted(self.cache.items())),
            "chaos: " + "; ".join(self.events),
            f"replica b had {self.in_flight_at_sigterm} upstream calls in flight at SIGTERM",
        ]
        for name, (fakes, ledger) in sorted(self.spend.items()):
            lines.append(f"  {name:7} spend: fakes reported ${fakes:.6f}, ledger ${ledger:.6f}")
        for name, _rpm, _tpm, budget, _conc in CALLERS:
            if budget and name in self.spend:
                lines.append(f"  {name:7} budget ${budget:.2f}: spent ${self.spend[name][1]:.6f}")
        for name, by_replica in sorted(self.enforced.items()):
            got = ", ".join(f"{r} ${v:.6f}" if v is not None else f"{r} ?"
                            for r, v in by_replica.items())  # fmt: skip
            lines.append(f"  {name:7} enforced: {got}")
        agreed = "never" if self.agreed_after is None else f"{self.agreed_after:.2f}s"
        lines.append(f"enforced spend == ledger spend {agreed} after the last answer")
        if self.disagreed:
            lines.append(f"  at first: {self.disagreed}")
        lines += [f"PROBLEM: {p}" for p in self.problems[:30]]
        lines += [f"TIMING: {p}" for p in self.timing[:10]]
        if len(self.problems) > 30:
            lines.append(f"... and {len(self.problems) - 30} more problems")
        return "\n".join(lines)


def make_plans(requests: int, rng: random.Random, run: str) -> list[Plan]:
    weights = [s.weight for s in SCENARIOS]
    plans = []
    for i in range(requests):
        sc = rng.choices(SCENARIOS, weights)[0]
        caller = rng.choice(CALLERS)[0]
        tag = f"g{run}r{i}"
        model = sc.model.format(tag=tag, micro=rng.choice(COSTS))
        content = f"soak {tag}"
        if sc.name == "cached":
            content = f"cached question {rng.randrange(CACHED_PROMPTS)} of run {run}"
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}],
                                "stream": sc.stream}  # fmt: skip
        if sc.stream and sc.route.endswith("completions"):
            body["stream_options"] = {"include_usage": True}
        plans.append(Plan(f"soak-gw-{run}-{i}", caller, sc, model, body))
    return plans


def judge(plan: Plan, response: httpx.Response, answer: Answer) -> None:
    """The outcome and what is wrong with it: one envelope, the right shape, its own id."""
    status = answer.status = response.status_code
    answer.echoed = response.headers.get("x-request-id")
    answer.cache = response.headers.get("x-chatd-cache")
    problems = answer.problems
    if answer.echoed != plan.rid:
        problems.append(f"X-Request-ID {answer.echoed!r} (nginx's own answer?)")
    text = response.text
    if status != 200:
        try:
            error = json.loads(text)["error"]
            assert {"message", "type", "code", "param"} <= set(error)
        except (ValueError, KeyError, TypeError, AssertionError):
            problems.append(f"{status} not in the error envelope: {text[:160]!r}")
            answer.outcome = f"{status} ?"
            return
        answer.outcome = f"{status} {error['type']}"
        if error["type"] not in ERROR_TYPES.get(status, set()):
            problems.append(f"{status} with type {error['type']!r}")
    elif not plan.scenario.stream:
        answer.outcome = "200"
        try:
            data = json.loads(text)
            content = (data["choices"][0]["message"]["content"] if "choices" in data
                       else data["content"])  # fmt: skip
        except (ValueError, KeyError, IndexError, TypeError):
            problems.append(f"200 of the wrong shape: {text[:160]!r}")
            return
        if content != ANSWER:
            problems.append(f"content {content[:60]!r} is not the fake's answer")
    else:
        answer.outcome = judge_stream(plan, text, problems)
    outcome = answer.outcome
    late = outcome == E504 and E504 not in plan.scenario.allowed
    refused = outcome.startswith("429 ") and plan.caller in LIMITED
    if outcome not in plan.scenario.allowed and not late and not refused:
        problems.append(f"outcome {outcome!r} not in {sorted(plan.scenario.allowed)}")


def judge_stream(plan: Plan, text: str, problems: list[str]) -> str:
    blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith(":")]
    if not blocks or any(not b.startswith("data: ") for b in blocks):
        problems.append(f"stream of the wrong shape: {text[:160]!r}")
        return "200 ?"
    if plan.scenario.route.endswith("completions"):  # OpenAI's chunks, then [DONE]
        if blocks[-1] != "data: [DONE]" or blocks.count("data: [DONE]") != 1:
            problems.append(f"stream does not end in one [DONE]: {text[-160:]!r}")
            return "200 unfinished"
        chunks = [json.loads(b[6:]) for b in blocks[:-1]]
        said = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c.get("choices"))  # fmt: skip
        if said != ANSWER:
            problems.append(f"streamed {said[:60]!r}, not the fake's answer")
        return "200 done"
    events = [json.loads(b[6:]) for b in blocks]
    finals = [i for i, e in enumerate(events) if "done" in e or "error" in e]
    if finals != [len(events) - 1]:
        problems.append(f"stream has final events at {finals} of {len(events)}")
        return "200 ?"
    last = events[-1]
    if last.get("done") is True:
        said = "".join(e.get("delta", "") for e in events[:-1])
        if said != ANSWER:
            problems.append(f"streamed {said[:60]!r}, not the fake's answer")
        return "200 done"
    return f"200 error:{last['error'].get('type')}"


async def drive(url: str, plans: list[Plan], concurrency: int, answers: dict[str, Answer],
                progress: list[int], lull: threading.Event) -> None:  # fmt: skip
    queue = list(reversed(plans))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while queue:
                while lull.is_set():  # noqa: ASYNC110 - set from the chaos thread
                    await asyncio.sleep(0.02)
                if not queue:
                    break
                plan = queue.pop()
                who = "nobody" if plan.scenario.name == "bad-token" else plan.caller
                headers = {"Authorization": f"Bearer {token(who)}", "X-Request-ID": plan.rid}
                answer = Answer()
                try:
                    response = await client.post(plan.scenario.route, json=plan.body,
                                                 headers=headers)  # fmt: skip
                    judge(plan, response, answer)
                except httpx.HTTPError as exc:
                    answer.problems.append(f"no answer: {exc!r}")
                if plan.rid in answers:
                    answer.problems.append("answered twice")
                answers[plan.rid] = answer
                progress[0] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))


class Chaos(threading.Thread):
    """Kills and restarts the servers as the run passes given fractions of its requests."""

    def __init__(self, total: int, progress: list[int], steps: list[tuple[float, str, Any]],
                 report: Report) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.total, self.progress, self.steps, self.report = total, progress, steps, report
        self.started = time.monotonic()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for at, name, step in self.steps:
                while self.progress[0] < at * self.total:
                    time.sleep(0.02)
                began = time.monotonic()
                step()
                self.report.events.append(
                    f"{name} at {self.progress[0]} answered ({time.monotonic() - began:.1f}s)"
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the driver
            self.error = exc


def fake_reports(fake: FakeUpstream) -> tuple[dict[str, float], dict[str, float]]:
    """What the fake reported: the cost of each tagged model's last call, and of a call
    with each cached prompt: OpenRouter's `usage.cost`, else its usage's tokens × prices."""
    by_tag: dict[str, float] = {}
    by_prompt: dict[str, float] = {}
    for call in fake.calls:
        body = call.json if isinstance(call.json, dict) else {}
        model = str(body.get("model", ""))
        if not call.path.startswith("/v1/chat/completions"):
            continue  # the ollama dialect is priced at 0
        options = body.get("stream_options") or {}
        if body.get("stream") and not options.get("include_usage"):
            cost = 0.0  # no usage reported
        elif behaviour(model)[0] == "cost":
            cost = behaviour(model)[1] / 1e6
        else:
            prompt = max(1, len(json.dumps(body.get("messages"))) // 4)
            cost = (prompt * PRICE_IN + len(ANSWER.split()) * PRICE_OUT) / 1e6
        if ":" in model:
            by_tag[model.split(":", 1)[1]] = cost
        else:
            by_prompt[str(body["messages"][-1]["content"])] = cost
    return by_tag, by_prompt


async def ledger_rows(dsn: str) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        query = "SELECT request_id, caller, status, cost_usd, cost_source FROM chatd_usage"
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def run_soak(requests: int, concurrency: int, seed: int | None = None,
             workdir: Path | None = None, agree_secs: float = 1.0,
             quiet_reload: bool = False) -> Report:  # fmt: skip
    """`quiet_reload`: Redis comes back, and its spend is reloaded, in a lull (no request in
    flight). Under traffic the reload is exact only up to the spend of the calls that
    settled in the half second before it (docs/shared-state.md); the test command asks
    for the lull, so that it checks the reload itself, every time."""
    rng = random.Random(seed)
    run = f"{rng.getrandbits(24):06x}"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="chatd-soak-gateway-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = Report(requests=requests)
    env = {f"SOAK_TOK_{name.upper()}": token(name) for name, *_ in CALLERS}
    env |= {"SOAK_OR_KEY": "sk-soak-upstream-key", "SOAK_ADMIN": ADMIN}
    plans = make_plans(requests, rng, run)
    answers: dict[str, Answer] = {}
    pg = PostgresServer().init()
    try:
        with FakeUpstream() as fake, RedisServer(workdir) as redis:
            # a reset or a caller gone is the point here: not socketserver's tracebacks
            fake.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
            config = config_for(fake, redis.url, pg.dsn)
            a, b = ChatdProcess(config, workdir, env=env), ChatdProcess(config, workdir, env=env)
            replicas = {"a": a, "b": b}

            (workdir / "nginx").mkdir()
            nginx = Nginx(workdir / "nginx", a.port, b.port)
            try:
                with ThreadPoolExecutor(2) as pool:  # at once: start-up is much of a short run
                    list(pool.map(lambda chatd: chatd.start(60), (a, b)))
                nginx.start()
                wait_shared_up([a, b])
                drive_and_check(report, nginx, plans, concurrency, answers, replicas, redis,
                                pg, workdir, config, env, agree_secs, quiet_reload)  # fmt: skip
            finally:
                nginx.stop()
                for name, chatd in replicas.items():
                    if chatd.proc is None:
                        continue
                    code = chatd.stop(timeout=30)  # SIGTERM: the ledger's buffer is written
                    if code != 0:
                        report.problems.append(f"replica {name} exited {code}")
                    if "Traceback" in chatd.log():
                        report.problems.append(f"a traceback in replica {name}'s log")
            by_tag, by_prompt = fake_reports(fake)
        check_ledger(report, plans, answers, asyncio.run(ledger_rows(pg.dsn)), by_tag, by_prompt)
    finally:
        pg.stop()
    return report


def in_flight(url: str) -> int:
    """The replica's own count of upstream calls in flight (`chatd_in_flight_requests`)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith("chatd_in_flight_requests{")))  # fmt: skip


def wait_shared_up(replicas: list[ChatdProcess], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [httpx.get(c.url + "/metrics", timeout=5).text for c in replicas]
        if all("\nchatd_shared_state_up 1.0" in t for t in texts):
            return
        time.sleep(0.1)
    raise RuntimeError("the replicas did not reach Redis")


def drive_and_check(report: Report, nginx: Nginx, plans: list[Plan], concurrency: int,
                    answers: dict[str, Answer], replicas: dict[str, ChatdProcess],
                    redis: RedisServer, pg: PostgresServer, workdir: Path, config: str,
                    env: dict[str, str], agree_secs: float,
                    quiet_reload: bool) -> None:  # fmt: skip
    lull = threading.Event()

    def lull_begins() -> None:
        lull.set()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and sum(in_flight(c.url) for c in replicas.values()):
            time.sleep(0.05)
        time.sleep(0.3)  # the last answers' spend and rows leave for Redis and the ledger

    def lull_ends() -> None:
        # Both replicas' reloads belong in the lull: the ledger and Redis can agree before
        # the second one, while its outage rows still wait in its buffer.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
            "spend reloaded from the ledger" in chatd.log() for chatd in replicas.values()
        ):
            time.sleep(0.05)
        urls = {name: chatd.url for name, chatd in replicas.items()}
        watch = Report()
        asyncio.run(watch_agreement(watch, pg.dsn, urls, time.monotonic(), 15.0))
        if watch.problems:
            report.problems.append("in the lull, spend was not reloaded: " + watch.problems[0])
        lull.clear()

    def restart_b() -> None:
        old = replicas["b"]
        assert old.proc is not None
        # As a rolling restart does it (docs/replicas-and-cache.md): out of rotation first,
        # then SIGTERM, which drains what b still serves (the 2 s hangs, streams)
        nginx.route(b_down=True)
        busy = in_flight(old.url)
        old.proc.send_signal(signal.SIGTERM)
        code = old.proc.wait(60)
        if code != 0:
            report.problems.append(f"replica b exited {code} on SIGTERM")
        if "Traceback" in old.log():
            report.problems.append("a traceback in replica b's log before its restart")
        again = workdir / "b-again"
        again.mkdir(exist_ok=True)
        replicas["b"] = ChatdProcess(config, again, env=env, port=old.port).start(60)
        nginx.route(b_down=False)
        report.in_flight_at_sigterm = busy

    # The replica restart comes first and ends before Redis goes: its start-up brings
    # Redis up to the ledger's spend, which would hide a replica that failed to do so when
    # Redis came back. Redis comes back while PostgreSQL is down, so that reload must wait.
    steps = [
        (0.02, "replica b out of nginx, SIGTERM, drained, restarted, back in", restart_b),
        (0.55, "redis SIGKILL", redis.kill),
        (0.62, "postgresql SIGKILL", pg.kill),
        (0.7, "redis restarted (empty) while postgresql is down", redis.start),
        (0.8, "postgresql restarted", pg.start),
    ]
    if quiet_reload:  # all at 0.7: no answer comes in a lull
        steps[3:] = [
            (0.7, "a lull", lull_begins),
            (0.7, "redis restarted (empty) while postgresql is down", redis.start),
            (0.7, "postgresql restarted", pg.start),
            (0.7, "spend reloaded, the lull over", lull_ends),
        ]
    progress = [0]
    chaos = Chaos(len(plans), progress, steps, report)
    chaos.start()
    started = time.monotonic()
    asyncio.run(drive(nginx.url, plans, concurrency, answers, progress, lull))
    report.seconds = time.monotonic() - started
    chaos.join(120)  # a step still under way when the last answer came
    if chaos.error is not None:
        report.problems.append(f"a chaos step failed: {chaos.error!r}")
    if report.events and not report.events[-1].startswith(("postgresql restarted at ",
                                                           "spend reloaded")):  # fmt: skip
        report.problems.append("the chaos steps ran late: " + "; ".join(report.events))
    ended = time.monotonic()
    if len(report.events) != len(steps):
        report.problems.append(f"only {len(report.events)} of {len(steps)} chaos steps ran")
    # the spend each replica enforces == the ledger's, within `agree_secs` of the end
    urls = {name: chatd.url for name, chatd in replicas.items()}
    asyncio.run(watch_agreement(report, pg.dsn, urls, ended, agree_secs))


async def watch_agreement(report: Report, dsn: str, urls: dict[str, str], ended: float,
                          agree_secs: float) -> None:  # fmt: skip
    """Read the ledger's spend and each replica's enforced spend, over and over, until they
    agree; a read counts from when it began (it takes a few ms, more on a loaded host)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    budgeted = [name for name, _rpm, _tpm, budget, _conc in CALLERS if budget]
    ledger: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(timeout=5, headers=admin) as client:

            async def enforced(url: str, name: str) -> float | None:
                try:
                    return (await client.get(f"{url}/admin/callers/{name}")).json()["spend_usd"]
                except (httpx.HTTPError, ValueError, KeyError):
                    return None

            while True:
                began = time.monotonic() - ended
                query = "SELECT caller, SUM(cost_usd) AS spent FROM chatd_usage GROUP BY caller"
                ledger_read = conn.fetch(query)
                asks = [(n, r, enforced(u, n)) for n in budgeted for r, u in urls.items()]
                rows, *got = await asyncio.gather(ledger_read, *(a for _, _, a in asks))
                ledger = {row["caller"]: row["spent"] or 0.0 for row in rows}
                report.enforced = defaultdict(dict)
                for (name, replica, _), value in zip(asks, got, strict=True):
                    report.enforced[name][replica] = value
                agree = all(v is not None and abs(v - ledger.get(n, 0.0)) < 1e-9
                            for n, by in report.enforced.items() for v in by.values())  # fmt: skip
                if agree:
                    report.agreed_after = began
                    break
                if not report.disagreed:
                    report.disagreed = f"{dict(report.enforced)} vs ledger {ledger}"
                if began > max(agree_secs, 10.0):
                    break
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    if report.agreed_after is None or report.agreed_after > agree_secs:
        report.problems.append(
            f"enforced spend not the ledger's within {agree_secs:g}s: "
            f"{dict(report.enforced)} vs ledger {ledger}"
        )


def check_ledger(report: Report, plans: list[Plan], answers: dict[str, Answer],
                 rows: list[Any], by_tag: dict[str, float],
                 by_prompt: dict[str, float]) -> None:  # fmt: skip
    report.ledger_rows = len(rows)
    expected: dict[str, float] = defaultdict(float)
    costs: dict[str, float] = {}  # each answered call's cost, as the fake reported it
    for plan in plans:
        answer = answers.get(plan.rid)
        if answer is None:
            report.problems.append(f"{plan.rid} [{plan.scenario.name}] got no answer")
            continue
        report.statuses[str(answer.status)] += 1
        report.outcomes[answer.outcome] += 1
        if answer.cache:
            report.cache[answer.cache] += 1
        late = answer.outcome == E504 and E504 not in plan.scenario.allowed
        for problem in answer.problems:
            (report.timing if late else report.problems).append(
                f"{plan.rid} [{plan.scenario.name}]: {problem}"
            )
        if late and not answer.problems:
            report.timing.append(f"{plan.rid} [{plan.scenario.name}]: 504 past the deadline")
        if answer.outcome in ("200", "200 done") and answer.cache != "hit":
            tag = plan.model.split(":", 1)[1] if ":" in plan.model else None
            content = plan.body["messages"][-1]["content"]
            cost = by_tag.get(tag) if tag else by_prompt.get(content)
            if plan.model.startswith("ollama/"):
                cost = 0.0
            if cost is None:
                report.problems.append(f"{plan.rid}: answered 200, no call at the fake")
                cost = 0.0
            expected[plan.caller] += cost
            costs[plan.rid] = cost
    if "500" in report.statuses:
        report.problems.append(f"{report.statuses['500']} answers were 500")
    seen = Counter(row["request_id"] for row in rows)
    dupes = [rid for rid, n in seen.items() if n > 1]
    missing = [rid for rid in answers if rid not in seen]
    extra = [rid for rid in seen if rid not in answers]
    if len(rows) != len(answers) or dupes or missing or extra:
        report.problems.append(
            f"ledger rows {len(rows)} != requests answered {len(answers)}: {len(dupes)} "
            f"duplicated, {len(missing)} missing, {len(extra)} unknown request ids "
            f"(e.g. {(dupes + missing + extra)[:3]})"
        )
    spent: dict[str, float] = defaultdict(float)
    for row in rows:
        answer = answers.get(row["request_id"])
        if answer is not None and answer.status != row["status"]:
            report.problems.append(
                f"{row['request_id']}: ledger status {row['status']} != answered {answer.status}"
            )
        spent[row["caller"]] += row["cost_usd"] or 0.0
        if abs((row["cost_usd"] or 0.0) - costs.get(row["request_id"], 0.0)) > 1e-12:
            report.problems.append(
                f"{row['request_id']}: ledger cost {row['cost_usd']} ({row['cost_source']}), "
                f"the fake reported {costs.get(row['request_id'], 0.0)}"
            )
    for name, *_ in CALLERS:
        report.spend[name] = (expected.get(name, 0.0), spent.get(name, 0.0))
        if abs(expected.get(name, 0.0) - spent.get(name, 0.0)) > 1e-9:
            report.problems.append(f"{name}: ledger spend differs from what the fakes reported")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak_gateway")
    env = os.environ.get
    parser.add_argument("--requests", type=int, default=int(env("SOAK_REQUESTS", "20000")))
    parser.add_argument("--concurrency", type=int, default=int(env("SOAK_CONCURRENCY", "48")))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--agree-secs", type=float, default=1.0)
    args = parser.parse_args(argv)
    report = run_soak(args.requests, args.concurrency, args.seed, agree_secs=args.agree_secs)
    print(report.format())
    return 1 if report.problems or report.timing else 0


if __name__ == "__main__":
    sys.exit(main())
