"""The dashboard's data, in process: the ring buffer, the overview API, its
admin check, the static files, the Grafana dashboard. The browser test is test_ui_e2e.py."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from chatd.ui.series import BOUNDS, Activity, percentile
from tests.support import REPO, make_settings

TOKEN = "ui-test-admin-token"
USER = [{"role": "user", "content": "my secret prompt words"}]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scope(path: str = "/v1/chat", **facts: Any) -> dict[str, Any]:
    return {"path": path, "state": {"request_id": "r1", "log": facts}}


# -- the ring buffer ----------------------------------------------------------------------


def test_series_counts_requests_errors_and_latency_per_provider() -> None:
    clock = Clock()
    activity = Activity(clock=clock)
    for ms in range(1, 101):  # 100 requests, 1..100 ms, in one second
        activity.record(scope(provider="a"), "a", 200, ms / 1000)
    activity.record(scope(provider="a", error="upstream_error"), "a", 502, 0.05)
    activity.record(scope(provider="a", error="client_gone"), "a", 499, 0.05)  # not a failure
    series = activity.series(["a", "b"], step=5)
    assert series["step_secs"] == 5 and series["window_secs"] == 900
    assert len(series["times"]) == 180 and series["times"][-1] == int(clock.now)
    a = series["providers"]["a"]
    assert a["rate"][-1] == pytest.approx(102 / 5)
    assert a["error_rate"][-1] == pytest.approx(1 / 102, abs=1e-4)
    assert a["p50_ms"][-1] == pytest.approx(51, rel=0.12)  # within a histogram bucket
    assert a["p95_ms"][-1] == pytest.approx(96, rel=0.12)
    assert a["rate"][:-1] == [0] * 179 and a["p50_ms"][0] is None  # nothing earlier
    assert series["providers"]["b"]["rate"] == [0] * 180
    assert activity.ewma_ms("a") is not None and activity.ewma_ms("b") is None


def test_series_forgets_what_is_older_than_the_window() -> None:
    clock = Clock()
    activity = Activity(clock=clock)
    activity.record(scope(provider="a"), "a", 200, 0.01)
    clock.now += 900  # the same slot, 15 minutes on
    activity.record(scope(provider="a"), "a", 200, 0.01)
    activity.record(scope(provider="a"), "a", 200, 0.01)
    rate = activity.series(["a"], step=1)["providers"]["a"]["rate"]
    assert sum(rate) == 2 and rate[-1] == 2


def test_percentile_reads_the_histogram() -> None:
    hist = [0] * len(BOUNDS)
    assert percentile(hist, 0, 0.5) is None
    hist[10] = 1
    assert BOUNDS[9] <= percentile(hist, 1, 0.5) <= BOUNDS[10]


def test_last_errors_keep_facts_never_the_prompt_and_at_most_50() -> None:
    activity = Activity()
    long = "x" * 500
    for i in range(60):
        activity.record(
            scope(model=f"m{i}", provider="a", error="upstream_error", error_message=long),
            "a",
            502,
            0.01,
        )
    activity.record(scope("/nope", error="not_found", error_message="no route"), "none", 404, 0)
    activity.record(scope("/ui/api/overview", error="unauthorized"), "none", 401, 0)
    errors = activity.errors()
    assert len(errors) == 50
    assert errors[0]["model"] == "m59" and errors[-1]["model"] == "m10"  # newest first
    assert len(errors[0]["message"]) == 120 and errors[0]["message"].endswith("…")
    assert errors[0]["status"] == 502 and errors[0]["type"] == "upstream_error"
    assert set(errors[0]) == {
        "time", "request_id", "route", "caller", "model", "provider", "status", "type", "message",
    }  # fmt: skip


# -- the API, in process ------------------------------------------------------------------


def settings(**chatd: Any) -> Any:
    providers = {
        "mock": {"kind": "mock"},
        "edge": {"kind": "ollama", "base_url": "http://10.9.9.9:11434", "max_retries": 0,
                 "cooldown_failures": 2, "cooldown_secs": 60},
    }  # fmt: skip
    return make_settings(providers, default_provider="mock", **chatd)


async def test_overview_is_open_without_inbound_auth(app_client: Any) -> None:
    async with app_client(settings()) as client:
        assert (await client.get("/ui/api/access")).json() == {"token_required": False}
        await client.post("/v1/chat", json={"model": "mock/echo", "messages": USER})
        answer = await client.get("/ui/api/overview")
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        body = answer.json()
    by_name = {p["name"]: p for p in body["providers"]}
    assert list(by_name) == ["edge", "mock", "ollama"] and body["default"] == "mock"
    mock = by_name["mock"]
    assert mock["state"] == "ok" and mock["requests"] == 1
    [endpoint] = mock["endpoints"]
    assert endpoint["name"] == "mock" and endpoint["state"] == "ok" and endpoint["in_flight"] == 0
    assert endpoint["requests"] == 1 and endpoint["ewma_ms"] is not None
    assert by_name["edge"]["endpoints"][0]["name"] == "10.9.9.9:11434"
    assert body["series"]["providers"]["mock"]["rate"][-1] > 0
    assert body["spend"] is None and body["errors"] == []
    assert body["worker"]["pid"] > 0 and body["refresh_ms"] == 2000


async def test_a_tripped_breaker_shows_as_cooling_down(app_client: Any) -> None:
    async with app_client(settings()) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        breaker = app.state.dispatcher.guard("edge").breaker
        breaker.failed()
        breaker.failed()
        body = (await client.get("/ui/api/overview")).json()
    edge = body["providers"][0]
    assert edge["state"] == "cooling_down"
    assert edge["endpoints"][0]["state"] == "cooling_down"
    assert 0 < edge["endpoints"][0]["cooldown_remaining_secs"] <= 60


async def test_endpoints_from_the_listing_are_passed_through(app_client: Any) -> None:
    async with app_client(settings()) as client:
        ops = client._transport.app.state.operations  # type: ignore[attr-defined]
        listing = ops.listing

        def with_endpoints() -> dict[str, Any]:  # the shape endpoints add
            out = listing()
            out["providers"][0]["endpoints"] = [
                {"name": "a", "base_url": "http://a", "available": True, "state": "ok",
                 "in_flight": 1, "ewma_ms": 12.0, "requests": 3, "errors": 0},
                {"name": "b", "base_url": "http://b", "available": True,
                 "state": "cooling_down", "in_flight": 0, "ewma_ms": None, "requests": 2,
                 "errors": 2},
            ]  # fmt: skip
            return out

        ops.listing = with_endpoints
        edge = (await client.get("/ui/api/overview")).json()["providers"][0]
    assert [e["name"] for e in edge["endpoints"]] == ["a", "b"]
    assert edge["state"] == "degraded"


async def test_the_last_errors_say_what_failed_but_not_the_upstreams_body(
    app_client: Any, fake: Any
) -> None:
    providers = {"ollama": {"kind": "ollama", "base_url": fake.url, "max_retries": 0}}
    async with app_client(make_settings(providers)) as client:
        # The fake's error body is echoed to the caller abbreviated; the dashboard leaves it out.
        answer = await client.post("/v1/chat", json={"model": "fail-400", "messages": USER})
        assert answer.status_code == 502
        await client.post("/v1/chat", json={"model": "", "messages": USER})
        errors = (await client.get("/ui/api/overview")).json()["errors"]
    assert [(e["status"], e["type"]) for e in errors] == [
        (400, "invalid_request"),
        (502, "upstream_error"),
    ]
    assert errors[1]["message"] == "ollama: upstream answered 400"
    assert errors[1]["model"] == "fail-400" and errors[1]["provider"] == "ollama"
    assert "secret" not in json.dumps(errors)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}],
)
async def test_with_inbound_auth_the_data_wants_an_admin_token(
    app_client: Any, monkeypatch: pytest.MonkeyPatch, headers: dict[str, str]
) -> None:
    monkeypatch.setenv("UI_TEST_TOKENS", TOKEN)
    async with app_client(settings(auth_tokens_env="UI_TEST_TOKENS")) as client:
        assert (await client.get("/ui/api/access")).json() == {"token_required": True}
        assert (await client.get("/ui")).status_code == 200  # the page itself is open
        refused = await client.get("/ui/api/overview", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        error = refused.json()["error"]
        assert error["type"] == "unauthorized" and TOKEN not in refused.text
        ok = await client.get("/ui/api/overview", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


async def test_an_admin_check_set_on_the_app_decides(
    app_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UI_TEST_TOKENS", f"{TOKEN},plain-caller")
    async with app_client(settings(auth_tokens_env="UI_TEST_TOKENS")) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        app.state.ui_admin = lambda token: token == TOKEN.encode()  # callers with role admin
        plain = await client.get(
            "/ui/api/overview", headers={"Authorization": "Bearer plain-caller"}
        )
        admin = await client.get("/ui/api/overview", headers={"Authorization": f"Bearer {TOKEN}"})
    assert plain.status_code == 401 and admin.status_code == 200


async def test_spend_comes_from_the_apps_spend_report(app_client: Any) -> None:
    rows = [{"caller": "bot", "spend_usd": 1.5, "budget_usd": 2.0, "input_tokens": 10,
             "output_tokens": 5, "period": "2025-06"}]  # fmt: skip
    async with app_client(settings()) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        app.state.spend_report = lambda: rows
        assert (await client.get("/ui/api/overview")).json()["spend"] == rows

        async def report() -> list[dict[str, Any]]:
            return []

        app.state.spend_report = report
        assert (await client.get("/ui/api/overview")).json()["spend"] == []


async def test_static_files_are_served_with_a_strict_policy(app_client: Any) -> None:
    async with app_client(settings()) as client:
        page = await client.get("/ui")
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        for src in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page.text):
            asset = await client.get(src)
            assert asset.status_code == 200 and asset.content, src
        assert (await client.get("/ui/")).status_code == 200
        missing = await client.get("/ui/static/../../pyproject.toml")
        assert missing.status_code == 404
        missing = await client.get("/ui/static/secret.txt")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
        schema = (await client.get("/openapi.json")).json()
    overview = schema["paths"]["/ui/api/overview"]["get"]["responses"]
    assert set(overview) == {"200", "401", "405", "500"}
    assert "/ui/api/access" in schema["paths"] and "/ui" in schema["paths"]


async def test_ui_off_adds_no_routes_and_nothing_per_request(app_client: Any) -> None:
    async with app_client(settings(ui=False)) as client:
        assert (await client.get("/ui")).status_code == 404
        assert (await client.get("/ui/api/overview")).status_code == 404
        ops = client._transport.app.state.operations  # type: ignore[attr-defined]
        assert ops.on_finished is None


def test_the_grafana_dashboard_is_valid_and_uses_chatds_metric_names() -> None:
    from prometheus_client import generate_latest

    from chatd.telemetry.metrics import Metrics

    dashboard = json.loads((REPO / "grafana" / "chatd.json").read_text())
    assert dashboard["title"] == "chatd" and len(dashboard["panels"]) >= 5
    exposition = Metrics(["mock"], multiprocess=False)
    exposition.request_finished("/v1/chat", "mock", 200, 0.1, 5, 1, 1)
    exposition.retried("mock")
    exposition.fell_back()
    exposition.upstream_call("mock", 0.1)
    text = generate_latest(exposition.registry).decode()  # type: ignore[arg-type]
    names = set(re.findall(r"^(chatd_[a-z_]+)", text, re.M))
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"chatd_[a-z_]+", target["expr"]))
            assert used and used <= names, (panel["title"], used - names)
