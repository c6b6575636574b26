"""`create_app(settings)`: the FastAPI application, its routes and error handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from chatd.config import Settings
from chatd.errors import (
    ChatdError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)
from chatd.reloading import Reloader, first_snapshot
from chatd.replicas import replica_state
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.state.snapshot import Current
from chatd.state.usage.spend import spend_report
from chatd.surfaces.admin import install_admin_routes
from chatd.surfaces.anthropic import install_anthropic_routes
from chatd.surfaces.chat import install_chat_routes
from chatd.surfaces.contract.common import error_responses, ok
from chatd.surfaces.contract.document import install_openapi
from chatd.surfaces.contract.operations import Health, ProviderListing
from chatd.surfaces.embeddings import install_embeddings_routes
from chatd.surfaces.openai import install_openai_routes
from chatd.surfaces.operations import Operations
from chatd.surfaces.reload import install_reload_route
from chatd.surfaces.usage import install_usage_routes
from chatd.telemetry.tracing import Tracing, build_tracing
from chatd.ui import install_ui
from chatd.web import (
    ClientGone,
    RequestContext,
    error_response,
    json_response,
    note,
)

log = logging.getLogger("chatd")


def create_app(
    settings: Settings, registry: Registry | None = None, *, reload_signal: bool = False
) -> FastAPI:
    """Build an isolated chatd app; providers' clients open and close with its lifespan.
    `reload_signal`: SIGHUP reloads the config (the server's own process only)."""
    registry = registry or Registry.from_settings(settings)
    ops = Operations(settings, registry)  # metrics, request log, /ready, auth
    tracing = build_tracing(settings)  # None unless [chatd.tracing] or OTEL_* say where
    dispatcher = Dispatcher(registry, observer=ops.metrics, tracing=tracing)
    state, cooldowns, cache = replica_state(settings, registry, dispatcher, ops)
    # The configuration each request takes as it arrives; a reload swaps it (reloading.py).
    current = Current(first_snapshot(settings, registry, dispatcher, cache))
    ops.current = current

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        if state is not None and cooldowns is not None:
            await state.start()
            await cooldowns.start()
        await ops.start()  # after the shared state: callers' spend is read back into it
        await reloader.start(signals=reload_signal)
        try:
            yield
        finally:
            await reloader.aclose()
            if state is not None and cooldowns is not None:
                await cooldowns.aclose()
                await state.aclose()
            await current.snapshot.registry.aclose()
            await ops.aclose()
            if tracing is not None:  # the spans still queued go out, within the timeout
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="chatd",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    reloader = Reloader(current, ops, state=state, cooldowns=cooldowns, app=app)
    app.state.settings = settings
    app.state.reloader = reloader
    app.state.registry = registry
    app.state.dispatcher = dispatcher
    app.state.operations = ops
    # every model-calling route awaits app.state.admit(request, model) after
    # parsing; None (nothing to await) when no callers are configured.
    app.state.admit = ops.callers.admit if ops.callers is not None else None
    if ops.callers is not None:  # the dashboard: admins only, and callers' spend
        callers, ledger = ops.callers, ops.ledger
        app.state.ui_admin = callers.is_admin
        app.state.spend_report = lambda: spend_report(callers, ledger) if callers.named else None
    app.state.cache = cache  # None unless [chatd.cache] enabled; see cache.get_or_run
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(
        RequestContext,
        logger=log,
        authorize=ops.authorize,
        finished=ops.finished if tracing is None else traced(tracing, ops.finished),
        started=None if tracing is None else tracing.started,
        config=current,
    )
    ops.install(app)

    install_chat_routes(app, settings)
    install_openai_routes(app, settings)
    install_embeddings_routes(app, settings)
    install_anthropic_routes(app, settings)
    install_usage_routes(app, ops)
    install_admin_routes(app, ops)
    install_reload_route(app, reloader.reload, ops.admin_auth)
    install_ui(app, ops, settings)

    @app.get(
        "/v1/chat/providers",
        operation_id="listProviders",
        responses={**ok(ProviderListing, "The registered providers"), **error_responses(401)},
    )
    async def providers() -> Response:
        return json_response(ops.listing())

    @app.get(
        "/health",
        operation_id="health",
        responses={**ok(Health, "The process serves"), **error_responses()},
    )
    async def health() -> Response:
        return json_response({"status": "ok"})

    return app


def traced(tracing: Tracing, finished: Callable[[Scope, int, float], None]) -> Any:
    """The request's end: its server span closed, then its log line and metrics."""

    def end(scope: Scope, status: int, seconds: float) -> None:
        try:
            tracing.finished(scope, status or 499)
        except Exception:  # a span must never take a request down
            log.exception("tracing failed")
        finished(scope, status, seconds)

    return end


def install_error_handlers(app: FastAPI) -> None:
    """Every error, on every route, leaves as the error envelope."""

    @app.exception_handler(ChatdError)
    async def chatd_error(request: Request, exc: ChatdError) -> Response:
        if exc.status >= 500:
            log.warning("%s: %s", exc.type, getattr(exc, "summary", exc.message))
        return error_response(exc, request)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        note(request, error="client_gone")
        return Response(status_code=499)  # nobody is listening; recorded in the log only

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            error: ChatdError = NotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}",
                headers={"Allow": allowed_methods(app, request)},
            )
        elif exc.status_code < 500:
            error = InvalidRequest(str(exc.detail))
        else:
            error = InternalError(str(exc.detail))
        return error_response(error, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return error_response(InvalidRequest(message, param=param), request)


def allowed_methods(app: FastAPI, request: Request) -> str:
    """Every method some route takes on this path (Starlette names only the first
    route's, and `/admin/callers` has one route per method)."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))
