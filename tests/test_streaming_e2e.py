"""Streaming end to end: a real chatd process, the real fake upstream, a real client.

Every provider kind is streamed through `POST /v1/chat` with `"stream": true`: Ollama's
NDJSON on /api/chat (ollama) and /api/generate (ollama_cloud), OpenAI SSE on
/v1/chat/completions (openai kind), and the upstream-less mock. Times are taken at the
client as each line arrives, so "flushed as it arrives" is observed, not inferred; the
fake runs in this process, so its `time.monotonic()` stamps compare with the client's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.fakes.upstream import ANSWER, THINKING, Call, FakeUpstream
from tests.support import ChatdProcess, provider_toml

USER = [{"role": "user", "content": "hi"}]
CLOUD_KEY = "test-cloud-key-0001"
OPENROUTER_KEY = "test-openrouter-key-0002"
MOCK_WORDS = "alpha beta gamma delta epsilon zeta"
MOCK_LATENCY_MS = 600


@dataclass(frozen=True)
class Kind:
    """One upstream provider kind: how a model routes to it and where it lands upstream."""

    kind: str
    provider: str  # the provider name chatd reports
    path: str  # the upstream path it calls
    route: str  # the model as the caller sends it, `{}` = the fake's behaviour

    def model(self, behaviour: str) -> str:
        return self.route.format(behaviour)

    def __str__(self) -> str:
        return self.kind


OLLAMA = Kind("ollama", "ollama", "/api/chat", "ollama/{}")
CLOUD = Kind("ollama_cloud", "cloud", "/api/generate", "cloud/{}")
OPENAI = Kind("openai", "openrouter", "/v1/chat/completions", "openrouter/{}")
UPSTREAM_KINDS = [OLLAMA, CLOUD, OPENAI]
KIND_IDS = [k.kind for k in UPSTREAM_KINDS]
KINDS = UPSTREAM_KINDS


def quick(**keys: Any) -> dict[str, Any]:
    """No retries, no cooldown: one upstream call per request, failures don't accumulate."""
    return {"max_retries": 0, "cooldown_failures": 0, **keys}


@pytest.fixture(scope="module")
def chatd(fake: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    # The ollama_cloud kind is served by a provider named `cloud` (keyed by OLLAMA_API_KEY)
    # while the built-in `ollama_cloud` stays unregistered, so that one process shows both
    # a keyed /api/generate stream and `x:cloud` → 404 provider_not_found.
    config = (
        "[chatd]\ntimeout_secs = 15\n\n"
        + provider_toml("ollama", "ollama", fake.url, **quick())
        + provider_toml("ollama_cloud", "ollama_cloud", fake.url, enabled=False)
        + provider_toml("cloud", "ollama_cloud", fake.url, key_env="OLLAMA_API_KEY", **quick())
        + provider_toml("openrouter", "openai", fake.url + "/v1", **quick())
        + provider_toml("opencode", "openai", fake.url + "/v1", enabled=True)  # keyless → 503
        + provider_toml("hangy", "ollama", fake.url, **quick(timeout_secs=0.4))
        + provider_toml("narrow", "ollama", fake.url, **quick(max_concurrency=1))
        + provider_toml("mock", "mock", latency_ms=MOCK_LATENCY_MS)
    )
    env = {"OLLAMA_API_KEY": CLOUD_KEY, "OPENROUTER_API_KEY": OPENROUTER_KEY}
    with ChatdProcess(config, tmp_path_factory.mktemp("streaming"), env=env) as process:
        yield process


@pytest.fixture(autouse=True)
def fresh_fake(fake: FakeUpstream) -> None:
    fake.reset()


# -- a streaming client that timestamps every line -------------------------------


@dataclass
class Streamed:
    status: int
    headers: httpx.Headers
    started: float  # time.monotonic() when the request was sent
    lines: list[str] = field(default_factory=list)
    events: list[tuple[float, dict[str, Any]]] = field(default_factory=list)  # (secs, event)
    body: bytes = b""  # the whole body when the answer was not an event stream

    def of(self, key: str) -> list[dict[str, Any]]:
        return [event for _, event in self.events if key in event]

    def times(self, key: str) -> list[float]:
        return [at for at, event in self.events if key in event]

    @property
    def text(self) -> str:
        return "".join(e["delta"] for e in self.of("delta"))

    @property
    def thinking(self) -> str:
        return "".join(e["thinking"] for e in self.of("thinking"))

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1][1]


