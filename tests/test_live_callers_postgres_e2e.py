"""Live callers on a real PostgreSQL shared by two chatd processes: a key made on one works
on the other within 2 s; with the server killed, both keep authenticating from memory
and admin writes answer 503; when it returns, writes work and replicas catch up."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.servers import PostgresServer
from tests.support import ChatdProcess
from tests.test_callers_store import empty_postgres
from tests.test_live_callers_e2e import (
    ADMIN,
    SEEN_WITHIN,
    WRONG,
    admin,
    chat,
    config,
    create,
    knows,
    within,
)


def test_postgres_down_keeps_auth_from_memory_and_refuses_writes(
    pg: PostgresServer, tmp_path: Path
) -> None:
    asyncio.run(empty_postgres(pg.dsn))
    env = {"CHATD_TEST_ADMIN": ADMIN}
    one = ChatdProcess(config(pg.dsn), tmp_path, env=env).start()
    two = ChatdProcess(config(pg.dsn), tmp_path, env=env).start()
    try:
        token = create(one, "team-pg", rpm=1000)
        assert chat(one, token).status_code == 200
        within(SEEN_WITHIN, lambda: knows(two, token))

        pg.kill()
        for gw in (one, two):
            assert chat(gw, token).status_code == 200  # from memory
            assert chat(gw, WRONG).status_code == 401
        refused = admin(one, "POST", "/admin/callers", json={"name": "late"})
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "database_unavailable"
        patch = admin(two, "PATCH", "/admin/callers/team-pg", json={"rpm": 5})
        assert patch.status_code == 503
        assert admin(two, "GET", "/admin/callers").status_code == 200  # reads from memory

        pg.start()
        late = within(15.0, lambda: admin(one, "POST", "/admin/callers",
                                          json={"name": "late"}).status_code == 201)  # fmt: skip
        assert late < 15.0
        listed = admin(one, "GET", "/admin/callers/late").json()
        assert listed["state"] == "active"
        assert admin(two, "DELETE", "/admin/callers/team-pg").status_code == 200
        within(SEEN_WITHIN, lambda: chat(one, token).status_code == 401)
    finally:
        one.stop()
        two.stop()
    assert "Traceback" not in one.log() + two.log()
    assert token not in one.log() + two.log()
