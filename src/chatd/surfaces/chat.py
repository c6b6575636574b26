"""`POST /v1/chat` (docs/http-api.md): chatd's own request and answer shape, JSON or SSE.

Routing, retries, fallbacks and limits are the dispatcher's; a cacheable request asks the
response cache first (`cached_chat`, docs/replicas-and-cache.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from chatd.config import Settings
from chatd.errors import ChatdError, InternalError, UpstreamError
from chatd.routing.dispatch import ATTEMPTS_HEADER, Dispatcher, OpenStream
from chatd.routing.resilience import TIMEOUT_HEADER, parse_timeout_header
from chatd.state.cache import CACHE_HEADER, HIT, Plan, ResponseCache, note_hit
from chatd.state.cache_entries import (
    RecordedChatStream,
    chat_params,
    replay_chat,
    served_chat_entry,
)
from chatd.state.snapshot import snapshot_of
from chatd.surfaces.contract.chat import ChatResponse
from chatd.surfaces.contract.common import MODEL_CALL, error_responses, model_call, ok
from chatd.types import ChatRequest, StreamEvent
from chatd.web import (
    SSE_HEADERS,
    json_response,
    note,
    note_served,
    parse_body,
    read_body,
    sse,
    until_disconnect,
)

log = logging.getLogger("chatd")


def install_chat_routes(app: FastAPI, settings: Settings) -> None:
    max_body = settings.chatd.max_body_bytes

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
        note(request, model=body.model, max_tokens=body.max_tokens, temperature=body.temperature)
        budget = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        config = snapshot_of(request)  # the configuration this request runs on
        dispatcher, cache = config.dispatcher, config.cache
        plan = ask = None
        if cache is not None and body.temperature == 0:
            plan = cache.plan(request, "chat", body.model, chat_params(body))
            ask = None if body.stream else cache.ask(plan)
        admit = request.app.state.admit  # callers (docs/callers-and-usage.md), when configured
        if admit is not None:  # with Redis, the cache's question rides along (one round trip)
            await admit(request, body.model, ask)
        if cache is not None and plan is not None:
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
    cost: list[float] = []  # what the upstream said this request's own call cost, if it did

    async def run() -> bytes:
        served = await dispatcher.chat(body, budget)
        ran.append(served.attempts)
        if served.result.cost is not None:
            cost.append(served.result.cost)
        return served_chat_entry(served)

    stored, result = await cache.answer(request, plan, run)
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
        if cost:  # a miss pays what the upstream charged (docs/callers-and-usage.md)
            note(request, cost_usd=cost[0])
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
    """`/v1/chat` stream events: deltas and thinking as they come, then `done` (or one `error`).
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
