"""HTTP plumbing shared by the routes: body reading, JSON responses, errors, disconnects."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar, get_args

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatd.errors import ChatdError, InternalError, InvalidRequest, PayloadTooLarge

REQUEST_ID_HEADER = b"x-request-id"
SAFE_REQUEST_ID = re.compile(rb"^[\x21-\x7e]{1,128}$")
JSON = "application/json"
# What keeps a stream a stream through caches and reverse proxies (nginx reads the second).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def note(request: Request, **fields: Any) -> None:
    """Record facts about this request (model, provider, tokens, attempts, ttft_ms, ...)
    for its one log line; kept in the ASGI scope's state under "log"."""
    request.scope.setdefault("state", {}).setdefault("log", {}).update(fields)


def note_served(request: Request, served: Any) -> None:
    """Record who answered: a dispatcher `Served` or `OpenStream` (route and attempts)."""
    note(
        request,
        provider=served.route.provider.name,
        upstream_model=served.route.model,
        attempts=served.attempts,
    )
    endpoint = getattr(served, "endpoint", None)
    if endpoint is not None:  # a provider with several endpoints (docs/routing.md)
        note(request, endpoint=endpoint)


def sse(data: Any) -> bytes:
    """One Server-Sent Event: `data: <json>` and the blank line that ends it."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


class ClientGone(Exception):
    """The caller disconnected before the answer was ready."""


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=JSON)


def error_response(
    error: ChatdError, request: Request | None = None, *, scope: Scope | None = None
) -> Response:
    """The error's response in its surface's dialect (`answer`), with `x-should-retry`;
    given the request (or its scope), its log line learns the error as answered."""
    if request is not None:
        scope = request.scope
    status, body, kind = answer(error, scope)
    if scope is not None:
        note_error(scope, error, kind)
    headers = {**error.headers, RETRY_HEADER: error.retry_hint}
    return json_response(body, status, headers)


RETRY_HEADER = "x-should-retry"  # both official SDKs obey it (docs/errors.md)
# A surface's way of answering an error: its status, its body, and its type for the log.
Dialect = Callable[[ChatdError], tuple[int, Any, str]]


def native(error: ChatdError) -> tuple[int, Any, str]:
    """The error envelope with the error's own status (`/v1/chat` and chatd's own routes)."""
    return error.status, error.envelope(), error.type


def answer(error: ChatdError, scope: Scope | None) -> tuple[int, Any, str]:
    """Status, body and logged type of `error` on the request's path: natively, unless
    the app gave the path a dialect of its own (`app.state.error_shapes` maps a path
    prefix to a `Dialect`: the OpenAI surface keeps an upstream's 4xx, the Anthropic
    surface answers in Anthropic's shape)."""
    if scope is not None:
        shapes = getattr(getattr(scope.get("app"), "state", None), "error_shapes", None)
        if shapes:
            path: str = scope.get("path", "")
            for prefix, dialect in shapes.items():
                if path == prefix or path.startswith(prefix + "/"):
                    return dialect(error)
    return native(error)


def note_error(scope: Scope, error: ChatdError, kind: str | None = None) -> None:
    """Record an error's type as answered (and, from the dispatcher, its provider and
    attempts)."""
    facts = scope.setdefault("state", {}).setdefault("log", {})
    facts["error"] = kind or error.type
    # The server-log wording (an upstream error's summary leaves out its body, which can
    # quote the caller's prompt): for the dashboard's error list, never the log line.
    facts["error_message"] = getattr(error, "summary", error.message)
    provider = getattr(error, "provider", None)
    if provider is not None:
        facts.setdefault("provider", provider)
    attempts = getattr(error, "attempts", None)
    if attempts is not None:
        facts["attempts"] = attempts


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 as soon as it grows past `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
    except ClientDisconnect:  # the caller hung up mid-body: a 499 like any other, not a 500
        raise ClientGone from None
    return b"".join(chunks)


def parse_body(model: type[M], body: bytes) -> M:
    """Validate a JSON body into `model`, turning any failure into a clear 400."""
    if not body.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc, model) from None


def invalid_request(exc: ValidationError, model: type[BaseModel] | None = None) -> InvalidRequest:
    """One readable 400 from pydantic's first error, in chatd's own words; never echoes
    the input (docs/http-api.md)."""
    first = exc.errors(include_input=False, include_url=False)[0]
    if first["type"] in ("json_invalid", "json_type"):
        return InvalidRequest("request body is not valid JSON")
    loc = [str(p) for p in first["loc"]]
    if not loc:
        return InvalidRequest("request body must be a JSON object")
    param = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
    return InvalidRequest(f"{param}: {in_words(first, bounds(model, loc))}", param=param)


LIMIT_WORDS = (("ge", "at least"), ("le", "at most"), ("gt", "more than"), ("lt", "less than"))
WORDS = {
    "missing": "is required",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "int_parsing": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be a boolean",
    "bool_parsing": "must be a boolean",
    "string_type": "must be a string",
    "list_type": "must be an array",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "finite_number": "must be a finite number",
}


def in_words(error: Any, limits: tuple[Any, Any] | None) -> str:
    """What a field must be, as the other surfaces say it (`must be between 0 and 2`)."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        if limits is not None and None not in limits:
            return f"must be between {number(limits[0])} and {number(limits[1])}"
        for key, words in (
            ("ge", "at least"),
            ("le", "at most"),
            ("gt", "more than"),
            ("lt", "less than"),
        ):
            if key in ctx:
                return f"must be {words} {number(ctx[key])}"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return "must be one of " + ", ".join(choice or '""' for choice in choices)
    if kind == "too_short" and ctx.get("min_length") == 1:
        return "must be a non-empty array"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} items"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    return WORDS.get(kind, "is not valid")


def bounds(model: type[BaseModel] | None, loc: list[str]) -> tuple[Any, Any] | None:
    """A top-level field's (minimum, maximum) from its declaration, when it has both."""
    field = model.model_fields.get(loc[0]) if model is not None and len(loc) == 1 else None
    if field is None:
        return None
    items = list(field.metadata)
    for arg in get_args(field.annotation):  # `Annotated[int, Field(...)] | None`
        for extra in getattr(arg, "__metadata__", ()):
            items.extend(getattr(extra, "metadata", [extra]))
    low = high = None
    for item in items:
        low = getattr(item, "ge", low)
        high = getattr(item, "le", high)
    return (low, high)


def number(value: Any) -> str:
    """`2.0` as `2`: limits read as a person writes them."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


async def until_disconnect(request: Request, work: Any) -> T:
    """Await `work`, abandoning it (and raising ClientGone) if the caller hangs up first.

    `work` runs in a task of its own (shallow: resuming it does not walk the ASGI
    middleware's coroutines); a watcher task cancels it when `http.disconnect` arrives.
    """
    loop = asyncio.get_running_loop()
    task: asyncio.Task[T] = loop.create_task(work)
    watcher = loop.create_task(_wait_disconnect(request.receive))
    watcher.add_done_callback(lambda _: task.cancel())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class RequestContext:
    """Pure ASGI middleware: request IDs on every response, inbound auth, a last-resort
    500, and, once the response has ended (a stream too), `finished(scope, status, secs)`
    for the request's log line and metrics.

    Written as raw ASGI (not BaseHTTPMiddleware) so streams pass through unbuffered.
    """

    def __init__(
        self,
        app: ASGIApp,
        logger: Any,
        authorize: Callable[[Scope], ChatdError | None] | None = None,
        finished: Callable[[Scope, int, float], None] | None = None,
        started: Callable[[Scope], None] | None = None,
        config: Any = None,
    ) -> None:
        self.app = app
        self.logger = logger
        self.authorize = authorize  # returns the error to refuse the request with, or None
        self.finished = finished
        self.started = started  # tracing's server span, when it is on
        # Its `.snapshot`: the configuration each request takes once, as it arrives, into
        # `scope["state"]["config"]`, and runs on to its end (docs/reload.md).
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        snapshot = None
        if self.config is not None:
            snapshot = state["config"] = self.config.snapshot
            snapshot.in_flight += 1
        header = (REQUEST_ID_HEADER, request_id.encode())
        status = 0  # 0 until the response starts
        if self.started is not None:
            self.started(scope)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # Headers the request earned on its way (the caller's X-RateLimit-*).
                extra = scope["state"].get("headers") or ()
                message["headers"] = [*message.get("headers", ()), header, *extra]
            await send(message)

        try:
            refusal = self.authorize(scope) if self.authorize is not None else None
            if refusal is not None:
                await error_response(refusal, scope=scope)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            self.logger.exception("unhandled error serving %s %s", scope["method"], scope["path"])
            if not status:
                error = InternalError("internal error; see the server log")
                await error_response(error, scope=scope)(scope, receive, send_with_id)
        finally:
            if self.finished is not None:
                self.finished(scope, status, time.perf_counter() - began)
            if snapshot is not None:
                snapshot.in_flight -= 1


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            return value.decode("ascii") if SAFE_REQUEST_ID.match(value) else None
    return None
