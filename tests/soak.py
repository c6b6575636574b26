"""A bounded soak: many requests at once through a real chatd process against
fake upstreams that randomly answer, refuse, rate-limit, hang, reset or break off.

    python -m tests.soak [--requests 5000] [--concurrency 50] [--seed N] [--json]

It starts two `FakeUpstream`s (one speaks to an `ollama` kind provider, one to an `openai`
kind) and a real `chatd` with a 1 s deadline, small retry counts, a breaker-prone and a
concurrency-limited provider and fallback tiers; then it sends a warm-up, and then
`requests` requests `concurrency` at a time, each with a random scenario (model, stream
or not, and a few callers that hang up: before the answer, at a stream's first event,
half way through sending the body) and a unique `X-Request-ID`. It checks, and reports:

- every request got exactly one answer, with its own `X-Request-ID` echoed back;
- every answer is well formed: a 200 of the right shape (the fake's text, the model and
  provider that should have served it; a stream ends in exactly one `done` or exactly
  one `error` event) or an error envelope whose status matches its type — and the one
  that scenario allows (a hang is a 504, a 429 a 502, a broken stream an error event ...);
- chatd made exactly `X-Chatd-Attempts` upstream calls for each request (counted at the
  fake: each request's model carries a unique `:r<n>` tag), so nothing was duplicated;
- nothing is in flight at the fakes afterwards, chatd's connections to them are at most
  `concurrency` (the most it can have had busy at once) and all close once idle past
  the pool's keep-alive expiry; each provider still answers (no concurrency slot leaked);
- chatd's RSS after the warm-up, half way and at the end (growth is checked by callers);
- no 500, no traceback in chatd's log, chatd still running; its request log (when it
  writes JSON lines) has one line per request with the status the caller saw, and its
  `chatd_in_flight_requests` gauge (when it serves /metrics) is back to 0.

Deadline overruns (a 504 where the scenario expects an answer, chatd taking over twice its
deadline) go to `Report.timing`, apart from `Report.problems`: on a shared machine a
neighbour's burst can stall any process, so callers may want to retry those once. The
report's `host` line (PSI stalls, chatd seen in uninterruptible sleep) helps tell.

`tests/test_soak.py` runs it small in the test command; `scripts/soak.sh` runs it full size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.upstream import ANSWER, FakeUpstream
from tests.support import ChatdProcess, provider_toml

TIMEOUT_SECS = 1.0  # chatd's deadline per request; `hang-3000` is well past it
KEEPALIVE_EXPIRY_SECS = 5.0  # httpx.Limits' default, which chatd's upstream pool uses
ERROR_TYPES = {
    400: {"invalid_request"},
    404: {"provider_not_found", "not_found"},
    502: {"upstream_error"},
    503: {"provider_disabled", "provider_overloaded", "provider_cooling_down"},
    504: {"upstream_timeout"},
}
ENVELOPE_KEYS = {"message", "type", "code", "param"}
DONE_KEYS = {
    "done", "model", "provider", "input_tokens", "output_tokens", "finish_reason",
    "latency_ms", "ttft_ms",
}  # fmt: skip
ANSWER_KEYS = {
    "model", "content", "input_tokens", "output_tokens", "finish_reason", "provider",
    "latency_ms",
}  # fmt: skip

# Outcome labels: "200" (a whole answer), "200 done" / "200 error:<type>" (a stream's
# last event), "<status> <type>" (an error envelope).
OK = "200"
DONE = "200 done"
BROKE = "200 error:upstream_error"
E502 = "502 upstream_error"
E503_COOL = "503 provider_cooling_down"
E503_BUSY = "503 provider_overloaded"
E504 = "504 upstream_timeout"
HUNG_UP = "hung up"


def config_for(ollama_fake: str, openai_fake: str) -> str:
    """chatd's config: four providers over two fakes, three fallback tiers."""
    return (
        f"""
[models]
soak_tier = ["brittle/fail-500", "oai/ok"]
soak_hang_tier = ["ollama/hang-3000", "oai/ok"]
soak_dead_tier = ["oai/reset", "ollama/fail-429"]

[chatd]
default_provider = "ollama"
timeout_secs = {TIMEOUT_SECS}
shutdown_grace_secs = 5
"""
        + provider_toml("ollama", "ollama", ollama_fake, max_retries=2, cooldown_failures=0)
        + provider_toml("oai", "openai", openai_fake + "/v1", max_retries=1, cooldown_failures=0)
        + provider_toml(
            "brittle", "ollama", ollama_fake, max_retries=1, cooldown_failures=3, cooldown_secs=0.5
        )
        + provider_toml(
            "narrow",
            "openai",
            openai_fake + "/v1",
            max_concurrency=2,
            queue_timeout_secs=0.05,
            cooldown_failures=0,
        )
    )


