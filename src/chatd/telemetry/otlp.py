"""Spans as chatd records them, their OTLP protobuf encoding, and the thread that exports
them over OTLP/HTTP in batches (docs/tracing.md).

The encoder is written by hand: an `ExportTraceServiceRequest` is a few nested
length-delimited fields, and most of a span's bytes repeat from span to span (the resource,
the scope, `http.route = /v1/chat`, `gen_ai.provider.name = ollama`), so each repeating
attribute is encoded once and a span costs a few joins.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("chatd.tracing")

SERVER, CLIENT = 2, 3  # Span.SpanKind
ERROR = 2  # Status.StatusCode
QUEUE_SPANS = 8192  # spans waiting for export; more are dropped (and counted)
BATCH_SPANS = 512  # spans per export
EXPORT_EVERY_SECS = 0.5
EXPORT_TIMEOUT_SECS = 2.0
CACHED_ATTRIBUTES = 4096  # distinct encoded (key, value) pairs kept

# Span.flags 16 (fixed32): the W3C trace flags (sampled), and whether the parent is remote.
LOCAL_PARENT = b"\x85\x01" + (0x100 | 0x01).to_bytes(4, "little")
REMOTE_PARENT = b"\x85\x01" + (0x200 | 0x100 | 0x01).to_bytes(4, "little")


class Span:
    """One span, recorded on the request path as plain fields; encoded at export."""

    __slots__ = (
        "trace_id",
        "span_id",
        "parent_id",
        "remote",
        "state",
        "name",
        "kind",
        "start",
        "end",
        "attributes",
        "events",
        "status",
        "message",
    )

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        parent_id: int,
        remote: bool,
        state: str,
        name: str,
        kind: int,
        attributes: dict[str, Any],
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id  # 0: a root span
        self.remote = remote  # the parent is the caller's span
        self.state = state  # the W3C tracestate, "" when none
        self.name = name
        self.kind = kind
        self.start = time.time_ns()
        self.end = 0  # 0 while open
        self.attributes = attributes
        self.events: list[tuple[int, str]] | None = None
        self.status = 0  # unset, or ERROR
        self.message = ""


# -- protobuf, by hand ---------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Every length a span's field has, as its varint: one byte below 128, two below 16,384.
SIZES = tuple(bytes((n,)) for n in range(128)) + tuple(
    bytes(((n & 0x7F) | 0x80, n >> 7)) for n in range(128, 16384)
)


def size(n: int) -> bytes:
    return SIZES[n] if n < 16384 else varint(n)


def field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field: its tag byte, the payload's length, the payload."""
    return bytes((tag,)) + size(len(payload)) + payload


def any_value(value: Any) -> bytes:
    """An `AnyValue`: string 1, bool 2, int 3, double 4 (anything else as its string)."""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & 0xFFFFFFFFFFFFFFFF)  # int64, two's complement
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    return field(0x0A, str(value).encode())


def key_value(key: str, value: Any) -> bytes:
    """A `KeyValue`: key 1, value 2."""
    return field(0x0A, key.encode()) + field(0x12, any_value(value))


def attributes_of(pairs: dict[str, Any], tag: int) -> bytes:
    """Attributes as repeated `KeyValue` fields (`tag`), not cached: the resource's."""
    return b"".join(field(tag, key_value(k, v)) for k, v in pairs.items())


FIXED64 = struct.Struct("<Q")
KIND_AND_TIMES = struct.Struct("<BBBQBQ")  # kind 6 (a one-byte varint), two fixed64 times


