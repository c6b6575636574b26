"""Embeddings (docs/http-api.md): wire formats against literal dicts, and the route over ASGI
(validation, base64, batching and reassembly, bad upstream answers)."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import httpx
import orjson
import pytest
import respx

from chatd.app import create_app
from chatd.errors import InvalidRequest, UpstreamError
from chatd.providers.mock import mock_embedding
from chatd.providers.ollama import parse_ollama_embed, to_ollama_embed_body
from chatd.providers.openai import parse_openai_embed, to_openai_embed_body
from chatd.routing.registry import Registry
from tests.support import make_settings

OLLAMA = "http://ollama.test"
VENDOR = "http://vendor.test/v1"


def provider(name: str = "ollama") -> Any:
    settings = make_settings({"ollama": {"kind": "ollama", "base_url": OLLAMA}})
    return Registry.from_settings(settings).providers[name]


def decode(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# -- wire formats ---------------------------------------------------------------------


def test_ollama_embed_body() -> None:
    assert to_ollama_embed_body(["a", "b"], "nomic-embed-text", None) == {
        "model": "nomic-embed-text",
        "input": ["a", "b"],
        "truncate": True,
    }
    assert to_ollama_embed_body(["a"], "m", 256) == {
        "model": "m",
        "input": ["a"],
        "truncate": True,
        "dimensions": 256,
    }


def test_ollama_embed_answer_is_read() -> None:
    data = {"model": "m", "embeddings": [[0.5, -0.25], [1, 0]], "prompt_eval_count": 7}
    result = parse_ollama_embed(provider(), data, 2)
    assert result.vectors == [[0.5, -0.25], [1, 0]]
    assert result.input_tokens == 7


@pytest.mark.parametrize(
    ("embeddings", "says"),
    [
        ([[0.1, 0.2]], "answered 1 vectors for 2 inputs"),
        ([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], "answered 3 vectors for 2 inputs"),
        ([[0.1, 0.2], [0.3]], "different lengths"),
        ([[0.1, 0.2], ["x", 0.4]], "non-numbers"),
        ([[0.1, 0.2], [[0.3], 0.4]], "non-numbers"),
        ([[0.1, 0.2], []], "not a vector"),
        (None, "answered no vectors for 2 inputs"),
    ],
)
def test_a_wrong_ollama_embed_answer_is_a_502(embeddings: Any, says: str) -> None:
    data = {"embeddings": embeddings}
    for raw in (b"", orjson.dumps(data)):  # with the answer's bytes too: the same checks
        with pytest.raises(UpstreamError) as caught:
            parse_ollama_embed(provider(), data, 2, raw)
        assert caught.value.status == 502
        assert says in caught.value.message


def test_openai_embed_body_is_the_callers_but_for_model_input_and_floats() -> None:
    body = {
        "model": "vendor/text-embedding-3-small",
        "input": ["a", "b", "c"],
        "encoding_format": "base64",
        "dimensions": 64,
        "user": "u-1",
    }
    assert to_openai_embed_body(body, ["b", "c"], "text-embedding-3-small") == {
        "model": "text-embedding-3-small",
        "input": ["b", "c"],
        "encoding_format": "float",
        "dimensions": 64,
        "user": "u-1",
    }
    assert body["input"] == ["a", "b", "c"]  # the caller's body is not changed


def test_openai_embed_answer_is_read_in_index_order() -> None:
    data = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]},
            {"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
        ],
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    result = parse_openai_embed(provider(), data, 2)
    assert result.vectors == [[1.0, 0.0], [0.0, 1.0]]
    assert result.input_tokens == 5


def test_openai_embed_answer_in_base64_is_decoded() -> None:
    packed = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 0.25)).decode()
    data = {"data": [{"index": 0, "embedding": packed}]}
    assert parse_openai_embed(provider(), data, 1).vectors == [[0.5, -1.0, 0.25]]


@pytest.mark.parametrize(
    "data",
    [
        {"data": [{"index": 0, "embedding": [0.1]}]},
        {"data": [{"index": 0, "embedding": [0.1]}, {"index": 1, "embedding": [0.1, 0.2]}]},
        {"data": "nope"},
        {"data": [{"index": 0, "embedding": "not base64!"}, {"index": 1, "embedding": [1.0]}]},
        # a vector of lists, answered as if it were numbers: not flattened, refused
        {"data": [{"index": 0, "embedding": [[0.5]]}, {"index": 1, "embedding": [[1.0]]}]},
        ["not", "an", "object"],
    ],
)
def test_a_wrong_openai_embed_answer_is_a_502(data: Any) -> None:
    for raw in (b"", orjson.dumps(data)):
        with pytest.raises(UpstreamError):
            parse_openai_embed(provider(), data, 2, raw)


# -- the vectors' own text, sent as it came ---------------------------------------------


def test_ollama_vectors_keep_their_own_text() -> None:
    raw = b'{"model":"m", "embeddings" : [ [0.5, -2.5E-3,1e+2] ,[ 1,0,-0.0 ] ],"x":1}'
    result = parse_ollama_embed(provider(), orjson.loads(raw), 2, raw)
    assert result.vectors == [[0.5, -0.0025, 100.0], [1, 0, -0.0]]
    assert result.texts == [b"[0.5, -2.5E-3,1e+2]", b"[ 1,0,-0.0 ]"]
    assert [orjson.loads(text) for text in result.texts] == result.vectors


def test_openai_vectors_keep_their_own_text_in_index_order() -> None:
    raw = (
        b'{"object":"list","model":"\\"embedding\\":[9]","data":['
        b'{"object":"embedding","index":1,"embedding":[0.25,0.75]},'
        b'{"object":"embedding","index":0,"embedding": [1.5, -1]}]}'
    )
    result = parse_openai_embed(provider(), orjson.loads(raw), 2, raw)
    assert result.vectors == [[1.5, -1], [0.25, 0.75]]
    assert result.texts == [b"[1.5, -1]", b"[0.25,0.75]"]


@pytest.mark.parametrize(
    "raw",
    [
        # a vector answered in base64 has no text of numbers: the floats are sent
        b'{"data":[{"index":0,"embedding":"AAAAPw=="},{"index":1,"embedding":[1.0]}]}',
        # a second "embedding" key with a list, somewhere else: not certainly the vectors
        b'{"data":[{"index":0,"embedding":[0.5]},{"index":1,"embedding":[1.0]}],'
        b'"meta":{"embedding":[2.0]}}',
    ],
)
def test_vectors_whose_text_is_not_certain_are_formatted_again(raw: bytes) -> None:
    result = parse_openai_embed(provider(), orjson.loads(raw), 2, raw)
    assert result.texts is None
    assert len(result.vectors) == 2


def test_vector_texts_are_used_only_when_certainly_the_vectors() -> None:
    from chatd.providers.base import vector_texts

    def texts(raw: bytes, key: str = "embeddings") -> list[bytes] | None:
        data = orjson.loads(raw)  # the vectors as parsed, as the providers pass them
        if key == "embeddings":
            return vector_texts(raw, key, data[key], nested=True)
        return vector_texts(raw, key, [d[key] for d in data["data"]])

    assert texts(b'{"embeddings":[[1,2,3]]}') == [b"[1,2,3]"]
    assert texts(b'{"m":"embeddings","embeddings":[[1],[2]]}') == [b"[1]", b"[2]"]
    assert texts(b'{"embeddings":[[1,true]]}') is None  # not numbers only
    assert texts(b'{"embeddings":[[1,null]]}') is None
    assert texts(b'{"embeddings":[[1,2]],"x":{"embeddings":[3]}}') is None  # a second key
    assert texts(b'{"data":[{"embedding":"AAAAPw=="}]}', "embedding") is None  # base64
    assert texts(b'{"data":[{"embedding":[[1]]}]}', "embedding") is None  # too deep
    assert texts(b'{"embeddings":[[[1]]]}') is None
    assert texts(b'{"data":[{"embedding":[0.5]},{"embedding":[1]}]}', "embedding") == [
        b"[0.5]",
        b"[1]",
    ]


def test_mock_embedding_is_a_deterministic_unit_vector() -> None:
    first = mock_embedding("hello world")
    assert first == mock_embedding("hello world")
    assert first != mock_embedding("hello worlds")
    assert len(first) == 8
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-6)
    assert len(mock_embedding("x", 300)) == 300
    # float32-exact: a base64 round trip gives the same numbers back
    assert list(struct.unpack("<8f", struct.pack("<8f", *first))) == first


# -- the route --------------------------------------------------------------------------


def mock_settings(**chatd: Any) -> Any:
    return make_settings(
        {
            "ollama": {"kind": "ollama", "base_url": OLLAMA, "embed_batch": 3, "max_retries": 0},
            "echo": {"kind": "mock", "embed_batch": 4},
            "vendor": {"kind": "openai", "base_url": VENDOR, "key_env": "NO_SUCH_KEY_ENV"},
        },
        models={"emb": "echo/any"},
        default_provider="ollama",
        **chatd,
    )


async def post(app_client: Any, body: Any, settings: Any = None, **kw: Any) -> httpx.Response:
    async with app_client(settings or mock_settings()) as client:
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return await client.post("/v1/embeddings", content=content, **kw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "emb", "input": []}, "input"),
        ({"model": "emb", "input": ""}, "input"),
        ({"model": "emb", "input": ["a", ""]}, "input[1]"),
        ({"model": "emb", "input": ["x"] * 2049}, "input"),
        ({"model": "emb", "input": [1, 2, 3]}, "input"),
        ({"model": "emb", "input": [[1, 2], [3]]}, "input"),
        ({"model": "emb", "input": ["a", None]}, "input[1]"),
        ({"model": "emb", "input": {"text": "a"}}, "input"),
        ({"model": "emb"}, "input"),
        ({"input": "a"}, "model"),
        ({"model": "  ", "input": "a"}, "model"),
        ({"model": 3, "input": "a"}, "model"),
        ({"model": "emb", "input": "a", "dimensions": "8"}, "dimensions"),
        ({"model": "emb", "input": "a", "dimensions": 1.5}, "dimensions"),
        ({"model": "emb", "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": "emb", "input": "a", "dimensions": True}, "dimensions"),
        ({"model": "emb", "input": "a", "dimensions": 10**9}, "dimensions"),
        ({"model": "emb", "input": "a", "encoding_format": "hex"}, "encoding_format"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    app_client: Any, body: dict[str, Any], param: str
) -> None:
    response = await post(app_client, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["param"] == param


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"'])
async def test_a_body_that_is_not_a_json_object_is_a_400(app_client: Any, raw: bytes) -> None:
    response = await post(app_client, raw)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"


async def test_a_body_over_max_body_bytes_is_a_413(app_client: Any) -> None:
    body = {"model": "emb", "input": ["word " * 100] * 10}
    response = await post(app_client, body, mock_settings(max_body_bytes=2000))
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "payload_too_large"


async def test_a_string_gets_one_embedding_in_the_openai_shape(app_client: Any) -> None:
    response = await post(app_client, {"model": "emb", "input": "hello there world", "user": "x"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": mock_embedding("hello there world")}
        ],
        "model": "any",
        "usage": {"prompt_tokens": 3, "total_tokens": 3},
    }
    assert response.headers["x-chatd-provider"] == "echo"
    assert response.headers["x-chatd-attempts"] == "1"


async def test_base64_is_little_endian_float32_of_the_float_answer(app_client: Any) -> None:
    inputs = ["one", "two words", "three more words"]
    floats = await post(app_client, {"model": "emb", "input": inputs})
    packed = await post(app_client, {"model": "emb", "input": inputs, "encoding_format": "base64"})
    assert packed.status_code == 200
    as_floats = [item["embedding"] for item in floats.json()["data"]]
    as_base64 = [decode(item["embedding"]) for item in packed.json()["data"]]
    assert as_base64 == as_floats
    assert all(isinstance(item["embedding"], str) for item in packed.json()["data"])


async def test_dimensions_sizes_the_mock_vectors(app_client: Any) -> None:
    response = await post(app_client, {"model": "emb", "input": ["a", "b"], "dimensions": 24})
    assert [len(item["embedding"]) for item in response.json()["data"]] == [24, 24]


async def test_batches_are_reassembled_in_input_order(app_client: Any) -> None:
    inputs = [f"input number {i}" for i in range(10)]  # mock embed_batch 4: 4 + 4 + 2
    response = await post(app_client, {"model": "emb", "input": inputs})
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(10))
    assert [item["embedding"] for item in data] == [mock_embedding(t) for t in inputs]
    assert response.json()["usage"]["prompt_tokens"] == 30
    assert response.headers["x-chatd-attempts"] == "3"


def ollama_embed(request: httpx.Request) -> httpx.Response:
    """A respx stand-in for /api/embed: [len(text), position] per input."""
    body = orjson.loads(request.content)
    vectors = [[float(len(text)), float(i)] for i, text in enumerate(body["input"])]
    return httpx.Response(200, json={"embeddings": vectors, "prompt_eval_count": len(vectors)})


@respx.mock
async def test_float_vectors_go_out_as_the_upstream_wrote_them(app_client: Any) -> None:
    answer = b'{"embeddings":[[1e-3, 2.50,-0]],"prompt_eval_count":2}'
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(200, content=answer))
    response = await post(app_client, {"model": "nomic", "input": "hi there"})
    assert response.status_code == 200, response.text
    assert b'"embedding":[1e-3, 2.50,-0]' in response.content
    assert response.json()["data"][0]["embedding"] == [0.001, 2.5, 0]
    packed = await post(app_client, {"model": "nomic", "input": "hi", "encoding_format": "base64"})
    assert decode(packed.json()["data"][0]["embedding"]) == pytest.approx([0.001, 2.5, 0])


@respx.mock
async def test_an_ollama_request_is_split_by_embed_batch(app_client: Any) -> None:
    route = respx.post(f"{OLLAMA}/api/embed").mock(side_effect=ollama_embed)
    inputs = ["a" * n for n in range(1, 8)]  # embed_batch 3: 3 + 3 + 1
    response = await post(app_client, {"model": "nomic", "input": inputs, "dimensions": 2})
    assert response.status_code == 200, response.text
    sent = [orjson.loads(call.request.content) for call in route.calls]
    assert sorted(len(body["input"]) for body in sent) == [1, 3, 3]
    assert all(body["dimensions"] == 2 and body["truncate"] is True for body in sent)
    assert all(body["model"] == "nomic" for body in sent)
    data = response.json()["data"]
    assert [item["embedding"][0] for item in data] == [float(n) for n in range(1, 8)]
    assert response.json()["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ({"embeddings": [[0.1, 0.2]]}, "answered 1 vectors for 2 inputs"),
        ({"embeddings": [[0.1, 0.2], [0.3]]}, "different lengths"),
    ],
)
@respx.mock
async def test_wrong_or_ragged_vectors_are_a_502(app_client: Any, answer: Any, says: str) -> None:
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(200, json=answer))
    response = await post(app_client, {"model": "nomic", "input": ["a", "b"]})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["type"] == "upstream_error"
    assert says in error["message"]


@respx.mock
async def test_batches_of_different_lengths_are_a_502(app_client: Any) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        inputs = orjson.loads(request.content)["input"]
        width = 2 if inputs[0] == "first" else 3  # the first batch disagrees with the rest
        return httpx.Response(200, json={"embeddings": [[0.5] * width for _ in inputs]})

    respx.post(f"{OLLAMA}/api/embed").mock(side_effect=answer)
    response = await post(app_client, {"model": "nomic", "input": ["first", "b", "c", "d"]})
    assert response.status_code == 502
    assert "different lengths" in response.json()["error"]["message"]


@respx.mock
async def test_one_failed_batch_fails_the_request(app_client: Any) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        inputs = orjson.loads(request.content)["input"]
        if "bad" in inputs:
            return httpx.Response(500, json={"error": "boom"})
        return ollama_embed(request)

    respx.post(f"{OLLAMA}/api/embed").mock(side_effect=answer)
    inputs = ["a", "b", "c", "d", "bad", "f"]
    response = await post(app_client, {"model": "nomic", "input": inputs})
    assert response.status_code == 502
    assert response.json()["error"]["upstream_status"] == 500
    assert "data" not in response.json()


@respx.mock
async def test_a_fallback_with_a_smaller_embed_batch_gets_the_batch_in_pieces(
    app_client: Any,
) -> None:
    settings = make_settings(
        {
            "ollama": {"kind": "ollama", "base_url": OLLAMA, "embed_batch": 4, "max_retries": 0},
            "small": {"kind": "ollama", "base_url": "http://small.test", "embed_batch": 2},
        },
        models={"emb": ["ollama/big", "small/little"]},
    )
    respx.post(f"{OLLAMA}/api/embed").mock(return_value=httpx.Response(503, json={"error": "x"}))
    small = respx.post("http://small.test/api/embed").mock(side_effect=ollama_embed)
    inputs = ["a", "bb", "ccc", "dddd"]
    response = await post(app_client, {"model": "emb", "input": inputs}, settings)
    assert response.status_code == 200, response.text
    assert [len(orjson.loads(c.request.content)["input"]) for c in small.calls] == [2, 2]
    assert [item["embedding"][0] for item in response.json()["data"]] == [1.0, 2.0, 3.0, 4.0]
    assert response.json()["model"] == "little"


async def test_an_unknown_provider_is_a_404(app_client: Any) -> None:
    response = await post(app_client, {"model": "x:cloud", "input": "a"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "provider_not_found"


async def test_admission_runs_after_parsing_when_installed(app_client: Any) -> None:
    seen: list[str] = []
    settings = mock_settings()
    app = create_app(settings)

    async def admit(request: Any, model: str) -> None:
        seen.append(model)
        if model == "refused":
            raise InvalidRequest("not for you", param="model")

    app.state.admit = admit
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://chatd") as client:
            ok = await client.post("/v1/embeddings", json={"model": "emb", "input": "a"})
            refused = await client.post("/v1/embeddings", json={"model": "refused", "input": "a"})
    assert ok.status_code == 200
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "not for you"
    assert seen == ["emb", "refused"]


async def test_the_route_is_in_the_openapi_document(app_client: Any) -> None:
    async with app_client(mock_settings()) as client:
        doc = (await client.get("/openapi.json")).json()
    operation = doc["paths"]["/v1/embeddings"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["required"] == ["model", "input"]
    assert schema["properties"]["input"]["anyOf"][1]["maxItems"] == 2048
    assert schema["properties"]["encoding_format"]["anyOf"][0]["enum"] == ["float", "base64"]
    for status in ("200", "400", "404", "413", "502", "503", "504"):
        assert status in operation["responses"]


@respx.mock
async def test_ollama_cloud_embeds_through_api_embed_with_its_key(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUD_EMBED_KEY", "cloud-secret")
    settings = make_settings(
        {
            "ollama": {"kind": "ollama", "base_url": OLLAMA},
            "ollama_cloud": {
                "kind": "ollama_cloud",
                "base_url": "http://cloud.test",
                "key_env": "CLOUD_EMBED_KEY",
            },
        }
    )
    route = respx.post("http://cloud.test/api/embed").mock(side_effect=ollama_embed)
    response = await post(app_client, {"model": "embeddinggemma:cloud", "input": "abc"}, settings)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "embeddinggemma"
    assert response.json()["data"][0]["embedding"] == [3.0, 0.0]
    request = route.calls[0].request
    assert request.headers["authorization"] == "Bearer cloud-secret"
    assert orjson.loads(request.content) == {
        "model": "embeddinggemma",
        "input": ["abc"],
        "truncate": True,
    }
