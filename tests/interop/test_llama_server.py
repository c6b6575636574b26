"""chatd in front of llama.cpp's own llama-server: errors a client can act on, and answers
that come through exactly (docs/errors.md). Run by scripts/interop.sh, which builds the
server, writes a tiny model and starts the servers; skipped otherwise."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.support import ChatdProcess, provider_toml

CHAT = os.environ.get("CHATD_INTEROP_CHAT_URL", "")  # n_ctx CHATD_INTEROP_CTX, keyed
SMALL = os.environ.get("CHATD_INTEROP_SMALL_URL", "")  # the same model, a smaller context
EMBED = os.environ.get("CHATD_INTEROP_EMBED_URL", "")  # --embeddings, one slot
KEY = os.environ.get("CHATD_INTEROP_KEY", "")
WRONG_KEY = "sk-wrong-gateway-key-never-shown"
CONTEXT = int(os.environ.get("CHATD_INTEROP_CTX", "512"))

pytestmark = pytest.mark.skipif(
    not (CHAT and SMALL and EMBED and KEY), reason="interop kit: run scripts/interop.sh"
)

USER = [{"role": "user", "content": "Say hello to the gateway."}]
TOO_LONG = [{"role": "user", "content": "hello world " * (CONTEXT * 2)}]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def chatd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    config = (
        '[models]\nroomy = ["small/tiny", "llama/tiny"]\n\n'
        + provider_toml("llama", "openai", CHAT + "/v1", key_env="LLAMA_KEY")
        + provider_toml("small", "openai", SMALL + "/v1", key_env="LLAMA_KEY")
        + provider_toml("wrongkey", "openai", CHAT + "/v1", key_env="WRONG_KEY")
        + provider_toml("embed", "openai", EMBED + "/v1", embed_batch=2)
    )
    env = {"LLAMA_KEY": KEY, "WRONG_KEY": WRONG_KEY}
    process = ChatdProcess(config, tmp_path_factory.mktemp("interop"), env=env).start(60)
    try:
        yield process
        assert KEY not in process.log() and WRONG_KEY not in process.log()
    finally:
        process.stop()


class Counter:
    """Counts the requests an SDK sends (its retries included), through a hook on the
    SDK's own HTTP client."""

    def __init__(self, sdk: Any) -> None:
        self.sent = 0
        self.client = sdk.DefaultHttpxClient(event_hooks={"request": [self.count]})

    def count(self, request: Any) -> None:
        self.sent += 1


def direct(body: dict[str, Any]) -> dict[str, Any]:
    """The server's own answer, asked without chatd."""
    answer = httpx.post(
        CHAT + "/v1/chat/completions",
        json={"model": "tiny", "temperature": 0, "max_tokens": MAX_TOKENS, **body},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


# -- errors a client can act on --------------------------------------------------------


def test_an_overflow_is_the_openai_sdks_bad_request_after_one_request(
    chatd: ChatdProcess,
) -> None:
    http = Counter(openai)
    client = openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused", http_client=http.client)
    assert client.max_retries == 2  # the SDK's retries left on
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="llama/tiny", messages=TOO_LONG, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    message = caught.value.body["message"]  # type: ignore[index]
    assert message.startswith("llama: ") and message.endswith("(upstream 400)")
    assert re.search(rf"\d+ tokens.*\b{CONTEXT}\b", message), message  # the sizes, in words
    assert "{" not in message
    assert http.sent == 1  # the SDK did not retry ...
    assert caught.value.response.headers["x-chatd-attempts"] == "1"  # ... nor did chatd
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_an_overflow_is_the_anthropic_sdks_bad_request_after_one_request(
    chatd: ChatdProcess,
) -> None:
    http = Counter(anthropic)
    client = anthropic.Anthropic(base_url=chatd.url, api_key="unused", http_client=http.client)
    assert client.max_retries == 2
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="llama/tiny", max_tokens=4, messages=TOO_LONG)
    body = caught.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert re.search(rf"\d+ tokens.*\b{CONTEXT}\b", body["error"]["message"])
    assert http.sent == 1
    assert caught.value.response.headers["x-chatd-attempts"] == "1"


