"""Who may use `/admin/*` (docs/live-callers.md): a caller with `admin = true`, or the
operator's token in the variable `[chatd] admin_token_env` names. One check for every
admin route."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping

from starlette.types import Scope

from chatd.config import ConfigError, Settings
from chatd.errors import Forbidden, Unauthorized
from chatd.state.auth import CHALLENGE, presented_token
from chatd.state.caller import Caller
from chatd.state.callers import DEFAULT_CALLER, Callers

OPERATOR = "admin_token"  # the name the audit trail gives the `admin_token_env` token


def admin_token(settings: Settings, environ: Mapping[str, str] | None = None) -> bytes | None:
    """The operator's token; None when `admin_token_env` is not set. Refuses to start
    when it names a variable that is empty (every admin call would be refused)."""
    name = settings.chatd.admin_token_env
    if not name:
        return None
    environ = os.environ if environ is None else environ
    token = environ.get(name, "").strip()
    if not token:
        raise ConfigError(f"chatd.admin_token_env: ${name} is unset or empty")
    return token.encode()


class AdminAuth:
    """`check(scope)` → the admin's name for the audit trail, or raises 401 / 403."""

    def __init__(self, callers: Callers | None, operator_token: bytes | None) -> None:
        self.callers = callers
        self.operator_token = operator_token

    def check(self, scope: Scope) -> str:
        token = presented_token(scope["headers"])
        if token is None:
            raise Unauthorized(
                "missing Authorization: Bearer <admin token>", headers=dict(CHALLENGE)
            )
        if self.operator_token is not None and hmac.compare_digest(token, self.operator_token):
            name = OPERATOR
        else:
            caller = self.callers.identify(token) if self.callers is not None else None
            if caller is None:
                raise Unauthorized("invalid token", headers=dict(CHALLENGE))
            if not caller.admin or is_bearer_default(caller):
                raise Forbidden(f"caller {caller.name} is not an admin")
            name = caller.name
        scope.setdefault("state", {}).setdefault("log", {})["caller"] = name
        return name


def is_bearer_default(caller: Caller) -> bool:
    """`auth_tokens_env`'s tokens (the `default` caller): inbound auth, never an admin's."""
    return caller.name == DEFAULT_CALLER and caller.source == "config"
