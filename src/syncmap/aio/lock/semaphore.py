"""``Semaphore`` for asyncio: at most n holders, each permit a lease renewed by a task."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import TracebackType

import redis

from ...errors import ConfigurationError, LockError, LockNotAcquired, LockNotOwned, SyncMapError
from ...lock import flows
from ...lock.base import LockIdentity, OnLost, check_timeout
from ...lock.waiting import Attempt
from ...store.topology import Topology
from ..run import run
from .base import AsyncLockParts
from .hold import AsyncHold
from .waiting import AsyncQueue, wait_for


class Semaphore(AsyncLockParts, LockIdentity):
    """``syncmap.Semaphore`` for asyncio: ``async with sem:``, ``await acquire()`` /
    ``await release()``; each ``acquire`` takes one more permit, ``release`` gives back the
    latest."""

    kind = "semaphore"

    def __init__(
        self,
        name: str,
        permits: int,
        url: str | None = None,
        *,
        redis: redis.Redis | None = None,
        lease: float = 30.0,
        owner: str | None = None,
        on_lost: OnLost | None = None,
        namespace: str = "sm",
        socket_timeout: float = 5.0,
        topology: Topology | None = None,
    ) -> None:
        super().__init__(name, url, redis=redis, lease=lease, owner=owner, on_lost=on_lost,
                         namespace=namespace, socket_timeout=socket_timeout,
                         topology=topology)  # fmt: skip
        if not isinstance(permits, int) or permits < 1:
            raise ConfigurationError(f"permits={permits!r}: use an int >= 1")
        self.permits = permits
        self._held: list[tuple[str, AsyncHold]] = []

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> None:
        """Take a permit; ``LockNotAcquired`` when none came free in time."""
        timeout = check_timeout(timeout)
        permit = f"{self.owner}:{uuid.uuid4().hex[:8]}"
        await self._warn_if_evicting()
        queue = AsyncQueue(permit, lambda: run(flows.sem_leave(self.layout, permit),
                                               self._executor()))  # fmt: skip
        await wait_for(lambda queued: self._attempt(permit, queued), waker=self._waker,
                       channel=self.layout.channel, timeout=timeout if blocking else 0,
                       what=self.what, queue=queue)  # fmt: skip

    async def try_acquire(self) -> bool:
        try:
            await self.acquire(blocking=False)
        except LockNotAcquired:
            return False
        return True

    async def _attempt(self, permit: str, queue: bool) -> Attempt[bool]:
        flow = flows.sem_attempt(self.layout, permit, self.lease, self.permits, queue)
        try:
            got = await run(flow, self._executor())
        except asyncio.CancelledError:  # the permit may have been granted: give it back
            with contextlib.suppress(SyncMapError):
                await self._give_back(permit)
            raise
        if got.value is None:
            return Attempt(None, got.wait_ms, got.holder, got.why)
        hold = AsyncHold(f"{self.what} permit {permit}", self.lease, got.value,
                         lambda: run(flows.sem_renew(self.layout, permit, self.lease),
                                     self._executor()),
                         lambda: self._give_back(permit), self.on_lost)  # fmt: skip
        self._held.append((permit, hold))
        return Attempt(True)

    async def _give_back(self, permit: str) -> bool:
        return await run(flows.sem_give_back(self.layout, permit), self._executor())

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def valid(self) -> bool:
        return bool(self._held) and all(hold.valid for _, hold in self._held)

    async def release(self) -> None:
        """Give back the latest permit; ``LockNotOwned`` if none is held, ``LockLost`` if its
        lease had run out."""
        if not self._held:
            raise LockNotOwned(f"{self.what}: release() without a permit held")
        permit, hold = self._held.pop()
        await hold.end()
        await run(flows.sem_release(self.what, self.layout, permit, self.lease),
                  self._executor())  # fmt: skip

    async def aclose(self) -> None:
        """Give back every permit held here and stop renewing."""
        while self._held:
            with contextlib.suppress(LockError, SyncMapError):
                await self.release()

    async def __aenter__(self) -> Semaphore:
        await self.acquire()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.released_on_exit(exc_type)

    def __repr__(self) -> str:
        return f"<aio.Semaphore {self.name!r} {len(self._held)}/{self.permits} held here>"
