"""`/health`, `/ready` and `/v1/chat/providers` as the contract publishes them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    status: str


class ConfigGeneration(BaseModel):
    generation: int = Field(description="1 at start, one more per reload that took.")
    loaded_at: str = Field(description="When it was loaded (RFC 3339, UTC).")
    sha256: str = Field(description='The config file\'s SHA-256 ("" with no file).')


class Reloaded(BaseModel):
    status: str
    config: ConfigGeneration


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    default: str
    auth: str | None = Field(
        default=None,
        description='"off" when allow_unauthenticated = true and no caller or token is '
        "configured: anyone who reaches chatd may call it.",
    )
    config: ConfigGeneration | None = Field(
        default=None, description="The configuration in force (docs/reload.md)."
    )
    providers: dict[str, dict[str, Any]] | None = Field(
        default=None, description="With ?probe=1: each registered provider's reachability."
    )


class ProviderEntry(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    base_url: str
    available: bool
    requests: int
    errors: int
    p50_latency_ms: float | None


class ProviderListing(BaseModel):
    default: str
    providers: list[ProviderEntry]
    config: ConfigGeneration | None = None
