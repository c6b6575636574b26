"""Each provider's exact wire format, its parsing, and its failure mapping (respx)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import respx

from chatd.config import ProviderConfig
from chatd.errors import UpstreamError, UpstreamTimeout
from chatd.providers import Attribution
from chatd.providers.mock import MockProvider
from chatd.providers.ollama import OllamaProvider
from chatd.providers.ollama_cloud import OllamaCloudProvider, flatten_messages
from chatd.providers.openai import OpenAIProvider
from chatd.types import ChatRequest, Message

KEY = "sk-test-planted-0123456789"


def request(**fields: Any) -> ChatRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatRequest.model_validate(body)


def ollama() -> OllamaProvider:
    config = ProviderConfig(kind="ollama", base_url="http://ollama.test/")
    return OllamaProvider("ollama", config, transport="httpx")


def cloud() -> OllamaCloudProvider:
    config = ProviderConfig(kind="ollama_cloud", base_url="https://cloud.test", key_env="K")
    return OllamaCloudProvider("ollama_cloud", config, key=KEY, transport="httpx")


def openai(app_url: str = "") -> OpenAIProvider:
    config = ProviderConfig(kind="openai", base_url="https://or.test/api/v1", key_env="K")
    attribution = Attribution(app_url=app_url, app_name="chatd")
    return OpenAIProvider(
        "openrouter", config, key=KEY, attribution=attribution, timeout=5, transport="httpx"
    )


def sent(route: respx.Route) -> tuple[dict[str, Any], httpx.Headers]:
    call = route.calls.last.request
    return json.loads(call.content), call.headers


OLLAMA_OK = {
    "model": "qwen3.5:latest",
    "message": {"role": "assistant", "content": "hello", "thinking": "hmm"},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 12,
    "eval_count": 3,
}


@respx.mock
async def test_ollama_body_defaults_think_false() -> None:
    route = respx.post("http://ollama.test/api/chat").respond(json=OLLAMA_OK)
    result = await ollama().chat(request(), "qwen3.5:latest")
    body, headers = sent(route)
    assert body == {
        "model": "qwen3.5:latest",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "think": False,
        "options": {"temperature": 0.0},
    }
    assert "authorization" not in headers
    assert (result.content, result.thinking) == ("hello", "hmm")
    assert (result.input_tokens, result.output_tokens, result.finish_reason) == (12, 3, "stop")


@respx.mock
async def test_ollama_options_format_and_think() -> None:
    route = respx.post("http://ollama.test/api/chat").respond(json=OLLAMA_OK)
    req = request(temperature=0.7, max_tokens=10, format="json", think=True)
    await ollama().chat(req, "qwen3.5:latest")
    body, _ = sent(route)
    assert body["options"] == {"temperature": 0.7, "num_predict": 10}
    assert body["format"] == "json"
    assert body["think"] is True


@respx.mock
async def test_ollama_missing_counts_are_zero() -> None:
    respx.post("http://ollama.test/api/chat").respond(
        json={"message": {"content": "x"}, "done": True}
    )
    result = await ollama().chat(request(), "m")
    assert (result.input_tokens, result.output_tokens, result.thinking) == (0, 0, None)


def test_flatten_single_user_message_is_verbatim() -> None:
    messages = [Message(role="system", content="be brief"), Message(role="user", content="hi")]
    assert flatten_messages(messages) == ("be brief", "hi")


def test_flatten_conversation_is_a_transcript() -> None:
    messages = [
        Message(role="system", content="s1"),
        Message(role="user", content="q1"),
        Message(role="assistant", content="a1"),
        Message(role="system", content="s2"),
        Message(role="tool", content="t1"),
        Message(role="user", content="q2"),
    ]
    system, prompt = flatten_messages(messages)
    assert system == "s1\n\ns2"
    assert prompt == "User: q1\n\nAssistant: a1\n\nTool: t1\n\nUser: q2\n\nAssistant:"


@respx.mock
async def test_ollama_cloud_generate_body_and_bearer() -> None:
    route = respx.post("https://cloud.test/api/generate").respond(
        json={
            "response": "yo",
            "thinking": "t",
            "prompt_eval_count": 5,
            "eval_count": 1,
            "done_reason": "length",
            "done": True,
        }  # fmt: skip
    )
    req = request(
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}],
        max_tokens=1,
        format="json",
    )
    result = await cloud().chat(req, "kimi-k2.6")
    body, headers = sent(route)
    assert body == {
        "model": "kimi-k2.6",
        "prompt": "hi",
        "system": "sys",
        "stream": False,
        "think": False,
        "options": {"temperature": 0.0, "num_predict": 1},
        "format": "json",
    }
    assert headers["authorization"] == f"Bearer {KEY}"
    assert (result.content, result.thinking, result.finish_reason) == ("yo", "t", "length")
    assert (result.input_tokens, result.output_tokens) == (5, 1)


@respx.mock
async def test_ollama_cloud_omits_system_when_none() -> None:
    route = respx.post("https://cloud.test/api/generate").respond(json={"response": "x"})
    await cloud().chat(request(), "m")
    body, _ = sent(route)
    assert "system" not in body


OPENAI_OK = {
    "id": "c1",
    "object": "chat.completion",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hey"}, "finish_reason": "length"}
    ],  # fmt: skip
    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
}


@respx.mock
async def test_openai_body_headers_and_parse() -> None:
    route = respx.post("https://or.test/api/v1/chat/completions").respond(json=OPENAI_OK)
    result = await openai().chat(request(max_tokens=5, format="json"), "anthropic/claude")
    body, headers = sent(route)
    assert body == {
        "model": "anthropic/claude",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
        "temperature": 0.0,
        "max_tokens": 5,
        "response_format": {"type": "json_object"},
    }
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-title"] == "chatd"
    assert "http-referer" not in headers
    assert (result.content, result.finish_reason) == ("hey", "length")
    assert (result.input_tokens, result.output_tokens) == (9, 2)


@respx.mock
async def test_openai_referer_when_configured() -> None:
    route = respx.post("https://or.test/api/v1/chat/completions").respond(json=OPENAI_OK)
    await openai(app_url="https://platform.example").chat(request(), "m")
    _, headers = sent(route)
    assert headers["http-referer"] == "https://platform.example"


@respx.mock
async def test_openai_omits_max_tokens_and_format_by_default() -> None:
    route = respx.post("https://or.test/api/v1/chat/completions").respond(json=OPENAI_OK)
    await openai().chat(request(), "m")
    body, _ = sent(route)
    assert "max_tokens" not in body and "response_format" not in body


# -- failures map to sentinels ------------------------------------------------


@respx.mock
async def test_non_2xx_is_upstream_error_with_status_quote_and_retry_after() -> None:
    respx.post("https://or.test/api/v1/chat/completions").respond(
        429, text="slow down " + "x" * 1000, headers={"Retry-After": "7"}
    )
    with pytest.raises(UpstreamError) as info:
        await openai().chat(request(), "m")
    err = info.value
    assert err.status == 502 and err.upstream_status == 429
    assert err.headers == {"Retry-After": "7"}
    assert "openrouter" in err.message and "429" in err.message and "slow down" in err.message
    quoted = err.message.removeprefix("openrouter: ").removesuffix(" (upstream 429)")
    assert quoted.startswith("slow down") and len(quoted) <= 300
    assert err.envelope()["error"]["upstream_status"] == 429


@respx.mock
async def test_key_echoed_by_upstream_is_redacted() -> None:
    respx.post("https://or.test/api/v1/chat/completions").respond(
        401, json={"error": f"invalid key {KEY}"}
    )
    with pytest.raises(UpstreamError) as info:
        await openai().chat(request(), "m")
    assert KEY not in info.value.message
    assert "***" in info.value.message


@respx.mock
async def test_bad_json_is_upstream_error() -> None:
    respx.post("http://ollama.test/api/chat").respond(200, text="not json{")
    with pytest.raises(UpstreamError, match="unparseable JSON"):
        await ollama().chat(request(), "m")


@respx.mock
async def test_zero_choices_is_upstream_error() -> None:
    respx.post("https://or.test/api/v1/chat/completions").respond(json={"choices": []})
    with pytest.raises(UpstreamError, match="zero choices"):
        await openai().chat(request(), "m")


@respx.mock
async def test_refused_connection_is_upstream_error() -> None:
    respx.post("http://ollama.test/api/chat").mock(side_effect=httpx.ConnectError("refused"))
    with pytest.raises(UpstreamError, match="could not reach upstream") as info:
        await ollama().chat(request(), "m")
    assert info.value.status == 502 and info.value.upstream_status is None


@respx.mock
async def test_timeout_is_upstream_timeout() -> None:
    respx.post("http://ollama.test/api/chat").mock(side_effect=httpx.ReadTimeout("slow"))
    with pytest.raises(UpstreamTimeout) as info:
        await ollama().chat(request(), "m")
    assert info.value.status == 504


@respx.mock
async def test_ollama_404_for_unknown_model_is_502() -> None:
    respx.post("http://ollama.test/api/chat").respond(
        404, json={"error": 'model "unknown/x" not found, try pulling it first'}
    )
    with pytest.raises(UpstreamError) as info:
        await ollama().chat(request(), "unknown/x")
    assert info.value.upstream_status == 404
    assert "not found" in info.value.message


# -- mock kind -----------------------------------------------------------------


def mock(**config: Any) -> MockProvider:
    return MockProvider("mock", ProviderConfig(kind="mock", **config))


async def test_mock_echoes_last_user_message_and_counts_words() -> None:
    req = request(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "one two three"},
            {"role": "assistant", "content": "ok"},
        ]
    )
    result = await mock().chat(req, "echo")
    assert result.content == "one two three"
    assert (result.input_tokens, result.output_tokens, result.finish_reason) == (6, 3, "stop")


async def test_mock_cuts_to_max_tokens_and_replies_json() -> None:
    result = await mock(reply="a b c d").chat(request(max_tokens=2, format="json"), "m")
    assert json.loads(result.content) == {"echo": "a b"}
    assert (result.output_tokens, result.finish_reason) == (2, "length")


async def test_mock_streams_word_by_word() -> None:
    events = [e async for e in mock(reply="a b c").stream(request(), "m")]
    assert [e.delta for e in events[:-1]] == ["a", " b", " c"]
    assert events[-1].done and events[-1].output_tokens == 3
