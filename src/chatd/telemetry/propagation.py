"""The `traceparent` an upstream call carries, set by tracing around the call and read by
the providers as they send it (docs/tracing.md). Unset — and free — when tracing is off."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

UPSTREAM_TRACEPARENT: ContextVar[str | None] = ContextVar(
    "chatd_upstream_traceparent", default=None
)
# The traced request's facts (its log line's), operation ("chat" | "embeddings") and its
# server span (telemetry/otlp.py's Span), the parent of its upstream calls' client spans.
TRACED_REQUEST: ContextVar[tuple[dict[str, Any], str, Any] | None] = ContextVar(
    "chatd_traced_request", default=None
)


def with_traceparent(headers: dict[str, str]) -> dict[str, str]:
    """`headers`, plus the current call's `traceparent` when one is being traced."""
    traceparent = UPSTREAM_TRACEPARENT.get()
    return headers if traceparent is None else {**headers, "traceparent": traceparent}