class Encoder:
    """`ExportTraceServiceRequest` bytes for a batch of spans, from one resource and one
    instrumentation scope, whose encodings are made once, as are span names' and each
    repeating attribute's: a span costs its ids, its times and a join. An attribute is
    looked up by its (key, value) pair, so chatd gives each key values of one type
    (`gen_ai.request.temperature` is always a float): 1 and 1.0 are one pair to a dict."""

    def __init__(self, resource: dict[str, Any], scope: str, version: str) -> None:
        # ResourceSpans.resource 1 (Resource.attributes 1), then ScopeSpans.scope 1.
        self.resource = field(0x0A, attributes_of(resource, 0x0A))
        self.scope = field(0x0A, field(0x0A, scope.encode()) + field(0x12, version.encode()))
        self.cache: dict[tuple[str, Any], bytes] = {}
        self.names: dict[str, bytes] = {}
        self.keys: dict[str, bytes] = {}

    def request(self, spans: list[Span]) -> bytes:
        """ExportTraceServiceRequest.resource_spans 1 → ResourceSpans.scope_spans 2 →
        ScopeSpans.spans 2, each a Span (field numbers in the comments)."""
        names, cache, attribute = self.names, self.cache, self._attribute
        encoded = []
        for span in spans:
            parts = [
                b"\x0a\x10"  # trace_id 1, span_id 2
                + span.trace_id.to_bytes(16, "big")
                + b"\x12\x08"
                + span.span_id.to_bytes(8, "big")
            ]
            if span.state:
                parts.append(field(0x1A, span.state.encode()))  # trace_state 3
            if span.parent_id:
                parts.append(b"\x22\x08" + span.parent_id.to_bytes(8, "big"))  # parent 4
            parts.append(names.get(span.name) or self._name(span.name))  # name 5
            # kind 6, start_time_unix_nano 7, end_time_unix_nano 8
            parts.append(KIND_AND_TIMES.pack(0x30, span.kind, 0x39, span.start, 0x41, span.end))
            parts += [cache.get(kv) or attribute(kv) for kv in span.attributes.items()]  # 9
            if span.events:  # events 11: time_unix_nano 1, name 2
                for at, event in span.events:
                    event_field = b"\x09" + FIXED64.pack(at) + field(0x12, event.encode())
                    parts.append(field(0x5A, event_field))
            if span.status:  # status 15: message 2, code 3
                message = field(0x12, span.message.encode()) if span.message else b""
                parts.append(field(0x7A, message + b"\x18" + bytes((span.status,))))
            parts.append(REMOTE_PARENT if span.remote else LOCAL_PARENT)  # flags 16
            body = b"".join(parts)
            encoded.append(b"\x12" + size(len(body)) + body)
        scope_spans = self.scope + b"".join(encoded)
        resource_spans = self.resource + b"\x12" + size(len(scope_spans)) + scope_spans
        return b"\x0a" + size(len(resource_spans)) + resource_spans

    def _key(self, key: str) -> bytes:
        encoded = self.keys[key] = field(0x0A, key.encode())  # KeyValue.key 1: a few dozen
        return encoded

    def _name(self, name: str) -> bytes:
        encoded = field(0x2A, name.encode())
        if len(self.names) < CACHED_ATTRIBUTES:
            self.names[name] = encoded
        return encoded

    def _attribute(self, pair: tuple[str, Any]) -> bytes:
        """Span.attributes 9: a KeyValue, kept for the next span unless it is a request's
        own (its id); the cache is emptied when it fills (values that rarely repeat)."""
        key, value = pair
        if value.__class__ is str:  # most: one AnyValue.string_value 1, no helpers
            text = value.encode()
            any_value = b"\x0a" + size(len(text)) + text
            pair_field = self.keys.get(key) or self._key(key)
            kv = pair_field + b"\x12" + size(len(any_value)) + any_value
        else:
            kv = key_value(key, value)
        encoded = b"\x4a" + size(len(kv)) + kv
        if key != "chatd.request_id":
            if len(self.cache) >= CACHED_ATTRIBUTES:
                self.cache.clear()
            self.cache[pair] = encoded
        return encoded


# -- export ----------------------------------------------------------------------------------


