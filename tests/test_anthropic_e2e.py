"""The official `anthropic` SDK against a real chatd process and a real fake upstream
 (docs/http-api.md), over every provider kind: messages (plain and streamed), system prompts and
multi-turn, a tool-use round trip, stop sequences, thinking, errors as the SDK's own
exceptions; streams through a real nginx, and a caller leaving mid-stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.fakes.upstream import ANSWER, THINKING, FakeUpstream
from tests.support import ChatdProcess, nginx_conf, provider_toml, running_nginx
from tests.test_nginx_e2e import NGINX_HTTP

KEY = "sk-or-test-key-not-for-printing"
TOKEN = "chatd-caller-token"
USER = [{"role": "user", "content": "Say hello."}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
OPENAI_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": WEATHER["input_schema"],
        "description": "The weather in a city",
    },
}
KINDS = ["ollama/ok", "ok:cloud", "openrouter/ok", "echo/anything"]
CLOUD_KEY = "ollama-cloud-test-key"
QUIET = {"max_retries": 0, "cooldown_failures": 0}  # failures tested here stay single calls


def config(fake: FakeUpstream) -> str:
    return (
        '[models]\nhot = "ollama/ok"\n\n[chatd]\ntimeout_secs = 15\n\n'
        + provider_toml("ollama", "ollama", fake.url, **QUIET)
        + provider_toml("ollama_cloud", "ollama_cloud", fake.url, **QUIET)
        + provider_toml("gone", "openai", fake.url + "/v1", enabled=False)  # → 404
        + provider_toml("openrouter", "openai", fake.url + "/v1", **QUIET)
        + provider_toml("kimi", "openai", fake.url + "/v1", enabled=True)  # keyless: 503
        + provider_toml("echo", "mock")
    )


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    env = {"OPENROUTER_API_KEY": KEY, "OLLAMA_API_KEY": CLOUD_KEY}
    with ChatdProcess(config(fake), tmp_path_factory.mktemp("anthropic"), env=env) as process:
        yield process
        log = process.log()
        assert KEY not in log and CLOUD_KEY not in log
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def client(chatd: ChatdProcess) -> anthropic.Anthropic:
    # The SDK appends /v1/messages to the base URL, as it does to api.anthropic.com.
    return anthropic.Anthropic(base_url=chatd.url, api_key="unused", max_retries=0)


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream) -> None:
    fake.reset()


def expected_text(model: str) -> str:
    return "Say hello." if model.startswith("echo/") else ANSWER


# -- messages ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [*KINDS, "hot"])
def test_create_through_each_kind(client: anthropic.Anthropic, model: str) -> None:
    message = client.messages.create(model=model, max_tokens=256, messages=USER)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected_text(model)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens == len(expected_text(model).split())


def test_system_and_multi_turn_reach_ollama_translated(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    client.messages.create(
        model="ollama/ok",
        max_tokens=64,
        system="Be brief.",
        extra_body={"temperature": 0.3},  # this SDK no longer has the argument; the API does
        messages=[
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
            {"role": "user", "content": [{"type": "text", "text": "Again."}]},
        ],
    )
    sent = fake.calls_to("/api/chat")[-1].json
    assert sent["model"] == "ok"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again."},
    ]
    assert sent["options"] == {"temperature": 0.3, "num_predict": 64}
    assert sent["think"] is False and sent["stream"] is False


def test_system_and_multi_turn_reach_ollama_cloud_flattened(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    client.messages.create(
        model="ok:cloud",
        max_tokens=64,
        system="Be brief.",
        messages=[
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again."},
        ],
    )
    call = fake.calls_to("/api/generate")[-1]
    assert call.json["model"] == "ok" and call.json["system"] == "Be brief."
    assert call.json["prompt"] == "User: Hi.\n\nAssistant: Hello!\n\nUser: Again.\n\nAssistant:"
    assert call.json["options"] == {"num_predict": 64}
    assert call.headers["authorization"] == f"Bearer {CLOUD_KEY}"


def test_system_blocks_and_multi_turn_reach_an_openai_kind_translated(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    client.messages.create(
        model="openrouter/ok",
        max_tokens=64,
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        messages=[
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again."},
        ],
        metadata={"user_id": "u-1"},
    )
    call = fake.calls_to("/v1/chat/completions")[-1]
    assert call.json == {
        "model": "ok",
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again."},
        ],
        "max_tokens": 64,
        "stream": False,
    }
    assert call.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("model", KINDS)
def test_stream_through_each_kind(client: anthropic.Anthropic, model: str) -> None:
    with client.messages.stream(model=model, max_tokens=256, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == expected_text(model)
    assert len(pieces) == len(expected_text(model).split())  # word by word, as it came
    assert final.content[0].text == expected_text(model)  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0
    assert final.usage.output_tokens == len(expected_text(model).split())


def test_raw_stream_is_the_anthropic_event_sequence(chatd: ChatdProcess) -> None:
    body = {"model": "ollama/think", "max_tokens": 64, "messages": USER, "stream": True}
    with httpx.stream("POST", chatd.url + "/v1/messages", json=body, timeout=20) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-chatd-provider"] == "ollama"
        lines = [line for line in response.iter_lines() if line]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [d["type"] for d in data] == names
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-2:] == ["message_delta", "message_stop"]
    blocks = [d["content_block"]["type"] for d in data if d["type"] == "content_block_start"]
    assert blocks == ["thinking", "text"]
    thinking = "".join(
        d["delta"].get("thinking", "") for d in data if d["type"] == "content_block_delta"
    )
    assert thinking == THINKING
    assert names.count("content_block_stop") == 2


# -- tools ------------------------------------------------------------------------------


def test_tool_use_round_trip_with_ollama(client: anthropic.Anthropic, fake: FakeUpstream) -> None:
    asked = client.messages.create(
        model="ollama/tool", max_tokens=256, messages=USER, tools=[WEATHER]
    )
    assert asked.stop_reason == "tool_use"
    [use] = asked.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"}
    assert fake.calls_to("/api/chat")[-1].json["tools"] == [OPENAI_WEATHER]

    answer = client.messages.create(
        model="ollama/ok",
        max_tokens=256,
        tools=[WEATHER],
        messages=[
            *USER,
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"}],
            },
        ],  # type: ignore[list-item]
    )
    assert answer.content[0].text == ANSWER  # type: ignore[union-attr]
    sent = fake.calls_to("/api/chat")[-1].json["messages"]
    assert sent[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "21C", "tool_name": "get_weather"},
    ]


def test_tool_use_round_trip_with_an_openai_kind(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    asked = client.messages.create(
        model="openrouter/tool",
        max_tokens=256,
        messages=USER,
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    assert asked.stop_reason == "tool_use"
    [use] = asked.content
    assert use.type == "tool_use" and use.id == "call_fake1"
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    first = fake.calls_to("/v1/chat/completions")[-1].json
    assert first["tools"] == [OPENAI_WEATHER] and first["tool_choice"] == "required"

    client.messages.create(
        model="openrouter/ok",
        max_tokens=256,
        tools=[WEATHER],
        messages=[
            *USER,
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_fake1", "content": "21C"},
                    {"type": "text", "text": "Thanks."},
                ],
            },
        ],  # type: ignore[list-item]
    )
    sent = fake.calls_to("/v1/chat/completions")[-1].json["messages"]
    assert sent[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_fake1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake1", "content": "21C"},
        {"role": "user", "content": "Thanks."},
    ]


@pytest.mark.parametrize("model", ["ollama/tool", "openrouter/tool"])
def test_tool_use_streams(client: anthropic.Anthropic, model: str) -> None:
    with client.messages.stream(
        model=model, max_tokens=256, messages=USER, tools=[WEATHER]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in kinds  # the SDK's own event for input_json_delta
    assert final.stop_reason == "tool_use"
    [use] = final.content
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.input == {"city": "Paris"}


def test_a_tool_result_without_its_tool_use_is_refused(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="ollama/ok",
            max_tokens=64,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}],
                }
            ],
        )
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("messages[0].content[0].tool_use_id:")


# -- stop sequences, thinking -------------------------------------------------------------


def test_stop_sequences_with_an_openai_kind(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    message = client.messages.create(
        model="openrouter/ok", max_tokens=64, messages=USER, stop_sequences=["one", "zzz"]
    )
    assert fake.calls_to("/v1/chat/completions")[-1].json["stop"] == ["one", "zzz"]
    assert message.content[0].text == ANSWER[: ANSWER.index("one")]  # type: ignore[union-attr]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "one")

    with client.messages.stream(
        model="openrouter/ok", max_tokens=64, messages=USER, stop_sequences=["one"]
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "one")


def test_stop_sequences_with_ollama(client: anthropic.Anthropic, fake: FakeUpstream) -> None:
    message = client.messages.create(
        model="ollama/ok", max_tokens=64, messages=USER, stop_sequences=["one"]
    )
    assert fake.calls_to("/api/chat")[-1].json["options"]["stop"] == ["one"]
    assert message.content[0].text == ANSWER[: ANSWER.index("one")]  # type: ignore[union-attr]
    # Ollama does not say which stop sequence (or none) ended the answer
    assert message.stop_reason == "end_turn"


def test_thinking_to_ollama_turns_think_on(client: anthropic.Anthropic, fake: FakeUpstream) -> None:
    message = client.messages.create(
        model="ollama/ok",
        max_tokens=4096,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    assert fake.calls_to("/api/chat")[-1].json["think"] is True
    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == THINKING  # type: ignore[union-attr]
    assert message.content[1].text == ANSWER  # type: ignore[union-attr]

    with client.messages.stream(
        model="ollama/ok",
        max_tokens=4096,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 2048},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds
    assert fake.calls_to("/api/chat")[-1].json["think"] is True
    assert final.content[0].thinking == THINKING  # type: ignore[union-attr]


def test_thinking_to_an_openai_kind_is_reasoning_effort(
    client: anthropic.Anthropic, fake: FakeUpstream
) -> None:
    message = client.messages.create(
        model="openrouter/think",
        max_tokens=4096,
        messages=USER,
        thinking={"type": "enabled", "budget_tokens": 20000},
    )
    assert fake.calls_to("/v1/chat/completions")[-1].json["reasoning_effort"] == "high"
    assert message.content[0].thinking == THINKING  # type: ignore[union-attr]


# -- errors -----------------------------------------------------------------------------


def error_of(exc: anthropic.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict) and body["type"] == "error", body
    return body["error"]


def test_unregistered_provider_is_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="gone/kimi-k2.6", max_tokens=8, messages=USER)
    assert error_of(caught.value)["type"] == "not_found_error"


def test_count_tokens_is_not_served(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.count_tokens(model="ollama/ok", messages=USER)
    assert error_of(caught.value)["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"messages": []}, "messages:"),
        (
            {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0KGgo="}},
            ]}]},
            "messages[0].content[1]: image blocks",
        ),
        ({"max_tokens": 0}, "max_tokens:"),
        ({"extra_body": {"temperature": "hot"}}, "temperature:"),
    ],
)  # fmt: skip
def test_bad_input_is_a_bad_request(
    client: anthropic.Anthropic, fields: dict[str, Any], named: str
) -> None:
    request: dict[str, Any] = {"model": "ollama/ok", "max_tokens": 8, "messages": USER, **fields}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(**request)
    error = error_of(caught.value)
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(named), error


def test_missing_max_tokens_and_bad_json_are_invalid_request_errors(chatd: ChatdProcess) -> None:
    url = chatd.url + "/v1/messages"
    response = httpx.post(url, json={"model": "ollama/ok", "messages": USER})
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: is required"},
    }
    response = httpx.post(url, content=b"{not json", headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url).json()["type"] == "error"  # 405, in Anthropic's shape too


def test_upstream_failure_is_an_internal_server_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="openrouter/fail-500", max_tokens=8, messages=USER)
    assert caught.value.status_code == 502
    error = error_of(caught.value)
    assert error["type"] == "api_error" and "500" in error["message"]
    assert KEY not in str(caught.value.body)


def test_keyless_provider_is_overloaded(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        client.messages.create(model="kimi/anything", max_tokens=8, messages=USER)
    assert caught.value.status_code == 503
    assert error_of(caught.value)["type"] == "overloaded_error"


def test_an_error_mid_stream_is_an_error_event(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        with client.messages.stream(
            model="openrouter/errmid", max_tokens=64, messages=USER
        ) as stream:
            for _ in stream:
                pass
    assert error_of(caught.value)["type"] == "api_error"


def test_the_request_log_names_the_route_and_tokens(
    client: anthropic.Anthropic, chatd: ChatdProcess
) -> None:
    client.messages.create(
        model="ollama/ok", max_tokens=8, messages=USER, extra_headers={"X-Request-ID": "anth-1"}
    )
    time.sleep(0.2)
    [line] = [json.loads(x) for x in chatd.log().splitlines() if '"anth-1"' in x]
    assert line["route"] == "/v1/messages" and line["status"] == 200
    assert line["model"] == "ollama/ok" and line["provider"] == "ollama"
    assert line["output_tokens"] == len(ANSWER.split()) and line["input_tokens"] > 0

    # the caller sees Anthropic's error type; the log keeps chatd's
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(
            model="gone/x", max_tokens=8, messages=USER, extra_headers={"X-Request-ID": "anth-2"}
        )
    time.sleep(0.2)
    [line] = [json.loads(x) for x in chatd.log().splitlines() if '"anth-2"' in x]
    assert line["status"] == 404 and line["error"] == "provider_not_found"


# -- a caller token as x-api-key ----------------------------------------------------------


def test_x_api_key_is_a_caller_token(
    fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"CHATD_TEST_TOKENS": TOKEN}
    toml = config(fake).replace("[chatd]\n", '[chatd]\nauth_tokens_env = "CHATD_TEST_TOKENS"\n')
    with ChatdProcess(toml, tmp_path_factory.mktemp("anthropic-auth"), env=env) as guarded:
        good = anthropic.Anthropic(base_url=guarded.url, api_key=TOKEN, max_retries=0)
        message = good.messages.create(model="echo/x", max_tokens=8, messages=USER)
        assert message.content[0].text == "Say hello."  # type: ignore[union-attr]
        bad = anthropic.Anthropic(base_url=guarded.url, api_key="nope", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            bad.messages.create(model="echo/x", max_tokens=8, messages=USER)
        assert error_of(caught.value)["type"] == "authentication_error"
        assert TOKEN not in guarded.log()


def test_callers_limits_are_the_sdks_permission_and_rate_limit_errors(
    fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Callers through /v1/messages: a named caller's x-api-key, its allow-list (403 →
    PermissionDeniedError) and its rpm (429 → RateLimitError with Retry-After)."""
    env = {"CHATD_ANTHROPIC_CALLER": "coder-token"}
    toml = config(fake) + (
        '\n[chatd.callers.coder]\ntoken_env = "CHATD_ANTHROPIC_CALLER"\n'
        'models = ["echo/*"]\nrpm = 2\n'
    )
    with ChatdProcess(toml, tmp_path_factory.mktemp("anthropic-callers"), env=env) as guarded:
        coder = anthropic.Anthropic(base_url=guarded.url, api_key="coder-token", max_retries=0)
        message = coder.messages.create(model="echo/x", max_tokens=8, messages=USER)
        assert message.content[0].text == "Say hello."  # type: ignore[union-attr]
        with pytest.raises(anthropic.PermissionDeniedError) as forbidden:
            coder.messages.create(model="ollama/ok", max_tokens=8, messages=USER)
        assert error_of(forbidden.value)["type"] == "permission_error"
        coder.messages.create(model="echo/x", max_tokens=8, messages=USER)
        with pytest.raises(anthropic.RateLimitError) as limited:
            coder.messages.create(model="echo/x", max_tokens=8, messages=USER)
        assert error_of(limited.value)["type"] == "rate_limit_error"
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
        assert "coder-token" not in guarded.log()