@dataclass(frozen=True)
class Scenario:
    """One kind of request and the outcomes chatd may answer it with."""

    name: str
    model: str  # as sent; `{tag}` becomes the request's unique `r<n>`
    stream: bool
    weight: int
    allowed: frozenset[str]
    provider: str = ""  # who must have served a 200
    served_model: str = ""  # the upstream model a 200 names; default: the tagged model
    upstream_status: int | None = None  # a 502's `upstream_status`, when it must be one
    attempts: tuple[int, int] = (0, 99)  # X-Chatd-Attempts bounds
    body: dict[str, Any] | None = None  # a malformed body instead of the usual one
    hang_up: float = 0.0  # the caller gives up after this long (a stream: at its first event)
    mid_body: bool = False  # ... having sent only half its body

    @property
    def tagged(self) -> bool:
        return "{tag}" in self.model


def _s(name: str, model: str, stream: bool, weight: int, *allowed: str, **kw: Any) -> Scenario:
    return Scenario(name, model, stream, weight, frozenset(allowed), **kw)


SCENARIOS: tuple[Scenario, ...] = (
    # answers
    _s("ok", "ok:{tag}", False, 10, OK, provider="ollama", attempts=(1, 1)),
    _s("ok/stream", "ok:{tag}", True, 10, DONE, provider="ollama", attempts=(1, 1)),
    _s("oai/ok", "oai/ok:{tag}", False, 8, OK, provider="oai", attempts=(1, 1)),
    _s("oai/ok/stream", "oai/ok:{tag}", True, 8, DONE, provider="oai", attempts=(1, 1)),
    # rate limited (Retry-After: 1 is past the 1 s deadline: no retry)
    _s("429", "fail-429:{tag}", False, 6, E502, upstream_status=429, attempts=(1, 1)),
    _s("oai/429/stream", "oai/fail-429:{tag}", True, 4, E502, upstream_status=429, attempts=(1, 1)),
    # server errors (retried with backoff inside the deadline)
    _s("500", "fail-500:{tag}", False, 6, E502, upstream_status=500, attempts=(1, 3)),
    _s("500/stream", "fail-500:{tag}", True, 4, E502, upstream_status=500, attempts=(1, 3)),
    _s("oai/500", "oai/fail-500:{tag}", False, 4, E502, upstream_status=500, attempts=(1, 2)),
    # hangs past the deadline (a read timeout is not retried)
    _s("hang", "hang-3000:{tag}", False, 4, E504, attempts=(1, 1)),
    _s("hang/stream", "hang-3000:{tag}", True, 3, E504, attempts=(1, 1)),
    _s("oai/hang/stream", "oai/hang-3000:{tag}", True, 3, E504, attempts=(1, 1)),
    # connection reset before any answer (retried)
    _s("reset", "reset:{tag}", False, 5, E502, attempts=(1, 3)),
    _s("reset/stream", "reset:{tag}", True, 3, E502, attempts=(1, 3)),
    _s("oai/reset", "oai/reset:{tag}", False, 3, E502, attempts=(1, 2)),
    # a body or stream that breaks off half way (a stream: after its first event)
    _s("break", "break:{tag}", False, 3, E502, attempts=(1, 3)),
    _s("break/stream", "break:{tag}", True, 6, BROKE, provider="ollama", attempts=(1, 1)),
    _s("oai/break/stream", "oai/break:{tag}", True, 5, BROKE, provider="oai", attempts=(1, 1)),
    # 503 once or twice, then an answer (the second retry may not fit the deadline)
    _s("flaky-1", "flaky-1:{tag}", False, 4, OK, provider="ollama", attempts=(2, 2)),
    _s("flaky-1/stream", "flaky-1:{tag}", True, 3, DONE, provider="ollama", attempts=(2, 2)),
    _s("flaky-2", "flaky-2:{tag}", False, 3, OK, E502, provider="ollama", attempts=(2, 3)),
    _s("oai/flaky-1/stream", "oai/flaky-1:{tag}", True, 3, DONE, provider="oai", attempts=(2, 2)),
    # a breaker that trips (3 failures, 0.5 s cooldown) and a 2-slot provider
    _s("brittle/500", "brittle/fail-500:{tag}", False, 3, E502, E503_COOL, attempts=(0, 2)),
    _s(
        "brittle/ok",
        "brittle/ok:{tag}",
        True,
        2,
        DONE,
        E503_COOL,
        provider="brittle",
        attempts=(0, 1),
    ),
    _s(
        "narrow/slow",
        "narrow/slow-150:{tag}",
        False,
        3,
        OK,
        E503_BUSY,
        provider="narrow",
        attempts=(0, 1),
    ),
    _s(
        "narrow/slow/stream",
        "narrow/slow-150:{tag}",
        True,
        2,
        DONE,
        E503_BUSY,
        provider="narrow",
        attempts=(0, 1),
    ),
    # fallback tiers
    _s("tier", "soak_tier", False, 3, OK, provider="oai", served_model="ok", attempts=(1, 3)),
    _s(
        "tier/stream",
        "soak_tier",
        True,
        2,
        DONE,
        provider="oai",
        served_model="ok",
        attempts=(1, 3),
    ),
    _s("hang-tier", "soak_hang_tier", False, 2, E504, attempts=(1, 1)),
    _s("dead-tier", "soak_dead_tier", False, 2, E502, upstream_status=429, attempts=(2, 3)),
    # callers that hang up: on a hang (after 0.3 s), and on a slow stream's first event
    _s("caller-gone", "hang-3000:{tag}", False, 2, HUNG_UP, hang_up=0.3),
    _s("caller-gone/stream", "slow-2000:{tag}", True, 2, HUNG_UP, hang_up=5.0),
    _s("caller-gone/mid-body", "ok:{tag}", False, 1, HUNG_UP, hang_up=0.3, mid_body=True),
    # ... and on a 2-slot provider, whose slot must come back
    _s(
        "narrow/caller-gone/stream",
        "narrow/slow-2000:{tag}",
        True,
        1,
        HUNG_UP,
        E503_BUSY,
        hang_up=5.0,
        attempts=(0, 1),
    ),
    # the caller's own mistakes
    _s("no-provider", "x:cloud", False, 1, "404 provider_not_found"),
    _s("bad-body", "ok", False, 1, "400 invalid_request", body={"model": "ok", "messages": []}),
)


