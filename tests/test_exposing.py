"""Exposed safely (docs/exposing.md): which binds need authentication, the defaults, and
the answers the server writes itself."""

from __future__ import annotations

import pickle

import orjson
import pytest

from chatd.config import ConfigError
from chatd.errors import Overloaded
from chatd.server import Doorway, raw_response
from chatd.state.auth import auth_is_on, check_exposure, is_loopback, serves_open
from tests.support import make_settings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "chatd.internal"])
def test_hosts_others_can_reach(host: str) -> None:
    assert not is_loopback(host)


def test_an_open_bind_needs_authentication_or_the_flag() -> None:
    with pytest.raises(ConfigError, match="allow_unauthenticated = true"):
        check_exposure(make_settings(), "0.0.0.0")
    check_exposure(make_settings(), "127.0.0.1")
    check_exposure(make_settings(allow_unauthenticated=True), "0.0.0.0")
    check_exposure(make_settings(auth_tokens_env="TOKENS"), "0.0.0.0")
    check_exposure(make_settings(callers={"app": {"token_env": "APP"}}), "::")


def test_auth_is_on_with_tokens_or_any_caller() -> None:
    assert not auth_is_on(make_settings())
    assert auth_is_on(make_settings(auth_tokens_env="TOKENS"))
    assert auth_is_on(make_settings(callers={"app": {"token_env": "APP"}}))
    assert serves_open(make_settings(allow_unauthenticated=True))
    assert not serves_open(make_settings(allow_unauthenticated=True, auth_tokens_env="T"))


def test_the_defaults() -> None:
    chatd = make_settings().chatd
    assert chatd.allow_unauthenticated is False
    assert (chatd.header_timeout_secs, chatd.keep_alive_secs) == (10, 5)
    assert (chatd.max_connections, chatd.max_header_bytes) == (4096, 65536)


def test_a_raw_answer_is_the_error_envelope() -> None:
    raw = raw_response(Overloaded("full", headers={"Retry-After": "1"}))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert {b"retry-after: 1", b"connection: close", b"content-length: %d" % len(body)} <= set(
        lines
    )
    assert orjson.loads(body)["error"]["type"] == "overloaded"
    assert b"x-should-retry: true" in lines  # docs/errors.md


def test_a_doorway_travels_to_workers_without_its_process_state() -> None:
    doorway = Doorway.from_settings(make_settings(max_connections=7), registry=object())
    copy = pickle.loads(pickle.dumps(doorway.protocol())).keywords["doorway"]
    assert copy.max_connections == 7 and copy._registry is None
    assert copy.tick == 1.0  # header_timeout_secs 10: checked every second
