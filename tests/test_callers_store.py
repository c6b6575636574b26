"""The live callers' store: one suite, run on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from chatd.errors import CallerExists
from chatd.state.callers_store import CallerStore, open_store
from tests.servers import PostgresServer


async def empty_postgres(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for table in ("chatd_callers", "chatd_caller_tokens", "chatd_audit"):
            await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CallerStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    else:
        server: PostgresServer = request.getfixturevalue("pg")
        await empty_postgres(server.dsn)
        url = server.dsn
    opened = open_store(url)
    await opened.open()
    await opened.open()  # a second start finds the schema there
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_create_keeps_only_the_hash_and_reads_back(store: CallerStore) -> None:
    record, token = await store.create("team-a", {"rpm": 5, "metadata": {"team": "a"}}, "root")
    assert token.startswith(f"ck-{record.tokens[0].id}-")
    read = await store.get("team-a")
    assert read is not None
    assert read.fields["rpm"] == 5 and read.fields["metadata"] == {"team": "a"}
    assert read.fields["models"] == ["*"] and read.fields["admin"] is False
    assert [t.hash for t in read.tokens] == [hashlib.sha256(token.encode()).hexdigest()]
    assert token not in str(read.describe())
    with pytest.raises(CallerExists):
        await store.create("team-a", {}, "root")


async def test_update_rotate_revoke_and_the_audit_trail(store: CallerStore) -> None:
    await store.create("team-b", {"budget_usd": 2.5}, "root")
    since = time.time() - 0.001
    changed = await store.update("team-b", {"rpm": 1, "models": ["hot"]}, "root")
    assert changed is not None and changed.fields["rpm"] == 1
    assert changed.fields["models"] == ["hot"] and changed.fields["budget_usd"] == 2.5
    assert await store.update("nobody", {"rpm": 1}, "root") is None

    rotated = await store.add_token("team-b", "root")
    assert rotated is not None
    record, token = rotated
    assert len(record.tokens) == 2
    first = record.tokens[0].id
    assert await store.revoke_token("team-b", "nope", "root") is None
    after = await store.revoke_token("team-b", first, "root")
    assert after is not None and [t.id for t in after.tokens] == [record.tokens[1].id]

    assert [r.name for r in await store.changed_since(since)] == ["team-b"]
    gone = await store.revoke("team-b", "root")
    assert gone is not None and gone.state == "revoked" and gone.tokens == []
    assert await store.revoke("team-b", "root") is None  # once
    assert await store.add_token("team-b", "root") is None
    with pytest.raises(CallerExists):  # a revoked name is not reused
        await store.create("team-b", {}, "root")

    trail = await store.audit_trail()
    assert [row["action"] for row in trail][::-1] == [
        "create", "update", "rotate", "revoke_token", "revoke",
    ]  # fmt: skip
    assert all(row["admin"] == "root" and row["target"] == "team-b" for row in trail)
    assert trail[-2]["fields"] == {"models": ["hot"], "rpm": 1}
    assert token not in str(trail)


async def test_changed_since_reads_many_callers_with_their_tokens(store: CallerStore) -> None:
    for i in range(30):
        await store.create(f"c{i}", {"expires_at": time.time() + 3600}, "cli")
    everything = await store.changed_since(0)
    assert len(everything) == 30
    assert all(len(r.tokens) == 1 and r.caller() is not None for r in everything)
    assert await store.changed_since(time.time() + 1) == []


async def test_a_change_always_stamps_later_than_the_last_even_from_a_slower_clock(
    store: CallerStore,
) -> None:
    await store.create("skewed", {}, "root")
    ahead = time.time() + 100  # made by a replica whose clock runs 100 s ahead
    async with store.transaction() as tx:
        await tx.execute("UPDATE chatd_callers SET changed_at = ? WHERE name = ?", ahead, "skewed")
    changed = await store.update("skewed", {"rpm": 3}, "root")
    assert changed is not None and changed.changed_at > ahead
