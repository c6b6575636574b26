"""Traces (docs/tracing.md): a server span per request, a client span per upstream call,
recorded as plain objects on the request path and exported over OTLP/HTTP protobuf in
batches from a thread of their own (telemetry/otlp.py).

Off (no endpoint configured), nothing here is called: `build_tracing` returns None and
every caller checks for None once. No OpenTelemetry library runs: the SDK's span objects
and encoder cost a traced request several times chatd's own work (docs/tracing.md).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Mapping
from random import getrandbits
from typing import Any
from urllib.parse import urlsplit

from chatd import __version__
from chatd.config import Settings
from chatd.telemetry.otlp import CLIENT, ERROR, SERVER, Encoder, Exporter, Span
from chatd.telemetry.propagation import TRACED_REQUEST, UPSTREAM_TRACEPARENT

SPAN_STATE = "span"  # scope["state"][SPAN_STATE]: the server span and its context token
TRACE_ID_LIMIT = (1 << 64) - 1  # the ratio sampler looks at a trace id's low 64 bits
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
TRACESTATE_CHARS = 512  # W3C: a tracestate longer than this may be dropped


def build_tracing(settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The tracer chatd's config (or the standard OTEL_* variables) asks for, or None."""
    environ = os.environ if environ is None else environ
    config = settings.chatd.tracing
    endpoint = config.otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        return None
    name = config.service_name or environ.get("OTEL_SERVICE_NAME", "").strip() or "chatd"
    return Tracing(traces_url(endpoint), name, config.sample_ratio)


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces path under a collector's base address (as the SDKs do)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """A W3C `traceparent`'s trace id, parent span id and sampled flag; None when it
    cannot be read (then chatd starts a trace of its own)."""
    match = TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace, span, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


class Tracing:
    """One process's spans: sampled, recorded, and handed to its exporter."""

    def __init__(self, url: str, service_name: str, sample_ratio: float) -> None:
        self.url = url
        self.instance = uuid.uuid4().hex  # each process (each --workers worker) its own
        resource = {
            "service.name": service_name,
            "service.version": __version__,
            "service.instance.id": self.instance,
            "telemetry.sdk.language": "python",
        }
        self.exporter = Exporter(url, Encoder(resource, "chatd", __version__))
        # Parent-based, then trace-id ratio, as OpenTelemetry's samplers decide: a trace
        # chatd starts is kept when its id's low 64 bits fall under the bound.
        self.ratio = sample_ratio
        self.bound = round(sample_ratio * (TRACE_ID_LIMIT + 1))
        self._static: dict[tuple[Any, str, str], dict[str, Any]] = {}

    # -- the server span: one per request ----------------------------------------------

    def started(self, scope: Any) -> None:
        """Open the request's span, continuing the caller's `traceparent` if it sent one.
        Parent-based sampling: a caller's decision is kept; chatd's own traces are kept
        at `sample_ratio`, and a request left out gets no span and costs nothing more."""
        headers = dict(scope["headers"])  # one pass in C; names are lower case in ASGI
        traceparent = headers.get(b"traceparent")
        caller = parse_traceparent(traceparent.decode("latin-1")) if traceparent else None
        if caller is not None:
            trace_id, parent_id, sampled = caller
            if not sampled:
                return
            state = headers.get(b"tracestate", b"").decode("latin-1").strip()
            if len(state) > TRACESTATE_CHARS:
                state = ""
        else:
            trace_id = getrandbits(128) or 1
            if (trace_id & TRACE_ID_LIMIT) >= self.bound:
                return
            parent_id, state = 0, ""
        method = scope.get("method", "")
        path = scope.get("path", "")
        span = Span(
            trace_id,
            getrandbits(64) or 1,
            parent_id,
            caller is not None,
            state,
            f"{method} {path}",
            SERVER,
            {"http.request.method": method, "url.path": path},
        )
        # The client spans' parent, handed down by a context variable of chatd's own.
        request_state = scope.setdefault("state", {})
        facts = request_state.setdefault("log", {})
        operation = "embeddings" if path == "/v1/embeddings" else "chat"
        request_state[SPAN_STATE] = (span, TRACED_REQUEST.set((facts, operation, span)))
        facts["trace_id"] = format(trace_id, "032x")

    def finished(self, scope: Any, status: int) -> None:
        """Close the request's span with what the request turned out to be."""
        state = scope.get("state") or {}
        opened = state.pop(SPAN_STATE, None)
        if opened is None:
            return
        span, request = opened
        try:
            self._describe_server(span, scope, state, status)
            self._end(span)
        finally:
            TRACED_REQUEST.reset(request)

    def _describe_server(self, span: Span, scope: Any, state: dict[str, Any], status: int) -> None:
        facts = state.get("log") or {}
        attributes = span.attributes
        route = getattr(scope.get("route"), "path", None)
        if route:
            span.name = f"{scope.get('method', '')} {route}"
            attributes["http.route"] = route
        attributes["http.response.status_code"] = status
        attributes["chatd.cache"] = facts.get("cache") or "bypass"
        request_id = state.get("request_id")
        if request_id:
            attributes["chatd.request_id"] = request_id
        caller = facts.get("caller")
        if caller is not None:
            attributes["chatd.caller"] = str(caller)
        error = facts.get("error")
        if error:
            attributes["error.type"] = str(error)
        if status >= 500:
            span.status = ERROR

    # -- client spans: one per upstream call -------------------------------------------

    def call_started(self, route: Any, number: int, hedge: bool) -> Any:
        """A client span for one upstream call (a child of the request's); returns it and
        the token that makes the call's upstream `traceparent` name it."""
        facts, operation, parent = TRACED_REQUEST.get() or ({}, "chat", None)
        static = self._static.get((route.provider, route.model, operation))
        if static is None:
            static = self._static_attributes(route.provider, route.model, operation)
        attributes = static.copy()
        attributes["chatd.attempt"] = number
        if hedge:
            attributes["chatd.hedge"] = True
        max_tokens, temperature = facts.get("max_tokens"), facts.get("temperature")
        if isinstance(max_tokens, int | float) and not isinstance(max_tokens, bool):
            attributes["gen_ai.request.max_tokens"] = int(max_tokens)  # an int, always
        if isinstance(temperature, int | float) and not isinstance(temperature, bool):
            attributes["gen_ai.request.temperature"] = float(temperature)  # a double, always
        if parent is None:  # not inside a traced request: a trace of its own
            trace_id, parent_id, state = getrandbits(128) or 1, 0, ""
        else:
            trace_id, parent_id, state = parent.trace_id, parent.span_id, parent.state
        span_id = getrandbits(64) or 1
        span = Span(
            trace_id,
            span_id,
            parent_id,
            False,
            state,
            f"{operation} {route.model}",
            CLIENT,
            attributes,
        )
        return span, UPSTREAM_TRACEPARENT.set(f"00-{trace_id:032x}-{span_id:016x}-01")

    def _static_attributes(self, provider: Any, model: str, operation: str) -> dict[str, Any]:
        """What every call to one provider's model has in common, made once."""
        if len(self._static) >= 1024:  # providers a reload replaced are let go
            self._static.clear()
        static = self._static[(provider, model, operation)] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": genai_provider(provider),
            "gen_ai.request.model": model,
            "server.address": urlsplit(provider.base_url).hostname or "",
            "chatd.provider": provider.name,
            "chatd.endpoint": getattr(provider, "endpoint", None) or provider.name,
        }
        return static

    def call_answered(self, span: Span, route: Any, result: Any) -> None:
        """An answer came: its model and tokens; a stream's span stays open until it ends."""
        span.attributes["gen_ai.response.model"] = response_model(result) or route.model
        opened = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        if opened is not None and hasattr(opened, "on_close"):
            span.events = [(time.time_ns(), "gen_ai.first_token")]
            opened.on_close = lambda last, error: self.call_ended(span, last, error)
            return
        set_usage(span, result)
        self._end(span)

    def call_ended(self, span: Span, last: Any, error: BaseException | None) -> None:
        """A stream's end: its tokens (from its last event) or its error."""
        if error is not None:
            self.call_failed(span, error)
            return
        set_usage(span, last)
        self._end(span)

    def call_failed(self, span: Span, error: BaseException | None) -> None:
        """The call failed (its error type as `error.type`) or was cancelled."""
        kind = getattr(error, "type", None)
        if kind is None:  # cancelled: a hedge that lost, a caller that left
            span.attributes["error.type"] = "cancelled"
        else:
            span.attributes["error.type"] = kind
            span.status = ERROR
            span.message = getattr(error, "summary", None) or kind
        self._end(span)

    def _end(self, span: Span) -> None:
        if not span.end:  # a span ends once
            span.end = time.time_ns()
            self.exporter.add(span)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop."""
        self.exporter.shutdown()


def genai_provider(provider: Any) -> str:
    """`gen_ai.provider.name`: ollama for both Ollama kinds, else chatd's provider name
    (an OpenAI-compatible vendor: openrouter, kimi, ...)."""
    kind = getattr(provider, "kind", "")
    return "ollama" if kind in ("ollama", "ollama_cloud") else provider.name


def response_model(result: Any) -> str | None:
    body = result[0] if isinstance(result, tuple) and result else result
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def set_usage(span: Span, result: Any) -> None:
    """Token counts from whatever a provider answered: a chatd result or event, or an
    OpenAI-shaped body's `usage`."""
    usage = result.get("usage") if isinstance(result, dict) else None
    if isinstance(usage, dict):
        inputs = usage.get("prompt_tokens", usage.get("input_tokens"))
        outputs = usage.get("completion_tokens", usage.get("output_tokens"))
    else:
        inputs = getattr(result, "input_tokens", None)
        outputs = getattr(result, "output_tokens", None)
    if isinstance(inputs, int):
        span.attributes["gen_ai.usage.input_tokens"] = inputs
    if isinstance(outputs, int):
        span.attributes["gen_ai.usage.output_tokens"] = outputs
