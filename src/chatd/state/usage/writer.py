"""The background writer: rows wait in a bounded in-memory buffer and go to the database
in batches, at least once a second; while it is down they wait (and beyond
`usage_buffer_rows` are dropped, counted and logged). Nothing here runs on a request."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable

from chatd.state.usage import Backend, Row
from chatd.tasks import stop

log = logging.getLogger("chatd")

FLUSH_SECS = 0.5
BATCH_ROWS = 2000
RETRY_MAX_SECS = 2.0
LOG_EVERY_SECS = 60.0


class UsageWriter:
    """`enqueue(row)` on the request's way out; a task writes batches to `backend`."""

    def __init__(
        self,
        backend: Backend,
        max_rows: int,
        on_drop: Callable[[], None] = lambda: None,
        flush_secs: float = FLUSH_SECS,
    ) -> None:
        self.backend = backend
        self.max_rows = max_rows
        self.on_drop = on_drop
        self.flush_secs = flush_secs
        self.rows: deque[Row] = deque()
        self.dropped = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failing_since: float | None = None
        self._logged_failure = 0.0
        self._logged_drop = 0.0
        # (key, n): the buffer's first n rows went out as batch `key` and the write failed,
        # perhaps after the database committed it (a lost answer to COMMIT). They go out
        # again as that same batch, which the database knows to skip (docs/usage-ledger.md).
        self._unsure: tuple[str, int] | None = None
        # A batch's key: this process's random prefix and a count (one urandom a process).
        self._keys = map(f"{uuid.uuid4().hex}-{{}}".format, itertools.count())

    def enqueue(self, row: Row) -> None:
        if len(self.rows) < self.max_rows:
            self.rows.append(row)
            return
        self.dropped += 1
        self.on_drop()
        now = time.monotonic()
        if now - self._logged_drop >= LOG_EVERY_SECS or self.dropped == 1:
            self._logged_drop = now
            log.warning(
                "usage ledger: buffer full (%d rows), %d rows dropped so far",
                self.max_rows,
                self.dropped,
            )

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = self.flush_secs
        while True:
            await asyncio.sleep(delay)
            delay = self.flush_secs if await self.flush() else min(RETRY_MAX_SECS, delay * 2)

    async def flush(self) -> bool:
        """Write every buffered row; False (rows kept) when the database refused."""
        async with self._lock:
            while self.rows:
                # Out of the buffer before the write, and the write shielded: a flush
                # cancelled mid-write (a caller's `/v1/usage` giving up, shutdown) must
                # neither lose the batch nor leave it to be written a second time.
                key, size = self._unsure or (next(self._keys), min(BATCH_ROWS, len(self.rows)))
                batch = [self.rows.popleft() for _ in range(size)]
                write = asyncio.ensure_future(self.backend.write(batch, key))
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    write.add_done_callback(
                        lambda done, rows=batch, key=key: self._settle(done, rows, key)
                    )
                    raise
                except Exception as exc:
                    self._put_back(batch, key)
                    self._failed(exc)
                    return False
                self._written(batch, key)
                if self._failing_since is not None:
                    log.warning(
                        "usage ledger: database back after %.1fs; buffered rows written",
                        time.monotonic() - self._failing_since,
                    )
                    self._failing_since = None
            return True

    def _settle(self, write: asyncio.Future[None], batch: list[Row], key: str) -> None:
        """A write whose flush was cancelled has ended: count it, or put its rows back."""
        if not write.cancelled() and write.exception() is None:
            self._written(batch, key)
        else:
            self._put_back(batch, key)

    def _put_back(self, batch: list[Row], key: str) -> None:
        self.rows.extendleft(reversed(batch))
        self._unsure = (key, len(batch))

    def _written(self, batch: list[Row], key: str) -> None:
        self.written += len(batch)
        if self._unsure is not None and self._unsure[0] == key:
            self._unsure = None

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._logged_failure >= LOG_EVERY_SECS:
            self._logged_failure = now
            log.warning(
                "usage ledger: cannot write (%s); %d rows wait in memory",
                describe(exc),
                len(self.rows),
            )

    async def aclose(self, grace_secs: float = 10.0) -> None:
        """Stop the loop and write what is buffered, trying for up to `grace_secs`."""
        await stop(self._task)
        self._task = None
        deadline = time.monotonic() + grace_secs
        try:
            while not await asyncio.wait_for(self.flush(), max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(0.2)
        except TimeoutError:
            pass
        if self.rows:
            log.warning("usage ledger: %d rows not written at shutdown", len(self.rows))
        try:
            await self.backend.aclose()
        except Exception as exc:
            log.warning("usage ledger: close failed (%s)", describe(exc))


def describe(exc: Exception) -> str:
    """The failure's kind and a short, credential-free reason (URLs are not quoted)."""
    text = str(exc).split("\n", 1)[0][:200]
    if "://" in text:
        text = ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
