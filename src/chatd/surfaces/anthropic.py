"""The Anthropic Messages surface: `POST /v1/messages` (docs/http-api.md).

The request is checked (`wire/anthropic_checks.py`) and translated into an OpenAI-shaped
Chat Completions body (`wire/anthropic_request.py`), so every provider kind serves it the
way it serves `/v1/chat/completions`, under the dispatcher's routing, retries, fallbacks,
limits and deadline. The answer (or its chunks) is translated back into an Anthropic
message or Anthropic stream events (`wire/anthropic_reply.py`). Errors on this path take
Anthropic's shape (`wire/anthropic_errors.py`) with chatd's own statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

from chatd.config import Settings
from chatd.errors import ChatdError, InternalError, UpstreamError
from chatd.routing.dispatch import OpenStream
from chatd.routing.resilience import TIMEOUT_HEADER, parse_timeout_header
from chatd.state.snapshot import snapshot_of
from chatd.surfaces.contract.anthropic import (
    MESSAGES_PARAMETERS,
    anthropic_error_responses,
    anthropic_ok,
)
from chatd.surfaces.contract.common import MODEL_CALL, json_body
from chatd.surfaces.openai import loads_body, served_headers
from chatd.web import SSE_HEADERS, json_response, note, note_served, read_body, until_disconnect
from chatd.wire.anthropic_checks import check_body
from chatd.wire.anthropic_errors import error_answer, error_body
from chatd.wire.anthropic_reply import StreamTranslator, sse_event, to_message
from chatd.wire.anthropic_request import to_openai as to_openai_body

log = logging.getLogger("chatd")

PATH = "/v1/messages"
DESCRIPTION = (
    "The Anthropic Messages API, for Anthropic SDKs and the tools built on them, "
    "served by any provider. A caller token (when inbound auth is on) may come as "
    "`x-api-key: <token>` as well as `Authorization: Bearer <token>`. Errors take "
    "Anthropic's shape (`AnthropicError`) with chatd's statuses."
)


def install_anthropic_routes(app: FastAPI, settings: Settings) -> None:
    """Add `POST /v1/messages`; errors under its path answer in Anthropic's shape."""
    max_body = settings.chatd.max_body_bytes
    shapes = getattr(app.state, "error_shapes", None) or {}
    app.state.error_shapes = {**shapes, PATH: error_answer}

    @app.post(
        PATH,
        operation_id="createMessage",
        summary="Anthropic Messages",
        description=DESCRIPTION,
        openapi_extra={**json_body("MessagesRequest"), "parameters": MESSAGES_PARAMETERS},
        responses={**anthropic_ok(), **anthropic_error_responses(*MODEL_CALL, 529)},
    )
    async def messages(request: Request) -> Response:
        started = time.perf_counter()
        body = check_body(loads_body(await read_body(request, max_body)))
        model: str = body["model"]
        note(
            request,
            model=model,
            max_tokens=body.get("max_tokens"),
            temperature=body.get("temperature"),
        )
        stream = bool(body.get("stream"))
        upstream = to_openai_body(body, stream=stream)  # every block checked before admission
        admit = request.app.state.admit  # callers (docs/callers-and-usage.md), when configured
        if admit is not None:
            await admit(request, model)
        stops = body.get("stop_sequences")
        budget = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        dispatcher = snapshot_of(request).dispatcher  # the configuration it runs on
        if stream:
            opened = await until_disconnect(
                request,
                dispatcher.open(
                    model,
                    lambda route: route.provider.complete_stream(upstream, route.model),
                    budget,
                ),
            )
            note_served(request, opened)
            return StreamingResponse(
                message_events(request, opened, started, stops),
                media_type="text/event-stream",
                headers={**SSE_HEADERS, **served_headers(opened)},
            )
        served = await until_disconnect(
            request,
            dispatcher.call(
                model, lambda route: route.provider.complete(upstream, route.model), budget
            ),
        )
        note_served(request, served)
        try:
            answer = to_message(served.result, served.route.model, stops)
        except ValueError as exc:
            raise UpstreamError(served.route.provider.name, str(exc)) from None
        note(request, **answer["usage"])
        return json_response(answer, headers=served_headers(served))


async def message_events(
    request: Request,
    opened: OpenStream[dict[str, Any]],
    started: float,
    stop_sequences: list[str] | None,
) -> AsyncIterator[bytes]:
    """Anthropic stream events as the chunks come; an `error` event if the stream fails."""
    translator = StreamTranslator(opened.route.model, stop_sequences)
    chunk: dict[str, Any] | None = opened.first
    try:
        for event in translator.start():
            yield sse_event(event)
        while chunk is not None:
            timed = translator.has_text
            for event in translator.feed(chunk):
                yield sse_event(event)
            if not timed and translator.has_text:
                note(request, ttft_ms=round((time.perf_counter() - started) * 1000))
            chunk = await anext(opened.rest, None)
        note(
            request,
            input_tokens=translator.input_tokens,
            output_tokens=translator.output_tokens,
        )
        for event in translator.finish_events():
            yield sse_event(event)
    except asyncio.CancelledError:  # the caller went away: Starlette cancels the stream
        note(request, error="client_gone")
        raise
    except ChatdError as exc:
        note(request, error=exc.type)
        yield sse_event(("error", error_body(exc)))
    except Exception:
        log.exception("stream from %s failed", opened.route.provider.name)
        note(request, error=InternalError.type)
        yield sse_event(("error", error_body(InternalError("internal error during stream"))))
    finally:
        await opened.aclose()
