"""The dashboard at /ui in a real browser: headless Chromium driven by Selenium
against a real chatd process with real fake upstreams under light traffic, and against
an in-process app served by uvicorn on a real socket (for the spend panel's stub ledger).

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them when
missing); skipped with the reason when they are not there. Screenshots go to
`test-artifacts/`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from chatd.app import create_app
from tests.fakes.upstream import FakeUpstream
from tests.support import REPO, ChatdProcess, free_port, make_settings, provider_toml

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "ui-admin-token-0123456789"
REFRESH_SECS = 2.0  # ui/overview.py REFRESH_MS
MARGIN_SECS = 6.0  # a shared, loaded machine: the page may take a while to redraw

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (scripts/test.sh installs them)",
)


# -- the browser --------------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium; quit (browser and driver) whatever happens."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chatd-ui-chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        # Without these Chromium dials out at start, and this closed network refuses it.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1300",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, port=free_port())
    driver = None
    try:
        driver = webdriver.Chrome(service=service, options=options)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        service.stop()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # an element redrawn under us: ask again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def js_fetch_status(driver: Any, path: str, token: str | None = None) -> int:
    """The status the page's own origin gets for `path` (a data call, made by the browser)."""
    return int(
        driver.execute_async_script(
            """
            const [path, token, done] = arguments;
            const headers = token ? {Authorization: "Bearer " + token} : {};
            fetch(path, {headers, cache: "no-store"}).then(r => done(r.status), e => done(-1));
            """,
            path,
            token,
        )
    )


def rows(driver: Any, selector: str) -> list[dict[str, str]]:
    return driver.execute_script(
        """return [...document.querySelectorAll(arguments[0])].map(r => ({
            provider: r.dataset.provider, endpoint: r.dataset.endpoint, state: r.dataset.state,
            text: r.innerText}));""",
        selector,
    )


def chart_counts(driver: Any, chart: str) -> tuple[int, int]:
    node = driver.find_element("id", chart)
    return int(node.get_attribute("data-points") or 0), int(node.get_attribute("data-nonzero") or 0)


# -- a real chatd, real fakes, light traffic ------------------------------------------------


