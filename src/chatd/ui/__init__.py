"""The read-only dashboard at `/ui`: a static page (no build step, no CDN)
that polls `/ui/api/overview` every few seconds and draws it with hand-made SVG.

`install_ui(app, ops, settings)` is called once from `create_app`. With `[chatd] ui =
false` it adds nothing: no routes, nothing per request. Otherwise the only per-request
cost is `Activity.record` (series.py), hooked into `Operations.finished`.

Access: `/ui` is not under `/v1`, so the middleware's auth does not guard it; the data
routes check for themselves. Open when inbound auth is off; otherwise a bearer token the
admin check accepts (`app.state.ui_admin(token: bytes) -> bool` when the app sets one,
else any inbound-auth token). The page and its static files load without a token.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files

from fastapi import FastAPI, Request
from starlette.responses import Response

from chatd.config import Settings
from chatd.errors import NotFound, Unauthorized
from chatd.state.snapshot import snapshot_of
from chatd.surfaces.contract.common import error_responses, ok
from chatd.surfaces.contract.dashboard import DashboardAccess, DashboardOverview
from chatd.surfaces.operations import Operations
from chatd.ui.overview import overview
from chatd.ui.series import Activity
from chatd.web import error_response, json_response

STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# The page runs only its own script and style, and talks only to chatd.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DATA_HEADERS = {"Cache-Control": "no-store"}
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def install_ui(app: FastAPI, ops: Operations, settings: Settings) -> None:
    """Serve the dashboard at `/ui` and feed its series from every finished request."""
    if not settings.chatd.ui:
        return
    activity = Activity()
    ops.on_finished = activity.record
    app.state.activity = activity
    static = files(__name__) / "static"
    page = (static / "index.html").read_bytes()
    assets = {name: (static / name).read_bytes() for name in STATIC}

    @app.get(
        "/ui",
        operation_id="dashboard",
        response_class=Response,
        responses={
            200: {"description": "The dashboard page.", "content": {"text/html": {}}},
            **error_responses(),
        },
    )
    async def ui_page() -> Response:
        """The dashboard: providers, endpoints, charts, errors and spend, refreshed live."""
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/ui/", include_in_schema=False)
    async def ui_page_slash() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def ui_static(request: Request, name: str) -> Response:
        body = assets.get(name)
        if body is None:
            return error_response(NotFound(f"no route GET {request.url.path}"), request)
        return Response(body, media_type=STATIC[name], headers=PAGE_HEADERS)

    @app.get(
        "/ui/api/access",
        operation_id="dashboardAccess",
        responses={
            **ok(DashboardAccess, "Whether the data calls need an admin bearer token"),
            **error_responses(),
        },
    )
    async def ui_access() -> Response:
        """Whether the page must ask for an admin token before its data calls."""
        return json_response({"token_required": admin_check(app, ops) is not None})

    @app.get(
        "/ui/api/overview",
        operation_id="dashboardOverview",
        responses={
            **ok(DashboardOverview, "Providers, endpoints, series, errors and spend"),
            **error_responses(401),
        },
    )
    async def ui_overview(request: Request) -> Response:
        """Everything the dashboard shows, as of now (this worker's view)."""
        refusal = refuse(request, admin_check(app, ops))
        if refusal is not None:
            return error_response(refusal, request)
        body = await overview(app, ops, snapshot_of(request).dispatcher, activity)
        return json_response(body, headers=DATA_HEADERS)


def admin_check(app: FastAPI, ops: Operations) -> Callable[[bytes], bool] | None:
    """Who counts as an admin: `app.state.ui_admin` if set (callers with the admin role),
    else any inbound-auth token; None when inbound auth is off (the dashboard is open)."""
    callers = ops.callers
    if callers is not None and not callers.active and callers.loaded:
        return None  # no caller exists (yet): open, as /v1 is
    custom = getattr(app.state, "ui_admin", None)
    if custom is not None:
        return custom  # type: ignore[no-any-return]
    return ops.authorize.accepts if ops.authorize is not None else None


def refuse(request: Request, accepts: Callable[[bytes], bool] | None) -> Unauthorized | None:
    """None to serve the data call, else the 401 to answer with."""
    if accepts is None:
        return None
    header = request.headers.get("authorization")
    if header is None:
        return Unauthorized("missing Authorization: Bearer <admin token>", headers=dict(CHALLENGE))
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return Unauthorized("Authorization must be 'Bearer <token>'", headers=dict(CHALLENGE))
    if not accepts(token.encode()):
        return Unauthorized("not an admin token", headers=dict(CHALLENGE))
    return None


__all__ = ["Activity", "install_ui"]