@dataclass
class Result:
    index: int
    request_id: str
    scenario: Scenario
    model: str
    outcome: str = "lost"
    status: int = 0
    echoed_id: str | None = None
    attempts: int | None = None
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def judge(result: Result, response: httpx.Response, raw: bytes) -> None:
    """Set `result.outcome` from the answer and list what is wrong with it, if anything."""
    sc = result.scenario
    problems = result.problems
    result.status = response.status_code
    result.echoed_id = response.headers.get("x-request-id")
    if result.echoed_id != result.request_id:
        problems.append(f"X-Request-ID {result.echoed_id!r} != {result.request_id!r}")
    if "x-chatd-attempts" in response.headers:
        result.attempts = int(response.headers["x-chatd-attempts"])
    ctype = response.headers.get("content-type", "")
    expected_model = sc.served_model or result.model.split("/", 1)[-1]
    if response.status_code == 200 and sc.stream:
        if not ctype.startswith("text/event-stream"):
            problems.append(f"stream answered with content-type {ctype!r}")
            result.outcome = "200 ?"
            return
        result.outcome = judge_stream(raw, sc, expected_model, problems)
    elif response.status_code == 200:
        result.outcome = OK
        try:
            data = json.loads(raw)
        except ValueError:
            problems.append(f"200 body is not JSON: {raw[:200]!r}")
            return
        if not isinstance(data, dict) or not ANSWER_KEYS <= set(data):
            problems.append(f"200 body lacks fields: {raw[:300]!r}")
            return
        if data["content"] != ANSWER:
            problems.append(f"content {data['content'][:80]!r} is not the fake's answer")
        if data["model"] != expected_model:
            problems.append(f"answered for model {data['model']!r}, not {expected_model!r}")
        if sc.provider and data["provider"] != sc.provider:
            problems.append(f"served by {data['provider']!r}, not {sc.provider!r}")
    else:
        result.outcome = judge_error(response, raw, sc, problems)
    if result.outcome not in sc.allowed and not cut_short(result):
        problems.append(f"outcome {result.outcome!r} not in {sorted(sc.allowed)}")
    if response.status_code == 200 and result.attempts is None:
        problems.append("200 without X-Chatd-Attempts")
    if result.attempts is not None and sc.body is None:
        low, high = sc.attempts
        if not low <= result.attempts <= high:
            problems.append(f"X-Chatd-Attempts {result.attempts} outside {low}..{high}")


def cut_short(result: Result) -> bool:
    """A retry (or fallback) that the request's deadline cut off answers 504, whatever
    the earlier calls said: allowed wherever a request may take more than one call."""
    return (
        result.outcome == E504
        and result.scenario.attempts[1] > 1
        and result.attempts is not None
        and result.attempts > 1
    )


def judge_stream(raw: bytes, sc: Scenario, expected_model: str, problems: list[str]) -> str:
    events: list[Any] = []
    for block in raw.decode(errors="replace").split("\n\n"):
        if not block.strip():
            continue
        if not block.startswith("data: "):
            problems.append(f"stream block is not a data event: {block[:100]!r}")
            continue
        try:
            events.append(json.loads(block[6:]))
        except ValueError:
            problems.append(f"stream event is not JSON: {block[:100]!r}")
    if not events:
        problems.append("stream answered with no events")
        return "200 empty"
    finals = [i for i, e in enumerate(events) if "done" in e or "error" in e]
    if finals != [len(events) - 1]:
        problems.append(f"stream has final events at {finals} of {len(events)}")
    text = ""
    for event in events[:-1]:
        if not isinstance(event, dict) or not set(event) <= {"delta", "thinking"} or not event:
            problems.append(f"stream event of unknown shape: {event!r:.100}")
        else:
            text += event.get("delta", "")
    last = events[-1]
    if isinstance(last, dict) and last.get("done") is True:
        if set(last) != DONE_KEYS:
            problems.append(f"done event keys {sorted(last)}")
        if text != ANSWER:
            problems.append(f"streamed text {text[:80]!r} is not the fake's answer")
        if last.get("model") != expected_model:
            problems.append(f"stream done for model {last.get('model')!r}, not {expected_model!r}")
        if sc.provider and last.get("provider") != sc.provider:
            problems.append(f"stream served by {last.get('provider')!r}, not {sc.provider!r}")
        return DONE
    error = last.get("error") if isinstance(last, dict) else None
    if not isinstance(error, dict) or not ENVELOPE_KEYS <= set(error):
        problems.append(f"stream's last event is neither done nor an error: {last!r:.200}")
        return "200 ?"
    if error["code"] != error["type"] or not isinstance(error["message"], str):
        problems.append(f"malformed error event {error!r:.200}")
    if not ANSWER.startswith(text):
        problems.append(f"streamed text {text[:80]!r} is not a prefix of the fake's answer")
    return f"200 error:{error['type']}"


