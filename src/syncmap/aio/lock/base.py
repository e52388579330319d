"""What every asyncio lock kind adds to ``LockIdentity``: the loop's executor and waker, the
eviction-policy warning, and ``async with``'s exit."""

from __future__ import annotations

import contextlib
import weakref

from ...errors import LockError, SyncMapError
from ...lock import flows
from ...lock.base import warn_if_evicting
from ...store import sentinel  # noqa: F401 - open_topology imports it lazily: not on the loop
from ...store.executor import AsyncExecutor
from ...store.topology import Topology
from ..run import run
from .executors import shared_async_executor
from .waiting import AsyncWaker

_policy_checked: weakref.WeakSet[AsyncExecutor] = weakref.WeakSet()


class AsyncLockParts:
    """Mixed into each asyncio lock kind (before ``LockIdentity``)."""

    _topology: Topology
    socket_timeout: float

    def _executor(self) -> AsyncExecutor:
        return shared_async_executor(self._topology, self.socket_timeout)

    def _waker(self) -> AsyncWaker:
        return AsyncWaker.for_topology(self._topology)

    @property
    def where(self) -> str:
        return self._topology.where

    async def _warn_if_evicting(self) -> None:
        """Once per executor (loop and Redis): see ``LockBase._warn_if_evicting``."""
        executor = self._executor()
        if executor in _policy_checked:
            return
        _policy_checked.add(executor)
        try:
            replies = await run(flows.eviction_check(), executor)
        except SyncMapError:
            return
        warn_if_evicting(executor.where, *replies)

    async def release(self) -> None:
        raise NotImplementedError

    async def released_on_exit(self, exc_type: type[BaseException] | None) -> None:
        """``__aexit__``: release; when the block is already raising, that exception is the one
        the caller must see, so a ``LockLost`` at release is swallowed."""
        if exc_type is None:
            await self.release()
            return
        with contextlib.suppress(LockError):
            await self.release()
