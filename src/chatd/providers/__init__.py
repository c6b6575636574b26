"""Provider kinds, by the `kind` name used in config."""

from __future__ import annotations

from chatd.providers.base import Attribution, Provider
from chatd.providers.mock import MockProvider
from chatd.providers.ollama import OllamaProvider
from chatd.providers.ollama_cloud import OllamaCloudProvider
from chatd.providers.openai import OpenAIProvider

KINDS: dict[str, type[Provider]] = {
    "ollama": OllamaProvider,
    "ollama_cloud": OllamaCloudProvider,
    "openai": OpenAIProvider,
    "mock": MockProvider,
}

__all__ = ["KINDS", "Attribution", "Provider"]
