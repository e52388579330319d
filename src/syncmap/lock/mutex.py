"""``Lock``: a lease lock on one Redis, renewed by the watchdog, issuing fencing tokens."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Literal

import redis

from ..errors import (
    ConfigurationError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    StoreUnavailable,
    WriteOutcomeUnknown,
)
from ..store.executor import evalsha
from ..store.topology import Topology
from .base import LockBase, OnLost, check_count, check_seconds, check_timeout
from .lease import Fence, Hold, ReleasedOnExit, Watchdog, drift
from .waiting import Attempt, wait_for

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
    ) -> None:
        super().__init__(name, url, redis=redis, lease=lease, owner=owner, on_lost=on_lost,
                         namespace=namespace, socket_timeout=socket_timeout,
                         topology=topology)  # fmt: skip
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
        fence = wait_for(self._attempt, waker=self._waker, channel=self.layout.channel,
                         timeout=timeout if blocking else 0, what=self.what)  # fmt: skip
        return fence

    def try_acquire(self) -> Fence | None:
        """Acquire if free right now; None when another owner holds it."""
        try:
            return self.acquire(blocking=False)
        except LockNotAcquired:
            return None

    # The hooks a variant (RWLock's sides) overrides: which scripts acquire, renew and release.

    def _acquire_command(self) -> tuple[Any, ...]:
        lay = self.layout
        return evalsha("lock_acquire", (lay.hold, lay.fence), self.owner,
                                       self._lease_ms())  # fmt: skip

    def _renew_command(self) -> tuple[Any, ...]:
        return evalsha("lock_renew", (self.layout.hold,), self.owner,
                                       self._lease_ms())  # fmt: skip

    def _release_command(self, *, every_level: bool, last: bool, token: int | None = None
                         ) -> tuple[Any, ...] | None:  # fmt: skip
        """None: nothing to tell Redis at this level (it keeps no re-entry count).  ``token``
        releases only that hold (a lost one given back late), not a newer one of this owner."""
        every = "1" if every_level else "0"
        return evalsha("lock_release", (self.layout.hold,), self.owner,
                                       self.layout.channel, every,
                                       "" if token is None else token)  # fmt: skip

    def _released(self, reply: Any) -> str | None:
        """None if the release reply says it was ours; else who holds it now ('' = nobody)."""
        if int(reply[0]) == 1:
            return None
        return reply[1].decode(errors="replace") if reply[1] else ""

    def _still_ours(self) -> tuple[int, int] | None:
        """After a lost acquire reply: (token, re-entries) if Redis says this owner holds it."""
        owner, count, token = self._executor.call(
            [("HMGET", self.layout.hold, "o", "n", "t")], write=False
        )[0]
        if owner is None or owner.decode() != self.owner:
            return None
        return int(token), int(count)

    # ----

    def _attempt(self) -> Attempt[Fence]:
        cmds: list[tuple[Any, ...]] = [self._acquire_command()]
        if self.replicas != "none":
            cmds.append(("WAIT", self.min_replicas, max(1, round(self.replica_timeout * 1000))))
        sent = time.monotonic()
        try:
            replies = self._executor.call(cmds, write=True)
        except WriteOutcomeUnknown:
            return self._after_unknown(sent)
        reply = replies[0]
        if not reply[0]:
            holder = reply[2].decode(errors="replace") if reply[2] else ""
            return Attempt(None, int(reply[1]), holder)
        token = int(reply[1])
        if self._count == 0 and time.monotonic() >= sent + self.lease - drift(self.lease):
            # The reply came after the lease had run out (Redis or this process stalled): the
            # hold may already be another's.  Give it back and try again; never return a fence
            # whose lease is over before the caller sees it.
            self._abandon(token)
            return Attempt(None, 0, "nobody (the reply came after the lease had run out)")
        fence = self._held(token, sent)
        if self.replicas != "none":
            self._check_replicas(int(replies[1]))
        return Attempt(fence)

    def _held(self, token: int, sent: float) -> Fence:
        with self._state:
            self._token = token
            self._count += 1
            if self._hold is None:  # a first hold, or one re-entered through a shared owner
                self._hold = Hold(self.what, self.lease, sent, self._renew,
                                  lambda: self._abandon(token), self.on_lost)  # fmt: skip
                Watchdog.get().watch(self._hold, sent + self.lease / 3)
            else:
                renewed = sent + self.lease - drift(self.lease)
                self._hold.valid_until = max(self._hold.valid_until, renewed)
        return Fence(token, self.name, self.layout.fence)

    def _after_unknown(self, sent: float) -> Attempt[Fence]:
        """The acquire was sent but its reply lost: read whether it took effect."""
        ours = self._still_ours()
        if ours is None:
            return Attempt(None, 1)  # it did not: try again
        if ours[1] == self._count + 1:
            return Attempt(self._held(ours[0], sent))
        raise StoreUnavailable(
            f"{self.what}: the acquire's reply was lost and its effect is ambiguous; "
            "release() and acquire again"
        )

    def _check_replicas(self, acked: int) -> None:
        self.replicated = acked >= self.min_replicas
        if self.replicated:
            return
        msg = (
            f"{self.what}: only {acked} of {self.min_replicas} replicas confirmed the "
            f"acquisition within {self.replica_timeout:g} s; a failover now could give the "
            "lock to a second holder"
        )
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
        return bool(self._executor.call([("EXISTS", self.layout.hold)], write=False)[0])

    def _renew(self) -> bool:
        return bool(self._executor.call([self._renew_command()], write=True)[0])

    def _abandon(self, token: int) -> None:
        cmd = self._release_command(every_level=True, last=True, token=token)
        if cmd is not None:
            self._executor.call([cmd], write=True)

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
        cmd = self._release_command(every_level=False, last=last)
        if cmd is None:
            return
        now_held_by = self._released(self._executor.call([cmd], write=True)[0])
        if now_held_by is not None:
            holder = f"; {now_held_by} holds it now" if now_held_by else ""
            raise LockLost(
                f"{self.what} was lost before release: its lease of {self.lease:g} s had run "
                f"out{holder}. Another holder may have entered; writes fenced with token "
                f"{self._token} are refused"
            )

    def __enter__(self) -> Fence:
        return self.acquire()

    def __repr__(self) -> str:
        state = "lost" if self._hold and self._hold.lost else ("held" if self._count else "free")
        return f"<Lock {self.name!r} {state} token={self._token} on {self.where}>"
