"""Writes waiting behind requests for the next batch to Redis (docs/shared-state.md),
merged by key: a batch carries one entry per caller window and per spend counter, however
many requests it holds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from chatd.state.shared_local import LocalState


class Pending:
    """Tokens per window, spend per counter, the longest cooldown per flag, and cache
    answers with the single-flight locks to drop once they are stored."""

    __slots__ = ("windows", "adds", "flags", "blobs", "releases", "queued")

    def __init__(self, queued: Callable[[], None] = lambda: None) -> None:
        self.queued = queued  # told of every write (RedisState's batch loop wakes on it)
        self.windows: dict[str, list[float]] = {}  # key -> [tokens, window_secs]
        self.adds: dict[str, list[float]] = {}  # key -> [amount, ttl_secs]
        self.flags: dict[str, float] = {}  # key -> ttl_secs
        self.blobs: dict[str, tuple[bytes, float]] = {}  # key -> (value, ttl_secs)
        self.releases: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.windows or self.adds or self.flags or self.blobs or self.releases)

    def count(self, key: str, amount: float, window_secs: float) -> None:
        self.queued()
        entry = self.windows.get(key)
        if entry is None:
            self.windows[key] = [amount, window_secs]
        else:
            entry[0] += amount

    def add(self, key: str, amount: float, ttl_secs: float) -> None:
        self.queued()
        entry = self.adds.get(key)
        if entry is None:
            self.adds[key] = [amount, ttl_secs]
        else:
            entry[0] += amount

    def flag(self, key: str, ttl_secs: float) -> None:
        self.queued()
        self.flags[key] = max(ttl_secs, self.flags.get(key, 0.0))

    def blob(self, key: str, value: bytes, ttl_secs: float, unlock: str = "") -> None:
        self.queued()
        self.blobs[key] = (value, ttl_secs)
        if unlock:
            self.releases.append(unlock)

    def take(self) -> Pending:
        """This batch; a new empty one takes its place."""
        batch = Pending()
        batch.windows, self.windows = self.windows, batch.windows
        batch.adds, self.adds = self.adds, batch.adds
        batch.flags, self.flags = self.flags, batch.flags
        batch.blobs, self.blobs = self.blobs, batch.blobs
        batch.releases, self.releases = self.releases, batch.releases
        return batch

    def command(self, prefix: str) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV of the FLUSH script (state/redis_scripts.py) for this batch."""
        keys: list[Any] = []
        args: list[Any] = [
            len(self.windows),
            len(self.adds),
            len(self.flags),
            len(self.blobs),
            len(self.releases),
        ]
        for key, (amount, window_secs) in self.windows.items():
            keys += (prefix + "w:" + key, prefix + "w:" + key + ":m")
            args += (repr(amount), int(window_secs * 1_000_000))
        for key, (amount, ttl_secs) in self.adds.items():
            keys.append(prefix + "n:" + key)
            args += (repr(amount), _ms(ttl_secs))
        for key, ttl_secs in self.flags.items():
            keys.append(prefix + "f:" + key)
            args.append(_ms(ttl_secs))
        for key, (value, ttl_secs) in self.blobs.items():
            keys.append(prefix + "b:" + key)
            args += (value, _ms(ttl_secs))
        keys += (prefix + "l:" + lock for lock in self.releases)
        return keys, args

    def apply(self, local: LocalState) -> None:
        """This batch, in process: while Redis is away, limits hold per replica."""
        for key, (amount, window_secs) in self.windows.items():
            local.count_later(key, amount, window_secs)
        for key, (amount, ttl_secs) in self.adds.items():
            local.add_later(key, amount, ttl_secs)
        for key, ttl_secs in self.flags.items():
            local.set_flag_later(key, ttl_secs)
        for key, (value, ttl_secs) in self.blobs.items():
            local.set_blob_later(key, value, ttl_secs)
        for lock in self.releases:
            local.unlock(lock)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
