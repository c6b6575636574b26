"""chatd benchmark: nginx direct vs chatd vs LiteLLM vs Portkey, one process each.

Run through `bash bench/run.sh [--quick]` (which installs what is missing). Stdlib only.
Writes generated configs, scripts and logs to bench/out/ and the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import json
import math
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from load import (
    VARY,
    Request,
    StreamStats,
    WrkResult,
    cache_hits,
    median,
    percentile,
    run_wrk,
    stream_bench,
    write_lua,
)
from upstream import nginx_config

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
# The chatd under test: this checkout's, or another build's (e.g. a worktree with a patch).
CHATD = Path(os.environ.get("BENCH_CHATD") or REPO / ".venv/bin/chatd").absolute()
LITELLM = BENCH / ".venv-litellm/bin/litellm"
PORTKEY_PKG = BENCH / "portkey/node_modules/@portkey-ai/gateway"
PORTKEY_JS = PORTKEY_PKG / "build/start-server.js"

MSGS = [{"role": "user", "content": "hi"}]
OAI_KEY = "sk-bench"
START_TIMEOUT_S = 90.0

PROCS: list[subprocess.Popen] = []
# The race's "full gateway" row: callers + limits + ledger + Redis + cache, all misses.
FULL = "chatd /v1/chat full gateway (caller limits, ledger, redis, cache miss)"
# Callers' switches (--ledger, --callers): what chatd's config says, what its requests carry.
CHATD_TOKEN = "tok-bench-caller"
CHATD_AUTH: dict[str, str] = {}


# ----------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(OUT / f"{name}.log", "wb")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        cwd=OUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    PROCS.append(proc)
    with open(OUT / "pids", "a") as f:  # run.sh's trap kills these if we cannot
        f.write(f"{proc.pid}\n")
    return proc


def cleanup() -> None:
    for proc in PROCS:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 8
    for proc in PROCS:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    PROCS.clear()
    (OUT / "pids").unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """VmRSS of pid plus all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(ppid, []).append(int(d))
    total_kb, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def post(req: Request, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", req.port, timeout=timeout)
    try:
        conn.request(
            "POST",
            req.path,
            json.dumps(req.body),
            {"Content-Type": "application/json", **req.headers},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def probe(req: Request) -> str | None:
    """None if the request answers 2xx, else why not."""
    try:
        status, body = post(req)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if 200 <= status < 300 else f"HTTP {status}: {body[:120].decode(errors='replace')}"


def wait_first_served(proc: subprocess.Popen, t0: float, req: Request) -> float:
    """Seconds from process start to the first 2xx answer, polling every 20 ms."""
    answered_at: float | None = None
    last = ""
    while time.monotonic() - t0 < START_TIMEOUT_S:
        if proc.poll() is not None:
            why = last or "no answer"
            raise RuntimeError(f"exited with {proc.returncode} before serving ({why})")
        try:
            status, body = post(req, timeout=5)
            if 200 <= status < 300:
                return time.monotonic() - t0
            last = f"HTTP {status}: {body[:160].decode(errors='replace')}"
            answered_at = answered_at or time.monotonic()
            if time.monotonic() - answered_at > 5:  # it serves, but not this request
                raise RuntimeError(last)
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.02)
    raise RuntimeError(f"not serving after {START_TIMEOUT_S:.0f} s ({last})")


# ------------------------------------------------------------------------ gateways


@dataclass
class Gateway:
    name: str
    port: int = 0
    proc: subprocess.Popen | None = None
    first_served_s: float = math.nan
    rss_mb: float = math.nan
    version: str = "?"
    na: str | None = None  # why it is not measured


def _install_failure(stem: str) -> str:
    marker = OUT / f"{stem}-install.failed"
    return marker.read_text().strip() if marker.exists() else "not installed"


def start_gateway(gw: Gateway, argv: list[str], env: dict[str, str], first: Request) -> None:
    t0 = time.monotonic()
    gw.proc = spawn(gw.name, argv, env)
    try:
        gw.first_served_s = wait_first_served(gw.proc, t0, first)
    except RuntimeError as exc:
        gw.na = f"{exc} (see bench/out/{gw.name}.log)"
        print(f"  {gw.name}: n/a -- {gw.na}", flush=True)
        return
    print(f"  {gw.name}: first request served {gw.first_served_s:.2f} s after start", flush=True)


def chatd_toml(
    up: int, ledger: str = "on", callers: bool = False, chatd_extra: str = "", tables: str = ""
) -> str:
    def provider(name: str, kind: str, base: str, key: bool) -> str:
        extra = 'key_env = "BENCH_OAI_KEY"\n' if key else ""
        return (
            f'[chatd.providers.{name}]\nkind = "{kind}"\n'
            f'base_url = "http://127.0.0.1:{up}{base}"\n{extra}\n'
        )

    usage = "" if ledger == "on" else 'usage_db = ""\n'  # on: the default SQLite file
    limits = ""
    if callers:  # limits high enough never to refuse: the bench measures their cost
        limits = (
            '[chatd.callers.bench]\ntoken_env = "BENCH_CALLER_TOKEN"\n'
            "rpm = 100000000\ntpm = 1000000000\nbudget_usd = 1000000.0\n\n"
            '[chatd.prices]\n"*" = { input = 1.0, output = 2.0 }\n\n'
        )
    return (
        '# generated by bench/run.py\n[chatd]\ndefault_provider = "ollama"\n'
        + usage
        + chatd_extra
        + "\n"
        + limits
        + tables
        + provider("ollama", "ollama", "", False)
        + provider("benchoai", "openai", "/v1", True)
        + provider("ollstream", "ollama", "/stream", False)
        + provider("oaistream", "openai", "/stream/v1", True)
    )


def litellm_yaml(up: int) -> str:
    def entry(name: str, base: str) -> str:
        return (
            f"  - model_name: {name}\n    litellm_params:\n      model: openai/gpt-4o-mini\n"
            f"      api_base: http://127.0.0.1:{up}{base}\n      api_key: {OAI_KEY}\n"
        )

    return (
        "# generated by bench/run.py\nmodel_list:\n"
        + entry("gpt-4o-mini", "/v1")
        + entry("gpt-4o-mini-stream", "/stream/v1")
        + "  - model_name: text-embedding-3-small\n    litellm_params:\n"
        f"      model: openai/text-embedding-3-small\n      api_base: http://127.0.0.1:{up}/v1\n"
        f"      api_key: {OAI_KEY}\n"
        + "litellm_settings:\n  telemetry: false\n  drop_params: true\n"
        "  turn_off_message_logging: true\n  set_verbose: false\n"
        "general_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n"
        "  disable_spend_logs: true\n  disable_error_logs: true\n"
        "  background_health_checks: false\n"
    )


def start_chatd_variants(gws: dict[str, Gateway], up: int, first: dict[str, Request]) -> None:
    """chatd with the response cache on (and a mock provider), chatd with redis_url set
    to a redis-server of its own (no cache, no callers): the shared state's rows; and the
    full gateway: a caller with rpm/tpm/budget limits and prices, the ledger (SQLite),
    redis_url and the cache on, every request a miss (its own body)."""
    argv = ["--log-level", "warning"]
    env = {"BENCH_OAI_KEY": OAI_KEY}
    mock = '[chatd.providers.mock]\nkind = "mock"\n\n'
    g = gws["chatd-cache"]
    if g.na:  # not selected (--only)
        pass
    elif not os.access(CHATD, os.X_OK):
        g.na = f"{CHATD} not found"
    else:
        (OUT / "chatd-cache.toml").write_text(
            chatd_toml(up, tables="[chatd.cache]\nenabled = true\n\n" + mock)
        )
        start_gateway(
            g,
            [str(CHATD), "--config", str(OUT / "chatd-cache.toml"), "--bind",
             f"127.0.0.1:{g.port}", *argv],
            env,
            first["chatd-cache"],
        )  # fmt: skip
    for name in ("chatd-redis", "chatd-full"):
        g = gws[name]
        if g.na:  # not selected (--only)
            continue
        redis = shutil.which("redis-server")
        if not os.access(CHATD, os.X_OK) or redis is None:
            g.na = "redis-server not found" if redis is None else f"{CHATD} not found"
            continue
        port = free_port()  # each its own redis-server
        spawn(f"redis-{name}", [redis, "--port", str(port), "--bind", "127.0.0.1", "--save",
                                "", "--appendonly", "no", "--dir", str(OUT)])  # fmt: skip
        redis_url = f'redis_url = "redis://127.0.0.1:{port}/0"\n'
        if name == "chatd-redis":
            toml = chatd_toml(up, chatd_extra=redis_url)
        else:  # the full gateway: a caller with limits, prices, its own ledger, the cache
            ledger = OUT / "chatd-full-usage.sqlite3"
            ledger.unlink(missing_ok=True)
            toml = chatd_toml(
                up,
                callers=True,
                chatd_extra=redis_url + f'usage_db = "sqlite:///{ledger}"\n',
                tables="[chatd.cache]\nenabled = true\n\n",
            )
        (OUT / f"{name}.toml").write_text(toml)
        start_gateway(
            g,
            [str(CHATD), "--config", str(OUT / f"{name}.toml"), "--bind",
             f"127.0.0.1:{g.port}", *argv],
            {**env, "BENCH_CALLER_TOKEN": CHATD_TOKEN},
            first[name],
        )  # fmt: skip


def read_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


# -------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    gateway: str
    req: Request
    baseline: str = ""  # the direct target whose p50 / TTFT is subtracted
    family: str = "chat"  # what the ratios compare against: LiteLLM's and Portkey's same route
    ndjson: bool = False  # streams only
    na: str | None = None
    runs: dict[int, list[WrkResult]] = field(default_factory=dict)


def build_targets(up: int, gws: dict[str, Gateway]) -> tuple[list[Target], list[Target]]:
    d_oll, d_oai = "direct nginx /api/chat", "direct nginx /v1/chat/completions"
    oai_body = {"model": "gpt-4o-mini", "messages": MSGS}
    bearer = {"Authorization": f"Bearer {OAI_KEY}"}
    c, lt, pk = gws["chatd"].port, gws["litellm"].port, gws["portkey"].port
    cc, cr, cf = gws["chatd-cache"].port, gws["chatd-redis"].port, gws["chatd-full"].port
    full_auth = {"Authorization": f"Bearer {CHATD_TOKEN}"}
    lt_auth = {"Authorization": f"Bearer {os.environ['LITELLM_MASTER_KEY']}"}

    def pk_hdrs(base: str) -> dict[str, str]:
        return {
            **bearer,
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{up}{base}",
        }

    def chat(model: str, **extra: object) -> dict:
        return {"model": model, "messages": MSGS, **extra}

    plain = [
        Target(d_oll, "direct", Request(up, "/api/chat", chat("bench", stream=False))),
        Target(d_oai, "direct", Request(up, "/v1/chat/completions", oai_body, bearer)),
        Target(
            "chatd /v1/chat (ollama kind)",
            "chatd",
            Request(c, "/v1/chat", chat("qwen3.5:latest"), CHATD_AUTH),
            d_oll,
        ),
        Target(
            "chatd /v1/chat (openai kind)",
            "chatd",
            Request(c, "/v1/chat", chat("benchoai/gpt-4o-mini"), CHATD_AUTH),
            d_oai,
        ),
        Target(
            "chatd /v1/chat/completions (openai kind)",
            "chatd",
            Request(c, "/v1/chat/completions", chat("benchoai/gpt-4o-mini"), CHATD_AUTH),
            d_oai,
        ),
        Target(
            "chatd /v1/messages (openai kind)",
            "chatd",
            Request(c, "/v1/messages", {**chat("benchoai/gpt-4o-mini"), "max_tokens": 64}),
            d_oai,
        ),
        # a cache hit (every request after the first) against the mock kind
        # (no upstream at all), and the hot path with redis_url set but no cache or callers
        Target(
            "chatd /v1/chat (mock kind, not cached)",
            "chatd-cache",
            Request(cc, "/v1/chat", chat("mock/bench", temperature=0.5)),
        ),
        Target(
            "chatd /v1/chat cache hit (in process)",
            "chatd-cache",
            Request(cc, "/v1/chat", chat("qwen3.5:latest")),
            d_oll,
        ),
        Target(
            "chatd /v1/chat with redis_url, no cache (ollama kind)",
            "chatd-redis",
            Request(cr, "/v1/chat", chat("qwen3.5:latest")),
            d_oll,
        ),
        Target(
            FULL,
            "chatd-full",
            Request(
                cf,
                "/v1/chat",
                {
                    "model": "qwen3.5:latest",
                    "messages": [{"role": "user", "content": f"hi {VARY}"}],
                },
                full_auth,
                vary=True,
            ),
            d_oll,
        ),  # fmt: skip
        Target(
            "litellm /v1/chat/completions",
            "litellm",
            Request(lt, "/v1/chat/completions", oai_body, lt_auth),
            d_oai,
        ),
        Target(
            "portkey /v1/chat/completions",
            "portkey",
            Request(pk, "/v1/chat/completions", oai_body, pk_hdrs("/v1")),
            d_oai,
        ),
    ]
    # Embeddings (docs/http-api.md): one string in, one 768-dimension float vector back.
    e_oll, e_oai = "direct nginx /api/embed", "direct nginx /v1/embeddings"
    text = "the quick brown fox"
    emb_body = {"model": "text-embedding-3-small", "input": text, "encoding_format": "float"}
    plain += [
        Target(
            e_oll,
            "direct",
            Request(up, "/api/embed", {"model": "bench", "input": [text]}),
            "",
            "embed",
        ),
        Target(e_oai, "direct", Request(up, "/v1/embeddings", emb_body, bearer), "", "embed"),
        Target(
            "chatd /v1/embeddings (ollama kind)",
            "chatd",
            Request(c, "/v1/embeddings", {**emb_body, "model": "nomic-embed-text"}),
            e_oll,
            "embed",
        ),
        Target(
            "chatd /v1/embeddings (openai kind)",
            "chatd",
            Request(c, "/v1/embeddings", {**emb_body, "model": "benchoai/text-embedding-3-small"}),
            e_oai,
            "embed",
        ),
        Target(
            "litellm /v1/embeddings",
            "litellm",
            Request(lt, "/v1/embeddings", emb_body, lt_auth),
            e_oai,
            "embed",
        ),
    ]
    s_oll, s_oai = "direct nginx /stream/api/chat", "direct nginx /stream/v1/chat/completions"
    on = {"stream": True}
    streams = [
        Target(s_oll, "direct", Request(up, "/stream/api/chat", chat("bench", **on)), ndjson=True),
        Target(
            s_oai, "direct", Request(up, "/stream/v1/chat/completions", {**oai_body, **on}, bearer)
        ),
        Target(
            "chatd /v1/chat stream (ollama kind)",
            "chatd",
            Request(c, "/v1/chat", chat("ollstream/bench", **on), CHATD_AUTH),
            s_oll,
        ),
        Target(
            "chatd /v1/chat stream (openai kind)",
            "chatd",
            Request(c, "/v1/chat", chat("oaistream/bench", **on), CHATD_AUTH),
            s_oai,
        ),
        Target(
            "chatd /v1/chat/completions stream",
            "chatd",
            Request(c, "/v1/chat/completions", chat("oaistream/bench", **on), CHATD_AUTH),
            s_oai,
        ),
        Target(
            "chatd /v1/messages stream",
            "chatd",
            Request(c, "/v1/messages", {**chat("oaistream/bench", **on), "max_tokens": 64}),
            s_oai,
        ),
        Target(
            "litellm stream",
            "litellm",
            Request(lt, "/v1/chat/completions", chat("gpt-4o-mini-stream", **on), lt_auth),
            s_oai,
        ),
        Target(
            "portkey stream",
            "portkey",
            Request(pk, "/v1/chat/completions", {**oai_body, **on}, pk_hdrs("/stream/v1")),
            s_oai,
        ),
    ]
    for t in plain + streams:
        t.na = gws[t.gateway].na if t.gateway in gws else None
    return plain, streams


# --------------------------------------------------------------------------- report


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:,.{nd}f}"


