"""Waiting for a lock without polling: woken by the holder's release message.

Every release script PUBLISHes on the lock's channel.  A process that waits attaches one handler
per lock channel to its shared subscriber (the same connection the maps use), so a hand-off costs
one message and one acquire round trip, not a polling interval (redis-py's ``Lock`` sleeps 100 ms).

Waiters queue in Redis (``store/scripts.py``, "Lock's queue", and RWLock's and Semaphore's): a
release names the next waiter (``h<entry>``: a Lock's owner, an RWLock side's ``r:``/``w:`` +
owner, a Semaphore's permit id; a batch is one message per waiter) and this process wakes only
that waiter; the others stay asleep and cost Redis nothing, so a hand-off is one release and one
acquire whatever the number of waiters.  A message ``r`` (nobody queued, or an older client)
wakes every waiter, and so do a (re)subscription and a lost connection (messages may have been
missed).

Order of events in :func:`wait_for`, chosen so that no release can slip by unseen:

1. try once, without queueing (the uncontended path never subscribes; ``try_acquire`` leaves no
   entry behind);
2. subscribe and wait for Redis's confirmation (bounded: a subscriber that is down does not hold
   the waiter up, the fallback bound below still applies);
3. loop: clear the event -> try (and queue) -> wait for the event, at most ``Attempt.wait_ms``.
   A release between "try" and "wait" has already set the event, so the wait returns at once;
   a release before the try is seen by the try itself (the queue and the hold change together).
``wait_ms`` bounds every wait: the holder's remaining lease (a holder that crashed never
publishes), and for a queued waiter at most a third of its place's lease, so a lost message
costs at most that and the place stays the waiter's (``flows.Mutex.refused``).
4. giving up (timeout, an error, an interrupt) leaves the queue: when the lock had just been
   handed to this waiter, leaving names the next one (``lock_leave``).  A leave that fails
   costs the others at most the entry's lease (it is then skipped as a dead waiter's).
Channels stay subscribed after the wait (the next hand-off is then one message away); the least
recently used idle ones beyond ``IDLE_CHANNELS`` are unsubscribed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import forksafe, instruments
from ..errors import LockNotAcquired, SyncMapError
from ..feed.pubsub import Handler, Subscriber
from ..feed.sharded import ShardedSubscriber
from ..store.cluster import ClusterTopology
from ..store.topology import Topology

T = TypeVar("T")
IDLE_CHANNELS = 256
CONFIRM_WAIT = 1.0


@dataclass(slots=True)
class Attempt(Generic[T]):
    """One try: the result when acquired, else how long to wait at most and who is in the way."""

    value: T | None
    wait_ms: int = 0
    holder: str = ""
    why: str = ""  # what is in the way, when more than "held by <holder>" (a Lock's queue)


def named(payload: bytes) -> str | None:
    """Whose turn a release message gives: ``h<owner>`` names one waiter; anything else (``r``)
    is None, everyone's (both drivers decide with this)."""
    if payload[:1] == b"h":
        return payload[1:].decode(errors="replace")
    return None


E = TypeVar("E")


def joined(waiters: dict[str | None, frozenset[E]], owner: str | None, event: E
           ) -> dict[str | None, frozenset[E]]:  # fmt: skip
    """``waiters`` with ``event`` added under ``owner``: a new dict (copy on write, so the
    subscriber's callback reads a consistent one without a lock)."""
    return {**waiters, owner: waiters.get(owner, frozenset()) | {event}}


def parted(waiters: dict[str | None, frozenset[E]], owner: str | None, event: E
           ) -> dict[str | None, frozenset[E]]:  # fmt: skip
    """``waiters`` without ``event`` (a new dict; an owner with no event left is dropped)."""
    rest = {k: v for k, v in waiters.items() if k != owner}
    left = waiters.get(owner, frozenset()) - {event}
    return {**rest, owner: left} if left else rest


def to_wake(waiters: dict[str | None, frozenset[E]], payload: bytes | None) -> list[E]:
    """The events a message wakes (None: a (re)subscription or a lost connection: all).  Keyed
    by owner; waiters that do not queue are under None and wake on every message."""
    who = None if payload is None else named(payload)
    if who is None:
        return [event for events in waiters.values() for event in events]
    return [*waiters.get(who, ()), *waiters.get(None, ())]


@dataclass(slots=True, eq=False)
class _Channel:
    handler: Handler
    confirmed: threading.Event = field(default_factory=threading.Event)
    waiters: dict[str | None, frozenset[threading.Event]] = field(default_factory=dict)
    subscriber: Subscriber | ShardedSubscriber | None = None


def attach(topology: Topology, channel: str, handler: Handler) -> Subscriber | ShardedSubscriber:
    """The process's subscriber for ``channel``: on a Redis Cluster the sharded one (a lock's
    release is ``SPUBLISH``ed in its own slot, ``LockLayout.notify``), else the plain one."""
    if topology.sharded:
        assert isinstance(topology, ClusterTopology)  # the one sharded topology
        return ShardedSubscriber.attach_to(topology, channel, handler)
    return Subscriber.attach_to(topology, channel, handler)