def judge_error(response: httpx.Response, raw: bytes, sc: Scenario, problems: list[str]) -> str:
    status = response.status_code
    try:
        error = json.loads(raw)["error"]
        kind = error["type"]
    except (ValueError, KeyError, TypeError):
        problems.append(f"{status} without an error envelope: {raw[:200]!r}")
        return f"{status} ?"
    if not response.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"{status} error with content-type {response.headers.get('content-type')}")
    # An upstream's fault carries what it said: its status and its own error code.
    upstream = {"upstream_status", "upstream_code"} if status == 502 else set()
    extra = set(error) - ENVELOPE_KEYS - upstream
    if not ENVELOPE_KEYS <= set(error) or extra:
        problems.append(f"envelope keys {sorted(error)}")
    if error.get("code") != kind or not isinstance(error.get("message"), str):
        problems.append(f"malformed envelope {error!r:.200}")
    if kind not in ERROR_TYPES.get(status, set()):
        problems.append(f"status {status} with type {kind!r}")
    if status == 502 and sc.upstream_status is not None:
        if error.get("upstream_status") != sc.upstream_status:
            problems.append(f"upstream_status {error.get('upstream_status')!r}")
    if status == 502 and error.get("upstream_status") == 429:
        if response.headers.get("retry-after") != "1":
            problems.append("the upstream's Retry-After was not passed on")
    if status == 503 and "retry-after" not in response.headers:
        problems.append("503 without Retry-After")
    return f"{status} {kind}"


async def send(client: httpx.AsyncClient, result: Result) -> Result:
    sc = result.scenario
    body = sc.body or {
        "model": result.model,
        "messages": [{"role": "user", "content": f"soak request {result.index}"}],
        "stream": sc.stream,
    }
    headers = {"X-Request-ID": result.request_id}
    started = time.monotonic()
    if sc.hang_up:
        try:
            await hang_up(client, result, body, headers)
        finally:
            result.seconds = time.monotonic() - started
        return result
    try:
        async with client.stream("POST", "/v1/chat", json=body, headers=headers) as response:
            raw = await response.aread()
    except httpx.HTTPError as exc:
        result.problems.append(f"no answer: {type(exc).__name__}: {exc}")
        return result
    finally:
        result.seconds = time.monotonic() - started
    judge(result, response, raw)
    return result


async def hang_up(
    client: httpx.AsyncClient, result: Result, body: dict[str, Any], headers: dict[str, str]
) -> None:
    """Send, then go away: after `hang_up` seconds, or as soon as a stream's first event is in."""
    sc = result.scenario
    content = json.dumps(body).encode()
    if sc.mid_body:
        whole = content

        async def half_then_stall() -> AsyncIterator[bytes]:
            yield whole[: len(whole) // 2]
            await asyncio.sleep(sc.hang_up * 10)

        content = half_then_stall()  # type: ignore[assignment]
    headers = {**headers, "Content-Type": "application/json"}
    try:
        async with asyncio.timeout(sc.hang_up):
            async with client.stream(
                "POST", "/v1/chat", content=content, headers=headers
            ) as response:
                result.status = response.status_code
                result.echoed_id = response.headers.get("x-request-id")
                if sc.stream and response.status_code == 200:
                    async for chunk in response.aiter_raw():
                        if not chunk.startswith(b'data: {"delta"'):
                            result.problems.append(f"stream began with {chunk[:80]!r}")
                        break
                    result.outcome = HUNG_UP
                    return  # leaving the block closes the connection mid-stream
                raw = await response.aread()
    except TimeoutError:
        result.outcome = HUNG_UP
        return
    except httpx.HTTPError as exc:
        result.problems.append(f"{type(exc).__name__}: {exc}")
        return
    judge(result, response, raw)  # answered before the caller went: fine if the scenario says


def plan(count: int, rng: random.Random, start: int, run_id: str) -> list[Result]:
    weights = [sc.weight for sc in SCENARIOS]
    chosen = rng.choices(SCENARIOS, weights=weights, k=count)
    results = []
    for offset, sc in enumerate(chosen):
        index = start + offset
        model = sc.model.replace("{tag}", f"r{index}")
        results.append(Result(index, f"soak-{run_id}-{index:06d}", sc, model))
    return results


async def drive(url: str, batch: list[Result], concurrency: int) -> float:
    """Send `batch`, `concurrency` at a time; the wall time it took."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue = iter(batch)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def worker() -> None:
            for result in queue:
                await send(client, result)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started


# -- process inspection ----------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def pressure_full_us(resource: str) -> int | None:
    """The host's PSI `full` stall total for `resource` (io, cpu, memory), if it has PSI."""
    try:
        text = Path(f"/proc/pressure/{resource}").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("full"):
            return int(line.rsplit("total=", 1)[1])
    return None


class StateSampler(threading.Thread):
    """Samples chatd's scheduler state every 20 ms: how often it sat in uninterruptible
    sleep (D, usually disk I/O such as a log write) and where (wchan)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples = 0
        self.blocked: Counter[str] = Counter()
        self.longest_blocked = 0  # consecutive D samples
        self._done = threading.Event()

    def run(self) -> None:
        run = 0
        while not self._done.wait(0.02):
            try:
                stat = Path(f"/proc/{self.pid}/stat").read_text()
                state = stat.rsplit(")", 1)[1].split()[0]
            except OSError:
                return
            self.samples += 1
            if state == "D":
                run += 1
                self.longest_blocked = max(self.longest_blocked, run)
                try:
                    self.blocked[Path(f"/proc/{self.pid}/wchan").read_text() or "?"] += 1
                except OSError:
                    self.blocked["?"] += 1
            else:
                run = 0

    def stop(self) -> None:
        self._done.set()
        self.join(1)


def cpu_secs(pid: int) -> float:
    """User + system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
    "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
    "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}  # fmt: skip


def tcp_connections(pid: int, remote_ports: Iterable[int]) -> Counter[str]:
    """The process's own TCP sockets to 127.0.0.1:<port>, counted by state."""
    ports = set(remote_ports)
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        match = re.fullmatch(r"socket:\[(\d+)\]", target)
        if match:
            inodes.add(match.group(1))
    states: Counter[str] = Counter()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) in ports:
                states[TCP_STATES.get(state, state)] += 1
    return states


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(step)


