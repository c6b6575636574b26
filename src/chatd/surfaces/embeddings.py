"""Embeddings (docs/http-api.md): `POST /v1/embeddings`, in the OpenAI shape.

Routing, retries, fallbacks, limits and the deadline are the dispatcher's: each batch of
at most the provider's `embed_batch` inputs is one `dispatcher.call`, so a provider's
`max_concurrency` bounds how many batches are in flight at once. Batches run
concurrently and are reassembled in input order; one failed batch fails the request and
cancels the others (no half answer).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from array import array
from dataclasses import dataclass, replace
from typing import Any

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from chatd.config import ProviderConfig, Settings
from chatd.errors import (
    ChatdError,
    ContextOverflow,
    InvalidRequest,
    ProviderDisabled,
    ProviderNotFound,
    UpstreamError,
)
from chatd.routing.dispatch import Dispatcher, Served
from chatd.routing.registry import Registry, Route
from chatd.routing.resilience import TIMEOUT_HEADER, parse_timeout_header
from chatd.state.cache import CACHE_HEADER, HIT, Plan, ResponseCache, note_hit
from chatd.state.snapshot import snapshot_of
from chatd.surfaces.contract.common import MODEL_CALL, error_responses, model_call, ok
from chatd.surfaces.contract.embeddings import MAX_DIMENSIONS, MAX_INPUTS, EmbeddingList
from chatd.surfaces.openai import header_safe, loads_body, served_headers
from chatd.types import EmbedResult, integral
from chatd.web import json_response, note, note_served, read_body, until_disconnect
from chatd.wire.openai_compat import error_answer

ENCODINGS = ("float", "base64")
DEFAULT_BATCH = ProviderConfig.model_fields["embed_batch"].default


@dataclass(frozen=True, slots=True)
class EmbeddingsRequest:
    """A checked /v1/embeddings body; `body` is the caller's, for openai-kind upstreams."""

    model: str
    inputs: list[str]
    encoding: str
    dimensions: int | None
    body: dict[str, Any]


def check_request(body: Any) -> EmbeddingsRequest:
    """Validate the OpenAI embeddings body; a 400 naming the field on anything else."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: is required (a non-empty string)", param="model")
    inputs = check_input(body.get("input", None), "input" in body)
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    elif encoding not in ENCODINGS:
        raise InvalidRequest(
            'encoding_format: must be "float" or "base64"', param="encoding_format"
        )
    dimensions = integral(body.get("dimensions"))
    if dimensions is not None:
        body["dimensions"] = dimensions  # 64.0 reaches openai-kind vendors as 64
    if dimensions is not None and (
        not isinstance(dimensions, int)
        or isinstance(dimensions, bool)
        or not 1 <= dimensions <= MAX_DIMENSIONS
    ):
        raise InvalidRequest(
            f"dimensions: must be an integer from 1 to {MAX_DIMENSIONS}", param="dimensions"
        )
    return EmbeddingsRequest(model.strip(), inputs, encoding, dimensions, body)


def check_input(value: Any, present: bool) -> list[str]:
    """`input`: a non-empty string, or a list of 1–2,048 of them. Token-id arrays (which
    OpenAI also takes) are refused: chatd cannot know the upstream's tokenizer."""
    if not present:
        raise InvalidRequest("input: is required", param="input")
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("input: must not be an empty string", param="input")
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest("input: must be a string or a list of strings", param="input")
    if not value:
        raise InvalidRequest("input: must not be an empty list", param="input")
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(
            f"input: at most {MAX_INPUTS} inputs per request (got {len(value)})", param="input"
        )
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(
                    f"input[{index}]: must not be an empty string", param=f"input[{index}]"
                )
            continue
        if isinstance(item, int | list):
            raise InvalidRequest(
                "input: token-id arrays are not supported; send text", param="input"
            )
        raise InvalidRequest(f"input[{index}]: must be a string", param=f"input[{index}]")
    return value