def stream_chat(
    url: str, model: str, *, messages: Any = USER, timeout: float = 20, **fields: Any
) -> Streamed:
    payload = {"model": model, "messages": messages, "stream": True, **fields}
    with httpx.Client(timeout=timeout, trust_env=False) as client:
        started = time.monotonic()
        with client.stream("POST", url + "/v1/chat", json=payload) as response:
            result = Streamed(response.status_code, response.headers, started)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                result.body = response.read()
                return result
            for line in response.iter_lines():
                now = time.monotonic() - started
                result.lines.append(line)
                if line.startswith("data: "):
                    result.events.append((now, json.loads(line.removeprefix("data: "))))
    return result


def assert_sse_framing(streamed: Streamed) -> None:
    """Exactly `data: <json>\\n\\n` per event: no comments, no other fields, no stray lines."""
    assert streamed.lines, "no lines at all"
    assert all(line.startswith("data: ") for line in streamed.lines[0::2]), streamed.lines
    assert all(line == "" for line in streamed.lines[1::2]), streamed.lines
    assert len(streamed.lines) == 2 * len(streamed.events)


def assert_sse_headers(streamed: Streamed) -> None:
    assert streamed.status == 200, streamed.body
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["cache-control"] == "no-cache"
    assert streamed.headers["x-accel-buffering"] == "no"
    assert streamed.headers.get("x-request-id")


def assert_envelope(error: dict[str, Any]) -> dict[str, Any]:
    """The error envelope; returns the inner object."""
    assert set(error) == {"error"}, error
    inner = error["error"]
    assert {"message", "type", "code", "param"} <= set(inner), inner
    assert isinstance(inner["message"], str) and inner["message"]
    assert inner["code"] == inner["type"]
    return inner


def only_call(fake: FakeUpstream, path: str) -> Call:
    calls = fake.calls_to(path)
    assert len(calls) == 1, [(c.path, c.json) for c in fake.calls]
    return calls[0]


# -- the happy path, per kind ---------------------------------------------------------


@pytest.mark.parametrize("kind", UPSTREAM_KINDS, ids=KIND_IDS)
def test_deltas_reassemble_the_upstream_text(
    chatd: ChatdProcess, fake: FakeUpstream, kind: Kind
) -> None:
    streamed = stream_chat(chatd.url, kind.model("ok"))

    assert_sse_headers(streamed)
    assert_sse_framing(streamed)
    assert streamed.text == ANSWER
    assert len(streamed.of("delta")) > 1  # streamed in pieces, not one lump
    assert streamed.of("thinking") == []  # think defaults to false; no reasoning
    assert len(streamed.of("done")) == 1 and streamed.of("error") == []
    done = streamed.last
    assert done["done"] is True
    assert done["model"] == "ok"
    assert done["provider"] == kind.provider
    assert done["finish_reason"] == "stop"
    assert isinstance(done["input_tokens"], int) and done["input_tokens"] > 0
    assert done["output_tokens"] == len(ANSWER.split())  # what the fake reports
    assert isinstance(done["latency_ms"], int) and isinstance(done["ttft_ms"], int)
    assert 0 <= done["ttft_ms"] <= done["latency_ms"]
    assert done["latency_ms"] <= (streamed.events[-1][0] * 1000) + 50

    call = only_call(fake, kind.path)
    assert call.json["stream"] is True and call.json["model"] == "ok"
    if kind is OPENAI:
        assert call.json["stream_options"] == {"include_usage": True}
        assert call.headers["authorization"] == f"Bearer {OPENROUTER_KEY}"
    elif kind is CLOUD:
        assert call.json["prompt"] == "hi"
        assert call.headers["authorization"] == f"Bearer {CLOUD_KEY}"
    else:
        assert call.json["think"] is False


