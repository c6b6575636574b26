"""`/admin/callers`: issue, change, rotate and revoke live callers' keys at run time
(docs/live-callers.md). Every route checks the admin token first (state/admin_auth.py),
then that live callers are on (`usage_db`); a write reaches the database, then this
process's memory at once, then the other replicas (within 2 s)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from starlette.responses import Response

from chatd.errors import CallerExists, ConfigCaller, InvalidRequest, NoDatabase, NotFound
from chatd.state.caller_fields import CallerChange, NewCaller, rfc3339
from chatd.state.callers import Caller
from chatd.state.callers_store import LiveRecord
from chatd.state.callers_sync import LiveCallers
from chatd.surfaces.contract.admin import (
    ADMIN_STATUSES,
    CallerDetail,
    CallerInfo,
    CallerList,
    IssuedToken,
    created,
)
from chatd.surfaces.contract.common import error_responses, json_body, ok
from chatd.web import json_response, parse_body, read_body

MAX_BODY = 64 * 1024  # a caller's fields; nothing bigger is meant

WRITE = error_responses(400, 401, 403, 404, 409, 503, descriptions=ADMIN_STATUSES)
READ = error_responses(401, 403, 404, 409, descriptions=ADMIN_STATUSES)


def require_admin(request: Request) -> str:
    """A FastAPI dependency: the admin's name (for the audit trail), or 401 / 403."""
    return request.app.state.operations.admin_auth.check(request.scope)  # type: ignore[no-any-return]


def install_admin_routes(app: FastAPI, ops: Any) -> None:
    def live() -> LiveCallers:
        if ops.live is None:
            raise NoDatabase('live callers need the usage database (usage_db = "" turns it off)')
        return ops.live  # type: ignore[no-any-return]

    def changeable(name: str) -> LiveCallers:
        if ops.callers is not None and ops.callers.source_of(name) == "config":
            raise ConfigCaller(f"caller {name} is in the config file; change it there")
        return live()

    @app.post(
        "/admin/callers",
        operation_id="createCaller",
        status_code=201,
        openapi_extra=json_body("NewCaller"),
        responses={**created(IssuedToken, "The caller and its token, shown this once"), **WRITE},
    )
    async def create_caller(request: Request, admin: str = Depends(require_admin)) -> Response:
        """Make a live caller; the answer holds its token, which is never shown again."""
        live_callers = live()
        body = parse_body(NewCaller, await read_body(request, MAX_BODY))
        if ops.callers.source_of(body.name) == "config":
            raise_exists(body.name)
        fields = checked(body)
        fields.pop("name")
        made = live_callers.store.create(body.name, fields, admin)
        record, token = await live_callers.write(made)
        return issued(record, token)

    @app.get(
        "/admin/callers",
        operation_id="listCallers",
        responses={**ok(CallerList, "Every caller"), **READ},
    )
    async def list_callers(admin: str = Depends(require_admin)) -> Response:
        """Every caller: the config file's and live ones (revoked ones too)."""
        live_callers = live()
        listed = [config_view(c) for c in ops.callers.callers.values() if c.source == "config"]
        records = sorted(live_callers.records.values(), key=lambda r: r.name)
        listed += [record.describe() for record in records]
        return json_response({"callers": listed})

    @app.get(
        "/admin/callers/{name}",
        operation_id="getCaller",
        responses={**ok(CallerDetail, "One caller with its period spend"), **READ},
    )
    async def get_caller(name: str, admin: str = Depends(require_admin)) -> Response:
        """One caller, with what it spent in its current budget period."""
        live_callers = live()
        record = live_callers.records.get(name)
        caller = ops.callers.callers.get(name)
        if caller is not None and caller.source == "config":
            view = config_view(caller)
        elif record is not None:
            view = record.describe()
        else:
            raise NotFound(f"no caller {name}")
        view.update(await period_spend(ops, caller or record_caller(record)))
        return json_response(view)

    @app.patch(
        "/admin/callers/{name}",
        operation_id="updateCaller",
        openapi_extra=json_body("CallerChange"),
        responses={**ok(CallerInfo, "The caller as changed"), **WRITE},
    )
    async def update_caller(
        request: Request, name: str, admin: str = Depends(require_admin)
    ) -> Response:
        """Change any of models, rpm, tpm, budget_usd, budget_period, max_concurrency,
        admin, expires_at, metadata, disabled; it holds from the next request."""
        live_callers = changeable(name)
        body = parse_body(CallerChange, await read_body(request, MAX_BODY))
        fields = checked(body)
        if not fields:
            raise InvalidRequest("nothing to change: send at least one field")
        record = await live_callers.write(live_callers.store.update(name, fields, admin))
        return json_response(found(record, name).describe())

    @app.post(
        "/admin/callers/{name}/tokens",
        operation_id="rotateCallerToken",
        status_code=201,
        responses={**created(IssuedToken, "A new token, shown this once"), **WRITE},
    )
    async def add_token(name: str, admin: str = Depends(require_admin)) -> Response:
        """Rotation: one more token; the older ones stay valid until revoked."""
        live_callers = changeable(name)
        result = await live_callers.write(live_callers.store.add_token(name, admin))
        if result is None:
            raise NotFound(f"no caller {name}")
        return issued(*result)

    @app.delete(
        "/admin/callers/{name}/tokens/{token_id}",
        operation_id="revokeCallerToken",
        responses={**ok(CallerInfo, "The caller without that token"), **WRITE},
    )
    async def revoke_token(
        name: str, token_id: str, admin: str = Depends(require_admin)
    ) -> Response:
        """Revoke one token; every replica refuses it within 2 s."""
        live_callers = changeable(name)
        record = await live_callers.write(live_callers.store.revoke_token(name, token_id, admin))
        if record is None:
            raise NotFound(f"caller {name} has no token {token_id}")
        return json_response(record.describe())

    @app.delete(
        "/admin/callers/{name}",
        operation_id="revokeCaller",
        responses={**ok(CallerInfo, "The caller, revoked"), **WRITE},
    )
    async def revoke_caller(name: str, admin: str = Depends(require_admin)) -> Response:
        """Revoke the caller and all its tokens; its ledger rows stay."""
        live_callers = changeable(name)
        record = await live_callers.write(live_callers.store.revoke(name, admin))
        return json_response(found(record, name).describe())


