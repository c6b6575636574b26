"""A real HTTP server on 127.0.0.1 that speaks like Ollama and like an OpenAI-compatible vendor.

One server answers both dialects, by path:

- Ollama: `POST /api/chat`, `POST /api/generate` (JSON, or NDJSON when `"stream": true`),
  `GET /api/tags`. A model whose name contains `/` or starts with `missing` is unknown
  and gets Ollama's own 404: `{"error":"model \\"X\\" not found, try pulling it first"}`.
- OpenAI: `POST /v1/chat/completions` (JSON, or SSE with a `: OPENROUTER PROCESSING`
  keep-alive, a usage chunk when asked for, and `data: [DONE]`), `GET /v1/models`.
- Embeddings: `POST /api/embed` (Ollama) and `POST /v1/embeddings` (OpenAI, floats, or
  base64 when asked): `fake_vector(text, dimensions)` per input (4 dimensions unless
  `dimensions` is sent), a token per word. An input `!reset` resets that call's
  connection. `embed_in_flight` / `peak_embed_in_flight` count embedding calls from
  arrival until just before their answer is written (so a client that got an answer
  can never see its call still counted); `reset_peaks()` zeroes the peaks.

The model name picks a behaviour (the part after the last `/` for OpenAI paths):

    ok, anything else   a normal answer
    slow-<ms>           the answer takes <ms>; a stream spreads its chunks over it
    hang-<ms>           nothing at all for <ms>, then a normal answer
    fail-<status>       that status with an error body (429 and 503 carry Retry-After: 1)
    retryafter-<s>      429 with Retry-After: <s>
    flaky-<n>           503 for the first <n> calls since reset(), then a normal answer
    reset               the connection is reset before any answer
    break               a stream (or body) that stops half way, connection dropped
    stall-<ms>          a stream that sends 3 pieces, then nothing for <ms>, then the rest
    errmid              a stream that sends 3 pieces, then the upstream's own error line
    badjson             200 with a body that is not JSON
    nochoices           200 with zero choices (OpenAI) / no message (Ollama)
    big                 a long answer (≈200 KB)
    think               an answer with reasoning text
    cost-<micro>        (OpenAI) usage carries OpenRouter's `"cost": <micro> / 1e6` USD
    tool                (/api/chat, /v1/chat/completions) a call of the request's first tool,
                        arguments {"city": "Paris"} (OpenAI: a JSON string, streamed in pieces)
    said-<name>         the error answer a real server gave, `fakes/recorded.py`'s <name>
    wrongcount          (embeddings) one vector fewer than inputs
    ragged              (embeddings) the second vector is one element short

A request's stop sequences (OpenAI `stop`, Ollama `options.stop`) cut the answer where the
first one appears; the OpenAI dialect then names it in the choice's `stop_reason`, as vLLM
does.

Every request is recorded in `calls` (path, parsed JSON, lower-cased headers), with the
time the server saw the client go away, if it did, in `disconnected_at`. The server also
counts, under its lock, the requests being answered right now (`in_flight`) and the client
connections it is serving (`open_connections`), with their peaks and the connections
accepted in all, for leak checks.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakes.recorded import RECORDED

ANSWER = "Hello from the fake upstream, one word at a time."
THINKING = "The caller wants a greeting."


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    started_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    disconnected_at: float | None = None


class ClientGone(Exception):
    pass


def fake_vector(text: str, dimensions: int = 4) -> list[float]:
    """The fake's embedding of `text`: hash bytes as float32-exact values in [-1, 1)."""
    raw = b""
    counter = 0
    while len(raw) < dimensions:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    return [(b - 128) / 128 for b in raw[:dimensions]]


def behaviour(model: str) -> tuple[str, int]:
    """`slow-250` -> ("slow", 250); `ok` -> ("ok", 0)."""
    name = model.rsplit("/", 1)[-1].split(":", 1)[0]
    head, _, tail = name.partition("-")
    if tail.isdigit():
        return head, int(tail)
    return name, 0


