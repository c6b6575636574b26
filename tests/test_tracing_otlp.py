"""Tracing's hand-written OTLP encoder and its exporter thread (docs/tracing.md): the bytes
decode, field by field, with the OpenTelemetry protobuf classes; exports cross a real
socket to a receiver on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from chatd.telemetry import otlp
from chatd.telemetry.otlp import CLIENT, ERROR, SERVER, Collector, Encoder, Exporter, Span
from chatd.telemetry.propagation import TRACED_REQUEST, UPSTREAM_TRACEPARENT
from chatd.telemetry.tracing import Tracing, parse_traceparent
from tests.otlp_receiver import OtlpReceiver
from tests.support import free_port

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
RESOURCE = {"service.name": "svc", "service.instance.id": "abc"}


def values(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


def server_and_client() -> tuple[Span, Span]:
    server = Span(TRACE, 0x1111, CALLER_SPAN, True, "vendor=x", "POST /v1/chat", SERVER, {})
    server.attributes.update(
        {
            "http.request.method": "POST",
            "http.response.status_code": 502,
            "chatd.cache": "miss",
            "chatd.request_id": "5f0c6e1a9d6b4b0e8f3a2c1d7e9b0a41",
        }
    )
    server.status = ERROR
    server.end = server.start + 5_000_000
    client = Span(TRACE, 0x2222, 0x1111, False, "vendor=x", "chat qwen3", CLIENT, {})
    client.attributes.update(
        {
            "chatd.attempt": 2,
            "chatd.hedge": True,
            "gen_ai.request.temperature": 0.25,
            "gen_ai.request.max_tokens": 1,
            "chatd.offset": -3,
            "chatd.name": "naïve ✓",
        }
    )
    client.events = [(client.start + 1_000, "gen_ai.first_token")]
    client.status, client.message = ERROR, "the upstream answered 500"
    client.end = client.start + 2_000_000
    return server, client


def test_the_encoded_batch_decodes_field_by_field() -> None:
    encoder = Encoder(RESOURCE, "chatd", "1.2.3")
    server, client = server_and_client()
    for _ in range(2):  # the second batch from the cache
        request = ExportTraceServiceRequest.FromString(encoder.request([server, client]))
        (resource_spans,) = request.resource_spans
        assert values(resource_spans.resource.attributes) == RESOURCE
        (scope_spans,) = resource_spans.scope_spans
        assert (scope_spans.scope.name, scope_spans.scope.version) == ("chatd", "1.2.3")
        decoded_server, decoded_client = scope_spans.spans

        assert decoded_server.trace_id == TRACE.to_bytes(16, "big")
        assert decoded_server.span_id == (0x1111).to_bytes(8, "big")
        assert decoded_server.parent_span_id == CALLER_SPAN.to_bytes(8, "big")
        assert decoded_server.trace_state == "vendor=x"
        assert decoded_server.name == "POST /v1/chat"
        assert decoded_server.kind == ProtoSpan.SPAN_KIND_SERVER
        assert decoded_server.start_time_unix_nano == server.start
        assert decoded_server.end_time_unix_nano == server.end
        assert values(decoded_server.attributes) == server.attributes
        assert decoded_server.status.code == Status.STATUS_CODE_ERROR
        assert decoded_server.status.message == ""
        assert decoded_server.flags == 0x301  # sampled, parent known to be remote
        assert not decoded_server.events

        assert decoded_client.parent_span_id == (0x1111).to_bytes(8, "big")
        assert decoded_client.kind == ProtoSpan.SPAN_KIND_CLIENT
        assert decoded_client.name == "chat qwen3" and decoded_client.flags == 0x101
        attributes = values(decoded_client.attributes)
        assert attributes == client.attributes
        kinds = {kv.key: kv.value.WhichOneof("value") for kv in decoded_client.attributes}
        assert kinds["gen_ai.request.max_tokens"] == "int_value"
        assert kinds["chatd.hedge"] == "bool_value"
        assert kinds["gen_ai.request.temperature"] == "double_value"
        ((event),) = decoded_client.events
        assert (event.name, event.time_unix_nano) == ("gen_ai.first_token", client.start + 1_000)
        assert decoded_client.status.code == Status.STATUS_CODE_ERROR
        assert decoded_client.status.message == "the upstream answered 500"


def test_an_unsampled_span_status_and_a_root_span_leave_their_fields_out() -> None:
    root = Span(TRACE, 7, 0, False, "", "GET /health", SERVER, {"http.response.status_code": 200})
    root.end = root.start + 1
    (span,) = (
        ExportTraceServiceRequest.FromString(Encoder(RESOURCE, "chatd", "1").request([root]))
        .resource_spans[0]
        .scope_spans[0]
        .spans
    )
    assert span.parent_span_id == b"" and span.trace_state == ""
    assert span.status.code == Status.STATUS_CODE_UNSET


def test_traceparent_is_read_as_w3c_says() -> None:
    assert parse_traceparent(f"00-{TRACE:032x}-{CALLER_SPAN:016x}-01") == (
        TRACE,
        CALLER_SPAN,
        True,
    )
    assert parse_traceparent(f" 00-{TRACE:032x}-{CALLER_SPAN:016x}-00 ")[2] is False  # type: ignore[index]
    future = f"01-{TRACE:032x}-{CALLER_SPAN:016x}-09-more"  # a later version's extra fields
    assert parse_traceparent(future) == (TRACE, CALLER_SPAN, True)
    for bad in (
        f"ff-{TRACE:032x}-{CALLER_SPAN:016x}-01",
        f"00-{TRACE:032x}-{CALLER_SPAN:016x}-01-more",
        f"00-{0:032x}-{CALLER_SPAN:016x}-01",
        f"00-{TRACE:032x}-{0:016x}-01",
        f"00-{TRACE:032X}-{CALLER_SPAN:016x}-01",
        "00-not-a-trace-01",
    ):
        assert parse_traceparent(bad) is None, bad


def request_scope(traceparent: str) -> dict[str, Any]:
    headers = [(b"traceparent", traceparent.encode()), (b"tracestate", b"vendor=x")]
    return {"type": "http", "method": "GET", "path": "/health", "headers": headers}


def test_spans_cross_a_socket_to_a_collector_and_shutdown_flushes_them() -> None:
    with OtlpReceiver() as receiver:
        tracing = Tracing(f"{receiver.url}/v1/traces", "exported", 1.0)
        for _ in range(3):
            request = request_scope(f"00-{TRACE:032x}-{CALLER_SPAN:016x}-01")
            tracing.started(request)
            tracing.finished(request, 200)
        tracing.shutdown()  # before the half-second export: the flush sends them
        assert tracing.exporter.exported == 3 and tracing.exporter.dropped == 0
        assert receiver.service_names() == {"exported"}
        assert receiver.instances() == {tracing.instance}


def test_a_full_queue_drops_and_counts_and_a_dead_collector_loses_only_spans(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(otlp, "QUEUE_SPANS", 10)
    exporter = Exporter(f"http://127.0.0.1:{free_port()}/v1/traces", Encoder(RESOURCE, "c", "1"))
    for n in range(15):
        span = Span(TRACE, n + 1, 0, False, "", "x", CLIENT, {})
        span.end = span.start
        exporter.add(span)
    assert exporter.dropped >= 5  # the export thread may already have taken some
    exporter.shutdown()
    assert exporter._thread is not None and not exporter._thread.is_alive()
    assert exporter.exported == 0 and exporter.dropped == 15  # refused: every span counted


def test_a_collector_that_never_answers_holds_shutdown_only_to_its_bound() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts the connection, never answers
    try:
        exporter = Exporter(
            f"http://127.0.0.1:{silent.getsockname()[1]}", Encoder(RESOURCE, "c", "1")
        )
        span = Span(TRACE, 1, 0, False, "", "x", CLIENT, {})
        exporter.add(span)
        exporter.shutdown()  # an export stuck on the timeout, then the join's bound
        assert exporter._thread is not None
        exporter._thread.join(otlp.EXPORT_TIMEOUT_SECS * 10)  # and the thread does end
        assert not exporter._thread.is_alive()
        assert exporter.dropped == 1 and exporter.exported == 0
    finally:
        silent.close()


def test_exports_keep_one_connection_and_survive_the_collector_closing_it() -> None:
    connections, bodies = [], []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

        def setup(self) -> None:
            super().setup()
            connections.append(self.client_address)

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            bodies.append((self.path, self.headers["content-type"], body))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            # After the second export, hang up without saying so (an idle timeout's way).
            self.close_connection = len(bodies) == 2

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        collector = Collector(f"http://127.0.0.1:{server.server_address[1]}/v1/traces")
        assert [collector.post(b"one"), collector.post(b"two")] == [200, 200]
        assert len(connections) == 1  # kept alive
        assert collector.post(b"three") == 200  # the closed one found out, and sent again
        assert len(connections) == 2
        assert bodies == [
            ("/v1/traces", "application/x-protobuf", b"one"),
            ("/v1/traces", "application/x-protobuf", b"two"),
            ("/v1/traces", "application/x-protobuf", b"three"),
        ]
        collector.close()
    finally:
        server.shutdown()
        server.server_close()


def test_a_client_span_carries_the_request_settings_each_as_its_one_type() -> None:
    """Temperature is a double and max_tokens an int whatever JSON number the caller sent
    (the encoder caches a pair by value, where 1 == 1.0)."""

    class Provider:
        name, kind, base_url, endpoint = "ollama", "ollama", "http://10.0.0.7:11434", None

    class Route:
        provider, model = Provider(), "qwen3"

    tracing = Tracing("http://127.0.0.1:9/v1/traces", "test", 1.0)
    spans: list[Span] = []
    tracing.exporter.add = spans.append  # type: ignore[method-assign]
    for max_tokens, temperature in ((64, 1), (64.0, 1.0)):
        facts = {"max_tokens": max_tokens, "temperature": temperature}
        token = TRACED_REQUEST.set((facts, "chat", None))
        try:
            span, upstream = tracing.call_started(Route(), 1, False)
            UPSTREAM_TRACEPARENT.reset(upstream)
            answer = {"model": "qwen3:8b", "usage": {"prompt_tokens": 3}}
            tracing.call_answered(span, Route(), answer)
        finally:
            TRACED_REQUEST.reset(token)
    tracing.shutdown()
    decoded = ExportTraceServiceRequest.FromString(tracing.exporter.encoder.request(spans))
    for span in decoded.resource_spans[0].scope_spans[0].spans:
        assert values(span.attributes) == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "ollama",
            "gen_ai.request.model": "qwen3",
            "gen_ai.response.model": "qwen3:8b",
            "gen_ai.request.max_tokens": 64,
            "gen_ai.request.temperature": 1.0,
            "gen_ai.usage.input_tokens": 3,
            "server.address": "10.0.0.7",
            "chatd.provider": "ollama",
            "chatd.endpoint": "ollama",
            "chatd.attempt": 1,
        }
        kinds = {kv.key: kv.value.WhichOneof("value") for kv in span.attributes}
        assert kinds["gen_ai.request.max_tokens"] == "int_value"
        assert kinds["gen_ai.request.temperature"] == "double_value"


def test_a_tracer_that_records_nothing_starts_no_thread() -> None:
    tracing = Tracing("http://127.0.0.1:9/v1/traces", "test", 0.0)
    request = request_scope(f"00-{TRACE:032x}-{CALLER_SPAN:016x}-00")  # not sampled
    tracing.started(request)
    tracing.finished(request, 200)
    assert tracing.exporter._thread is None
    tracing.shutdown()


def test_a_batch_longer_than_two_length_bytes_decodes_whole() -> None:
    spans = []
    for n in range(300):  # ~100 bytes a span: the batch's lengths need three varint bytes
        span = Span(TRACE, n + 1, 0, False, "", f"chat model-{n % 7}", CLIENT, {"n": n})
        span.end = span.start + n
        spans.append(span)
    body = Encoder(RESOURCE, "chatd", "1").request(spans)
    assert len(body) > 16384
    decoded = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans
    assert [values(s.attributes)["n"] for s in decoded] == list(range(300))
    assert [s.end_time_unix_nano - s.start_time_unix_nano for s in decoded] == list(range(300))
