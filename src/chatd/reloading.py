"""Reloading the configuration in place (docs/reload.md).

`SIGHUP`, `POST /admin/reload` and (with `watch_config`) a change to the config file all
call `Reloader.reload`: it reads and checks the file exactly as `chatd check-config` does,
builds a new `Snapshot` beside the one in force — reusing every provider, limiter,
breaker and balancer whose configuration did not change — and swaps it in with one
assignment. Requests already running finish on the snapshot they took; a provider the new
one dropped is closed once every request that could still use it has ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from chatd.cli import load_checked, refusal_line
from chatd.config import DEFAULT_CONFIG_FILE, ConfigError, Settings
from chatd.providers import Provider
from chatd.replicas import build_cache, shared_breakers
from chatd.routing.dispatch import Dispatcher
from chatd.routing.registry import Registry
from chatd.state.callers import config_callers
from chatd.state.cooldowns import SharedCooldowns
from chatd.state.shared import SharedState
from chatd.state.snapshot import Current, Snapshot
from chatd.state.usage.prices import Prices
from chatd.surfaces.operations import Operations
from chatd.tasks import spawn, stop

log = logging.getLogger("chatd")

# `[chatd]` keys a running process cannot take up; a reload logs them and keeps the old.
RESTART_KEYS = (
    "bind",
    "redis_url",
    "usage_db",
    "usage_buffer_rows",
    "max_body_bytes",
    "shutdown_grace_secs",
    "ui",
    "auth_tokens_env",
    "watch_config",
    "tracing",
)
RETIRE_POLL_SECS = 0.1  # how often a retired snapshot is asked whether its requests ended
WATCH_DEBOUNCE_MS = 200


def config_path(settings: Settings) -> str | None:
    """The file a reload re-reads: the one start-up read, else where start-up looked."""
    return settings.source if os.path.isfile(settings.source) else None


_sighup_early = False  # a SIGHUP came while the app was still starting (hold_sighup)


def hold_sighup() -> None:
    """Until the app's own handler is in, a SIGHUP is remembered (not fatal, not lost):
    the reload runs as soon as the app has started."""

    def remember(signum: int, frame: Any) -> None:
        global _sighup_early
        _sighup_early = True

    signal.signal(signal.SIGHUP, remember)


def file_sha256(path: str | None) -> str:
    """The config file's SHA-256 ("" without a file, or when it cannot be read)."""
    if path is None:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


def first_snapshot(
    settings: Settings, registry: Registry, dispatcher: Dispatcher, cache: Any
) -> Snapshot:
    """Generation 1: what start-up built."""
    return Snapshot(
        settings,
        registry,
        dispatcher,
        Prices(settings.chatd.prices),
        cache,
        generation=1,
        loaded_at=time.time(),
        sha256=file_sha256(config_path(settings)),
        admin_token=admin_token(settings),
    )


