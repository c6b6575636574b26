"""The published contract tells the truth, checked against a real chatd:

- a client generated from the served `/openapi.json` by openapi-python-client (without
  warnings) makes a chat and gets an error parsed into the envelope type;
- an unreachable upstream is described in plain words naming its host;
- every line chatd writes on stderr is JSON, uvicorn's start-up and shutdown included.
(`tests/test_fuzz.py` runs every schemathesis check over every route.)
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ChatdProcess, free_port, provider_toml

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def chatd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatdProcess]:
    dead = free_port()  # nothing listens here
    config = (
        '[chatd]\ndefault_provider = "echo"\n'
        + provider_toml("echo", "mock")
        + provider_toml("dead", "ollama", f"http://127.0.0.1:{dead}", max_retries=0)
    )
    with ChatdProcess(config, tmp_path_factory.mktemp("contract")) as process:
        yield process


@pytest.fixture(scope="module")
def client_package(chatd: ChatdProcess, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """openapi-python-client's client for the document chatd serves, imported."""
    generator = shutil.which("openapi-python-client", path=str(VENV_BIN))
    assert generator, "openapi-python-client is a test dependency"
    out = tmp_path_factory.mktemp("generated")
    spec = out / "openapi.json"
    spec.write_bytes(httpx.get(chatd.url + "/openapi.json", timeout=10).content)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [generator, "generate", "--path", str(spec), "--meta", "none",
         "--output-path", str(out / "chatd_client")],
        cwd=out, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "warning" not in output.lower(), output
    assert "unable to" not in output.lower(), output
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("chatd_client")
    finally:
        sys.path.remove(str(out))


def test_generated_client_chats(chatd: ChatdProcess, client_package: Any) -> None:
    from chatd_client.api.default import chat  # type: ignore[import-not-found]
    from chatd_client.models import (  # type: ignore[import-not-found]
        ChatRequest,
        ChatResponse,
        Message,
        MessageRole,
    )

    client = client_package.Client(base_url=chatd.url)
    body = ChatRequest(
        model="echo/any", messages=[Message(role=MessageRole.USER, content="hello generated")]
    )
    response = chat.sync_detailed(client=client, body=body)
    assert response.status_code == 200
    assert isinstance(response.parsed, ChatResponse)
    assert response.parsed.content == "hello generated"
    assert response.parsed.provider == "echo"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("model", "status", "error_type"),
    [("nowhere:cloud", 404, "provider_not_found"), ("   ", 400, "invalid_request")],
)
def test_generated_client_parses_errors_into_the_envelope(
    chatd: ChatdProcess, client_package: Any, model: str, status: int, error_type: str
) -> None:
    from chatd_client.api.default import chat  # type: ignore[import-not-found]
    from chatd_client.models import (  # type: ignore[import-not-found]
        ChatRequest,
        ErrorResponse,
        Message,
        MessageRole,
    )

    client = client_package.Client(base_url=chatd.url)
    body = ChatRequest(model=model, messages=[Message(role=MessageRole.USER, content="hi")])
    response = chat.sync_detailed(client=client, body=body)
    assert response.status_code == status
    assert isinstance(response.parsed, ErrorResponse)
    assert response.parsed.error.type_ == error_type
    assert response.parsed.error.code == error_type
    assert response.parsed.error.param == "model"


def test_generated_client_sends_messages(chatd: ChatdProcess, client_package: Any) -> None:
    """`POST /v1/messages` through the generated client: blocks in, an `AnthropicMessage`
    out; and an error parsed into the `AnthropicError` type (docs/http-api.md)."""
    from chatd_client.api.default import create_message  # type: ignore[import-not-found]
    from chatd_client.models import (  # type: ignore[import-not-found]
        AnthropicError,
        AnthropicMessage,
        MessagesRequest,
        TextBlock,
        TextBlockParam,
        UserMessageParam,
    )

    client = client_package.Client(base_url=chatd.url)
    turn = UserMessageParam(role="user", content=[TextBlockParam(type_="text", text="hi there")])
    body = MessagesRequest(model="echo/any", max_tokens=16, messages=[turn])
    response = create_message.sync_detailed(client=client, body=body)
    assert response.status_code == 200, response.content
    assert isinstance(response.parsed, AnthropicMessage)
    assert response.parsed.role == "assistant" and response.parsed.stop_reason == "end_turn"
    assert [type(block) for block in response.parsed.content] == [TextBlock]
    assert response.parsed.content[0].text == "hi there"

    body = MessagesRequest(model="nowhere:cloud", max_tokens=16, messages=[turn])
    response = create_message.sync_detailed(client=client, body=body)
    assert response.status_code == 404
    assert isinstance(response.parsed, AnthropicError)
    assert response.parsed.error.type_ == "not_found_error"


def test_unreachable_upstream_is_named_in_plain_words(chatd: ChatdProcess) -> None:
    body = {"model": "dead/m", "messages": [{"role": "user", "content": "hi"}]}
    response = httpx.post(chatd.url + "/v1/chat", json=body, timeout=10)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    port = chatd.config_path.read_text().split("http://127.0.0.1:")[1].split('"')[0]
    assert message == f"dead: could not reach upstream: connection refused by 127.0.0.1:{port}"
    for internal in ("ssl:default", "aiohttp", "httpx", "Cannot connect", "Errno", "Connect call"):
        assert internal not in message


def test_every_stderr_line_is_json_uvicorn_included(tmp_path: Path) -> None:
    config = '[chatd]\ndefault_provider = "echo"\n' + provider_toml("echo", "mock")
    process = ChatdProcess(config, tmp_path).start()
    try:
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(process.url + "/v1/chat", json=body, timeout=10).status_code == 200
        assert httpx.get(process.url + "/nowhere", timeout=10).status_code == 404
        process.signal(signal.SIGTERM)
        assert process.proc is not None and process.proc.wait(15) == 0
    finally:
        process.stop()
    lines = process.log().splitlines()
    parsed = [json.loads(line) for line in lines]  # any plain-text line fails here
    messages = [entry.get("message", "") for entry in parsed]
    assert any(m.startswith("Started server process") for m in messages), messages
    assert any(m.startswith("Uvicorn running on") for m in messages), messages
    assert "Shutting down" in messages and any(m.startswith("Finished server") for m in messages)
    assert {entry.get("logger") for entry in parsed if "message" in entry} >= {"uvicorn.error"}
    requests = [(e["route"], e["status"]) for e in parsed if "status" in e]
    requests = [request for request in requests if request[0] != "/health"]
    assert requests == [("/v1/chat", 200), ("/nowhere", 404)]
