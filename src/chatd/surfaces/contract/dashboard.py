"""The dashboard's data routes as the contract publishes them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class DashboardAccess(BaseModel):
    token_required: bool


class DashboardOverview(BaseModel):
    """What `/ui` draws (ui/overview.py): this worker's view."""

    model_config = ConfigDict(extra="allow")

    time: float
    refresh_ms: int
    worker: dict[str, Any]
    default: str
    providers: list[dict[str, Any]]
    series: dict[str, Any]
    errors: list[dict[str, Any]]
    spend: list[dict[str, Any]] | None
