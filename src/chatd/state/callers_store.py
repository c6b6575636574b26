"""Live callers in the database (docs/live-callers.md), beside the ledger: the records, the tokens
(only their SHA-256 is kept), the audit trail, and the SQL both back ends run.

`CallerStore` holds every statement; a back end gives it `transaction()` and `fetch()`
(state/callers_sqlite.py, state/callers_pg.py). `open_store(url)` picks one by URL.
Every write is one transaction with its audit row, and one log line.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from chatd.errors import CallerExists
from chatd.state.caller_fields import rfc3339
from chatd.state.callers import Caller, token_hash

log = logging.getLogger("chatd")

TOKEN_PREFIX = "ck-"
FIELDS = (
    "models", "rpm", "tpm", "budget_usd", "budget_period", "max_concurrency", "admin",
    "expires_at", "metadata", "disabled",
)  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "models": ["*"], "rpm": 0, "tpm": 0, "budget_usd": 0.0, "budget_period": "month",
    "max_concurrency": 0, "admin": False, "expires_at": None, "metadata": {}, "disabled": False,
}  # fmt: skip
JSON_FIELDS = ("models", "metadata")
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS chatd_callers (
  name TEXT PRIMARY KEY, models TEXT NOT NULL, rpm BIGINT NOT NULL, tpm BIGINT NOT NULL,
  budget_usd DOUBLE PRECISION NOT NULL, budget_period TEXT NOT NULL,
  max_concurrency BIGINT NOT NULL, admin BOOLEAN NOT NULL, expires_at DOUBLE PRECISION,
  metadata TEXT NOT NULL, disabled BOOLEAN NOT NULL, created_at DOUBLE PRECISION NOT NULL,
  changed_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS chatd_callers_changed ON chatd_callers (changed_at)",
    """CREATE TABLE IF NOT EXISTS chatd_caller_tokens (
  id TEXT PRIMARY KEY, caller TEXT NOT NULL, hash TEXT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS chatd_caller_tokens_caller ON chatd_caller_tokens (caller)",
    """CREATE TABLE IF NOT EXISTS chatd_audit (
  time DOUBLE PRECISION NOT NULL, admin TEXT NOT NULL, action TEXT NOT NULL,
  target TEXT NOT NULL, fields TEXT NOT NULL)""",
]
INSERT_TOKEN = "INSERT INTO chatd_caller_tokens (id, caller, hash, created_at) VALUES (?, ?, ?, ?)"
CHUNK = 500  # names per `IN (...)` when reading many callers' tokens


def new_token() -> tuple[str, str]:
    """(id, token): `ck-<id>-<secret>`; the id is public, the secret 160 random bits."""
    token_id = secrets.token_hex(6)
    return token_id, f"{TOKEN_PREFIX}{token_id}-{secrets.token_hex(20)}"


def hash_hex(token: str) -> str:
    return token_hash(token.encode()).hex()


@dataclass(slots=True)
class TokenRecord:
    id: str
    hash: str  # hex SHA-256 of the whole token
    created_at: float


@dataclass(slots=True)
class LiveRecord:
    """One row of `chatd_callers` with its unrevoked tokens."""

    name: str
    fields: dict[str, Any]
    created_at: float
    changed_at: float
    revoked_at: float | None = None
    tokens: list[TokenRecord] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.fields["disabled"]:
            return "disabled"
        expires = self.fields["expires_at"]
        return "expired" if expires is not None and expires <= time.time() else "active"

    def caller(self, any_state: bool = False) -> Caller | None:
        """The caller requests are checked against; None while it may not call (unless
        `any_state`: its limits, for showing its spend)."""
        if not any_state and (self.revoked_at is not None or self.fields["disabled"]):
            return None
        f = self.fields
        return Caller(
            name=self.name,
            models=tuple(f["models"]),
            rpm=f["rpm"],
            tpm=f["tpm"],
            budget_usd=f["budget_usd"],
            budget_period=f["budget_period"],
            max_concurrency=f["max_concurrency"],
            admin=f["admin"],
            source="live",
            expires_at=f["expires_at"] or 0.0,
        )

    def hashes(self) -> list[bytes]:
        return [bytes.fromhex(token.hash) for token in self.tokens]

    def describe(self) -> dict[str, Any]:
        """As `/admin/callers` and `chatd callers list` show it: never a token or hash."""
        return {
            "name": self.name,
            "source": "live",
            "state": self.state,
            **{k: v for k, v in self.fields.items() if k != "expires_at"},
            "expires_at": rfc3339(self.fields["expires_at"]),
            "created_at": rfc3339(self.created_at),
            "revoked_at": rfc3339(self.revoked_at),
            "tokens": [
                {"id": token.id, "created_at": rfc3339(token.created_at)} for token in self.tokens
            ],
        }


