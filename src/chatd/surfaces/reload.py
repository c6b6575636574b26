"""`POST /admin/reload` (docs/reload.md): re-read the config file and swap it in.

Needs an admin token: the one in `$admin_token_env`, or an admin caller's. A bad file
answers 400 `invalid_config` with the same line `chatd check-config` prints.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from starlette.responses import Response

from chatd.config import ConfigError
from chatd.errors import ConfigRefused
from chatd.state.admin_auth import AdminAuth
from chatd.state.snapshot import Snapshot
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
    app: FastAPI, reload: Callable[[str], Awaitable[Snapshot]], admin: AdminAuth
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
        admin.check(request.scope)  # 401 / 403, and the admin's name in the log line
        try:
            snapshot = await reload(f"POST {PATH}")
        except ConfigError as exc:
            raise ConfigRefused(str(exc)) from None  # check-config's own line
        return json_response({"status": "reloaded", "config": snapshot.describe()})