def checked(body: CallerChange) -> dict[str, Any]:
    try:
        return body.fields()
    except ValueError as exc:  # an expiry that passed between parsing and now
        raise InvalidRequest(f"expires_at: {exc}", param="expires_at") from None


def raise_exists(name: str) -> None:
    raise CallerExists(f"caller {name} exists (in the config file)", param="name")


def found(record: LiveRecord | None, name: str) -> LiveRecord:
    if record is None:
        raise NotFound(f"no live caller {name}")
    return record


def record_caller(record: LiveRecord | None) -> Caller | None:
    return record.caller(any_state=True) if record is not None else None


def issued(record: LiveRecord, token: str) -> Response:
    token_id = token.split("-")[1]
    body = {"name": record.name, "token_id": token_id, "token": token, "caller": record.describe()}
    return json_response(body, status=201, headers={"Cache-Control": "no-store"})


def config_view(caller: Caller) -> dict[str, Any]:
    """A config-file caller as `/admin` lists it: no token ids (they are in the file)."""
    return {
        "name": caller.name, "source": "config", "state": "active",
        "models": list(caller.models), "rpm": caller.rpm, "tpm": caller.tpm,
        "budget_usd": caller.budget_usd, "budget_period": caller.budget_period,
        "max_concurrency": caller.max_concurrency, "admin": caller.admin,
        "expires_at": None, "metadata": {}, "disabled": False, "tokens": [],
    }  # fmt: skip


async def period_spend(ops: Any, caller: Caller | None) -> dict[str, Any]:
    """What the caller spent since its period began: the figure its budget is checked
    against when it has one, else the ledger's."""
    if caller is None:
        return {"spend_usd": None, "period_start": None}
    now = time.time()
    start = caller.period_start(now)
    spent: float | None = None
    if caller.budget_usd:
        spent = await ops.callers.store.get(caller.period(now)[0])
    elif ops.ledger is not None:
        try:
            rows = await ops.ledger.backend.summary(start.timestamp(), now + 1, caller.name, [])
            spent = float(rows[0]["cost_usd"] or 0) if rows else 0.0
        except Exception:  # the database away: the spend is unknown, the rest is not
            spent = None
    return {"spend_usd": spent, "period_start": rfc3339(start.timestamp())}
