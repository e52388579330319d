"""One asyncio executor per event loop and topology, shared by every async lock.

``users.lock(key)`` makes a lock per call; none must open connections of its own.  Connections
belong to the loop that made them, so the registry is per loop (a loop that is gone takes its
executors with it: the registry holds loops weakly).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from ...store.executor import AsyncExecutor
from ...store.topology import Topology

_shared: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncExecutor]
] = weakref.WeakKeyDictionary()


def shared_async_executor(topology: Topology, timeout: float | None) -> AsyncExecutor:
    """The running loop's executor for ``topology`` (made on first use)."""
    per_loop = _shared.setdefault(asyncio.get_running_loop(), {})
    key = (topology.key, timeout)
    executor = per_loop.get(key)
    if executor is None:
        executor = per_loop[key] = topology.async_executor(timeout=timeout)
    return executor


async def aclose_shared() -> None:
    """Disconnect the running loop's shared lock executors (before the loop closes)."""
    for executor in _shared.pop(asyncio.get_running_loop(), {}).values():
        await executor.aclose()
