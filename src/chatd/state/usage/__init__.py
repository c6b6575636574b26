"""The usage ledger (docs/callers-and-usage.md): one row per request, written off the request path.

`ledger.Ledger` builds rows from a finished request's facts and hands them to
`writer.UsageWriter`, which batches them into a `Backend` (`sqlite.py` or
`postgres.py`), each batch with its sums per day in `chatd_usage_daily` (`rollup.py`);
`report.py` and `rollup.py` answer `GET /v1/usage` and `chatd usage` from either, and
`maintenance.py` backfills an older ledger's daily table and prunes old rows.
"""

from __future__ import annotations

from typing import Any, Protocol

# The ledger row, in this order (a tuple: building it is the only per-request cost).
COLUMNS = (
    "time", "request_id", "caller", "route", "model", "provider", "endpoint",
    "upstream_model", "status", "error", "input_tokens", "output_tokens", "cost_usd",
    "cost_source", "latency_ms", "ttft_ms", "attempts", "cache",
)  # fmt: skip
Row = tuple[Any, ...]
GROUP_KEYS = ("caller", "model", "provider", "day")


class Backend(Protocol):
    """Where rows go: created with a URL, `open()`ed at start (schema created then or
    on the first write that reaches the database)."""

    async def open(self) -> None: ...

    async def write(self, rows: list[Row], key: str = "") -> None:
        """One batch, whole or not at all. A batch sent again with the same `key` after a
        failed write is not written twice, should the failed try have committed."""

    async def summary(
        self, since: float, until: float, caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]: ...

    async def report(
        self,
        since: float,
        until: float,
        caller: str | None,
        group_by: list[str],
        now: float | None = None,
    ) -> Any: ...

    def maintenance(self) -> Any: ...

    async def spend_since(self, starts: dict[str, float]) -> dict[str, float]: ...

    async def count(self) -> int: ...

    async def aclose(self) -> None: ...


def open_backend(url: str) -> Backend:
    """`sqlite:///path` or `postgresql://...` → its backend (not yet opened)."""
    if url.startswith("sqlite://"):
        from chatd.state.usage.sqlite import SQLiteBackend

        return SQLiteBackend(url)
    from chatd.state.usage.postgres import PostgresBackend

    return PostgresBackend(url)
