"""Waiting for a lock on an event loop, woken by the holder's release message.

The asyncio twin of ``syncmap.lock.waiting`` (read its docstring for why the order of events
below lets no release slip by unseen): one handler per lock channel on the loop's shared
asyncio subscriber (``syncmap.feed.apubsub.AsyncSubscriber``), whose callbacks run on the loop
and only set events.  Order in :func:`wait_for`:

1. try once (the uncontended path never subscribes);
2. attach (once per channel) and wait, at most ``CONFIRM_WAIT``, for the subscription's
   confirmation (``on_up``);
3. loop: clear the event -> try (and queue) -> wait for the event, at most ``wait_ms``.
   A release between "try" and "wait" has set the event already, so the wait returns at once;
4. giving up (timeout, cancellation, an error) leaves the queue, passing a turn that had just
   come on to the next waiter.
A queued waiter is woken only by a release that names it (``waiting.to_wake``, shared with the
thread driver), so the other waiters of the loop cost Redis nothing per hand-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ... import instruments
from ...errors import LockNotAcquired, SyncMapError
from ...feed.apubsub import AsyncSubscriber, Handler
from ...feed.asharded import AsyncShardedSubscriber
from ...lock.waiting import (
    CONFIRM_WAIT,
    IDLE_CHANNELS,
    Attempt,
    joined,
    not_acquired,
    parted,
    to_wake,
)
from ...store.cluster import ClusterTopology
from ...store.topology import Topology

T = TypeVar("T")


class _Channel:
    """One channel's waiters; its handler's callbacks run on the loop and only set events."""

    def __init__(self) -> None:
        self.confirmed = asyncio.Event()
        self.waiters: dict[str | None, frozenset[asyncio.Event]] = {}
        self.handler = Handler(on_message=self.on_message, on_up=self.on_up,
                               on_down=self.on_down)  # fmt: skip
        self.subscriber: AsyncSubscriber | AsyncShardedSubscriber | None = None

    def _wake(self, data: bytes | None) -> None:
        for event in to_wake(self.waiters, data):
            event.set()

    def on_message(self, data: bytes) -> None:
        self._wake(data)  # a named waiter, or everyone for 'r'

    def on_up(self) -> None:
        self.confirmed.set()
        self._wake(None)  # a release may have come while we were not subscribed

    def on_down(self) -> None:
        self.confirmed.clear()
        self._wake(None)  # messages may be lost from now on: every waiter tries again


def _attach(topology: Topology, channel: str,
            handler: Handler) -> AsyncSubscriber | AsyncShardedSubscriber:  # fmt: skip
    """The loop's subscriber for ``channel``: the sharded one on a Redis Cluster."""
    if topology.sharded:
        assert isinstance(topology, ClusterTopology)  # the one sharded topology
        return AsyncShardedSubscriber.attach_to(topology, channel, handler)
    return AsyncSubscriber.attach_to(topology, channel, handler)


class AsyncWaker:
    """Wakes one loop's waiters of one Redis target when a lock is released."""

    _registry: weakref.WeakKeyDictionary[
        asyncio.AbstractEventLoop, dict[tuple[Any, ...], AsyncWaker]
    ] = weakref.WeakKeyDictionary()

    @classmethod
    def for_topology(cls, topology: Topology) -> AsyncWaker:
        """The running loop's waker for ``topology``."""
        per_loop = cls._registry.setdefault(asyncio.get_running_loop(), {})
        waker = per_loop.get(topology.key)
        if waker is None:
            waker = per_loop[topology.key] = cls(topology)
        return waker

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self._channels: OrderedDict[str, _Channel] = OrderedDict()

    @contextlib.asynccontextmanager
    async def waiting(self, channel: str, owner: str | None = None
                      ) -> AsyncIterator[asyncio.Event]:  # fmt: skip
        """An event set whenever ``channel`` may have seen a release (or the feed dropped);
        with ``owner`` (a queued waiter), only by releases that name it or name nobody."""
        event = asyncio.Event()
        chan = self._channels.get(channel)
        if chan is None:
            chan = self._channels[channel] = _Channel()
            chan.subscriber = _attach(self._topology, channel, chan.handler)
        self._channels.move_to_end(channel)
        chan.waiters = joined(chan.waiters, owner, event)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONFIRM_WAIT):
                    await chan.confirmed.wait()
            yield event
        finally:
            chan.waiters = parted(chan.waiters, owner, event)
            await self._evict_idle()

    async def _evict_idle(self) -> None:
        idle = [name for name, chan in self._channels.items() if not chan.waiters]
        for name in idle[: max(0, len(idle) - IDLE_CHANNELS)]:
            chan = self._channels.pop(name)
            if chan.subscriber is not None:
                await chan.subscriber.detach(name, chan.handler)

    async def aclose(self) -> None:
        """Detach every channel (the loop's subscriber stops once nobody uses it)."""
        while self._channels:
            name, chan = self._channels.popitem()
            if chan.subscriber is not None:
                await chan.subscriber.detach(name, chan.handler)


async def aclose_wakers() -> None:
    """Detach the running loop's wakers from their subscribers (before the loop closes)."""
    for waker in AsyncWaker._registry.pop(asyncio.get_running_loop(), {}).values():
        await waker.aclose()


@dataclass(frozen=True, slots=True)
class AsyncQueue:
    """A waiter's place in a lock's queue (``syncmap.lock.waiting.Queue`` on a loop)."""

    owner: str
    leave: Callable[[], Awaitable[object]]


async def wait_for(
    attempt: Callable[[bool], Awaitable[Attempt[T]]],
    *,
    waker: Callable[[], AsyncWaker],
    channel: str,
    timeout: float | None,
    what: str,
    queue: AsyncQueue | None = None,
) -> T:
    """Acquire by ``attempt(queue?)`` within ``timeout`` seconds (None: forever; 0: one try),
    counted by result as the thread driver counts them."""
    started = time.monotonic()
    try:
        value = await _wait(attempt, waker, channel, timeout, what, queue)
    except LockNotAcquired:
        instruments.lock_attempt(what, "timeout", time.monotonic() - started)
        raise
    except BaseException:
        instruments.lock_attempt(what, "error", time.monotonic() - started)
        raise
    instruments.lock_attempt(what, "acquired", time.monotonic() - started)
    return value


async def _wait(attempt: Callable[[bool], Awaitable[Attempt[T]]],
                waker: Callable[[], AsyncWaker], channel: str, timeout: float | None, what: str,
                queue: AsyncQueue | None) -> T:  # fmt: skip
    first = await attempt(False)
    if first.value is not None:
        return first.value
    if timeout is not None and timeout <= 0:
        raise not_acquired(what, first, timeout)
    deadline = float("inf") if timeout is None else time.monotonic() + timeout
    async with waker().waiting(channel, queue.owner if queue else None) as released:
        try:
            while True:
                released.clear()
                got = await attempt(True)
                if got.value is not None:
                    return got.value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise not_acquired(what, got, timeout)
                # At most until the holder's lease ends (a crashed holder never publishes), or
                # until a queued waiter's place is due for a refresh.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, max(got.wait_ms, 1) / 1000)):
                        await released.wait()
        except BaseException:  # timed out, cancelled, failed: leave the queue
            if queue is not None:
                with contextlib.suppress(SyncMapError):  # else skipped once its lease ends
                    await queue.leave()
            raise
