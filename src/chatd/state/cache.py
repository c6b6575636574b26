"""Response cache and single flight, off unless `[chatd.cache] enabled`
(docs/replicas-and-cache.md).

The routes ask the cache around their dispatcher call; the cache never calls a provider
itself. Only requests with temperature 0 are cacheable (omitted counts as 0 on
`/v1/chat`, not on `/v1/chat/completions`, where the model's default applies). The key
hashes the resolved targets (provider, upstream model), the messages and every
generation parameter — never the caller — so `hot` and the model it names share entries.

Entries live in an in-process LRU bounded by bytes, or in Redis (`shared.SharedState`
blobs) when `redis_url` is set. What each route stores, and how a stored stream is
replayed, is in `cache_entries.py`.

Single flight: identical cacheable requests in flight at once wait for the first one's
answer, in this process (a shared task, cancelled only when every waiter has left) and,
with Redis, across replicas (a `claim`ed lock; the others poll for the stored answer).
Streams do not wait for each other: a follower would lose streaming.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from chatd.config import CacheConfig
from chatd.errors import ChatdError
from chatd.routing.registry import Registry
from chatd.state.shared import Ask, SharedState
from chatd.state.shared_local import BytesLRU
from chatd.tasks import spawn
from chatd.web import note, until_disconnect

CACHE_HEADER = "X-Chatd-Cache"
HIT, MISS, BYPASS = "hit", "miss", "bypass"
POLL_SECS = 0.02  # a follower on another replica looks for the leader's answer this often
HEADS_KEPT = 4096  # keys' heads remembered, one per model name asked for


def blob_key(key: str) -> str:
    """Where shared state keeps the answer stored under `key`."""
    return "cache:" + key


def lock_key(key: str) -> str:
    """The single-flight lock of `key` across replicas."""
    return "flight:" + key


@dataclass(slots=True)
class Plan:
    """What the cache does for one cacheable request: its key, and whether it may look
    (not with `Cache-Control: no-cache` / `no-store`) and store (not with `no-store`)."""

    key: str
    read: bool
    write: bool

    def tag(self, error: ChatdError) -> ChatdError:
        """An error answer to a cacheable request says what the cache did, too."""
        error.headers[CACHE_HEADER] = MISS if self.write else BYPASS
        return error


@dataclass(slots=True)
class Asked:
    """The cache's answer got within admission (Redis: one round trip for both, docs/
    shared-state.md): the stored answer, or whether the flight's lock was taken. The lock
    is this request's until a flight takes it over (`claimed` then False) or it is given
    back."""

    stored: bytes | None
    claimed: bool


class ResponseCache:
    """Keys, storage (LRU or shared state), single flight and the cache metrics."""

    def __init__(
        self,
        config: CacheConfig,
        registry: Registry,
        *,
        state: SharedState | None = None,
        count: Callable[[str], None] | None = None,
        size: Callable[[int], None] | None = None,
        previous: ResponseCache | None = None,
    ) -> None:
        self.registry = registry
        self.ttl = config.ttl_secs
        self.state = state  # None: the in-process LRU below
        # A reload (docs/reload.md) makes a cache for the new registry over the same
        # entries and flights; the bound is the newest config's.
        self.lru = previous.lru if previous is not None else BytesLRU(config.max_bytes)
        self.lru.max_bytes = config.max_bytes
        self.count = count or (lambda result: None)
        self._size = size or (lambda nbytes: None)
        # A leader's lock on another replica lasts as long as its slowest possible call.
        self.lock_secs = max((p.timeout for p in registry.providers.values()), default=180.0)
        self._flights: dict[str, Flight] = previous._flights if previous is not None else {}
        self._heads: dict[tuple[str, str], bytes] = {}  # (namespace, model) -> key's head

    # -- planning ---------------------------------------------------------------------

    def plan(self, request: Request, namespace: str, model: str, params: Any) -> Plan | None:
        """The cache's part in a cacheable request; None when no target resolves (the
        dispatcher then answers its own 404/503)."""
        key = self.key(namespace, model, params)
        if key is None:
            return None
        directives = cache_directives(request.headers.get("cache-control"))
        no_store = "no-store" in directives
        return Plan(key, read=not no_store and "no-cache" not in directives, write=not no_store)

    def key(self, namespace: str, model: str, params: Any) -> str | None:
        """`namespace:` + SHA-256 of `[namespace, targets, params]` as sorted-key JSON."""
        head = self._heads.get((namespace, model))
        if head is None:
            head = self._head(namespace, model)
        if not head:
            return None
        blob = head + orjson.dumps(params, option=orjson.OPT_SORT_KEYS) + b"]"
        return namespace + ":" + hashlib.sha256(blob).hexdigest()

    def _head(self, namespace: str, model: str) -> bytes:
        """The key's JSON up to its params, `[namespace,targets,` (b"" when no target
        resolves): the registry is fixed for this cache's life, so made once per model."""
        targets = []
        for target in self.registry.targets(model):
            try:
                route = self.registry.resolve(target)
            except ChatdError:
                continue
            targets.append((route.provider.name, route.model))
        head = orjson.dumps([namespace, targets])[:-1] + b"," if targets else b""
        if len(self._heads) >= HEADS_KEPT:  # model names are the caller's text
            self._heads.clear()
        self._heads[(namespace, model)] = head
        return head

    # -- storage ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        if self.state is None:
            value = self.lru.get(key)
            if value is None:
                self._size(self.lru.bytes)  # an expired entry may just have gone
            return value
        return await self.state.get_blob(blob_key(key))

    async def put(self, key: str, value: bytes) -> None:
        if self.state is None:
            self.lru.set(key, value, self.ttl)
            self._size(self.lru.bytes)
        else:
            await self.state.set_blob(blob_key(key), value, self.ttl)

    def put_later(self, key: str, value: bytes) -> None:
        """Store off the answer's path (a finished stream)."""
        spawn(self.put(key, value))

    async def lookup(self, plan: Plan) -> bytes | None:
        """A stored answer for a plan that may read; counts the hit (a miss is counted
        by `counted`, once the request goes on)."""
        if not plan.read:
            return None
        value = await self.get(plan.key)
        if value is not None:
            self.count(HIT)
        return value

    def counted(self, plan: Plan) -> str:
        """Count and return the result of a request that goes to the upstream."""
        result = MISS if plan.write else BYPASS
        self.count(result)
        return result

    # -- single flight ----------------------------------------------------------------

    def ask(self, plan: Plan | None) -> Ask | None:
        """The question admission may ask for this plan (shared state, a plan that
        reads, no flight of this process to join); None: the cache asks itself."""
        if plan is None or self.state is None or not plan.read or plan.key in self._flights:
            return None
        return blob_key(plan.key), lock_key(plan.key), self.lock_secs

    async def answer(
        self, request: Request, plan: Plan, run: Callable[[], Awaitable[bytes]]
    ) -> tuple[bytes, str]:
        """`fetch` for a route, given what admission asked for it (`Callers.admit`), until
        the caller hangs up. A lock admission took that no flight took over is let go
        here, also when the caller left before `fetch` began (it then never runs)."""
        found = request.scope.get("state", {}).pop("cache_asked", None)
        asked = None if found is None else Asked(*found)
        try:
            return await until_disconnect(request, self.fetch(plan, run, asked))
        finally:
            self._give_back(plan.key, asked)

    def _give_back(self, key: str, asked: Asked | None) -> None:
        """Let go of the lock admission took for `key`, unless a flight took it over."""
        if asked is not None and asked.claimed and self.state is not None:
            asked.claimed = False
            spawn(self.state.release(lock_key(key)))

    async def fetch(
        self, plan: Plan, run: Callable[[], Awaitable[bytes]], asked: Asked | None = None
    ) -> tuple[bytes, str]:
        """The answer for `plan`: stored, another request's in flight, or `run()`'s
        (stored when the plan may write). Returns (answer, "hit" | "miss" | "bypass")."""
        try:
            value, result = await self.get_or_run(
                plan.key, run, read=plan.read, write=plan.write, asked=asked
            )
        except ChatdError as exc:
            raise plan.tag(exc) from None
        return value, result

    async def get_or_run(
        self,
        key: str,
        run: Callable[[], Awaitable[bytes]],
        *,
        read: bool = True,
        write: bool = True,
        asked: Asked | None = None,
    ) -> tuple[bytes, str]:
        """`key`'s stored bytes, else `run()`'s (stored), with single flight; for any
        route (embeddings use it per input). Returns (bytes, "hit" | "miss" | "bypass")."""
        if not read:
            value = await run()
            if write:
                await self.put(key, value)
            result = MISS if write else BYPASS
            self.count(result)
            return value, result
        if self.state is None:  # shared: the flight's leader looks and claims in one call
            value = await self.get(key)
            if value is not None:
                self.count(HIT)
                return value, HIT
        elif asked is not None and asked.stored is not None:  # admission found it stored
            self.count(HIT)
            return asked.stored, HIT
        flight = self._flights.get(key)
        leader = flight is None
        if flight is None:
            claimed = None  # unknown: the leader asks
            if asked is not None:  # the lock admission took goes to the flight
                claimed, asked.claimed = asked.claimed, False
            work = self._lead(key, run, claimed)
            flight = self._flights[key] = Flight(work, self._flights, key)
        else:  # this process's flight answers: a lock admission took is not needed
            self._give_back(key, asked)
        value, result = await flight.join()
        result = result if leader else HIT
        self.count(result)
        return value, result

    async def _lead(
        self, key: str, run: Callable[[], Awaitable[bytes]], claimed: bool | None = None
    ) -> tuple[bytes, str]:
        """`claimed`: what admission's question found (None: not asked)."""
        if self.state is None:
            value = await run()
            await self.put(key, value)
            return value, MISS
        lock = lock_key(key)
        while True:  # one round trip: the stored answer, or the lock to go and get it
            if claimed is None:
                found = await self.state.get_or_claim(blob_key(key), lock, self.lock_secs)
                if found[0] is not None:
                    return found[0], HIT
                claimed = found[1]
            if claimed:
                break
            claimed = None
            await asyncio.sleep(POLL_SECS)  # another replica is asking: wait for its answer
        try:
            value = await run()
        except BaseException:
            await self.state.release(lock)
            raise
        # Stored and unlocked behind the answer, in the next batch: a follower on another
        # replica waits for both at once.
        self.state.set_blob_later(blob_key(key), value, self.ttl, unlock=lock)
        return value, MISS