# -- the run ---------------------------------------------------------------------------


@dataclass
class Report:
    requests: int
    concurrency: int
    seed: int
    warmup: int
    wall_secs: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)  # HTTP status, or "hung up"
    by_scenario: dict[str, Counter[str]] = field(default_factory=dict)
    rss_kb: dict[str, int] = field(default_factory=dict)
    connections: dict[str, Any] = field(default_factory=dict)
    fakes: dict[str, Any] = field(default_factory=dict)
    upstream_calls: int = 0
    latency_ms: dict[str, int] = field(default_factory=dict)
    slowest: list[str] = field(default_factory=list)
    hang_cut_ms: dict[str, int] = field(default_factory=dict)
    chatd_latency_ms: dict[str, float] = field(default_factory=dict)
    log_check: str = ""
    metrics_check: str = ""
    host: dict[str, Any] = field(default_factory=dict)
    chatd_cpu_secs: float = 0.0
    fake_errors: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    # Deadline overruns: real, or a host too busy to keep time (see `host`); callers may
    # judge them separately from `problems`, which no load excuses.
    timing: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.wall_secs if self.wall_secs else 0.0

    @property
    def rss_growth_kb(self) -> int:
        return self.rss_kb.get("end", 0) - self.rss_kb.get("after_warmup", 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "seed": self.seed,
            "warmup": self.warmup,
            "wall_secs": round(self.wall_secs, 2),
            "requests_per_sec": round(self.rps, 1),
            "statuses": dict(sorted(self.statuses.items())),
            "outcomes": dict(self.outcomes.most_common()),
            "by_scenario": {k: dict(v) for k, v in sorted(self.by_scenario.items())},
            "upstream_calls": self.upstream_calls,
            "latency_ms": self.latency_ms,
            "slowest": self.slowest,
            "hang_cut_ms": self.hang_cut_ms,
            "chatd_latency_ms": self.chatd_latency_ms,
            "log_check": self.log_check,
            "metrics_check": self.metrics_check,
            "host": self.host,
            "chatd_cpu_secs": round(self.chatd_cpu_secs, 1),
            "fake_handler_errors": dict(self.fake_errors),
            "rss_kb": self.rss_kb,
            "rss_growth_kb": self.rss_growth_kb,
            "connections": self.connections,
            "fakes": self.fakes,
            "problems": self.problems,
            "timing": self.timing,
            "log": self.log_path,
        }

    def format(self) -> str:
        mb = 1024
        lines = [
            f"soak: {self.requests} requests at concurrency {self.concurrency} "
            f"(seed {self.seed}, after a {self.warmup}-request warm-up)",
            f"wall time {self.wall_secs:.1f} s, {self.rps:.0f} req/s; "
            f"{self.upstream_calls} upstream calls; chatd CPU {self.chatd_cpu_secs:.1f} s; "
            "latency ms " + ", ".join(f"{k} {v}" for k, v in self.latency_ms.items()),
            "slowest: " + "; ".join(self.slowest),
            "hang-3000 calls left by chatd after (ms, at the fake): "
            + ", ".join(f"{k} {v}" for k, v in self.hang_cut_ms.items()),
            "chatd's own latency ms (its log): "
            + ", ".join(f"{k} {v:g}" for k, v in self.chatd_latency_ms.items()),
            f"chatd's log: {self.log_check}",
            f"chatd's /metrics: {self.metrics_check}",
            "statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            "outcomes: " + ", ".join(f"{k}: {v}" for k, v in self.outcomes.most_common()),
            "chatd RSS: "
            + ", ".join(f"{k} {v / mb:.1f} MB" for k, v in self.rss_kb.items())
            + f" (growth after warm-up {self.rss_growth_kb / mb:+.1f} MB)",
            "chatd -> fakes TCP: " + ", ".join(f"{k} {v}" for k, v in self.connections.items()),
            "fakes: " + ", ".join(f"{k} {v}" for k, v in self.fakes.items()),
            "host during the run: " + ", ".join(f"{k} {v}" for k, v in self.host.items()),
            "fake handler errors (chatd closing sockets it will not reuse): "
            + (", ".join(f"{k} {v}" for k, v in self.fake_errors.items()) or "none"),
        ]
        for title, items in (("PROBLEMS", self.problems), ("TIMING", self.timing)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines += [f"  {p}" for p in items[:40]]
                if len(items) > 40:
                    lines.append(f"  ... and {len(items) - 40} more")
        if self.problems or self.timing:
            lines.append(f"chatd log: {self.log_path}")
        else:
            lines.append("PASS: every request answered once, well formed; nothing left open")
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000)


