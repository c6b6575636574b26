"""What a call cost: the upstream's own figure, else tokens × `[chatd.prices]`
(the most specific glob over "provider/upstream_model" wins), else 0."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

from chatd.config import Price

WILDCARDS = "*?["
CACHE_LIMIT = 4096  # model names are the caller's text: keep the memo bounded


def specificity(pattern: str) -> tuple[int, int]:
    """More literal characters = more specific; an exact name beats every glob."""
    literal = sum(1 for ch in pattern if ch not in WILDCARDS)
    exact = not any(ch in pattern for ch in WILDCARDS)
    return (1 if exact else 0, literal)


class Prices:
    def __init__(self, prices: dict[str, Price]) -> None:
        self.entries = sorted(prices.items(), key=lambda item: specificity(item[0]), reverse=True)
        self._memo: dict[str, Price | None] = {}

    def lookup(self, provider: str, model: str) -> Price | None:
        name = f"{provider}/{model}"
        if name in self._memo:
            return self._memo[name]
        found = next((price for pattern, price in self.entries if fnmatchcase(name, pattern)), None)
        if len(self._memo) >= CACHE_LIMIT:
            self._memo.clear()
        self._memo[name] = found
        return found

    def cost(self, facts: dict[str, Any]) -> tuple[float, str]:
        """(cost_usd, cost_source) from a request's facts."""
        upstream = facts.get("cost_usd")
        if upstream is not None:
            return float(upstream), "upstream"
        provider = facts.get("provider")
        if not self.entries or provider is None:
            return 0.0, "none"
        price = self.lookup(provider, facts.get("upstream_model") or "")
        if price is None:
            return 0.0, "none"
        tokens_in = facts.get("input_tokens") or 0
        tokens_out = facts.get("output_tokens") or 0
        return (tokens_in * price.input + tokens_out * price.output) / 1_000_000, "price"
