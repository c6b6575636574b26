"""`create_app(settings)`: the FastAPI application, its routes and error handlers (SPEC §3)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response, StreamingResponse

from .anthropic_api import install_anthropic_routes
from .cache import (
    CACHE_HEADER,
    HIT,
    Plan,
    RecordedChatStream,
    ResponseCache,
    chat_params,
    note_hit,
    replay_chat,
    served_chat_entry,
)
from .callers import admit_anyone
from .config import Settings
from .contract import (
    MODEL_CALL,
    ChatResponse,
    Health,
    ProviderListing,
    error_responses,
    install_openapi,
    model_call,
    ok,
)
from .cooldowns import SharedCooldowns, cooldown_key
from .dispatch import ATTEMPTS_HEADER, Dispatcher, OpenStream
from .embeddings import install_embeddings_routes
from .errors import (
    ChatdError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    UpstreamError,
)
from .openai_api import install_openai_routes
from .operations import Operations
from .registry import Registry
from .resilience import TIMEOUT_HEADER, Breaker, parse_timeout_header
from .shared import SharedState, build_state
from .types import ChatRequest, StreamEvent
from .ui import install_ui
from .usage.spend import spend_report
from .usage_api import install_usage_routes
from .web import (
    SSE_HEADERS,
    ClientGone,
    RequestContext,
    error_response,
    json_response,
    note,
    note_served,
    parse_body,
    read_body,
    sse,
    until_disconnect,
)

log = logging.getLogger("chatd")


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """Build an isolated chatd app; providers' clients open and close with its lifespan."""
    registry = registry or Registry.from_settings(settings)
    ops = Operations(settings, registry)  # SPEC §9: metrics, request log, /ready, auth
    dispatcher = Dispatcher(registry, observer=ops.metrics)
    ops.balancers = dispatcher.balancers  # SPEC §10: endpoint state in the listing
    max_body = settings.chatd.max_body_bytes
    state, cooldowns, cache = replica_state(settings, registry, dispatcher, ops)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await registry.start()
        if state is not None and cooldowns is not None:
            await state.start()
            await cooldowns.start()
        await ops.start()  # after the shared state: callers' spend is read back into it
        try:
            yield
        finally:
            if state is not None and cooldowns is not None:
                await cooldowns.aclose()
                await state.aclose()
            await registry.aclose()
            await ops.aclose()

    app = FastAPI(
        title="chatd",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.dispatcher = dispatcher
    app.state.operations = ops
    # SPEC §12: every model-calling route awaits admit(request, model) after parsing.
    admit = ops.callers.admit if ops.callers is not None else None
    app.state.admit = admit or admit_anyone
    if ops.callers is not None:  # the dashboard: admins only, and callers' spend
        callers, ledger = ops.callers, ops.ledger
        app.state.ui_admin = callers.is_admin
        app.state.spend_report = lambda: spend_report(callers, ledger)
    app.state.cache = cache  # None unless [chatd.cache] enabled; see cache.get_or_run
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(RequestContext, logger=log, authorize=ops.authorize, finished=ops.finished)
    ops.install(app)

    @app.post(
        "/v1/chat",
        operation_id="chat",
        openapi_extra=model_call("ChatRequest"),
        responses={
            **ok(
                ChatResponse,
                "The answer, or with `stream`: SSE events",
                stream=True,
                extra_headers=(ATTEMPTS_HEADER,),
            ),
            **error_responses(*MODEL_CALL),
        },
    )
    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        body = parse_body(ChatRequest, await read_body(request, max_body))
        note(request, model=body.model)
        if admit is not None:
            await admit(request, body.model)
        budget = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        if cache is not None and body.temperature == 0:
            plan = cache.plan(request, "chat", body.model, chat_params(body))
            if plan is not None:
                return await cached_chat(request, body, budget, started, cache, plan, dispatcher)
        if body.stream:
            opened = await until_disconnect(request, dispatcher.stream(body, budget))
            note_served(request, opened)
            return StreamingResponse(
                sse_events(opened, started, request),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, ATTEMPTS_HEADER: str(opened.attempts)},
            )
        served = await until_disconnect(request, dispatcher.chat(body, budget))
        result = served.result
        note_served(request, served)
        note(request, input_tokens=result.input_tokens, output_tokens=result.output_tokens)
        if result.cost is not None:
            note(request, cost_usd=result.cost)
        answer: dict[str, Any] = {
            "model": served.route.model,
            "content": result.content,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "finish_reason": result.finish_reason,
            "provider": served.route.provider.name,
            "latency_ms": round((time.perf_counter() - started) * 1000),
        }
        if result.thinking:
            answer["thinking"] = result.thinking
        return json_response(answer, headers={ATTEMPTS_HEADER: str(served.attempts)})

    install_openai_routes(app, dispatcher, registry, settings, admit, cache)
    install_embeddings_routes(app, dispatcher, settings)
    install_anthropic_routes(app, dispatcher, settings)
    install_usage_routes(app, ops)
    install_ui(app, ops, dispatcher, settings)

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


def replica_state(
    settings: Settings, registry: Registry, dispatcher: Dispatcher, ops: Operations
) -> tuple[SharedState | None, SharedCooldowns | None, ResponseCache | None]:
    """SPEC §13: the shared state (with `redis_url`), the breakers it keeps in step across
    replicas, and the response cache (with `[chatd.cache] enabled`). Nothing without them."""
    chatd = settings.chatd
    state: SharedState | None = None
    cooldowns = None
    if chatd.redis_url:
        ops.metrics.shared_up(False)  # until Redis first answers
        state = build_state(chatd.redis_url, chatd.cache.max_bytes, ops.metrics.shared_up)
        cooldowns = SharedCooldowns(state, shared_breakers(registry, dispatcher))
        if ops.callers is not None:  # one rpm/tpm window and one spend for the fleet
            ops.callers.store = state
        ops.shared = state
    cache = None
    if chatd.cache.enabled:
        cache = ResponseCache(
            chatd.cache,
            registry,
            state=state,
            count=ops.metrics.cache_result,
            size=ops.metrics.cache_bytes.set,
        )
    return state, cooldowns, cache


