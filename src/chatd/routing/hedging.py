"""Hedging (docs/routing.md): when the first call has not answered within `hedge_after`, send the
same request to another endpoint as well; the first success wins.

The loser is cancelled, which closes its upstream connection (a stream that already
opened is handed to `discard`, which closes it). One call's error while the other still
runs waits for the other; only when both fail does the error surface.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def race(
    first: Coroutine[Any, Any, T],
    start_second: Callable[[], Awaitable[Coroutine[Any, Any, T] | None]],
    after: float,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> tuple[T, bool | None]:
    """Run `first`; after `after` seconds without an answer, also run what
    `start_second()` returns (None: no second call is possible, keep waiting).

    Returns the winner's result and whether the hedge won: None when no hedge was sent,
    True when the second call answered first, False when the first still did.
    """
    primary = asyncio.ensure_future(first)
    second: asyncio.Future[T] | None = None
    winner: asyncio.Future[T] | None = None
    try:
        done, _ = await asyncio.wait((primary,), timeout=after)
        if done:
            winner = primary
            return primary.result(), None
        backup = await start_second()
        if backup is None:
            winner = primary
            return await primary, None
        second = asyncio.ensure_future(backup)
        pending: set[asyncio.Future[T]] = {primary, second}
        error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    winner = task
                    return task.result(), task is second
                error = task.exception()
        assert error is not None
        raise error
    finally:
        await _settle((primary, second), winner, discard)


async def _settle(
    tasks: tuple[asyncio.Future[T], asyncio.Future[T] | None],
    winner: asyncio.Future[T] | None,
    discard: Callable[[T], Awaitable[None]] | None,
) -> None:
    """Cancel whatever still runs and wait for it; close a loser that answered anyway."""
    running = [t for t in tasks if t is not None and not t.done()]
    for task in running:
        task.cancel()
    if running:
        await asyncio.gather(*running, return_exceptions=True)
    for task in tasks:
        if task is None or task is winner or task.cancelled() or task.exception() is not None:
            continue
        if discard is not None:
            await discard(task.result())
