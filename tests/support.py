"""Helpers for end-to-end tests: a real `chatd` process on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from chatd.config import Settings, build_settings

REPO = Path(__file__).resolve().parent.parent
# Variables a developer's shell may carry that would change what chatd registers.
SCRUBBED = (
    "OLLAMA_API_KEY",
    "OPENROUTER_API_KEY",
    "OPENCODE_API_KEY",
    "KIMI_API_KEY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_SERVICE_NAME",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CHATD_") and k not in SCRUBBED and k != "LAKEHOUSE_CONFIG"
    }
    env.update(extra)
    return env


class ChatdProcess:
    """`python -m chatd --config <file>` as a child process, stderr captured to a file."""

    def __init__(
        self,
        config: str,
        tmp_path: Path,
        *,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_path / f"chatd-{self.port}.toml"
        self.config_path.write_text(config)
        self.log_path = tmp_path / f"chatd-{self.port}.log"
        self.env = clean_env(**(env or {}))
        if "usage_db" not in config and "CHATD_USAGE_DB" not in self.env:
            # The default ledger is a file in the working directory (the repo, here):
            # each test's chatd keeps its own in the test's tmp dir instead.
            self.env["CHATD_USAGE_DB"] = f"sqlite:///{tmp_path / f'usage-{self.port}.sqlite3'}"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ChatdProcess:
        cmd = [
            sys.executable, "-m", "chatd", "--config", str(self.config_path),
            "--bind", f"127.0.0.1:{self.port}", *self.args,
        ]  # fmt: skip
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chatd exited {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"chatd did not answer /health within {timeout}s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ChatdProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def provider_toml(name: str, kind: str, base_url: str = "", **keys: Any) -> str:
    """A `[chatd.providers.<name>]` table."""
    lines = [f"[chatd.providers.{name}]", f'kind = "{kind}"']
    if base_url:
        lines.append(f'base_url = "{base_url}"')
    for key, value in keys.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


def make_settings(
    providers: dict[str, dict[str, Any]] | None = None,
    models: dict[str, Any] | None = None,
    **chatd: Any,
) -> Settings:
    """Settings from a dict shaped like lakehouse.toml; the process env is not read.

    Upstream calls use httpx's own transport so respx can intercept them; no usage ledger.
    """
    chatd.setdefault("upstream_transport", "httpx")
    chatd.setdefault("usage_db", "")  # in-process apps: no ledger file unless a test asks
    return build_settings(
        {"models": models or {}, "chatd": {**chatd, "providers": providers or {}}}
    )


def nginx_conf(tmp: Path, http: str) -> str:
    """A foreground nginx config that keeps every file under `tmp`, with `http` (the
    test's upstream and server blocks) inside its `http {}`."""
    return (
        "daemon off;\nmaster_process off;\nworker_processes 1;\n"
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {tmp}/access.log;\n"
        + "".join(
            f"    {kind}_temp_path {tmp}/{kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + http
        + "}\n"
    )


@contextmanager
def running_nginx(tmp: Path, config: Callable[[Path, int], str]) -> Iterator[str]:
    """A real nginx with `config(tmp, port)` on a free port; yields its base URL and stops
    it on the way out (skips the test when nginx is not installed)."""
    import pytest

    binary = shutil.which("nginx")
    if binary is None:
        pytest.skip("nginx is not on PATH (install it, e.g. `apt-get install nginx`)")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(config(tmp, port))
    log = open(tmp / "stderr.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [binary, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(proc, port, tmp)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: fast shutdown
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_for_port(proc: subprocess.Popen[bytes], port: int, tmp: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            logs = "".join(
                p.read_text(errors="replace") for p in (tmp / "stderr.log", tmp / "error.log")
                if p.exists()
            )  # fmt: skip
            raise RuntimeError(f"nginx exited {proc.returncode}: {logs}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nginx did not listen within 10s")
