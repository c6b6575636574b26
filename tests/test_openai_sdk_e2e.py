"""The official `openai` SDK against a real chatd process and a real fake upstream.

The SDK is the client most callers will use: it must complete chats (plain and
streamed) through every provider kind, read usage, list models, and raise its usual
exceptions from chatd's error envelope.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakes.upstream import ANSWER, THINKING, FakeUpstream
from tests.support import ChatdProcess, provider_toml

KEY = "sk-or-test-key-not-for-printing"
USER = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        '[models]\nhot = "ollama/ok"\nsmart = ["nowhere:cloud", "openrouter/ok"]\n\n'
        + provider_toml("ollama", "ollama", fake.url)
        + provider_toml("ollama_cloud", "ollama_cloud", fake.url, enabled=False)
        + provider_toml("openrouter", "openai", fake.url + "/v1")
        + provider_toml("kimi", "openai", fake.url + "/v1", enabled=False)
        + provider_toml("echo", "mock")
        + provider_toml("dead", "ollama", "http://127.0.0.1:9")  # nothing listens there
    )
    env = {"OPENROUTER_API_KEY": KEY}
    with ChatdProcess(config, tmp_path_factory.mktemp("sdk"), env=env) as process:
        yield process
        assert KEY not in process.log()


@pytest.fixture
def client(chatd: ChatdProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def aclient(chatd: ChatdProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=chatd.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream) -> None:
    fake.reset()


MODELS = ["ollama/ok", "openrouter/ok", "hot", "echo/anything"]


@pytest.mark.parametrize("model", MODELS)
def test_sync_completion_through_each_kind(client: openai.OpenAI, model: str) -> None:
    answer = client.chat.completions.create(model=model, messages=USER)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    expected = "Say hello." if model.startswith("echo/") else ANSWER
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens > 0


@pytest.mark.parametrize("model", MODELS)
def test_sync_stream_through_each_kind(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(model=model, messages=USER, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ("Say hello." if model.startswith("echo/") else ANSWER)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert all(c.usage is None for c in chunks)  # usage only when asked for
    assert len(chunks) >= len(text.split()) + 1  # word by word, then the finish chunk


@pytest.mark.parametrize("model", ["ollama/ok", "openrouter/ok"])
async def test_async_stream_with_usage(aclient: openai.AsyncOpenAI, model: str) -> None:
    stream = await aclient.chat.completions.create(
        model=model, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(ANSWER.split())
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


async def test_async_completion(aclient: openai.AsyncOpenAI) -> None:
    answer = await aclient.chat.completions.create(model="ollama/ok", messages=USER)
    assert answer.choices[0].message.content == ANSWER


def test_raw_stream_is_chunks_then_done(chatd: ChatdProcess) -> None:
    body = {"model": "ollama/think", "messages": USER, "stream": True}
    with httpx.stream("POST", chatd.url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-chatd-provider"] == "ollama"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    assert reasoning == THINKING
    assert not any(line.startswith(":") for line in lines)


def test_openai_keepalive_comments_are_not_relayed(chatd: ChatdProcess) -> None:
    body = {"model": "openrouter/ok", "messages": USER, "stream": True}
    response = httpx.post(chatd.url + "/v1/chat/completions", json=body)
    assert "OPENROUTER PROCESSING" not in response.text
    assert response.text.rstrip().endswith("data: [DONE]")


def test_models_lists_aliases_and_each_providers_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["hot", "smart"]
    assert "ollama/qwen3.5:latest" in ids  # from the fake's /api/tags
    assert "openrouter/qwen3.5:latest" in ids  # from the fake's /v1/models
    assert not any(i.startswith("kimi/") for i in ids)  # not registered
    assert not any(i.startswith("dead/") for i in ids)  # its upstream failed: left out


def test_models_are_cached_briefly(client: openai.OpenAI, fake: FakeUpstream) -> None:
    first = [m.id for m in client.models.list()]
    fake.reset()
    assert [m.id for m in client.models.list()] == first
    assert fake.calls == []  # answered from the cache, the upstreams not asked again


def test_unregistered_provider_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="kimi-k2.6:cloud", messages=USER)
    assert caught.value.status_code == 404
    assert caught.value.body["type"] == "provider_not_found"  # type: ignore[index]


def test_empty_messages_raise_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="ollama/ok", messages=[])
    assert caught.value.body["param"] == "messages"  # type: ignore[index]


def test_upstream_failure_raises_api_status_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="openrouter/fail-500", messages=USER)
    assert caught.value.status_code == 502
    assert KEY not in str(caught.value.body)


def test_stream_breaking_mid_way_raises_in_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="openrouter/break", messages=USER, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_fallback_tier_serves_and_says_who(chatd: ChatdProcess) -> None:
    response = httpx.post(
        chatd.url + "/v1/chat/completions", json={"model": "smart", "messages": USER}
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-chatd-provider"] == "openrouter"
    assert response.headers["x-chatd-model"] == "ok"


def test_openai_kind_gets_the_body_unchanged_but_model(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    client.chat.completions.create(
        model="openrouter/ok",
        messages=USER,
        tools=tools,  # type: ignore[arg-type]
        tool_choice="auto",
        seed=7,
        top_p=0.5,
        stop=["\n\n"],
        response_format=schema,  # type: ignore[arg-type]
        extra_body={"provider": {"order": ["groq"]}},
    )
    sent = fake.calls_to("/v1/chat/completions")[-1]
    assert sent.json["model"] == "ok"
    assert sent.json["tools"] == tools
    assert sent.json["tool_choice"] == "auto"
    assert sent.json["seed"] == 7 and sent.json["top_p"] == 0.5
    assert sent.json["response_format"] == schema
    assert sent.json["provider"] == {"order": ["groq"]}
    assert sent.headers["authorization"] == f"Bearer {KEY}"


def test_ollama_kind_gets_the_common_fields_translated(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client.chat.completions.create(
        model="ollama/ok",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            },
        ],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=64,
        stop="END",
        seed=42,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    sent = fake.calls_to("/api/chat")[-1].json
    assert sent["model"] == "ok"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert sent["options"] == {
        "temperature": 0.3, "top_p": 0.9, "seed": 42, "num_predict": 64, "stop": ["END"],
    }  # fmt: skip
    assert sent["format"] == schema
    assert sent["think"] is False and sent["stream"] is False


def test_image_parts_to_an_ollama_kind_are_a_clear_400(client: openai.OpenAI) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="ollama/ok", messages=[{"role": "user", "content": [image]}]
        )
    assert caught.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_ollama_tool_calls_come_back_in_openai_shape(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    answer = client.chat.completions.create(
        model="ollama/tool",
        messages=USER,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake.calls_to("/api/chat")[-1].json["tools"] == [WEATHER_TOOL]

    # the conversation goes on: the call and its result are translated back for Ollama
    client.chat.completions.create(
        model="ollama/ok",
        messages=[
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
        ],  # type: ignore[list-item]
    )
    sent = fake.calls_to("/api/chat")[-1].json["messages"]
    assert sent[1] == {
        "role": "assistant", "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }  # fmt: skip
    assert sent[2] == {"role": "tool", "content": '{"temp": 21}', "tool_name": "get_weather"}


def test_ollama_tool_calls_stream_in_openai_shape(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="ollama/tool",
        messages=USER,
        tools=[WEATHER_TOOL],
        stream=True,  # type: ignore[list-item]
    )
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0
    assert calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr,arg-type]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("model", "path"),
    [("ollama/slow-5000", "/api/chat"), ("openrouter/slow-5000", "/v1/chat/completions")],
)
def test_a_caller_leaving_a_completions_stream_closes_the_upstream(
    chatd: ChatdProcess, fake: FakeUpstream, model: str, path: str
) -> None:
    body = {"model": model, "messages": USER, "stream": True}
    client = httpx.Client(timeout=20)
    with client.stream("POST", chatd.url + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break
    client.close()
    closed_at = time.monotonic()
    [call] = fake.calls_to(path)
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3.0)
    assert call.disconnected_at is not None and call.disconnected_at - closed_at < 2.0
    assert call.finished_at is not None and call.finished_at - call.started_at < 4.5
