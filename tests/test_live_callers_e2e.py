"""Live callers against real chatd processes sharing one database: a key made through
`/admin` works at once where it was made and within 2 s on another replica (polling the
database, or pushed through a real Redis), rotation, revocation, limits changed live,
budgets, allow-lists and expiry, the ledger kept after revocation, and a restart."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_server import RedisServer
from tests.support import ChatdProcess

ADMIN = "adm-planted-operator-7c1e9b"
SEEN_WITHIN = 2.0
WRONG = "ck-000000000000-0000"


def config(usage_db: str, redis_url: str = "") -> str:
    redis = f'redis_url = "{redis_url}"\n' if redis_url else ""
    return f"""
[models]
hot = "mock/hot"

[chatd]
default_provider = "mock"
usage_db = "{usage_db}"
admin_token_env = "CHATD_TEST_ADMIN"
{redis}
[chatd.providers.mock]
kind = "mock"

[chatd.prices]
"mock/*" = {{ input = 1000000.0, output = 1000000.0 }}
"""


def admin(gw: ChatdProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    return httpx.request(method, gw.url + path, headers=headers, timeout=10, **kw)


def chat(gw: ChatdProcess, token: str | None, model: str = "mock/x") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(gw.url + "/v1/chat", json=body, headers=headers, timeout=10)


def within(seconds: float, check: Callable[[], bool]) -> float:
    """How long `check` took to hold (polled); fails the test past `seconds`."""
    began = time.monotonic()
    while not check():
        assert time.monotonic() - began < seconds, f"not within {seconds}s"
        time.sleep(0.05)
    return time.monotonic() - began


def knows(gw: ChatdProcess, token: str) -> bool:
    """The replica has read the caller: its token passes and a wrong one does not (a
    replica that knows no caller at all leaves /v1 open)."""
    return chat(gw, token).status_code == 200 and chat(gw, WRONG).status_code == 401


def create(gw: ChatdProcess, name: str, **fields: Any) -> str:
    made = admin(gw, "POST", "/admin/callers", json={"name": name, **fields})
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    return str(made.json()["token"])


def replicas(tmp_path: Path, redis_url: str = "") -> tuple[ChatdProcess, ChatdProcess]:
    db = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    env = {"CHATD_TEST_ADMIN": ADMIN}
    one = ChatdProcess(config(db, redis_url), tmp_path, env=env).start()
    try:
        two = ChatdProcess(config(db, redis_url), tmp_path, env=env).start()
    except Exception:
        one.stop()
        raise
    return one, two


@pytest.mark.parametrize("shared", ["database", "redis"])
def test_keys_are_issued_rotated_and_revoked_across_replicas(tmp_path: Path, shared: str) -> None:
    redis = RedisServer(tmp_path).start() if shared == "redis" else None
    one, two = replicas(tmp_path, f"redis://127.0.0.1:{redis.port}/0" if redis else "")
    try:
        assert chat(one, None).status_code == 200  # no caller yet: /v1 is open
        token = create(one, "team-a", metadata={"team": "a"})
        assert chat(one, token).status_code == 200  # at once, where it was made
        assert chat(one, None).status_code == 401  # and now /v1 wants a token
        within(SEEN_WITHIN, lambda: knows(two, token))

        rotated = admin(two, "POST", "/admin/callers/team-a/tokens")
        assert rotated.status_code == 201
        new, new_id = rotated.json()["token"], rotated.json()["token_id"]
        assert chat(two, new).status_code == chat(two, token).status_code == 200
        within(SEEN_WITHIN, lambda: chat(one, new).status_code == 200)
        assert chat(one, token).status_code == 200  # the old one still works

        old_id = next(t["id"] for t in rotated.json()["caller"]["tokens"] if t["id"] != new_id)
        gone = admin(one, "DELETE", f"/admin/callers/team-a/tokens/{old_id}")
        assert gone.status_code == 200 and [t["id"] for t in gone.json()["tokens"]] == [new_id]
        assert chat(one, token).status_code == 401
        within(SEEN_WITHIN, lambda: chat(two, token).status_code == 401)
        assert chat(two, new).status_code == 200

        assert admin(two, "DELETE", "/admin/callers/team-a").json()["state"] == "revoked"
        assert chat(two, new).status_code == 401
        within(SEEN_WITHIN, lambda: chat(one, new).status_code == 401)
        assert chat(one, None).status_code == 401  # revoking the last caller opens nothing
        listed = admin(one, "GET", "/admin/callers").json()["callers"]
        assert [(c["name"], c["state"]) for c in listed] == [("team-a", "revoked")]
    finally:
        one.stop()
        two.stop()
        if redis is not None:
            redis.stop()


def test_limits_changed_live_hold_and_survive_a_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    env = {"CHATD_TEST_ADMIN": ADMIN}
    gw = ChatdProcess(config(db), tmp_path, env=env).start()
    try:
        fast = create(gw, "fast", rpm=100)
        assert chat(gw, fast).status_code == 200
        lowered = admin(gw, "PATCH", "/admin/callers/fast", json={"rpm": 2})
        assert lowered.status_code == 200 and lowered.json()["rpm"] == 2
        answers = [chat(gw, fast) for _ in range(2)]  # the window already holds 1
        assert [a.status_code for a in answers] == [200, 429]
        assert answers[1].json()["error"]["type"] == "rate_limited"

        # A mock answer to "hi" is 1 token in and 1 out: $2 at these prices.
        spender = create(gw, "spender", budget_usd=3.0, models=["hot", "mock/x"])
        assert [chat(gw, spender).status_code for _ in range(3)] == [200, 200, 429]
        assert chat(gw, spender, "mock/other").json()["error"]["param"] == "model"
        assert chat(gw, spender, "hot").status_code == 429  # allowed, but over budget

        soon = datetime.fromtimestamp(time.time() + 1.5, UTC).isoformat()
        brief = create(gw, "brief", expires_at=soon)
        assert chat(gw, brief).status_code == 200
        within(4.0, lambda: chat(gw, brief).status_code == 401)

        assert admin(gw, "DELETE", "/admin/callers/fast").status_code == 200
        usage = httpx.get(
            gw.url + "/v1/usage?group_by=caller",
            headers={"Authorization": f"Bearer {spender}"},
            timeout=10,
        )
        assert usage.json()["rows"][0]["caller"] == "spender"
        root = create(gw, "root", admin=True)
        gw.stop()

        gw = ChatdProcess(config(db), tmp_path, env=env).start()
        assert chat(gw, spender).status_code == 429  # its spend read back: still over
        assert chat(gw, fast).status_code == 401  # revoked stays revoked
        everyone = httpx.get(
            gw.url + "/v1/usage?group_by=caller",
            headers={"Authorization": f"Bearer {root}"},
            timeout=10,
        ).json()
        rows = {row["caller"]: row for row in everyone["rows"]}
        assert rows["fast"]["requests"] == 3  # a revoked caller's rows stay, and count
        assert rows["spender"]["cost_usd"] == 4.0
        detail = admin(gw, "GET", "/admin/callers/spender").json()
        assert detail["spend_usd"] == 4.0 and detail["source"] == "live"
    finally:
        gw.stop()
