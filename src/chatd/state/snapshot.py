"""The configuration a request runs on: one object, taken once at its start.

A reload (docs/reload.md) builds a new `Snapshot` beside the one in force and replaces
`Current.snapshot` in one assignment; requests already running keep the one they took.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from chatd.config import Settings
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.state.cache import ResponseCache
from chatd.state.usage.prices import Prices

SCOPE_KEY = "config"  # where the request's snapshot sits in `scope["state"]`


@dataclass(slots=True, eq=False)
class Snapshot:
    """One generation of the configuration. Nothing in it changes once built, except
    `in_flight`: the requests running on it (so its retired providers know when to close)."""

    settings: Settings
    registry: Registry
    dispatcher: Dispatcher
    prices: Prices
    cache: ResponseCache | None
    generation: int = 1
    loaded_at: float = 0.0  # Unix time
    sha256: str = ""  # of the config file's bytes ("" with no file)
    admin_token: str = field(default="", repr=False)  # `$admin_token_env`, "" = none
    in_flight: int = 0

    def describe(self) -> dict[str, Any]:
        """`config` in `/ready` and `/v1/chat/providers`."""
        loaded = datetime.fromtimestamp(self.loaded_at, UTC).isoformat(timespec="milliseconds")
        return {
            "generation": self.generation,
            "loaded_at": loaded.replace("+00:00", "Z"),
            "sha256": self.sha256,
        }


class Current:
    """The snapshot in force; a reload replaces `snapshot`, nothing else."""

    __slots__ = ("snapshot",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot


def snapshot_of(request: Request) -> Snapshot:
    """The snapshot this request took when it arrived (see web.RequestContext)."""
    snapshot: Snapshot = request.scope["state"][SCOPE_KEY]
    return snapshot
