"""Bad input never breaks the service (issue #4) and the published contract tells the
truth: schemathesis, every check, over chatd's own OpenAPI document against a
real process whose upstreams are a real fake and `mock` providers, plus hand-made
hostile bodies. Every answer is a success or chatd's error envelope (on /v1/messages,
Anthropic's error shape); never a 500.

Size: `CHATD_FUZZ_EXAMPLES` examples per operation (default 150, about 1,500 requests
in all); `scripts/fuzz.sh` runs it with ≥1,000.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from chatd.app import create_app
from chatd.config import build_settings
from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml

EXAMPLES = int(os.environ.get("CHATD_FUZZ_EXAMPLES", "150"))
MAX_BODY = 1_048_576
CONTRACT_CHECKS = Path(__file__).resolve().parent.parent / "schemathesis.toml"
ERROR_TYPES = {
    400: {"invalid_request"},
    404: {"provider_not_found", "not_found"},
    405: {"method_not_allowed"},
    413: {"payload_too_large"},
    503: {"provider_disabled", "provider_overloaded", "provider_cooling_down"},
    # a generated X-Chatd-Timeout-Ms of a millisecond or two is a real, honest 504
    504: {"upstream_timeout"},
}
# /v1/messages answers errors in Anthropic's shape, with the same statuses (docs/http-api.md).
ANTHROPIC_ERROR_TYPES = {
    400: {"invalid_request_error"},
    404: {"not_found_error"},
    405: {"invalid_request_error"},
    413: {"request_too_large"},
    503: {"overloaded_error"},
    504: {"api_error"},
}
MESSAGES = "/v1/messages"
# /admin/* wants an admin token the fuzzer does not have; a reload can refuse the file.
ADMIN_ERROR_TYPES = {
    **ERROR_TYPES,
    400: {"invalid_request", "invalid_config"},
    401: {"unauthorized"},
    403: {"forbidden"},
}


def config(upstream: str) -> str:
    """Bare model names go to a real fake OpenAI-compatible upstream that answers any
    model (so a schema-valid request gets a 200); aliases and prefixes reach mocks."""
    return (
        f"""
[models]
hot = "echo/x"
tiered = ["nowhere:cloud", "echo/x"]

