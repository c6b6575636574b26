"""Anthropic Messages shapes: requests checked and translated to Chat Completions bodies,
completions and chunks translated back, errors in Anthropic's shape (pure functions,
compared with literal dicts); then the route in process, for what a real process cannot
show on this branch (a 429 from caller admission, the auth hook)."""

from __future__ import annotations

from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from chatd.app import create_app
from chatd.errors import ChatdError, InvalidRequest, PayloadTooLarge, UpstreamError
from chatd.wire.anthropic_checks import check_body
from chatd.wire.anthropic_errors import error_body, error_type
from chatd.wire.anthropic_reply import StreamTranslator, sse_event, to_message
from chatd.wire.anthropic_request import to_openai
from tests.support import make_settings

USER = [{"role": "user", "content": "hi"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": USER, **fields}


def translated(**fields: Any) -> dict[str, Any]:
    return to_openai(check_body(body(**fields)), stream=False)


# -- requests --------------------------------------------------------------------------


def test_a_plain_request_becomes_a_chat_completions_body() -> None:
    assert translated(system="be brief", temperature=0.2, top_p=0.9) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 64,
        "stream": False,
        "temperature": 0.2,
        "top_p": 0.9,
    }


def test_system_blocks_text_blocks_and_streaming() -> None:
    out = to_openai(
        check_body(
            body(
                system=[{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Hel"},
                            {"type": "text", "text": "lo"},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hm", "signature": "x"},
                            {"type": "text", "text": "Hi!"},
                        ],
                    },
                    {"role": "user", "content": "again"},
                ],
                stop_sequences=["END"],
                metadata={"user_id": "u1"},
            )
        ),
        stream=True,
    )
    assert out["messages"] == [
        {"role": "system", "content": "one\n\ntwo"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi!"},  # earlier thinking is not sent on
        {"role": "user", "content": "again"},
    ]
    assert out["stop"] == ["END"]
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert "metadata" not in out


def test_tools_tool_use_and_tool_results_become_openai_tool_calls() -> None:
    out = translated(
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "21C"}],
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
    )
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER["input_schema"],
                "description": "The weather in a city",
            },
        }
    ]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["parallel_tool_calls"] is False
    assert out["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"},
        {"role": "user", "content": "And tomorrow?"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")],
)
def test_tool_choice(choice: dict[str, Any], expected: str) -> None:
    assert translated(tools=[WEATHER], tool_choice=choice)["tool_choice"] == expected


def test_an_error_tool_result_says_so() -> None:
    out = translated(
        messages=[
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t", "content": "boom", "is_error": True}
                ],
            },
        ]
    )
    assert out["messages"][-1] == {"role": "tool", "tool_call_id": "t", "content": "Error: boom"}


@pytest.mark.parametrize(
    ("thinking", "effort"),
    [
        ({"type": "enabled", "budget_tokens": 1024}, "low"),
        ({"type": "enabled", "budget_tokens": 8000}, "medium"),
        ({"type": "enabled", "budget_tokens": 32000}, "high"),
        ({"type": "adaptive"}, "medium"),
        ({"type": "disabled"}, None),
    ],
)
def test_thinking_becomes_reasoning_effort(thinking: dict[str, Any], effort: str | None) -> None:
    assert translated(thinking=thinking).get("reasoning_effort") == effort


def test_output_config_effort_and_json_schema_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    out = translated(
        thinking={"type": "adaptive"},
        output_config={"effort": "max", "format": {"type": "json_schema", "schema": schema}},
    )
    assert out["reasoning_effort"] == "high"
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    assert "reasoning_effort" not in translated(output_config={"effort": "low"})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"model": ""}, "model"),
        ({"model": 7}, "model"),
        ({"temperature": "warm"}, "temperature"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"stream": "yes"}, "stream"),
        ({"metadata": []}, "metadata"),
        ({"system": 3}, "system"),
        ({"system": [{"type": "image"}]}, "system[0]"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [3]}]}, "messages[0].content[0]"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/png",
                                    "data": "AA",
                                },
                            },
                        ],
                    }
                ]
            },
            "messages[0].content[1]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document"}]}]},
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_nowhere", "content": "x"},
                        ],
                    }
                ]
            },
            "messages[0].content[0].tool_use_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "t", "name": "f", "input": "not an object"},
                        ],
                    }
                ]
            },
            "messages[0].content[0].input",
        ),
        ({"tools": {"name": "f"}}, "tools"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "maybe"}}, "tool_choice.type"),
        ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
        ({"thinking": True}, "thinking"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format"),
    ],
)
def test_bad_input_is_an_invalid_request_naming_the_field(
    fields: dict[str, Any], param: str
) -> None:
    request = body(**fields)
    if fields.get("max_tokens", 1) is None:
        del request["max_tokens"]
    with pytest.raises(InvalidRequest) as caught:
        to_openai(check_body(request), stream=False)
    assert caught.value.param == param
    assert caught.value.message.startswith(param + ":")


