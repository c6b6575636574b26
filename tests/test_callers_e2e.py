"""Callers against real chatd processes and the fake upstream: tokens (Bearer and
x-api-key), allow-lists, rpm with OpenAI's rate-limit headers, budgets, upstream cost,
the SQLite ledger read straight from its file, GET /v1/usage, spend across a restart,
SIGTERM flushing, and no secret anywhere."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatd.state.callers import period_bounds
from chatd.state.usage import COLUMNS
from tests.fakes.upstream import FakeUpstream
from tests.support import ChatdProcess, provider_toml

TOKENS = {
    "alice": "tok-alice-4f1d9c2a7e",
    "limited": "tok-limited-8b3e6d1f0a",
    "spender": "tok-spender-2c7a9e4b1d",
    "other": "tok-other-6e1b3f8c2a",
    "root": "tok-root-9d2f7a1c6b",
}
UPSTREAM_KEY = "sk-or-planted-callers-key-4242"
PRICE = 1000.0  # USD per million tokens, in and out: a fake answer costs ~$0.017


def config_for(fake: FakeUpstream, usage_db: str, budget: float = 0.03) -> str:
    return (
        f"""
[models]
hot = "ollama/ok"

[chatd]
default_provider = "ollama"
usage_db = "{usage_db}"

[chatd.callers.alice]
token_env = "TOK_ALICE"
models = ["hot", "openrouter/*"]

[chatd.callers.limited]
token_env = "TOK_LIMITED"
rpm = 3

[chatd.callers.spender]
token_env = "TOK_SPENDER"
budget_usd = {budget}
budget_period = "month"

[chatd.callers.other]
token_env = "TOK_OTHER"
tpm = 1000000

[chatd.callers.root]
token_env = "TOK_ROOT"
admin = true

[chatd.prices]
"*" = {{ input = 0.0, output = 0.0 }}
"ollama/*" = {{ input = {PRICE}, output = {PRICE} }}

"""
        + provider_toml("ollama", "ollama", fake.url, max_retries=0)
        + provider_toml("openrouter", "openai", fake.url + "/v1", key_env="OR_KEY")
    )


def env() -> dict[str, str]:
    return {f"TOK_{name.upper()}": token for name, token in TOKENS.items()} | {
        "OR_KEY": UPSTREAM_KEY
    }


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def chat(gw: ChatdProcess, model: str = "ok", headers: dict[str, str] | None = None,
         route: str = "/v1/chat", **extra: Any) -> httpx.Response:  # fmt: skip
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(gw.url + route, json=body, headers=headers or {}, timeout=30)


def ledger_rows(path: Path, expect: int | None = None, timeout: float = 5.0) -> list[dict]:
    """The ledger, read from the SQLite file itself (waiting up to `timeout` for
    `expect` rows: the writer batches at least once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict] = []
        if path.exists():
            db = sqlite3.connect(path)
            try:
                db.row_factory = sqlite3.Row
                rows = [dict(r) for r in db.execute("SELECT * FROM chatd_usage ORDER BY time")]
            except sqlite3.OperationalError:
                rows = []
            finally:
                db.close()
        if expect is None or len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


@pytest.fixture(scope="module")
def gw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("callers")


@pytest.fixture(scope="module")
def gw(fake: FakeUpstream, gw_dir: Path) -> Iterator[ChatdProcess]:
    db = gw_dir / "ledger.sqlite3"
    with ChatdProcess(config_for(fake, f"sqlite:///{db}"), gw_dir, env=env()) as process:
        process.ledger = db  # type: ignore[attr-defined]
        yield process


