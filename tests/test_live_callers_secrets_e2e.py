"""Live tokens never leak: tokens are planted, used (the official `openai` SDK among
others), rotated and revoked against a real chatd; then every output is read — the log,
the database files (ledger, callers, audit), `/admin` lists, `/ui`, `/metrics`, the CLI's
`list` — and no full token is anywhere but the one answer that issued it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import openai

from tests.support import ChatdProcess
from tests.test_live_callers_cli import cli, token_of
from tests.test_live_callers_e2e import ADMIN, admin, chat, config, create


def test_tokens_appear_only_where_they_are_issued(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    db = f"sqlite:///{path}"
    root = token_of(cli(tmp_path, db, "create", "root", "--admin"))
    gw = ChatdProcess(config(db), tmp_path, env={"CHATD_TEST_ADMIN": ADMIN}).start()
    outputs: dict[str, str] = {}
    try:
        team = create(gw, "team", metadata={"owner": "ana"}, models=["mock/*"])
        rotated = admin(gw, "POST", "/admin/callers/team/tokens").json()
        second = rotated["token"]
        tokens = [root, team, second, ADMIN]

        sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=second, max_retries=0)
        answer = sdk.chat.completions.create(
            model="mock/x", messages=[{"role": "user", "content": "hello there"}]
        )
        assert answer.choices[0].message.content == "hello there"
        denied = openai.OpenAI(base_url=gw.url + "/v1", api_key=team + "x", max_retries=0)
        try:
            denied.chat.completions.create(
                model="mock/x", messages=[{"role": "user", "content": "x"}]
            )
            raise AssertionError("a wrong token was let in")
        except openai.AuthenticationError as exc:
            assert team not in str(exc)
        assert chat(gw, team).status_code == 200
        assert chat(gw, team, "hot").status_code == 403
        x_api_key = {"x-api-key": team}
        assert httpx.post(gw.url + "/v1/chat", headers=x_api_key, timeout=10,
                          json={"model": "mock/x", "messages": [{"role": "user", "content": "a"}]}
                          ).status_code == 200  # fmt: skip
        assert chat(gw, root).status_code == 200

        first_id = team.split("-")[1]
        assert admin(gw, "DELETE", f"/admin/callers/team/tokens/{first_id}").status_code == 200
        assert chat(gw, team).status_code == 401
        assert admin(gw, "PATCH", "/admin/callers/team", json={"rpm": 7}).status_code == 200

        as_root = {"Authorization": f"Bearer {root}"}
        outputs["admin list"] = admin(gw, "GET", "/admin/callers").text
        outputs["admin one"] = admin(gw, "GET", "/admin/callers/team").text
        outputs["ui"] = httpx.get(gw.url + "/ui/api/overview", headers=as_root, timeout=10).text
        outputs["metrics"] = httpx.get(gw.url + "/metrics", timeout=10).text
        outputs["usage"] = httpx.get(gw.url + "/v1/usage", headers=as_root, timeout=10).text
        assert '"name":"team"' in outputs["ui"] and "ana" in outputs["admin one"]
        assert admin(gw, "DELETE", "/admin/callers/team").status_code == 200
        outputs["cli list"] = cli(tmp_path, db, "list").stdout
    finally:
        gw.stop()
    outputs["log"] = gw.log()
    for file in tmp_path.glob("usage.sqlite3*"):  # the database and its WAL
        outputs[file.name] = file.read_bytes().decode("latin-1")
    with sqlite3.connect(path) as conn:
        for table in ("chatd_usage", "chatd_callers", "chatd_caller_tokens", "chatd_audit"):
            outputs[table] = repr(conn.execute(f"SELECT * FROM {table}").fetchall())
    assert "create" in outputs["chatd_audit"] and "revoke_token" in outputs["chatd_audit"]
    assert "team" in outputs["chatd_usage"]
    for name, text in outputs.items():
        for token in tokens:
            assert token not in text, f"a token in {name}"
            if token.startswith("ck-"):
                assert token.rsplit("-", 1)[-1] not in text, f"a token's secret in {name}"
