"""Each caller's spend and tokens in its current budget period: what `/ui` shows.

Spend is what the limits enforce (the callers' store: in process, or shared through
Redis); tokens come from the ledger, one grouped query per distinct period start.
"""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from chatd.state.callers import Caller, Callers
from chatd.state.usage.ledger import Ledger
from chatd.state.usage.report import shape


async def spend_report(callers: Callers, ledger: Ledger | None) -> list[dict[str, Any]]:
    """`[{caller, spend_usd, budget_usd, input_tokens, output_tokens, period}]`."""
    now = time.time()
    by_start: dict[float, list[Caller]] = defaultdict(list)
    for caller in callers.callers.values():
        by_start[caller.period_start(now).timestamp()].append(caller)
    rows: list[dict[str, Any]] = []
    for since, group in by_start.items():
        used: dict[str, dict[str, Any]] = {}
        if ledger is not None:
            summary = await ledger.backend.summary(since, now + 1, None, ["caller"])
            used = {row["caller"]: row for row in shape(summary)}
        for caller in group:
            row = used.get(caller.name, {})
            spent = row.get("cost_usd", 0.0)
            if caller.budget_usd:  # what the budget is checked against
                spent = await callers.store.get(caller.period(now)[0])
            rows.append(
                {
                    "caller": caller.name,
                    "spend_usd": round(spent, 6),
                    "budget_usd": caller.budget_usd,
                    "input_tokens": row.get("input_tokens", 0),
                    "output_tokens": row.get("output_tokens", 0),
                    "period": f"{caller.budget_period} from "
                    f"{datetime.fromtimestamp(since, UTC):%Y-%m-%d}",
                }
            )
    return sorted(rows, key=lambda row: row["caller"])
