"""Inbound auth (docs/operations.md), off by default.

When `[chatd] auth_tokens_env` names an environment variable holding comma-separated
tokens, every `/v1/*` route — whoever adds it — wants `Authorization: Bearer <token>`
(or `x-api-key: <token>`, as Anthropic's SDKs send it);
`/health`, `/ready` and `/metrics` stay open. The check runs in the request middleware,
by path prefix, before any route.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping

from starlette.types import Scope

from chatd.config import ConfigError, Settings
from chatd.errors import Unauthorized

PROTECTED = "/v1"
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def auth_tokens(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The accepted tokens; None when inbound auth is off."""
    name = settings.chatd.auth_tokens_env
    if not name:
        return None
    environ = os.environ if environ is None else environ
    return [token.strip() for token in environ.get(name, "").split(",") if token.strip()]


def check_auth_config(settings: Settings, environ: Mapping[str, str] | None = None) -> None:
    """Auth that is on but has no token would refuse every caller: refuse to start."""
    if auth_tokens(settings, environ) == []:
        raise ConfigError(
            f"chatd.auth_tokens_env: ${settings.chatd.auth_tokens_env} is unset or empty "
            "(it must hold comma-separated bearer tokens)"
        )


def auth_is_on(settings: Settings) -> bool:
    """Does anything ask callers who they are: bearer tokens or any configured caller?"""
    return bool(settings.chatd.auth_tokens_env) or bool(settings.chatd.callers)


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (`localhost`, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to any interface
        return False


def check_exposure(
    settings: Settings, host: str, live_callers: Callable[[], bool] = lambda: False
) -> None:
    """An open gateway on the network only when the config says so (docs/exposing.md).
    `live_callers()`: does the database hold callers made at run time (asked last)?"""
    if is_loopback(host) or auth_is_on(settings) or settings.chatd.allow_unauthenticated:
        return
    if live_callers():
        return
    raise ConfigError(
        f"refusing to serve {host} with authentication off (anyone who reaches it spends "
        'your providers\' keys): add a caller ([chatd.callers.NAME] token_env = "VAR") '
        "or [chatd] auth_tokens_env, or set [chatd] allow_unauthenticated = true"
    )


def serves_open(settings: Settings) -> bool:
    """Authentication is off because the config said so outright (/ready: "auth": "off")."""
    return settings.chatd.allow_unauthenticated and not auth_is_on(settings)


class BearerAuth:
    """`authorize(scope)`: None to let the request through, else the 401 to answer."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [token.encode() for token in tokens]

    def __call__(self, scope: Scope) -> Unauthorized | None:
        path: str = scope["path"]
        if not (path == PROTECTED or path.startswith(PROTECTED + "/")):
            return None
        header = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
            elif name == b"x-api-key":
                api_key = value.strip()
        if header is None and not api_key:
            return Unauthorized(
                "missing Authorization: Bearer <token> (or x-api-key: <token>)",
                headers=dict(CHALLENGE),
            )
        tokens = [api_key] if api_key else []
        if header is not None:
            scheme, _, token = header.strip().partition(b" ")
            token = token.strip()
            if scheme.lower() == b"bearer" and token:
                tokens.append(token)
            elif not tokens:
                return Unauthorized(
                    "Authorization must be 'Bearer <token>'", headers=dict(CHALLENGE)
                )
        if not any(self.accepts(token) for token in tokens):
            return Unauthorized("invalid token", headers=dict(CHALLENGE))
        # these tokens are the caller named "default" (no limits).
        scope.setdefault("state", {}).setdefault("log", {})["caller"] = "default"
        return None

    def accepts(self, token: bytes) -> bool:
        # Compare with every token, so the time taken says nothing about which one matched.
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(known, token)
        return matched


def presented_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """`Authorization: Bearer <token>`, else `x-api-key: <token>`."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            if scheme.lower() == b"bearer" and token:
                return token
        elif name == b"x-api-key":
            api_key = value.strip() or None
    return api_key
