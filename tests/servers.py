"""Real database servers for tests: PostgreSQL from Debian's `postgresql` package, run by
the test as the `postgres` user, in a temporary directory, on a free port."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import free_port

PG_USER = "postgres"


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<ver>/bin holding initdb and postgres."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "postgres")):
            return Path(folder)
    return None


def skip_reason() -> str | None:
    if postgres_bin() is None:
        return "PostgreSQL is not installed (scripts/test.sh installs Debian's postgresql)"
    try:
        import pwd

        pwd.getpwnam(PG_USER)
    except KeyError:
        return "no postgres user (it comes with Debian's postgresql package)"
    if os.geteuid() != 0:
        return "starting PostgreSQL as the postgres user needs root"
    return None


class PostgresServer:
    """`initdb` into a tmp dir, `postgres -p <free port>`; `kill()` it (SIGKILL, no
    shutdown) and `start()` it again on the same port; `stop()` removes everything."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        assert bin_dir is not None
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="chatd-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        shutil.chown(self.root, PG_USER, PG_USER)
        self.dsn = f"postgresql://{PG_USER}@127.0.0.1:{self.port}/chatd"

    def _run(self, *cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, user=PG_USER, cwd=self.root)

    def init(self) -> PostgresServer:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        self.start()
        self._run(
            str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER,
            "chatd",
        )  # fmt: skip
        return self

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.root / "postgres.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            ],
            stdout=log, stderr=log, user=PG_USER, cwd=self.root, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log()[-2000:]}")
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres did not start: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """Gone at once, like a crashed host: every postgres process, SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        # The backends follow their postmaster; wait until the port is free again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._pids():
            time.sleep(0.05)

    def _pids(self) -> bool:
        if self.proc is None:
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