def run_soak(
    requests: int = 5000,
    concurrency: int = 50,
    *,
    seed: int | None = None,
    warmup: int | None = None,
    workdir: Path | None = None,
) -> Report:
    """Start the fakes and chatd, soak, inspect, stop; the report lists any problem."""
    seed = random.randrange(1 << 30) if seed is None else seed
    warmup = max(concurrency * 20, requests // 10) if warmup is None else warmup
    report = Report(requests, concurrency, seed, warmup)
    rng = random.Random(seed)
    run_id = f"{seed:x}"
    workdir = workdir or Path(tempfile.mkdtemp(prefix="chatd-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with FakeUpstream() as ollama_fake, FakeUpstream() as openai_fake:
        fakes = {"ollama": ollama_fake, "openai": openai_fake}
        for fake in fakes.values():  # count socketserver's tracebacks instead of printing them
            fake.server.handle_error = lambda request, address: report.fake_errors.update(
                [type(sys.exc_info()[1]).__name__]
            )
        ports = [ollama_fake.port, openai_fake.port]
        chatd = ChatdProcess(config_for(ollama_fake.url, openai_fake.url), workdir)
        report.log_path = str(chatd.log_path)
        with chatd:
            assert chatd.proc is not None
            pid = chatd.proc.pid
            # warm-up: the same mix, not counted (imports, pools, caches settle)
            warm = plan(warmup, rng, 0, run_id)
            asyncio.run(drive(chatd.url, warm, concurrency))
            report.rss_kb["after_warmup"] = rss_kb(pid)

            batch = plan(requests, rng, warmup, run_id)
            half = requests // 2
            sampler = StateSampler(pid)
            stalls = {r: pressure_full_us(r) for r in ("io", "cpu", "memory")}
            sampler.start()
            wall = asyncio.run(drive(chatd.url, batch[:half], concurrency))
            report.rss_kb["half_way"] = rss_kb(pid)
            wall += asyncio.run(drive(chatd.url, batch[half:], concurrency))
            sampler.stop()
            report.wall_secs = wall
            for resource, before in stalls.items():
                after = pressure_full_us(resource)
                if before is not None and after is not None:
                    report.host[f"{resource} full stall ms"] = round((after - before) / 1000)
            report.host["chatd D-state samples"] = sum(sampler.blocked.values())
            report.host["of samples"] = sampler.samples
            report.host["longest D run ms"] = sampler.longest_blocked * 20
            if sampler.blocked:
                report.host["D wchan"] = dict(sampler.blocked.most_common(3))
            report.host["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
            report.rss_kb["end"] = rss_kb(pid)
            report.chatd_cpu_secs = cpu_secs(pid)

            inspect_after(report, pid, ports, fakes, concurrency)
            check_metrics(report, chatd.url)
            check_answers(report, warm + batch, fakes, warmup)
            probe_providers(report, chatd.url, run_id)
            inspect_idle(report, pid, ports, fakes)
            if chatd.proc.poll() is not None:
                report.problems.append(f"chatd exited {chatd.proc.returncode} during the soak")
        log = chatd.log()
        check_log(report, warm + batch, log)
        if "Traceback" in log:
            report.problems.append("Traceback in chatd's log")
        if chatd.proc.returncode not in (0, None):
            report.problems.append(f"chatd exited {chatd.proc.returncode} on SIGTERM")
    return report


def inspect_after(
    report: Report, pid: int, ports: list[int], fakes: dict[str, FakeUpstream], concurrency: int
) -> None:
    """Right after the run (1 s idle): nothing in flight; at most `concurrency` pooled."""

    def quiet() -> bool:
        return all(f.counters()["in_flight"] == 0 for f in fakes.values())

    if wait_until(quiet, 2.0) is None:
        report.problems.append(
            "requests still in flight at the fakes 2 s after the run: "
            + str({n: f.counters()["in_flight"] for n, f in fakes.items()})
        )
    time.sleep(1.0)
    states = tcp_connections(pid, ports)
    open_now = states["ESTABLISHED"] + states["CLOSE_WAIT"]
    report.connections["after_1s"] = sum(states.values())
    report.connections["after_1s_states"] = dict(states)
    report.connections["bound"] = concurrency
    if open_now > concurrency:
        report.problems.append(f"chatd holds {open_now} connections to the fakes > {concurrency}")
    for name, fake in fakes.items():
        counters = fake.counters()
        report.fakes[name] = counters
        if counters["open_connections"] > concurrency:
            report.problems.append(f"{name} fake still serves {counters['open_connections']}")


def check_answers(
    report: Report, results: list[Result], fakes: dict[str, FakeUpstream], warmup: int
) -> None:
    """One answer per request id; each well formed; upstream calls == X-Chatd-Attempts."""
    calls: Counter[str] = Counter()
    # how long each `hang-3000` call held the fake before chatd went away: at the deadline,
    # or (the caller having hung up after 0.3 s) at once
    hung: dict[str, list[float]] = {"deadline": [], "caller_gone": []}
    gone = {r.model for r in results if r.scenario.hang_up}
    for fake in fakes.values():
        for call in fake.calls:
            if not isinstance(call.json, dict):
                continue
            model = str(call.json.get("model", ""))
            calls[model] += 1
            if model.startswith("hang-") or model in gone:
                if call.disconnected_at is None:
                    report.problems.append(f"chatd did not leave the {model} call early")
                elif model.startswith("hang-"):
                    held = call.disconnected_at - call.started_at
                    hung["caller_gone" if model in gone else "deadline"].append(held)
    report.hang_cut_ms = {
        f"{why} {stat}": percentile(values, q)
        for why, values in hung.items()
        for stat, q in (("p50", 0.5), ("max", 1.0))
    }
    if hung["caller_gone"] and max(hung["caller_gone"]) >= 0.95 * TIMEOUT_SECS:
        report.timing.append("a caller's hang-up did not end its upstream call at once")
    counted = results[warmup:]
    report.upstream_calls = sum(calls.values())
    echoed = Counter(r.echoed_id for r in results if r.echoed_id is not None)
    for result in results:
        if result.scenario.hang_up and result.outcome == HUNG_UP:
            if result.echoed_id not in (None, result.request_id):
                result.problems.append(f"X-Request-ID {result.echoed_id!r} echoed")
            continue
        if echoed[result.request_id] != 1:
            report.problems.append(
                f"{result.request_id} answered {echoed[result.request_id]} times"
            )
    for result in results:
        sc = result.scenario
        problems = list(result.problems)
        if sc.tagged and result.attempts is not None:
            seen = calls[result.model.split("/", 1)[-1]]
            # a call cut off by the deadline may not have reached the fake yet
            least = result.attempts - 1 if result.outcome == E504 else result.attempts
            if not least <= seen <= result.attempts:
                problems.append(f"{seen} upstream calls for X-Chatd-Attempts {result.attempts}")
        if result.status == 500:
            problems.append("500 internal_error")
        # a 504 where the scenario expects none: chatd (or the host) was too slow, not wrong
        late = result.outcome == E504 and E504 not in sc.allowed
        bucket = report.timing if late else report.problems
        bucket += [f"{result.request_id} [{sc.name}]: {p}" for p in problems]
    for result in counted:
        report.outcomes[result.outcome] += 1
        report.statuses[HUNG_UP if result.outcome == HUNG_UP else str(result.status)] += 1
        report.by_scenario.setdefault(result.scenario.name, Counter())[result.outcome] += 1
    seconds = [r.seconds for r in counted]
    report.latency_ms = {
        "p50": percentile(seconds, 0.5),
        "p99": percentile(seconds, 0.99),
        "max": percentile(seconds, 1.0),
    }
    report.slowest = [
        f"{r.scenario.name} {r.outcome} {r.seconds * 1000:.0f} ms"
        for r in sorted(counted, key=lambda r: r.seconds, reverse=True)[:5]
    ]


IN_FLIGHT = re.compile(r'^chatd_in_flight_requests\{provider="([^"]*)"\} (\S+)$', re.M)


def check_metrics(report: Report, url: str) -> None:
    """chatd's own in-flight gauge (when it serves /metrics) is back to 0 for every provider."""
    try:
        response = httpx.get(url + "/metrics", timeout=5)
    except httpx.HTTPError as exc:
        report.problems.append(f"GET /metrics failed: {exc!r}")
        return
    gauges = {name: float(value) for name, value in IN_FLIGHT.findall(response.text)}
    if response.status_code != 200 or not gauges:
        report.metrics_check = f"no in-flight gauge ({response.status_code}), not checked"
        return
    busy = {name: value for name, value in gauges.items() if value}
    if busy:
        report.problems.append(f"chatd_in_flight_requests not back to 0 after the soak: {busy}")
    report.metrics_check = f"chatd_in_flight_requests {gauges}"


def check_log(report: Report, results: list[Result], log: str) -> None:
    """chatd's own request log (JSON lines, when it writes them) agrees: one line per
    request with the status the caller saw; and no answer took chatd much past its deadline.
    A caller that hung up may never have reached chatd at all."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rid = row.get("request_id") if isinstance(row, dict) else None
        if isinstance(rid, str) and rid.startswith("soak-") and "status" in row:
            rows.setdefault(rid, []).append(row)
    if not rows:
        report.log_check = "no JSON request lines, not checked"
        return
    never_arrived = 0
    latencies: dict[str, list[float]] = {"answers": [], "errors": []}
    for result in results:
        seen = rows.get(result.request_id, [])
        if len(seen) > 1:
            report.problems.append(f"{result.request_id} logged {len(seen)} times")
        if result.outcome == HUNG_UP:
            never_arrived += not seen
            if seen and seen[0]["status"] >= 500:
                report.problems.append(
                    f"{result.request_id} [{result.scenario.name}]: chatd logged "
                    f"{seen[0]['status']} {seen[0].get('error')} for a caller that hung up"
                )
            continue
        if not seen:
            report.problems.append(f"{result.request_id} answered {result.status}, not logged")
            continue
        row = seen[0]
        if row["status"] != result.status:
            report.problems.append(
                f"{result.request_id} logged {row['status']}, answered {result.status}"
            )
        latency = row.get("latency_ms")
        if isinstance(latency, int | float) and not result.scenario.stream:
            latencies["answers" if result.status == 200 else "errors"].append(latency)
            if latency > 2000 * TIMEOUT_SECS:
                report.timing.append(
                    f"{result.request_id} [{result.scenario.name}] took chatd {latency} ms "
                    f"with a {TIMEOUT_SECS:g} s deadline"
                )
    report.log_check = (
        f"{sum(map(len, rows.values()))} soak lines, one per request with the same status; "
        f"{never_arrived} hung-up callers never reached chatd"
    )
    for kind, values in latencies.items():
        if values:
            report.chatd_latency_ms[f"{kind} p99"] = round(sorted(values)[int(0.99 * len(values))])
            report.chatd_latency_ms[f"{kind} max"] = round(max(values))


def probe_providers(report: Report, url: str, run_id: str) -> None:
    """Every provider still answers (no breaker state leaked), and the 2-slot provider
    serves two at once (no concurrency slot leaked)."""
    time.sleep(0.6)  # past brittle's cooldown
    probes = [f"{p}/ok:probe-{run_id}" for p in ("ollama", "oai", "brittle")]
    probes += [f"narrow/slow-300:probe-{run_id}-{n}" for n in range(2)]

    async def ask_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat",
                        json={"model": m, "messages": [{"role": "user", "content": "there?"}]},
                    )
                    for m in probes
                )
            )

    for model, response in zip(probes, asyncio.run(ask_all()), strict=True):
        if response.status_code != 200:
            report.problems.append(
                f"after the soak {model} answers {response.status_code}: {response.text[:200]}"
            )


def inspect_idle(
    report: Report, pid: int, ports: list[int], fakes: dict[str, FakeUpstream]
) -> None:
    """Past the pool's keep-alive expiry every connection to the fakes is closed, both ends."""

    def closed() -> bool:
        return not tcp_connections(pid, ports) and all(
            f.counters()["open_connections"] == 0 for f in fakes.values()
        )

    waited = wait_until(closed, KEEPALIVE_EXPIRY_SECS * 3, step=0.25)
    states = tcp_connections(pid, ports)
    report.connections["idle"] = sum(states.values())
    report.connections["idle_states"] = dict(states)
    report.connections["closed_after_s"] = None if waited is None else round(waited, 1)
    if waited is None:
        report.problems.append(
            f"connections still open {KEEPALIVE_EXPIRY_SECS * 3:g} s after the soak: chatd "
            f"{dict(states)}, fakes "
            + str({n: f.counters()["open_connections"] for n, f in fakes.items()})
        )
    for name, fake in fakes.items():
        counters = fake.counters()
        report.fakes[name] = {
            "peak_in_flight": counters["peak_in_flight"],
            "peak_connections": counters["peak_connections"],
            "accepted_connections": counters["accepted_connections"],
            "in_flight": counters["in_flight"],
            "open_connections": counters["open_connections"],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description="chatd soak")
    env = os.environ.get
    parser.add_argument("--requests", type=int, default=int(env("SOAK_REQUESTS", "5000")))
    parser.add_argument("--concurrency", type=int, default=int(env("SOAK_CONCURRENCY", "50")))
    parser.add_argument("--warmup", type=int, default=None, help="default: max(20c, n/10)")
    parser.add_argument("--seed", type=int, default=int(env("SOAK_SEED", "0")) or None)
    parser.add_argument(
        "--max-rss-growth-mb", type=float, default=float(env("SOAK_MAX_RSS_GROWTH_MB", "30"))
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON too")
    args = parser.parse_args(argv)
    report = run_soak(args.requests, args.concurrency, seed=args.seed, warmup=args.warmup)
    if report.rss_growth_kb > args.max_rss_growth_mb * 1024:
        report.problems.append(
            f"RSS grew {report.rss_growth_kb / 1024:.1f} MB > {args.max_rss_growth_mb:g} MB"
        )
    print(report.format())
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    return 1 if report.problems or report.timing else 0


if __name__ == "__main__":
    sys.exit(main())
