"""`GET /v1/usage` and `chatd usage`: the ledger grouped by caller, model, provider, day.

One query shape for both back ends; `Dialect` says how each spells placeholders and days.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from chatd.state.usage import GROUP_KEYS

SUMS = ("requests", "errors", "input_tokens", "output_tokens", "cost_usd")


@dataclass(frozen=True)
class Dialect:
    placeholder: str  # "?" or "$"
    day: str  # the SQL expression for a row's UTC day, YYYY-MM-DD

    def arg(self, n: int) -> str:
        return "?" if self.placeholder == "?" else f"${n}"


SQLITE = Dialect("?", "substr(time, 1, 10)")
POSTGRES = Dialect("$", "to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD')")


def summary_query(dialect: Dialect, group_by: list[str], caller: str | None) -> tuple[str, int]:
    """(SQL, number of arguments): since, until[, caller]."""
    keys = [dialect.day + " AS day" if key == "day" else key for key in group_by]
    where = f"time >= {dialect.arg(1)} AND time < {dialect.arg(2)}"
    if caller is not None:
        where += f" AND caller = {dialect.arg(3)}"
    select = ", ".join(
        [
            *keys,
            "COUNT(*) AS requests",
            "SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END) AS errors",
            "COALESCE(SUM(input_tokens), 0) AS input_tokens",
            "COALESCE(SUM(output_tokens), 0) AS output_tokens",
            "COALESCE(SUM(cost_usd), 0) AS cost_usd",
        ]
    )
    sql = f"SELECT {select} FROM chatd_usage WHERE {where}"
    if group_by:
        names = ", ".join(group_by)
        nulls = "" if dialect.placeholder == "?" else " NULLS FIRST"  # SQLite's order
        sql += f" GROUP BY {names} ORDER BY {', '.join(key + nulls for key in group_by)}"
    return sql, 3 if caller is not None else 2


def shape(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        for key in ("requests", "errors", "input_tokens", "output_tokens"):
            row[key] = int(row[key] or 0)
        row["cost_usd"] = round(float(row["cost_usd"] or 0), 9)
    return rows


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {key: sum(row[key] for row in rows) for key in SUMS}
    total["cost_usd"] = round(total["cost_usd"], 9)
    return total


def parse_group_by(value: str | None) -> list[str]:
    """`caller,model` → ["caller", "model"]; raises ValueError naming a bad key."""
    if value is None:
        return ["caller"]
    keys = value.split(",")
    for key in keys:
        if key not in GROUP_KEYS:
            raise ValueError(f"unknown group {key!r}; expected any of {', '.join(GROUP_KEYS)}")
    return list(dict.fromkeys(keys))


# RFC 3339: a full date, or a date-time with its offset (what /openapi.json promises).
DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
DATE_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_time(value: str) -> float:
    """An RFC 3339 date (`2026-11-01`, midnight UTC) or date-time → epoch; ValueError
    for anything else."""
    if DATE.fullmatch(value):
        return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
    match = DATE_TIME.fullmatch(value)
    if match is None:
        raise ValueError(value)
    day, minutes, seconds, fraction, offset = match.groups()
    seconds = min(seconds, "59")  # a leap second counts as the second before it
    fraction = (fraction or "")[:7]  # Python reads at most microseconds
    offset = "+00:00" if offset in ("Z", "z") else offset
    return datetime.fromisoformat(f"{day}T{minutes}:{seconds}{fraction}{offset}").timestamp()


def iso(epoch: float) -> str:
    """Epoch → `2026-11-26T03:04:05.123Z`: the ledger's time text (sorts as time does)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def table(answer: dict[str, Any], group_by: list[str]) -> str:
    """The usage answer as a plain text table (`chatd usage`)."""
    header = [*group_by, *SUMS]
    lines = [[cell(row.get(key)) for key in header] for row in answer["rows"]]
    total = answer["totals"]
    lines.append(
        ["total"] + [""] * (len(group_by) - 1) + [str(total[k]) for k in SUMS]
        if group_by
        else [str(total[k]) for k in SUMS]
    )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [f"usage from {answer['since']} until {answer['until']}"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)))
    return "\n".join(out)


def cell(value: Any) -> str:
    return "-" if value is None else str(value)