class Exporter:
    """Spans queued from the event loop, posted from a thread of their own in batches:
    every `EXPORT_EVERY_SECS`, or sooner when a batch is full. The queue is bounded (a
    full one drops the span and counts it); a collector that is slow or down costs a
    batch at most `EXPORT_TIMEOUT_SECS` and never blocks a request."""

    def __init__(self, url: str, encoder: Encoder) -> None:
        self.collector = Collector(url)
        self.encoder = encoder
        self.queue: deque[Span] = deque()
        self.full = 0  # spans dropped by the event loop: the queue was full
        self.failed = 0  # spans dropped by the thread: batches the collector did not take
        self.exported = 0
        self._reported = 0
        self._last_complaint = -60.0
        self._wake = threading.Event()
        self._stopping = False
        # Started by the first span, in the process that records it (a --workers worker).
        self._thread: threading.Thread | None = None

    @property
    def dropped(self) -> int:
        return self.full + self.failed

    def add(self, span: Span) -> None:
        """Queue an ended span (the event loop's whole share of exporting it)."""
        queue = self.queue
        if len(queue) >= QUEUE_SPANS:
            self.full += 1
            return
        queue.append(span)
        if len(queue) == BATCH_SPANS:
            self._wake.set()
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="chatd-otlp", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = EXPORT_TIMEOUT_SECS + 1.0) -> None:
        """Export what is queued, within `timeout`, then stop the thread."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(EXPORT_EVERY_SECS)
            self._wake.clear()
            stopping = self._stopping
            deadline = time.monotonic() + EXPORT_TIMEOUT_SECS
            while self.queue:
                self._export_batch()
                if stopping and time.monotonic() > deadline:
                    break
                if not stopping and len(self.queue) < BATCH_SPANS:
                    break
            if self.dropped > self._reported:
                self._complain(None)
            if stopping:
                self._close()
                return

    def _export_batch(self) -> None:
        queue = self.queue
        batch = [queue.popleft() for _ in range(min(len(queue), BATCH_SPANS))]
        try:
            body = self.encoder.request(batch)
            self._post(body)
            self.exported += len(batch)
        except Exception as exc:  # noqa: BLE001 - a lost batch must never stop the thread
            self.failed += len(batch)
            self._close()  # an answer it could not read: start afresh
            self._complain(exc)

    def _post(self, body: bytes) -> None:
        status = self.collector.post(body)
        if not 200 <= status < 300:
            raise OSError(f"the collector answered {status}")

    def _close(self) -> None:
        self.collector.close()

    def _complain(self, error: BaseException | None) -> None:
        """A line a minute at most, with the spans lost since the last one."""
        now = time.monotonic()
        if now - self._last_complaint < 60:
            return
        self._last_complaint = now
        lost, self._reported = self.dropped - self._reported, self.dropped
        why = f"the export failed: {error}" if error is not None else "the queue was full"
        where = f"{self.collector.host}:{self.collector.port}"
        log.warning("tracing: %d spans dropped (collector %s): %s", lost, where, why)


class Collector:
    """One kept-alive HTTP/1.1 connection to the collector, for POSTs of protobuf. The
    request's head is made once; of the answer only its status and length are read (a
    general HTTP client parses every header of it: most of an export's cost)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        path = (parts.path or "/v1/traces") + (f"?{parts.query}" if parts.query else "")
        authority = parts.netloc.rpartition("@")[2]  # never a user or password
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n"
            "Content-Type: application/x-protobuf\r\nContent-Length: "
        ).encode()
        self.sock: socket.socket | None = None

    def post(self, body: bytes) -> int:
        """Send one export; the collector's status. Raises OSError when it cannot."""
        request = self.head + str(len(body)).encode() + b"\r\n\r\n" + body
        for fresh in (False, True):
            reused = self.sock is not None and not fresh
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(request)
                return self._answer(self.sock)
            except TimeoutError:
                self.close()
                raise
            except OSError:
                self.close()
                if not reused:  # a kept-alive connection the collector closed: once more
                    raise
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=EXPORT_TIMEOUT_SECS)
        if self.https:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        return sock

    def _answer(self, sock: socket.socket) -> int:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the collector closed the connection")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(None, 2)[1])
        length, keep = None, not lines[0].startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name in (b"connection", b"transfer-encoding"):
                keep = keep and value.strip().lower() == b"keep-alive"
        if length is None or not keep:  # a body we cannot tell the end of: a new connection
            self.close()
            return status
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