# -- streams in production: a caller leaving, nginx ------------------------------------------


@pytest.mark.parametrize(
    ("model", "path"),
    [("ollama/slow-5000", "/api/chat"), ("openrouter/slow-5000", "/v1/chat/completions")],
)
def test_a_caller_leaving_mid_stream_closes_the_upstream(
    chatd: ChatdProcess, fake: FakeUpstream, model: str, path: str
) -> None:
    body = {"model": model, "max_tokens": 64, "messages": USER, "stream": True}
    client = httpx.Client(timeout=20)
    with client.stream("POST", chatd.url + "/v1/messages", json=body) as response:
        for line in response.iter_lines():
            if '"text_delta"' in line:
                break
    client.close()
    closed_at = time.monotonic()
    [call] = fake.calls_to(path)
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3.0)
    assert call.disconnected_at is not None and call.disconnected_at - closed_at < 2.0
    assert call.finished_at is not None and call.finished_at - call.started_at < 4.5


@pytest.fixture(scope="module")
def nginx(chatd: ChatdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real nginx in front of chatd with default buffering; yields its base URL."""

    def config(tmp: Path, port: int) -> str:
        http = NGINX_HTTP.format(port=port, chatd_port=chatd.port)
        return nginx_conf(tmp, http.replace("location /v1/chat {", "location /v1/ {"))

    with running_nginx(tmp_path_factory.mktemp("nginx-anthropic"), config) as url:
        yield url


def test_a_slow_stream_arrives_through_nginx_incrementally(nginx: str) -> None:
    client = anthropic.Anthropic(base_url=nginx, api_key="unused", max_retries=0)
    started = time.monotonic()
    arrivals: list[float] = []
    with client.messages.stream(model="ollama/slow-2000", max_tokens=64, messages=USER) as stream:
        for _ in stream.text_stream:
            arrivals.append(time.monotonic() - started)
        final = stream.get_final_message()
        done_at = time.monotonic() - started
    assert final.content[0].text == ANSWER  # type: ignore[union-attr]
    assert done_at >= 1.8, f"done after {done_at:.2f}s: the fake was not slow?"
    assert arrivals[0] < 0.8, f"first text only after {arrivals[0]:.2f}s through nginx"
    assert arrivals[len(arrivals) // 2] < done_at - 0.5, arrivals  # spread out, not a burst
