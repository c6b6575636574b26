"""What the dispatcher reports as it works; the metrics listen (docs/operations.md)."""

from __future__ import annotations


class Observer:
    """What the dispatcher reports as it works (metrics.py listens); no-ops here."""

    def upstream_call(self, provider: str, seconds: float) -> None:
        """One upstream call ended (for a stream: its first event came), however it ended."""

    def busy(self, provider: str, calls: int) -> None:
        """The provider now has `calls` upstream calls (or open streams) in flight."""

    def retried(self, provider: str) -> None:
        """A call to `provider` is being retried."""

    def fell_back(self) -> None:
        """A request moved on to its next fallback target."""

    def cooled_down(self, provider: str) -> None:
        """`provider`'s breaker tripped: a cooldown began."""

    def endpoint_call(self, provider: str, endpoint: str, seconds: float) -> None:
        """One upstream call to one endpoint of a balanced provider ended (docs/routing.md)."""

    def endpoint_busy(self, provider: str, endpoint: str, calls: int) -> None:
        """The endpoint now has `calls` upstream calls (or open streams) in flight."""

    def hedged(self, provider: str, outcome: str) -> None:
        """A hedge was sent; `outcome` "won" (it answered first) or "lost"."""
