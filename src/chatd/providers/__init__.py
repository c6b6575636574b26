"""Provider kinds, by the `kind` name used in config."""

from __future__ import annotations

from .base import Attribution, Provider
from .mock import MockProvider
from .ollama import OllamaProvider
from .ollama_cloud import OllamaCloudProvider
from .openai import OpenAIProvider

KINDS: dict[str, type[Provider]] = {
    "ollama": OllamaProvider,
    "ollama_cloud": OllamaCloudProvider,
    "openai": OpenAIProvider,
    "mock": MockProvider,
}

__all__ = ["KINDS", "Attribution", "Provider"]