[chatd]
default_provider = "fake"
max_body_bytes = {MAX_BODY}
"""
        + provider_toml("fake", "openai", upstream)
        + provider_toml("echo", "mock")
        + provider_toml("other", "mock", reply="fixed answer")
        + provider_toml("ollama", "ollama", enabled=False)
    )


SENT: list[int] = []


@pytest.fixture(scope="module")
def chatd(tmp_path_factory: pytest.TempPathFactory, fake: FakeUpstream) -> Iterator[ChatdProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with ChatdProcess(config(fake.url + "/v1"), tmp) as process:
        yield process
        assert "Traceback" not in process.log(), process.log()[-3000:]


def fuzz_schema() -> Any:
    """chatd's own OpenAPI document, built from the same config at collection time (the
    lazy fixture loader does not work with this pytest); `test_schema_is_the_served_one`
    checks it is the one the process serves. Every route, every check."""
    import tomllib

    settings_ = build_settings(tomllib.loads(config("http://127.0.0.1:9/v1")))
    checks = schemathesis.Config.from_path(CONTRACT_CHECKS)
    schema = schemathesis.openapi.from_dict(create_app(settings_).openapi(), config=checks)
    schema.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=EXAMPLES,
    )
    return schema


def assert_well_formed(status: int, content_type: str, body: bytes, path: str = "") -> None:
    """A success, or the error envelope with a status and type from its table."""
    assert status != 500, (status, body[:500])
    if path.startswith(MESSAGES):
        assert_anthropic_well_formed(status, content_type, body)
        return
    if status == 200:
        if content_type.startswith("text/event-stream"):
            assert body.startswith(b"data: "), body[:200]
        elif content_type.startswith("text/html"):  # the dashboard's page
            assert body.startswith(b"<!doctype html>"), body[:200]
        else:
            assert isinstance(orjson.loads(body), dict)
        return
    assert content_type.startswith("application/json"), (status, content_type, body[:200])
    error = orjson.loads(body)["error"]
    assert set(error) >= {"message", "type", "code", "param"}, error
    assert error["code"] == error["type"], error
    types = ADMIN_ERROR_TYPES if path.startswith("/admin/") else ERROR_TYPES
    assert error["type"] in types.get(status, set()), (status, error)


def assert_anthropic_well_formed(status: int, content_type: str, body: bytes) -> None:
    """A message (or its event stream), or Anthropic's error shape with one of chatd's statuses."""
    if status == 200:
        if content_type.startswith("text/event-stream"):
            assert body.startswith(b"event: message_start\n"), body[:200]
            assert body.rstrip().endswith(b'data: {"type":"message_stop"}'), body[-200:]
        else:
            assert orjson.loads(body)["type"] == "message", body[:200]
        return
    assert content_type.startswith("application/json"), (status, content_type, body[:200])
    answer = orjson.loads(body)
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}, answer
    assert answer["error"]["type"] in ANTHROPIC_ERROR_TYPES.get(status, set()), (status, answer)


fuzzed = fuzz_schema()


def test_schema_is_the_served_one(chatd: ChatdProcess) -> None:
    served = httpx.get(f"{chatd.url}/openapi.json", timeout=10).json()
    assert served == fuzzed.raw_schema


def test_every_route_is_fuzzed() -> None:
    paths = set(fuzzed.raw_schema["paths"])
    assert {"/v1/chat", "/v1/chat/completions", "/v1/models", "/v1/chat/providers"} <= paths
    assert {"/health", "/ready", MESSAGES} <= paths


@fuzzed.exclude(path_regex="^/admin").parametrize()  # /admin: tests/test_fuzz_admin.py
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
def test_generated_requests_pass_every_contract_check(case: Any, chatd: ChatdProcess) -> None:
    """All of schemathesis's checks: no undocumented status, header or content type, the
    body matches its documented schema, schema-valid data is accepted and invalid data
    refused, wrong methods are 405s; and chatd's own: the error envelope and type table."""
    response = case.call_and_validate(base_url=chatd.url, timeout=10)
    SENT.append(response.status_code)
    content_type = (response.headers.get("content-type") or [""])[0]
    assert_well_formed(response.status_code, content_type, response.content, case.path)
    if case.path == MESSAGES and case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE:
        assert_only_the_exempted_rule(response.status_code, response.content, case.body)
    if case.path == "/v1/usage" and response.status_code == 400:
        if case.meta.generation.mode == schemathesis.GenerationMode.POSITIVE:
            message = orjson.loads(response.content)["error"]["message"]
            assert message == "since: must not be after until", (message, case.query)


# schemathesis.toml lets schema-valid data to /v1/messages be a 400 for this one rule,
# which JSON Schema cannot say; any other 400 there is the schema and the code disagreeing.
ORPHAN_TOOL_RESULT = re.compile(
    r"messages\[\d+\]\.content\[\d+\]\.tool_use_id: no earlier tool_use block has id "
)


def assert_only_the_exempted_rule(status: int, body: bytes, sent: Any) -> None:
    if status == 400:
        message = orjson.loads(body)["error"]["message"]
        assert ORPHAN_TOOL_RESULT.match(message), (message, sent)


def test_fuzz_volume_is_reported() -> None:
    """Runs after the fuzz test: shows how many requests the generator sent."""
    print(f"\nfuzz: {len(SENT)} generated requests, statuses {sorted(set(SENT))}")
    assert len(SENT) >= min(EXAMPLES, 100)


# -- hand-made hostile bodies ---------------------------------------------------------


def post(chatd: ChatdProcess, content: bytes, content_type: str | None = "application/json"):
    headers = {"Content-Type": content_type} if content_type else {}
    return httpx.post(f"{chatd.url}/v1/chat", content=content, headers=headers, timeout=30)


def assert_clean_4xx(response: httpx.Response, status: int | None = None) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert_well_formed(
        response.status_code, response.headers.get("content-type", ""), response.content
    )


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_body_is_a_clean_400(chatd: ChatdProcess, depth: int) -> None:
    assert_clean_4xx(post(chatd, b"[" * depth), 400)
    nested = b'{"model": "x", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    expected = 400 if len(nested) <= MAX_BODY else 413
    assert_clean_4xx(post(chatd, nested), expected)


