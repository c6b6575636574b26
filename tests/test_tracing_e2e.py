"""Tracing end to end (docs/tracing.md): a real chatd exports to a real Arize Phoenix over
OTLP/HTTP, and the spans are read back from Phoenix's REST API.

One Phoenix and one chatd serve the module; each test finds its own trace by the
`trace_id` a caller's `traceparent` chose, so tests never see each other's spans.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.fakes.upstream import FakeUpstream
from tests.otlp_receiver import OtlpReceiver
from tests.phoenix_server import Phoenix, phoenix_installed
from tests.support import ChatdProcess, free_port

pytestmark = pytest.mark.skipif(
    not phoenix_installed(), reason="no Phoenix: scripts/test.sh installs it in .venv-phoenix"
)

KEY = "sk-fake-vendor-key-" + "7" * 24
CALLER_TOKEN = "caller-token-" + "3" * 24
SECRET_PROMPT = "the launch code is tangerine-4471"
USER = [{"role": "user", "content": SECRET_PROMPT}]


def config(collector: str, fake: FakeUpstream) -> str:
    base = f"{fake.url}/v1"
    return f"""
[chatd]
default_provider = "fake"
usage_db = ""

[chatd.tracing]
otlp_endpoint = "{collector}"
service_name = "chatd-under-test"

[chatd.callers.app]
token_env = "CALLER_TOKEN"

[chatd.providers.fake]
kind = "openai"
base_url = "{base}"
key_env = "FAKE_KEY"
max_retries = 1
cooldown_failures = 0

[chatd.providers.hedged]
kind = "openai"
base_url = "{base}"
key_env = "FAKE_KEY"
hedge_after_ms = 100
balance = "round_robin"
max_retries = 0
cooldown_failures = 0
endpoints = [{{ base_url = "{base}" }}, {{ base_url = "{base}" }}]
"""


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Phoenix]:
    server = Phoenix(tmp_path_factory.mktemp("phoenix")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def chatd(
    phoenix: Phoenix, fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChatdProcess]:
    env = {"FAKE_KEY": KEY, "CALLER_TOKEN": CALLER_TOKEN}
    with ChatdProcess(config(phoenix.url, fake), tmp_path_factory.mktemp("chatd"), env=env) as c:
        yield c


def caller_trace() -> tuple[str, str, dict[str, str]]:
    """A caller's own trace and span, and the headers that carry them."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    headers = {
        "traceparent": f"00-{trace_id}-{span_id}-01",
        "authorization": f"Bearer {CALLER_TOKEN}",
    }
    return trace_id, span_id, headers


