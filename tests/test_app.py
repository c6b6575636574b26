"""The HTTP API through the ASGI app: routes, validation, every error row, request IDs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import respx

from chatd.config import ProviderConfig
from chatd.providers.mock import MockProvider
from chatd.routing.registry import Registry
from chatd.types import ChatRequest, ChatResult
from tests.support import make_settings

OLLAMA = "http://ollama.test"
HI = [{"role": "user", "content": "hi"}]


def settings(**chatd: Any) -> Any:
    providers = {"ollama": {"base_url": OLLAMA, "timeout_secs": 1}, "mock": {"kind": "mock"}}
    providers.update(chatd.pop("providers", {}))
    return make_settings(providers=providers, **chatd)


@pytest.fixture
async def client(app_client: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings(max_body_bytes=2048)) as c:
        yield c


@pytest.fixture
def upstream() -> Any:
    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="chatd").pass_through()
        yield mock


def assert_envelope(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == type_ and error["code"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert "param" in error
    assert "Traceback" not in response.text
    return error


async def test_health(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_chat_through_mock_has_the_spec_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat", json={"model": "mock/echo", "messages": HI, "extra_field": 1}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "model", "content", "input_tokens", "output_tokens", "finish_reason", "provider",
        "latency_ms",
    }  # fmt: skip
    assert body["model"] == "echo" and body["provider"] == "mock" and body["content"] == "hi"
    assert isinstance(body["latency_ms"], int)


async def test_chat_through_ollama_adds_thinking(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    route = upstream.post(f"{OLLAMA}/api/chat").respond(
        json={
            "message": {"content": "4", "thinking": "2+2"},
            "done_reason": "stop",
            "prompt_eval_count": 7,
            "eval_count": 1,
        }  # fmt: skip
    )
    response = await client.post(
        "/v1/chat", json={"model": "ollama/qwen3.5:latest", "messages": HI, "think": True}
    )
    assert response.status_code == 200
    assert response.json()["thinking"] == "2+2"
    assert response.json()["model"] == "qwen3.5:latest"
    assert route.calls.last.request.content.count(b'"think":true') == 1


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    mine = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"
    made = await client.get("/health")
    assert len(made.headers["x-request-id"]) >= 16
    error = await client.get("/nope")
    assert error.headers["x-request-id"]


async def test_providers_listing_sorted_without_keys(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-planted-secret")
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    async with app_client(settings(providers={"kimi": {"enabled": True, "key_file": ""}})) as c:
        response = await c.get("/v1/chat/providers")
    body = response.json()
    assert body["default"] == "ollama"
    assert [p["name"] for p in body["providers"]] == ["kimi", "mock", "ollama", "openrouter"]
    assert {p["name"]: p["available"] for p in body["providers"]}["kimi"] is False
    assert "sk-or-planted-secret" not in response.text
    assert "key" not in response.text.lower()


# -- 400: validation ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI}, "model"),
        ({"model": "", "messages": HI}, "model"),
        ({"model": "  ", "messages": HI}, "model"),
        ({"model": 5, "messages": HI}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": HI, "temperature": 2.5}, "temperature"),
        ({"model": "m", "messages": HI, "temperature": -0.1}, "temperature"),
        ({"model": "m", "messages": HI, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": HI, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": HI, "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "messages": HI, "format": "yaml"}, "format"),
        ({"model": "m", "messages": HI, "think": "yes"}, "think"),
        ({"model": "m", "messages": HI, "stream": "no"}, "stream"),
    ],
)
async def test_invalid_fields_are_400(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    error = assert_envelope(await client.post("/v1/chat", json=body), 400, "invalid_request")
    assert error["param"] == param


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[]", b'"str"', b"\xff\xfe", b"null"])
async def test_bad_json_is_400(client: httpx.AsyncClient, raw: bytes) -> None:
    response = await client.post(
        "/v1/chat", content=raw, headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, "invalid_request")


async def test_valid_boundaries_are_accepted(client: httpx.AsyncClient) -> None:
    body = {"model": "mock/m", "messages": HI, "temperature": 2, "max_tokens": 1, "format": ""}
    assert (await client.post("/v1/chat", json=body)).status_code == 200


# -- the rest of the error table -----------------------------------------------------


async def test_unknown_route_is_404_not_found(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/v2/anything"), 404, "not_found")


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/chat")
    assert_envelope(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    assert_envelope(await client.delete("/health"), 405, "method_not_allowed")


async def test_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    big = {"model": "mock/m", "messages": [{"role": "user", "content": "x" * 4000}]}
    assert_envelope(await client.post("/v1/chat", json=big), 413, "payload_too_large")


async def test_chunked_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    response = await client.post("/v1/chat", content=chunks())
    assert_envelope(response, 413, "payload_too_large")


async def test_unregistered_provider_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat", json={"model": "x:cloud", "messages": HI})
    error = assert_envelope(response, 404, "provider_not_found")
    assert error["message"] == (
        'no registered provider for model "x:cloud" (ollama_cloud is not registered)'
    )
    assert error["param"] == "model"


async def test_keyless_registered_provider_is_503(
    app_client: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KIMI_API_KEY", raising=False)
    async with app_client(settings(providers={"kimi": {"enabled": True, "key_file": ""}})) as c:
        response = await c.post("/v1/chat", json={"model": "kimi/k2", "messages": HI})
    assert_envelope(response, 503, "provider_disabled")


async def test_upstream_non_2xx_is_502_with_status_and_retry_after(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    upstream.post(f"{OLLAMA}/api/chat").respond(429, text="E" * 1000, headers={"Retry-After": "12"})
    response = await client.post("/v1/chat", json={"model": "qwen3.5:latest", "messages": HI})
    error = assert_envelope(response, 502, "upstream_error")
    assert error["upstream_status"] == 429
    assert "ollama" in error["message"] and "429" in error["message"]
    assert error["message"].count("E") <= 300
    assert response.headers["retry-after"] == "12"


async def test_unreachable_upstream_is_502(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    upstream.post(f"{OLLAMA}/api/chat").mock(side_effect=httpx.ConnectError("refused"))
    response = await client.post("/v1/chat", json={"model": "m", "messages": HI})
    error = assert_envelope(response, 502, "upstream_error")
    assert "upstream_status" not in error


async def test_upstream_timeout_is_504(
    client: httpx.AsyncClient, upstream: respx.MockRouter
) -> None:
    async def stall(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return httpx.Response(200, json={})

    upstream.post(f"{OLLAMA}/api/chat").mock(side_effect=stall)
    response = await client.post("/v1/chat", json={"model": "m", "messages": HI})
    assert_envelope(response, 504, "upstream_timeout")


class Broken(MockProvider):
    async def chat(self, request: ChatRequest, model: str) -> ChatResult:
        raise RuntimeError("bug with sk-secret-in-exception")


async def test_a_bug_is_500_without_traceback(
    app_client: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    s = settings()
    broken = Broken("mock", ProviderConfig(kind="mock"))
    registry = Registry({"mock": broken}, configured=["mock"], default="mock")
    async with app_client(s, registry=registry) as c:
        response = await c.post("/v1/chat", json={"model": "m", "messages": HI})
    error = assert_envelope(response, 500, "internal_error")
    assert "sk-secret" not in response.text and "RuntimeError" not in response.text
    assert response.headers["x-request-id"]
    assert "RuntimeError" in caplog.text  # logged with its traceback
    assert error["param"] is None


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("temperature", 9, "temperature: must be between 0 and 2"),
        ("temperature", "0.5", "temperature: must be a number"),
        ("max_tokens", 0, "max_tokens: must be between 1 and 2147483647"),
        ("max_tokens", 1.5, "max_tokens: must be an integer"),
        ("stream", "no", "stream: must be a boolean"),
        ("messages", [], "messages: must be a non-empty array"),
    ],
)
async def test_one_error_in_one_voice_on_both_chat_routes(
    client: httpx.AsyncClient, field: str, value: Any, words: str
) -> None:
    """/v1/chat and /v1/chat/completions word the same mistake the same way."""
    body = {"model": "mock/x", "messages": HI, field: value}
    native = assert_envelope(await client.post("/v1/chat", json=body), 400, "invalid_request")
    openai = await client.post("/v1/chat/completions", json=body)
    assert openai.status_code == 400, openai.text
    assert native["message"] == openai.json()["error"]["message"] == words
    assert native["param"] == field


async def test_a_role_outside_the_list_is_named_in_chatds_words(client: httpx.AsyncClient) -> None:
    body = {"model": "mock/x", "messages": [{"role": "bot", "content": "hi"}]}
    error = assert_envelope(await client.post("/v1/chat", json=body), 400, "invalid_request")
    assert error["message"] == "messages[0].role: must be one of system, user, assistant, tool"


async def test_a_content_part_type_outside_the_schema_is_refused_and_the_schema_says_so(
    client: httpx.AsyncClient,
) -> None:
    part_schema = (await client.get("/openapi.json")).json()["components"]["schemas"]
    enum = part_schema["ContentPart"]["properties"]["type"]["enum"]
    assert "" not in enum and {"text", "image_url"} <= set(enum)
    body = {"model": "mock/x", "messages": [{"role": "user", "content": [{"type": ""}]}]}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "messages[0].content[0].type"
