"""Operations (docs/operations.md): `GET /metrics`, `GET /ready`, and what each finished request
leaves behind — its log line, its metrics, its provider's counters.

`create_app` builds one `Operations` and hands `finished` and `authorize` to the request
middleware (`web.RequestContext`), so every route, present or added later, is logged,
counted and (when inbound auth is on) guarded by the same code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.responses import Response
from starlette.types import Scope

from chatd.config import Settings
from chatd.errors import NotReady
from chatd.providers.failures import describe_failure, is_timeout
from chatd.routing.registry import Registry
from chatd.state.admin_auth import AdminAuth, admin_token
from chatd.state.auth import BearerAuth, auth_tokens, serves_open
from chatd.state.callers import Callers
from chatd.state.callers_store import open_store
from chatd.state.callers_sync import LiveCallers
from chatd.state.snapshot import SCOPE_KEY, Current, Snapshot
from chatd.state.usage.ledger import Ledger
from chatd.state.usage.prices import Prices
from chatd.surfaces.contract.common import error_responses, ok
from chatd.surfaces.contract.operations import Readiness
from chatd.telemetry.metrics import CONTENT_TYPE, NO_PROVIDER, Metrics, ProviderStats
from chatd.telemetry.requestlog import REQUEST_LOGGER, log_request, request_line
from chatd.web import error_response, json_response

PROBE_TIMEOUT_SECS = 2.0
CLIENT_GONE = "client_gone"  # the error noted when the caller disconnected first
UNMATCHED = "unmatched"  # the route label of paths no route serves (bounded cardinality)

log = logging.getLogger("chatd")


class Operations:
    """Metrics, the request log, per-provider counters, readiness and inbound auth."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self._registry = registry
        # The configuration in force (set by create_app); a reload replaces its snapshot.
        self.current: Current | None = None
        self.metrics = Metrics(registry.providers)
        self.stats = ProviderStats()
        self.request_log = logging.getLogger(REQUEST_LOGGER)
        tokens = auth_tokens(settings)
        # named callers (with auth_tokens_env's tokens as "default"), else the inbound-auth
        # bearer tokens. Auth on with no token (start-up refuses that; see
        # auth.check_auth_config) still fails closed here: nobody gets in.
        usage_db = settings.chatd.usage_db
        self.callers = Callers.from_settings(settings, always=bool(usage_db))
        # Live callers (docs/live-callers.md): kept in memory, refreshed from the database.
        self.live = (
            LiveCallers(open_store(usage_db), self.callers, self._load_spend,
                        settings.chatd.redis_url, self.metrics.live_caller_changed,
                        self.metrics.live_callers_pushed)
            if usage_db and self.callers is not None
            else None
        )  # fmt: skip
        self.admin_auth = AdminAuth(self.callers, admin_token(settings))
        self.authorize: Any = None
        if self.callers is not None:
            self.authorize = self.callers.authorize
        elif tokens is not None:
            self.authorize = BearerAuth(tokens)
        self.prices = Prices(settings.chatd.prices)
        self.ledger = (
            Ledger(settings.chatd.usage_db, settings.chatd.usage_buffer_rows,
                   self.metrics.usage_row_dropped, settings.chatd.usage_retention_days,
                   self.metrics.usage_rows_pruned, self.metrics.usage_backfill_pending)
            if settings.chatd.usage_db
            else None
        )  # fmt: skip
        self.billing = self.ledger is not None or self.callers is not None
        self.shutdown_grace = settings.chatd.shutdown_grace_secs
        self.open_gateway = serves_open(settings)  # /ready says "auth": "off"
        self._app: FastAPI | None = None
        self._routes: frozenset[str] = frozenset()
        self._probing: asyncio.Task[dict[str, Any]] | None = None
        # Told of every finished request (scope, provider, status, seconds): the
        # dashboard's ring buffer (ui/series.py) when it is installed, else nothing.
        self.on_finished: Callable[[Scope, str, int, float], None] | None = None
        self.shared: Any = None  # the Redis store, probed by /ready?probe=1

    @property
    def snapshot(self) -> Snapshot | None:
        return self.current.snapshot if self.current is not None else None

    @property
    def registry(self) -> Registry:
        """The registry in force (the snapshot's, once there is one)."""
        snapshot = self.snapshot
        return snapshot.registry if snapshot is not None else self._registry

    @property
    def balancers(self) -> Mapping[str, Any]:
        """The dispatcher's balancers (docs/routing.md): their endpoints join the listing."""
        snapshot = self.snapshot
        return snapshot.dispatcher.balancers if snapshot is not None else {}

    def install(self, app: FastAPI) -> None:
        """Add `/metrics` and `/ready`; learn the app's routes (for the route label)."""

        @app.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(await self.metrics.exposition(), media_type=CONTENT_TYPE)

        @app.get(
            "/ready",
            operation_id="ready",
            responses={**ok(Readiness, "Ready to serve"), **error_responses(503)},
        )
        async def ready(request: Request, probe: str | None = None) -> Response:
            return await self.readiness(request, probe not in (None, "", "0", "false"))

        self._app = app

    # -- per request ----------------------------------------------------------------

    def finished(self, scope: Scope, status: int, seconds: float) -> None:
        """Called by the middleware once the response has ended (a stream: its last byte)."""
        try:
            self._account(scope, status or 499, seconds)  # no response at all: caller left
        except Exception:  # accounting must never take a request down
            log.exception("request accounting failed")

    def _account(self, scope: Scope, status: int, seconds: float) -> None:
        facts = (scope.get("state") or {}).get("log") or {}
        provider = facts.get("provider") or NO_PROVIDER
        self.metrics.request_finished(
            self._route_label(scope),
            provider,
            status,
            seconds,
            facts.get("ttft_ms"),
            facts.get("input_tokens"),
            facts.get("output_tokens"),
        )
        if provider != NO_PROVIDER:
            # A caller that hung up is not the provider's failure.
            failed = facts.get("error") not in (None, CLIENT_GONE)
            self.stats.record(provider, seconds * 1000, failed)
        if self.billing:
            self._bill(scope, status, seconds)
        if self.on_finished is not None:
            self.on_finished(scope, provider, status, seconds)
        if self.request_log.isEnabledFor(logging.INFO):
            log_request(self.request_log, request_line(scope, status, seconds))

    def _bill(self, scope: Scope, status: int, seconds: float) -> None:
        """The call's cost, the caller's tokens and spend, the ledger row."""
        state = scope.setdefault("state", {})
        facts = state.setdefault("log", {})
        # The prices of the configuration the request started on (docs/reload.md).
        snapshot = state.get(SCOPE_KEY)
        prices = snapshot.prices if snapshot is not None else self.prices
        cost, source = prices.cost(facts)
        callers = self.callers
        if prices.entries or source != "none" or (callers is not None and callers.active):
            # Into the log line only when callers or prices make it mean something (a
            # default config keeps today's log line exactly).
            facts["cost_usd"] = cost
            facts["cost_source"] = source
        if self.callers is not None:
            tokens = (facts.get("input_tokens") or 0) + (facts.get("output_tokens") or 0)
            self.callers.settle(scope, tokens, cost)
            caller = facts.get("caller")
            if caller is not None:
                self.metrics.caller_finished(caller, status)
        if self.ledger is not None:
            self.ledger.record(scope, facts, status, seconds, cost, source)

    async def start(self) -> None:
        """At start: live callers, then the ledger's schema and writer, and every
        caller's spend read back."""
        if self.live is not None:
            await self.live.start()
        if self.ledger is not None:
            await self.ledger.start(self.callers)

    async def _load_spend(self, names: list[str]) -> None:
        """A live caller just given a budget: its spend this period, from the ledger."""
        callers, ledger = self.callers, self.ledger
        if callers is None or ledger is None:
            return
        now = time.time()
        periods = {
            name: caller.period_start(now).timestamp()
            for name in names
            if (caller := callers.callers.get(name)) is not None
        }
        try:
            await callers.load_spend(await ledger.backend.spend_since(periods))
        except Exception as exc:
            log.warning("live callers: spend not read back (%s)", type(exc).__name__)

    def _route_label(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if isinstance(path, str):
            return path
        # Refused before routing (401), or no route at all (404).
        if not self._routes and self._app is not None:
            self._routes = frozenset(
                p for p in (getattr(r, "path", None) for r in self._app.routes) if p
            )
        return scope["path"] if scope["path"] in self._routes else UNMATCHED

    # -- /v1/chat/providers ---------------------------------------------------------

    def listing(self) -> dict[str, Any]:
        """The registry's listing with each provider's requests, errors and p50 latency."""
        snapshot = self.snapshot
        registry = self.registry
        balancers = self.balancers
        listing = registry.listing()
        for entry in listing["providers"]:  # type: ignore[attr-defined]
            entry.update(self.stats.describe(entry["name"]))
            balancer = balancers.get(entry["name"])
            if balancer is not None and entry["name"] in registry.endpoints:
                entry["endpoints"] = balancer.describe()
        if snapshot is not None:
            listing["config"] = snapshot.describe()
        return listing

    # -- /ready ---------------------------------------------------------------------

    async def readiness(self, request: Request, probe: bool) -> Response:
        """200 when the default provider is registered, else 503 `not_ready`; with
        `probe`, also each registered provider's reachability."""
        registry = self.registry
        default = registry.default
        if default not in registry.providers:
            error = NotReady(f"the default provider {default} is not registered")
            return error_response(error, request)
        body: dict[str, Any] = {"status": "ready", "default": default}
        if self.open_gateway:
            body["auth"] = "off"
        if self.snapshot is not None:
            body["config"] = self.snapshot.describe()
        if probe:
            body["providers"] = await self.probe_all()
            if self.shared is not None:
                body["redis"] = await self.shared.probe()
        return json_response(body)

    async def probe_all(self) -> dict[str, Any]:
        """Probe every registered provider at once; concurrent callers share one round."""
        if self._probing is None or self._probing.done():
            self._probing = asyncio.ensure_future(self._probe_round())
        return await asyncio.shield(self._probing)

    async def _probe_round(self) -> dict[str, Any]:
        registry = self.registry
        names = list(registry.providers)
        results = await asyncio.gather(*(self.probe(registry.providers[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def probe(self, provider: Any) -> dict[str, Any]:
        """One provider: reachable if its upstream answered at all, within the timeout."""
        path = provider.models_path  # what a probe asks: the cheapest listing it has
        if path is None:  # mock: nothing to reach
            return {"reachable": True, "available": provider.available}
        started = time.perf_counter()
        result: dict[str, Any] = {"reachable": False, "available": provider.available}
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_SECS):
                response = await provider.client.get(path, timeout=PROBE_TIMEOUT_SECS)
        except TimeoutError:
            result["error"] = "timeout"
        except httpx.HTTPError as exc:
            result["error"] = "timeout" if is_timeout(exc) else probe_failure(exc, provider)
        except Exception as exc:  # whatever the transport raised, the answer is "no"
            result["error"] = type(exc).__name__
        else:
            result["reachable"] = True
            result["upstream_status"] = response.status_code
        result["latency_ms"] = round((time.perf_counter() - started) * 1000)
        return result

    async def aclose(self) -> None:
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
        if self.live is not None:
            await self.live.aclose()
        if self.ledger is not None:  # SIGTERM: buffered rows are written before exit
            await self.ledger.aclose(max(1.0, self.shutdown_grace))
        self.metrics.close()


def probe_failure(exc: httpx.HTTPError, provider: Any) -> str:
    """A short, credential-free reason (the transport may call a refusal a ConnectTimeout)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connection failed"
    return describe_failure(exc, provider.client.base_url)
