"""Waiting for a lock without polling: woken by the holder's release message.

Every release script PUBLISHes on the lock's channel.  A process that waits attaches one handler
per lock channel to its shared subscriber (the same connection the maps use), so a hand-off costs
one message and one acquire round trip, not a polling interval (redis-py's ``Lock`` sleeps 100 ms).

Order of events in :func:`wait_for`, chosen so that no release can slip by unseen:

1. try once (the uncontended path never subscribes);
2. subscribe and wait for Redis's confirmation (bounded: a subscriber that is down does not hold
   the waiter up, the fallback bound below still applies);
3. loop: clear the event -> try -> wait for the event, at most until the holder's lease ends.
   A release between "try" and "wait" has already set the event, so the wait returns at once.
The lease's remaining time bounds every wait, so a lost message (or a holder that crashed and
never released) costs at most one lease, never a hang.  Channels stay subscribed after the wait
(the next hand-off is then one message away); the least recently used idle ones beyond
``IDLE_CHANNELS`` are unsubscribed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import forksafe, instruments
from ..errors import LockNotAcquired
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


@dataclass(slots=True, eq=False)
class _Channel:
    handler: Handler
    confirmed: threading.Event = field(default_factory=threading.Event)
    waiters: set[threading.Event] = field(default_factory=set)
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
    def waiting(self, channel: str) -> Iterator[threading.Event]:
        """An event set whenever ``channel`` may have seen a release (or the feed dropped)."""
        event = threading.Event()
        with self._lock:
            chan = self._channels.get(channel)
            if chan is None:
                chan = self._attach(channel)
            self._channels.move_to_end(channel)
            chan.waiters.add(event)
        chan.confirmed.wait(CONFIRM_WAIT)
        try:
            yield event
        finally:
            with self._lock:
                chan.waiters.discard(event)
                self._evict_idle()

    def _attach(self, channel: str) -> _Channel:
        def wake() -> None:
            for event in list(chan.waiters):
                event.set()

        def up() -> None:
            chan.confirmed.set()
            wake()  # a release may have come while we were not subscribed

        def down() -> None:
            chan.confirmed.clear()
            wake()  # messages may be lost from now on: every waiter tries again

        chan = _Channel(Handler(on_message=lambda _payload: wake(), on_up=up, on_down=down))
        self._channels[channel] = chan
        chan.subscriber = attach(self._topology, channel, chan.handler)
        return chan

    def _evict_idle(self) -> None:
        idle = [name for name, chan in self._channels.items() if not chan.waiters]
        for name in idle[: max(0, len(idle) - IDLE_CHANNELS)]:
            chan = self._channels.pop(name)
            if chan.subscriber is not None:
                chan.subscriber.detach(name, chan.handler)


def wait_for(
    attempt: Callable[[], Attempt[T]],
    *,
    waker: Callable[[], Waker],
    channel: str,
    timeout: float | None,
    what: str,
) -> T:
    """Acquire by ``attempt`` within ``timeout`` seconds (None: forever; 0: one try).  Counted
    by result, with the time it took (:mod:`syncmap.instruments`)."""
    started = time.monotonic()
    try:
        value = _wait(attempt, waker, channel, timeout, what)
    except LockNotAcquired:
        instruments.lock_attempt(what, "timeout", time.monotonic() - started)
        raise
    except BaseException:
        instruments.lock_attempt(what, "error", time.monotonic() - started)
        raise
    instruments.lock_attempt(what, "acquired", time.monotonic() - started)
    return value


def _wait(attempt: Callable[[], Attempt[T]], waker: Callable[[], Waker], channel: str,
          timeout: float | None, what: str) -> T:  # fmt: skip
    first = attempt()
    if first.value is not None:
        return first.value
    if timeout is not None and timeout <= 0:
        raise not_acquired(what, first, timeout)
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    with waker().waiting(channel) as released:
        while True:
            released.clear()
            got = attempt()
            if got.value is not None:
                return got.value
            left = deadline - time.monotonic()
            if left <= 0:
                raise not_acquired(what, got, timeout)
            # At most until the holder's lease ends (a crashed holder never publishes).
            released.wait(min(left, max(got.wait_ms, 1) / 1000))


def not_acquired(what: str, got: Attempt[Any], timeout: float | None) -> LockNotAcquired:
    within = "at once" if not timeout else f"within {timeout:g} s"
    return LockNotAcquired(
        f"{what} was not acquired {within}: held by {got.holder or 'another owner'} for up to "
        f"{max(got.wait_ms, 0)} ms more. Wait longer, or find out why it is held so long"
    )