def test_deep_object_nesting_inside_an_ignored_field_is_harmless(chatd: ChatdProcess) -> None:
    depth = 20_000
    extra = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"model":"hot","messages":[{"role":"user","content":"hi"}],"x":' + extra + b"}"
    response = post(chatd, body)
    assert response.status_code in (200, 400, 413), response.text[:300]
    assert_well_formed(
        response.status_code, response.headers.get("content-type", ""), response.content
    )


def test_huge_string_near_the_body_limit_is_answered(chatd: ChatdProcess) -> None:
    words = ("word " * ((MAX_BODY - 200) // 5)).strip()
    body = orjson.dumps({"model": "hot", "messages": [{"role": "user", "content": words}]})
    assert len(body) <= MAX_BODY
    response = post(chatd, body)
    assert response.status_code == 200, response.text[:300]
    assert response.json()["content"] == words


def test_huge_string_past_the_body_limit_is_413(chatd: ChatdProcess) -> None:
    body = orjson.dumps({"model": "hot", "messages": [{"role": "user", "content": "x" * MAX_BODY}]})
    assert_clean_4xx(post(chatd, body), 413)


def test_huge_model_name_is_a_clean_answer(chatd: ChatdProcess) -> None:
    body = orjson.dumps({"model": "a" * 60_000, "messages": [{"role": "user", "content": "hi"}]})
    response = post(chatd, body)
    assert response.status_code == 200  # an unknown bare name goes to the default (mock)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "hot", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
        b'{"model": "\xc3\x28", "messages": [{"role": "user", "content": "hi"}]}',
        b"\xef\xbb\xbf{}",
        b'{"model": "hot", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b"\x00\x00\x00",
    ],
)
def test_invalid_utf8_and_odd_bytes_are_a_clean_400(chatd: ChatdProcess, body: bytes) -> None:
    response = post(chatd, body)
    if response.status_code == 200:  # a lone surrogate escape may be accepted as text
        assert body.endswith(b'"\\ud800"}]}')
        return
    assert_clean_4xx(response, 400)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"model=hot&messages=hi", "application/x-www-form-urlencoded"),
        (b"just some words", "text/plain"),
        (
            b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n1\r\n--b--\r\n",
            "multipart/form-data; boundary=b",
        ),  # fmt: skip
        (b"<chat/>", "application/xml"),
        (b"", None),
        (b"\x89PNG\r\n", "image/png"),
    ],
)
def test_wrong_content_types_get_a_clean_4xx(
    chatd: ChatdProcess, content: bytes, content_type: str | None
) -> None:
    assert_clean_4xx(post(chatd, content, content_type))


