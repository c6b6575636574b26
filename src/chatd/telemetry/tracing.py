"""Traces with OpenTelemetry (docs/tracing.md): a server span per request, a client span
per upstream call, exported over OTLP/HTTP in batches off the request path.

Off (no endpoint configured), nothing here is imported or called: `build_tracing`
returns None and every caller checks for None once. The OpenTelemetry SDK is imported
only when tracing is on.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from chatd import __version__
from chatd.config import Settings
from chatd.telemetry.propagation import TRACED_REQUEST, UPSTREAM_TRACEPARENT

SPAN_STATE = "span"  # scope["state"][SPAN_STATE]: the server span and its context token
EXPORT_TIMEOUT_SECS = 2.0
EXPORT_EVERY_MS = 500
QUEUE_SPANS = 8192


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


class Tracing:
    """One process's tracer provider, exporter and the spans chatd makes."""

    def __init__(self, url: str, service_name: str, sample_ratio: float) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.url = url
        self.instance = uuid.uuid4().hex  # each process (each --workers worker) its own
        resource = Resource.create(
            {
                "service.name": service_name,
                "service.version": __version__,
                "service.instance.id": self.instance,
            }
        )
        # chatd samples before it makes a span (`started`): a request left out costs no
        # span at all, so the SDK keeps every span it is given.
        self.ratio = sample_ratio
        self.provider = TracerProvider(resource=resource, sampler=ALWAYS_ON)
        exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_SECS)
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=QUEUE_SPANS,
                schedule_delay_millis=EXPORT_EVERY_MS,
                export_timeout_millis=int(EXPORT_TIMEOUT_SECS * 1000),
            )
        )
        self.tracer = self.provider.get_tracer("chatd", __version__)
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._error = trace.StatusCode.ERROR
        quiet_exporter_logs()

    # -- the server span: one per request ----------------------------------------------

    def started(self, scope: Any) -> None:
        """Open the request's span, continuing the caller's `traceparent` if it sent one.
        Parent-based sampling: a caller's decision is kept; chatd's own traces are kept
        at `sample_ratio`, and a request left out gets no span and costs nothing more."""
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        parent = self._propagator.extract(carrier) if carrier else None
        caller = self._trace.get_current_span(parent).get_span_context() if parent else None
        if caller is not None and caller.is_valid:
            if not caller.trace_flags.sampled:
                return
        elif self.ratio < 1.0 and random.random() >= self.ratio:
            return
        method = scope.get("method", "")
        span = self.tracer.start_span(
            f"{method} {scope.get('path', '')}",
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "url.path": scope.get("path", "")},
        )
        # The client spans' parent, handed down by a context variable of chatd's own: no
        # attach/detach of OpenTelemetry's current context per request.
        state = scope.setdefault("state", {})
        facts = state.setdefault("log", {})
        operation = "embeddings" if scope.get("path") == "/v1/embeddings" else "chat"
        parent_of_calls = self._trace.set_span_in_context(span, parent)
        state[SPAN_STATE] = (span, TRACED_REQUEST.set((facts, operation, parent_of_calls)))
        facts["trace_id"] = format(span.get_span_context().trace_id, "032x")

    def finished(self, scope: Any, status: int) -> None:
        """Close the request's span with what the request turned out to be."""
        state = scope.get("state") or {}
        opened = state.pop(SPAN_STATE, None)
        if opened is None:
            return
        span, request = opened
        try:
            if span.is_recording():
                self._describe_server(span, scope, state, status)
            span.end()
        finally:
            TRACED_REQUEST.reset(request)

    def _describe_server(self, span: Any, scope: Any, state: dict[str, Any], status: int) -> None:
        facts = state.get("log") or {}
        attributes: dict[str, Any] = {
            "http.response.status_code": status,
            "chatd.cache": facts.get("cache") or "bypass",
        }
        route = getattr(scope.get("route"), "path", None)
        if route:
            span.update_name(f"{scope.get('method', '')} {route}")
            attributes["http.route"] = route
        request_id = state.get("request_id")
        if request_id:
            attributes["chatd.request_id"] = request_id
        caller = facts.get("caller")
        if caller is not None:
            attributes["chatd.caller"] = str(caller)
        error = facts.get("error")
        if error:
            attributes["error.type"] = str(error)
        span.set_attributes(attributes)  # one lock and one pass, not one per attribute
        if status >= 500:
            span.set_status(self._error)

    # -- client spans: one per upstream call -------------------------------------------

    def call_started(self, route: Any, number: int, hedge: bool) -> Any:
        """A client span for one upstream call (a child of the request's); returns it and
        the token that makes the call's upstream `traceparent` name it."""
        provider = route.provider
        facts, operation, parent = TRACED_REQUEST.get() or ({}, "chat", None)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": genai_provider(provider),
            "gen_ai.request.model": route.model,
            "server.address": urlsplit(provider.base_url).hostname or "",
            "chatd.provider": provider.name,
            "chatd.endpoint": getattr(provider, "endpoint", None) or provider.name,
            "chatd.attempt": number,
        }
        if hedge:
            attributes["chatd.hedge"] = True
        for name in ("max_tokens", "temperature"):
            value = facts.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                attributes[f"gen_ai.request.{name}"] = value
        span = self.tracer.start_span(
            f"{operation} {route.model}", context=parent, kind=self._client, attributes=attributes
        )
        context = span.get_span_context()
        traceparent = (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
        )
        return span, UPSTREAM_TRACEPARENT.set(traceparent)

    def call_answered(self, span: Any, route: Any, result: Any) -> None:
        """An answer came: its model and tokens; a stream's span stays open until it ends."""
        if not span.is_recording():
            span.end()
            return
        span.set_attribute("gen_ai.response.model", response_model(result) or route.model)
        opened = result[1] if isinstance(result, tuple) and len(result) == 2 else None
        if opened is not None and hasattr(opened, "on_close"):
            span.add_event("gen_ai.first_token")
            opened.on_close = lambda last, error: self.call_ended(span, last, error)
            return
        set_usage(span, result)
        span.end()

    def call_ended(self, span: Any, last: Any, error: BaseException | None) -> None:
        """A stream's end: its tokens (from its last event) or its error."""
        if error is not None:
            self.call_failed(span, error)
            return
        set_usage(span, last)
        span.end()

    def call_failed(self, span: Any, error: BaseException | None) -> None:
        """The call failed (its error type as `error.type`) or was cancelled."""
        if span.is_recording():
            kind = getattr(error, "type", None)
            if kind is None:  # cancelled: a hedge that lost, a caller that left
                span.set_attribute("error.type", "cancelled")
            else:
                span.set_attribute("error.type", kind)
                span.set_status(self._error, getattr(error, "summary", None) or kind)
        span.end()

    def shutdown(self) -> None:
        """Export what is queued (bounded by the export timeout), then stop."""
        self.provider.shutdown()


def genai_provider(provider: Any) -> str:
    """`gen_ai.provider.name`: ollama for both Ollama kinds, else chatd's provider name
    (an OpenAI-compatible vendor: openrouter, kimi, ...)."""
    kind = getattr(provider, "kind", "")
    return "ollama" if kind in ("ollama", "ollama_cloud") else provider.name


def response_model(result: Any) -> str | None:
    body = result[0] if isinstance(result, tuple) and result else result
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def set_usage(span: Any, result: Any) -> None:
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
        span.set_attribute("gen_ai.usage.input_tokens", inputs)
    if isinstance(outputs, int):
        span.set_attribute("gen_ai.usage.output_tokens", outputs)


class OncePerMinute(logging.Filter):
    """An unreachable collector is worth a line a minute, not one per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.last = -60.0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.last < 60:
            return False
        self.last = now
        return True


def quiet_exporter_logs() -> None:
    """The SDK's loggers (made when its modules were imported): a line a minute at most.
    Its batch processor warns once per span it drops when the queue is full; that one
    stays at ERROR, so a dropped span costs no log record."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("opentelemetry"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, OncePerMinute) for f in logger.filters):
                logger.addFilter(OncePerMinute())
    logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
