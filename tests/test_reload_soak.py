"""A short reload soak in the test run (the full one: scripts/reload_soak.sh): 8 callers,
streamed and not, while six reloads by SIGHUP, POST /admin/reload and watch_config each
remove the provider they are using. Nothing fails, no stream is cut, and every ledger
row is priced by the config its request started on."""

from __future__ import annotations

from pathlib import Path

from tests.soak_reload import run


def test_reloads_under_load_fail_nothing_and_price_by_the_starting_config(
    tmp_path: Path,
) -> None:
    report = run(seconds=7, reloads=6, callers=8, tmp=tmp_path)
    assert report["ok"], report
    assert report["reloads_taken"] == {"SIGHUP": 2, "admin": 2, "file": 2}
    assert report["streams"] > 0 and report["requests"] > report["streams"]
