"""The deploy artefacts (docs/deploy.md), each checked by the tool its ecosystem trusts:
the wheel installs into a clean environment and serves, systemd-analyze accepts the unit,
hadolint the Containerfile, kubernetes-validate the manifests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

import chatd
from tests.support import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def run(*argv: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def wait_for_health(url: str, server: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read() if server.stderr else ""
        try:
            if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the installed chatd did not answer /health within {timeout}s")


def test_chatd_version_names_the_package_version() -> None:
    out = run(BIN / "chatd", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"chatd {chatd.__version__}"


def test_the_wheel_installs_into_a_clean_environment_and_serves(tmp_path: Path) -> None:
    built = run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", REPO)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("chatd-*.whl")
    assert wheel.name.startswith(f"chatd-{chatd.__version__}-")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    installed = run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel)
    assert installed.returncode == 0, installed.stderr[-2000:]
    config = tmp_path / "lakehouse.toml"
    config.write_text(
        '[chatd]\nusage_db = ""\ndefault_provider = "mock"\n\n'
        '[chatd.providers.mock]\nkind = "mock"\nreply = "from the wheel"\n'
    )
    port = free_port()
    server = subprocess.Popen(
        [venv / "bin" / "chatd", "--config", config, "--bind", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server)
        body = {"model": "anything", "messages": [{"role": "user", "content": "hi"}]}
        answer = httpx.post(f"{url}/v1/chat", json=body, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["content"] == "from the wheel"
        assert httpx.get(f"{url}/ui/", timeout=10).status_code == 200  # static files packaged
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0, server.stderr.read() if server.stderr else ""


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    unit = (DEPLOY / "chatd.service").read_text()
    # verify checks that ExecStart exists: point it at this environment's chatd
    local = tmp_path / "chatd.service"
    local.write_text(unit.replace("/opt/chatd/bin/chatd", str(BIN / "chatd")))
    out = run("systemd-analyze", "verify", local)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    directives = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert directives["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert directives["KillSignal"] == "SIGTERM" and directives["Restart"] == "on-failure"
    assert int(directives["TimeoutStopSec"]) > 30  # shutdown_grace_secs drains first
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "StateDirectory": "chatd",
    }.items():
        assert directives[key] == value, key


def test_hadolint_passes_the_containerfile() -> None:
    containerfile = DEPLOY / "Containerfile"
    out = run(BIN / "hadolint", "--failure-threshold", "style", "--no-color", containerfile)
    assert out.returncode == 0, out.stdout + out.stderr
    text = containerfile.read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") == 2  # build stage, run stage
    assert "\nUSER 10001\n" in text and "/ready" in text.split("HEALTHCHECK", 1)[1]
    assert '\nENTRYPOINT ["chatd"]\n' in text  # exec form: SIGTERM reaches chatd


def manifests() -> list[dict]:
    return [
        doc
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_kubernetes_validate_accepts_every_manifest_strictly() -> None:
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    out = run(BIN / "kubernetes-validate", "--strict", "--quiet", *files)
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = sorted(doc["kind"] for doc in manifests())
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Secret", "Secret"]
        + ["Secret", "Service", "Service"]
    )


def test_the_deployment_drains_streams_and_probes_the_right_routes() -> None:
    (deployment,) = [
        d for d in manifests() if d["metadata"]["name"] == "chatd" and d["kind"] == "Deployment"
    ]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    assert pod["terminationGracePeriodSeconds"] >= 5 + 30  # preStop + shutdown_grace_secs
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_configmaps_config_passes_check_config(tmp_path: Path) -> None:
    (configmap,) = [d for d in manifests() if d["kind"] == "ConfigMap"]
    config = tmp_path / "lakehouse.toml"
    config.write_text(configmap["data"]["lakehouse.toml"])
    tomllib.loads(config.read_text())
    env = {**os.environ, "OPENROUTER_API_KEY": "k", "CHATD_TOKEN_APP": "t"}
    out = run(BIN / "chatd", "check-config", "--config", config, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
