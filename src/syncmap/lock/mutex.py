"""``Lock``: a lease lock on one Redis, renewed by the watchdog, issuing fencing tokens."""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

import redis

from ..errors import ConfigurationError, LockError, LockNotAcquired, LockNotOwned
from ..store.topology import Topology
from ..sync.run import run
from . import flows
from .base import LockBase, OnLost, check_count, check_seconds, check_timeout
from .lease import Fence, Hold, ReleasedOnExit, Watchdog
from .waiting import Attempt, Queue, wait_for

log = logging.getLogger("syncmap.lock")
Replicas = Literal["none", "check", "require"]


class Lock(ReleasedOnExit, LockBase):
    """A distributed mutual-exclusion lock with a lease, a watchdog and fencing tokens.

    ``acquire()`` returns a :class:`Fence`: an int that strictly increases with every acquisition
    of this name.  Pass it as ``fence=`` to ``SyncMap`` writes: Redis refuses them
    (``StaleFence``) once a newer token exists, so a holder that was paused past its lease cannot
    overwrite the work of the next one.

    Ownership is this object's ``owner`` token, not the thread: the object is re-entrant for
    whoever uses it (threads and asyncio tasks alike).  Give each thread or task that must
    exclude the others its own ``Lock`` object (``map.lock(key)`` makes a new one each call).

    ``replicas`` decides what a failover may do to the lock: ``"none"`` (no check, no cost),
    ``"check"`` (``WAIT`` for ``min_replicas`` after acquiring; ``replicated`` tells, and a
    warning is logged when they did not confirm), ``"require"`` (refuse the acquisition,
    releasing it, unless ``min_replicas`` replicas confirmed within ``replica_timeout``).
    """

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
        self.replicated: bool | None = None  # None: not checked
        self._count = 0
        self._token = 0
        self._hold: Hold | None = None

    def _forget_holds(self) -> None:
        self._count, self._token, self._hold = 0, 0, None

    # ---- acquiring -----------------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> Fence:
        """Acquire (or re-enter) and return the fencing token; ``LockNotAcquired`` on timeout.

        ``timeout``: seconds (0 tries once), or None (or ``inf``) to wait forever; NaN or a
        negative number raises ``ValueError``."""
        timeout = check_timeout(timeout)
        if self._hold is not None:
            self._hold.check()  # a lost hold (or one whose lease ran out): release() it first
        self._warn_if_evicting()
        kind = self._kind()
        queue = Queue(kind.member, lambda: run(flows.leave(kind), self._executor))
        fence = wait_for(self._attempt, waker=self._waker, channel=self.layout.channel,
                         timeout=timeout if blocking else 0, what=self.what,
                         queue=queue if kind.queued else None)  # fmt: skip
        return fence

    def try_acquire(self) -> Fence | None:
        """Acquire if free right now; None when another owner holds it."""
        try:
            return self.acquire(blocking=False)
        except LockNotAcquired:
            return None

    def _kind(self) -> flows.Kind:
        """Which scripts this lock uses (RWLock's sides use their own)."""
        return self.kind_of(self.layout, self.owner, self.lease, self.what)

    def _wait_replicas(self) -> tuple[int, int] | None:
        if self.replicas == "none":
            return None
        return self.min_replicas, max(1, round(self.replica_timeout * 1000))

    def _attempt(self, queue: bool) -> Attempt[Fence]:
        got = run(flows.attempt(self._kind(), count=self._count, token=self._token,
                                wait=self._wait_replicas(), queue=queue),
                  self._executor)  # fmt: skip
        grant = got.value
        if grant is None:
            return Attempt(None, got.wait_ms, got.holder, got.why)
        fence = self._held(grant.token, grant.sent)
        if grant.acked is not None:
            self._check_replicas(grant.acked)
        return Attempt(fence)

    def _held(self, token: int, sent: float | None) -> Fence:
        with self._state:
            self._token = token
            self._count += 1
            if sent is None:  # re-entered without asking Redis
                pass
            elif self._hold is None:  # a first hold, or one re-entered through a shared owner
                self._hold = Hold(self.what, self.lease, sent, self._renew,
                                  lambda: self._abandon(token), self.on_lost)  # fmt: skip
                Watchdog.get().watch(self._hold, sent + self.lease / 3)
            else:
                self._hold.extended(sent)
        return Fence(token, self.name, self.layout.fence)

    def _check_replicas(self, acked: int) -> None:
        msg = flows.replicas_message(self.what, acked, self.min_replicas, self.replica_timeout)
        self.replicated = msg is None
        if msg is None:
            return
        if self.replicas == "check":
            log.warning("syncmap: %s", msg)
            return
        with contextlib.suppress(LockError):
            self.release()
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
        """This owner acquired it and has not released it (it may have been lost since)."""
        return self._count > 0

    def locked(self) -> bool:
        """Whether any owner holds it now (one round trip)."""
        return run(flows.locked(self.layout), self._executor)

    def _renew(self) -> bool:
        return run(flows.renew(self._kind()), self._executor)

    def _abandon(self, token: int) -> None:
        run(flows.abandon(self._kind(), token), self._executor)

    # ---- releasing -----------------------------------------------------------------------------

    def release(self) -> None:
        """Release one level of the hold.

        ``LockNotOwned`` if this owner does not hold it; ``LockLost`` if the lease had run out
        (the hold is gone all the same).
        """
        with self._state:
            hold = self._hold
            if self._count == 0 or hold is None:
                raise LockNotOwned(
                    f"{self.what} cannot be released: this owner does not hold it. A Lock "
                    "object is one owner; acquire() before release()"
                )
            self._count -= 1
            last = self._count == 0
            if last:
                self._hold = None
        if last:
            hold.end()
        elif hold.lost is not None:
            raise hold.lost
        run(flows.release(self._kind(), last=last, token=self._token), self._executor)

    def __enter__(self) -> Fence:
        return self.acquire()

    def __repr__(self) -> str:
        state = "lost" if self._hold and self._hold.lost else ("held" if self._count else "free")
        return f"<Lock {self.name!r} {state} token={self._token} on {self.where}>"
