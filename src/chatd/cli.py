"""The `chatd` command: serve, or `check-config` (docs/getting-started.md, docs/operations.md)."""

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

from chatd import __version__
from chatd.check_config import describe_settings
from chatd.config import ConfigError, Settings, load_settings, parse_bind
from chatd.state.admin_auth import admin_token
from chatd.state.auth import (
    check_auth_config,
    check_exposure,
    is_loopback,
    serves_open,
)
from chatd.state.callers import Callers
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
        "command", nargs="?", choices=["serve", "check-config", "usage", "callers"], default="serve"
    )
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["callers"]:  # live callers, on the database directly
        from chatd.callers_cli import main as callers_main

        return callers_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = load_checked(args.config)  # exactly what a reload checks
        if args.bind:
            try:
                parse_bind(args.bind)
            except ValueError as exc:
                raise ConfigError(f"--bind: {exc}") from None
        if args.workers < 1:
            raise ConfigError("--workers: must be 1 or more")
        if args.command != "usage":  # an open gateway on the network: docs/exposing.md
            from chatd.callers_cli import live_callers_exist

            host = parse_bind(args.bind or settings.chatd.bind)[0]
            check_exposure(settings, host, lambda: live_callers_exist(settings))
    except ConfigError as exc:
        print(refusal_line(exc), file=sys.stderr)
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


def load_checked(path: str | None) -> Settings:
    """The config file read and checked as start-up (and a reload) does; raises ConfigError."""
    settings = load_settings(path)
    check_auth_config(settings)
    admin_token(settings)
    callers = Callers.from_settings(settings)
    if callers is not None:
        callers.check()
    return settings


def refusal_line(error: ConfigError) -> str:
    """The one line a bad config gets, from `check-config` and from a reload alike."""
    return f"chatd: config error: {error}"


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
    from chatd.reloading import hold_sighup
    from chatd.server import Doorway

    bind = args.bind or settings.chatd.bind
    host, port = parse_bind(bind)
    configure_logging(args.log_level, args.log_format)
    if serves_open(settings) and not is_loopback(host):
        logging.getLogger("chatd").warning(
            "serving %s with authentication off (allow_unauthenticated = true): anyone who "
            "reaches it spends your providers' keys",
            bind,
        )
    common: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": args.log_level,
        "access_log": False,  # chatd writes its own one-line-per-request log
        "timeout_graceful_shutdown": settings.chatd.shutdown_grace_secs,
        "server_header": False,
        "timeout_keep_alive": settings.chatd.keep_alive_secs,
        "log_config": None,  # uvicorn's loggers write through chatd's (configure_logging)
        # What "auto" picks when installed (uvicorn[standard]); said outright so that a
        # missing one fails loudly instead of quietly serving slower. The HTTP protocol
        # is httptools' with chatd's deadlines and limits (server.py).
        "loop": "uvloop",
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
            http = Doorway.from_settings(settings).protocol()  # a copy for each worker
            config = uvicorn.Config(
                "chatd.cli:app_factory", factory=True, workers=args.workers, http=http, **common
            )
            workers_supervisor()(config, sockets=[config.bind_socket()]).run()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    else:
        exit_zero_after_drain()
        hold_sighup()  # from here: a SIGHUP before the app's handler is in is kept
        app = create_app(settings, reload_signal=True)
        doorway = Doorway.from_settings(settings, app.state.operations.metrics.registry)
        settle_heap()
        uvicorn.run(app, http=doorway.protocol(), **common)
    return 0


def workers_supervisor() -> type:
    """uvicorn's `--workers` parent, but SIGHUP is passed on to every worker (each
    reloads its config, docs/reload.md) instead of restarting them all."""
    from uvicorn.supervisors import Multiprocess

    class Workers(Multiprocess):  # type: ignore[misc]
        def handle_hup(self) -> None:
            for process in self.processes:
                if process.pid is not None:
                    try:
                        os.kill(process.pid, signal.SIGHUP)
                    except ProcessLookupError:  # it just died; its replacement reads anew
                        pass

    return Workers


def exit_zero_after_drain() -> None:
    """SIGTERM → uvicorn drains in-flight requests and streams (up to shutdown_grace_secs),
    then re-raises the signal it caught under the handler that was there before it ran.
    Make that handler a no-op so the drained process exits 0, not -15."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def app_factory() -> Any:
    """Used by `--workers N`: every worker loads the settings itself."""
    from chatd.app import create_app
    from chatd.reloading import hold_sighup

    configure_logging(os.environ.get(LOG_LEVEL_ENV, "info"), os.environ.get(LOG_FORMAT_ENV, "json"))
    hold_sighup()  # a SIGHUP before this worker's handler is in is kept, then acted on
    app = create_app(load_settings(), reload_signal=True)
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
