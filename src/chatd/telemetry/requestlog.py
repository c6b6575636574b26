"""The one log line per request (docs/operations.md), and the formats chatd's log lines take.

A request's line holds facts about it only — id, route, status, model names, timings,
token counts, attempts, error type — never message content and never a header's value
(but the request ID). Lines are JSON by default (`--log-format json`), one object per
line on stderr; `--log-format text` is for people reading a terminal.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.types import Scope

REQUEST_LOGGER = "chatd.requests"
CLIP = 200  # model names and paths are the caller's: keep a line short whatever it sent
LOG_FORMATS = ("json", "text")
OPTIONAL_FACTS = ("endpoint", "caller", "cost_usd", "cost_source", "cache", "trace_id")


def request_line(scope: Scope, status: int, seconds: float) -> dict[str, Any]:
    """The request's log fields, from its ASGI scope and what the routes `note`d."""
    state = scope.get("state") or {}
    facts = state.get("log") or {}
    line = {
        "request_id": state.get("request_id"),
        "method": scope.get("method"),
        "route": clip(scope.get("path")),
        "status": status,
        "latency_ms": round(seconds * 1000, 1),
        "model": clip(facts.get("model")),
        "provider": facts.get("provider"),
        "upstream_model": clip(facts.get("upstream_model")),
        "input_tokens": facts.get("input_tokens"),
        "output_tokens": facts.get("output_tokens"),
        "ttft_ms": facts.get("ttft_ms"),
        "attempts": facts.get("attempts"),
        "error": facts.get("error"),
    }
    for key in OPTIONAL_FACTS:  # only when the feature that notes them is on
        value = facts.get(key)
        if value is not None:
            line[key] = value
    return line


def clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > CLIP:
        return value[: CLIP - 1] + "…"
    return value


def log_request(logger: logging.Logger, line: dict[str, Any]) -> None:
    """Hand one request line to `logger` at INFO (cheaper than `logger.info`: no caller
    lookup, no message formatting)."""
    record = logging.LogRecord(logger.name, logging.INFO, "", 0, "request", None, None)
    record.request = line
    logger.handle(record)


def timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: a request's fields, or time/level/logger/message."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "request", None)
        if line is not None:
            return orjson.dumps({"time": timestamp(record.created), **line}).decode()
        entry: dict[str, Any] = {
            "time": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time METHOD route status latency key=value ...` for requests; `time LEVEL message`."""

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "request", None)
        stamp = timestamp(record.created)
        if line is None:
            text = f"{stamp} {record.levelname} {record.getMessage()}"
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            return text
        head = f"{stamp} {line['method']} {line['route']} {line['status']} {line['latency_ms']}ms"
        rest = " ".join(
            f"{key}={value}"
            for key, value in line.items()
            if value is not None and key not in ("method", "route", "status", "latency_ms")
        )
        return f"{head} {rest}"


def formatter(log_format: str) -> logging.Formatter:
    return TextFormatter() if log_format == "text" else JsonFormatter()
