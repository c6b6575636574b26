"""What admission answers besides "go on" (docs/shared-state.md): the `X-RateLimit-*`
headers, as OpenAI names them, and the 429s a caller over a limit gets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from chatd.errors import BudgetExceeded, ChatdError, RateLimited

if TYPE_CHECKING:
    from chatd.state.callers import Caller

# OpenAI's `X-RateLimit-{Limit,Remaining,Reset}-{Requests,Tokens}`, names encoded once.
PARTS = ("limit", "remaining", "reset")
REQUESTS = tuple(f"x-ratelimit-{part}-requests".encode() for part in PARTS)
TOKENS = tuple(f"x-ratelimit-{part}-tokens".encode() for part in PARTS)


def rate_headers(
    names: tuple[bytes, ...], limit: bytes, remaining: float, reset: float
) -> list[tuple[bytes, bytes]]:
    """One limit's three headers: `names` is REQUESTS or TOKENS, `limit` encoded."""
    remaining_text = str(int(remaining)).encode()
    return [(names[0], limit), (names[1], remaining_text), (names[2], reset_text(reset))]


_RESET_TEXTS: dict[int, bytes] = {}  # a whole second (or -1 - ms below one) -> its text


def reset_text(seconds: float) -> bytes:
    """`format_reset`, encoded, made once per distinct second (a window's reset is at most
    60 s away: ~1,060 texts in all) rather than on every answer."""
    key = math.ceil(seconds) if seconds >= 1 else -1 - max(0, round(seconds * 1000))
    text = _RESET_TEXTS.get(key)
    if text is None:
        text = format_reset(seconds).encode()
        if len(_RESET_TEXTS) < 4096:
            _RESET_TEXTS[key] = text
    return text


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `250ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


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
