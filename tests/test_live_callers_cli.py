"""`chatd callers …` as an operator runs it: the first admin made with no server, then
`list`, `update`, `rotate` and `revoke` against the database a running server uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.support import REPO, ChatdProcess, clean_env
from tests.test_live_callers_e2e import SEEN_WITHIN, chat, config, within


def cli(tmp_path: Path, db: str, *args: str) -> subprocess.CompletedProcess[str]:
    config_path = tmp_path / "cli.toml"
    config_path.write_text(config(db))
    return subprocess.run(
        [sys.executable, "-m", "chatd", "callers", "--config", str(config_path), *args],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
    )  # fmt: skip


def token_of(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_first_admin_without_a_server_then_changes_a_running_server_sees(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    root = token_of(cli(tmp_path, db, "create", "root", "--admin"))
    assert root.startswith("ck-")
    refused = cli(tmp_path, db, "create", "Team")
    assert refused.returncode == 2 and "name:" in refused.stderr
    assert "rpm:" in cli(tmp_path, db, "create", "team", "--rpm", "-1").stderr

    gw = ChatdProcess(config(db), tmp_path, env={"CHATD_TEST_ADMIN": "x-unused"}).start()
    try:
        listed = httpx.get(
            gw.url + "/admin/callers", headers={"Authorization": f"Bearer {root}"}, timeout=10
        )
        assert listed.status_code == 200  # the CLI's admin is an admin of the server
        team = token_of(cli(tmp_path, db, "create", "team", "--rpm", "50", "--metadata", "team=a"))
        within(SEEN_WITHIN, lambda: chat(gw, team).status_code == 200)  # root made /v1 guarded

        assert cli(tmp_path, db, "update", "team", "--models", "hot").returncode == 0
        within(SEEN_WITHIN, lambda: chat(gw, team).status_code == 403)
        assert chat(gw, team, "hot").status_code == 200

        second = token_of(cli(tmp_path, db, "rotate", "team"))
        within(SEEN_WITHIN, lambda: chat(gw, second, "hot").status_code == 200)
        listing = cli(tmp_path, db, "list")
        assert listing.returncode == 0 and "team" in listing.stdout and "root" in listing.stdout
        for token in (root, team, second):
            assert token not in listing.stdout and token.split("-")[1] in listing.stdout

        first_id = team.split("-")[1]
        assert cli(tmp_path, db, "revoke", "team", "--token", first_id).returncode == 0
        within(SEEN_WITHIN, lambda: chat(gw, team, "hot").status_code == 401)
        assert chat(gw, second, "hot").status_code == 200
        assert cli(tmp_path, db, "revoke", "team").returncode == 0
        within(SEEN_WITHIN, lambda: chat(gw, second, "hot").status_code == 401)
        assert cli(tmp_path, db, "revoke", "team").returncode == 1  # nothing left to revoke
    finally:
        gw.stop()