THINKING_CASES = [
    pytest.param(OLLAMA, "think", False, id="ollama-think-model"),
    pytest.param(OLLAMA, "ok", True, id="ollama-think-true"),
    pytest.param(CLOUD, "think", False, id="ollama_cloud-think-model"),
    pytest.param(CLOUD, "ok", True, id="ollama_cloud-think-true"),
    pytest.param(OPENAI, "think", False, id="openai-reasoning"),
]


@pytest.mark.parametrize(("kind", "behaviour", "think"), THINKING_CASES)
def test_reasoning_arrives_as_thinking_events(
    chatd: ChatdProcess, fake: FakeUpstream, kind: Kind, behaviour: str, think: bool
) -> None:
    streamed = stream_chat(chatd.url, kind.model(behaviour), think=think)

    assert_sse_headers(streamed)
    assert_sse_framing(streamed)
    assert streamed.thinking == THINKING
    assert streamed.text == ANSWER
    assert len(streamed.of("thinking")) > 1
    # the fake reasons first, then answers: the order survives
    keys = [next(iter(event)) for _, event in streamed.events]
    in_order = ["thinking"] * keys.count("thinking") + ["delta"] * keys.count("delta")
    assert keys == [*in_order, "done"], keys
    assert all(set(e) == {"thinking"} for e in streamed.of("thinking"))
    assert streamed.last["done"] is True and streamed.last["provider"] == kind.provider
    if kind is not OPENAI:
        assert only_call(fake, kind.path).json["think"] is think


# -- flushed as it arrives ------------------------------------------------------------


