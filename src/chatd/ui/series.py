"""What the dashboard draws: per-second aggregates per provider over the last 15 minutes,
and the last errors — kept in this process, fed once per finished request.

`Activity.record` is the only thing the dashboard adds to a request: a few list and dict
operations, no lock (requests finish on the event loop's one thread), no allocation but
one small list per provider per second. Reading (`series`, `errors`) does the sums.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from typing import Any

from starlette.types import Scope

from chatd.errors import NotFound
from chatd.surfaces.operations import CLIENT_GONE
from chatd.telemetry.metrics import NO_PROVIDER

WINDOW_SECS = 900  # 15 minutes of one-second slots
ERRORS_KEPT = 50
MESSAGE_CLIP = 120  # an error's message, abbreviated (it never quotes a prompt: see below)
MODEL_CLIP = 80
NOT_FOUND = NotFound.type  # the error of a path no route serves
EWMA_ALPHA = 0.2
# Latency histogram bounds in ms: log-spaced by 1.2x from 1 ms to ~10 min, so a percentile
# read back from it is within ±10% of the truth (the bucket's geometric middle).
BOUNDS: tuple[float, ...] = tuple(1.2**i for i in range(74))


class Ring:
    """One provider's last WINDOW_SECS seconds: requests, failures, latency histograms."""

    __slots__ = ("seconds", "requests", "errors", "latency", "ewma_ms")

    def __init__(self, window: int) -> None:
        self.seconds = [-1] * window  # the epoch second each slot holds (-1: never used)
        self.requests = [0] * window
        self.errors = [0] * window
        self.latency: list[list[int] | None] = [None] * window
        self.ewma_ms: float | None = None


class Activity:
    """Per-provider time series and the last errors, for `/ui/api/overview`."""

    def __init__(
        self,
        window: int = WINDOW_SECS,
        errors_kept: int = ERRORS_KEPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.window = window
        self.clock = clock
        self.rings: dict[str, Ring] = {}
        self.recent_errors: deque[dict[str, Any]] = deque(maxlen=errors_kept)

    # -- the hot path: once per finished request ------------------------------------

    def record(self, scope: Scope, provider: str, status: int, seconds: float) -> None:
        """Count one finished request (called from `Operations.finished`)."""
        path: str = scope["path"]
        if path == "/ui" or path.startswith("/ui/"):
            return  # the dashboard watching itself would only show its own polling
        facts = (scope.get("state") or {}).get("log") or {}
        now = self.clock()
        error = facts.get("error")
        if provider != NO_PROVIDER:
            ms = seconds * 1000
            second = int(now)
            index = second % self.window
            ring = self.rings.get(provider)
            if ring is None:
                ring = self.rings[provider] = Ring(self.window)
            if ring.seconds[index] != second:  # a slot from WINDOW_SECS ago: start afresh
                ring.seconds[index] = second
                ring.requests[index] = 0
                ring.errors[index] = 0
                ring.latency[index] = [0] * len(BOUNDS)
            ring.requests[index] += 1
            if error is not None and error != CLIENT_GONE:  # a caller leaving is not a failure
                ring.errors[index] += 1
            ring.latency[index][min(bisect_left(BOUNDS, ms), len(BOUNDS) - 1)] += 1  # type: ignore[index]
            ring.ewma_ms = (
                ms if ring.ewma_ms is None else ring.ewma_ms + EWMA_ALPHA * (ms - ring.ewma_ms)
            )
        # A path no route serves is a scanner's or a typo's, not the gateway's trouble:
        # kept out, so a scan cannot push the real errors off the list.
        if status >= 400 and error != NOT_FOUND:
            self.recent_errors.append(
                {
                    "time": now,
                    "request_id": (scope.get("state") or {}).get("request_id"),
                    "route": clip(path, MODEL_CLIP),
                    "caller": facts.get("caller"),
                    "model": clip(facts.get("model"), MODEL_CLIP),
                    "provider": facts.get("provider"),
                    "status": status,
                    "type": error,
                    # The error's summary (web.note_error): the server-log wording, which
                    # leaves out an upstream body that could quote the caller's prompt.
                    "message": clip(facts.get("error_message"), MESSAGE_CLIP),
                }
            )

    # -- reading ------------------------------------------------------------------

    def ewma_ms(self, provider: str) -> float | None:
        ring = self.rings.get(provider)
        return None if ring is None or ring.ewma_ms is None else round(ring.ewma_ms, 1)

    def errors(self) -> list[dict[str, Any]]:
        """The last errors, newest first."""
        return list(reversed(self.recent_errors))

    def series(self, providers: list[str], step: int = 5) -> dict[str, Any]:
        """Each provider's requests/s, error rate and p50/p95 latency (ms) per `step`
        seconds over the window, oldest first; latency is null where nothing finished."""
        now = int(self.clock())
        points = self.window // step
        # Buckets end at the current second (inclusive): [end - step + 1, end].
        ends = [now - (points - 1 - i) * step for i in range(points)]
        out: dict[str, Any] = {}
        for name in providers:
            ring = self.rings.get(name)
            rate: list[float] = []
            error_rate: list[float | None] = []
            p50: list[float | None] = []
            p95: list[float | None] = []
            for end in ends:
                requests, errors, hist = self._bucket(ring, end - step + 1, end)
                rate.append(round(requests / step, 3))
                error_rate.append(round(errors / requests, 4) if requests else None)
                p50.append(percentile(hist, requests, 0.50))
                p95.append(percentile(hist, requests, 0.95))
            out[name] = {"rate": rate, "error_rate": error_rate, "p50_ms": p50, "p95_ms": p95}
        return {
            "step_secs": step,
            "window_secs": points * step,
            "end": now,
            "times": ends,
            "providers": out,
        }

    def _bucket(
        self, ring: Ring | None, first: int, last: int
    ) -> tuple[int, int, list[int] | None]:
        if ring is None:
            return 0, 0, None
        requests = errors = 0
        merged: list[int] | None = None
        for second in range(first, last + 1):
            index = second % self.window
            if ring.seconds[index] != second:
                continue
            requests += ring.requests[index]
            errors += ring.errors[index]
            hist = ring.latency[index]
            if hist is not None:
                merged = (
                    list(hist)
                    if merged is None
                    else [a + b for a, b in zip(merged, hist, strict=True)]
                )
        return requests, errors, merged


def percentile(hist: list[int] | None, count: int, q: float) -> float | None:
    """The `q` quantile (ms) from a BOUNDS histogram of `count` samples; None if empty."""
    if not hist or count <= 0:
        return None
    rank = max(1, math.ceil(q * count))
    seen = 0
    for index, n in enumerate(hist):
        seen += n
        if seen >= rank:
            upper = BOUNDS[index]
            lower = BOUNDS[index - 1] if index else 0.0
            return round(math.sqrt(lower * upper) if lower else upper, 1)
    return round(BOUNDS[-1], 1)


def clip(value: Any, limit: int) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value
