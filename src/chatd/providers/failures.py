"""What an upstream's failure means: classified once, where the provider call fails.

A non-2xx answer becomes the `UpstreamError` subclass that says whose fault it was (the
caller's request, chatd's key, the upstream's load), carrying the upstream's own words
rather than its JSON. A transport failure is described in words an operator can act on.
See docs/errors.md for every status each surface answers.
"""

from __future__ import annotations

import errno
import re
import socket
import ssl
from typing import Any

import httpx
import orjson

from chatd.errors import (
    ContextOverflow,
    UpstreamError,
    UpstreamKeyRefused,
    UpstreamModelNotFound,
    UpstreamOverloaded,
    UpstreamRateLimited,
    UpstreamRejected,
)

OVERFLOW_CODE = "context_length_exceeded"
# What real servers say when a prompt does not fit the model's context, one row per
# dialect (docs/errors.md). Codes and types are matched exactly; phrases in the message,
# case-insensitively, whatever the status (some servers say it with a 500).
OVERFLOW_CODES = frozenset(
    {
        "context_length_exceeded",  # OpenAI, OpenRouter, and servers that copy them
        "exceed_context_size_error",  # llama.cpp's llama-server (its `type`)
    }
)
OVERFLOW_PHRASES = re.compile(
    "|".join(
        (
            r"maximum context length",  # OpenAI, OpenRouter, vLLM ("... is 4096 tokens")
            r"exceeds? the available context size",  # llama.cpp
            r"larger than the max context size",  # llama.cpp, a single slot's n_ctx
            r"is too large to process",  # llama.cpp embeddings: an input over the batch
            r"prompt is too long",  # Anthropic
            r"exceed context limit",  # Anthropic, input + max_tokens
            r"exceeds? (the |the model's )?(maximum )?context length",  # Ollama and kin
            r"exceeded max context length",  # Ollama's runner
            r"context window (is )?exceeded|exceeds the context window",  # OpenAI Responses
        )
    ),
    re.IGNORECASE,
)
CALLER_FAULT_STATUSES = frozenset({400, 413, 422})


def classify(
    provider: str, status: int, text: str, retry_after: str | None = None
) -> UpstreamError:
    """The error for an upstream's non-2xx answer (`text`: its body, keys already masked)."""
    said, code, param, data = upstream_words(text)
    overflow = is_overflow(code, said, data)
    if overflow:
        kind: type[UpstreamError] = ContextOverflow
        code = OVERFLOW_CODE
        said = with_sizes(said, data)
    elif status in CALLER_FAULT_STATUSES:
        kind = UpstreamRejected
    elif status == 404:
        kind = UpstreamModelNotFound
    elif status in (401, 403):
        kind = UpstreamKeyRefused
    elif status == 429:
        kind = UpstreamRateLimited
    elif status == 529:
        kind = UpstreamOverloaded
    else:
        kind = UpstreamError
    return kind(
        provider,
        "",
        upstream_status=status,
        body=said,
        retry_after=retry_after,
        upstream_code=code,
        param=param,
    )


def upstream_words(text: str) -> tuple[str, str | None, str | None, dict[str, Any]]:
    """An error body's message, code, param and error object, from where vendors put them
    (`error.message`, `error` as a string, `message`, `detail`); the raw body (stripped)
    as the message when nothing parses."""
    try:
        doc = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return text.strip(), None, None, {}
    error = doc.get("error")
    data: dict[str, Any] = error if isinstance(error, dict) else doc
    message: Any = data.get("message")
    if isinstance(error, str):
        message = error
    if not isinstance(message, str) or not message.strip():
        message = doc.get("message") if isinstance(doc.get("message"), str) else None
    if message is None:
        message = detail_words(doc.get("detail"))
    if not message:
        message = text.strip()
    code = first_text(data.get("code"), data.get("type"))
    param = data.get("param") if isinstance(data.get("param"), str) else None
    return message.strip(), code, param, data


def detail_words(detail: Any) -> str | None:
    """FastAPI's `detail` (vLLM, many Python servers): a string, or a list of validation
    errors said as `loc: msg` (never their `input`, which can quote the prompt)."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        said = []
        for item in detail:
            if isinstance(item, dict) and isinstance(item.get("msg"), str):
                loc = item.get("loc")
                where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
                said.append(f"{where}: {item['msg']}" if where else item["msg"])
        return "; ".join(said) or None
    return None


def first_text(*values: Any) -> str | None:
    for value in values:
        if isinstance(value, str) and value:
            return value
    return None


def is_overflow(code: str | None, message: str, data: dict[str, Any]) -> bool:
    """Does the upstream say the prompt is longer than the model's context?"""
    if code in OVERFLOW_CODES or data.get("type") in OVERFLOW_CODES:
        return True
    return OVERFLOW_PHRASES.search(message) is not None


def with_sizes(message: str, data: dict[str, Any]) -> str:
    """llama.cpp's older message names no sizes but its body does: add them."""
    prompt, context = data.get("n_prompt_tokens"), data.get("n_ctx")
    if isinstance(prompt, int) and isinstance(context, int) and str(context) not in message:
        return f"{message} ({prompt} prompt tokens, context {context})"
    return message


def stream_error(provider: str, error: Any) -> UpstreamError:
    """An error an upstream sent inside a 2xx stream (OpenRouter's SSE `error` event,
    Ollama's NDJSON `{"error": ...}`), classified like a status answer when it says one."""
    data = error if isinstance(error, dict) else {"message": str(error)}
    text = orjson.dumps({"error": data}).decode()
    status = data.get("code")
    if isinstance(status, int) and 400 <= status <= 599:
        return classify(provider, status, text)
    said, code, param, _ = upstream_words(text)
    if is_overflow(code, said, data):
        code = OVERFLOW_CODE
        said = with_sizes(said, data)
        return ContextOverflow(provider, "", upstream_status=400, body=said, upstream_code=code)
    return UpstreamError(provider, "upstream error mid-stream", body=said)


# -- transport failures --------------------------------------------------------------


def is_timeout(exc: httpx.HTTPError) -> bool:
    """Did `exc` come from a timeout? (httpx-aiohttp maps some resets to ConnectTimeout.)"""
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        return isinstance(cause, TimeoutError)
    return isinstance(exc, httpx.TimeoutException)


def describe_failure(exc: BaseException, url: httpx.URL) -> str:
    """What went wrong on the wire, in words an operator can act on and naming the
    upstream's host: never a transport's class names or internals (`ssl:default`)."""
    where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for cause in chain:
        if isinstance(cause, socket.gaierror):
            return f"cannot resolve host {url.host}"
        if isinstance(cause, ConnectionRefusedError):
            return f"connection refused by {where}"
        if isinstance(cause, ConnectionResetError | BrokenPipeError):
            return f"connection reset by {where}"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {where} failed"
        if isinstance(cause, TimeoutError):
            return f"timed out talking to {where}"
        if isinstance(cause, OSError) and cause.errno in UNREACHABLE_ERRNOS:
            return f"no route to {where}"
    names = " ".join(type(cause).__name__ for cause in chain)
    if "Disconnect" in names or "RemoteProtocol" in names or "Payload" in names:
        return f"{where} closed the connection"
    if "Connect" in names:
        return f"could not connect to {where}"
    return f"connection to {where} failed"


UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