class Waker:
    """Wakes this process's waiters of one Redis target when a lock is released."""

    _registry: dict[tuple[Any, ...], Waker] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def for_topology(cls, topology: Topology) -> Waker:
        """The process's waker for ``topology`` (keyed as its shared subscriber is)."""
        with cls._registry_lock:
            waker = cls._registry.get(topology.key)
            if waker is None:
                waker = cls._registry[topology.key] = cls(topology)
            return waker

    @staticmethod
    @forksafe.at_fork
    def _forget_all() -> None:
        """In a forked child the parent's wakers (their channels on the parent's subscriber) are
        not this process's: waiting starts over with a subscriber of the child's own."""
        Waker._registry = {}
        Waker._registry_lock = threading.Lock()

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._lock = threading.Lock()
        self._channels: OrderedDict[str, _Channel] = OrderedDict()

    @contextmanager
    def waiting(self, channel: str, owner: str | None = None) -> Iterator[threading.Event]:
        """An event set whenever ``channel`` may have seen a release (or the feed dropped);
        with ``owner`` (a queued waiter), only by releases that name it or name nobody."""
        event = threading.Event()
        with self._lock:
            chan = self._channels.get(channel)
            if chan is None:
                chan = self._attach(channel)
            self._channels.move_to_end(channel)
            chan.waiters = joined(chan.waiters, owner, event)
        chan.confirmed.wait(CONFIRM_WAIT)
        try:
            yield event
        finally:
            with self._lock:
                chan.waiters = parted(chan.waiters, owner, event)
                self._evict_idle()

    def _attach(self, channel: str) -> _Channel:
        def wake(payload: bytes | None) -> None:
            for event in to_wake(chan.waiters, payload):  # one consistent dict (copy on write)
                event.set()

        def up() -> None:
            chan.confirmed.set()
            wake(None)  # a release may have come while we were not subscribed

        def down() -> None:
            chan.confirmed.clear()
            wake(None)  # messages may be lost from now on: every waiter tries again

        chan = _Channel(Handler(on_message=wake, on_up=up, on_down=down))
        self._channels[channel] = chan
        chan.subscriber = attach(self._topology, channel, chan.handler)
        return chan

    def _evict_idle(self) -> None:
        idle = [name for name, chan in self._channels.items() if not chan.waiters]
        for name in idle[: max(0, len(idle) - IDLE_CHANNELS)]:
            chan = self._channels.pop(name)
            if chan.subscriber is not None:
                chan.subscriber.detach(name, chan.handler)


@dataclass(frozen=True, slots=True)
class Queue:
    """A waiter's place in a lock's queue: whose turn messages wake it, and how it leaves."""

    owner: str
    leave: Callable[[], object]


def wait_for(
    attempt: Callable[[bool], Attempt[T]],
    *,
    waker: Callable[[], Waker],
    channel: str,
    timeout: float | None,
    what: str,
    queue: Queue | None = None,
) -> T:
    """Acquire by ``attempt(queue?)`` within ``timeout`` seconds (None: forever; 0: one try).
    Counted by result, with the time it took (:mod:`syncmap.instruments`)."""
    started = time.monotonic()
    try:
        value = _wait(attempt, waker, channel, timeout, what, queue)
    except LockNotAcquired:
        instruments.lock_attempt(what, "timeout", time.monotonic() - started)
        raise
    except BaseException:
        instruments.lock_attempt(what, "error", time.monotonic() - started)
        raise
    instruments.lock_attempt(what, "acquired", time.monotonic() - started)
    return value


def _wait(attempt: Callable[[bool], Attempt[T]], waker: Callable[[], Waker], channel: str,
          timeout: float | None, what: str, queue: Queue | None) -> T:  # fmt: skip
    first = attempt(False)
    if first.value is not None:
        return first.value
    if timeout is not None and timeout <= 0:
        raise not_acquired(what, first, timeout)
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    with waker().waiting(channel, queue.owner if queue else None) as released:
        try:
            while True:
                released.clear()
                got = attempt(True)
                if got.value is not None:
                    return got.value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise not_acquired(what, got, timeout)
                # At most until the holder's lease ends (a crashed holder never publishes), or
                # until a queued waiter's place is due for a refresh.
                released.wait(min(left, max(got.wait_ms, 1) / 1000))
        except BaseException:
            if queue is not None:
                with contextlib.suppress(SyncMapError):  # else skipped once its lease ends
                    queue.leave()
            raise


def not_acquired(what: str, got: Attempt[Any], timeout: float | None) -> LockNotAcquired:
    within = "at once" if not timeout else f"within {timeout:g} s"
    why = got.why or (
        f"held by {got.holder or 'another owner'} for up to {max(got.wait_ms, 0)} ms more"
    )
    return LockNotAcquired(
        f"{what} was not acquired {within}: {why}. Wait longer, or find out why it is held so long"
    )
