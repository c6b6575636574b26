"""The SQLite ledger's tables and the statements on them (docs/usage-ledger.md): the
rows, the daily sums a trigger keeps with each insert, and the in-place upgrade of a
ledger written before the daily table."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from chatd.state.usage.rollup import BACKFILL_TO, DAY, floor_day

SCHEMA = """
CREATE TABLE IF NOT EXISTS chatd_usage (
  time TEXT NOT NULL, request_id TEXT, caller TEXT, route TEXT, model TEXT,
  provider TEXT, endpoint TEXT, upstream_model TEXT, status INTEGER, error TEXT,
  input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, cost_source TEXT,
  latency_ms REAL, ttft_ms REAL, attempts INTEGER, cache TEXT,
  rolled INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS chatd_usage_time ON chatd_usage (time);
CREATE INDEX IF NOT EXISTS chatd_usage_caller_time ON chatd_usage (caller, time);
"""
# `rolled` = 1: the row's figures went into chatd_usage_daily with it. Rows of a ledger
# written before the daily table (0) are summed into it by the backfill.
DAILY = """
CREATE TABLE IF NOT EXISTS chatd_usage_daily (
  day TEXT NOT NULL, caller TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL,
  provider TEXT NOT NULL, requests INTEGER NOT NULL, errors INTEGER NOT NULL,
  input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
  PRIMARY KEY (day, caller, route, model, provider)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chatd_usage_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
UPSERT = (
    "INSERT INTO chatd_usage_daily VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (day, caller, route, model, provider) DO UPDATE SET "
    "requests = requests + excluded.requests, errors = errors + excluded.errors, "
    "input_tokens = input_tokens + excluded.input_tokens, "
    "output_tokens = output_tokens + excluded.output_tokens, "
    "cost_usd = cost_usd + excluded.cost_usd"
)
# Each row adds itself to its day's sums inside the statement that inserts it, so a batch
# is one statement and one transaction: the writer's thread takes the GIL back once a
# batch instead of once a statement (docs/usage-ledger.md#what-a-row-costs).
ROLLUP = (
    "CREATE TRIGGER IF NOT EXISTS chatd_usage_rollup AFTER INSERT ON chatd_usage "
    "WHEN NEW.rolled = 1 BEGIN INSERT INTO chatd_usage_daily VALUES (substr(NEW.time, 1, 10), "
    "COALESCE(NEW.caller, ''), COALESCE(NEW.route, ''), COALESCE(NEW.model, ''), "
    "COALESCE(NEW.provider, ''), 1, NEW.error IS NOT NULL, COALESCE(NEW.input_tokens, 0), "
    "COALESCE(NEW.output_tokens, 0), COALESCE(NEW.cost_usd, 0.0)) "
    + UPSERT[UPSERT.index("ON CONFLICT") :]
    + "; END"
)
# The backfill's sums of one span of rows written before the daily table existed.
LEGACY_SUMS = (
    "SELECT substr(time, 1, 10), COALESCE(caller, ''), COALESCE(route, ''), "
    "COALESCE(model, ''), COALESCE(provider, ''), COUNT(*), "
    "SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END), COALESCE(SUM(input_tokens), 0), "
    "COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0) FROM chatd_usage "
    "WHERE time >= ? AND time < ? AND rolled = 0 GROUP BY 1, 2, 3, 4, 5"
)
PRUNE = (
    "DELETE FROM chatd_usage WHERE rowid IN "
    "(SELECT rowid FROM chatd_usage WHERE time < ? ORDER BY time LIMIT ?)"
)


def create_schema(db: sqlite3.Connection) -> None:
    """A new ledger, or one written before the daily table: upgraded in place (a column
    and two tables; nothing is read or rewritten here: the backfill does that later)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        names = {row[1] for row in db.execute("PRAGMA table_info(chatd_usage)")}
        if names and "rolled" not in names:
            db.execute("ALTER TABLE chatd_usage ADD COLUMN rolled INTEGER NOT NULL DEFAULT 0")
            db.execute(DAILY.split(";")[0])
            db.execute(DAILY.split(";")[1])
            (last,) = db.execute("SELECT MAX(time) FROM chatd_usage").fetchone()
            if last is not None:  # the backfill goes back from the last row's day's end
                end = floor_day(epoch(last)) + DAY
                db.execute("INSERT INTO chatd_usage_meta VALUES (?, ?)", (BACKFILL_TO, repr(end)))
        for statement in (SCHEMA + DAILY).split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(ROLLUP)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def epoch(text: str) -> float:
    """A row's ISO time as epoch seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