def test_a_rejected_parameter_is_a_400_naming_it(chatd: ChatdProcess) -> None:
    client = openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="llama/tiny",
            messages=USER,
            max_tokens=4,
            response_format={"type": "bogus"},  # type: ignore[typeddict-item]
        )
    assert "response_format" in caught.value.message
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_a_refused_gateway_key_is_a_502_naming_the_provider_never_the_key(
    chatd: ChatdProcess,
) -> None:
    answer = httpx.post(
        chatd.url + "/v1/chat/completions",
        json={"model": "wrongkey/tiny", "messages": USER, "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 502
    assert answer.headers["x-should-retry"] == "false"
    error = answer.json()["error"]
    assert error["message"] == "wrongkey: Invalid API Key (upstream 401)"
    assert error["upstream_status"] == 401
    assert WRONG_KEY not in answer.text and KEY not in answer.text


def test_the_native_route_answers_502_with_upstream_status_and_code(chatd: ChatdProcess) -> None:
    answer = httpx.post(
        chatd.url + "/v1/chat",
        json={"model": "llama/tiny", "messages": TOO_LONG, "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 502
    assert answer.headers["x-should-retry"] == "false"
    error = answer.json()["error"]
    assert error["type"] == "upstream_error"
    assert (error["upstream_status"], error["upstream_code"]) == (400, "context_length_exceeded")


def test_a_list_alias_whose_first_target_overflows_is_served_by_the_roomier_one(
    chatd: ChatdProcess,
) -> None:
    # ~340 tokens: over the small server's context (a quarter of CONTEXT, which
    # llama-server rounds up to 256), under the big one's.
    prompt = [{"role": "user", "content": "hello world " * (CONTEXT // 16)}]
    answer = httpx.post(
        chatd.url + "/v1/chat/completions",
        json={"model": "roomy", "messages": prompt, "max_tokens": 4},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-chatd-provider"] == "llama"
    assert answer.headers["x-chatd-attempts"] == "2"


# -- answers that come through exactly ---------------------------------------------------


@pytest.fixture(scope="module")
def own() -> dict[str, Any]:
    """The server's own answer at temperature 0: content and token counts."""
    answer = direct({"messages": USER})
    usage = answer["usage"]
    content = answer["choices"][0]["message"]["content"]
    assert content  # the tiny model always says something
    return {"content": content, "in": usage["prompt_tokens"], "out": usage["completion_tokens"]}


def test_the_native_stream_equals_the_servers_answer(
    chatd: ChatdProcess, own: dict[str, Any]
) -> None:
    body = {"model": "llama/tiny", "messages": USER, "max_tokens": MAX_TOKENS, "stream": True}
    events = []
    with httpx.stream("POST", chatd.url + "/v1/chat", json=body, timeout=60) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    text = "".join(e.get("delta", "") for e in events)
    done = events[-1]
    assert text == own["content"]
    assert (done["input_tokens"], done["output_tokens"]) == (own["in"], own["out"])


def test_the_openai_sdk_stream_with_usage_equals_the_servers_answer(
    chatd: ChatdProcess, own: dict[str, Any]
) -> None:
    client = openai.OpenAI(base_url=chatd.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model="llama/tiny",
        messages=USER,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == own["content"]
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (own["in"], own["out"])


def test_the_anthropic_sdk_stream_equals_the_servers_answer(
    chatd: ChatdProcess, own: dict[str, Any]
) -> None:
    client = anthropic.Anthropic(base_url=chatd.url, api_key="unused")
    with client.messages.stream(
        model="llama/tiny",
        max_tokens=MAX_TOKENS,
        messages=USER,
        extra_body={"temperature": 0},  # this SDK's signature no longer names it
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == own["content"]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (own["in"], own["out"])


def test_embeddings_split_by_embed_batch_equal_the_servers_vectors_in_order(
    chatd: ChatdProcess,
) -> None:
    texts = ["hello world", "the quick brown fox", "river stone", "a", "green tree water"]
    singles = [
        httpx.post(EMBED + "/v1/embeddings", json={"model": "tiny", "input": t}, timeout=60).json()
        for t in texts
    ]
    answer = httpx.post(
        chatd.url + "/v1/embeddings", json={"model": "embed/tiny", "input": texts}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    for got, single in zip(body["data"], singles, strict=True):
        assert got["embedding"] == single["data"][0]["embedding"]
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert answer.headers["x-chatd-attempts"] == "3"  # five inputs, two per upstream call


def test_an_embedding_input_over_the_servers_batch_is_a_400_naming_input(
    chatd: ChatdProcess,
) -> None:
    answer = httpx.post(
        chatd.url + "/v1/embeddings",
        json={"model": "embed/tiny", "input": ["hello world " * CONTEXT]},
        timeout=60,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert answer.headers["x-should-retry"] == "false"
