"""Upstream errors a client can act on, end to end: a real chatd process, the fake upstream
answering with real servers' error bodies (`said-<name>`, tests/fakes/recorded.py), and
the official SDKs with their retries left on (docs/errors.md)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.fakes.recorded import RECORDED
from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml
from tests.test_callers_e2e import ledger_rows

KEY = "sk-vendor-key-never-shown"
USER = [{"role": "user", "content": "Summarise this very long document."}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        "[models]\n"
        'roomy = ["vendor/said-openai_overflow", "vendor/ok"]\n'
        'strict = ["vendor/said-openai_bad_param", "vendor/ok"]\n\n'
        + provider_toml("ollama", "ollama", fake.url)
        + provider_toml("vendor", "openai", fake.url + "/v1", key_env="VENDOR_KEY")
        + provider_toml(
            "once",
            "openai",
            fake.url + "/v1",
            key_env="VENDOR_KEY",
            max_retries=0,
            cooldown_failures=1000,
        )
    )
    tmp = tmp_path_factory.mktemp("errors")
    process = ChatdProcess(config, tmp, env={"VENDOR_KEY": KEY}).start(timeout=60)
    try:
        yield process
        assert KEY not in process.log()
    finally:
        process.stop()


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream) -> None:
    fake.reset()


def upstream_calls(fake: FakeUpstream) -> int:
    return len(fake.calls_to("/v1/chat/completions")) + len(fake.calls_to("/api/chat"))


def test_an_overflow_is_the_openai_sdks_bad_request_after_one_request(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    client = openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused")  # retries left on
    assert client.max_retries == 2
    for stream in (False, True):
        fake.reset()
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="vendor/said-openai_overflow", messages=USER, stream=stream
            )
        assert caught.value.code == "context_length_exceeded"
        assert caught.value.param == "messages"
        assert caught.value.message == (
            "Error code: 400 - vendor: This model's maximum context length is 128000 tokens."
            " However, your messages resulted in 130017 tokens. Please reduce the length of the"
            " messages. (upstream 400)"
        )
        assert caught.value.response.headers["x-should-retry"] == "false"
        assert upstream_calls(fake) == 1, "neither chatd nor the SDK may ask again"


def test_an_overflow_is_the_anthropic_sdks_bad_request_after_one_request(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    client = anthropic.Anthropic(base_url=chatd.url, api_key="unused")
    assert client.max_retries == 2
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="vendor/said-anthropic_overflow", max_tokens=16, messages=USER)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"] == {
        "type": "invalid_request_error",
        "message": "vendor: prompt is too long: 208310 tokens > 200000 maximum (upstream 400)",
    }
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert upstream_calls(fake) == 1


# name -> native, OpenAI surface, Anthropic surface statuses; x-should-retry
ROWS = {
    "llamacpp_overflow": (502, 400, 400, "false"),
    "llamacpp_bad_param": (502, 400, 400, "false"),
    "vllm_422": (502, 400, 400, "false"),
    "openai_model_not_found": (502, 404, 404, "false"),
    "llamacpp_bad_key": (502, 502, 502, "false"),
    "openai_rate_limited": (502, 429, 429, "true"),
    "openai_server_error": (502, 502, 502, "true"),
    "anthropic_overloaded": (502, 502, 529, "true"),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_each_surface_answers_the_table_row_in_its_dialect(
    chatd: ChatdProcess, fake: FakeUpstream, name: str
) -> None:
    native, api, messages, hint = ROWS[name]
    model = f"once/said-{name}"
    bodies = {
        "/v1/chat": {"model": model, "messages": USER},
        CHAT: {"model": model, "messages": USER},
        "/v1/messages": {"model": model, "max_tokens": 8, "messages": USER},
    }
    answers = {path: httpx.post(chatd.url + path, json=body) for path, body in bodies.items()}
    assert [a.status_code for a in answers.values()] == [native, api, messages]
    for answer in answers.values():
        assert answer.headers["x-should-retry"] == hint
        assert KEY not in answer.text
    assert upstream_calls(fake) == 3  # max_retries = 0: one call per surface
    error = answers["/v1/chat"].json()["error"]
    assert error["type"] == "upstream_error"
    assert error["upstream_status"] == RECORDED[name].status
    assert error["message"].startswith("once: ") and "{" not in error["message"]
    if name == "llamacpp_overflow":
        assert error["upstream_code"] == "context_length_exceeded"
    if name == "openai_rate_limited":
        assert all(a.headers["retry-after"] == "2" for a in answers.values())


def test_the_native_route_keeps_502_with_upstream_status_and_code(chatd: ChatdProcess) -> None:
    answer = httpx.post(
        chatd.url + "/v1/chat", json={"model": "said-ollama_overflow", "messages": USER}
    )
    assert answer.status_code == 502
    assert answer.headers["x-should-retry"] == "false"
    assert answer.json()["error"] == {
        "message": "ollama: the input length exceeds the context length (upstream 400)",
        "type": "upstream_error",
        "code": "upstream_error",
        "param": None,
        "upstream_status": 400,
        "upstream_code": "context_length_exceeded",
    }


def test_an_overflowing_embedding_input_names_input(chatd: ChatdProcess) -> None:
    answer = httpx.post(
        chatd.url + "/v1/embeddings", json={"model": "said-ollama_overflow", "input": ["x"]}
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")


def test_a_list_alias_moves_on_to_a_roomier_target_on_an_overflow(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    answer = httpx.post(chatd.url + CHAT, json={"model": "roomy", "messages": USER})
    assert answer.status_code == 200
    assert answer.headers["x-chatd-model"] == "ok"
    assert answer.headers["x-chatd-attempts"] == "2"


def test_a_list_alias_never_moves_on_after_any_other_fault_of_the_callers(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    answer = httpx.post(chatd.url + CHAT, json={"model": "strict", "messages": USER})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "temperature"
    assert upstream_calls(fake) == 1


def test_chatds_own_refusals_say_do_not_retry(chatd: ChatdProcess) -> None:
    bad = httpx.post(chatd.url + CHAT, content=b"{not json")
    nowhere = httpx.post(chatd.url + CHAT, json={"model": "x:cloud", "messages": USER})
    assert (bad.status_code, nowhere.status_code) == (400, 404)
    assert bad.headers["x-should-retry"] == nowhere.headers["x-should-retry"] == "false"


def test_the_ledger_and_metrics_record_the_status_answered(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    rid = "overflow-ledger-1"
    answer = httpx.post(
        chatd.url + CHAT,
        json={"model": "vendor/said-vllm_overflow", "messages": USER},
        headers={"X-Request-ID": rid},
    )
    assert answer.status_code == 400
    ledger = Path(chatd.env["CHATD_USAGE_DB"].removeprefix("sqlite:///"))
    rows: list[dict] = []
    for _ in range(30):
        rows = [r for r in ledger_rows(ledger, timeout=0) if r["request_id"] == rid]
        if rows:
            break
        fake.wait_for(lambda: False, timeout=0.1)
    assert len(rows) == 1
    assert (rows[0]["status"], rows[0]["error"]) == (400, "invalid_request")
    metrics = httpx.get(chatd.url + "/metrics").text
    labels = 'provider="vendor",route="/v1/chat/completions",status="400"'
    line = re.search(r"chatd_requests_total\{" + labels + r"\} (\S+)", metrics)
    assert line is not None and float(line[1]) >= 1
