"""The Provider base class: one upstream, one pooled HTTP client, one wire format.

A provider receives the upstream model name (the registry already stripped any
prefix) and knows only how to speak to its upstream. Errors come out as the
`chatd.errors` sentinels so the app can answer with the right status.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import orjson

from chatd.config import ProviderConfig
from chatd.errors import InvalidRequest, UpstreamError, UpstreamTimeout
from chatd.providers.failures import classify, describe_failure, is_timeout, stream_error
from chatd.telemetry.propagation import with_traceparent
from chatd.types import ChatRequest, ChatResult, EmbedResult, StreamEvent
from chatd.wire.openai_compat import chunks, completion, to_chat_request, wants_usage


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who chatd tells OpenAI-compatible vendors it is (`HTTP-Referer`, `X-Title`)."""

    app_url: str = ""
    app_name: str = "chatd"


class Provider(ABC):
    """One configured upstream. Safe for concurrent use; one instance per name."""

    kind: ClassVar[str]
    # Where the upstream lists its models: `GET /v1/models` and `/ready?probe=1` ask it.
    models_path: ClassVar[str | None] = None
    weight: float = 1.0  # the endpoint's share of its provider's traffic (docs/routing.md)

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        *,
        key: str = "",
        timeout: float = 180.0,
        attribution: Attribution | None = None,
        transport: str = "aiohttp",
        endpoint: str = "",
    ) -> None:
        self.name = name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        # Which of the provider's endpoints this instance is (docs/routing.md): one instance per
        # endpoint, each with its own base_url, key and pooled client.
        self.endpoint = endpoint or endpoint_name(self.base_url, name)
        self.timeout = timeout
        self.attribution = attribution or Attribution()
        self._key = key
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._urls: dict[str, httpx.URL] = {}

    @property
    def available(self) -> bool:
        """False when the provider needs a key and none resolved (→ 503)."""
        return bool(self._key) or not self.config.needs_key

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    async def start(self) -> None:
        """Open the pooled client; called once from the app's lifespan."""
        if self._client is None:
            self._client = make_client(
                self.base_url, self.timeout, self.auth_headers(), self._transport
            )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._urls.clear()

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # not started through a lifespan (e.g. a unit test)
            self._client = make_client(
                self.base_url, self.timeout, self.auth_headers(), self._transport
            )
        return self._client

    @abstractmethod
    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        """One non-streamed round trip."""

    @abstractmethod
    def stream(self, request: ChatRequest, model: str) -> AsyncIterator[StreamEvent]:
        """Stream the answer; the last event has `done=True`."""

    async def complete(self, body: dict[str, Any], model: str) -> dict[str, Any]:
        """One `chat.completion` for a checked OpenAI-shaped body."""
        return completion(await self.chat(to_chat_request(body, model), model), model)

    def complete_stream(self, body: dict[str, Any], model: str) -> AsyncIterator[dict[str, Any]]:
        """`chat.completion.chunk`s (the route adds `data: [DONE]`)."""
        events = self.stream(to_chat_request(body, model), model)
        return chunks(events, model, wants_usage(body))

    async def list_models(self) -> list[str]:
        """The upstream's model names, for `GET /v1/models`; none by default."""
        return []

    async def embed(
        self, inputs: list[str], model: str, dimensions: int | None, body: dict[str, Any]
    ) -> EmbedResult:
        """One vector per input, in order (`body` is the caller's request)."""
        raise InvalidRequest(
            f"provider {self.name} ({self.kind}) serves no embeddings", param="model"
        )

    def describe(self) -> dict[str, Any]:
        """The public listing entry: never a key, never a key's length."""
        return {
            "name": self.name,
            "kind": self.kind,
            "base_url": self.base_url,
            "available": self.available,
        }

    # -- shared HTTP plumbing ------------------------------------------------

    def url(self, path: str) -> httpx.URL:
        """The absolute upstream URL for `path`, parsed once: httpx's merge of a relative
        path with `base_url` costs ~30 µs a request on the benchmark machine."""
        url = self._urls.get(path)
        if url is None:  # the same join as httpx's own (base_url keeps a trailing slash)
            base = self.client.base_url
            raw_path = base.raw_path + httpx.URL(path).raw_path.lstrip(b"/")
            url = self._urls[path] = base.copy_with(raw_path=raw_path)
        return url

    async def post_json(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body` as JSON and return the parsed 2xx answer, or raise a sentinel."""
        return (await self.post_for_json(path, body))[0]

    async def post_for_json(self, path: str, body: dict[str, Any]) -> tuple[Any, bytes]:
        """`post_json`, with the answer's bytes as they came beside what they parse to."""
        try:
            response = await self.client.post(
                self.url(path), content=orjson.dumps(body), headers=with_traceparent(JSON_HEADERS)
            )
        except httpx.HTTPError as exc:
            raise self.timeout_error() if is_timeout(exc) else self.unreachable(exc) from None
        response.stream = READ  # the body is read: cut the response <-> stream cycle
        if response.status_code >= 300:
            raise self.status_error(response.status_code, response.text, response.headers)
        raw = response.content
        try:
            return orjson.loads(raw), raw
        except orjson.JSONDecodeError:
            raise UpstreamError(
                self.name, "unparseable JSON", body=self.redact(response.text)
            ) from None

    async def get_json(self, path: str, wait: float = 3.0) -> Any:
        """GET a small JSON document (model lists, probes) with a short timeout."""
        try:
            response = await self.client.get(path, timeout=min(wait, self.timeout))
        except httpx.HTTPError as exc:
            raise self.timeout_error() if is_timeout(exc) else self.unreachable(exc) from None
        if response.status_code >= 300:
            raise self.status_error(response.status_code, response.text, response.headers)
        try:
            return orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise UpstreamError(self.name, "unparseable JSON", body="") from None

    @contextlib.asynccontextmanager
    async def open_stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
        """POST and yield the streaming response once its status is known to be 2xx."""
        request = self.client.build_request(
            "POST",
            self.url(path),
            content=orjson.dumps(body),
            headers=with_traceparent(JSON_HEADERS),
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.timeout_error() if is_timeout(exc) else self.unreachable(exc) from None
        try:
            if response.status_code >= 300:
                try:
                    await response.aread()
                    text = response.text
                except httpx.HTTPError:
                    text = ""
                raise self.status_error(response.status_code, text, response.headers)
            yield response
        finally:
            await response.aclose()
            response.stream = READ

    async def lines(self, response: httpx.Response) -> AsyncIterator[str]:
        """The response's lines, with transport failures turned into sentinels."""
        try:
            async for line in response.aiter_lines():
                yield line
        except httpx.HTTPError as exc:
            if is_timeout(exc):
                raise self.timeout_error() from None
            detail = describe_failure(exc, self.client.base_url)
            raise UpstreamError(
                self.name, f"stream broke off: {detail}", unreachable=True
            ) from None

    def timeout_error(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"{self.name}: no answer within {self.timeout:g}s")

    def unreachable(self, exc: Exception) -> UpstreamError:
        detail = describe_failure(exc, self.client.base_url)
        return UpstreamError(self.name, f"could not reach upstream: {detail}", unreachable=True)

    def status_error(self, status: int, text: str, headers: httpx.Headers) -> UpstreamError:
        """The upstream's non-2xx answer, classified (docs/errors.md)."""
        return classify(self.name, status, self.redact(text), headers.get("retry-after"))

    def stream_error(self, error: Any) -> UpstreamError:
        """An error the upstream sent inside a 2xx stream, classified like a status."""
        if isinstance(error, str):
            error = self.redact(error)
        elif isinstance(error, dict):
            error = orjson.loads(self.redact(orjson.dumps(error).decode()))
        return stream_error(self.name, error)

    def bad_shape(self, what: str, data: Any) -> UpstreamError:
        text = orjson.dumps(data).decode() if not isinstance(data, str) else data
        return UpstreamError(self.name, what, body=self.redact(text))

    def redact(self, text: str) -> str:
        """Upstreams sometimes echo the credential back; never pass it on."""
        if self._key and self._key in text:
            text = text.replace(self._key, "***")
        return text


JSON_HEADERS = {"Content-Type": "application/json"}
# httpx's Response and its BoundAsyncStream point at each other, so every response (and the
# aiohttp one hanging off it, ~20 objects) waits for the cyclic GC. Once the body is read,
# post_json swaps the stream for this empty one and refcounting frees them at once.
READ = httpx.ByteStream(b"")


class NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing: chatd calls APIs, not websites, and httpx's
    per-response cookie extraction (through http.cookiejar) cost ~20 µs a request."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass

    def set_cookie_header(self, request: httpx.Request) -> None:
        pass


class UpstreamClient(httpx.AsyncClient):
    """httpx.AsyncClient that starts with a NoCookies jar."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._cookies = NoCookies()


def make_client(
    base_url: str, timeout: float, headers: dict[str, str], transport: str = "aiohttp"
) -> httpx.AsyncClient:
    """The one pooled client a provider uses for the process's life.

    httpx is the API; by default its transport is aiohttp's connection pool, measured
    here at ~2.7x the requests/s of httpx's own transport (bench/RESULTS.md). The plain
    httpx transport remains for respx-based unit tests and as an operator fallback.
    """
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    kwargs: dict[str, Any] = {}
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        kwargs["transport"] = AiohttpTransport(limits=limits, trust_env=False)
    else:
        kwargs["limits"] = limits
    return UpstreamClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        follow_redirects=False,
        **kwargs,
    )


def endpoint_name(base_url: str, provider: str) -> str:
    """An endpoint's default name: its base_url's host[:port], else the provider's name."""
    return urlsplit(base_url).netloc or provider


def loads_line(provider: Provider, line: str) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        raise provider.bad_shape("unparseable stream line", line) from None


def check_vectors(
    provider: Provider,
    vectors: Any,
    expected: int,
    raw: bytes = b"",
    key: str = "",
    nested: bool = False,
) -> tuple[list[list[float]], list[bytes] | None]:
    """An upstream's embeddings, checked: one list of numbers per input, all one length.
    Anything else is a 502 (a half answer must never reach the caller). With the
    answer's bytes (`raw`) and the vectors' key, also their own text (vector_texts)."""
    if not isinstance(vectors, list) or len(vectors) != expected:
        got = len(vectors) if isinstance(vectors, list) else "no"
        raise UpstreamError(provider.name, f"answered {got} vectors for {expected} inputs")
    width = None
    for vector in vectors:
        if not isinstance(vector, list) or not vector:
            raise UpstreamError(provider.name, "answered an embedding that is not a vector")
        if width is None:
            width = len(vector)
        elif len(vector) != width:
            raise UpstreamError(provider.name, "answered vectors of different lengths")
    texts = vector_texts(raw, key, vectors, nested) if raw else None
    if texts is None:  # texts of numbers only need no second look
        for vector in vectors:
            try:
                sum(vector)  # C speed: a string, null, list or object raises TypeError
            except TypeError:
                raise UpstreamError(provider.name, "answered a vector with non-numbers") from None
    return vectors, texts


# How every JSON value but a number starts: a vector's text holds none of them.
NOT_A_NUMBER = (b'"', b"{", b"[", b"t", b"f", b"n")
_AFTER_KEY = re.compile(rb"\s*:\s*(\[(\s*\[)?)?")
_NEXT_VECTOR = re.compile(rb"\s*,\s*\[")


def vector_texts(
    raw: bytes, key: str, vectors: list[list[Any]], nested: bool = False
) -> list[bytes] | None:
    """Each checked vector's own text in the upstream's answer (`b"[0.1,-0.2]"`): the
    value of every `"key"` in the document (`nested`: `"embeddings": [[..],[..]]`, or
    else one `"embedding": [..]` per item), in document order. Sent on as it came, a vector's
    floats need not be formatted again (most of an embedding answer's cost).

    None, and the floats are sent instead, unless every text is certainly its vector:
    every such key holds a list (of lists) of numbers only, and there are exactly as
    many as `vectors`, so the keys are the vectors' own and no other. The answer has
    parsed, so `"key"` then `:` is a key, never inside a string; and the search is
    `bytes.find` (memchr speed) over `raw`, not a scan in Python."""
    quoted = f'"{key}"'.encode()
    texts: list[bytes] = []
    at = raw.find(quoted)
    while at >= 0:
        at += len(quoted)
        found = _AFTER_KEY.match(raw, at)
        if found is not None:  # a key, not a string value
            if found[1] is None or (found[2] is not None) != nested:
                return None  # its value is not a list (base64, say), or not as deep
            start = found.end()
            while True:
                end = raw.find(b"]", start)
                if end < 0 or any(raw.find(c, start, end) >= 0 for c in NOT_A_NUMBER):
                    return None
                texts.append(raw[start - 1 : end + 1])  # with its brackets
                more = _NEXT_VECTOR.match(raw, end + 1) if found[2] else None
                if more is None:  # flat: one vector; nested: the list has ended
                    break
                start = more.end()
            at = end
        at = raw.find(quoted, at)
    return texts if len(texts) == len(vectors) else None


def as_int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