def test_no_token_or_a_wrong_one_is_401_bearer_and_x_api_key(gw: ChatdProcess) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer tok-nobody"},
        {"x-api-key": "tok-nobody"},
        {"Authorization": "Basic " + TOKENS["alice"]},
    ):
        answer = chat(gw, headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["type"] == "unauthorized"
    assert chat(gw, "hot", headers={"x-api-key": TOKENS["alice"]}).status_code == 200
    assert chat(gw, "hot", headers=auth("alice")).status_code == 200
    assert httpx.get(gw.url + "/health").status_code == 200  # still open


def test_a_model_outside_the_allow_list_is_403_and_an_alias_is_checked_by_name(
    gw: ChatdProcess,
) -> None:
    assert chat(gw, "hot", headers=auth("alice")).status_code == 200
    assert chat(gw, "openrouter/ok", headers=auth("alice")).status_code == 200
    # What `hot` resolves to is not itself allowed: only the alias is.
    for model in ("ollama/ok", "ok"):
        refused = chat(gw, model, headers=auth("alice"))
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert (error["type"], error["code"], error["param"]) == ("forbidden", "forbidden", "model")
    completions = chat(gw, "ok", headers=auth("alice"), route="/v1/chat/completions")
    assert completions.status_code == 403


def test_over_rpm_is_429_with_a_retry_after_right_to_the_second(gw: ChatdProcess) -> None:
    first_at = time.time()
    remaining = []
    for _ in range(3):
        answer = chat(gw, headers=auth("limited"))
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(answer.headers["x-ratelimit-remaining-requests"]))
        assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [2, 1, 0]  # counting down
    time.sleep(2.5)
    refused = chat(gw, headers=auth("limited"))
    elapsed = time.time() - first_at
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limited"
    retry_after = int(refused.headers["retry-after"])
    assert abs(retry_after - math.ceil(60 - elapsed)) <= 1, (retry_after, elapsed)
    assert retry_after <= 58  # the window slides: not a fresh minute
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Other callers are not limited, and callers without limits get no such headers.
    ok = chat(gw, "hot", headers=auth("alice"))
    assert ok.status_code == 200 and "x-ratelimit-limit-requests" not in ok.headers
    tokens = chat(gw, headers=auth("other"))
    assert tokens.headers["x-ratelimit-limit-tokens"] == "1000000"
    assert "x-ratelimit-limit-requests" not in tokens.headers


def test_crossing_the_budget_is_429_budget_exceeded_and_others_are_unaffected(
    gw: ChatdProcess,
) -> None:
    assert chat(gw, headers=auth("spender")).status_code == 200  # ~$0.017 of $0.03
    assert chat(gw, headers=auth("spender")).status_code == 200  # admitted, crosses it
    time.sleep(0.2)
    refused = chat(gw, headers=auth("spender"))
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded"
    _, end = period_bounds("month", datetime.now(UTC))
    assert end.isoformat().replace("+00:00", "Z") in error["message"]
    assert 0 < int(refused.headers["retry-after"]) <= 31 * 86400
    assert chat(gw, headers=auth("other")).status_code == 200


def test_the_upstreams_own_cost_is_recorded(gw: ChatdProcess) -> None:
    ids = []
    for route, stream in (
        ("/v1/chat", False),
        ("/v1/chat", True),
        ("/v1/chat/completions", False),
        ("/v1/chat/completions", True),
    ):
        extra: dict[str, Any] = {"stream": stream}
        if stream and route.endswith("completions"):
            extra["stream_options"] = {"include_usage": True}
        answer = chat(gw, "openrouter/cost-1500", headers=auth("root"), route=route, **extra)
        assert answer.status_code == 200, answer.text
        ids.append(answer.headers["x-request-id"])
    priced = chat(gw, "ollama/ok", headers=auth("root"))
    unpriced = chat(gw, "openrouter/ok", headers=auth("root"))
    rows = {r["request_id"]: r for r in ledger_rows(gw.ledger, timeout=3)}  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and unpriced.headers["x-request-id"] not in rows:
        time.sleep(0.2)
        rows = {r["request_id"]: r for r in ledger_rows(gw.ledger)}  # type: ignore[attr-defined]
    for rid in ids:
        assert rows[rid]["cost_source"] == "upstream"
        assert rows[rid]["cost_usd"] == pytest.approx(0.0015)
    row = rows[priced.headers["x-request-id"]]
    assert row["cost_source"] == "price"
    expected = (row["input_tokens"] + row["output_tokens"]) * PRICE / 1e6
    assert row["cost_usd"] == pytest.approx(expected) and expected > 0
    row = rows[unpriced.headers["x-request-id"]]
    assert (row["cost_source"], row["cost_usd"]) == ("price", 0.0)  # the "*" glob