class Flight:
    """One shared upstream call; its waiters come and go, the last one out cancels it.

    `asyncio.shield` for each waiter, written out once per flight: one callback when the
    call lands hands every waiter its answer and takes the flight off `flights`."""

    def __init__(
        self,
        work: Coroutine[Any, Any, tuple[bytes, str]],
        flights: dict[str, Flight],
        key: str,
    ) -> None:
        self.task: asyncio.Task[tuple[bytes, str]] = asyncio.get_running_loop().create_task(work)
        self.waiting: list[asyncio.Future[tuple[bytes, str]]] = []
        self.waiters = 0
        self._flights, self._key = flights, key
        self.task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[tuple[bytes, str]]) -> None:
        self._flights.pop(self._key, None)
        error = None if task.cancelled() else task.exception()  # retrieved, even if all left
        for waiter in self.waiting:
            if waiter.done():  # it left
                continue
            if task.cancelled():
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(task.result())

    async def join(self) -> tuple[bytes, str]:
        if self.task.done():
            return self.task.result()
        waiter: asyncio.Future[tuple[bytes, str]] = self.task.get_loop().create_future()
        self.waiting.append(waiter)
        self.waiters += 1
        try:
            return await waiter
        finally:
            self.waiters -= 1
            if not self.waiters and not self.task.done():
                self.task.cancel()


def cache_directives(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(part.strip().lower() for part in value.split(","))


def note_hit(request: Request, entry: dict[str, Any]) -> None:
    """A cache hit for the log (and the ledger): who once answered, no upstream call, no
    tokens spent (a hit costs the caller 0)."""
    note(
        request,
        provider=entry["provider"],
        upstream_model=entry["model"],
        attempts=0,
        input_tokens=0,
        output_tokens=0,
        cache=HIT,
    )