def test_a_valid_json_body_sent_as_text_plain_is_still_read(chatd: ChatdProcess) -> None:
    """Like OpenAI's API, chatd reads the body as JSON whatever its declared type."""
    body = orjson.dumps({"model": "hot", "messages": [{"role": "user", "content": "hi"}]})
    response = post(chatd, body, "text/plain")
    assert response.status_code in (200, 415)
    assert_well_formed(
        response.status_code, response.headers.get("content-type", ""), response.content
    )


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "a string",
        12,
        None,
        {"model": None, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "hot", "messages": [{"role": "user", "content": ["a", "list"]}]},
        {"model": "hot", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "hot", "messages": "hi"},
        {"model": "hot", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        {"model": "hot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e309},
        {"model": "hot", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2**80},
        {"model": "   ", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "fake/", "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_wrong_shapes_get_a_clean_400(chatd: ChatdProcess, payload: Any) -> None:
    content = json.dumps(payload).encode()
    if payload and isinstance(payload, dict) and payload.get("max_tokens") == 1e309:
        content = content.replace(b"Infinity", b"1e309")
    assert_clean_4xx(post(chatd, content), 400)


def test_duplicate_keys_and_nan_are_handled(chatd: ChatdProcess) -> None:
    body = b'{"model":"hot","model":"hot","messages":[{"role":"user","content":"hi"}],'
    for tail in (b'"temperature": NaN}', b'"temperature": Infinity}', b'"temperature": 1}'):
        response = post(chatd, body + tail)
        assert response.status_code in (200, 400), response.text[:300]
        assert_well_formed(
            response.status_code, response.headers.get("content-type", ""), response.content
        )


def test_wrong_methods_and_routes_stay_in_the_envelope(chatd: ChatdProcess) -> None:
    for method, path, status in [
        ("GET", "/v1/chat", 405),
        ("DELETE", "/v1/chat/providers", 405),
        ("POST", "/v1/nothing", 404),
        ("GET", "/%ff%fe", 404),
    ]:
        response = httpx.request(method, f"{chatd.url}{path}", timeout=10)
        assert_clean_4xx(response, status)


# -- hand-made hostile bodies for /v1/messages (docs/http-api.md) --------------------------------

ANTHROPIC_USER = [{"role": "user", "content": "hi"}]


def post_messages(chatd: ChatdProcess, content: bytes, content_type: str = "application/json"):
    return httpx.post(
        f"{chatd.url}{MESSAGES}",
        content=content,
        headers={"Content-Type": content_type},
        timeout=30,
    )


def assert_anthropic_4xx(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text[:300]
    assert_well_formed(
        response.status_code, response.headers.get("content-type", ""), response.content, MESSAGES
    )


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "a string",
        None,
        {"model": "hot", "messages": ANTHROPIC_USER},
        {"model": "hot", "max_tokens": "64", "messages": ANTHROPIC_USER},
        {"model": "hot", "max_tokens": 2**80, "messages": ANTHROPIC_USER},
        {"model": "hot", "max_tokens": 64, "messages": []},
        {"model": "hot", "max_tokens": 64, "messages": [None]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user"}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user", "content": {"a": 1}}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user", "content": [None]}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user", "content": [[]]}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user", "content": [{}]}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": ["x"]},
        ]}]},
        {"model": "hot", "max_tokens": 64, "messages": [{"role": "assistant", "content": [
            {"type": "tool_use", "id": {}, "name": "f", "input": {}},
        ]}]},
        {"model": "hot", "max_tokens": 64, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                          "content": [{"type": "image"}]}]},
        ]},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "system": {"text": "x"}},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "tools": [[]]},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "tools": [{"name": 1}]},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "tool_choice": []},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "thinking": {"type": 1}},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER,
         "thinking": {"type": "enabled", "budget_tokens": 1e309}},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "stop_sequences": [1]},
        {"model": "hot", "max_tokens": 64, "messages": ANTHROPIC_USER, "output_config": 1},
        {"model": "   ", "max_tokens": 64, "messages": ANTHROPIC_USER},
        {"model": "fake/", "max_tokens": 64, "messages": ANTHROPIC_USER},
    ],
)  # fmt: skip
def test_wrong_message_shapes_get_a_clean_anthropic_400(chatd: ChatdProcess, payload: Any) -> None:
    content = json.dumps(payload).encode().replace(b"Infinity", b"1e309")
    assert_anthropic_4xx(post_messages(chatd, content), 400)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"[" * 100_000,
        b"\xef\xbb\xbf{}",
        b"\x00\x00",
        b'{"model": "\xc3\x28", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}',
        b'{"model": "hot", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], '
        b'"temperature": NaN}',
    ],
)
def test_odd_bytes_to_messages_are_a_clean_anthropic_400(
    chatd: ChatdProcess, content: bytes
) -> None:
    assert_anthropic_4xx(post_messages(chatd, content), 400)


def test_messages_over_the_body_limit_is_an_anthropic_413(chatd: ChatdProcess) -> None:
    body = {
        "model": "hot",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "x" * MAX_BODY}],
    }
    assert_anthropic_4xx(post_messages(chatd, orjson.dumps(body)), 413)


def test_a_deep_tool_input_is_harmless(chatd: ChatdProcess) -> None:
    depth = 20_000
    deep = b'{"a":' * depth + b"1" + b"}" * depth
    body = (
        b'{"model": "hot", "max_tokens": 5, "messages": [{"role": "assistant", "content": '
        b'[{"type": "tool_use", "id": "t", "name": "f", "input": ' + deep + b"}]}, "
        b'{"role": "user", "content": '
        b'[{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]}'
    )
    response = post_messages(chatd, body)
    assert response.status_code in (200, 400), response.text[:300]
    assert_well_formed(
        response.status_code, response.headers.get("content-type", ""), response.content, MESSAGES
    )
