"""The OpenAI-compatible surface (docs/http-api.md): `POST /v1/chat/completions`, `GET /v1/models`.

Routing, retries, fallbacks and limits are the dispatcher's, exactly as for /v1/chat.
What differs is the shape: openai-kind providers get the caller's body with only `model`
rewritten and answer as they like; the others are translated (`openai_compat.py`).
Which provider and upstream model served is told in `X-Chatd-Provider` / `X-Chatd-Model`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from chatd.config import Settings
from chatd.errors import ChatdError, InternalError, InvalidRequest
from chatd.providers.openai import upstream_cost
from chatd.routing.dispatch import ATTEMPTS_HEADER, Dispatcher, OpenStream, Served
from chatd.routing.registry import Registry
from chatd.routing.resilience import TIMEOUT_HEADER, parse_timeout_header
from chatd.state.cache import CACHE_HEADER, HIT, Plan, ResponseCache, note_hit
from chatd.state.cache_entries import (
    RecordedCompletionStream,
    completion_entry,
    completion_params,
    replay_completion,
)
from chatd.state.snapshot import snapshot_of
from chatd.surfaces.contract.common import MODEL_CALL, error_responses, model_call, ok
from chatd.surfaces.contract.openai import ChatCompletion, ModelList
from chatd.web import (
    SSE_HEADERS,
    json_response,
    note,
    note_served,
    read_body,
    sse,
    until_disconnect,
)
from chatd.wire.openai_compat import check_body, error_answer, wants_usage

log = logging.getLogger("chatd")

DONE = b"data: [DONE]\n\n"
MODELS_TTL_SECS = 30.0
MODELS_WAIT_SECS = 3.0


def install_openai_routes(app: FastAPI, settings: Settings) -> None:
    max_body = settings.chatd.max_body_bytes
    catalogs: dict[int, ModelCatalog] = {}  # by snapshot generation: the newest only
    shapes = getattr(app.state, "error_shapes", None) or {}
    app.state.error_shapes = {
        **shapes,
        "/v1/chat/completions": error_answer,
        "/v1/models": error_answer,
    }

    @app.post(
        "/v1/chat/completions",
        operation_id="createChatCompletion",
        openapi_extra=model_call("ChatCompletionRequest"),
        responses={
            **ok(
                ChatCompletion,
                "A chat.completion, or with `stream`: chat.completion.chunk events",
                stream=True,
                extra_headers=(ATTEMPTS_HEADER,),
            ),
            **error_responses(*MODEL_CALL),
        },
    )
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = check_body(loads_body(await read_body(request, max_body)))
        model: str = body["model"]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        note(request, model=model, max_tokens=limit, temperature=body.get("temperature"))
        budget = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        config = snapshot_of(request)  # the configuration this request runs on
        dispatcher, cache = config.dispatcher, config.cache
        plan = ask = None
        if cache is not None and (params := completion_params(body)) is not None:
            plan = cache.plan(request, "completions", model, params)
            ask = None if body.get("stream") else cache.ask(plan)
        admit = request.app.state.admit  # callers (docs/callers-and-usage.md), when configured
        if admit is not None:  # with Redis, the cache's question rides along (one round trip)
            await admit(request, model, ask)
        if cache is not None and plan is not None:
            return await cached_completion(request, body, budget, started, cache, plan, dispatcher)
        if body.get("stream"):
            opened = await until_disconnect(
                request,
                dispatcher.open(
                    model, lambda route: route.provider.complete_stream(body, route.model), budget
                ),
            )
            note_served(request, opened)
            return StreamingResponse(
                chunk_stream(request, opened, started),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, **served_headers(opened)},
            )
        served = await until_disconnect(
            request,
            dispatcher.call(
                model, lambda route: route.provider.complete(body, route.model), budget
            ),
        )
        usage = served.result.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        note_served(request, served)
        note(
            request,
            input_tokens=usage.get("prompt_tokens", 0),
            output_tokens=usage.get("completion_tokens", 0),
        )
        if "cost" in usage:
            note(request, cost_usd=upstream_cost(usage))
        return json_response(served.result, headers=served_headers(served))

    @app.get(
        "/v1/models",
        operation_id="listModels",
        responses={
            **ok(ModelList, "Tier aliases and each provider's models"),
            **error_responses(401),
        },
    )
    async def models(request: Request) -> Response:
        config = snapshot_of(request)
        catalog = catalogs.get(config.generation)
        if catalog is None:  # the first listing since a reload: a catalog of its own
            catalogs.clear()
            catalog = catalogs[config.generation] = ModelCatalog(
                config.registry, list(config.settings.models)
            )
        return json_response(await catalog.listing())


async def cached_completion(
    request: Request,
    body: dict[str, Any],
    budget: float | None,
    started: float,
    cache: ResponseCache,
    plan: Plan,
    dispatcher: Dispatcher,
) -> Response:
    """`/v1/chat/completions` for a cacheable request (explicit temperature 0): a stored
    answer, another request's, or a fresh one (stored). Hits log no tokens."""
    model: str = body["model"]
    if body.get("stream"):
        stored = await cache.lookup(plan)
        if stored is None:
            try:
                opened = await until_disconnect(
                    request,
                    dispatcher.open(
                        model,
                        lambda route: route.provider.complete_stream(body, route.model),
                        budget,
                    ),
                )
            except ChatdError as exc:
                raise plan.tag(exc) from None
            note_served(request, opened)
            result = cache.counted(plan)
            note(request, cache=result)
            if plan.write:
                opened.rest = RecordedCompletionStream(cache, plan.key, opened)
            return StreamingResponse(
                chunk_stream(request, opened, started),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, **served_headers(opened), CACHE_HEADER: result},
            )
        entry = orjson.loads(stored)
        note_hit(request, entry)
        replayed = [sse(chunk) for chunk in replay_completion(entry, wants_usage(body))]
        return StreamingResponse(
            iter([*replayed, DONE]),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **hit_headers(entry)},
        )
    ran: list[int] = []

    async def run() -> bytes:
        served = await dispatcher.call(
            model, lambda route: route.provider.complete(body, route.model), budget
        )
        ran.append(served.attempts)
        return completion_entry(served.route.provider.name, served.route.model, served.result)

    stored, result = await cache.answer(request, plan, run)
    entry = orjson.loads(stored)
    if not ran:
        note_hit(request, entry)
        return json_response(entry["body"], headers=hit_headers(entry))
    usage = entry["body"].get("usage")
    usage = usage if isinstance(usage, dict) else {}
    note(
        request,
        provider=entry["provider"],
        upstream_model=entry["model"],
        attempts=ran[0],
        input_tokens=usage.get("prompt_tokens", 0),
        output_tokens=usage.get("completion_tokens", 0),
        cache=result,
    )
    if "cost" in usage:  # a miss pays what the upstream charged (docs/callers-and-usage.md)
        note(request, cost_usd=upstream_cost(usage))
    headers = {
        ATTEMPTS_HEADER: str(ran[0]),
        "X-Chatd-Provider": entry["provider"],
        "X-Chatd-Model": header_safe(entry["model"]),
        CACHE_HEADER: result,
    }
    return json_response(entry["body"], headers=headers)