def describe(error: Exception) -> str:
    """An unexpected build failure in one line: its type and first line, no traceback."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def admin_token(settings: Settings) -> str:
    name = settings.chatd.admin_token_env
    return os.environ.get(name, "").strip() if name else ""


class Reloader:
    """Builds and swaps in new snapshots; retires old ones; owns the three triggers."""

    def __init__(
        self,
        current: Current,
        ops: Operations,
        *,
        state: SharedState | None = None,
        cooldowns: SharedCooldowns | None = None,
        app: Any = None,
    ) -> None:
        self.current = current
        self.ops = ops
        self.state = state
        self.cooldowns = cooldowns
        self.app = app
        self.path = config_path(current.snapshot.settings)
        # What `watch_config` watches: the file start-up read, else where it looked.
        self.watched = os.path.abspath(
            self.path or os.environ.get("LAKEHOUSE_CONFIG") or DEFAULT_CONFIG_FILE
        )
        self._lock = asyncio.Lock()
        self._draining: list[tuple[Snapshot, list[Provider]]] = []
        self._retiring: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        self._unwatch = asyncio.Event()  # set at shutdown: the watcher's thread ends too
        self._signal = False

    # -- triggers ----------------------------------------------------------------

    async def start(self, *, signals: bool) -> None:
        """SIGHUP (when this process owns its signals) and, with `watch_config`, the file."""
        if signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._signal = True
            global _sighup_early
            if _sighup_early:  # sent while starting: the file may be newer than we read
                _sighup_early = False
                self._on_sighup()
        if self.current.snapshot.settings.chatd.watch_config:
            self._watching = asyncio.create_task(self._watch(), name="chatd-config-watch")

    def _on_sighup(self) -> None:
        spawn(self.reload_quietly("SIGHUP"))

    async def reload_quietly(self, trigger: str) -> None:
        """A reload whose refusal is only logged (signals and file changes)."""
        try:
            await self.reload(trigger)
        except ConfigError:
            pass  # logged by reload
        except Exception:
            log.exception("config reload (%s) failed; the old configuration serves on", trigger)

    async def _watch(self) -> None:
        """Reload when the config file's content changes. Its directory is watched, not
        the file: editors and Kubernetes ConfigMaps replace files (a symlink swap)."""
        import watchfiles

        folder = os.path.dirname(self.watched)
        changes = watchfiles.awatch(
            folder, debounce=WATCH_DEBOUNCE_MS, recursive=False, stop_event=self._unwatch
        )
        try:
            async for _ in changes:
                sha = await asyncio.to_thread(file_sha256, self.watched)
                if sha and sha != self.current.snapshot.sha256:
                    await self.reload_quietly("file change")
        except Exception as exc:  # e.g. the folder went away: say so, keep serving
            log.warning("watch_config: cannot watch %s (%s); reload by SIGHUP", folder, exc)

    async def aclose(self) -> None:
        """At shutdown: stop the triggers; close every provider a reload retired."""
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late one must not kill the drain
        self._unwatch.set()
        await stop(self._watching)
        await stop(self._retiring)
        for _, providers in self._draining:
            for provider in providers:
                await provider.aclose()
        self._draining.clear()

    # -- the reload ---------------------------------------------------------------

    async def reload(self, trigger: str) -> Snapshot:
        """Read, check, build and swap in the config file. A bad one raises ConfigError
        whose text is check-config's line (logged, counted; the old one serves on)."""
        async with self._lock:  # one at a time: each builds on the one before
            old = self.current.snapshot
            try:
                settings, sha = await asyncio.to_thread(self._read)
                settings = self._keep_restart_keys(old.settings, settings)
                callers = (
                    config_callers(settings, with_default=bool(settings.chatd.usage_db))
                    if self.ops.callers is not None
                    else None
                )
                new = await self._build(old, settings, sha)
            except Exception as exc:
                # What check-config cannot see (a provider that will not build) is refused
                # the same way: one line, the old configuration serves on.
                error = exc if isinstance(exc, ConfigError) else ConfigError(describe(exc))
                line = refusal_line(error)
                log.error(line)
                self.ops.metrics.reloaded("rejected", old.generation)
                raise ConfigError(line) from None
            # The swap: no await from here on, so no request sees half of it.
            self.current.snapshot = new
            if callers is not None and self.ops.callers is not None:
                self.ops.callers.replace_config(callers)
            if self.app is not None:  # conveniences for tests; requests read their own
                self.app.state.settings = new.settings
                self.app.state.registry = new.registry
                self.app.state.dispatcher = new.dispatcher
                self.app.state.cache = new.cache
            if self.cooldowns is not None:
                self.cooldowns.watch(shared_breakers(new.registry, new.dispatcher))
            self.ops.metrics.reloaded("ok", new.generation)
            self._retire(old, new)
            log.info(
                "config reloaded (%s): generation %d, sha256 %s, providers %s",
                trigger,
                new.generation,
                new.sha256[:12] or "-",
                ", ".join(new.registry.providers) or "-",
            )
            return new

    def _read(self) -> tuple[Settings, str]:
        path = self.path
        if path is None and os.path.isfile(self.watched):  # a file made since start-up
            path = self.watched
        sha = file_sha256(path)
        settings = load_checked(path)
        self.path = config_path(settings)
        return settings, sha

    def _keep_restart_keys(self, old: Settings, new: Settings) -> Settings:
        """Keys a running process cannot take up: logged, and the running value kept."""
        kept: dict[str, Any] = {}
        for key in RESTART_KEYS:
            if getattr(new.chatd, key) != getattr(old.chatd, key):
                kept[key] = getattr(old.chatd, key)
        if bool(new.chatd.callers) != bool(old.chatd.callers):
            kept["callers"] = old.chatd.callers  # turning callers (and their auth) on or off
        for key in kept:
            log.warning(
                "config reload: chatd.%s changed; it needs a restart to take effect "
                "(the running value stays)",
                key,
            )
        if not kept:
            return new
        chatd = new.chatd.model_copy(update=kept)
        return Settings(chatd, new.models, new.source, new.alias_options)

    async def _build(self, old: Snapshot, settings: Settings, sha: str) -> Snapshot:
        registry = Registry.from_settings(settings, old.registry)
        before = {id(p) for p in old.registry.instances()}
        fresh = [p for p in registry.instances() if id(p) not in before]
        try:
            for provider in fresh:
                await provider.start()
        except BaseException:
            for provider in fresh:  # nothing of a refused build stays open
                await provider.aclose()
            raise
        dispatcher = Dispatcher(
            registry,
            observer=self.ops.metrics,
            tracing=old.dispatcher.calls.tracing,  # tracing is not reloaded (docs/reload.md)
            previous=old.dispatcher,
        )
        cache = build_cache(settings, registry, self.state, self.ops, old.cache)
        return Snapshot(
            settings,
            registry,
            dispatcher,
            Prices(settings.chatd.prices),
            cache,
            generation=old.generation + 1,
            loaded_at=time.time(),
            sha256=sha,
            admin_token=admin_token(settings),
        )

    # -- retiring the old snapshot ----------------------------------------------------

    def _retire(self, old: Snapshot, new: Snapshot) -> None:
        """Close the providers `new` dropped once no request can use them any more."""
        kept = {id(p) for p in new.registry.instances()}
        dropped = [p for p in old.registry.instances() if id(p) not in kept]
        self._draining.append((old, dropped))
        if self._retiring is None or self._retiring.done():
            self._retiring = asyncio.create_task(self._drain(), name="chatd-config-retire")

    async def _drain(self) -> None:
        """Oldest first: a retired snapshot's dropped providers close when it and every
        older snapshot have no request left (an older one may share them)."""
        while self._draining:
            snapshot, dropped = self._draining[0]
            if snapshot.in_flight > 0:
                await asyncio.sleep(RETIRE_POLL_SECS)
                continue
            self._draining.pop(0)
            for provider in dropped:
                try:
                    await provider.aclose()
                except Exception:  # a pool that will not close must not stop the others
                    log.exception("closing retired provider %s failed", provider.name)