def med_run(t: Target, conc: int) -> WrkResult | None:
    runs = sorted(t.runs.get(conc, []), key=lambda r: r.rps)
    return runs[len(runs) // 2] if runs else None


def report(
    plain: list[Target],
    streams: list[Target],
    sstats: dict[str, StreamStats],
    gws: dict[str, Gateway],
    facts: list[str],
    args: argparse.Namespace,
) -> str:
    by = {t.name: t for t in plain}
    lines = [
        "# chatd benchmark results",
        "",
        f"Generated by `bash bench/run.sh{' --quick' if args.quick else ''}"
        f"{' --ledger off' if args.ledger == 'off' else ''}"
        f"{' --callers' if args.callers else ''}`"
        " -- do not edit by hand.",
        "",
        *facts,
        "",
        f"## Non-streaming (wrk, {args.secs} s per run, median of {args.reps} "
        "run(s) by req/s; errors summed over runs)",
        "",
        "| target | c | req/s | p50 ms | p99 ms | added p50 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for conc in (1, 32):
        for t in plain:
            r = med_run(t, conc)
            if t.na or r is None:
                lines.append(f"| {t.name} | {conc} | n/a | | | | {t.na or 'not run'} |")
                continue
            base = med_run(by[t.baseline], conc) if t.baseline else None
            added = r.p50_ms - base.p50_ms if base else math.nan
            errs = sum(x.errors for x in t.runs[conc])
            lines.append(
                f"| {t.name} | {conc} | {fmt(r.rps, 0)} | {fmt(r.p50_ms)} | "
                f"{fmt(r.p99_ms)} | {fmt(added) if base else '-'} | "
                f"{'**' + str(errs) + '**' if errs else 0} |"
            )

    def rps(name: str) -> float:
        r = med_run(by[name], 32) if name in by else None
        return r.rps if r and not by[name].na else math.nan

    peers = {  # family -> (LiteLLM's, Portkey's) target of the same route
        "chat": ("litellm /v1/chat/completions", "portkey /v1/chat/completions"),
        "embed": ("litellm /v1/embeddings", ""),
    }
    lines += [
        "",
        "## chatd ratios (c=32 req/s) and added latency (c=1 p50 over direct)",
        "",
        "| chatd target | ÷ LiteLLM | ÷ Portkey | added p50 ms at c=1 |",
        "|---|---:|---:|---:|",
    ]
    for t in plain:
        if not t.gateway.startswith("chatd") or not t.baseline:
            continue
        r1, b1 = med_run(t, 1), med_run(by[t.baseline], 1)
        added = r1.p50_ms - b1.p50_ms if (r1 and b1 and not t.na) else math.nan
        lt, pk = (rps(peer) for peer in peers[t.family])
        lines.append(
            f"| {t.name} | {fmt(rps(t.name) / lt, 1)}× | {fmt(rps(t.name) / pk, 2)}× "
            f"| {fmt(added)} |"
        )
    plain_rps = rps("chatd /v1/chat (ollama kind)")
    hit = rps("chatd /v1/chat cache hit (in process)")
    mock = rps("chatd /v1/chat (mock kind, not cached)")
    redis = rps("chatd /v1/chat with redis_url, no cache (ollama kind)")
    lines += [
        "",
        "## Shared state and cache (c=32)",
        "",
        "| | req/s | ratio |",
        "|---|---:|---:|",
        f"| cache hit ÷ mock kind | {fmt(hit, 0)} | {fmt(hit / mock, 2)} |",
        f"| redis_url set ÷ not set (ollama kind) | {fmt(redis, 0)} "
        f"| {fmt(redis / plain_rps, 3)} |",
    ]
    full, portkey = rps(FULL), rps("portkey /v1/chat/completions")
    f1, b1 = med_run(by[FULL], 1), med_run(by["direct nginx /api/chat"], 1)
    full_added = f1.p50_ms - b1.p50_ms if f1 and b1 and not by[FULL].na else math.nan
    lines += [
        "",
        "## The full gateway (goal: ≥ 2× Portkey's req/s at c=32, added p50 < 1 ms at c=1)",
        "",
        "| | req/s c=32 | ÷ Portkey | ÷ chatd bare (ollama kind) | added p50 ms c=1 |",
        "|---|---:|---:|---:|---:|",
        f"| {FULL} | {fmt(full, 0)} | {fmt(full / portkey, 2)}× "
        f"| {fmt(full / plain_rps, 2)} | {fmt(full_added)} |",
    ]
    lines += [
        "",
        "## Gateways",
        "",
        "| gateway | version | start → first served s | RSS after run MB | note |",
        "|---|---|---:|---:|---|",
    ]
    for g in gws.values():
        lines.append(
            f"| {g.name} | {g.version} | {fmt(g.first_served_s)} | {fmt(g.rss_mb, 0)} "
            f"| {g.na or ''} |"
        )
    lines += [
        "",
        f"## Streaming ({args.streams} sequential requests per target, interleaved; "
        "20 content chunks per stream)",
        "",
        "| target | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | chunks/s p50 "
        "| events/stream | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in streams:
        st = sstats.get(t.name)
        if t.na or st is None or not st.ttft_ms:
            why = t.na or (st.last_error[:100] if st else "not run")
            if not t.na and t.gateway != "direct":
                why += f" (see bench/out/{t.gateway}.log)"
            lines.append(f"| {t.name} | n/a | | | | | {why} |")
            continue
        bst = sstats.get(t.baseline)
        added = median(st.ttft_ms) - median(bst.ttft_ms) if bst and bst.ttft_ms else math.nan
        errs = f"**{st.errors}** ({st.last_error[:60]})" if st.errors else "0"
        lines.append(
            f"| {t.name} | {fmt(median(st.ttft_ms))} | "
            f"{fmt(percentile(st.ttft_ms, 99))} | {fmt(added) if t.baseline else '-'} | "
            f"{fmt(median(st.chunks_per_s), 0)} | {median(st.events):.0f} | {errs} |"
        )
    return "\n".join(lines) + "\n"


def machine_facts(gws: dict[str, Gateway]) -> list[str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    mem = next(
        (
            int(ln.split()[1])
            for ln in Path("/proc/meminfo").read_text().splitlines()
            if ln.startswith("MemTotal")
        ),
        0,
    )
    return [
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M UTC}",
        f"- machine: nproc {os.cpu_count()}, {cpu}, {mem / 1048576:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"- load: {read_version(['wrk', '-v'])}; upstream: {read_version(['nginx', '-v'])}"
        " (1 worker, static bodies)",
        "- every gateway: one process / one worker; all share the same 2 cores with wrk and nginx",
        *[f"- {g.name}: {g.version}" for g in gws.values()],
    ]


# ----------------------------------------------------------------------------- main


def select(targets: list[Target], only: str) -> set[str]:
    """The names of the targets to run: all, or those matching `--only` and their baselines."""
    words = [w.strip() for w in only.split(",") if w.strip()]
    if not words:
        return {t.name for t in targets}
    chosen = {t.name for t in targets if any(w in t.name for w in words)}
    return chosen | {t.baseline for t in targets if t.name in chosen and t.baseline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1-minute smoke of the harness")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated substrings: run only the targets whose name holds one (and "
        "their direct baselines), e.g. --only embeddings; the table goes to "
        "bench/out/RESULTS-only.md, not bench/RESULTS.md",
    )
    ap.add_argument(
        "--ledger",
        choices=["on", "off"],
        default="on",
        help="chatd's usage ledger: on (the default SQLite file, as shipped) or off",
    )
    ap.add_argument(
        "--callers",
        action="store_true",
        help="chatd with a caller (token, rpm/tpm/budget limits, prices) on every request",
    )
    args = ap.parse_args()
    if args.callers:
        CHATD_AUTH["Authorization"] = f"Bearer {CHATD_TOKEN}"
    args.secs, args.reps, args.streams = (2, 1, 30) if args.quick else (8, 3, 200)
    OUT.mkdir(exist_ok=True)
    os.environ.setdefault("LITELLM_MASTER_KEY", "sk-" + secrets.token_hex(24))

    up = free_port()
    conf = OUT / "nginx.conf"
    conf.write_text(nginx_config(OUT, up))
    print(f"upstream: nginx on 127.0.0.1:{up}", flush=True)
    ng = spawn(
        "nginx", ["nginx", "-p", str(OUT), "-e", str(OUT / "nginx-error.log"), "-c", str(conf)]
    )
    wait_first_served(ng, time.monotonic(), Request(up, "/api/chat", {}))

    names = ("chatd", "chatd-cache", "chatd-redis", "chatd-full", "litellm", "portkey")
    gws = {name: Gateway(name, port=free_port()) for name in names}
    chatd_py = CHATD.parent / "python"
    chatd_src = read_version(
        [str(chatd_py), "-c", "import chatd, os; print(os.path.dirname(chatd.__file__))"]
    )
    gws["chatd"].version = (
        read_version(
            [
                str(chatd_py),
                "-c",
                "import importlib.metadata as m; print('chatd', m.version('chatd'))",
            ]
        )
        + " @ "
        + read_version(["git", "-C", chatd_src, "describe", "--always", "--dirty"])
        + (f" ({CHATD})" if os.environ.get("BENCH_CHATD") else "")
    )
    gws["litellm"].version = read_version(
        [
            str(BENCH / ".venv-litellm/bin/python"),
            "-c",
            "import importlib.metadata as m; print('litellm', m.version('litellm'))",
        ]
    )
    try:
        pj = json.loads((PORTKEY_PKG / "package.json").read_text())
        node = read_version(["node", "-v"])
        gws["portkey"].version = f"@portkey-ai/gateway {pj['version']} (node {node})"
    except (OSError, ValueError):
        pass
    plain, streams = build_targets(up, gws)
    selected = select(plain + streams, args.only)
    # each gateway's first selected plain target; a gateway with none is not started
    first = {t.gateway: t.req for t in reversed(plain) if t.name in selected}
    for g in gws.values():
        if g.name not in first:
            g.na = "not selected (--only)"

    print("starting gateways (time to first served request):", flush=True)
    g = gws["chatd"]
    if g.na:
        pass
    elif not os.access(CHATD, os.X_OK):
        g.na = f"{CHATD} not found"
    else:
        (OUT / "chatd.toml").write_text(chatd_toml(up, args.ledger, args.callers))
        (OUT / "chatd-usage.sqlite3").unlink(missing_ok=True)  # each run starts empty
        start_gateway(
            g,
            [
                str(CHATD),
                "--config",
                str(OUT / "chatd.toml"),
                "--bind",
                f"127.0.0.1:{g.port}",
                "--log-level",
                "warning",
            ],
            {"BENCH_OAI_KEY": OAI_KEY, "BENCH_CALLER_TOKEN": CHATD_TOKEN},
            first["chatd"],
        )
    start_chatd_variants(gws, up, first)
    g = gws["litellm"]
    if g.na:
        pass
    elif not os.access(LITELLM, os.X_OK):
        g.na = _install_failure("litellm")
    else:
        (OUT / "litellm.yaml").write_text(litellm_yaml(up))
        start_gateway(
            g,
            [
                str(LITELLM),
                "--config",
                str(OUT / "litellm.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(g.port),
                "--num_workers",
                "1",
            ],
            {
                "LITELLM_LOG": "ERROR",
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_MODE": "PRODUCTION",
                "LITELLM_TELEMETRY": "False",
                "DISABLE_ADMIN_UI": "True",
                "NO_DOCS": "True",
                "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
            },
            first["litellm"],
        )
    g = gws["portkey"]
    if g.na:
        pass
    elif not PORTKEY_JS.exists():
        g.na = _install_failure("portkey")
    else:
        start_gateway(
            g,
            ["node", str(PORTKEY_JS), f"--port={g.port}", "--headless"],
            {"NODE_ENV": "production"},
            first["portkey"],
        )
    for t in plain + streams:
        t.na = gws[t.gateway].na if t.gateway in gws else None
        if t.name not in selected:
            t.na = "not selected (--only)"

    live = [t for t in plain if not t.na]
    for t in live:  # a route that is missing (e.g. 404) is n/a, not a crash
        if (why := probe(t.req)) is not None:
            t.na = why
    live = [t for t in plain if not t.na]
    scripts = {t.name: write_lua(t.req, OUT / f"wrk-{i}.lua") for i, t in enumerate(live)}
    print(
        f"warm-up, then {args.reps} x 2 concurrencies x {len(live)} targets x {args.secs} s",
        flush=True,
    )
    # The harness's own probes may ask the full gateway one question twice: count from here.
    hits = {t.name: cache_hits(t.req.port) for t in live if t.name == FULL}
    for t in live:
        run_wrk(t.req, scripts[t.name], 8, 1)
    for rep in range(args.reps):
        for conc in (1, 32):
            for t in live:  # round-robin, so drift hits every target alike
                r = run_wrk(t.req, scripts[t.name], conc, args.secs)
                t.runs.setdefault(conc, []).append(r)
                print(
                    f"  run {rep + 1} c={conc:<2} {t.name:42} {r.rps:9.0f} req/s "
                    f"p50 {r.p50_ms:7.2f} ms p99 {r.p99_ms:7.2f} ms errors {r.errors}",
                    flush=True,
                )

    for name, before in hits.items():
        port = next(t.req.port for t in live if t.name == name)
        if cache_hits(port) > before:
            raise RuntimeError(f"{name}: {cache_hits(port) - before:.0f} cache hits under wrk")
    print(f"streaming: {args.streams} requests per target", flush=True)
    stream_live = {t.name: (t.req, t.ndjson) for t in streams if not t.na}
    sstats = stream_bench(stream_live, args.streams)

    for g in gws.values():
        if g.proc is not None and g.proc.poll() is None:
            g.rss_mb = tree_rss_mb(g.proc.pid)
    text = report(plain, streams, sstats, gws, machine_facts(gws), args)
    results = OUT / "RESULTS-only.md" if args.only else BENCH / "RESULTS.md"
    results.write_text(text)
    print("\n" + text)
    print(f"written to {results}")
    return 0


def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        cleanup()
