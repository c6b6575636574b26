"""The dashboard's data: providers and their endpoints, the charts' series, the last
errors, spend per caller — one JSON body for `GET /ui/api/overview`."""

from __future__ import annotations

import inspect
import os
import time
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI

from chatd.routing.dispatch import Dispatcher
from chatd.routing.resilience import Guard
from chatd.surfaces.operations import Operations
from chatd.ui.series import Activity

REFRESH_MS = 2000  # how often the page asks again
OK = "ok"
COOLING_DOWN = "cooling_down"


async def overview(
    app: FastAPI, ops: Operations, dispatcher: Dispatcher, activity: Activity
) -> dict[str, Any]:
    listing = ops.listing()
    providers = [provider_view(entry, ops, dispatcher, activity) for entry in listing["providers"]]
    spend = await spend_report(app)
    return {
        "time": time.time(),
        "refresh_ms": REFRESH_MS,
        # Under --workers N each worker keeps its own series and errors: say whose these are.
        "worker": {"pid": os.getpid(), "multiprocess": ops.metrics.multiprocess},
        "default": listing["default"],
        "providers": providers,
        "series": activity.series([p["name"] for p in providers]),
        "errors": activity.errors(),
        "spend": spend,
        "callers": callers_view(ops, spend),
    }


def provider_view(
    entry: dict[str, Any], ops: Operations, dispatcher: Dispatcher, activity: Activity
) -> dict[str, Any]:
    """A listing entry with its `endpoints` and an overall `state`.

    When the listing has no endpoints (one upstream per provider), the provider itself is
    shown as its one endpoint, its state taken from its cooldown breaker.
    """
    view = dict(entry)
    endpoints = entry.get("endpoints")
    if endpoints is None:
        provider = ops.registry.providers.get(entry["name"])
        endpoints = [
            pseudo_endpoint(entry, provider, dispatcher.guards.get(entry["name"]), activity)
        ]
    view["endpoints"] = endpoints
    cooling = sum(1 for e in endpoints if e.get("state") == COOLING_DOWN)
    if not entry.get("available", True):
        view["state"] = "no_key"
    elif endpoints and cooling == len(endpoints):
        view["state"] = COOLING_DOWN
    elif cooling:
        view["state"] = "degraded"
    else:
        view["state"] = OK
    return view


def pseudo_endpoint(
    entry: dict[str, Any], provider: Any, guard: Guard | None, activity: Activity
) -> dict[str, Any]:
    name = entry["name"]
    remaining = guard.breaker.remaining() if guard is not None else 0.0
    return {
        "name": getattr(provider, "endpoint", None)
        or urlsplit(entry.get("base_url") or "").netloc
        or name,
        "base_url": entry.get("base_url", ""),
        "available": entry.get("available", True),
        "state": COOLING_DOWN if remaining > 0 else OK,
        "cooldown_remaining_secs": round(remaining, 1),
        "in_flight": guard.limiter.busy if guard is not None else 0,
        "ewma_ms": activity.ewma_ms(name),
        "requests": entry.get("requests", 0),
        "errors": entry.get("errors", 0),
    }


async def spend_report(app: FastAPI) -> list[dict[str, Any]] | None:
    """`app.state.spend_report()` (the usage ledger's, sync or async): a list of
    `{caller, spend_usd, budget_usd, input_tokens, output_tokens, period}`; None when
    no ledger is wired (no callers configured)."""
    report = getattr(app.state, "spend_report", None)
    if report is None:
        return None
    rows = report()
    if inspect.isawaitable(rows):
        rows = await rows
    return None if rows is None else [dict(row) for row in rows]


def callers_view(
    ops: Operations, spend: list[dict[str, Any]] | None
) -> list[dict[str, Any]] | None:
    """Every caller (docs/live-callers.md): source, state, limits and this period's
    spend; None when no caller exists. Never a token."""
    callers = ops.callers
    if callers is None or not callers.named:
        return None
    spent = {row["caller"]: row["spend_usd"] for row in spend or ()}
    rows: list[dict[str, Any]] = []
    for caller in callers.callers.values():
        if caller.source == "config":
            rows.append({"name": caller.name, "source": "config", "state": "active",
                         "models": list(caller.models), "rpm": caller.rpm, "tpm": caller.tpm,
                         "max_concurrency": caller.max_concurrency, "admin": caller.admin,
                         "budget_usd": caller.budget_usd, "expires_at": None})  # fmt: skip
    records = ops.live.records.values() if ops.live is not None else ()
    for record in records:
        view = record.describe()
        rows.append({key: view[key] for key in LISTED})
    for row in rows:
        row["spend_usd"] = spent.get(row["name"])
    return sorted(rows, key=lambda row: (row["state"] == "revoked", row["name"]))


LISTED = ("name", "source", "state", "models", "rpm", "tpm", "max_concurrency", "admin",
          "budget_usd", "expires_at")  # fmt: skip
