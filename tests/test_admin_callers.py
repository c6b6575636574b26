"""`/admin/callers` answers, in process: who may call it (401, 403), what it refuses
(400 naming the field for each bad value, 404, 409 caller_exists / config_caller /
no_database), and the audit trail."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatd.state.callers_store import open_store
from tests.support import make_settings

ADMIN = "adm-in-process-5e2a"
CONFIG_TOKEN = "tok-config-root-8c1d"


@pytest.fixture
def settings_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.setenv("CHATD_TEST_ADMIN", ADMIN)
    monkeypatch.setenv("CHATD_TEST_ROOT", CONFIG_TOKEN)

    def build(usage_db: str | None = None) -> Any:
        return make_settings(
            providers={"mock": {"kind": "mock"}},
            default_provider="mock",
            usage_db=f"sqlite:///{tmp_path / 'usage.sqlite3'}" if usage_db is None else usage_db,
            admin_token_env="CHATD_TEST_ADMIN",
            callers={"root": {"token_env": "CHATD_TEST_ROOT", "admin": True}},
        )

    return build


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


BAD = [
    ({"name": "Team"}, "name"),
    ({"name": "-team"}, "name"),
    ({"name": "t" * 65}, "name"),
    ({"name": "t", "rpm": -1}, "rpm"),
    ({"name": "t", "tpm": -5}, "tpm"),
    ({"name": "t", "budget_usd": -0.5}, "budget_usd"),
    ({"name": "t", "max_concurrency": -1}, "max_concurrency"),
    ({"name": "t", "rpm": "5"}, "rpm"),
    ({"name": "t", "budget_period": "year"}, "budget_period"),
    ({"name": "t", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "t", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
    ({"name": "t", "expires_at": "2030-01-01T00:00:00"}, "expires_at"),
    ({"name": "t", "metadata": {"team": {"nested": "x"}}}, "metadata.team"),
    ({"name": "t", "metadata": {"n": 1}}, "metadata.n"),
    ({"name": "t", "metadata": ["team"]}, "metadata"),
    ({"name": "t", "models": []}, "models"),
    ({"name": "t", "admin": "yes"}, "admin"),
    ({"name": "t", "colour": "red"}, "colour"),
    ({"rpm": 1}, "name"),
]


@pytest.mark.parametrize(("body", "param"), BAD)
async def test_a_bad_value_is_a_400_naming_its_field(
    app_client: Any, settings_for: Callable[..., Any], body: dict[str, Any], param: str
) -> None:
    async with app_client(settings_for()) as client:
        answer = await client.post("/admin/callers", json=body, headers=bearer(ADMIN))
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["type"] == "invalid_request" and error["param"] == param
        assert error["message"].startswith(param)


async def test_who_may_call_admin_and_what_it_refuses(
    app_client: Any, settings_for: Callable[..., Any], tmp_path: Path
) -> None:
    async with app_client(settings_for()) as client:
        assert (await client.get("/admin/callers")).status_code == 401
        wrong = await client.get("/admin/callers", headers=bearer("nope"))
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "unauthorized"
        made = await client.post(
            "/admin/callers", json={"name": "team", "rpm": 5}, headers=bearer(CONFIG_TOKEN)
        )
        assert made.status_code == 201  # an admin caller from the config file may
        team = made.json()["token"]
        refused = await client.get("/admin/callers", headers=bearer(team))
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "forbidden"

        again = await client.post("/admin/callers", json={"name": "team"}, headers=bearer(ADMIN))
        assert (again.status_code, again.json()["error"]["type"]) == (409, "caller_exists")
        clash = await client.post("/admin/callers", json={"name": "root"}, headers=bearer(ADMIN))
        assert (clash.status_code, clash.json()["error"]["type"]) == (409, "caller_exists")
        for method, path in [
            ("PATCH", "/admin/callers/root"),
            ("POST", "/admin/callers/root/tokens"),
            ("DELETE", "/admin/callers/root"),
        ]:
            answer = await client.request(method, path, json={"rpm": 1}, headers=bearer(ADMIN))
            assert (answer.status_code, answer.json()["error"]["type"]) == (409, "config_caller")
        for method, path in [
            ("GET", "/admin/callers/ghost"),
            ("PATCH", "/admin/callers/ghost"),
            ("POST", "/admin/callers/ghost/tokens"),
            ("DELETE", "/admin/callers/ghost"),
            ("DELETE", "/admin/callers/team/tokens/ffffffffffff"),
        ]:
            answer = await client.request(method, path, json={"rpm": 1}, headers=bearer(ADMIN))
            assert (answer.status_code, answer.json()["error"]["type"]) == (404, "not_found")
        empty = await client.patch("/admin/callers/team", json={}, headers=bearer(ADMIN))
        assert empty.status_code == 400
        bad = await client.patch("/admin/callers/team", json={"rpm": None}, headers=bearer(ADMIN))
        assert (bad.status_code, bad.json()["error"]["param"]) == (400, "rpm")

        changed = await client.patch(
            "/admin/callers/team", json={"disabled": True, "metadata": {"owner": "ana"}},
            headers=bearer(ADMIN),
        )  # fmt: skip
        assert changed.json()["state"] == "disabled"
        chat = {"model": "mock/x", "messages": [{"role": "user", "content": "hi"}]}
        assert (await client.post("/v1/chat", json=chat, headers=bearer(team))).status_code == 401
        listed = (await client.get("/admin/callers", headers=bearer(ADMIN))).json()["callers"]
        assert {(c["name"], c["source"]) for c in listed} == {("root", "config"), ("team", "live")}
        detail = await client.get("/admin/callers/root", headers=bearer(ADMIN))
        assert detail.json()["source"] == "config" and "spend_usd" in detail.json()

    store = open_store(f"sqlite:///{tmp_path / 'usage.sqlite3'}")
    trail = await store.audit_trail()
    await store.aclose()
    assert [(r["admin"], r["action"], r["target"]) for r in trail][::-1] == [
        ("root", "create", "team"),
        ("admin_token", "update", "team"),
    ]
    assert trail[0]["fields"] == {"disabled": True, "metadata": {"owner": "ana"}}
    assert trail[0]["time"] <= time.time()
    assert team not in str(trail) and ADMIN not in str(trail)


async def test_without_a_database_the_caller_routes_answer_409(
    app_client: Any, settings_for: Callable[..., Any]
) -> None:
    async with app_client(settings_for(usage_db="")) as client:
        assert (await client.get("/admin/callers")).status_code == 401  # auth comes first
        for method, path in [("GET", "/admin/callers"), ("POST", "/admin/callers")]:
            answer = await client.request(method, path, json={"name": "x"}, headers=bearer(ADMIN))
            assert (answer.status_code, answer.json()["error"]["type"]) == (409, "no_database")


def test_an_empty_admin_token_variable_refuses_to_start(tmp_path: Path) -> None:
    from chatd.cli import main

    config = tmp_path / "c.toml"
    config.write_text('[chatd]\nadmin_token_env = "CHATD_TEST_EMPTY_ADMIN"\n')
    os.environ.pop("CHATD_TEST_EMPTY_ADMIN", None)
    assert main(["check-config", "--config", str(config)]) == 2


async def test_auth_tokens_env_tokens_are_never_an_admins(
    app_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATD_TEST_BEARER", "bearer-only-token-4b1c")
    settings = make_settings(
        providers={"mock": {"kind": "mock"}},
        default_provider="mock",
        usage_db=f"sqlite:///{tmp_path / 'usage.sqlite3'}",
        auth_tokens_env="CHATD_TEST_BEARER",
    )
    async with app_client(settings) as client:
        token = bearer("bearer-only-token-4b1c")
        refused = await client.get("/admin/callers", headers=token)
        assert (refused.status_code, refused.json()["error"]["type"]) == (403, "forbidden")
        assert (await client.get("/ui/api/overview", headers=token)).status_code == 200