def test_with_the_cache_on_a_miss_pays_the_upstreams_cost_and_a_hit_nothing(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    # Found by the gateway soak: with the cache on, a /v1/chat miss lost OpenRouter's
    # `usage.cost` (the ledger said 0, "none"), so budgets never saw that spend.
    db = tmp_path / "ledger.sqlite3"
    config = config_for(fake, f"sqlite:///{db}") + "[chatd.cache]\nenabled = true\n"
    with ChatdProcess(config, tmp_path, env=env()) as gw:
        answers = [
            chat(gw, "openrouter/cost-1500", headers=auth("root"), route=route, **extra)
            for route, extra in (
                ("/v1/chat", {}),  # a miss: the upstream's call
                ("/v1/chat", {}),  # the same again: a hit
                ("/v1/chat", {"stream": True, "messages": [{"role": "user", "content": "s"}]}),
                ("/v1/chat/completions", {"temperature": 0}),
            )
        ]
        assert [a.headers.get("x-chatd-cache") for a in answers] == ["miss", "hit", "miss", "miss"]
        rows = {r["request_id"]: r for r in ledger_rows(db, expect=4)}
    costs = [(rows[a.headers["x-request-id"]]["cost_source"],
              rows[a.headers["x-request-id"]]["cost_usd"]) for a in answers]  # fmt: skip
    assert costs == [("upstream", 0.0015), ("price", 0.0), ("upstream", 0.0015),
                     ("upstream", 0.0015)]  # fmt: skip


def test_the_ledger_holds_one_row_per_request_with_every_field(
    gw: ChatdProcess,
) -> None:
    before = len(ledger_rows(gw.ledger))  # type: ignore[attr-defined]
    answers = [
        chat(gw, "hot", headers=auth("alice")),
        chat(gw, "ollama/ok", headers=auth("alice")),  # 403
        chat(gw, headers={"x-api-key": "tok-wrong"}),  # 401
        chat(gw, "ollama/fail-500", headers=auth("root")),  # 502 from the dispatcher
    ]
    rows = ledger_rows(gw.ledger, before + 4)  # type: ignore[attr-defined]
    assert len(rows) == before + 4
    assert set(rows[0]) == {*COLUMNS, "rolled"}  # rolled: its sums are in the daily table
    by_id = {r["request_id"]: r for r in rows}
    ok, forbidden, unauthorized, failed = (by_id[a.headers["x-request-id"]] for a in answers)
    assert ok["caller"] == "alice" and ok["route"] == "/v1/chat" and ok["model"] == "hot"
    assert (ok["provider"], ok["upstream_model"], ok["status"]) == ("ollama", "ok", 200)
    said = answers[0].json()
    assert (ok["input_tokens"], ok["output_tokens"]) == (
        said["input_tokens"],
        said["output_tokens"],
    )
    assert ok["input_tokens"] > 0 and ok["attempts"] == 1
    assert ok["latency_ms"] > 0 and ok["error"] is None and ok["time"].endswith("Z")
    assert (forbidden["status"], forbidden["error"], forbidden["caller"]) == (
        403, "forbidden", "alice"
    )  # fmt: skip
    assert (unauthorized["status"], unauthorized["caller"]) == (401, None)
    assert (failed["status"], failed["error"], failed["provider"]) == (
        502, "upstream_error", "ollama"
    )  # fmt: skip


def test_usage_groups_and_a_caller_sees_only_itself_an_admin_all(gw: ChatdProcess) -> None:
    for _ in range(2):
        assert chat(gw, "hot", headers=auth("alice")).status_code == 200
    assert chat(gw, "openrouter/ok", headers=auth("alice")).status_code == 200
    mine = httpx.get(gw.url + "/v1/usage?group_by=caller,model", headers=auth("alice")).json()
    assert {r["caller"] for r in mine["rows"]} == {"alice"}
    models = {r["model"]: r for r in mine["rows"]}
    assert models["hot"]["requests"] >= 2 and models["openrouter/ok"]["requests"] >= 1
    assert mine["totals"]["requests"] == sum(r["requests"] for r in mine["rows"])
    assert set(mine["rows"][0]) == {
        "caller", "model", "requests", "errors", "input_tokens", "output_tokens", "cost_usd"
    }  # fmt: skip
    snooping = httpx.get(gw.url + "/v1/usage?caller=root", headers=auth("alice"))
    assert snooping.status_code == 403 and snooping.json()["error"]["param"] == "caller"
    everyone = httpx.get(gw.url + "/v1/usage", headers=auth("root")).json()
    callers = {r["caller"] for r in everyone["rows"]}
    assert {"alice", "limited", "spender", "root"} <= callers
    only = httpx.get(gw.url + "/v1/usage?caller=alice&group_by=day", headers=auth("root")).json()
    assert [r["day"] for r in only["rows"]] == [datetime.now(UTC).date().isoformat()]
    # (alice's refused snooping is a ledger row of its own: one more request than before)
    assert only["totals"]["requests"] == mine["totals"]["requests"] + 1
    bad = httpx.get(gw.url + "/v1/usage?group_by=colour", headers=auth("root"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    bad = httpx.get(gw.url + "/v1/usage?since=yesterday", headers=auth("root"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    assert httpx.get(gw.url + "/v1/usage").status_code == 401


def test_no_secret_in_logs_ledger_usage_answers_or_error_bodies(
    gw: ChatdProcess, gw_dir: Path
) -> None:
    import hashlib

    bodies = [chat(gw, headers={"Authorization": f"Bearer {TOKENS['alice']}x"}).text]
    bodies.append(chat(gw, "ollama/ok", headers=auth("alice")).text)
    bodies.append(chat(gw, "openrouter/fail-401", headers=auth("root")).text)
    bodies.append(httpx.get(gw.url + "/v1/usage?group_by=caller,model,provider,day",
                            headers=auth("root")).text)  # fmt: skip
    bodies.append(httpx.get(gw.url + "/metrics").text)
    bodies.append(httpx.get(gw.url + "/v1/chat/providers", headers=auth("root")).text)
    rows = ledger_rows(gw.ledger)  # type: ignore[attr-defined]
    haystack = "\n".join([*bodies, gw.log(), repr(rows)])
    for secret in [*TOKENS.values(), UPSTREAM_KEY]:
        for form in (secret, hashlib.sha256(secret.encode()).hexdigest(), secret[4:]):
            assert form not in haystack
    db_bytes = b"".join(p.read_bytes() for p in gw_dir.glob("ledger.sqlite3*"))
    for secret in [*TOKENS.values(), UPSTREAM_KEY]:
        assert secret.encode() not in db_bytes


def test_spend_survives_a_restart(fake: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    config = config_for(fake, f"sqlite:///{db}")
    with ChatdProcess(config, tmp_path, env=env()) as first:
        assert chat(first, headers=auth("spender")).status_code == 200
        assert chat(first, headers=auth("spender")).status_code == 200
    with ChatdProcess(config, tmp_path, env=env()) as second:
        refused = chat(second, headers=auth("spender"))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "budget_exceeded"
        assert chat(second, headers=auth("other")).status_code == 200


def test_sigterm_writes_buffered_rows_before_exit(fake: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite3"
    process = ChatdProcess(config_for(fake, f"sqlite:///{db}"), tmp_path, env=env()).start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: chat(process, headers=auth("other")), range(40)))
        assert all(a.status_code == 200 for a in answers)
    finally:
        code = process.stop()
    assert code == 0
    assert len(ledger_rows(db, timeout=0)) == 40
