"""`/health`, `/ready` and `/v1/chat/providers` as the contract publishes them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str
    default: str
    auth: str | None = Field(
        default=None,
        description='"off" when allow_unauthenticated = true and no caller or token is '
        "configured: anyone who reaches chatd may call it.",
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
