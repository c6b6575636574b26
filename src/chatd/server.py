"""How chatd's uvicorn holds connections (docs/exposing.md): uvicorn's httptools protocol
with a header deadline, a body deadline, a header size limit and `max_connections`.

uvicorn has no header-read timeout of its own, but takes its HTTP protocol as a class
(`uvicorn.run(http=...)`). `Guarded` is that class; each worker process has one `Doorway`
(a pickled copy under `--workers N`) that holds the limits, the counters and one sweep
timer. A request pays a few attribute writes and two clock reads, not a timer of its own: the
sweep compares each connection's `deadline` with the clock every `tick` seconds and looks
closer only at those past it (at most every `header_timeout_secs` for a busy one).
"""

from __future__ import annotations

import asyncio
import functools
import http
import math
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from chatd.config import Settings
from chatd.errors import ChatdError, HeadersTooLarge, Overloaded, RequestTimeout
from chatd.telemetry.metrics import ConnectionMetrics

# What a connection is doing, as the sweep judges it.
HEAD = 0  # waiting for (the rest of) a request's headers
BODY = 1  # headers read, the body still arriving
BUSY = 2  # the request is read: chatd answers it, however long that takes
LINGER_SECS = 1.0  # after a last answer: read and drop what the client still sends


def raw_response(error: ChatdError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`'s envelope, then `Connection: close`;
    for answers written before (or instead of) the app."""
    body = orjson.dumps(error.envelope())
    lines = [
        f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        f"x-should-retry: {error.retry_hint}",  # docs/errors.md
        *(f"{name.lower()}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Doorway:
    """One worker's limits and counters, and the sweep that enforces the deadlines."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout: float,
        body_timeout: float,
        max_header_bytes: int,
        registry: Any = None,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_header_bytes = max_header_bytes
        # Late connections are found within a tick: a tenth of the shorter deadline.
        self.tick = max(0.05, min(1.0, header_timeout / 10, body_timeout / 10))
        self.overloaded = raw_response(
            Overloaded(
                f"chatd holds its limit of {max_connections} connections; retry shortly",
                headers={"Retry-After": "1"},
            )
        )
        too_large = HeadersTooLarge(f"request headers are over the {max_header_bytes}-byte limit")
        self.headers_too_large = raw_response(too_large)
        self.too_large_body = orjson.dumps(too_large.envelope())
        self.too_slow = {
            HEAD: raw_response(
                RequestTimeout(f"request headers did not arrive within {header_timeout:g}s")
            ),
            BODY: raw_response(
                RequestTimeout(f"request body did not arrive within {body_timeout:g}s")
            ),
        }
        self._registry = registry
        self._metrics: ConnectionMetrics | None = None
        self._sweeping: asyncio.TimerHandle | None = None

    @classmethod
    def from_settings(cls, settings: Settings, registry: Any = None) -> Doorway:
        chatd = settings.chatd
        return cls(
            max_connections=chatd.max_connections,
            header_timeout=chatd.header_timeout_secs,
            body_timeout=chatd.timeout_secs,
            max_header_bytes=chatd.max_header_bytes,
            registry=registry,
        )

    def protocol(self) -> Any:
        """What `uvicorn.run(http=...)` takes: picklable, so `--workers N` gets a copy each."""
        return functools.partial(Guarded, doorway=self)

    def __getstate__(self) -> dict[str, Any]:
        # A worker builds its own counters and timer; a registry stays with its process.
        return {**self.__dict__, "_registry": None, "_metrics": None, "_sweeping": None}

    @property
    def metrics(self) -> ConnectionMetrics:
        if self._metrics is None:
            self._metrics = ConnectionMetrics(self._registry)
        return self._metrics

    def watch(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Start the sweep over this worker's connections (uvicorn's own set), once."""
        if self._sweeping is None:
            self._sweeping = loop.call_later(self.tick, self.sweep, connections, loop)

    async def answer_too_large(self, scope: Any, receive: Any, send: Any) -> None:
        """The app a request with oversized headers meets instead of chatd's."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.too_large_body)).encode()),
            (b"connection", b"close"),
            (b"x-should-retry", b"false"),  # docs/errors.md
        ]
        await send({"type": "http.response.start", "status": 431, "headers": headers})
        await send({"type": "http.response.body", "body": self.too_large_body})

    def sweep(self, connections: set[Any], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        try:
            for connection in list(connections):
                if getattr(connection, "deadline", math.inf) <= now:
                    connection.check(now)
        finally:
            self._sweeping = loop.call_later(self.tick, self.sweep, connections, loop)


class Guarded(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded: see the module's docstring."""

    deadline = math.inf  # when the sweep next looks (loop time)

    def __init__(self, *args: Any, doorway: Doorway, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.doorway = doorway
        self.phase = HEAD
        self.since = 0.0  # when the phase began (loop time)
        self.head_bytes = 0  # of a request head still incomplete, counted per chunk
        self.chunk_bytes = 0
        self.admitted = False
        self.lingering: asyncio.TimerHandle | None = None

    # -- a connection -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        doorway = self.doorway
        if len(self.connections) >= doorway.max_connections:
            self.transport = transport
            doorway.metrics.refused.inc()
            self.answer_and_close(doorway.overloaded)
            return
        super().connection_made(transport)
        self.admitted = True
        self.since = self.loop.time()
        self.deadline = self.since + doorway.header_timeout
        doorway.metrics.open.inc()
        doorway.watch(self.connections, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lingering is not None:
            self.lingering.cancel()
            self.lingering = None
        if not self.admitted:
            return
        self.admitted = False
        self.doorway.metrics.open.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None:
            return  # answered already; what the client still sends is dropped
        self.chunk_bytes = len(data)
        super().data_received(data)
        if self.phase == HEAD and not self.transport.is_closing():
            # This chunk ended inside a request head (a head completed within a chunk is
            # measured exactly in on_headers_complete): memory stays near the limit.
            self.head_bytes += self.chunk_bytes
            if self.head_bytes > self.doorway.max_header_bytes:
                self.answer_and_close(self.doorway.headers_too_large)

    # -- uvicorn's parser callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.cycle is not None:  # a later request on a kept-alive connection
            self.phase = HEAD
            self.since = self.loop.time()
            self.deadline = self.since + self.doorway.header_timeout

    def on_headers_complete(self) -> None:
        limit = self.doorway.max_header_bytes
        if self.head_bytes + self.chunk_bytes > limit and self.head_size() > limit:
            app, self.app = self.app, self.doorway.answer_too_large  # by uvicorn's cycle
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            self.phase, self.head_bytes = BUSY, 0
            return
        self.phase = BODY
        self.since = self.loop.time()
        self.deadline = self.since + self.doorway.header_timeout  # a first look; see check
        self.head_bytes = 0
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        # uvicorn hands the connection to its WebSocket protocol, which counts itself.
        self.admitted = False
        self.doorway.metrics.open.dec()
        super().handle_websocket_upgrade()

    def head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # -- the sweep's visit ---------------------------------------------------------

    def check(self, now: float) -> None:
        """Past its deadline: close this connection if it was too slow in its phase, else
        say when to look again."""
        if not self.admitted or self.lingering is not None or self.transport.is_closing():
            return
        phase, cycle, doorway = self.phase, self.cycle, self.doorway
        self.deadline = again = now + doorway.header_timeout
        if self.pipeline:  # requests queued behind an answer: uvicorn stopped reading
            return
        if phase == BODY and (not cycle.more_body or cycle.response_complete):
            self.phase = phase = BUSY
        if phase == BUSY:
            # Answered, and bytes came that began no request (uvicorn's keep-alive timer
            # stops at any byte): from here on they must make a request head in time.
            if cycle.response_complete and self.timeout_keep_alive_task is None:
                self.phase, self.since = HEAD, now
            return
        limit = self.since + (doorway.header_timeout if phase == HEAD else doorway.body_timeout)
        if now < limit:
            self.deadline = min(limit, again)
            return
        doorway.metrics.slow.labels("headers" if phase == HEAD else "body").inc()
        if phase == BODY:
            answer = not cycle.response_started
        else:  # a head begun (not a connection that sent nothing), no answer under way
            begun = self.scope is not None and "method" not in self.scope
            answer = begun and (cycle is None or cycle.response_complete)
        if answer:
            self.answer_and_close(doorway.too_slow[phase])
        else:  # nobody waits for an answer, or one is being written
            self.transport.close()

    def answer_and_close(self, response: bytes) -> None:
        """Write a last answer, stop writing, and close once the client has read it (or
        after LINGER_SECS): closing with its bytes unread would reset the connection and
        could destroy the answer before the client reads it."""
        transport = self.transport
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        self.lingering = self.loop.call_later(LINGER_SECS, transport.close)
