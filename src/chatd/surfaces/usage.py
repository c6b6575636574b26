"""`GET /v1/usage`: the ledger grouped by caller, model, provider and day.

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

from chatd.errors import Forbidden, InvalidRequest, NotFound, UsageUnavailable
from chatd.state.usage.report import iso, month_start, parse_group_by, parse_time, shape, totals
from chatd.state.usage.writer import describe
from chatd.surfaces.contract.common import error_responses, ok
from chatd.surfaces.contract.usage import USAGE_PARAMETERS, UsageReport
from chatd.web import json_response

log = logging.getLogger("chatd")

FLUSH_WAIT_SECS = 2.0


def install_usage_routes(app: FastAPI, ops: Any) -> None:
    @app.get(
        "/v1/usage",
        operation_id="usage",
        openapi_extra={"parameters": USAGE_PARAMETERS},
        responses={
            **ok(UsageReport, "Usage grouped as asked, and its totals"),
            **error_responses(400, 401, 403, 404, 503),
        },
    )
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
        if since > until:
            raise InvalidRequest("since: must not be after until", param="since")
        caller = params.get("caller")
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
            # Whole days from the daily table, partial edge days from the rows.
            answer = await ledger.backend.report(since, until, caller, group_by, now)
        except Exception as exc:
            log.warning("/v1/usage: ledger query failed (%s)", describe(exc))
            raise UsageUnavailable("the usage ledger cannot be read right now") from None
        rows = shape(answer.rows)
        body = {"since": iso(since), "until": iso(until), "rows": rows, "totals": totals(rows)}
        body["rounded_to_days"] = answer.rounded  # an edge's rows were pruned: whole days
        return json_response(body)


def _time(value: str | None, param: str, default: float) -> float:
    if value is None:  # `since=` (empty) is not a date: a 400 like any other
        return default
    try:
        return parse_time(value)
    except (ValueError, OverflowError):  # not RFC 3339, or past datetime's years
        raise InvalidRequest(
            f"{param}: must be an ISO date or datetime, e.g. 2026-11-01", param=param
        ) from None
