"""The usage ledger on a real PostgreSQL server, end to end: a chatd process writing to
it, the server killed mid-run twice (rows wait in memory, land when it is back, and a
SIGTERM right after it returns writes them before exit), spend read back at start, and
`chatd usage` reading the database directly."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from tests.fakes.upstream import FakeUpstream
from tests.servers import PostgresServer
from tests.support import ChatdProcess, clean_env
from tests.test_callers_e2e import auth, chat, config_for, env
from tests.test_usage_ledger import empty_postgres


def count(dsn: str) -> int:
    async def ask() -> int:
        conn = await asyncpg.connect(dsn)
        try:
            return int(await conn.fetchval("SELECT COUNT(*) FROM chatd_usage"))
        finally:
            await conn.close()

    return asyncio.run(ask())


def wait_count(dsn: str, expected: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        seen = count(dsn)
        if seen >= expected:
            return seen
        time.sleep(0.2)
    return seen


def test_postgres_ledger_survives_the_server_dying_and_chatd_stopping(
    fake: FakeUpstream, pg: PostgresServer, tmp_path: Path
) -> None:
    asyncio.run(empty_postgres(pg.dsn))
    config = config_for(fake, pg.dsn)
    gw = ChatdProcess(config, tmp_path, env=env()).start()
    try:
        assert chat(gw, headers=auth("spender")).status_code == 200
        assert chat(gw, headers=auth("spender")).status_code == 200  # crosses $0.03
        for _ in range(3):
            assert chat(gw, headers=auth("other")).status_code == 200
        assert wait_count(pg.dsn, 5) == 5

        pg.kill()  # gone mid-run: chatd keeps serving, rows wait in memory
        for _ in range(10):
            assert chat(gw, headers=auth("other")).status_code == 200
        unavailable = gw_usage(gw)
        assert unavailable.status_code == 503
        assert unavailable.json()["error"]["type"] == "usage_unavailable"
        pg.start()
        assert wait_count(pg.dsn, 15) == 15  # they land by themselves

        pg.kill()
        for _ in range(10):
            assert chat(gw, headers=auth("other")).status_code == 200
        pg.start()
        assert gw.stop() == 0  # SIGTERM at once: buffered rows are written before exit
    finally:
        gw.stop()
    assert count(pg.dsn) == 25
    assert "no such" not in gw.log()

    with ChatdProcess(config, tmp_path, env=env()) as again:  # spend read back at start
        refused = chat(again, headers=auth("spender"))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "budget_exceeded"

    config_path = tmp_path / "usage.toml"
    config_path.write_text(config)
    shown = subprocess.run(
        [sys.executable, "-m", "chatd", "usage", "--config", str(config_path),
         "--group-by", "caller,provider"],
        capture_output=True, text=True, timeout=30, env=clean_env(**env()),
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = [line.split()[:3] for line in shown.stdout.splitlines()[2:]]
    assert ["other", "ollama", "23"] in lines
    assert ["spender", "ollama", "2"] in lines and ["spender", "-", "1"] in lines  # refused
    assert lines[-1][:2] == ["total", "26"]


def gw_usage(gw: ChatdProcess):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.get(gw.url + "/v1/usage", headers=auth("root"), timeout=30)