class Tx(Protocol):
    """One transaction's statements; SQL is written with `?` placeholders."""

    async def execute(self, sql: str, *args: Any) -> int: ...

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...


class CallerStore:
    """The statements; a back end supplies `transaction()`, `fetch()`, `open()`, `aclose()`."""

    url = ""
    lock_row = ""  # PostgreSQL: " FOR UPDATE" (SQLite's writers already take turns)

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def open(self) -> None:
        async with self.transaction() as tx:
            for statement in SCHEMA:
                await tx.execute(statement)

    async def aclose(self) -> None:
        return None

    # -- writes: each one transaction with its audit row ---------------------------------

    async def create(self, name: str, fields: dict[str, Any], admin: str) -> tuple[LiveRecord, str]:
        """A new caller and its first token; returns the record and the token (shown once)."""
        values = {**DEFAULTS, **fields}
        token_id, token = new_token()
        now = time.time()
        async with self.transaction() as tx:
            if await tx.fetch("SELECT name FROM chatd_callers WHERE name = ?", name):
                raise CallerExists(f"caller {name} exists", param="name")
            columns = ", ".join(("name", *FIELDS, "created_at", "changed_at"))
            marks = ", ".join("?" * (len(FIELDS) + 3))
            await tx.execute(
                f"INSERT INTO chatd_callers ({columns}) VALUES ({marks})",
                name, *(stored(k, values[k]) for k in FIELDS), now, now,
            )  # fmt: skip
            await tx.execute(
                INSERT_TOKEN,
                token_id, name, hash_hex(token), now,
            )  # fmt: skip
            await audit(tx, now, admin, "create", name, {**fields, "token_id": token_id})
        record = LiveRecord(name, values, now, now, None, [TokenRecord(token_id, "", now)])
        record.tokens[0].hash = hash_hex(token)
        return record, token

    async def update(self, name: str, fields: dict[str, Any], admin: str) -> LiveRecord | None:
        """Change some fields of an unrevoked caller; None when there is none of that name."""
        async with self.transaction() as tx:
            now = await self._stamp(tx, name)
            if now is None:
                return None
            sets = "".join(f"{k} = ?, " for k in fields)
            await tx.execute(
                f"UPDATE chatd_callers SET {sets}changed_at = ? WHERE name = ?",
                *(stored(k, v) for k, v in fields.items()), now, name,
            )  # fmt: skip
            await audit(tx, now, admin, "update", name, fields)
            return await self._read(tx, name)

    async def add_token(self, name: str, admin: str) -> tuple[LiveRecord, str] | None:
        """Rotation: one more token for the caller; the older ones stay valid."""
        token_id, token = new_token()
        async with self.transaction() as tx:
            now = await self._stamp(tx, name)
            if now is None:
                return None
            await tx.execute(
                INSERT_TOKEN,
                token_id, name, hash_hex(token), now,
            )  # fmt: skip
            await audit(tx, now, admin, "rotate", name, {"token_id": token_id})
            record = await self._read(tx, name)
        assert record is not None
        return record, token

    async def revoke_token(self, name: str, token_id: str, admin: str) -> LiveRecord | None:
        """Revoke one token; None when the caller or that unrevoked token does not exist."""
        try:
            async with self.transaction() as tx:
                now = await self._stamp(tx, name)
                if now is None:
                    return None
                revoked = await tx.execute(
                    "UPDATE chatd_caller_tokens SET revoked_at = ? "
                    "WHERE id = ? AND caller = ? AND revoked_at IS NULL",
                    now, token_id, name,
                )  # fmt: skip
                if not revoked:
                    raise _Missing  # and the stamp is rolled back
                await audit(tx, now, admin, "revoke_token", name, {"token_id": token_id})
                return await self._read(tx, name)
        except _Missing:
            return None

    async def revoke(self, name: str, admin: str) -> LiveRecord | None:
        """Revoke the caller and every token it has; its ledger rows stay."""
        async with self.transaction() as tx:
            now = await self._stamp(tx, name)
            if now is None:
                return None
            await tx.execute("UPDATE chatd_callers SET revoked_at = ? WHERE name = ?", now, name)
            await tx.execute(
                "UPDATE chatd_caller_tokens SET revoked_at = ? "
                "WHERE caller = ? AND revoked_at IS NULL",
                now, name,
            )  # fmt: skip
            await audit(tx, now, admin, "revoke", name, {})
            return await self._read(tx, name)

    async def _stamp(self, tx: Tx, name: str) -> float | None:
        """Lock an unrevoked caller's row and move its `changed_at` on: now, or just past
        the last change when the replica that made it had a clock ahead of ours (so a
        newer copy always has the larger stamp). None when there is no such caller."""
        rows = await tx.fetch(
            "SELECT changed_at FROM chatd_callers WHERE name = ? AND revoked_at IS NULL"
            + self.lock_row,
            name,
        )
        if not rows:
            return None
        now = max(time.time(), rows[0]["changed_at"] + 0.001)
        await tx.execute("UPDATE chatd_callers SET changed_at = ? WHERE name = ?", now, name)
        return now

    # -- reads -------------------------------------------------------------------------

    async def get(self, name: str) -> LiveRecord | None:
        return await self._read(self, name)  # reads only: no write transaction

    async def _read(self, tx: Tx | CallerStore, name: str) -> LiveRecord | None:
        rows = await tx.fetch("SELECT * FROM chatd_callers WHERE name = ?", name)
        if not rows:
            return None
        tokens = await tx.fetch(
            "SELECT id, caller, hash, created_at FROM chatd_caller_tokens "
            "WHERE caller = ? AND revoked_at IS NULL ORDER BY created_at",
            name,
        )
        return records(rows, tokens)[0]

    async def changed_since(self, since: float) -> list[LiveRecord]:
        """Every caller changed after `since` (epoch seconds; 0: all), with its tokens."""
        rows = await self.fetch("SELECT * FROM chatd_callers WHERE changed_at > ?", since)
        tokens: list[dict[str, Any]] = []
        names = [row["name"] for row in rows]
        for i in range(0, len(names), CHUNK):
            chunk = names[i : i + CHUNK]
            tokens += await self.fetch(
                "SELECT id, caller, hash, created_at FROM chatd_caller_tokens "
                f"WHERE revoked_at IS NULL AND caller IN ({', '.join('?' * len(chunk))}) "
                "ORDER BY created_at",
                *chunk,
            )
        return records(rows, tokens)

    async def audit_trail(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = await self.fetch(
            "SELECT time, admin, action, target, fields FROM chatd_audit "
            "ORDER BY time DESC LIMIT ?",
            limit,
        )
        return [{**row, "fields": json.loads(row["fields"])} for row in rows]


class _Missing(Exception):
    """Raised inside a transaction to roll it back when its target is not there."""


async def audit(
    tx: Tx, now: float, admin: str, action: str, target: str, fields: dict[str, Any]
) -> None:
    """The audit row and the log line of one admin change (never a token)."""
    shown = {k: rfc3339(v) if k == "expires_at" else v for k, v in fields.items()}
    text = json.dumps(shown, sort_keys=True)
    await tx.execute(
        "INSERT INTO chatd_audit (time, admin, action, target, fields) VALUES (?, ?, ?, ?, ?)",
        now, admin, action, target, text,
    )  # fmt: skip
    log.info("admin %s: %s %s %s", admin, action, target, text)


def stored(key: str, value: Any) -> Any:
    return json.dumps(value) if key in JSON_FIELDS else value


def records(rows: list[dict[str, Any]], tokens: list[dict[str, Any]]) -> list[LiveRecord]:
    by_caller: dict[str, list[TokenRecord]] = {}
    for token in tokens:
        by_caller.setdefault(token["caller"], []).append(
            TokenRecord(token["id"], token["hash"], token["created_at"])
        )
    result = []
    for row in rows:
        fields = {key: row[key] for key in FIELDS}
        for key in JSON_FIELDS:
            fields[key] = json.loads(fields[key])
        fields["admin"], fields["disabled"] = bool(fields["admin"]), bool(fields["disabled"])
        result.append(
            LiveRecord(
                row["name"],
                fields,
                row["created_at"],
                row["changed_at"],
                row["revoked_at"],
                by_caller.get(row["name"], []),
            )
        )
    return result


def open_store(url: str) -> CallerStore:
    """`sqlite:///path` or `postgresql://...` → its store (not yet opened)."""
    if url.startswith("sqlite://"):
        from chatd.state.callers_sqlite import SQLiteCallerStore

        return SQLiteCallerStore(url)
    from chatd.state.callers_pg import PostgresCallerStore

    return PostgresCallerStore(url)
