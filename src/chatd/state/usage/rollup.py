"""Daily rollups (docs/usage-ledger.md): what both back ends share.

`chatd_usage_daily` holds one row per (UTC day, caller, route, model, provider) with the
sums of the ledger rows of that day, updated in the same transaction as each batch.
A report reads it for whole days and the rows only for the partial days at the edges
of its range (`plan`); `Reads` turns a plan into one answer on either back end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from chatd.state.usage import COLUMNS, Row

DAY = 86_400.0
# A NULL key (a refusal has no model, no provider) is '' in the daily table: a unique
# key over NULLs never conflicts, so ON CONFLICT could not add to it. Read back as NULL.
NONE = ""
KEYS = ("day", "caller", "route", "model", "provider")
SUMS = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")
_CALLER, _ROUTE, _MODEL, _PROVIDER, _ERROR, _IN, _OUT, _COST = (
    COLUMNS.index(name)
    for name in ("caller", "route", "model", "provider", "error",
                 "input_tokens", "output_tokens", "cost_usd")
)  # fmt: skip
# Meta keys: the backfill's low-water mark (legacy rows at or after it are in the daily
# table; absent: the backfill is done) and the time before which rows may be pruned.
BACKFILL_TO = "backfill_to"
PRUNED_BEFORE = "pruned_before"


def floor_day(epoch: float) -> float:
    return math.floor(epoch / DAY) * DAY


def ceil_day(epoch: float) -> float:
    return math.ceil(epoch / DAY) * DAY


def daily(rows: list[Row], days: list[Any]) -> list[tuple[Any, ...]]:
    """A batch's rows summed per daily key (`days[i]`: row i's day, as the back end
    stores it), sorted by key: replicas upserting in one order cannot deadlock."""
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for row, day in zip(rows, days, strict=True):
        key = (
            day,
            row[_CALLER] or NONE,
            row[_ROUTE] or NONE,
            row[_MODEL] or NONE,
            row[_PROVIDER] or NONE,
        )
        acc = sums.get(key)
        if acc is None:
            acc = sums[key] = [0, 0, 0, 0, 0.0]
        acc[0] += 1
        if row[_ERROR] is not None:
            acc[1] += 1
        acc[2] += row[_IN] or 0
        acc[3] += row[_OUT] or 0
        acc[4] += row[_COST] or 0.0
    return [(*key, *acc) for key, acc in sorted(sums.items())]


@dataclass
class Plan:
    """Where a report's range is read from: whole days from the daily table (day starts,
    [first, end) ranges), time spans from the rows; `rounded` when an edge was widened."""

    days: list[tuple[float, float]] = field(default_factory=list)
    spans: list[tuple[float, float]] = field(default_factory=list)
    rounded: bool = False


def plan(since: float, until: float, now: float, daily_from: float, pruned_before: float) -> Plan:
    """`daily_from`: the first day whose rows are all in the daily table (-inf once the
    backfill is done); `pruned_before`: rows before it may have been deleted."""
    out = Plan()
    if until <= since:
        return out

    def whole(first: float, end: float) -> None:
        if first >= end:
            return
        if first < daily_from:  # not backfilled yet: its rows are all there
            _add(out.spans, first, min(end, daily_from))
        if end > daily_from:
            _add(out.days, max(first, daily_from), end)

    def partial(start: float, end: float) -> None:
        day = floor_day(start)
        if start == day and end >= now:  # today so far: the day's row is that already
            whole(day, day + DAY)
        elif start < pruned_before:  # some of its rows are gone: the whole day
            out.rounded = True
            whole(day, day + DAY)
        else:
            _add(out.spans, start, end)

    first, last = ceil_day(since), floor_day(until)
    if first > last:  # both ends inside one day
        partial(since, until)
        return out
    if since < first:
        partial(since, first)
    whole(first, last)
    if until > last:
        partial(last, until)
    return out


def daily_query(group_by: list[str], caller: str | None, ph: str, day: str) -> str:
    """The daily table's sums over days [first, last] (arguments 1 and 2; 3: the
    caller), its '' keys read back as NULL."""
    arg = (lambda n: "?") if ph == "?" else (lambda n: f"${n}")
    keys = [f"{day} AS day" if key == "day" else f"NULLIF({key}, '') AS {key}" for key in group_by]
    select = ", ".join(
        [*keys, *(f"SUM({name}) AS {name}" for name in
                  ("requests", "errors", "input_tokens", "output_tokens", "cost_usd"))]
    )  # fmt: skip
    where = f"day >= {arg(1)} AND day <= {arg(2)}"
    if caller is not None:
        where += f" AND caller = {arg(3)}"
    sql = f"SELECT {select} FROM chatd_usage_daily WHERE {where}"
    if group_by:  # in the primary key's order: day first, so no sort is needed for it
        order = sorted(range(len(group_by)), key=lambda i: KEYS.index(group_by[i]))
        sql += " GROUP BY " + ", ".join(f"chatd_usage_daily.{group_by[i]}" for i in order)
        nulls = "" if ph == "?" else " NULLS FIRST"  # SQLite's own order puts NULL first
        sql += " ORDER BY " + ", ".join(key + nulls for key in group_by)
    return sql


def _add(ranges: list[tuple[float, float]], start: float, end: float) -> None:
    """Append [start, end), joined to the last range when they touch."""
    if ranges and ranges[-1][1] >= start:
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
    else:
        ranges.append((start, end))


def merge(parts: list[list[dict[str, Any]]], group_by: list[str]) -> list[dict[str, Any]]:
    """Rows of several queries with the same groups summed, ordered by group (NULL first)."""
    found = [rows for rows in parts if rows]
    if len(found) == 1:  # one query (its SQL ordered it): the usual whole-days answer
        return found[0]
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for rows in parts:
        for row in rows:
            key = tuple(row[k] for k in group_by)
            acc = groups.get(key)
            if acc is None:
                acc = groups[key] = {k: row[k] for k in group_by}
                acc.update({"requests": 0, "errors": 0, "input_tokens": 0, "output_tokens": 0})
                acc["cost_usd"] = 0.0
            for name in SUMS[:4]:
                acc[name] += int(row[name] or 0)
            acc["cost_usd"] += float(row["cost_usd"] or 0)
    return [groups[key] for key in sorted(groups, key=_order)]


def _order(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((value is not None, value or "") for value in key)


@dataclass
class Answer:
    rows: list[dict[str, Any]]
    rounded: bool


class Reads:
    """Reports over the rows and the daily table; a back end provides the queries."""

    async def ledger_state(self) -> dict[str, float]:
        raise NotImplementedError

    async def rows_summary(
        self, span: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def daily_summary(
        self, days: tuple[float, float], caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def report(
        self,
        since: float,
        until: float,
        caller: str | None,
        group_by: list[str],
        now: float | None = None,
    ) -> Answer:
        state = await self.ledger_state()
        todo = plan(
            since,
            until,
            time.time() if now is None else now,
            state.get(BACKFILL_TO, -math.inf),
            state.get(PRUNED_BEFORE, -math.inf),
        )
        parts = [await self.daily_summary(days, caller, group_by) for days in todo.days]
        parts += [await self.rows_summary(span, caller, group_by) for span in todo.spans]
        return Answer(merge(parts, group_by), todo.rounded)

    async def summary(
        self, since: float, until: float, caller: str | None, group_by: list[str]
    ) -> list[dict[str, Any]]:
        return (await self.report(since, until, caller, group_by)).rows

    async def spend_since(self, starts: dict[str, float]) -> dict[str, float]:
        """Each caller's spend since its period's start (whole days: the daily table)."""
        now = time.time()
        by_start: dict[float, list[str]] = {}
        for name, start in starts.items():
            by_start.setdefault(start, []).append(name)
        spent: dict[str, float] = {}
        for start, names in by_start.items():
            answer = await self.report(start, now + 1, None, ["caller"], now)
            found = {row["caller"]: row["cost_usd"] for row in answer.rows}
            for name in names:
                spent[name] = float(found.get(name, 0.0))
        return spent
