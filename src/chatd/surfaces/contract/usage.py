"""`GET /v1/usage`: its parameters and its report."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

GROUP = "(caller|model|provider|day)"
TIME = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
USAGE_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "RFC 3339 date (midnight UTC) or date-time; default: this month's start.",
        "schema": TIME,
    },
    {
        "name": "until",
        "in": "query",
        "required": False,
        "description": "RFC 3339 date or date-time, exclusive; default: now.",
        "schema": TIME,
    },
    {
        "name": "caller",
        "in": "query",
        "required": False,
        "description": "Only this caller's rows (admins; others see only their own).",
        "schema": {"type": "string"},
    },
    {
        "name": "group_by",
        "in": "query",
        "required": False,
        "description": "Comma-separated, no spaces: caller, model, provider, day.",
        "schema": {"type": "string", "pattern": f"^{GROUP}(,{GROUP})*$"},
    },
]


class UsageReport(BaseModel):
    """`GET /v1/usage`: rows with their group keys and sums, and the totals."""

    since: str
    until: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any]
    rounded_to_days: bool = False  # an edge's rows were pruned: widened to its whole day
