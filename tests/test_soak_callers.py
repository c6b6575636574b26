"""The callers soak, small: many callers with limits at once; afterwards the
ledger holds one row per request answered and each caller's spend equals what the fake
upstream reported. `scripts/soak.sh callers` runs it full size."""

from __future__ import annotations

from pathlib import Path

from tests.soak_callers import run_soak


def test_callers_soak_ledger_rows_and_spend_match(tmp_path: Path) -> None:
    report = run_soak(400, 16, seed=12, workdir=tmp_path)
    print("\n" + report.format())
    assert not report.problems, report.format()
    assert report.ledger_rows == 400
    assert report.statuses["200"] > 0
    assert report.statuses["429 rate_limited"] > 0 and report.statuses["429 budget_exceeded"] > 0