class DoomedHost:
    """A fake upstream in its own process, so taking it down closes every connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.upstream", str(self.port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._up, 15, "the second fake upstream")

    def _up(self) -> bool:
        return httpx.get(self.url + "/api/tags", timeout=0.5).status_code == 200

    def take_down(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


class Traffic:
    """A thread sending a chat request every ~100 ms, round the given models."""

    def __init__(self, url: str, models: list[str]) -> None:
        self.url = url
        self.models = models
        self.stopping = threading.Event()
        self.sent: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(timeout=15, headers=headers) as client:
            index = 0
            while not self.stopping.is_set():
                model = self.models[index % len(self.models)]
                index += 1
                body = {"model": model, "messages": [{"role": "user", "content": "hi there"}]}
                try:
                    status = client.post(self.url + "/v1/chat", json=body).status_code
                except httpx.HTTPError:
                    status = -1
                self.sent[status] = self.sent.get(status, 0) + 1
                self.stopping.wait(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self.thread.join(20)


def test_dashboard_in_a_browser_against_a_real_chatd(
    browser: Any, fake: FakeUpstream, tmp_path: Path
) -> None:
    doomed = DoomedHost()
    try:
        config = (
            '[chatd]\nauth_tokens_env = "UI_TOKENS"\ntimeout_secs = 10\n'
            + provider_toml("ollama", "ollama", fake.url, cooldown_failures=0)
            + provider_toml("vendor", "openai", fake.url + "/v1", cooldown_failures=0)
            + provider_toml("mock", "mock", latency_ms=5)
            + provider_toml(
                "edge", "ollama", doomed.url, max_retries=0, cooldown_failures=2, cooldown_secs=300
            )
        )
        env = {"UI_TOKENS": f"someone-else,{TOKEN}"}
        models = ["ok", "vendor/ok", "mock/echo", "edge/ok", "vendor/slow-120", "fail-400"]
        with ChatdProcess(config, tmp_path, env=env) as chatd, Traffic(chatd.url, models) as load:
            run_browser_checks(browser, chatd, doomed, load)
    finally:
        doomed.take_down()


def run_browser_checks(browser: Any, chatd: ChatdProcess, doomed: DoomedHost, load: Traffic):
    # The page itself loads without a token; its data does not.
    page = httpx.get(chatd.url + "/ui", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    refused = httpx.get(chatd.url + "/ui/api/overview", timeout=10)
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"

    browser.get(chatd.url + "/ui")
    login = wait_until(lambda: browser.find_element("id", "login"), 15, "the page")
    wait_until(login.is_displayed, 15, "the admin token form (inbound auth is on)")
    assert not browser.find_element("id", "dashboard").is_displayed()
    screenshot(browser, "ui-login.png")
    browser.find_element("id", "token").send_keys(TOKEN + "\n")

    # Every provider and its endpoint, from the live data.
    wanted = {"ollama", "vendor", "mock", "edge"}
    wait_until(
        lambda: {r["provider"] for r in rows(browser, "#providers tr.endpoint")} >= wanted,
        15,
        "every provider's endpoint row",
    )
    endpoints = {r["provider"]: r for r in rows(browser, "#providers tr.endpoint")}
    assert endpoints["ollama"]["endpoint"] == f"127.0.0.1:{chatd_fake_port(chatd)}"
    assert endpoints["edge"]["endpoint"] == f"127.0.0.1:{doomed.port}"
    assert endpoints["mock"]["endpoint"] == "mock"
    assert all(r["state"] == "ok" for r in endpoints.values()), endpoints
    assert browser.execute_script("return sessionStorage.getItem('chatd.ui.token')") == TOKEN

    # Charts: request rate and latency have points once traffic has gone by.
    wait_until(lambda: chart_counts(browser, "chart-rate")[1] > 0, 20, "request-rate points")
    wait_until(lambda: chart_counts(browser, "chart-latency")[0] > 0, 20, "latency points")
    wait_until(lambda: chart_counts(browser, "chart-errors")[1] > 0, 20, "error-rate points")
    legend = browser.find_element("id", "legend").text
    assert "ollama" in legend and "vendor" in legend and "mock" in legend
    # The last errors: the upstream 400s, with their model and type, no prompt text.
    wait_until(lambda: rows(browser, "#errors tbody tr"), 15, "the errors table")
    errors_text = browser.find_element("id", "errors").text
    assert "fail-400" in errors_text and "upstream_error" in errors_text
    assert "hi there" not in errors_text
    spend = browser.find_element("id", "spend").text
    assert "No callers configured" in spend  # no ledger in this chatd (see the stub test)
    assert "worker pid" in browser.find_element("id", "status").text
    screenshot(browser, "ui-dashboard.png")

    # A host taken down turns to cooling down within the refresh interval.
    doomed.take_down()
    statuses = [
        httpx.post(
            chatd.url + "/v1/chat",
            json={"model": "edge/ok", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=15,
        ).status_code
        for _ in range(3)
    ]
    tripped = time.monotonic()
    assert statuses[-1] == 503, statuses  # the breaker is open: chatd skips the host
    wait_until(
        lambda: any(
            r["provider"] == "edge" and r["state"] == "cooling_down"
            for r in rows(browser, "#providers tr.endpoint")
        ),
        REFRESH_SECS + MARGIN_SECS,
        "the taken-down host to show as cooling down",
    )
    took = time.monotonic() - tripped
    assert took <= REFRESH_SECS + MARGIN_SECS
    edge = next(r for r in rows(browser, "#providers tr.provider") if r["provider"] == "edge")
    assert edge["state"] == "cooling_down" and "cooling down" in edge["text"]
    assert any(r["state"] == "ok" for r in rows(browser, "#providers tr.endpoint"))
    screenshot(browser, "ui-cooling-down.png")

    # No console errors in all that (read before the deliberate 401s below).
    assert console_errors(browser) == []
    assert load.sent.get(200, 0) > 10, load.sent

    # Without the admin token, the data calls are refused, from the browser too.
    assert js_fetch_status(browser, "/ui/api/overview") == 401
    assert js_fetch_status(browser, "/ui/api/overview", "not-a-token") == 401
    assert js_fetch_status(browser, "/ui/api/overview", TOKEN) == 200
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(lambda: browser.find_element("id", "login").is_displayed(), 15, "the token form")
    assert not browser.find_element("id", "dashboard").is_displayed()


def chatd_fake_port(chatd: ChatdProcess) -> int:
    listing = httpx.get(
        chatd.url + "/v1/chat/providers", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    ).json()
    base_url = next(p["base_url"] for p in listing["providers"] if p["name"] == "ollama")
    return int(base_url.rsplit(":", 1)[1])


# -- an in-process app on a real socket: the spend panel against a stub ledger --------------


class Served:
    """`create_app(settings)` under uvicorn in a thread, on a free port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        wait_until(lambda: self.server.started, 15, "uvicorn to start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def test_spend_panel_shows_each_callers_spend_against_its_budget(browser: Any) -> None:
    settings = make_settings({"mock": {"kind": "mock"}}, default_provider="mock")
    app = create_app(settings)
    with Served(app) as served:
        for _ in range(5):
            body = {"model": "mock/echo", "messages": [{"role": "user", "content": "one two"}]}
            assert httpx.post(served.url + "/v1/chat", json=body, timeout=10).status_code == 200
        browser.get(served.url + "/ui")  # inbound auth off: no token asked
        wait_until(lambda: browser.find_element("id", "dashboard").is_displayed(), 15, "data")
        assert not browser.find_element("id", "login").is_displayed()
        wait_until(
            lambda: "No callers configured" in browser.find_element("id", "spend").text,
            10,
            "the no-ledger note",
        )

        async def report() -> list[dict[str, Any]]:  # the usage ledger's shape
            return [
                {"caller": "search-bot", "spend_usd": 7.5, "budget_usd": 10.0,
                 "input_tokens": 120000, "output_tokens": 34000, "period": "2025-06"},
                {"caller": "nightly-etl", "spend_usd": 12.25, "budget_usd": 10.0,
                 "input_tokens": 990000, "output_tokens": 5000, "period": "2025-06"},
                {"caller": "<b>odd</b>", "spend_usd": 0.0123, "budget_usd": None,
                 "input_tokens": 10, "output_tokens": 2, "period": "2025-06"},
            ]  # fmt: skip

        app.state.spend_report = report
        wait_until(
            lambda: len(rows(browser, "#spend .spend-row")) == 3,
            REFRESH_SECS + MARGIN_SECS,
            "the callers' spend",
        )
        spend = browser.find_element("id", "spend").text
        assert "search-bot" in spend and "$7.50 of $10.00 (75%)" in spend
        assert "nightly-etl" in spend and "$12.25 of $10.00 (123%)" in spend
        assert "120,000 tokens in · 34,000 out" in spend
        assert "<b>odd</b>" in spend and "no budget" in spend  # shown as text, not markup
        over = browser.find_elements("css selector", "#spend .fill.over")
        assert len(over) == 1
        assert "2025-06" in browser.find_element("id", "spend-period").text
        assert chart_counts(browser, "chart-rate")[1] > 0
        assert console_errors(browser) == []
        screenshot(browser, "ui-spend.png")


CALLERS_CONFIG = """
[chatd]
default_provider = "mock"

[chatd.callers.ops]
token_env = "UI_OPS_TOKEN"
admin = true

[chatd.callers.app]
token_env = "UI_APP_TOKEN"
budget_usd = 1000.0
budget_period = "day"

[chatd.prices]
"mock/*" = { input = 1000000, output = 2000000 }
""" + provider_toml("mock", "mock")


def test_callers_spend_from_the_ledger_shows_to_an_admin_only(browser: Any, tmp_path: Path) -> None:
    """A real chatd with callers and its SQLite ledger: the app caller's priced spend
    appears on the page of an admin; the app caller's own token is refused (401)."""
    env = {"UI_OPS_TOKEN": "ops-secret-token", "UI_APP_TOKEN": "app-secret-token"}
    with ChatdProcess(CALLERS_CONFIG, tmp_path, env=env) as chatd:
        app = {"Authorization": "Bearer app-secret-token"}
        body = {"model": "mock/echo", "messages": [{"role": "user", "content": "one two three"}]}
        for _ in range(4):  # 3 tokens in, 3 out: $3 + $6 a call at these prices
            answer = httpx.post(chatd.url + "/v1/chat", json=body, headers=app, timeout=10)
            assert answer.status_code == 200, answer.text
        refused = httpx.get(chatd.url + "/ui/api/overview", headers=app, timeout=10)
        assert refused.status_code == 401, refused.text
        ops = {"Authorization": "Bearer ops-secret-token"}
        overview = httpx.get(chatd.url + "/ui/api/overview", headers=ops, timeout=10).json()
        spend = {row["caller"]: row for row in overview["spend"]}
        assert spend["app"]["spend_usd"] == pytest.approx(36.0)
        assert spend["app"]["budget_usd"] == 1000.0
        assert spend["ops"]["spend_usd"] == 0

        browser.get(chatd.url + "/ui")
        login = wait_until(lambda: browser.find_element("id", "login"), 15, "the page")
        wait_until(login.is_displayed, 15, "the admin token form")
        browser.find_element("id", "token").send_keys("ops-secret-token\n")
        wait_until(
            lambda: (
                "$36.00 of $1,000.00" in browser.find_element("id", "spend").text
                or "$36.00 of $1000.00" in browser.find_element("id", "spend").text
            ),
            MARGIN_SECS + REFRESH_SECS * 3,
            "the app caller's spend",
        )
        text = browser.find_element("id", "spend").text
        assert "app" in text and "ops" in text
        assert "day from" in browser.find_element("id", "spend-period").text
        assert console_errors(browser) == []
        screenshot(browser, "ui-callers-spend.png")
