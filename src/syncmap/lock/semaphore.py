"""``Semaphore``: at most n holders at once, each permit a lease renewed by the watchdog."""

from __future__ import annotations

import uuid

import redis

from ..errors import ConfigurationError, LockNotAcquired, LockNotOwned
from ..store.topology import Topology
from ..sync.run import run
from . import flows
from .base import LockBase, OnLost, check_timeout
from .lease import Hold, ReleasedOnExit, Watchdog
from .waiting import Attempt, Queue, wait_for


class Semaphore(ReleasedOnExit, LockBase):
    """At most ``permits`` holders at once; each permit is a lease, so a crashed holder's permit
    comes back when its lease ends.  ``with sem:`` or ``acquire()`` / ``release()``.

    One object may hold several permits (each ``acquire`` takes one more; ``release`` gives back
    the latest).  Every client of a name must use the same ``permits``.  Semaphores issue no
    fencing tokens: several holders at once is their point.  Waiters take turns in order of
    arrival: a release names as many waiters at the head of the queue as permits are free, and
    a newcomer takes no permit while a queued waiter's turn is pending.
    """

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
        self._held: list[tuple[str, Hold]] = []

    def _forget_holds(self) -> None:
        self._held = []

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> None:
        """Take a permit; ``LockNotAcquired`` when none came free in time (``timeout`` as
        ``Lock.acquire``'s: NaN or negative raises ``ValueError``)."""
        timeout = check_timeout(timeout)
        permit = f"{self.owner}:{uuid.uuid4().hex[:8]}"
        self._warn_if_evicting()
        queue = Queue(permit, lambda: run(flows.sem_leave(self.layout, permit),
                                          self._executor))  # fmt: skip
        wait_for(lambda queued: self._attempt(permit, queued), waker=self._waker,
                 channel=self.layout.channel, timeout=timeout if blocking else 0,
                 what=self.what, queue=queue)  # fmt: skip

    def try_acquire(self) -> bool:
        try:
            self.acquire(blocking=False)
        except LockNotAcquired:
            return False
        return True

    def _attempt(self, permit: str, queue: bool) -> Attempt[bool]:
        got = run(flows.sem_attempt(self.layout, permit, self.lease, self.permits, queue),
                  self._executor)  # fmt: skip
        if got.value is None:
            return Attempt(None, got.wait_ms, got.holder, got.why)
        sent = got.value
        hold = Hold(f"{self.what} permit {permit}", self.lease, sent,
                    lambda: self._renew(permit), lambda: self._give_back(permit),
                    self.on_lost)  # fmt: skip
        with self._state:
            self._held.append((permit, hold))
        Watchdog.get().watch(hold, sent + self.lease / 3)
        return Attempt(True)

    def _renew(self, permit: str) -> bool:
        return run(flows.sem_renew(self.layout, permit, self.lease), self._executor)

    def _give_back(self, permit: str) -> bool:
        return run(flows.sem_give_back(self.layout, permit), self._executor)

    @property
    def held(self) -> int:
        """How many permits this object holds."""
        return len(self._held)

    @property
    def valid(self) -> bool:
        """Every permit this object holds is surely still in force."""
        return bool(self._held) and all(hold.valid for _, hold in self._held)

    def release(self) -> None:
        """Give back the latest permit; ``LockNotOwned`` if none is held, ``LockLost`` if its
        lease had run out."""
        with self._state:
            if not self._held:
                raise LockNotOwned(f"{self.what}: release() without a permit held")
            permit, hold = self._held.pop()
        hold.end()
        run(flows.sem_release(self.what, self.layout, permit, self.lease), self._executor)

    def __enter__(self) -> Semaphore:
        self.acquire()
        return self

    def __repr__(self) -> str:
        return f"<Semaphore {self.name!r} {len(self._held)}/{self.permits} held here>"
