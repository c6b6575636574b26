"""A small Redis client for the request path (docs/shared-state.md): one connection, and
every command asked for in one turn of the event loop goes out in one write; Redis
answers in order, so each answer goes to the oldest waiting caller.

Why not redis-py's asyncio client: per command it takes a connection from its pool, packs,
writes and reads on its own, ~78 µs of CPU per call at c=32 on the bench machine against
~13 µs here (measured side by side, EVALSHA on a local Redis; docs/shared-state.md). At
one or two calls per request that difference is most of the gap between a gateway with
Redis and one without. RESP2 only, the few reply types chatd's commands return.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import unquote, urlsplit


class RedisReplyError(Exception):
    """An error reply from Redis (`-ERR ...`, `-NOSCRIPT ...`)."""


class Lost(ConnectionError):
    """The connection closed (or could not open) before Redis answered."""


def pack(args: tuple[Any, ...] | list[Any]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    return b"*%d\r\n" % len(args) + bulks(args)


LENGTHS = [b"$%d\r\n" % size for size in range(1024)]  # bulk strings' heads, made once


def bulks(args: tuple[Any, ...] | list[Any]) -> bytes:
    """Arguments as RESP bulk strings: a command's tail, or pieces of one made once."""
    out: list[bytes] = []
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        size = len(data)
        out += (LENGTHS[size] if size < 1024 else b"$%d\r\n" % size, data, b"\r\n")
    return b"".join(out)


def parse(buf: bytearray, pos: int) -> tuple[Any, int] | None:
    """One reply at `pos`: (value, position after it), or None while it is incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line, pos = buf[pos], bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x2B:  # +simple
        return line, pos
    if kind == 0x2D:  # -error
        return RedisReplyError(line.decode(errors="replace")), pos
    if kind == 0x3A:  # :integer
        return int(line), pos
    if kind == 0x24:  # $bulk
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            return None
        return bytes(buf[pos : pos + size]), pos + size + 2
    if kind == 0x2A:  # *array
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            found = parse(buf, pos)
            if found is None:
                return None
            item, pos = found
            items.append(item)
        return items, pos
    raise Lost(f"unexpected reply type {chr(kind)!r}")


class _Protocol(asyncio.Protocol):
    def __init__(self, pipe: RedisPipe) -> None:
        self.pipe = pipe
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf, waiting = self.buf, self.pipe.waiting
        buf += data
        pos = 0
        while waiting:
            try:
                found = parse(buf, pos)
            except Exception as exc:  # a reply we cannot read: nothing after it is safe
                self.pipe.drop(exc)
                return
            if found is None:
                break
            value, pos = found
            future = waiting.popleft()[0]
            if not future.done():  # its caller may have timed out and left
                future.set_result(value)
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self, exc)


class RedisPipe:
    """One pipelined connection to the Redis of a `redis://` or `rediss://` URL (its user,
    password and database number included). Opens on first use and again after a loss."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.db = int(parts.path.strip("/") or 0)
        self.timeout = timeout  # a command's, unless told otherwise; and connecting's
        # Callers waiting for a reply, oldest first, each with its deadline.
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._out: list[bytes] = []
        self._opening: asyncio.Lock = asyncio.Lock()
        self._watching: asyncio.TimerHandle | None = None

    async def call(self, *args: Any, within: float | None = None) -> Any:
        """One command's answer; an error reply raises RedisReplyError, a lost connection
        Lost, no answer `within` seconds (default: the pipe's timeout) TimeoutError."""
        return await self.send(pack(args), within)

    async def send(self, command: bytes, within: float | None = None) -> Any:
        """`call` for a command already in RESP (`pack`, or pieces made once)."""
        if self._transport is None:
            await self._open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting.append((future, loop.time() + (within or self.timeout)))
        if not self._out:
            loop.call_soon(self._write)
        if self._watching is None:
            self._watching = loop.call_later(self.timeout / 4, self._expire)
        self._out.append(command)
        value = await future
        if isinstance(value, RedisReplyError):
            raise value
        return value

    async def script(
        self, script: Script, keys: list[Any], args: list[Any], within: float | None = None
    ) -> Any:
        """EVALSHA, or EVAL the first time this Redis sees the script (NOSCRIPT)."""
        try:
            return await self.call(b"EVALSHA", script.sha, len(keys), *keys, *args, within=within)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.call(b"EVAL", script.text, len(keys), *keys, *args, within=within)

    def _expire(self) -> None:
        """Fail the callers whose deadline has passed (their replies, if they come, are
        skipped in turn). One timer for the whole pipe, only while callers wait: no timer
        per command."""
        self._watching = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for future, deadline in self.waiting:
            if deadline <= now and not future.done():
                future.set_exception(TimeoutError())
        self._watching = loop.call_later(self.timeout / 4, self._expire)

    def _write(self) -> None:
        data = b"".join(self._out)
        self._out.clear()
        if self._transport is not None:
            self._transport.write(data)

    async def _open(self) -> None:
        async with self._opening:
            if self._transport is not None:
                return
            loop = asyncio.get_running_loop()
            context = ssl.create_default_context() if self.tls else None
            try:
                async with asyncio.timeout(self.timeout):
                    transport, protocol = await loop.create_connection(
                        lambda: _Protocol(self), self.host, self.port, ssl=context
                    )
            except (OSError, TimeoutError) as exc:
                raise Lost(f"cannot connect: {type(exc).__name__}") from None
            self._transport, self._protocol = transport, protocol  # type: ignore[assignment]
            hello: list[tuple[Any, ...]] = []
            if self.password is not None:
                user = (self.username,) if self.username else ()
                hello.append((b"AUTH", *user, self.password))
            if self.db:
                hello.append((b"SELECT", self.db))
            for command in hello:  # first on the wire: before any caller's command
                future = loop.create_future()
                self.waiting.append((future, loop.time() + self.timeout))
                transport.write(pack(command))
                async with asyncio.timeout(self.timeout):
                    reply = await future
                if isinstance(reply, RedisReplyError):
                    self.drop(reply)
                    raise Lost(f"{command[0].decode()} refused") from None

    def drop(self, exc: BaseException | None = None) -> None:
        """Close the connection; every caller still waiting gets Lost."""
        transport, self._transport = self._transport, None
        self._protocol = None
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        if transport is not None:
            transport.abort()
        self._fail_waiting()

    def lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._transport = None
            self._fail_waiting()

    def _fail_waiting(self) -> None:
        self._out.clear()
        waiting, self.waiting = self.waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(Lost("connection to Redis lost"))

    async def aclose(self) -> None:
        self.drop()


class Script:
    """A Lua script known by its SHA1, as EVALSHA wants it."""

    def __init__(self, text: str) -> None:
        self.text = text.encode()
        self.sha = hashlib.sha1(self.text).hexdigest().encode()  # noqa: S324 - Redis's id