def batch_size(registry: Registry, model: str) -> int:
    """`embed_batch` of the first target that resolves (the one the dispatcher tries
    first); when none does, the dispatcher will answer the error itself."""
    for target in registry.targets(model):
        try:
            return registry.resolve(target).provider.config.embed_batch
        except (ProviderNotFound, ProviderDisabled):
            continue
    return DEFAULT_BATCH


async def send_batch(route: Route, inputs: list[str], job: EmbeddingsRequest) -> EmbedResult:
    """One batch to `route`. A fallback target with a smaller `embed_batch` gets the
    batch in pieces, one after the other, inside the one concurrency slot it holds."""
    provider = route.provider
    size = provider.config.embed_batch
    if len(inputs) <= size:
        return await provider.embed(inputs, route.model, job.dimensions, job.body)
    vectors: list[list[float]] = []
    texts: list[bytes] | None = []  # the vectors' own text while every piece has it
    tokens = 0
    for start in range(0, len(inputs), size):
        piece = inputs[start : start + size]
        result = await provider.embed(piece, route.model, job.dimensions, job.body)
        vectors.extend(result.vectors)
        tokens += result.input_tokens
        if texts is not None and result.texts is not None:
            texts.extend(result.texts)
        else:
            texts = None
    return EmbedResult(vectors, tokens, texts)


async def embed_all(
    dispatcher: Dispatcher, job: EmbeddingsRequest, budget: float | None
) -> list[Served[EmbedResult]]:
    """Every batch's answer, in input order. The batches start together, so they share
    one deadline (the budget counts from now)."""
    size = batch_size(dispatcher.registry, job.model)
    batches = [job.inputs[i : i + size] for i in range(0, len(job.inputs), size)]

    def call(inputs: list[str]) -> Any:
        return dispatcher.call(job.model, lambda route: send_batch(route, inputs, job), budget)

    if len(batches) == 1:
        return [await call(batches[0])]
    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            tasks = [group.create_task(call(inputs)) for inputs in batches]
    except BaseExceptionGroup as failed:
        raise first_error(failed) from None
    return [task.result() for task in tasks]


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that failed the request: the first batch failure chatd can explain."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            error = first_error(error)
        if isinstance(error, ChatdError):
            return error
    return group.exceptions[0]


def encode(vector: list[float], encoding: str) -> list[float] | str:
    """`base64` is little-endian float32, as OpenAI sends it (and its SDKs decode)."""
    if encoding == "float":
        return vector
    floats = array("f", vector)
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode("ascii")


