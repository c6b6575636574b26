"""Embeddings (docs/http-api.md) end to end: the official `openai` SDK against a real chatd process
and the real fake upstream, through the ollama, openai and mock kinds; batching, limits,
a connection failure mid-request, metrics and the log line."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from chatd.providers.mock import mock_embedding
from tests.fakes.upstream import FakeUpstream, fake_vector
from tests.support import ChatdProcess, provider_toml
from tests.test_ops_e2e import metric, request_lines, scrape

KEY = "sk-embed-test-key-not-for-printing"
# model as sent -> (fake path it reaches, model the fake sees) or None for the mock
KINDS = {
    "ollama/ok": ("/api/embed", "ok"),
    "openrouter/ok": ("/v1/embeddings", "ok"),
    "emb": ("/api/embed", "ok"),  # an alias
    "echo/anything": None,
}


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        '[models]\nemb = ["nowhere:cloud", "ollama/ok"]\n\n'
        + provider_toml("ollama", "ollama", fake.url, embed_batch=256, max_concurrency=2)
        + provider_toml("ollama_cloud", "ollama_cloud", fake.url, enabled=False)
        + provider_toml("openrouter", "openai", fake.url + "/v1")
        + provider_toml("echo", "mock")
        + provider_toml("brittle", "ollama", fake.url, max_retries=0)
    )
    env = {"OPENROUTER_API_KEY": KEY}
    with ChatdProcess(config, tmp_path_factory.mktemp("embed"), env=env) as process:
        yield process
        assert KEY not in process.log()
        assert "Traceback" not in process.log()


@pytest.fixture
def client(chatd: ChatdProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(autouse=True)
def fresh(fake: FakeUpstream) -> None:
    fake.reset()
    fake.reset_peaks()


def expected(model: str, text: str, dimensions: int | None = None) -> list[float]:
    if KINDS[model] is None:
        return mock_embedding(text, dimensions or 8)
    return fake_vector(text, dimensions or 4)


def upstream_bodies(fake: FakeUpstream, model: str) -> list[dict[str, Any]]:
    target = KINDS[model]
    return [] if target is None else [c.json for c in fake.calls_to(target[0])]


@pytest.mark.parametrize("model", list(KINDS))
def test_a_string_through_each_kind(client: openai.OpenAI, fake: FakeUpstream, model: str) -> None:
    answer = client.embeddings.create(model=model, input="hello embedding world")
    assert answer.object == "list"
    assert [d.index for d in answer.data] == [0]
    assert answer.data[0].embedding == expected(model, "hello embedding world")
    assert answer.usage.prompt_tokens == 3 and answer.usage.total_tokens == 3
    bodies = upstream_bodies(fake, model)
    if KINDS[model] is None:
        assert answer.model == "anything"
        return
    assert answer.model == "ok"
    assert len(bodies) == 1
    body = bodies[0]
    assert body["model"] == "ok"
    assert body["input"] == ["hello embedding world"]
    if model.startswith("openrouter/"):
        # the SDK asked chatd for base64; chatd asks the vendor for floats, encodes itself
        assert body["encoding_format"] == "float"
        assert fake.calls_to("/v1/embeddings")[0].headers["authorization"] == f"Bearer {KEY}"
    else:
        assert body == {"model": "ok", "input": ["hello embedding world"], "truncate": True}


@pytest.mark.parametrize("model", list(KINDS))
def test_a_list_in_float_and_base64_gives_the_same_vectors(
    client: openai.OpenAI, model: str
) -> None:
    inputs = ["first text", "second", "the third one"]
    floats = client.embeddings.create(model=model, input=inputs, encoding_format="float")
    # Left to choose, the SDK asks for base64 and decodes it (little-endian float32) itself.
    decoded = client.embeddings.create(model=model, input=inputs)
    # Asked for base64 explicitly, it hands the strings over as they came.
    packed = client.embeddings.create(model=model, input=inputs, encoding_format="base64")
    want = [expected(model, text) for text in inputs]
    assert [d.embedding for d in floats.data] == want
    assert [d.embedding for d in decoded.data] == want
    assert [unpack(d.embedding) for d in packed.data] == want  # type: ignore[arg-type]
    assert [d.index for d in packed.data] == [0, 1, 2]


def unpack(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_base64_on_the_wire_is_a_string(chatd: ChatdProcess) -> None:
    body = {"model": "ollama/ok", "input": ["a"], "encoding_format": "base64"}
    answer = httpx.post(f"{chatd.url}/v1/embeddings", json=body, timeout=30).json()
    assert isinstance(answer["data"][0]["embedding"], str)


@pytest.mark.parametrize("model", list(KINDS))
def test_dimensions_reach_the_upstream(client: openai.OpenAI, fake: FakeUpstream, model: str):
    answer = client.embeddings.create(model=model, input=["a b", "c"], dimensions=16)
    assert [len(d.embedding) for d in answer.data] == [16, 16]
    assert answer.data[1].embedding == expected(model, "c", 16)
    for body in upstream_bodies(fake, model):
        assert body["dimensions"] == 16


def test_a_thousand_inputs_go_up_as_four_batches_two_at_a_time(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    inputs = [f"input {i}" for i in range(1000)]
    answer = client.embeddings.create(model="ollama/slow-300", input=inputs)
    calls = fake.calls_to("/api/embed")
    assert len(calls) == 4
    assert sorted(len(c.json["input"]) for c in calls) == [232, 256, 256, 256]
    sent = sorted((c.json["input"] for c in calls), key=lambda batch: int(batch[0].split()[1]))
    assert [text for batch in sent for text in batch] == inputs  # split in order, none lost
    assert [d.index for d in answer.data] == list(range(1000))
    assert [d.embedding for d in answer.data] == [fake_vector(t) for t in inputs]
    assert answer.usage.prompt_tokens == 2000
    # max_concurrency = 2 on the provider: batches overlap, but never more than two
    assert fake.counters()["peak_embed_in_flight"] == 2


def test_a_connection_failure_mid_batch_fails_cleanly_and_cancels_the_rest(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    inputs = [f"input {i}" for i in range(1000)]
    inputs[300] = "!reset"  # the second batch's connection is reset; the others are slow
    body = {"model": "brittle/slow-5000", "input": inputs}
    started = time.monotonic()
    response = httpx.post(f"{chatd.url}/v1/embeddings", json=body, timeout=30)
    took = time.monotonic() - started
    assert response.status_code == 502, response.text
    assert set(response.json()) == {"error"}  # no half answer
    assert response.json()["error"]["type"] == "upstream_error"
    assert took < 4.0  # not waiting for the slow batches
    # Every batch that reached the fake before the failure had its connection closed by
    # chatd, well before its 5 s answer; a batch cancelled sooner never got there at all.
    time.sleep(0.5)  # a request already on the wire is recorded too
    calls = fake.calls_to("/api/embed")
    assert 2 <= len(calls) <= 4
    assert sum("!reset" in c.json["input"] for c in calls) == 1
    others = [c for c in calls if "!reset" not in c.json["input"]]
    assert fake.wait_for(lambda: all(c.disconnected_at is not None for c in others), 3.0), [
        (c.disconnected_at, c.finished_at) for c in others
    ]
    assert all(c.disconnected_at - started < 4.5 for c in others)  # type: ignore[operator]
    assert fake.wait_for(lambda: fake.counters()["in_flight"] == 0, 3.0)


@pytest.mark.parametrize(("model", "says"), [("wrongcount", "vectors for"), ("ragged", "lengths")])
def test_wrong_vectors_from_upstream_are_a_502(
    client: openai.OpenAI, model: str, says: str
) -> None:
    for kind in ("ollama", "openrouter"):
        with pytest.raises(openai.APIStatusError) as caught:
            client.embeddings.create(model=f"{kind}/{model}", input=["a", "b", "c"])
        assert caught.value.status_code == 502
        assert says in caught.value.message


def test_bad_input_is_a_400_the_sdk_raises(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="echo/x", input=[])
    assert caught.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="echo/x", input=[[1, 2, 3]])
    assert caught.value.body["param"] == "input"  # type: ignore[index]


def test_metrics_and_the_log_line_count_embeddings_under_their_route(
    chatd: ChatdProcess,
) -> None:
    before = scrape(chatd.url)
    request_id = uuid.uuid4().hex
    body = {"model": "echo/anything", "input": ["one two three", "four five"]}
    response = httpx.post(
        f"{chatd.url}/v1/embeddings", json=body, headers={"X-Request-ID": request_id}, timeout=30
    )
    assert response.status_code == 200
    after = scrape(chatd.url)

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    labels = {"route": "/v1/embeddings", "provider": "echo", "status": "200"}
    assert moved("chatd_requests_total", **labels) == 1
    assert moved("chatd_tokens_total", provider="echo", direction="in") == 5
    assert moved("chatd_tokens_total", provider="echo", direction="out") == 0
    [line] = request_lines(chatd, request_id)
    assert line["route"] == "/v1/embeddings"
    assert line["model"] == "echo/anything"
    assert line["provider"] == "echo"
    assert line["upstream_model"] == "anything"
    assert line["input_tokens"] == 5 and line["output_tokens"] == 0
    assert line["status"] == 200


def test_the_callers_deadline_bounds_every_batch(chatd: ChatdProcess, fake: FakeUpstream) -> None:
    body = {"model": "brittle/slow-3000", "input": [f"t{i}" for i in range(600)]}
    started = time.monotonic()
    response = httpx.post(
        f"{chatd.url}/v1/embeddings", json=body, headers={"X-Chatd-Timeout-Ms": "500"}, timeout=30
    )
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5
