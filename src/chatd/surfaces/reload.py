"""`POST /admin/reload` (docs/reload.md): re-read the config file and swap it in.

Needs an admin token: the one in `$admin_token_env`, or an admin caller's. A bad file
answers 400 `invalid_config` with the same line `chatd check-config` prints.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from chatd.config import ConfigError
from chatd.errors import ConfigRefused, Forbidden, Unauthorized
from chatd.state.auth import CHALLENGE
from chatd.state.callers import Callers, presented_token
from chatd.state.snapshot import Snapshot, snapshot_of
from chatd.surfaces.contract.common import ERROR_STATUSES, error_responses, ok
from chatd.surfaces.contract.operations import Reloaded
from chatd.web import json_response

PATH = "/admin/reload"
ADMIN_STATUSES = {
    **ERROR_STATUSES,
    400: "invalid_config: the file was refused whole (the message says why); the old "
    "configuration serves on",
    401: "unauthorized: no admin token, or an unknown one",
    403: "forbidden: the caller is not an admin",
}


def install_reload_route(
    app: FastAPI, reload: Callable[[str], Awaitable[Snapshot]], callers: Callers | None
) -> None:
    """Add `POST /admin/reload`; `reload(trigger)` raises ConfigError for a bad file."""

    @app.post(
        PATH,
        operation_id="reloadConfig",
        summary="Reload the configuration",
        responses={
            **ok(Reloaded, "The new configuration is in force"),
            **error_responses(400, 401, 403, descriptions=ADMIN_STATUSES),
        },
    )
    async def reload_config(request: Request) -> Response:
        check_admin(request, callers)
        try:
            snapshot = await reload(f"POST {PATH}")
        except ConfigError as exc:
            raise ConfigRefused(str(exc)) from None  # check-config's own line
        return json_response({"status": "reloaded", "config": snapshot.describe()})


def check_admin(request: Request, callers: Callers | None) -> None:
    """401 without a token or with an unknown one; 403 for a caller that is not an admin."""
    token = presented_token(request.scope["headers"])
    if token is None:
        raise Unauthorized(
            "missing Authorization: Bearer <admin token> (see admin_token_env)",
            headers=dict(CHALLENGE),
        )
    admin = snapshot_of(request).admin_token
    if admin and hmac.compare_digest(admin.encode(), token):
        return
    caller = callers.identify(token) if callers is not None else None
    if caller is None:
        raise Unauthorized("invalid admin token", headers=dict(CHALLENGE))
    if not caller.admin:
        raise Forbidden(f"caller {caller.name} is not an admin")