def test_the_image_block_error_says_what_is_wrong() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    with pytest.raises(InvalidRequest) as caught:
        translated(messages=[{"role": "user", "content": [image]}])
    assert caught.value.message == (
        "messages[0].content[0]: image blocks are not supported by chatd (text only)"
    )


# -- responses -------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
    }


def test_a_completion_becomes_a_message() -> None:
    answer = to_message(completion({"role": "assistant", "content": "hello"}), "qwen3")
    assert answer["id"].startswith("msg_")
    assert {k: v for k, v in answer.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "model": "qwen3",
        "content": [{"type": "text", "text": "hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3},
    }


def test_reasoning_and_tool_calls_become_thinking_and_tool_use_blocks() -> None:
    message = {
        "role": "assistant",
        "content": None,
        "reasoning_content": "need weather",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    }
    answer = to_message(completion(message, "tool_calls"), "m")
    assert answer["content"] == [
        {"type": "thinking", "thinking": "need weather", "signature": ""},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert answer["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish", "choice", "stops", "reason", "sequence"),
    [
        ("length", {}, None, "max_tokens", None),
        ("stop", {"stop_reason": "END"}, ["END"], "stop_sequence", "END"),
        ("stop", {"stop_reason": 151643}, ["END"], "end_turn", None),  # vLLM: a token id
        ("stop", {}, ["END"], "end_turn", None),  # the upstream did not say which
        ("content_filter", {}, None, "end_turn", None),
    ],
)
def test_stop_reasons(
    finish: str, choice: dict[str, Any], stops: Any, reason: str, sequence: str | None
) -> None:
    answer = to_message(completion({"content": "x"}, finish, **choice), "m", stops)
    assert (answer["stop_reason"], answer["stop_sequence"]) == (reason, sequence)


@pytest.mark.parametrize(
    "bad_completion",
    [
        {"choices": []},
        {"choices": [{"message": "x"}]},
        completion({"tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]}),
        completion({"tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}),
    ],
)
def test_an_unreadable_completion_is_a_value_error(bad_completion: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        to_message(bad_completion, "m")


# -- streams ---------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def run(chunks: list[dict[str, Any]], stops: list[str] | None = None) -> list[tuple[str, Any]]:
    translator = StreamTranslator("m", stops)
    events = translator.start()
    for c in chunks:
        events += translator.feed(c)
    return events + translator.finish_events()


def test_text_and_thinking_stream_as_blocks() -> None:
    events = run(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"reasoning_content": "hm"}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk({}, "stop"),
            {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}},
        ]
    )
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [d for _, d in events]
    assert data[0]["message"]["content"] == [] and data[0]["message"]["stop_reason"] is None
    assert data[2]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert data[3]["delta"] == {"type": "thinking_delta", "thinking": "hm"}
    assert data[5] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "text", "text": ""},
    }
    assert data[7] == {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "text_delta", "text": "lo"},
    }
    assert data[9] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 9, "output_tokens": 2},
    }


def test_openai_tool_call_pieces_stream_as_input_json_deltas() -> None:
    events = run(
        [
            chunk({"content": "Looking."}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 1, "id": "call_2", "function": {"name": "f", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({}, "tool_calls"),
        ]
    )
    data = [d for _, d in events]
    starts = [d for d in data if d["type"] == "content_block_start"]
    assert [s["content_block"] for s in starts[1:]] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_2", "name": "f", "input": {}},
    ]
    pieces = [
        d["delta"]["partial_json"]
        for d in data
        if d["type"] == "content_block_delta" and d["index"] == 1
    ]
    assert pieces == ['{"city": ', '"Paris"}']
    assert data[-2]["delta"]["stop_reason"] == "tool_use"


def test_an_ollama_tool_call_arrives_whole() -> None:
    call = {"index": 0, "id": "call_x", "function": {"name": "f", "arguments": {"a": 1}}}
    events = run([chunk({"tool_calls": [call]}), chunk({}, "tool_calls")])
    deltas = [d["delta"] for _, d in events if d["type"] == "content_block_delta"]
    assert deltas == [{"type": "input_json_delta", "partial_json": '{"a":1}'}]


def test_a_stream_cut_by_length_or_a_named_stop_sequence() -> None:
    assert run([chunk({"content": "x"}, "length")])[-2][1]["delta"]["stop_reason"] == "max_tokens"
    final = chunk({}, "stop")
    final["choices"][0]["stop_reason"] = "END"
    delta = run([chunk({"content": "x"}), final], ["END"])[-2][1]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_sse_event_framing() -> None:
    assert sse_event(("ping", {"type": "ping"})) == b'event: ping\ndata: {"type":"ping"}\n\n'


# -- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "overloaded_error"),
        (504, "api_error"),
    ],
)
def test_error_types_by_status(status: int, kind: str) -> None:
    assert error_type(status) == kind