def answer(job: EmbeddingsRequest, served: list[Served[EmbedResult]]) -> dict[str, Any]:
    """The OpenAI `list` of embeddings, `data` in input order, usage summed."""
    data: list[dict[str, Any]] = []
    width = len(served[0].result.vectors[0])
    tokens = 0
    for batch in served:
        tokens += batch.result.input_tokens
        if len(batch.result.vectors[0]) != width:  # batches agree within themselves
            raise UpstreamError(batch.route.provider.name, "answered vectors of different lengths")
        # Floats asked for and the upstream's own text at hand: sent as it came.
        texts = batch.result.texts if job.encoding == "float" else None
        for i, vector in enumerate(batch.result.vectors):
            embedding = orjson.Fragment(texts[i]) if texts else encode(vector, job.encoding)
            data.append({"object": "embedding", "index": len(data), "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": served[0].route.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def install_embeddings_routes(app: FastAPI, settings: Settings) -> None:
    max_body = settings.chatd.max_body_bytes
    shapes = getattr(app.state, "error_shapes", None) or {}
    app.state.error_shapes = {**shapes, "/v1/embeddings": embeddings_error}

    @app.post(
        "/v1/embeddings",
        operation_id="createEmbeddings",
        openapi_extra=model_call("EmbeddingsRequest"),
        responses={
            **ok(EmbeddingList, "One embedding per input, in input order"),
            **error_responses(*MODEL_CALL),
        },
    )
    async def embeddings(request: Request) -> Response:
        job = check_request(loads_body(await read_body(request, max_body)))
        note(request, model=job.model)
        admit = request.app.state.admit  # callers (docs/callers-and-usage.md), when configured
        if admit is not None:
            await admit(request, job.model)
        budget = parse_timeout_header(request.headers.get(TIMEOUT_HEADER))
        config = snapshot_of(request)  # the configuration this request runs on
        dispatcher, cache = config.dispatcher, config.cache
        plan = cache.plan(request, "embed", job.model, job.dimensions) if cache else None
        if cache is not None and plan is not None:
            return await cached_embeddings(request, dispatcher, job, budget, cache, plan)
        served = await until_disconnect(request, embed_all(dispatcher, job, budget))
        return embeddings_response(request, job, served)


def embeddings_response(
    request: Request,
    job: EmbeddingsRequest,
    served: list[Served[EmbedResult]],
    extra_headers: dict[str, str] | None = None,
) -> Response:
    """The answer for `served` batches, with the log facts and `X-Chatd-*` headers."""
    attempts = sum(batch.attempts for batch in served)
    note_served(request, served[0])
    body = answer(job, served)
    tokens = body["usage"]["prompt_tokens"]
    note(request, attempts=attempts, input_tokens=tokens, output_tokens=0)
    headers = served_headers(served[0])
    headers["X-Chatd-Attempts"] = str(attempts)
    headers.update(extra_headers or {})
    return json_response(body, headers=headers)


async def cached_embeddings(
    request: Request,
    dispatcher: Dispatcher,
    job: EmbeddingsRequest,
    budget: float | None,
    cache: ResponseCache,
    plan: Plan,
) -> Response:
    """Embeddings are cached per input. Stored vectors are reused; only the
    inputs not stored go upstream (one request, batched as usual), and are stored."""
    keys = [f"{plan.key}:{hashlib.sha256(text.encode()).hexdigest()}" for text in job.inputs]
    stored: list[bytes | None] = [None] * len(keys)
    if plan.read:
        stored = list(await asyncio.gather(*(cache.get(key) for key in keys)))
    missing = [i for i, value in enumerate(stored) if value is None]
    if not missing:  # every vector was stored: no upstream call, nothing spent
        cache.count(HIT)
        entries = [orjson.loads(value) for value in stored if value is not None]
        first = entries[0]
        note_hit(request, first)
        return json_response(
            hit_answer(job, [entry["vector"] for entry in entries], first["model"]),
            headers={
                CACHE_HEADER: HIT,
                "X-Chatd-Attempts": "0",
                "X-Chatd-Provider": first["provider"],
                "X-Chatd-Model": header_safe(first["model"]),
            },
        )
    try:
        fresh = replace(job, inputs=[job.inputs[i] for i in missing])
        served = await until_disconnect(request, embed_all(dispatcher, fresh, budget))
    except ChatdError as exc:
        raise plan.tag(exc) from None
    result = cache.counted(plan)
    note(request, cache=result)
    vectors: list[list[float]] = [v for batch in served for v in batch.result.vectors]
    if plan.write:
        provider, model = served[0].route.provider.name, served[0].route.model
        for i, vector in zip(missing, vectors, strict=True):
            entry = {"provider": provider, "model": model, "vector": vector}
            cache.put_later(keys[i], orjson.dumps(entry))
    if len(missing) == len(keys):
        return embeddings_response(request, job, served, {CACHE_HEADER: result})
    merged = [orjson.loads(value)["vector"] if value is not None else None for value in stored]
    for i, vector in zip(missing, vectors, strict=True):
        merged[i] = vector
    whole = EmbedResult(
        [v for v in merged if v is not None], sum(b.result.input_tokens for b in served)
    )
    return embeddings_response(
        request, job, [Served(served[0].route, whole, served[0].tally)], {CACHE_HEADER: result}
    )


def hit_answer(job: EmbeddingsRequest, vectors: list[list[float]], model: str) -> dict[str, Any]:
    """The answer made only of stored vectors: no tokens were spent."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(vector, job.encoding)}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


def embeddings_error(error: ChatdError) -> tuple[int, dict[str, Any], str]:
    """The OpenAI dialect; an input longer than the model's context names `input`."""
    status, body, kind = error_answer(error)
    if isinstance(error, ContextOverflow):
        body["error"]["param"] = "input"
    return status, body, kind
