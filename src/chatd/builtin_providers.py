"""The providers chatd knows with no config at all (docs/configuration.md): a local
Ollama, and the keyed vendors that register once their key resolves."""

from __future__ import annotations

from typing import Any

BUILTIN_PROVIDERS: dict[str, dict[str, Any]] = {
    "ollama": {"kind": "ollama", "base_url": "http://localhost:11434"},
    "ollama_cloud": {
        "kind": "ollama_cloud",
        "base_url": "https://ollama.com",
        "key_env": "OLLAMA_API_KEY",
        "key_file": "/etc/lakehouse/ollama_cloud.env",
    },
    "openrouter": {
        "kind": "openai",
        "base_url": "https://openrouter.ai/api/v1",
        "key_env": "OPENROUTER_API_KEY",
        "key_file": "/etc/lakehouse/openrouter.env",
    },
    "opencode": {
        "kind": "openai",
        "base_url": "https://opencode.ai/zen/v1",
        "key_env": "OPENCODE_API_KEY",
        "key_file": "/etc/lakehouse/opencode.env",
    },
    "kimi": {
        "kind": "openai",
        "base_url": "https://api.kimi.com/coding/v1",
        "key_env": "KIMI_API_KEY",
        "key_file": "/etc/lakehouse/kimi.env",
    },
}
