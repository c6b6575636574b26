"""A farm of fake Ollama hosts on 127.0.0.1 that, like Ollama, serve at most `slots`
requests at once and queue the rest (the balancing tests and bench/farm.py; docs/balancing.md).

Each `Host` is a real HTTP/1.1 server (asyncio, keep-alive) on its own free port:

- `POST /api/chat` — Ollama's answer (JSON, or NDJSON when `"stream": true`) after
  holding one of its slots for `latency` seconds; `POST /v1/chat/completions` the same in
  OpenAI's shape (for a vendor reached with several keys); `GET /api/tags`.
- `latency` may change at any time (a host made slower); `stall = True` makes calls hold
  their slot with no answer until the client goes away.
- `kill()` closes the port and drops every connection (the host refuses connections);
  `restart()` serves on the same port again.
- Counts: `requests` (all received), `served` (answered), `disconnects` (clients that
  went away before their answer), `authorizations` (each request's Authorization header).

All hosts of a `Farm` share one event loop in one background thread; the test thread
reads the counters (ints and lists, safe to read without a lock).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson


class Host:
    """One fake Ollama box."""

    def __init__(self, farm: Farm, name: str, slots: int, latency: float) -> None:
        self.farm = farm
        self.name = name
        self.slots = slots
        self.latency = latency
        self.stall = False
        self.port = 0
        self.requests = 0
        self.served = 0
        self.disconnects = 0
        self.authorizations: list[str] = []
        self._server: asyncio.base_events.Server | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        """chatd's default endpoint name for this host."""
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.requests = self.served = self.disconnects = 0
        self.authorizations.clear()

    def kill(self) -> None:
        self.farm.run(self._stop())

    def restart(self) -> None:
        self.farm.run(self._start())

    async def _start(self) -> None:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.slots)
        self._server = await asyncio.start_server(
            self._connection, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                if not await self._answer(method, path, headers, body, reader, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Serve one request; False when the client went away."""
        if method == "GET":
            await respond(writer, 200, {"models": [{"name": "farm:latest"}]})
            return True
        self.requests += 1
        self.authorizations.append(headers.get("authorization", ""))
        data = json.loads(body or b"{}")
        gone = asyncio.ensure_future(reader.read(1))  # b"" = the client closed
        serving = asyncio.ensure_future(self._hold_slot())
        done, _ = await asyncio.wait({gone, serving}, return_when=asyncio.FIRST_COMPLETED)
        for task in (gone, serving):
            if not task.done():
                task.cancel()
        await asyncio.gather(gone, serving, return_exceptions=True)
        if gone in done:  # the client went away first (queued or being served)
            self.disconnects += 1
            return False
        self.served += 1
        model = str(data.get("model", "farm"))
        text = f"answer from {self.name}"
        if path.startswith("/v1/"):
            await respond(writer, 200, openai_answer(model, text))
        elif data.get("stream"):
            await respond_stream(writer, model, text)
        else:
            await respond(writer, 200, ollama_answer(model, text))
        return True

    async def _hold_slot(self) -> None:
        assert self._semaphore is not None
        async with self._semaphore:  # at most `slots` at once: the rest queue here
            await asyncio.sleep(3600 if self.stall else self.latency)


class Farm:
    """Several hosts sharing one event loop thread; a context manager."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.hosts: list[Host] = []

    def __enter__(self) -> Farm:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for host in self.hosts:
            host.kill()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def add(self, name: str, *, slots: int = 4, latency: float = 0.05) -> Host:
        host = Host(self, name, slots, latency)
        self.run(host._start())
        self.hosts.append(host)
        return host

    def reset(self) -> None:
        for host in self.hosts:
            host.reset()
            host.stall = False


@contextmanager
def farm_of(count: int, **kw: Any) -> Iterator[list[Host]]:
    """`count` hosts named h1, h2, ... in one Farm."""
    with Farm() as farm:
        yield [farm.add(f"h{i + 1}", **kw) for i in range(count)]


# -- HTTP/1.1, just enough --------------------------------------------------------


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return method, path, headers, body


async def respond(writer: asyncio.StreamWriter, status: int, payload: Any) -> None:
    body = orjson.dumps(payload)
    writer.write(
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


async def respond_stream(writer: asyncio.StreamWriter, model: str, text: str) -> None:
    lines = [
        {"model": model, "message": {"role": "assistant", "content": word + " "}, "done": False}
        for word in text.split()
    ]
    lines.append({**ollama_answer(model, ""), "done": True})
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


def ollama_answer(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "message": {"role": "assistant", "content": text},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 3,
        "eval_count": 3,
    }


def openai_answer(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-farm",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3},
    }