def by_kind(spans: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    (server,) = [s for s in spans if "http.request.method" in s["attributes"]]
    clients = [s for s in spans if "gen_ai.operation.name" in s["attributes"]]
    return server, sorted(clients, key=lambda s: s["attributes"]["chatd.attempt"])


def test_a_chat_is_a_server_span_continuing_the_callers_trace_and_a_client_span(
    chatd: ChatdProcess, phoenix: Phoenix, fake: FakeUpstream
) -> None:
    trace_id, parent, headers = caller_trace()
    body = {"model": "fake/ok", "messages": USER, "max_tokens": 50, "temperature": 0.3}
    answer = httpx.post(f"{chatd.url}/v1/chat", json=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    server, clients = by_kind(phoenix.wait_for(trace_id, 2))

    assert server["name"] == "POST /v1/chat" and server["parent_id"] == parent
    attrs = server["attributes"]
    assert attrs["http.route"] == "/v1/chat" and attrs["http.response.status_code"] == 200
    assert attrs["chatd.request_id"] == answer.headers["x-request-id"]
    assert attrs["chatd.caller"] == "app" and attrs["chatd.cache"] == "bypass"

    (client,) = clients
    assert client["parent_id"] == server["context"]["span_id"]
    assert client["name"] == "chat ok" and client["status_code"] != "ERROR"
    attrs = client["attributes"]
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "fake" and attrs["chatd.provider"] == "fake"
    assert attrs["gen_ai.request.model"] == "ok" and attrs["gen_ai.response.model"]
    assert attrs["gen_ai.request.max_tokens"] == 50 and attrs["gen_ai.request.temperature"] == 0.3
    assert attrs["gen_ai.usage.input_tokens"] > 0 and attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["server.address"] == "127.0.0.1" and attrs["chatd.attempt"] == 1

    # The upstream was told the call's own span, in the same trace.
    sent = [c for c in fake.calls if trace_id in c.headers.get("traceparent", "")]
    assert [c.headers["traceparent"] for c in sent] == [
        f"00-{trace_id}-{client['context']['span_id']}-01"
    ]
    # The request's log line names the trace.
    assert f'"trace_id":"{trace_id}"' in chatd.log().replace(" ", "")


def test_a_retried_call_is_two_client_spans_the_failed_one_an_error(
    chatd: ChatdProcess, phoenix: Phoenix, fake: FakeUpstream
) -> None:
    fake.reset()
    trace_id, _, headers = caller_trace()
    body = {"model": "fake/flaky-1", "messages": USER}
    answer = httpx.post(f"{chatd.url}/v1/chat", json=body, headers=headers, timeout=15)
    assert answer.status_code == 200 and answer.headers["x-chatd-attempts"] == "2"
    server, (failed, served) = by_kind(phoenix.wait_for(trace_id, 3))
    assert failed["attributes"]["chatd.attempt"] == 1 and served["attributes"]["chatd.attempt"] == 2
    assert failed["status_code"] == "ERROR" and failed["attributes"]["error.type"]
    assert served["status_code"] != "ERROR" and "error.type" not in served["attributes"]
    assert {failed["parent_id"], served["parent_id"]} == {server["context"]["span_id"]}


def test_a_hedge_is_two_client_spans_one_marked_as_the_hedge(
    chatd: ChatdProcess, phoenix: Phoenix, fake: FakeUpstream
) -> None:
    trace_id, _, headers = caller_trace()
    body = {"model": "hedged/slow-400", "messages": USER}
    answer = httpx.post(f"{chatd.url}/v1/chat", json=body, headers=headers, timeout=15)
    assert answer.status_code == 200 and answer.headers["x-chatd-attempts"] == "2"
    _, clients = by_kind(phoenix.wait_for(trace_id, 3))
    assert len(clients) == 2
    assert [c["attributes"].get("chatd.hedge", False) for c in clients] == [False, True]
    host = fake.url.removeprefix("http://")
    assert {c["attributes"]["chatd.endpoint"] for c in clients} == {host, f"{host}#2"}


def test_a_streams_span_has_its_first_token_and_ends_with_the_stream(
    chatd: ChatdProcess, phoenix: Phoenix
) -> None:
    trace_id, _, headers = caller_trace()
    body = {"model": "fake/slow-600", "messages": USER, "stream": True}
    with httpx.stream(
        "POST", f"{chatd.url}/v1/chat", json=body, headers=headers, timeout=15
    ) as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert '"done":true' in lines[-1].replace(" ", "")
    server, (client,) = by_kind(phoenix.wait_for(trace_id, 2))
    assert [e["name"] for e in client["events"]] == ["gen_ai.first_token"]
    first_token = client["events"][0]["timestamp"]
    assert client["start_time"] < first_token < client["end_time"]
    assert client["end_time"] <= server["end_time"]
    assert client["attributes"]["gen_ai.usage.output_tokens"] > 0


def test_embeddings_and_messages_are_traced_the_same_way(
    chatd: ChatdProcess, phoenix: Phoenix
) -> None:
    trace_id, _, headers = caller_trace()
    embedded = httpx.post(
        f"{chatd.url}/v1/embeddings",
        json={"model": "fake/emb", "input": ["one", "two"]},
        headers=headers,
        timeout=10,
    )
    assert embedded.status_code == 200, embedded.text
    server, (client,) = by_kind(phoenix.wait_for(trace_id, 2))
    assert server["name"] == "POST /v1/embeddings"
    assert client["name"] == "embeddings emb"
    assert client["attributes"]["gen_ai.operation.name"] == "embeddings"

    trace_id, _, headers = caller_trace()
    sdk = anthropic.Anthropic(
        base_url=chatd.url, api_key=CALLER_TOKEN, default_headers=headers, max_retries=0
    )
    message = sdk.messages.create(model="fake/ok", max_tokens=64, messages=USER)
    assert message.content[0].text
    server, (client,) = by_kind(phoenix.wait_for(trace_id, 2))
    assert server["name"] == "POST /v1/messages"
    assert client["attributes"]["gen_ai.request.max_tokens"] == 64
    assert client["attributes"]["gen_ai.usage.output_tokens"] == message.usage.output_tokens


def test_no_prompt_key_or_token_in_any_span(chatd: ChatdProcess, phoenix: Phoenix) -> None:
    trace_id, _, headers = caller_trace()
    sdk = openai.OpenAI(base_url=f"{chatd.url}/v1", api_key=CALLER_TOKEN, default_headers=headers)
    sdk.chat.completions.create(model="fake/ok", messages=USER)  # type: ignore[arg-type]
    phoenix.wait_for(trace_id, 2)
    everything = httpx.get(
        f"{phoenix.url}/v1/projects/default/spans", params={"limit": 1000}, timeout=10
    ).text
    assert "tangerine" not in everything
    assert KEY not in everything and KEY[-12:] not in everything
    assert CALLER_TOKEN not in everything and CALLER_TOKEN[-12:] not in everything


def test_an_unreachable_collector_fails_no_request(tmp_path: Path, fake: FakeUpstream) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # a port nobody listens on
    env = {"FAKE_KEY": KEY, "CALLER_TOKEN": CALLER_TOKEN}
    with ChatdProcess(config(nobody, fake), tmp_path, env=env) as chatd:
        auth = {"authorization": f"Bearer {CALLER_TOKEN}"}
        body = {"model": "fake/ok", "messages": USER}
        statuses = [
            httpx.post(f"{chatd.url}/v1/chat", json=body, headers=auth, timeout=10).status_code
            for _ in range(30)
        ]
    assert statuses == [200] * 30
    assert "Traceback" not in chatd.log()


def test_each_worker_exports_with_its_own_instance_id(tmp_path: Path, fake: FakeUpstream) -> None:
    with OtlpReceiver() as receiver:
        env = {"FAKE_KEY": KEY, "CALLER_TOKEN": CALLER_TOKEN}
        config_text = config(receiver.url, fake)
        auth = {"authorization": f"Bearer {CALLER_TOKEN}"}
        chatd = ChatdProcess(config_text, tmp_path, env=env, args=("--workers", "2"))
        chatd.start(timeout=60)  # two processes importing the SDK on a busy machine
        try:
            body = {"model": "fake/ok", "messages": USER}
            with httpx.Client(timeout=10) as client:
                for _ in range(60):  # new connections: the kernel spreads them over workers
                    response = client.post(
                        f"{chatd.url}/v1/chat", json=body, headers={**auth, "connection": "close"}
                    )
                    assert response.status_code == 200
            assert receiver.wait_for_instances(2), receiver.instances()
        finally:
            chatd.stop()
    assert receiver.service_names() == {"chatd-under-test"}
