"""Prometheus metrics for `GET /metrics` (docs/operations.md), and the per-provider counters that
`/v1/chat/providers` shows.

Under `chatd --workers N` the CLI points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory
before the workers start: every worker then writes its samples to files there (the
prometheus-client multiprocess mode) and whichever worker answers `/metrics` sums them all.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from chatd.telemetry.observer import Observer

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format, which every Prometheus reads (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NO_PROVIDER = "none"  # the provider label of requests that reached none (400s, /health, ...)
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics(Observer):
    """chatd's Prometheus metrics; also the dispatcher's observer (retries, fallbacks,
    cooldowns, upstream latency, in-flight calls).

    Labels are bounded: routes are the app's own (else "unmatched"), providers the
    configured ones, statuses HTTP's. Labelled children are cached so the hot path is a
    dict lookup and an increment.
    """

    def __init__(self, providers: Iterable[str] = (), *, multiprocess: bool | None = None):
        if multiprocess is None:
            multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.multiprocess = multiprocess
        # Multiprocess samples live in files, read back at scrape time; a registry per app
        # otherwise, so apps built side by side (tests) do not share counts.
        registry = None if multiprocess else CollectorRegistry()
        self.registry = registry
        self.requests = Counter(
            "chatd_requests",
            "Requests answered, by route, provider and HTTP status.",
            ("route", "provider", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "chatd_request_duration_seconds",
            "Wall time of requests that reached a provider (a stream: until it ended).",
            ("provider",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "chatd_upstream_duration_seconds",
            "Each upstream call, retries included, until it answered or failed "
            "(a stream: until its first event).",
            ("provider",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "chatd_stream_ttft_seconds",
            "Streams: time from the request to its first content sent to the caller.",
            ("provider",),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "chatd_tokens",
            "Tokens as the upstream counted them: direction in = prompt, out = completion.",
            ("provider", "direction"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "chatd_in_flight_requests",
            "Upstream calls and open streams in progress, by provider.",
            ("provider",),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.retries = Counter(
            "chatd_retries",
            "Upstream calls retried, by provider.",
            ("provider",),
            registry=registry,
        )
        self.fallbacks = Counter(
            "chatd_fallbacks", "Requests moved on to their next fallback target.", registry=registry
        )
        self.cooldowns = Counter(
            "chatd_cooldowns",
            "Cooldowns begun: a provider skipped after consecutive failures.",
            ("provider",),
            registry=registry,
        )
        # requests by caller (only when callers are configured), ledger drops.
        self.caller_requests = Counter(
            "chatd_caller_requests",
            "Requests answered to named callers, by caller and HTTP status.",
            ("caller", "status"),
            registry=registry,
        )
        self.usage_dropped = Counter(
            "chatd_usage_rows_dropped",
            "Usage ledger rows dropped because the in-memory buffer was full.",
            registry=registry,
        )
        self.usage_pruned = Counter(
            "chatd_usage_rows_pruned",
            "Usage ledger rows deleted past usage_retention_days (their daily sums stay).",
            registry=registry,
        )
        self.usage_backfill = Gauge(
            "chatd_usage_backfill_pending",
            "Days of an older ledger left to sum into chatd_usage_daily (0 when done).",
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.live_changes = Counter(
            "chatd_live_caller_changes",
            "Live-caller changes made elsewhere, taken in by how they first arrived: "
            "push (Redis) or poll (the database).",
            ("via",),
            registry=registry,
        )
        self.live_push_up: Gauge | None = None  # made when redis_url is set
        # For providers with several endpoints: separate families, so the
        # provider-labelled series above keep their labels (and their dashboards).
        self.endpoint_upstream_seconds = Histogram(
            "chatd_endpoint_upstream_duration_seconds",
            "Each upstream call to one endpoint of a balanced provider (see "
            "chatd_upstream_duration_seconds).",
            ("provider", "endpoint"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.endpoint_in_flight = Gauge(
            "chatd_endpoint_in_flight_requests",
            "Upstream calls and open streams in progress, by endpoint of a balanced provider.",
            ("provider", "endpoint"),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.hedges = Counter(
            "chatd_hedges",
            'Hedged calls, by provider; outcome "won": the hedge answered first.',
            ("provider", "outcome"),
            registry=registry,
        )
        # The cache and shared state (set only when the cache / redis_url is configured)
        self.cache_results = Counter(
            "chatd_cache",
            "Answers to cacheable requests, by result: hit, miss, bypass.",
            ("result",),
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "chatd_cache_bytes",
            "Bytes held by the in-process response cache (with Redis: its fallback's).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.shared_state_up: Gauge | None = None  # made by shared_up: only with redis_url
        # docs/reload.md: a generation per worker (pid-labelled under --workers N).
        self.config_reloads = Counter(
            "chatd_config_reloads",
            "Configuration reloads, by outcome (ok, or rejected: the old one kept serving).",
            ("outcome",),
            registry=registry,
        )
        self.config_generation = Gauge(
            "chatd_config_generation",
            "The generation of the configuration in force (1 at start, +1 per reload).",
            multiprocess_mode="liveall",
            registry=registry,
        )
        self.config_generation.set(1)
        for outcome in ("ok", "rejected"):
            self.config_reloads.labels(outcome)
        self._children: dict[tuple[Any, ...], Any] = {}
        for name in providers:  # zero-valued series from the start, so rate() works
            for metric in (self.in_flight, self.retries, self.cooldowns):
                self._child(metric, name)
            self._child(self.tokens, name, "in")
            self._child(self.tokens, name, "out")

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # -- per request -------------------------------------------------------------

    def request_finished(
        self,
        route: str,
        provider: str,
        status: int,
        seconds: float,
        ttft_ms: Any = None,
        input_tokens: Any = None,
        output_tokens: Any = None,
    ) -> None:
        self._child(self.requests, route, provider, str(status)).inc()
        if provider == NO_PROVIDER:
            return
        self._child(self.request_seconds, provider).observe(seconds)
        if isinstance(ttft_ms, int | float):
            self._child(self.ttft_seconds, provider).observe(ttft_ms / 1000)
        if isinstance(input_tokens, int) and input_tokens > 0:
            self._child(self.tokens, provider, "in").inc(input_tokens)
        if isinstance(output_tokens, int) and output_tokens > 0:
            self._child(self.tokens, provider, "out").inc(output_tokens)

    def caller_finished(self, caller: str, status: int) -> None:
        self._child(self.caller_requests, caller, str(status)).inc()

    def usage_row_dropped(self) -> None:
        self.usage_dropped.inc()

    def usage_rows_pruned(self, rows: int) -> None:
        self.usage_pruned.inc(rows)

    def usage_backfill_pending(self, days: float) -> None:
        self.usage_backfill.set(days)

    # -- the dispatcher's observer -----------------------------------------------

    def upstream_call(self, provider: str, seconds: float) -> None:
        self._child(self.upstream_seconds, provider).observe(seconds)

    def busy(self, provider: str, calls: int) -> None:
        self._child(self.in_flight, provider).set(calls)

    def retried(self, provider: str) -> None:
        self._child(self.retries, provider).inc()

    def fell_back(self) -> None:
        self.fallbacks.inc()

    def cooled_down(self, provider: str) -> None:
        self._child(self.cooldowns, provider).inc()

    def endpoint_call(self, provider: str, endpoint: str, seconds: float) -> None:
        self._child(self.endpoint_upstream_seconds, provider, endpoint).observe(seconds)

    def endpoint_busy(self, provider: str, endpoint: str, calls: int) -> None:
        self._child(self.endpoint_in_flight, provider, endpoint).set(calls)

    def hedged(self, provider: str, outcome: str) -> None:
        self._child(self.hedges, provider, outcome).inc()

    def cache_result(self, result: str) -> None:
        self._child(self.cache_results, result).inc()

    def reloaded(self, outcome: str, generation: int) -> None:
        self.config_reloads.labels(outcome).inc()
        self.config_generation.set(generation)

    def live_caller_changed(self, via: str) -> None:
        self._child(self.live_changes, via).inc()

    def live_callers_pushed(self, up: bool) -> None:
        if self.live_push_up is None:
            self.live_push_up = Gauge(
                "chatd_live_callers_push_up",
                "1 while live-caller changes arrive through Redis (the database is polled "
                "every 15 s), 0 while it is polled every 0.5 s.",
                multiprocess_mode="livemin",
                registry=self.registry,
            )
        self.live_push_up.set(1 if up else 0)

    def shared_up(self, up: bool) -> None:
        if self.shared_state_up is None:
            self.shared_state_up = Gauge(
                "chatd_shared_state_up",
                "1 while Redis serves the shared state, 0 while chatd runs on in-process state.",
                multiprocess_mode="livemin",
                registry=self.registry,
            )
        self.shared_state_up.set(1 if up else 0)

    # -- exposition --------------------------------------------------------------

    async def exposition(self) -> bytes:
        """The Prometheus text format; summed over all workers in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)  # type: ignore[arg-type]
        return await asyncio.to_thread(collect_all_workers)

    def close(self) -> None:
        """This worker is going away: its in-flight gauge must stop counting."""
        if self.multiprocess:
            prometheus_multiprocess.mark_process_dead(os.getpid())


