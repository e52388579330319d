"""``Lock`` for asyncio: ``syncmap.Lock``'s flows on the loop's executor, renewed by a task.

Ownership is the object's ``owner`` token, as in the thread driver: two Lock objects exclude
each other whether they run on two threads, two processes or two tasks of one loop.  One object
is one owner, re-entrant for the task that holds it; another task acquiring a held object gets
``LockError`` (the thread driver cannot tell threads apart and lets them in, which on a loop of
many request handlers sharing one object would silently break mutual exclusion).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType

import redis

from ...errors import (
    ConfigurationError,
    LockError,
    LockNotAcquired,
    LockNotOwned,
    SyncMapError,
)
from ...lock import flows
from ...lock.base import LockIdentity, OnLost, check_count, check_seconds, check_timeout
from ...lock.lease import Fence
from ...lock.mutex import Replicas
from ...lock.waiting import Attempt
from ...store.topology import Topology
from ..run import run
from .base import AsyncLockParts
from .hold import AsyncHold
from .waiting import AsyncQueue, wait_for

log = logging.getLogger("syncmap.lock")


class Lock(AsyncLockParts, LockIdentity):
    """``syncmap.Lock`` for asyncio: ``async with lock as fence``, ``await acquire()``,
    ``await release()``; the same parameters, tokens, leases and errors."""

    kind_of: type[flows.Kind] = flows.Mutex

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        redis: redis.Redis | None = None,
        lease: float = 30.0,
        replicas: Replicas = "none",
        min_replicas: int = 1,
        replica_timeout: float = 0.5,
        owner: str | None = None,
        on_lost: OnLost | None = None,
        namespace: str = "sm",
        socket_timeout: float = 5.0,
        topology: Topology | None = None,
        hash_tag: str | None = None,
    ) -> None:
        super().__init__(name, url, redis=redis, lease=lease, owner=owner, on_lost=on_lost,
                         namespace=namespace, socket_timeout=socket_timeout,
                         topology=topology, hash_tag=hash_tag)  # fmt: skip
        if replicas not in ("none", "check", "require"):
            raise ConfigurationError(f"replicas={replicas!r}: use 'none', 'check' or 'require'")
        self.replicas = replicas
        self.min_replicas = check_count("min_replicas", min_replicas, 1)
        self.replica_timeout = check_seconds("replica_timeout", replica_timeout, 0, 86_400,
                                             low_ok=False)  # fmt: skip
        self.replicated: bool | None = None
        self._count = 0
        self._token = 0
        self._hold: AsyncHold | None = None
        self._task: asyncio.Task[object] | None = None

    def _kind(self) -> flows.Kind:
        return self.kind_of(self.layout, self.owner, self.lease, self.what)

    # ---- acquiring -----------------------------------------------------------------------------

    async def acquire(self, blocking: bool = True, timeout: float | None = None) -> Fence:
        """Acquire (or re-enter) and return the fencing token; ``LockNotAcquired`` on timeout
        (``timeout`` as ``syncmap.Lock.acquire``'s).  Cancelled while waiting: nothing held."""
        timeout = check_timeout(timeout)
        task = asyncio.current_task()
        if self._count and self._task is not task:
            raise LockError(
                f"{self.what} is held by another task; give each task its own Lock object "
                "(map.lock(key) makes a new one per call)"
            )
        if self._hold is not None:
            self._hold.check()  # a lost hold (or one whose lease ran out): release() it first
        await self._warn_if_evicting()
        kind = self._kind()
        queue = AsyncQueue(kind.member, lambda: run(flows.leave(kind), self._executor()))
        fence: Fence = await wait_for(self._attempt, waker=self._waker,
                                      channel=self.layout.channel,
                                      timeout=timeout if blocking else 0, what=self.what,
                                      queue=queue if kind.queued else None)  # fmt: skip
        self._task = task
        return fence

    async def try_acquire(self) -> Fence | None:
        """Acquire if free right now; None when another owner holds it."""
        try:
            return await self.acquire(blocking=False)
        except LockNotAcquired:
            return None

    def _wait_replicas(self) -> tuple[int, int] | None:
        if self.replicas == "none":
            return None
        return self.min_replicas, max(1, round(self.replica_timeout * 1000))

    async def _attempt(self, queue: bool) -> Attempt[Fence]:
        count = self._count
        flow = flows.attempt(self._kind(), count=count, token=self._token,
                             wait=self._wait_replicas(), queue=queue)  # fmt: skip
        try:
            got = await run(flow, self._executor())
        except asyncio.CancelledError:
            if count == 0:  # the acquire may have been applied: hold nothing after a cancel
                await self._give_up()
            raise
        grant = got.value
        if grant is None:
            return Attempt(None, got.wait_ms, got.holder, got.why)
        fence = self._held(grant.token, grant.sent)
        if grant.acked is not None:
            await self._check_replicas(grant.acked)
        return Attempt(fence)

    async def _give_up(self) -> None:
        """After a cancelled first acquire: give back whatever this owner may hold.

        The acquire may have been applied with its reply unread, so its token is unknown: the
        release names no token (``None``), not a made-up one that never matches.  An owner
        string shared by several Lock objects loses its whole hold here; by default each
        object is its own owner."""
        with contextlib.suppress(LockError, SyncMapError):
            await run(flows.abandon(self._kind(), None), self._executor())

    def _held(self, token: int, sent: float | None) -> Fence:
        self._token = token
        self._count += 1
        if sent is None:  # re-entered without asking Redis
            pass
        elif self._hold is None:  # a first hold, or one re-entered through a shared owner
            kind = self._kind()
            self._hold = AsyncHold(self.what, self.lease, sent,
                                   lambda: run(flows.renew(kind), self._executor()),
                                   lambda: run(flows.abandon(kind, token), self._executor()),
                                   self.on_lost)  # fmt: skip
        else:
            self._hold.extended(sent)
        return Fence(token, self.name, self.layout.fence)

    async def _check_replicas(self, acked: int) -> None:
        msg = flows.replicas_message(self.what, acked, self.min_replicas, self.replica_timeout)
        self.replicated = msg is None
        if msg is None:
            return
        if self.replicas == "check":
            log.warning("syncmap: %s", msg)
            return
        with contextlib.suppress(LockError):
            await self.release()
        raise LockNotAcquired(msg + " (replicas='require': released it; retry later)")

    # ---- holding -------------------------------------------------------------------------------

    @property
    def fence(self) -> Fence:
        """The token of the current hold; ``LockLost`` if the lease ran out."""
        hold = self._hold
        if hold is None:
            raise LockNotOwned(f"{self.what} is not held by this owner: acquire it first")
        hold.check()
        return Fence(self._token, self.name, self.layout.fence)

    @property
    def valid(self) -> bool:
        """Held, and its lease surely still in force (it reads the clock: no round trip)."""
        hold = self._hold
        return hold is not None and hold.valid

    @property
    def held(self) -> bool:
        return self._count > 0

    async def locked(self) -> bool:
        """Whether any owner holds it now (one round trip)."""
        return await run(flows.locked(self.layout), self._executor())

    # ---- releasing -----------------------------------------------------------------------------

    async def release(self) -> None:
        """Release one level; ``LockNotOwned`` if not held here, ``LockLost`` if it was lost."""
        hold = self._hold
        if self._count == 0 or hold is None:
            raise LockNotOwned(
                f"{self.what} cannot be released: this owner does not hold it. A Lock "
                "object is one owner; acquire() before release()"
            )
        self._count -= 1
        last = self._count == 0
        if last:
            self._hold, self._task = None, None
            await hold.end()
        elif hold.lost is not None:
            raise hold.lost
        await run(flows.release(self._kind(), last=last, token=self._token), self._executor())

    async def aclose(self) -> None:
        """Release every level still held (a loss is not raised here) and stop renewing."""
        while self._count:
            with contextlib.suppress(LockError, SyncMapError):
                await self.release()

    async def __aenter__(self) -> Fence:
        return await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        await self.released_on_exit(exc_type)

    def __repr__(self) -> str:
        state = "lost" if self._hold and self._hold.lost else ("held" if self._count else "free")
        return f"<aio.Lock {self.name!r} {state} token={self._token} on {self.where}>"