def shared_breakers(registry: Registry, dispatcher: Dispatcher) -> dict[str, Breaker]:
    """Every breaker a trip of which other replicas must honour: one per endpoint of a
    provider with `endpoints` (SPEC §10), else the provider's own."""
    breakers: dict[str, Breaker] = {}
    for name in registry.providers:
        if name in registry.endpoints:
            for endpoint in dispatcher.balancers[name].endpoints:
                key = cooldown_key(name, endpoint.provider.endpoint)
                breakers[key] = endpoint.guard.breaker
        else:
            breakers[cooldown_key(name)] = dispatcher.guard(name).breaker
    return breakers


async def cached_chat(
    request: Request,
    body: ChatRequest,
    budget: float | None,
    started: float,
    cache: ResponseCache,
    plan: Plan,
    dispatcher: Dispatcher,
) -> Response:
    """`/v1/chat` for a cacheable request: a stored answer, another request's, or a fresh
    one (stored). A hit costs nothing: its log line has no tokens and `cache = "hit"`."""
    if body.stream:
        stored = await cache.lookup(plan)
        if stored is None:
            try:
                opened = await until_disconnect(request, dispatcher.stream(body, budget))
            except ChatdError as exc:
                raise plan.tag(exc) from None
            note_served(request, opened)
            result = cache.counted(plan)
            note(request, cache=result)
            if plan.write:
                opened.rest = RecordedChatStream(cache, plan.key, opened)
            return StreamingResponse(
                sse_events(opened, started, request),
                media_type="text/event-stream",
                headers={
                    **SSE_HEADERS,
                    ATTEMPTS_HEADER: str(opened.attempts),
                    CACHE_HEADER: result,
                },
            )
        entry = orjson.loads(stored)
        note_hit(request, entry)
        return StreamingResponse(
            replay_chat(entry, started),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, ATTEMPTS_HEADER: "0", CACHE_HEADER: HIT},
        )
    ran: list[int] = []

    async def run() -> bytes:
        served = await dispatcher.chat(body, budget)
        ran.append(served.attempts)
        return served_chat_entry(served)

    stored, result = await until_disconnect(request, cache.fetch(plan, run))
    entry = orjson.loads(stored)
    if ran:  # this request's own upstream call answered
        note(
            request,
            provider=entry["provider"],
            upstream_model=entry["model"],
            attempts=ran[0],
            input_tokens=entry["input_tokens"],
            output_tokens=entry["output_tokens"],
            cache=result,
        )
    else:
        note_hit(request, entry)
    answer: dict[str, Any] = {
        "model": entry["model"],
        "content": entry["content"],
        "input_tokens": entry["input_tokens"],
        "output_tokens": entry["output_tokens"],
        "finish_reason": entry["finish_reason"],
        "provider": entry["provider"],
        "latency_ms": round((time.perf_counter() - started) * 1000),
    }
    if entry.get("thinking"):
        answer["thinking"] = entry["thinking"]
    headers = {ATTEMPTS_HEADER: str(ran[0] if ran else 0), CACHE_HEADER: result}
    return json_response(answer, headers=headers)


async def sse_events(
    opened: OpenStream, started: float, request: Request | None = None
) -> AsyncIterator[bytes]:
    """SPEC §6 events: deltas and thinking as they come, then `done` (or one `error`).
    Given the request, its log line learns the stream's ttft, tokens and any error."""
    ttft_ms: int | None = None
    event: StreamEvent | None = opened.first
    facts: dict[str, Any] = {"error": "client_gone"}  # unless the stream gets to its end
    try:
        while event is not None:
            if event.done:
                facts = {"input_tokens": event.input_tokens, "output_tokens": event.output_tokens}
                if event.extra.get("cost") is not None:
                    facts["cost_usd"] = event.extra["cost"]
                yield sse(
                    {
                        "done": True,
                        "model": opened.route.model,
                        "provider": opened.route.provider.name,
                        "input_tokens": event.input_tokens,
                        "output_tokens": event.output_tokens,
                        "finish_reason": event.finish_reason,
                        "latency_ms": round((time.perf_counter() - started) * 1000),
                        "ttft_ms": ttft_ms if ttft_ms is not None else 0,
                    }
                )
                return
            if ttft_ms is None:
                ttft_ms = round((time.perf_counter() - started) * 1000)
            if event.thinking:
                yield sse({"thinking": event.thinking})
            if event.delta:
                yield sse({"delta": event.delta})
            event = await anext(opened.rest, None)
        facts = {"error": UpstreamError.type}
        yield sse(error_event("stream ended before done", opened))
    except ChatdError as exc:
        facts = {"error": exc.type}
        yield sse(exc.envelope())
    except Exception:
        facts = {"error": InternalError.type}
        log.exception("stream from %s failed", opened.route.provider.name)
        yield sse(InternalError("internal error during stream").envelope())
    finally:
        if request is not None:
            note(request, ttft_ms=ttft_ms, **facts)
        await opened.aclose()


def error_event(message: str, opened: OpenStream) -> dict[str, Any]:
    return UpstreamError(opened.route.provider.name, message).envelope()


def install_error_handlers(app: FastAPI) -> None:
    """Every error, on every route, leaves as the SPEC §3 envelope."""

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
                headers=dict(exc.headers or {}),
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
