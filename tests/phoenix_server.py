"""A real Arize Phoenix (the trace backend the tracing tests read spans back from), on free
ports in a temporary directory; stopped afterwards. `scripts/test.sh` installs it in its
own virtual environment, `.venv-phoenix` (its dependencies would clash with chatd's)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support import REPO, free_port

PHOENIX = Path(os.environ.get("CHATD_PHOENIX", REPO / ".venv-phoenix" / "bin" / "phoenix"))


def phoenix_installed() -> bool:
    return PHOENIX.exists() or shutil.which(str(PHOENIX)) is not None


class Phoenix:
    """`phoenix serve` on 127.0.0.1: OTLP/HTTP at `url/v1/traces`, spans at `spans()`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> Phoenix:
        env = {
            **os.environ,
            "PHOENIX_WORKING_DIR": str(self.workdir),
            "PHOENIX_HOST": "127.0.0.1",
            "PHOENIX_PORT": str(self.port),
            "PHOENIX_GRPC_PORT": str(free_port()),
            "PHOENIX_TELEMETRY_ENABLED": "false",
        }
        log = open(self.workdir / "phoenix.log", "wb")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [str(PHOENIX), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"phoenix exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/projects", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"phoenix did not start within {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.workdir / "phoenix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spans(self, trace_id: str | None = None) -> list[dict[str, Any]]:
        """Every span Phoenix stored in the default project (of one trace, if given)."""
        found: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = httpx.get(f"{self.url}/v1/projects/default/spans", params=params, timeout=10)
            page.raise_for_status()
            body = page.json()
            found.extend(body["data"])
            cursor = body.get("next_cursor")
            if not cursor:
                break
        if trace_id is not None:
            found = [s for s in found if s["context"]["trace_id"] == trace_id]
        return found

    def wait_for(self, trace_id: str, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The trace's spans once at least `count` have arrived (export is batched)."""
        deadline = time.monotonic() + timeout
        spans: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            spans = self.spans(trace_id)
            if len(spans) >= count:
                time.sleep(0.3)  # a straggler of the same batch
                return self.spans(trace_id)
            time.sleep(0.2)
        raise AssertionError(f"{len(spans)} of {count} spans of {trace_id} arrived: {spans}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
