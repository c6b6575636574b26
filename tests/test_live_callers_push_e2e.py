"""The Redis push of live-caller changes, proved on its own: two real chatd processes and a
real Redis. While a replica's subscription is healthy it polls the database only every
SAFETY_POLL_SECS, so a change seen within 2 s, again and again, came by the push (and
`chatd_live_caller_changes_total{via}` says so); with Redis killed or frozen, polling
every 0.5 s brings changes within 2 s, and once Redis is back the push takes over again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.state.callers_sync import CHANNEL, SAFETY_POLL_SECS
from tests.redis_server import RedisServer
from tests.support import REPO, ChatdProcess, clean_env
from tests.test_live_callers_e2e import (
    SEEN_WITHIN,
    admin,
    chat,
    config,
    create,
    knows,
    replicas,
    within,
)

redis = pytest.importorskip("redis")


def scrape(gw: ChatdProcess) -> dict[str, float]:
    """The live callers' metrics: "push_up" and "push" / "poll" (changes by arrival)."""
    found = {"push_up": -1.0, "push": 0.0, "poll": 0.0}
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "chatd_live_callers_push_up":
                found["push_up"] = sample.value
            elif sample.name == "chatd_live_caller_changes_total":
                found[sample.labels["via"]] = sample.value
    return found


def pushed(*gws: ChatdProcess, up: bool = True) -> Callable[[], bool]:
    return lambda: all(scrape(gw)["push_up"] == (1.0 if up else 0.0) for gw in gws)


def cli(tmp_path: Path, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "cli.toml"
    path.write_text(config(f"sqlite:///{tmp_path / 'shared.sqlite3'}", redis_url))
    return subprocess.run(
        [sys.executable, "-m", "chatd", "callers", "--config", str(path), *args],
        capture_output=True, text=True, env=clean_env(), cwd=REPO, timeout=60,
    )  # fmt: skip


def test_changes_reach_the_other_replica_by_the_push(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    one, two = replicas(tmp_path, server.url)
    listener = redis.Redis.from_url(server.url).pubsub(ignore_subscribe_messages=True)
    try:
        listener.subscribe(CHANNEL)
        within(10.0, pushed(one, two))  # both subscribed: the database is a safety net
        before = scrape(two)

        # Five changes made on one (the last by the CLI), each honoured on two within 2 s.
        # Polling every SAFETY_POLL_SECS could bring one of them at most.
        token = create(one, "team-a")
        seen = [within(SEEN_WITHIN, lambda: knows(two, token))]
        assert admin(one, "PATCH", "/admin/callers/team-a", json={"models": ["hot"]}).is_success
        seen.append(within(SEEN_WITHIN, lambda: chat(two, token).status_code == 403))
        rotated = admin(one, "POST", "/admin/callers/team-a/tokens").json()
        new = rotated["token"]
        seen.append(within(SEEN_WITHIN, lambda: chat(two, new, "hot").status_code == 200))
        old_id = token.split("-")[1]
        assert admin(one, "DELETE", f"/admin/callers/team-a/tokens/{old_id}").is_success
        seen.append(within(SEEN_WITHIN, lambda: chat(two, token, "hot").status_code == 401))
        done = cli(tmp_path, server.url, "update", "team-a", "--disabled")
        assert done.returncode == 0 and not done.stderr, done.stderr
        seen.append(within(SEEN_WITHIN, lambda: chat(two, new, "hot").status_code == 401))
        assert sum(seen) < SAFETY_POLL_SECS

        after = scrape(two)
        assert after["push_up"] == 1.0
        arrived = {via: after[via] - before[via] for via in ("push", "poll")}
        assert arrived["push"] + arrived["poll"] == 5
        assert arrived["push"] >= 4, arrived  # one poll could at most have raced a push

        # What went over Redis: the caller's name, five times; never a token.
        heard: list[bytes] = []
        deadline = time.monotonic() + 10.0
        while len(heard) < 5 and time.monotonic() < deadline:
            message = listener.get_message(timeout=0.5)  # None for the subscription's own
            if message is not None:
                heard.append(message["data"])
        assert listener.get_message(timeout=0.2) is None  # and nothing more
        assert heard == [b"team-a"] * 5
        assert not any(secret.split("-")[2] in repr(heard) for secret in (token, new))
    finally:
        listener.close()
        one.stop()
        two.stop()
        server.stop()


def test_without_redis_polling_brings_changes_and_then_the_push_resumes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    one, two = replicas(tmp_path, server.url)
    frozen = False
    try:
        within(10.0, pushed(one, two))
        token = create(one, "team-b")
        within(SEEN_WITHIN, lambda: knows(two, token))
        rpm = 1
        for outage in ("killed", "frozen"):
            if outage == "killed":
                server.kill()  # the subscriptions' sockets close
            else:  # SIGSTOP: the sockets stay open and Redis says nothing (a partition)
                os.kill(server.proc.pid, signal.SIGSTOP)  # type: ignore[union-attr]
                frozen = True
            within(10.0, pushed(one, two, up=False))
            before = scrape(two)
            rpm = change_rpm(one, two, rpm)  # its publish fails or hangs; nobody waits on it
            assert scrape(two)["poll"] == before["poll"] + 1, outage

            if outage == "killed":
                server.start()  # the same port, empty
            else:
                os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
                frozen = False
            within(15.0, pushed(one, two))
            before = scrape(two)
            for _ in range(3):
                rpm = change_rpm(one, two, rpm)
            after = scrape(two)
            assert after["push_up"] == 1.0 and after["push"] - before["push"] >= 2, outage
            assert after["push"] + after["poll"] - before["push"] - before["poll"] == 3
    finally:
        if frozen:
            os.kill(server.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
        one.stop()
        two.stop()
        server.stop()


def change_rpm(one: ChatdProcess, two: ChatdProcess, rpm: int) -> int:
    """Raise team-b's rpm on one; wait (2 s at most) until two holds the new figure."""
    rpm += 1
    assert admin(one, "PATCH", "/admin/callers/team-b", json={"rpm": rpm}).is_success
    within(SEEN_WITHIN, lambda: admin(two, "GET", "/admin/callers/team-b").json()["rpm"] == rpm)
    return rpm