def words(text: str) -> list[str]:
    parts = text.split(" ")
    return [p + (" " if i < len(parts) - 1 else "") for i, p in enumerate(parts)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # -- plumbing ------------------------------------------------------------------

    def send_bytes(self, status: int, body: bytes, ctype: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def send_json(self, status: int, data: Any, **headers: str) -> None:
        self.send_bytes(status, json.dumps(data).encode(), "application/json", headers)

    def start_chunked(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError as exc:
            raise ClientGone from exc

    def end_chunked(self) -> None:
        self.chunk(b"")

    def drop(self, reset: bool = True) -> None:
        """Close the socket at once; with `reset`, as an RST rather than a FIN."""
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.connection.close()

    def sleep_watching(self, seconds: float, call: Call) -> bool:
        """Sleep, but notice a client that goes away meanwhile; True if it did."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            if self.client_gone():
                call.disconnected_at = time.monotonic()
                return True
        return False

    def client_gone(self) -> bool:
        try:
            self.connection.setblocking(False)
            try:
                data = self.connection.recv(1, socket.MSG_PEEK)
            finally:
                self.connection.setblocking(True)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

    # -- routing -------------------------------------------------------------------

    def do_GET(self) -> None:
        with self.server.counting_request():
            self.serve_get()

    def serve_get(self) -> None:
        call = self.record(b"")
        if self.path.startswith("/api/tags"):
            self.send_json(200, {"models": [{"name": m, "model": m} for m in self.server.tags]})
        elif self.path.startswith("/v1/models"):
            data = [{"id": m, "object": "model", "owned_by": "fake"} for m in self.server.tags]
            self.send_json(200, {"object": "list", "data": data})
        else:
            self.send_json(404, {"error": "not found"})
        call.finished_at = time.monotonic()

    def do_POST(self) -> None:
        with self.server.counting_request():
            self.serve_post()

    def serve_post(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        call = self.record(raw)
        try:
            self.answer(call)
        except ClientGone:
            call.disconnected_at = call.disconnected_at or time.monotonic()
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            call.disconnected_at = call.disconnected_at or time.monotonic()
            self.close_connection = True
        call.finished_at = time.monotonic()

    def record(self, raw: bytes) -> Call:
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        call = Call(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=raw,
            json=parsed,
        )
        with self.server.lock:
            self.server.calls.append(call)
        return call

    def answer(self, call: Call) -> None:
        body = call.json if isinstance(call.json, dict) else {}
        model = str(body.get("model", ""))
        if self.path.startswith("/api/chat"):
            dialect = "chat"
        elif self.path.startswith("/api/generate"):
            dialect = "generate"
        elif self.path.startswith("/v1/chat/completions"):
            dialect = "openai"
        elif self.path.startswith("/api/embed"):
            dialect = "embed"
        elif self.path.startswith("/v1/embeddings"):
            dialect = "openai_embed"
        else:
            self.send_json(404, {"error": f"no route {self.path}"})
            return
        if not isinstance(call.json, dict) or not model:
            self.send_json(400, {"error": "missing model"})
            return
        said = model.rsplit("/", 1)[-1]
        if said.startswith("said-"):  # a real server's error answer (fakes/recorded.py)
            recorded = RECORDED[said.removeprefix("said-")]
            self.send_bytes(recorded.status, recorded.body, recorded.content_type, recorded.headers)
            return
        if not dialect.startswith("openai") and ("/" in model or model.startswith("missing")):
            self.send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return

        kind, n = behaviour(model)
        stream = bool(body.get("stream"))
        if kind == "hang":
            if self.sleep_watching(n / 1000, call):
                return
        elif kind == "fail":
            headers = {"Retry-After": "1"} if n in (429, 503) else {}
            self.send_error_body(dialect, n, f"fake failure {n}", headers)
            return
        elif kind == "retryafter":
            self.send_error_body(dialect, 429, "rate limited", {"Retry-After": str(n)})
            return
        elif kind == "flaky":
            with self.server.lock:
                seen = self.server.flaky_seen.get(model, 0)
                self.server.flaky_seen[model] = seen + 1
            if seen < n:
                self.send_error_body(dialect, 503, "warming up", {})
                return
        elif kind == "reset":
            self.drop(reset=True)
            return
        elif kind == "badjson":
            self.send_bytes(200, b"{not json at all", "application/json", {})
            return
        elif kind == "nochoices":
            if dialect == "openai":
                self.send_json(200, {"id": "x", "object": "chat.completion", "choices": []})
            else:
                self.send_json(200, {"model": model, "done": True})
            return

        elif kind == "tool" and dialect == "chat":
            self.answer_tool_call(model, body, stream)
            return
        if dialect in ("embed", "openai_embed"):
            self.answer_embed(call, dialect, model, body, kind, n)
            return
        if kind == "tool" and dialect == "openai":
            self.answer_openai_tool_call(model, body, stream)
            return

        text = ANSWER * 4000 if kind == "big" else ANSWER
        text, matched = cut_at_stop(text, body, dialect)
        thinking = THINKING if kind == "think" or body.get("think") is True else ""
        delay = n / 1000 if kind == "slow" else 0.0
        if stream:
            self.stream_answer(
                call, dialect, model, text, thinking, delay, kind=kind, n=n, matched=matched
            )
        else:
            if delay and self.sleep_watching(delay, call):
                return
            if kind == "break":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b'{"model": "break", "mess')
                self.wfile.flush()
                self.drop(reset=False)
                return
            answer = self.whole(dialect, model, text, thinking, body)
            if matched and dialect == "openai":
                answer["choices"][0]["stop_reason"] = matched
            self.send_json(200, answer)

    def answer_tool_call(self, model: str, body: dict[str, Any], stream: bool) -> None:
        """Ollama's tool-call answer: arguments as an object, empty content."""
        tools = body.get("tools") or [{}]
        name = ((tools[0] or {}).get("function") or {}).get("name", "none")
        call = {"function": {"name": name, "arguments": {"city": "Paris"}}}
        message = {"role": "assistant", "content": "", "tool_calls": [call]}
        final = {
            "model": model, "done": True, "done_reason": "stop",
            "prompt_eval_count": 7, "eval_count": 5,
        }  # fmt: skip
        if not stream:
            self.send_json(200, {**final, "message": message})
            return
        self.start_chunked("application/x-ndjson")
        self.chunk(ndjson({"model": model, "message": message, "done": False}))
        self.chunk(ndjson({**final, "message": {"role": "assistant", "content": ""}}))
        self.end_chunked()

    def answer_embed(
        self, call: Call, dialect: str, model: str, body: dict[str, Any], kind: str, n: int
    ) -> None:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            self.send_error_body(dialect, 400, "input must be text", {})
            return
        with self.server.lock:
            self.server.embed_in_flight += 1
            self.server.peak_embed_in_flight = max(
                self.server.peak_embed_in_flight, self.server.embed_in_flight
            )
        try:
            if "!reset" in inputs:
                self.drop(reset=True)
                return
            if kind == "slow" and self.sleep_watching(n / 1000, call):
                return
            dims = body.get("dimensions") or 4
            vectors = [fake_vector(text, dims) for text in inputs]
            if kind == "wrongcount":
                vectors = vectors[:-1]
            elif kind == "ragged" and len(vectors) > 1:
                vectors[1] = vectors[1][:-1]
            tokens = sum(len(text.split()) for text in inputs)
        finally:
            with self.server.lock:
                self.server.embed_in_flight -= 1
        if dialect == "embed":
            self.send_json(
                200, {"model": model, "embeddings": vectors, "prompt_eval_count": tokens}
            )
            return
        base64_wanted = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                    if base64_wanted
                    else v
                ),
            }
            for i, v in enumerate(vectors)
        ]
        data.reverse()  # `index`, not position, says which input a vector is for
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self.send_json(200, {"object": "list", "data": data, "model": model, "usage": usage})

    def answer_openai_tool_call(self, model: str, body: dict[str, Any], stream: bool) -> None:
        """OpenAI's tool-call answer: arguments as a JSON string; streamed, in pieces."""
        tools = body.get("tools") or [{}]
        name = ((tools[0] or {}).get("function") or {}).get("name", "none")
        usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
        if not stream:
            call = {"id": "call_fake1", "type": "function",
                    "function": {"name": name, "arguments": '{"city": "Paris"}'}}  # fmt: skip
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            answer = {**chunk_body(model, {}, None), "object": "chat.completion"}
            self.send_json(200, {**answer, "choices": [choice], "usage": usage})
            return
        self.start_chunked("text/event-stream")
        self.chunk(sse(chunk_body(model, {"role": "assistant", "content": None}, None)))
        first = {"index": 0, "id": "call_fake1", "type": "function",
                 "function": {"name": name, "arguments": ""}}  # fmt: skip
        self.chunk(sse(chunk_body(model, {"tool_calls": [first]}, None)))
        for piece in ('{"city": ', '"Paris"}'):
            more = {"index": 0, "function": {"arguments": piece}}
            self.chunk(sse(chunk_body(model, {"tool_calls": [more]}, None)))
        self.chunk(sse(chunk_body(model, {}, "tool_calls")))
        options = body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            self.chunk(sse({**chunk_body(model, {}, None), "choices": [], "usage": usage}))
        self.chunk(b"data: [DONE]\n\n")
        self.end_chunked()

    def send_error_body(
        self, dialect: str, status: int, message: str, headers: dict[str, str]
    ) -> None:
        if dialect.startswith("openai"):
            data: Any = {"error": {"message": message, "type": "fake_error", "code": status}}
        else:
            data = {"error": message}
        self.send_json(status, data, **headers)

    # -- bodies ----------------------------------------------------------------------

    def whole(
        self, dialect: str, model: str, text: str, thinking: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        prompt_tokens = max(1, len(json.dumps(body.get("messages") or body.get("prompt"))) // 4)
        out_tokens = len(text.split())
        if dialect == "chat":
            message = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            return {
                "model": model, "created_at": "2026-11-25T00:00:00Z", "message": message,
                "done": True, "done_reason": "stop", "total_duration": 1000,
                "prompt_eval_count": prompt_tokens, "eval_count": out_tokens,
            }  # fmt: skip
        if dialect == "generate":
            data = {
                "model": model, "created_at": "2026-11-25T00:00:00Z", "response": text,
                "done": True, "done_reason": "stop",
                "prompt_eval_count": prompt_tokens, "eval_count": out_tokens,
            }  # fmt: skip
            if thinking:
                data["thinking"] = thinking
            return data
        message = {"role": "assistant", "content": text}
        if thinking:
            message["reasoning"] = thinking
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 1764028800,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": with_cost(model, {
                "prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                "total_tokens": prompt_tokens + out_tokens,
            }),
        }  # fmt: skip

    def stream_answer(
        self,
        call: Call,
        dialect: str,
        model: str,
        text: str,
        thinking: str,
        delay: float,
        *,
        kind: str,
        n: int,
        matched: str | None = None,
    ) -> None:
        pieces = words(text)
        thoughts = words(thinking) if thinking else []
        gap = delay / max(1, len(pieces) + len(thoughts))
        body = call.json or {}
        prompt_tokens = max(1, len(json.dumps(body.get("messages") or body.get("prompt"))) // 4)
        openai = dialect == "openai"
        self.start_chunked("text/event-stream" if openai else "application/x-ndjson")
        if openai:
            self.chunk(b": OPENROUTER PROCESSING\n\n")
            self.chunk(sse(chunk_body(model, {"role": "assistant", "content": ""}, None)))
        for i, piece in enumerate(thoughts + pieces):
            if kind == "break" and i == 3:
                self.drop(reset=False)
                raise ClientGone  # not the client, but nothing more can be sent
            if kind == "stall" and i == 3 and self.sleep_watching(n / 1000, call):
                raise ClientGone
            if kind == "errmid" and i == 3:
                if openai:
                    error = {"message": "upstream overloaded", "code": 502}
                    self.chunk(sse({**chunk_body(model, {}, "error"), "error": error}))
                else:
                    self.chunk(ndjson({"error": "upstream overloaded"}))
                self.end_chunked()
                return
            if gap and self.sleep_watching(gap, call):
                raise ClientGone
            is_thought = i < len(thoughts)
            if openai:
                delta = {"reasoning": piece} if is_thought else {"content": piece}
                data = sse(chunk_body(model, delta, None))
                if i == 1:
                    data = b": OPENROUTER PROCESSING\n\n" + data
            elif dialect == "chat":
                message = {"role": "assistant", "content": "" if is_thought else piece}
                if is_thought:
                    message["thinking"] = piece
                data = ndjson({"model": model, "message": message, "done": False})
            else:
                line = {"model": model, "response": "" if is_thought else piece, "done": False}
                if is_thought:
                    line["thinking"] = piece
                data = ndjson(line)
            self.chunk(data)
        out_tokens = len(pieces)
        if openai:
            last = chunk_body(model, {}, "stop")
            if matched:
                last["choices"][0]["stop_reason"] = matched
            self.chunk(sse(last))
            options = body.get("stream_options") or {}
            if isinstance(options, dict) and options.get("include_usage"):
                usage = with_cost(model, {
                    "prompt_tokens": prompt_tokens, "completion_tokens": out_tokens,
                    "total_tokens": prompt_tokens + out_tokens,
                })  # fmt: skip
                self.chunk(sse({**chunk_body(model, {}, None), "choices": [], "usage": usage}))
            self.chunk(b"data: [DONE]\n\n")
        else:
            final: dict[str, Any] = {
                "model": model, "done": True, "done_reason": "stop",
                "prompt_eval_count": prompt_tokens, "eval_count": out_tokens,
            }  # fmt: skip
            if dialect == "chat":
                final["message"] = {"role": "assistant", "content": ""}
            else:
                final["response"] = ""
            self.chunk(ndjson(final))
        self.end_chunked()


def cut_at_stop(text: str, body: dict[str, Any], dialect: str) -> tuple[str, str | None]:
    """The answer up to the first of the request's stop sequences, and which one it was."""
    options = body.get("options")
    stops = body.get("stop") if dialect == "openai" else (options or {}).get("stop")
    stops = [stops] if isinstance(stops, str) else stops if isinstance(stops, list) else []
    found = [(text.find(s), s) for s in stops if isinstance(s, str) and s and s in text]
    if not found:
        return text, None
    at, stop = min(found)
    return text[:at], stop


def with_cost(model: str, usage: dict[str, Any]) -> dict[str, Any]:
    """OpenRouter reports what a call cost: `cost-<micro>` models say `<micro>` / 1e6 USD."""
    kind, n = behaviour(model)
    if kind == "cost":
        usage["cost"] = n / 1_000_000
    return usage


def chunk_body(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1764028800,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }  # fmt: skip


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def ndjson(data: Any) -> bytes:
    return json.dumps(data).encode() + b"\n"


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.flaky_seen: dict[str, int] = {}
        self.tags = ["qwen3.5:latest", "llama3.2:latest"]
        # Leak checks (read under `lock`): requests being answered, connections being served.
        self.in_flight = 0
        self.peak_in_flight = 0
        self.embed_in_flight = 0
        self.peak_embed_in_flight = 0
        self.open_connections = 0
        self.peak_connections = 0
        self.accepted_connections = 0

    @contextlib.contextmanager
    def counting_request(self) -> Iterator[None]:
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self.lock:
                self.in_flight -= 1

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self.lock:
            self.accepted_connections += 1
            self.open_connections += 1
            self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.open_connections -= 1


class FakeUpstream:
    """`with FakeUpstream() as fake:` serves on `fake.url` from a background thread."""

    def __init__(self) -> None:
        self.server = FakeServer()
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def calls(self) -> list[Call]:
        with self.server.lock:
            return list(self.server.calls)

    def calls_to(self, path: str) -> list[Call]:
        return [c for c in self.calls if c.path.split("?", 1)[0] == path]

    def reset(self) -> None:
        with self.server.lock:
            self.server.calls.clear()
            self.server.flaky_seen.clear()

    def reset_peaks(self) -> None:
        with self.server.lock:
            self.server.peak_in_flight = self.server.in_flight
            self.server.peak_embed_in_flight = self.server.embed_in_flight

    def counters(self) -> dict[str, int]:
        """In-flight requests and open client connections now, and their peaks."""
        with self.server.lock:
            return {
                "in_flight": self.server.in_flight,
                "peak_in_flight": self.server.peak_in_flight,
                "peak_embed_in_flight": self.server.peak_embed_in_flight,
                "open_connections": self.server.open_connections,
                "peak_connections": self.server.peak_connections,
                "accepted_connections": self.server.accepted_connections,
            }

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return bool(predicate())

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main() -> None:
    """`python -m tests.fakes.upstream [PORT]`: serve until interrupted (for trying chatd)."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 11434
    server = FakeServer(port)
    print(f"fake upstream on http://127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
