"""The config file, environment overrides, key resolution, registration rules."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatd.config import ConfigError, build_settings, load_settings, resolve_key
from chatd.routing.registry import Registry
from tests.support import REPO, clean_env, make_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lakehouse.toml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OLLAMA_API_KEY", "OPENROUTER_API_KEY", "OPENCODE_API_KEY", "KIMI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LAKEHOUSE_CONFIG", raising=False)


def test_builtins_exist_with_spec_defaults_when_file_omits_them() -> None:
    providers = build_settings({}).chatd.providers
    assert sorted(providers) == ["kimi", "ollama", "ollama_cloud", "opencode", "openrouter"]
    assert providers["ollama"].base_url == "http://localhost:11434"
    assert providers["ollama_cloud"].key_env == "OLLAMA_API_KEY"
    assert providers["openrouter"].base_url == "https://openrouter.ai/api/v1"
    assert providers["kimi"].key_file == "/etc/lakehouse/kimi.env"


def test_a_table_overrides_only_the_keys_it_sets() -> None:
    settings = build_settings(
        {"chatd": {"providers": {"openrouter": {"base_url": "http://127.0.0.1:9/v1"}}}}
    )
    openrouter = settings.chatd.providers["openrouter"]
    assert openrouter.base_url == "http://127.0.0.1:9/v1"
    assert openrouter.kind == "openai"
    assert openrouter.key_env == "OPENROUTER_API_KEY"


def test_shipped_lakehouse_toml_loads() -> None:
    settings = load_settings(REPO / "lakehouse.toml")
    assert settings.chatd.bind == "127.0.0.1:3220"
    assert settings.models["hot"] == ["qwen3.5:latest"]
    assert settings.models["frontier"] == ["openrouter/anthropic/claude-opus-4-7"]


def test_environment_beats_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        '[chatd]\ntimeout_secs = 5\n[chatd.providers.ollama]\nbase_url = "http://file:1"\n',
    )
    monkeypatch.setenv("CHATD_TIMEOUT_SECS", "7")
    monkeypatch.setenv("CHATD_PROVIDERS__OLLAMA__BASE_URL", "http://env:2")
    monkeypatch.setenv("CHATD_PROVIDERS__EXTRA__KIND", "mock")
    settings = load_settings(path)
    assert settings.chatd.timeout_secs == 7
    assert settings.chatd.providers["ollama"].base_url == "http://env:2"
    assert settings.chatd.providers["ollama"].kind == "ollama"
    assert settings.chatd.providers["extra"].kind == "mock"


def test_config_path_from_lakehouse_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, '[chatd]\nbind = "127.0.0.1:4000"\n')
    monkeypatch.setenv("LAKEHOUSE_CONFIG", str(path))
    assert load_settings().chatd.bind == "127.0.0.1:4000"


def test_missing_default_file_means_builtin_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.chatd.bind == "127.0.0.1:3220"
    assert settings.source == "built-in defaults"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[chatd.providers.x]\nkind = "grpc"\n', "chatd.providers.x.kind"),
        ("[chatd\nbind=", "malformed TOML"),
        ('[chatd]\ndefault_provider = "nope"\n', "chatd.default_provider"),
        ('[chatd]\nbind = "localhost"\n', "chatd.bind"),
        ('[chatd]\ntimeout_secs = "soon"\n', "chatd.timeout_secs"),
        ('[chatd.providers.Bad]\nkind = "mock"\n', "chatd.providers"),
        ("[models]\nhot = 3\n", "models.hot"),
        ("[chatd]\nusage_retention_days = -1\n", "chatd.usage_retention_days"),
        ("[chatd]\nusage_retention_days = 1.5\n", "chatd.usage_retention_days"),
        ('[chatd]\nusage_retention_days = "week"\n', "chatd.usage_retention_days"),
        ("[chatd]\nusage_retention_days = true\n", "chatd.usage_retention_days"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert names in message
    assert "\n" not in message


def test_key_from_env_then_dotenv_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "or.env"
    env_file.write_text("OPENROUTER_API_KEY=sk-from-file\n")
    settings = build_settings({"chatd": {"providers": {"openrouter": {"key_file": str(env_file)}}}})
    provider = settings.chatd.providers["openrouter"]
    assert resolve_key(provider, {}) == "sk-from-file"
    assert resolve_key(provider, {"OPENROUTER_API_KEY": "sk-from-env"}) == "sk-from-env"
    assert resolve_key(provider, {"OPENROUTER_API_KEY": ""}) == "sk-from-file"
    # python-dotenv must not export the file into the process environment
    import os

    assert "OPENROUTER_API_KEY" not in os.environ


def test_missing_or_unreadable_key_file_is_no_key(tmp_path: Path) -> None:
    settings = build_settings(
        {"chatd": {"providers": {"kimi": {"key_file": str(tmp_path / "absent.env")}}}}
    )
    assert resolve_key(settings.chatd.providers["kimi"], {}) == ""
    settings = build_settings({"chatd": {"providers": {"kimi": {"key_file": str(tmp_path)}}}})
    assert resolve_key(settings.chatd.providers["kimi"], {}) == ""


def test_dev_mode_registers_exactly_ollama() -> None:
    registry = Registry.from_settings(make_settings())
    assert list(registry.providers) == ["ollama"]


def test_registration_auto_true_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-planted")
    settings = make_settings(
        providers={
            "kimi": {"enabled": True},
            "ollama_cloud": {"enabled": "auto"},
            "openrouter": {"enabled": "auto"},
            "opencode": {"enabled": False},
        }
    )
    registry = Registry.from_settings(settings)
    assert list(registry.providers) == ["kimi", "ollama", "openrouter"]
    assert registry.providers["kimi"].available is False
    assert registry.providers["openrouter"].available is True


def test_ollama_can_be_disabled() -> None:
    registry = Registry.from_settings(make_settings(providers={"ollama": {"enabled": False}}))
    assert registry.providers == {}


def test_bad_config_exits_fast_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, '[chatd.providers.x]\nkind = "grpc"\nkey_env = "X_KEY"\n')
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "chatd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=10,
        env=clean_env(X_KEY="sk-planted-secret-value"),
    )
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 1.5  # one second plus interpreter start-up slack on a loaded box
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "chatd.providers.x.kind" in lines[0]
    assert "Traceback" not in proc.stderr
    assert "sk-planted-secret-value" not in proc.stderr + proc.stdout