def hit_headers(entry: dict[str, Any]) -> dict[str, str]:
    return {
        ATTEMPTS_HEADER: "0",
        "X-Chatd-Provider": entry["provider"],
        "X-Chatd-Model": header_safe(entry["model"]),
        CACHE_HEADER: HIT,
    }


def loads_body(raw: bytes) -> Any:
    if not raw.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("request body is not valid JSON") from None


def served_headers(served: Served[Any] | OpenStream[Any]) -> dict[str, str]:
    return {
        ATTEMPTS_HEADER: str(served.attempts),
        "X-Chatd-Provider": served.route.provider.name,
        "X-Chatd-Model": header_safe(served.route.model),
    }


def header_safe(value: str) -> str:
    """Model names are the caller's text; a header takes printable ASCII only."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe="/:@._-+~")


def has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        ):
            return True
    return False


async def chunk_stream(
    request: Request, opened: OpenStream[dict[str, Any]], started: float
) -> AsyncIterator[bytes]:
    """`data: <chunk>` events as they come, then `data: [DONE]`, or one error event."""
    chunk: dict[str, Any] | None = opened.first
    timed = False
    try:
        while chunk is not None:
            if not timed and has_text(chunk):
                timed = True
                note(request, ttft_ms=round((time.perf_counter() - started) * 1000))
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                note(
                    request,
                    input_tokens=usage.get("prompt_tokens", 0),
                    output_tokens=usage.get("completion_tokens", 0),
                )
                if "cost" in usage:
                    note(request, cost_usd=upstream_cost(usage))
            yield sse(chunk)
            chunk = await anext(opened.rest, None)
        yield DONE
    except asyncio.CancelledError:  # the caller went away: Starlette cancels the stream
        note(request, error="client_gone")
        raise
    except ChatdError as exc:
        note(request, error=exc.type)
        yield sse(exc.api_answer()[1])
    except Exception:
        log.exception("stream from %s failed", opened.route.provider.name)
        note(request, error="internal_error")
        yield sse(InternalError("internal error during stream").envelope())
    finally:
        await opened.aclose()


class ModelCatalog:
    """`GET /v1/models`: tier aliases, then what each registered provider lists, with
    ids carrying the provider prefix. Asked at most every MODELS_TTL_SECS; a provider
    that fails or is slow is left out of that listing."""

    def __init__(self, registry: Registry, aliases: list[str]) -> None:
        self.registry = registry
        self.aliases = sorted(aliases)
        self._cached: dict[str, Any] | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def listing(self) -> dict[str, Any]:
        if self._fresh():
            assert self._cached is not None
            return self._cached
        async with self._lock:
            if not self._fresh():
                self._cached = await self._build()
                self._at = time.monotonic()
            assert self._cached is not None
            return self._cached

    def _fresh(self) -> bool:
        return self._cached is not None and time.monotonic() - self._at < MODELS_TTL_SECS

    async def _build(self) -> dict[str, Any]:
        providers = [p for p in self.registry.providers.values() if p.available]
        answers = await asyncio.gather(*(self._ask(p) for p in providers))
        data = [model_entry(alias, "chatd") for alias in self.aliases]
        for provider, names in zip(providers, answers, strict=True):
            data.extend(model_entry(f"{provider.name}/{name}", provider.name) for name in names)
        return {"object": "list", "data": data}

    async def _ask(self, provider: Any) -> list[str]:
        try:
            async with asyncio.timeout(MODELS_WAIT_SECS):
                return await provider.list_models()
        except (ChatdError, TimeoutError) as exc:
            log.info("/v1/models: %s left out: %s", provider.name, getattr(exc, "message", exc))
        except Exception:
            log.exception("/v1/models: %s left out", provider.name)
        return []


def model_entry(ident: str, owner: str) -> dict[str, Any]:
    return {"id": ident, "object": "model", "created": 0, "owned_by": owner}