def test_error_body_shape() -> None:
    error = UpstreamError("ollama", "", upstream_status=500, body="boom")
    assert error_body(error) == {
        "type": "error",
        "error": {"type": "api_error", "message": "ollama: boom (upstream 500)"},
    }
    assert error_body(PayloadTooLarge("too big"))["error"]["type"] == "request_too_large"


# -- the route in process ----------------------------------------------------------------


class RateLimited(ChatdError):
    """What caller admission raises over a caller's rpm (docs/callers-and-usage.md)."""

    status = 429
    type = "rate_limited"


def sdk(app: Any, **kw: Any) -> anthropic.AsyncAnthropic:
    """The SDK talking to the app in process (the SDK brings its own httpx2)."""
    transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
    return anthropic.AsyncAnthropic(
        base_url="http://chatd",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=transport, base_url="http://chatd"),
        **kw,
    )


async def test_caller_admission_runs_and_its_429_is_a_rate_limit_error() -> None:
    app = create_app(make_settings({"echo": {"kind": "mock"}}, default_provider="echo"))
    admitted: list[str] = []

    async def admit(request: Any, model: str) -> None:
        admitted.append(model)
        if model == "echo/limited":
            raise RateLimited("over 60 requests a minute", headers={"Retry-After": "7"})

    app.state.admit = admit
    async with app.router.lifespan_context(app):
        client = sdk(app, api_key="unused")
        answer = await client.messages.create(model="echo/ok", max_tokens=8, messages=USER)
        assert answer.content[0].text == "hi"  # type: ignore[union-attr]
        with pytest.raises(anthropic.RateLimitError) as caught:
            await client.messages.create(model="echo/limited", max_tokens=8, messages=USER)
    assert admitted == ["echo/ok", "echo/limited"]
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "over 60 requests a minute"},
    }


async def test_x_api_key_is_a_token_and_a_refusal_is_anthropic_shaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATD_TEST_TOKENS", "tok-a,tok-b")
    settings = make_settings(
        {"echo": {"kind": "mock"}}, default_provider="echo", auth_tokens_env="CHATD_TEST_TOKENS"
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        answer = await sdk(app, api_key="tok-b").messages.create(
            model="echo/x", max_tokens=8, messages=USER
        )
        assert answer.content[0].text == "hi"  # type: ignore[union-attr]
        answer = await sdk(app, auth_token="tok-a").messages.create(
            model="echo/x", max_tokens=8, messages=USER
        )
        assert answer.stop_reason == "end_turn"
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk(app, api_key="wrong").messages.create(
                model="echo/x", max_tokens=8, messages=USER
            )
        assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        # the other routes keep the error envelope, and take x-api-key too
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            refused = await client.get("/v1/models")
            assert refused.status_code == 401
            assert refused.json()["error"]["type"] == "unauthorized"
            listed = await client.get("/v1/chat/providers", headers={"x-api-key": "tok-a"})
            assert listed.status_code == 200


def test_the_route_is_documented_in_openapi() -> None:
    app = create_app(make_settings({"echo": {"kind": "mock"}}, default_provider="echo"))
    document = app.openapi()
    components = document["components"]["schemas"]

    def resolved(schema: dict[str, Any]) -> dict[str, Any]:  # named schemas (contract.py)
        return components[schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema

    operation = document["paths"]["/v1/messages"]["post"]
    assert operation["operationId"] == "createMessage"
    schema = resolved(operation["requestBody"]["content"]["application/json"]["schema"])
    assert schema["required"] == ["model", "max_tokens", "messages"]
    assert schema["properties"]["max_tokens"]["minimum"] == 1
    assert schema["properties"]["messages"]["minItems"] == 1
    assert set(operation["responses"]) >= {"200", "400", "401", "404", "413", "429", "502", "503"}
    error = resolved(operation["responses"]["400"]["content"]["application/json"]["schema"])
    assert error["properties"]["type"]["const"] == "error"
    assert "/v1/messages/count_tokens" not in document["paths"]


@pytest.mark.parametrize(
    ("headers", "allowed"),
    [
        ([(b"x-api-key", b"tok-a")], True),
        ([(b"authorization", b"Bearer tok-a")], True),
        ([(b"authorization", b"Basic abc"), (b"x-api-key", b"tok-a")], True),
        ([(b"authorization", b"Bearer wrong"), (b"x-api-key", b"tok-a")], True),
        ([(b"x-api-key", b"wrong")], False),
        ([(b"x-api-key", b"")], False),
        ([(b"authorization", b"Basic abc")], False),
        ([], False),
    ],
)
def test_inbound_auth_takes_a_token_from_either_header(
    headers: list[tuple[bytes, bytes]], allowed: bool
) -> None:
    from chatd.state.auth import BearerAuth

    refusal = BearerAuth(["tok-a"])({"path": "/v1/messages", "headers": headers})
    assert (refusal is None) is allowed
    if refusal is not None:
        assert refusal.status == 401 and "tok-a" not in refusal.message
