"""Background tasks: started off a request's path, and stopped at shutdown.

asyncio keeps only a weak reference to a running task, so a task nobody holds can be
collected before it finishes; `spawn` holds each one until it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task[Any]] = set()


def spawn(work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run `work` without waiting for it (a store write, a flag for the other replicas)."""
    task = asyncio.get_running_loop().create_task(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