class ConnectionMetrics:
    """What the server's doorway counts (docs/exposing.md): one per worker process, made by
    it; `registry` is the app's (None in multiprocess mode, where files carry them)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.open = Gauge(
            "chatd_connections_open",
            "Client connections held open (each worker holds at most max_connections).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.slow = Counter(
            "chatd_connections_closed_slow",
            "Connections closed for slowness: request headers not in within "
            "header_timeout_secs, or a body not within timeout_secs.",
            ("phase",),
            registry=registry,
        )
        self.refused = Counter(
            "chatd_connections_refused",
            "Connections refused at max_connections, answered 503 with Retry-After: 1.",
            registry=registry,
        )
        for phase in ("headers", "body"):  # zero-valued series from the start
            self.slow.labels(phase)


def collect_all_workers() -> bytes:
    registry = CollectorRegistry()
    prometheus_multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


class ProviderStats:
    """Per-provider counters for `/v1/chat/providers`: requests that reached the provider,
    those that ended in an error, and the median latency of the last WINDOW of them.

    Kept per process: under `--workers N` they are the answering worker's (`/metrics`
    has the totals).
    """

    WINDOW = 256

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}  # name -> [requests, errors]
        self._latencies: dict[str, deque[float]] = {}

    def record(self, provider: str, latency_ms: float, failed: bool) -> None:
        counts = self._counts.get(provider)
        if counts is None:
            counts = self._counts[provider] = [0, 0]
            self._latencies[provider] = deque(maxlen=self.WINDOW)
        counts[0] += 1
        if failed:
            counts[1] += 1
        self._latencies[provider].append(latency_ms)

    def describe(self, provider: str) -> dict[str, Any]:
        requests, errors = self._counts.get(provider, (0, 0))
        latencies = sorted(self._latencies.get(provider, ()))
        p50 = round(latencies[(len(latencies) - 1) // 2]) if latencies else None
        return {"requests": requests, "errors": errors, "p50_latency_ms": p50}
