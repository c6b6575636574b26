"""The ledger as the app sees it: a row per finished request (from its facts), the
writer that takes it away, and the spend read back at start."""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Scope

from chatd.state.usage import open_backend
from chatd.state.usage.maintenance import Maintenance
from chatd.state.usage.writer import UsageWriter, describe
from chatd.telemetry.requestlog import clip

log = logging.getLogger("chatd")

LEDGER_STATUSES = frozenset({401, 403, 429})  # refusals get a row even without a model


class Ledger:
    def __init__(
        self,
        url: str,
        buffer_rows: int,
        on_drop: Any = lambda: None,
        retention_days: int = 90,
        on_pruned: Any = lambda n: None,
        on_pending: Any = lambda days: None,
    ) -> None:
        self.backend = open_backend(url)
        self.writer = UsageWriter(self.backend, buffer_rows, on_drop)
        self.upkeep = Maintenance(self.backend, retention_days, on_pruned, on_pending)

    async def start(self, callers: Any = None) -> None:
        """Create (or upgrade) the schema, give callers back their spend (whole days from
        the daily table), start the writer, then the backfill and pruning."""
        try:
            await self.backend.open()
            if callers is not None:
                await self.load_spend(callers)
        except Exception as exc:
            log.warning(
                "usage ledger: database unreachable at start (%s); rows will wait in memory, "
                "and spend this period starts from 0",
                describe(exc),
            )
        self.writer.start()
        self.upkeep.start()

    async def load_spend(self, callers: Any) -> None:
        """Give callers with a budget their spend this period, as the ledger has it."""
        periods = {name: s.timestamp() for name, s in callers.budget_periods().items()}
        if periods:
            await callers.load_spend(await self.backend.spend_since(periods))

    def record(
        self,
        scope: Scope,
        facts: dict[str, Any],
        status: int,
        seconds: float,
        cost: float,
        source: str,
    ) -> None:
        """Enqueue the request's row when it reached the dispatcher or was refused."""
        if facts.get("model") is None and status not in LEDGER_STATUSES:
            return
        state = scope.get("state") or {}
        self.writer.enqueue(
            (
                time.time() - seconds,
                state.get("request_id"),
                facts.get("caller"),
                scope.get("path"),
                clip(facts.get("model")),
                facts.get("provider"),
                facts.get("endpoint"),
                clip(facts.get("upstream_model")),
                status,
                facts.get("error"),
                facts.get("input_tokens"),
                facts.get("output_tokens"),
                cost,
                source,
                round(seconds * 1000, 1),
                facts.get("ttft_ms"),
                facts.get("attempts"),
                facts.get("cache"),
            )
        )

    async def aclose(self, grace_secs: float) -> None:
        await self.upkeep.aclose()
        await self.writer.aclose(grace_secs)
