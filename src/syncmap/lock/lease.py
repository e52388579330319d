"""What every lock kind shares: fencing tokens, holds with leases, and the one renewal worker.

A *hold* is one acquisition that is still in force (a lock held, a read hold, a semaphore permit).
It knows until when it is surely valid on this process's clock, and it is renewed by the process's
single :class:`Watchdog` thread at a third of its lease.  How a hold ends up lost, and who learns:

1. The watchdog renews it: ``valid_until = send time + lease - drift`` (the send time, not the
   reply time: Redis may have applied the PEXPIRE at any moment after the send).
2. A renewal that fails on the network is retried soon, until ``valid_until``; then it is lost.
3. A renewal that finds the hold gone (the lease ran out, an operator deleted it) loses it.
4. A process paused past ``valid_until`` (SIGSTOP, a long GC or C call holding the GIL) finds
   ``valid`` false at once when it resumes, before the watchdog has run: ``valid`` reads the clock.
Loss is sticky and loud: ``LockLost`` on the next use, ``on_lost`` called once (on the watchdog
thread), ``valid`` false.  Safety after a loss does not rest on the holder noticing in time: its
fenced writes are refused by the map, which compares tokens inside Redis.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from .. import forksafe, instruments
from ..errors import LockError, LockLost, SyncMapError

log = logging.getLogger("syncmap.lock")

#: Clock drift allowed per lease (as Redlock does: 1 % plus 2 ms), so a hold counts as expired
#: here a little before Redis could expire it.
DRIFT = 0.01
DRIFT_FIXED = 0.002


class Fence(int):
    """A fencing token: an ``int`` that also names its lock, so ``fence=`` needs nothing else.

    Tokens of one lock name strictly increase with every acquisition.  A map write given
    ``fence=`` is refused by Redis (``StaleFence``) once a newer token has been issued.
    """

    lock: str
    key: str

    def __new__(cls, token: int, lock: str, key: str) -> Fence:
        self = super().__new__(cls, token)
        self.lock = lock  # the lock's name
        self.key = key  # the Redis key of its fence counter
        return self

    def __repr__(self) -> str:
        return f"Fence({int(self)}, lock={self.lock!r})"

    def __reduce__(self) -> tuple[object, ...]:
        return (Fence, (int(self), self.lock, self.key))


def drift(lease: float) -> float:
    return lease * DRIFT + DRIFT_FIXED


PAUSED = (
    "its lease of {lease:g} s ran out before it was renewed (was this process paused, or "
    "Redis unreachable?)"
)
UNRENEWED = (
    "its lease of {lease:g} s ran out before it could be renewed (was this process "
    "paused, or Redis unreachable?)"
)
GONE = "renewal found it no longer held (its lease ran out in Redis)"


class Lease:
    """A hold's bookkeeping, shared by both drivers: until when it is surely valid, whether it
    was lost or released, and what a renewal's outcome means.  No I/O and no waiting here: the
    thread driver (:class:`Hold`) and the asyncio one (``syncmap.aio.lock.hold``) do the
    round trips and decide only through these methods."""

    def __init__(self, what: str, lease: float, sent_at: float,
                 on_lost: Callable[[LockLost], None] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.what = what  # "lock 'orders' (owner host:123:ab12)", for messages
        self.lease = lease
        self.valid_until = sent_at + lease - drift(lease)
        self.lost: LockLost | None = None
        self.released = False
        self._on_lost = on_lost
        self._clock = clock

    @property
    def valid(self) -> bool:
        return self.lost is None and not self.released and self._clock() < self.valid_until

    @property
    def overdue(self) -> bool:
        """In force by our records, but its lease has run out on our clock."""
        return self.lost is None and not self.released and self._clock() >= self.valid_until

    def _lose(self, why: str) -> bool:
        """Mark lost; True if it was not lost (nor released) before."""
        if self.lost is not None or self.released:
            return False
        self.lost = LockLost(
            f"{self.what} was lost: {why}. Another holder may have entered since; writes "
            "fenced with its token are refused. Stop, release, and acquire again"
        )
        return True

    def extended(self, sent: float) -> None:
        """Redis granted it again (a re-entry) for a request sent at ``sent``."""
        self.valid_until = max(self.valid_until, sent + self.lease - drift(self.lease))

    def renew_due(self) -> tuple[bool, bool]:
        """Before a renewal: (renew now?, newly lost?).  Neither when it is over already."""
        if self.released or self.lost is not None:
            return False, False
        if self._clock() >= self.valid_until:
            return False, self._lose(UNRENEWED.format(lease=self.lease))
        return True, False

    def renewed(self, sent: float, ok: bool) -> tuple[float | None, bool]:
        """After a renewal sent at ``sent`` that said ``ok``: (when to renew next, newly lost?)."""
        if self.released or self.lost is not None:
            return None, False
        if ok:
            self.valid_until = sent + self.lease - drift(self.lease)
            return sent + self.lease / 3, False
        return None, self._lose(GONE)

    def failed(self, exc: SyncMapError) -> float:
        """After a renewal that failed on the network: when to try again (soon, never past
        ``valid_until``: the next try then finds it lost)."""
        log.warning("syncmap: renewing %s failed (%s); retrying", self.what, exc)
        return min(self._clock() + min(self.lease / 10, 0.5), self.valid_until)

    def announce(self) -> None:
        """Count and log a new loss (before the driver gives the hold back)."""
        instruments.lock_lost(self.what)
        # Logged as an error only when nobody asked to be told: an on_lost callback handles it.
        log.log(logging.ERROR if self._on_lost is None else logging.INFO, "syncmap: %s",
                self.lost)  # fmt: skip

    def tell(self) -> None:
        """Call ``on_lost`` (after the driver gave the hold back); its failure is only logged."""
        if self._on_lost is not None and self.lost is not None:
            try:
                self._on_lost(self.lost)
            except Exception:
                log.exception("syncmap: the on_lost callback of %s failed", self.what)


class Hold(Lease):
    """One acquisition in force, for the thread driver.  ``renew`` returns False when the hold
    is gone from Redis; the process's :class:`Watchdog` calls :meth:`tick`."""

    def __init__(
        self,
        what: str,
        lease: float,
        sent_at: float,
        renew: Callable[[], bool],
        abandon: Callable[[], object],
        on_lost: Callable[[LockLost], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(what, lease, sent_at, on_lost, clock)
        self.mutex = threading.Lock()  # a renewal and a release never interleave
        self._renew = renew
        self._abandon = abandon

    def check(self) -> None:
        """Raise ``LockLost`` if this hold is lost or its lease has run out on our clock."""
        if self.overdue:
            with self.mutex:
                newly = self._lose(PAUSED.format(lease=self.lease))
            if newly:
                self._after_loss()
        if self.lost is not None:
            raise self.lost

    def end(self) -> None:
        """The holder gives it up: stop renewing, then ``LockLost`` if it had been lost.

        Takes ``mutex`` first, so it waits for a renewal in flight: that renewal's reply must
        not be read as a loss once the holder has released."""
        with self.mutex:
            lost = self.lost
            self.released = True
        Watchdog.get().unwatch(self)
        if lost is not None:
            raise lost

    def tick(self) -> float | None:
        """Renew if due (watchdog thread).  Returns when to come back, or None when done."""
        with self.mutex:
            go, newly = self.renew_due()
            due = None
            if go:
                sent = self._clock()
                try:
                    ok = self._renew()
                except SyncMapError as exc:  # unreachable or unknown: try again soon
                    return self.failed(exc)
                due, newly = self.renewed(sent, ok)
        if newly:
            self._after_loss()
        return due

    def _after_loss(self) -> None:
        self.announce()
        try:
            self._abandon()  # give it back now if it is still ours, so waiters need not wait
        except SyncMapError as exc:
            log.warning("syncmap: could not give back %s after its loss: %s", self.what, exc)
        self.tell()


class ReleasedOnExit:
    """``__exit__`` for every lock kind: release; when the block is already raising, that
    exception is the one the caller must see, so a ``LockLost`` at release is swallowed."""

    def release(self) -> None:
        raise NotImplementedError

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        if exc_type is None:
            self.release()
            return
        with contextlib.suppress(LockError):
            self.release()


class Watchdog:
    """The process's one renewal thread for every hold of every lock kind.

    Holds are kept in a dict (hold -> next due time); the thread sleeps until the earliest one.
    ``watch`` wakes it only when the new hold is due before the planned wake-up, so back-to-back
    acquire/release pairs cost a dict insert and delete, not a thread switch.
    """

    _instance: Watchdog | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> Watchdog:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @staticmethod
    @forksafe.at_fork
    def _forget() -> None:
        """In a forked child the parent's watchdog thread does not exist and its holds are the
        parent's: the child's first hold starts a watchdog of its own."""
        Watchdog._instance = None
        Watchdog._instance_lock = threading.Lock()

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._cond = threading.Condition()
        self._due: dict[Hold, float] = {}
        self._wake_at = float("inf")
        self._clock = clock
        self._thread = threading.Thread(target=self._run, name="syncmap-watchdog", daemon=True)
        self._thread.start()

    def watch(self, hold: Hold, due: float) -> None:
        with self._cond:
            self._due[hold] = due
            if due < self._wake_at:
                self._cond.notify()

    def unwatch(self, hold: Hold) -> None:
        with self._cond:
            self._due.pop(hold, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = self._clock()
                ready = [h for h, due in self._due.items() if due <= now]
                for hold in ready:
                    del self._due[hold]
                if not ready:
                    self._wake_at = min(self._due.values(), default=float("inf"))
                    wait = None if self._due == {} else max(self._wake_at - now, 0.0)
                    self._cond.wait(wait)
                    continue
                self._wake_at = float("-inf")  # busy: watch() need not notify
            for hold in ready:  # renewals run outside the condition: they do I/O
                try:
                    due = hold.tick()
                except Exception:  # never a dead watchdog (python-redis-lock's trap)
                    log.exception("syncmap: the watchdog failed on %s; retrying", hold.what)
                    due = self._clock() + 0.5
                if due is not None:
                    with self._cond:
                        if not hold.released:
                            self._due[hold] = due
