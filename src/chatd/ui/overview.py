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
    return {
        "time": time.time(),
        "refresh_ms": REFRESH_MS,
        # Under --workers N each worker keeps its own series and errors: say whose these are.
        "worker": {"pid": os.getpid(), "multiprocess": ops.metrics.multiprocess},
        "default": listing["default"],
        "providers": providers,
        "series": activity.series([p["name"] for p in providers]),
        "errors": activity.errors(),
        "spend": await spend_report(app),
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
