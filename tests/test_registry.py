"""Which provider serves a model name, and what name goes upstream."""

from __future__ import annotations

import pytest

from chatd.errors import InvalidRequest, ProviderDisabled, ProviderNotFound
from chatd.routing.registry import Registry
from tests.support import make_settings


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.setenv("OLLAMA_API_KEY", "ok-cloud")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or")
    monkeypatch.delenv("OPENCODE_API_KEY", raising=False)
    monkeypatch.delenv("KIMI_API_KEY", raising=False)
    settings = make_settings(
        providers={
            "kimi": {"enabled": True, "key_file": ""},
            "opencode": {"key_file": ""},
            "vllm": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"},
        },
        models={
            "hot": "qwen3.5:latest",
            "oversight": "kimi-k2.6:cloud",
            "frontier": "openrouter/anthropic/claude-opus-4-7",
        },
    )
    return Registry.from_settings(settings)


def resolved(registry: Registry, model: str) -> tuple[str, str]:
    route = registry.resolve(model)
    return route.provider.name, route.model


@pytest.mark.parametrize(
    ("model", "provider", "upstream"),
    [
        ("qwen3.5:latest", "ollama", "qwen3.5:latest"),
        ("ollama/qwen3.5:latest", "ollama", "qwen3.5:latest"),
        ("kimi-k2.6:cloud", "ollama_cloud", "kimi-k2.6"),
        ("gpt-oss:120b-cloud", "ollama", "gpt-oss:120b-cloud"),
        ("ollama/glm-4.6:cloud", "ollama", "glm-4.6:cloud"),
        ("ollama_cloud/gpt-oss:120b", "ollama_cloud", "gpt-oss:120b"),
        ("openrouter/anthropic/claude-opus-4-7", "openrouter", "anthropic/claude-opus-4-7"),
        ("openrouter/openrouter/auto", "openrouter", "openrouter/auto"),
        ("unknown/x", "ollama", "unknown/x"),
        ("vllm/meta/llama", "vllm", "meta/llama"),
        ("  qwen3.5:latest  ", "ollama", "qwen3.5:latest"),
        ("hot", "ollama", "qwen3.5:latest"),
        ("oversight", "ollama_cloud", "kimi-k2.6"),
        ("frontier", "openrouter", "anthropic/claude-opus-4-7"),
    ],
)
def test_routing_table(registry: Registry, model: str, provider: str, upstream: str) -> None:
    assert resolved(registry, model) == (provider, upstream)


def test_configured_but_unregistered_prefix_is_404(registry: Registry) -> None:
    with pytest.raises(ProviderNotFound, match="opencode is not registered"):
        registry.resolve("opencode/big-pickle")


def test_cloud_suffix_without_cloud_provider_is_404(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)
    registry = Registry.from_settings(make_settings(providers={"ollama_cloud": {"key_file": ""}}))
    with pytest.raises(ProviderNotFound) as info:
        registry.resolve("x:cloud")
    assert info.value.message == (
        'no registered provider for model "x:cloud" (ollama_cloud is not registered)'
    )
    assert info.value.param == "model"


def test_registered_provider_without_key_is_503(registry: Registry) -> None:
    with pytest.raises(ProviderDisabled, match="KIMI_API_KEY"):
        registry.resolve("kimi/kimi-for-coding")


@pytest.mark.parametrize("model", ["", "   ", "ollama/"])
def test_empty_model_is_400(registry: Registry, model: str) -> None:
    with pytest.raises(InvalidRequest):
        registry.resolve(model)


def test_listing_is_sorted_and_keyless(registry: Registry) -> None:
    listing = registry.listing()
    names = [p["name"] for p in listing["providers"]]  # type: ignore[index]
    assert names == ["kimi", "ollama", "ollama_cloud", "openrouter", "vllm"]
    assert listing["default"] == "ollama"
    text = repr(listing)
    assert "sk-or" not in text and "ok-cloud" not in text
    for entry in listing["providers"]:  # type: ignore[union-attr]
        assert set(entry) == {"name", "kind", "base_url", "available"}


def test_operator_default_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry.from_settings(
        make_settings(providers={"local": {"kind": "mock"}}, default_provider="local")
    )
    assert resolved(registry, "anything") == ("local", "anything")
