"""The `chatd` command: serve, or `check-config` (SPEC §5, §9)."""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import logging.handlers
import os
import queue
import shutil
import signal
import sys
import tempfile
from typing import Any

from chatd.config import ConfigError, Settings, load_settings, parse_bind, resolve_key
from chatd.state.auth import auth_tokens, check_auth_config
from chatd.state.callers import Callers
from chatd.state.shared import describe_url
from chatd.telemetry.requestlog import LOG_FORMATS, formatter

CONFIG_ENV = "LAKEHOUSE_CONFIG"
# How `--workers N` tells the worker processes what the command line said.
LOG_LEVEL_ENV = "CHATD_LOG_LEVEL"
LOG_FORMAT_ENV = "CHATD_LOG_FORMAT"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd", description="One address for every LLM: serve chatd, or check its config."
    )
    parser.add_argument(
        "command", nargs="?", choices=["serve", "check-config", "usage"], default="serve"
    )
    parser.add_argument("--config", metavar="PATH", help="lakehouse.toml to read")
    parser.add_argument("--bind", metavar="HOST:PORT", help="listen address (beats CHATD_BIND)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        type=str.lower,
    )
    parser.add_argument(
        "--log-format",
        default="json",
        choices=LOG_FORMATS,
        type=str.lower,
        help="stderr log lines: one JSON object each (default), or text for a terminal",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")
    usage = parser.add_argument_group("chatd usage (reads the ledger's database directly)")
    usage.add_argument("--since", metavar="DATE", help="ISO date/datetime, UTC (default: 1st)")
    usage.add_argument("--until", metavar="DATE", help="ISO date/datetime, UTC (default: now)")
    usage.add_argument("--caller", metavar="NAME", help="only this caller")
    usage.add_argument(
        "--group-by", default="caller", metavar="KEYS", help="caller,model,provider,day"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        check_auth_config(settings)
        callers = Callers.from_settings(settings)
        if callers is not None:
            callers.check()
        if args.bind:
            try:
                parse_bind(args.bind)
            except ValueError as exc:
                raise ConfigError(f"--bind: {exc}") from None
        if args.workers < 1:
            raise ConfigError("--workers: must be 1 or more")
    except ConfigError as exc:
        print(f"chatd: config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        try:
            print(describe_settings(settings), flush=True)
        except BrokenPipeError:  # `chatd check-config | head`: the reader left, that is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.command == "usage":
        return print_usage(settings, args)
    return serve(settings, args)


def print_usage(settings: Settings, args: argparse.Namespace) -> int:
    """`chatd usage`: GET /v1/usage's grouping, as a table, from the database itself."""
    import asyncio
    import time

    from chatd.state.usage import open_backend
    from chatd.state.usage.report import (
        iso,
        month_start,
        parse_group_by,
        parse_time,
        shape,
        table,
        totals,
    )
    from chatd.state.usage.writer import describe

    if not settings.chatd.usage_db:
        print('chatd: the usage ledger is off (usage_db = "")', file=sys.stderr)
        return 2
    if settings.chatd.usage_db.startswith("sqlite://"):
        from chatd.state.usage.sqlite import sqlite_path

        if not os.path.exists(sqlite_path(settings.chatd.usage_db)):
            path = sqlite_path(settings.chatd.usage_db)
            print(f"chatd: usage: no ledger at {path} (has chatd run here?)", file=sys.stderr)
            return 1
    try:
        group_by = parse_group_by(args.group_by)
        now = time.time()
        since = parse_time(args.since) if args.since else month_start(now)
        until = parse_time(args.until) if args.until else now + 0.001
        if since > until:
            raise ValueError("--since: must not be after --until")
    except ValueError as exc:
        print(f"chatd: usage: {exc}", file=sys.stderr)
        return 2

    async def query() -> Any:
        backend = open_backend(settings.chatd.usage_db)
        try:
            return await backend.report(since, until, args.caller, group_by, now)
        finally:
            await backend.aclose()

    try:
        report = asyncio.run(query())
    except Exception as exc:
        print(f"chatd: usage: cannot read the ledger ({describe(exc)})", file=sys.stderr)
        return 1
    rows = shape(report.rows)
    answer = {"since": iso(since), "until": iso(until), "rows": rows, "totals": totals(rows)}
    print(table(answer, group_by))
    if report.rounded:
        print("(rounded to whole UTC days: the rows at an edge are past usage_retention_days)")
    return 0


def serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from chatd.app import create_app

    bind = args.bind or settings.chatd.bind
    host, port = parse_bind(bind)
    configure_logging(args.log_level, args.log_format)
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": False,  # chatd writes its own one-line-per-request log
        "timeout_graceful_shutdown": settings.chatd.shutdown_grace_secs,
        "server_header": False,
        "log_config": None,  # uvicorn's loggers write through chatd's (configure_logging)
        # What "auto" picks when installed (uvicorn[standard]); said outright so that a
        # missing one fails loudly instead of quietly serving slower.
        "loop": "uvloop",
        "http": "httptools",
    }
    if args.workers > 1:
        # Each worker process builds its own app from the same config file, logs as told,
        # and writes its metrics where /metrics (in any worker) can sum them: a fresh
        # directory, so no earlier run's counts leak in.
        if args.config:
            os.environ[CONFIG_ENV] = os.path.abspath(args.config)
        os.environ[LOG_LEVEL_ENV] = args.log_level
        os.environ[LOG_FORMAT_ENV] = args.log_format
        metrics_dir = tempfile.mkdtemp(prefix="chatd-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            uvicorn.run("chatd.cli:app_factory", factory=True, workers=args.workers, **common)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        exit_zero_after_drain()
        app = create_app(settings)
        settle_heap()
        uvicorn.run(app, **common)
    return 0


def exit_zero_after_drain() -> None:
    """SIGTERM → uvicorn drains in-flight requests and streams (up to shutdown_grace_secs),
    then re-raises the signal it caught under the handler that was there before it ran.
    Make that handler a no-op so the drained process exits 0 (SPEC §8), not -15."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def app_factory() -> Any:
    """Used by `--workers N`: every worker loads the settings itself."""
    from chatd.app import create_app

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"), os.environ.get(LOG_FORMAT_ENV, "json"))
    app = create_app(load_settings())
    settle_heap()
    return app


def settle_heap() -> None:
    """Tune the cyclic GC for serving (bench/, c=32: it took 10-16% of the CPU; now ~0).

    Startup leaves ~65k long-lived objects (modules, the app, its schemas): freeze them,
    so a full collection walks only what requests made (unfrozen: ~34 ms a pass). A
    request leaves no reference cycles behind (see providers.base.READ), so a young
    collection every 700 allocations only re-scans in-flight requests: every 10,000.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000)


class OffLoopHandler(logging.handlers.QueueHandler):
    """Hands records to a queue as they are: formatting and the write to stderr happen on
    the listener's thread, so a slow terminal, pipe or disk never stalls the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str, log_format: str = "json") -> None:
    """chatd's lines (one per request, plus warnings and errors) go to stderr, written
    by a background thread; flushed at exit."""
    global _listener
    if _listener is not None:
        _listener.stop()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter(log_format))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, stream)
    _listener.start()
    atexit.register(_listener.stop)
    handler = OffLoopHandler(records)
    logger = logging.getLogger("chatd")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    # Everything else on stderr takes the same format: uvicorn's own lines (start-up,
    # shutdown, its errors), other libraries' warnings, Python's warnings.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        other = logging.getLogger(name)
        other.handlers.clear()
        other.propagate = True
    logging.getLogger("uvicorn").setLevel(level.upper())
    logging.captureWarnings(True)


def describe_settings(settings: Settings) -> str:
    """A readable dump of the resolved config; keys appear only as set/unset."""
    chatd = settings.chatd
    lines = [
        f"config: {settings.source}",
        f"bind: {chatd.bind}",
        f"default_provider: {chatd.default_provider}",
        f"timeout_secs: {chatd.timeout_secs:g}",
        f"max_body_bytes: {chatd.max_body_bytes}",
        f"shutdown_grace_secs: {chatd.shutdown_grace_secs:g}",
        f"upstream_transport: {chatd.upstream_transport}",
        f"app_name: {chatd.app_name}",
        f"app_url: {chatd.app_url or '-'}",
        f"auth: {describe_auth(settings)}",
        f"ui: {'on (/ui)' if chatd.ui else 'off'}",
        f"usage_db: {describe_usage_db(chatd.usage_db)}",
        f"callers: {', '.join(sorted(chatd.callers)) or '-'}",
        f"redis_url: {describe_url(chatd.redis_url) if chatd.redis_url else '- (in process)'}",
        f"cache: {describe_cache(settings)}",
        "models:",
    ]
    lines += [f"  {alias} = {', '.join(targets)}" for alias, targets in settings.models.items()]
    lines.append("providers:")
    for name, cfg in sorted(chatd.providers.items()):
        key = "n/a"
        if cfg.needs_key:
            key = f"{cfg.key_env} {'set' if resolve_key(cfg) else 'unset'}"
        keyed = not cfg.needs_key or key.endswith(" set")
        endpoint_lines = []
        if cfg.endpoints:  # SPEC §10: registered when one endpoint's key resolves
            keyed = False
            for entry in cfg.endpoints:
                key_env = entry.key_env or cfg.key_env
                found = bool(
                    resolve_key(
                        cfg.model_copy(
                            update={"key_env": key_env, "key_file": entry.key_file or cfg.key_file}
                        )
                    )
                )
                keyed = keyed or found or not key_env
                endpoint_key = f"{key_env} {'set' if found else 'unset'}" if key_env else "n/a"
                base_url = entry.base_url or cfg.base_url or "-"
                endpoint_lines.append(
                    f"    endpoint {entry.name or '-'}: base_url={base_url} "
                    f"key={endpoint_key} weight={entry.weight:g}"
                )
        registered = cfg.enabled is True or (cfg.enabled == "auto" and keyed)
        lines.append(
            f"  {name}: kind={cfg.kind} base_url={cfg.base_url or '-'} key={key} "
            f"enabled={str(cfg.enabled).lower()} registered={'yes' if registered else 'no'} "
            f"timeout_secs={chatd.timeout_for(name):g}"
        )
        lines += endpoint_lines
    return "\n".join(lines)


def describe_cache(settings: Settings) -> str:
    cache = settings.chatd.cache
    if not cache.enabled:
        return "off"
    where = "redis" if settings.chatd.redis_url else f"in process, max_bytes={cache.max_bytes}"
    return f"on, ttl_secs={cache.ttl_secs:g}, {where}"


def describe_auth(settings: Settings) -> str:
    """Inbound auth as check-config shows it: on/off and where the tokens come from."""
    tokens = auth_tokens(settings)
    if tokens is None:
        return "off"
    return f"bearer tokens from {settings.chatd.auth_tokens_env} ({'set' if tokens else 'unset'})"


def describe_usage_db(url: str) -> str:
    """The ledger's database, its password (if any) never shown."""
    if not url:
        return "off"
    scheme, _, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"
    return url
