"""`chatd callers …`: live callers on the database directly, so the first admin can be
made with no server running (docs/live-callers.md). A running server sees each change
within 2 s (told through Redis when `redis_url` is set). Tokens are printed by `create`
and `rotate` only, once."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from chatd.config import ConfigError, Settings, load_settings
from chatd.errors import ChatdError
from chatd.state.caller_fields import CallerChange, NewCaller, rfc3339
from chatd.state.callers_store import CallerStore, LiveRecord, open_store
from chatd.state.callers_sync import SAFETY_POLL_SECS, announce
from chatd.web import invalid_request

COLUMNS = ("name", "source", "state", "models", "rpm", "tpm", "budget_usd", "budget_period",
           "max_concurrency", "admin", "expires_at", "tokens")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatd callers", description="Issue, list, change, rotate and revoke live callers."
    )
    parser.add_argument("--config", metavar="PATH", help="lakehouse.toml to read")
    commands = parser.add_subparsers(dest="action", required=True)
    create = commands.add_parser("create", help="a new caller; prints its token once")
    create.add_argument("name")
    limits(create, creating=True)
    commands.add_parser("list", help="every caller, config ones included (never a token)")
    update = commands.add_parser("update", help="change some of a live caller's fields")
    update.add_argument("name")
    limits(update, creating=False)
    rotate = commands.add_parser("rotate", help="one more token (older ones stay valid)")
    rotate.add_argument("name")
    revoke = commands.add_parser("revoke", help="revoke a caller, or one of its tokens")
    revoke.add_argument("name")
    revoke.add_argument("--token", metavar="ID", help="only this token (its public id)")
    return parser


def limits(parser: argparse.ArgumentParser, creating: bool) -> None:
    parser.add_argument("--models", nargs="+", metavar="GLOB", help="allowed models (globs)")
    parser.add_argument("--rpm", type=int, metavar="N")
    parser.add_argument("--tpm", type=int, metavar="N")
    parser.add_argument("--budget-usd", type=float, metavar="X")
    parser.add_argument("--budget-period", metavar="day|week|month")
    parser.add_argument("--max-concurrency", type=int, metavar="N")
    parser.add_argument("--expires-at", metavar="RFC3339", help="after it, tokens are refused")
    parser.add_argument("--metadata", nargs="+", metavar="KEY=VALUE", help="labels: team, owner")
    parser.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None)
    if not creating:
        parser.add_argument("--disabled", action=argparse.BooleanOptionalAction, default=None)


def fields_of(args: argparse.Namespace) -> dict[str, Any]:
    names = ("models", "rpm", "tpm", "budget_usd", "budget_period", "max_concurrency",
             "expires_at", "admin", "disabled")  # fmt: skip
    sent = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if args.metadata is not None:
        pairs = [item.partition("=") for item in args.metadata]
        bad = [key for key, eq, _ in pairs if not eq or not key]
        if bad:
            raise ChatdError(f"--metadata: {bad[0]!r} is not KEY=VALUE")
        sent["metadata"] = {key: value for key, _, value in pairs}
    return sent


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"chatd: config error: {exc}", file=sys.stderr)
        return 2
    if not settings.chatd.usage_db:
        print('chatd: callers: live callers need usage_db (it is "")', file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(settings, args))
    except ChatdError as exc:
        print(f"chatd: callers: {exc.message}", file=sys.stderr)
        return 1 if exc.status in (404, 409, 503) else 2


async def run(settings: Settings, args: argparse.Namespace) -> int:
    config_names = set(settings.chatd.callers)
    who = f"cli:{getpass.getuser()}"
    store = open_store(settings.chatd.usage_db)
    try:
        try:
            await store.open()
        except Exception as exc:
            print(f"chatd: callers: the database cannot be reached ({type(exc).__name__})",
                  file=sys.stderr)  # fmt: skip
            return 1
        if args.action == "list":
            print(listing(settings, await store.changed_since(0)))
            return 0
        if args.name in config_names:
            verb = "exists in" if args.action == "create" else "is in"
            print(f"chatd: callers: {args.name} {verb} the config file; change it there",
                  file=sys.stderr)  # fmt: skip
            return 1
        code = await act(store, args, who)
        redis_url = settings.chatd.redis_url
        if code == 0 and redis_url and not await announce(redis_url, args.name):
            print(f"chatd: callers: Redis could not be told; running servers see the change "
                  f"within {SAFETY_POLL_SECS:g} s", file=sys.stderr)  # fmt: skip
        return code
    finally:
        await store.aclose()


async def act(store: CallerStore, args: argparse.Namespace, who: str) -> int:
    if args.action == "create":
        fields = checked(NewCaller, {"name": args.name, **fields_of(args)})
        fields.pop("name")
        record, token = await store.create(args.name, fields, who)
        print(f"created {record.name} (token id {record.tokens[0].id}); its token, shown once:")
        print(token)
        return 0
    if args.action == "update":
        fields = checked(CallerChange, fields_of(args))
        if not fields:
            raise ChatdError("update: give at least one field to change")
        return done(await store.update(args.name, fields, who), args.name, "updated")
    if args.action == "rotate":
        result = await store.add_token(args.name, who)
        if result is None:
            return done(None, args.name, "")
        record, token = result
        print(f"new token for {record.name} (older ones stay valid); shown once:")
        print(token)
        return 0
    if args.token:
        revoked = await store.revoke_token(args.name, args.token, who)
        return done(revoked, args.name, f"revoked token {args.token} of")
    return done(await store.revoke(args.name, who), args.name, "revoked")


def checked(model: type[CallerChange], data: dict[str, Any]) -> dict[str, Any]:
    try:
        return model.model_validate(data).fields()
    except ValidationError as exc:
        raise invalid_request(exc) from None


def done(record: LiveRecord | None, name: str, what: str) -> int:
    if record is None:
        print(f"chatd: callers: no live caller {name} (or no such token)", file=sys.stderr)
        return 1
    print(f"{what} {name}")
    return 0


def listing(settings: Settings, records: list[LiveRecord]) -> str:
    rows: list[dict[str, Any]] = []
    for name, c in settings.chatd.callers.items():
        rows.append({"name": name, "source": "config", "state": "active", **c.model_dump(),
                     "expires_at": None, "tokens": "(config)"})  # fmt: skip
    for record in sorted(records, key=lambda r: r.name):
        view = record.describe()
        view["tokens"] = ",".join(t["id"] for t in view["tokens"]) or "-"
        view["expires_at"] = view["expires_at"] or rfc3339(None)
        rows.append(view)
    lines = [[cell(row.get(key)) for key in COLUMNS] for row in rows]
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(COLUMNS)]
    out = ["  ".join(h.ljust(w) for h, w in zip(COLUMNS, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(line.rstrip() for line in out)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def live_callers_exist(settings: Settings) -> bool:
    """Has a caller been made at run time (`chatd callers create`, `/admin/callers`)?
    Read at start-up, before serving; an unreachable database counts as none."""
    url = settings.chatd.usage_db
    if not url or (url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).exists()):
        return False  # no database yet: none made, and none is made by asking

    async def ask() -> bool:
        store = open_store(settings.chatd.usage_db)
        try:
            await store.open()
            return bool(await store.changed_since(0))
        finally:
            await store.aclose()

    try:
        return asyncio.run(ask())
    except Exception:
        return False
