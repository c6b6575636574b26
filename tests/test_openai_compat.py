"""The OpenAI surface's checks and translations (docs/http-api.md), without sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from chatd.errors import InvalidRequest
from chatd.providers.ollama_cloud import generate_body_from_openai
from chatd.types import StreamEvent
from chatd.wire.openai_compat import check_body, chunks, to_ollama_chat

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": USER}, "model"),
        ({"model": "  ", "messages": USER}, "model"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": ["hi"]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": ["user"], "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": USER, "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": USER, "temperature": True}, "temperature"),
        ({"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": USER, "seed": 1.5}, "seed"),
        ({"model": "m", "messages": USER, "stop": [1]}, "stop"),
        ({"model": "m", "messages": USER, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": USER, "response_format": "json"}, "response_format"),
    ],
)
def test_bad_bodies_are_400_naming_the_field(body: Any, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        check_body(body)
    assert caught.value.param == param


def test_a_full_body_passes_untouched() -> None:
    body = {
        "model": "m", "messages": [*USER, {"role": "assistant", "content": None}],
        "tools": [{"type": "function"}], "stop": ["x"], "seed": 3, "max_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}, "whatever": {"a": 1},
    }  # fmt: skip
    assert check_body(body) is body


def test_ollama_chat_translation_is_minimal_when_fields_are_absent() -> None:
    sent = to_ollama_chat({"model": "m", "messages": USER}, "qwen", stream=True)
    assert sent == {
        "model": "qwen", "messages": USER, "stream": True, "think": False, "options": {},
    }  # fmt: skip


def test_json_object_becomes_format_json_and_reasoning_effort_turns_think_on() -> None:
    body = {
        "model": "m", "messages": USER, "response_format": {"type": "json_object"},
        "reasoning_effort": "low", "max_tokens": 9,
    }  # fmt: skip
    sent = to_ollama_chat(body, "qwen", stream=False)
    assert sent["format"] == "json" and sent["think"] is True
    assert sent["options"] == {"num_predict": 9}


def test_generate_translation_flattens_and_carries_options() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "A"},
            {"role": "assistant", "content": "B"},
            {"role": "user", "content": [{"type": "text", "text": "C"}]},
        ],
        "temperature": 0.2,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    }
    sent = generate_body_from_openai(body, "kimi-k2.6", stream=False)
    assert sent["model"] == "kimi-k2.6" and sent["system"] == "S"
    assert sent["prompt"] == "User: A\n\nAssistant: B\n\nUser: C\n\nAssistant:"
    assert sent["options"] == {"temperature": 0.2} and sent["format"] == {"type": "object"}


async def events(*items: StreamEvent) -> AsyncIterator[StreamEvent]:
    for item in items:
        yield item


async def test_stream_events_become_chunks_with_role_first_and_usage_last() -> None:
    source = events(
        StreamEvent(thinking="hm"),
        StreamEvent(delta="Hel"),
        StreamEvent(delta="lo"),
        StreamEvent(done=True, input_tokens=4, output_tokens=2, finish_reason="length"),
    )
    out = [c async for c in chunks(source, "qwen", include_usage=True)]
    deltas = [c["choices"][0]["delta"] for c in out[:-1]]
    assert deltas == [
        {"role": "assistant", "reasoning_content": "hm"},
        {"content": "Hel"},
        {"content": "lo"},
        {},
    ]
    assert out[-2]["choices"][0]["finish_reason"] == "length"
    assert out[-1]["choices"] == []
    assert out[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert len({c["id"] for c in out}) == 1
