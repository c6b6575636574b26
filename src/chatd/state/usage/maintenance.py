"""The ledger's upkeep, in the background (docs/usage-ledger.md): the
backfill of a ledger written before the daily table, then pruning of rows older than
`usage_retention_days` — at start, then hourly — in small transactions.

A back end offers `maintenance()`, an async context giving this process its turn (on
PostgreSQL: an advisory lock, so one replica at a time; None while another has it) as
an object with `backfill_step()`, `mark_pruned(cutoff)` and `prune_chunk(cutoff, n)`, the
last giving the rows deleted and the seconds its transaction took (on the database's
side of the hand-off: not the event loop's delays).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from chatd.state.usage.rollup import DAY, floor_day
from chatd.state.usage.writer import describe
from chatd.tasks import stop

log = logging.getLogger("chatd")

# A prune transaction is bounded by rows and by time: it starts at PRUNE_ROWS rows, and
# the next one halves while one takes longer than CHUNK_SECS, doubles while one takes
# under half of it, between PRUNE_MIN_ROWS and PRUNE_MAX_ROWS: a batch write queued
# behind one waits about CHUNK_SECS at most (docs/usage-ledger.md; on SQLite it
# interrupts one under way).
PRUNE_ROWS = 200
PRUNE_MIN_ROWS = 10
PRUNE_MAX_ROWS = 1000
CHUNK_SECS = 0.005
# After each, rest this many times as long as it took as the event loop saw it: the
# busier the loop (the more requests chatd is serving), the longer the rest.
REST = 1.0
EVERY_SECS = 3600.0  # pruning: at start, then hourly
RETRY_SECS = 30.0  # while another replica has the turn, or the database is away
LOG_EVERY_SECS = 600.0


class Maintenance:
    def __init__(
        self,
        backend: Any,
        retention_days: int,
        on_pruned: Callable[[int], None] = lambda n: None,
        on_pending: Callable[[float], None] = lambda days: None,
    ) -> None:
        self.backend = backend
        self.retention_days = retention_days
        self.on_pruned = on_pruned
        self.on_pending = on_pending
        self.pruned = 0
        self.pending: float | None = None  # days left to backfill; None: not known yet
        self.pruning = False
        self._task: asyncio.Task[None] | None = None
        self._logged = -LOG_EVERY_SECS

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                done = await self.once()
            except Exception as exc:
                now = time.monotonic()
                if now - self._logged >= LOG_EVERY_SECS:  # the writer says the rest
                    self._logged = now
                    log.warning("usage ledger: upkeep failed (%s); trying again", describe(exc))
                done = False
            await asyncio.sleep(EVERY_SECS if done else RETRY_SECS)

    async def once(self, now: float | None = None) -> bool:
        """Backfill what is left, then prune; False when another replica had the turn."""
        async with self.backend.maintenance() as turn:
            if turn is None:
                return False
            while True:
                self.pending = await turn.backfill_step()
                self.on_pending(self.pending)
                if not self.pending:
                    break
                await asyncio.sleep(0)  # writes go first
            if self.retention_days:
                await self.prune(turn, time.time() if now is None else now)
        return True

    async def prune(self, turn: Any, now: float) -> int:
        """Delete the rows of whole UTC days older than the retention, a short chunk at a
        time, resting as long as each chunk took so that writes never queue behind them."""
        cutoff = floor_day(now - self.retention_days * DAY)
        if not await turn.mark_pruned(cutoff):
            return 0
        total = 0
        rows = PRUNE_ROWS
        self.pruning = True
        try:
            while True:
                began = time.monotonic()
                deleted, took = await turn.prune_chunk(cutoff, rows)
                waited = time.monotonic() - began  # longer than `took` while the loop is busy
                if deleted:
                    total += deleted
                    self.pruned += deleted
                    self.on_pruned(deleted)
                if deleted < rows:
                    break
                rows = next_rows(rows, took)
                await asyncio.sleep(min(0.5, REST * waited))
        finally:
            self.pruning = False
        if total:
            log.info("usage ledger: %d rows older than %d days pruned", total, self.retention_days)
        return total

    async def aclose(self) -> None:
        await stop(self._task)
        self._task = None


def next_rows(rows: int, took: float) -> int:
    """The next prune chunk's rows, after one of `rows` took `took` seconds."""
    if took > CHUNK_SECS:
        return max(PRUNE_MIN_ROWS, rows // 2)
    if took < CHUNK_SECS / 2:
        return min(PRUNE_MAX_ROWS, rows * 2)
    return rows
