"""``Redlock`` for asyncio: the thread driver's settings and per-node flows, the nodes asked
concurrently (the algorithm allows it, and the time spent counts against the validity the same
way), the hold renewed by a task."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ... import instruments
from ...errors import LockError, LockLost, LockNotAcquired, LockNotOwned, StoreError
from ...flows.effects import Flow
from ...lock import flows
from ...lock.base import check_timeout, new_owner
from ...lock.lease import Fence
from ...lock.redlock import RedlockSettings
from ...store.executor import AsyncExecutor
from ..run import run
from .executors import shared_async_executor
from .hold import AsyncHold


class Redlock(RedlockSettings):
    """``syncmap.Redlock`` for asyncio: ``await acquire()`` returns the validity left."""

    def _setup(self) -> None:
        self._hold: AsyncHold | None = None

    def _nodes(self) -> list[AsyncExecutor]:
        return [shared_async_executor(t, self.node_timeout) for t in self._topologies]

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> float:
        """Acquire on a majority; returns the validity left, in seconds (as the sync one)."""
        timeout = check_timeout(timeout)
        if self._hold is not None:
            raise LockError(f"{self.what} is already held by this object (not re-entrant)")
        started = time.monotonic()
        try:
            validity = await self._acquire(blocking, timeout)
        except LockNotAcquired:
            instruments.lock_attempt(self.what, "timeout", time.monotonic() - started)
            raise
        except BaseException:
            instruments.lock_attempt(self.what, "error", time.monotonic() - started)
            raise
        instruments.lock_attempt(self.what, "acquired", time.monotonic() - started)
        return validity

    async def _acquire(self, blocking: bool, timeout: float | None) -> float:
        deadline = None if timeout is None else time.monotonic() + timeout
        tries = 0
        while True:
            validity = await self._try_once()
            if validity is not None:
                return validity
            tries += 1
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if not blocking or tries > self.retries or out_of_time:
                raise self._too_few(tries)
            await asyncio.sleep(random.uniform(0, self.retry_delay))  # jitter (spec)

    async def _try_once(self) -> float | None:
        self.owner = new_owner()  # per attempt: a late give-back never hits a newer hold
        start = self._clock()
        try:
            granted = sum(await self._each_node(flows.node_set, self.lease))
        except asyncio.CancelledError:
            await self._release_all()  # some nodes may have granted it: hold nothing
            raise
        validity = flows.redlock_validity(self.lease, start, granted, self.quorum, self._clock)
        self.last_acquired_nodes = granted
        if validity is None:
            await self._release_all()
            return None
        if self._authority_topology is not None:
            try:
                self._token = await run(
                    flows.next_fence(self.layout),
                    shared_async_executor(self._authority_topology, 5.0),
                )
            except (StoreError, asyncio.CancelledError):
                await self._release_all()  # no token, no lock
                raise
        self._hold = AsyncHold(self.what, self.lease, start, self._extend, self._release_all,
                               self.on_lost, renewing=self.auto_renew)  # fmt: skip
        return validity

    async def _each_node(self, step: Callable[..., Flow[bool]], *args: Any) -> list[bool]:
        """One node step on every node at once; a node that fails counts as a no."""

        async def one(node: AsyncExecutor) -> bool:
            try:
                return await run(step(self.key, self.owner, *args), node)
            except StoreError:
                return False

        return list(await asyncio.gather(*(one(node) for node in self._nodes())))

    async def _extend(self) -> bool:
        start = self._clock()
        ok = sum(await self._each_node(flows.node_extend, self.lease))
        return flows.redlock_validity(self.lease, start, ok, self.quorum, self._clock) is not None

    async def _release_all(self) -> int:
        return sum(await self._each_node(flows.node_release))

    @property
    def valid(self) -> bool:
        hold = self._hold
        return hold is not None and hold.valid

    @property
    def fence(self) -> Fence:
        """A token from the authority's counter (requires ``authority=``)."""
        if self._authority_topology is None:
            raise self._no_fence()
        hold = self._hold
        if hold is None:
            raise LockNotOwned(f"{self.what} is not held: acquire it first")
        hold.check()
        return Fence(self._token, self.name, self.layout.fence)

    async def release(self) -> None:
        hold, self._hold = self._hold, None
        if hold is None:
            raise LockNotOwned(f"{self.what} cannot be released: it is not held")
        await hold.end()
        freed = await self._release_all()
        if freed < self.quorum and hold.valid_until <= time.monotonic():
            raise LockLost(f"{self.what} had run out before release ({freed} nodes still had it)")

    async def aclose(self) -> None:
        if self._hold is not None:
            with contextlib.suppress(LockError, StoreError):
                await self.release()

    async def __aenter__(self) -> Redlock:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        if exc_type is None:
            await self.release()
            return
        with contextlib.suppress(LockError):
            await self.release()

    def __repr__(self) -> str:
        state = "held" if self._hold else "free"
        return (f"<aio.Redlock {self.name!r} {state} on {len(self._topologies)} nodes, "
                f"quorum {self.quorum}>")  # fmt: skip
