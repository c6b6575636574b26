"""The 429s a caller over a limit gets, made only when refusing (docs/shared-state.md)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from chatd.errors import BudgetExceeded, ChatdError, RateLimited

if TYPE_CHECKING:
    from chatd.state.caller import Caller


def over_budget(caller: Caller, spent: float, ends_at: str, left: float) -> ChatdError:
    """429 budget_exceeded: the period's spend has reached the budget."""
    return BudgetExceeded(
        f"caller {caller.name} has spent ${spent:.4f} of its "
        f"${caller.budget_usd:g} {caller.budget_period} budget; "
        f"the period ends {ends_at}",
        headers={"Retry-After": str(max(1, math.ceil(left)))},
    )


def over_concurrency(caller: Caller) -> ChatdError:
    """429 rate_limited: the caller has max_concurrency requests in flight here."""
    return RateLimited(
        f"caller {caller.name} has {caller.in_flight} requests in flight "
        f"(max_concurrency {caller.max_concurrency})",
        headers={"Retry-After": "1"},
    )


def over_rate(caller: Caller, what: str, limit: int, reset: float) -> ChatdError:
    """429 rate_limited over rpm ("requests") or tpm ("tokens")."""
    return RateLimited(
        f"caller {caller.name} is over its {limit} {what} per minute",
        headers={"Retry-After": str(max(1, math.ceil(reset)))},
    )
