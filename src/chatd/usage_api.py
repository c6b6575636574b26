"""`GET /v1/usage` (SPEC §12): the ledger grouped by caller, model, provider and day.

A caller sees its own rows; an `admin` caller sees everyone's (and may filter by
`caller`). With no callers configured, whoever may reach `/v1` sees all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from .errors import Forbidden, InvalidRequest, NotFound, UsageUnavailable
from .usage.report import iso, month_start, parse_group_by, parse_time, shape, totals
from .usage.writer import describe
from .web import json_response

log = logging.getLogger("chatd")

FLUSH_WAIT_SECS = 2.0


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _error(description: str) -> dict[str, Any]:
    envelope = {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "code": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                },
            }
        },
    }
    return {"description": description, "content": {"application/json": {"schema": envelope}}}


USAGE_SCHEMA: dict[str, Any] = {
    "parameters": [
        _query("since", "ISO date or datetime (UTC); default: the start of this month"),
        _query("until", "ISO date or datetime (UTC), exclusive; default: now"),
        _query("caller", "only this caller's rows (admins; others see only their own)"),
        _query("group_by", "comma-separated: caller, model, provider, day (default caller)"),
    ],
    "responses": {
        "200": {
            "description": "Usage grouped as asked, and its totals.",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "since": {"type": "string"},
                            "until": {"type": "string"},
                            "rows": {"type": "array", "items": {"type": "object"}},
                            "totals": {"type": "object"},
                        },
                    }
                }
            },
        },
        "400": _error("a bad since, until or group_by"),
        "401": _error("a token is required"),
        "403": _error("another caller's usage, asked by a caller that is not admin"),
        "404": _error('the ledger is off (usage_db = "")'),
        "503": _error("the ledger's database cannot be read"),
    },
}


def install_usage_routes(app: FastAPI, ops: Any) -> None:
    @app.get("/v1/usage", openapi_extra=USAGE_SCHEMA)
    async def usage(request: Request) -> Response:
        ledger = ops.ledger
        if ledger is None:
            raise NotFound('the usage ledger is off (usage_db = "")')
        params = request.query_params
        try:
            group_by = parse_group_by(params.get("group_by"))
        except ValueError as exc:
            raise InvalidRequest(f"group_by: {exc}", param="group_by") from None
        now = time.time()
        since = _time(params.get("since"), "since", month_start(now))
        until = _time(params.get("until"), "until", now + 0.001)
        caller = params.get("caller") or None
        me = request.scope.get("state", {}).get("caller")
        if me is not None and not me.admin:
            if caller is not None and caller != me.name:
                raise Forbidden(f"caller {me.name} may read only its own usage", param="caller")
            caller = me.name
        # What this caller just did should show: write what is buffered first.
        try:
            await asyncio.wait_for(ledger.writer.flush(), FLUSH_WAIT_SECS)
        except TimeoutError:
            pass
        try:
            rows = shape(await ledger.backend.summary(since, until, caller, group_by))
        except Exception as exc:
            log.warning("/v1/usage: ledger query failed (%s)", describe(exc))
            raise UsageUnavailable("the usage ledger cannot be read right now") from None
        return json_response(
            {"since": iso(since), "until": iso(until), "rows": rows, "totals": totals(rows)}
        )


def _time(value: str | None, param: str, default: float) -> float:
    if not value:
        return default
    try:
        return parse_time(value)
    except ValueError:
        raise InvalidRequest(
            f"{param}: must be an ISO date or datetime, e.g. 2026-11-01", param=param
        ) from None