def test_first_delta_reaches_the_caller_before_the_upstream_finishes(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    # slow-2000: the fake spreads its 10 chunks over 2 s (one every 0.2 s). One stream per
    # kind, all at once: one slow stream's time, and no stream waits on another.
    with ThreadPoolExecutor(len(UPSTREAM_KINDS)) as pool:
        futures = {k: pool.submit(stream_chat, chatd.url, k.model("slow-2000")) for k in KINDS}
        results = {kind: future.result() for kind, future in futures.items()}

    for kind, streamed in results.items():
        assert_sse_headers(streamed)
        assert streamed.text == ANSWER, kind
        deltas = streamed.times("delta")
        done_at = streamed.times("done")[0]
        assert deltas[0] < 0.8, f"{kind}: first delta after {deltas[0]:.2f}s"
        assert done_at >= 1.8, f"{kind}: done after {done_at:.2f}s: the fake was not slow?"
        # still streaming: the deltas arrive spread out, not in one burst at the end
        assert deltas[len(deltas) // 2] < done_at - 0.5, (kind, deltas)
        # and on the fake's own clock, the upstream had not finished yet
        call = only_call(fake, kind.path)
        assert call.finished_at is not None
        assert streamed.started + deltas[0] < call.finished_at - 1.0, kind
        done = streamed.last
        assert done["ttft_ms"] < 800 and done["latency_ms"] >= 1800, (kind, done)


# -- errors ------------------------------------------------------------------------------


# "break": 3 chunks, then the connection drops; "errmid": 3 chunks, then the upstream's
# own error line (Ollama NDJSON / OpenAI SSE), whose message the error event passes on
MID_STREAM_FAULTS = {"break": "stream broke off", "errmid": "upstream overloaded"}


@pytest.mark.parametrize("fault", MID_STREAM_FAULTS)
@pytest.mark.parametrize("kind", UPSTREAM_KINDS, ids=KIND_IDS)
def test_a_stream_that_fails_mid_way_ends_with_one_error_event(
    chatd: ChatdProcess, fake: FakeUpstream, kind: Kind, fault: str
) -> None:
    streamed = stream_chat(chatd.url, kind.model(fault))

    assert_sse_headers(streamed)  # the status was settled by the first delta: 200
    assert_sse_framing(streamed)
    assert streamed.of("delta"), streamed.lines
    assert ANSWER.startswith(streamed.text) and streamed.text != ANSWER
    assert streamed.of("done") == []
    assert len(streamed.of("error")) == 1
    inner = assert_envelope(streamed.last)  # the error is the final event
    assert inner["type"] == "upstream_error", inner
    assert MID_STREAM_FAULTS[fault] in inner["message"], inner
    assert only_call(fake, kind.path)  # never retried once bytes went to the caller


def test_a_stream_that_stalls_past_the_timeout_ends_with_a_timeout_event(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    # "stall-1500": 3 pieces, then 1.5 s of silence; hangy's timeout_secs is 0.4
    streamed = stream_chat(chatd.url, "hangy/stall-1500")

    assert_sse_headers(streamed)
    assert streamed.text and streamed.of("done") == []
    inner = assert_envelope(streamed.last)
    assert inner["type"] == "upstream_timeout", inner
    assert streamed.events[-1][0] < 1.4  # cut at the timeout, not at the end of the stall
    assert only_call(fake, "/api/chat")


def expect(status: int, type_: str) -> dict[str, Any]:
    return {"status": status, "type": type_}


PRE_STREAM_ERRORS = [
    pytest.param({"model": "x:cloud"}, expect(404, "provider_not_found"), id="x:cloud"),
    pytest.param({"model": "kimi/ok"}, expect(404, "provider_not_found"), id="kimi"),
    pytest.param({"messages": []}, expect(400, "invalid_request"), id="no-messages"),
    pytest.param({"model": ""}, expect(400, "invalid_request"), id="empty-model"),
    pytest.param({"temperature": 7}, expect(400, "invalid_request"), id="bad-temperature"),
    pytest.param({"model": "opencode/ok"}, expect(503, "provider_disabled"), id="keyless"),
    pytest.param({"model": "ollama/fail-500"}, expect(502, "upstream_error"), id="ollama-500"),
    pytest.param({"model": "cloud/fail-500"}, expect(502, "upstream_error"), id="cloud-500"),
    pytest.param({"model": "openrouter/fail-500"}, expect(502, "upstream_error"), id="openai-500"),
    pytest.param({"model": "ollama/reset"}, expect(502, "upstream_error"), id="ollama-reset"),
    pytest.param({"model": "hangy/hang-3000"}, expect(504, "upstream_timeout"), id="timeout"),
]


@pytest.mark.parametrize(("override", "expected"), PRE_STREAM_ERRORS)
def test_errors_before_the_first_event_keep_their_status(
    chatd: ChatdProcess, override: dict[str, Any], expected: dict[str, Any]
) -> None:
    fields = {"messages": USER, **override}
    model = fields.pop("model", "ollama/ok")
    streamed = stream_chat(chatd.url, model, **fields)

    assert streamed.status == expected["status"], streamed.body
    assert streamed.headers["content-type"].startswith("application/json")
    assert streamed.events == []
    inner = assert_envelope(json.loads(streamed.body))
    assert inner["type"] == expected["type"], inner
    if expected["type"] == "upstream_error" and "500" in model:
        assert inner["upstream_status"] == 500


# -- the OpenAI keep-alives ----------------------------------------------------------


@pytest.mark.parametrize("behaviour", ["ok", "think", "slow-300"])
def test_openai_keepalive_comments_never_reach_the_caller(
    chatd: ChatdProcess, fake: FakeUpstream, behaviour: str
) -> None:
    payload = {"model": OPENAI.model(behaviour), "messages": USER, "stream": True}
    with httpx.Client(timeout=20, trust_env=False) as client:
        response = client.post(chatd.url + "/v1/chat", json=payload)

    assert response.status_code == 200
    raw = response.content
    assert b"OPENROUTER" not in raw and b"PROCESSING" not in raw
    assert not any(line.startswith(b":") for line in raw.split(b"\n")), raw
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert "".join(e.get("delta", "") for e in events) == ANSWER
    assert events[-1]["done"] is True
    assert only_call(fake, OPENAI.path)  # the fake did send its keep-alives (always does)


# -- a caller that goes away ---------------------------------------------------------


def read_first_delta_then_hang_up(url: str, model: str) -> float:
    """Stream `model`, read up to the first delta, close the connection; when it closed."""
    payload = {"model": model, "messages": USER, "stream": True}
    client = httpx.Client(timeout=20, trust_env=False)
    with client.stream("POST", url + "/v1/chat", json=payload) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and "delta" in json.loads(line[6:]):
                break
        else:
            pytest.fail("no delta before the stream ended")
    client.close()  # the connection is gone now, half way through the answer
    return time.monotonic()


@pytest.mark.parametrize("kind", UPSTREAM_KINDS, ids=KIND_IDS)
def test_a_caller_that_disconnects_closes_the_upstream_stream(
    chatd: ChatdProcess, fake: FakeUpstream, kind: Kind
) -> None:
    # slow-5000: one chunk every 0.5 s for 5 s, unless somebody hangs up; the fake only
    # sees a disconnect before then if chatd closes its upstream stream
    closed_at = read_first_delta_then_hang_up(chatd.url, kind.model("slow-5000"))

    [call] = fake.calls_to(kind.path)
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3.0), (
        "the upstream stream stayed open after the caller left"
    )
    assert call.disconnected_at is not None
    took = call.disconnected_at - closed_at
    assert took < 2.0, f"upstream closed {took:.2f}s after the caller left"


def test_a_stream_frees_its_concurrency_slot_however_it_ends(
    chatd: ChatdProcess, fake: FakeUpstream
) -> None:
    # `narrow` has max_concurrency = 1: a slot kept by a finished stream would turn the
    # next request into a 503 provider_overloaded after queue_timeout_secs
    broken = stream_chat(chatd.url, "narrow/break")
    assert broken.status == 200 and len(broken.of("error")) == 1
    read_first_delta_then_hang_up(chatd.url, "narrow/slow-5000")
    [call] = [c for c in fake.calls_to("/api/chat") if c.json["model"] == "slow-5000"]
    assert fake.wait_for(lambda: call.disconnected_at is not None, timeout=3.0)

    after = stream_chat(chatd.url, "narrow/ok")
    assert after.status == 200, after.body
    assert after.text == ANSWER and after.last["done"] is True


# -- mock ---------------------------------------------------------------------------------


def test_mock_streams_word_by_word(chatd: ChatdProcess, fake: FakeUpstream) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": MOCK_WORDS}]
    streamed = stream_chat(chatd.url, "mock/echo", messages=messages)

    assert_sse_headers(streamed)
    assert_sse_framing(streamed)
    words = MOCK_WORDS.split()
    assert [e["delta"].strip() for e in streamed.of("delta")] == words  # one word per event
    assert streamed.text == MOCK_WORDS
    done = streamed.last
    assert done["done"] is True and done["provider"] == "mock" and done["model"] == "echo"
    assert done["output_tokens"] == len(words)
    assert done["input_tokens"] == len(words) + 2  # all messages' words
    assert done["finish_reason"] == "stop"
    # latency_ms spreads the words: the first comes early, the whole takes ~latency_ms
    deltas = streamed.times("delta")
    assert deltas[0] < MOCK_LATENCY_MS / 1000 / 2
    assert deltas[-1] - deltas[0] >= MOCK_LATENCY_MS / 1000 * 0.5
    assert done["latency_ms"] >= MOCK_LATENCY_MS * 0.9
    assert 0 <= done["ttft_ms"] < done["latency_ms"]
    assert fake.calls == []  # no upstream at all


def test_mock_max_tokens_cuts_the_stream(chatd: ChatdProcess) -> None:
    streamed = stream_chat(
        chatd.url, "mock/echo", messages=[{"role": "user", "content": MOCK_WORDS}], max_tokens=2
    )

    assert_sse_headers(streamed)
    assert streamed.text == "alpha beta"
    assert len(streamed.of("delta")) == 2
    assert streamed.last["finish_reason"] == "length"
    assert streamed.last["output_tokens"] == 2
