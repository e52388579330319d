"""The background half of an asyncio map: tasks in place of the thread engine's threads.

Every decision is :class:`~syncmap.changes.FeedLogic`'s (shared with ``engine.py``); this module
only waits: the feed's handler runs on the loop, a probe task sends a probe every
``max_staleness / 4`` (or at once when the logic asks for a repair), and a timer task wakes at
the next lease or TTL deadline.  The tasks are owned by the map, cancelled and awaited by
``aclose()``; a failure is kept and raised on the map's next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..aiotasks import stop_tasks
from ..changes import FeedLogic
from ..errors import FeedError, SyncMapError
from ..feed.abase import AsyncFeed, AsyncSubscription
from ..feed.base import FeedHandler
from ..flows import admin
from ..flows.state import MapState
from ..leasing import Leasing, idles_for
from ..store.executor import AsyncExecutor
from .events import AsyncFanout
from .run import run

log = logging.getLogger("syncmap")
STOP_WAIT = 5.0
"""``aclose()`` waits this long for a background task to finish its round trip, then cancels it."""


class AsyncEngine(FeedLogic):
    events: AsyncFanout

    def __init__(self, state: MapState, executor: AsyncExecutor, interval: float,
                 feed: AsyncFeed, keys: tuple[bytes, ...] = (),
                 prober: AsyncExecutor | None = None,
                 lease_prefix: bytes | None = None) -> None:  # fmt: skip
        super().__init__(state, interval, feed.topic, keys)
        # PING leases (leasing.py, shared with the thread engine): the subscriber task calls
        # on_vouch/on_touched on the loop; the probe task asks may_skip.
        self.leasing = None if lease_prefix is None else Leasing(
            lease_prefix, interval, lambda: self.core, lambda: self.lock, self.wake_probe,
            self.wake_timer, idles=idles_for(state.config),
        )  # fmt: skip
        self.feed = feed
        self.executor = executor
        self.prober = prober or executor  # the periodic probes' (as Engine.prober)
        self.events = AsyncFanout(feed.topic)
        self._closed = False
        self._probe_now = asyncio.Event()
        self._timer_wake = asyncio.Event()
        self._feed_up = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscription: AsyncSubscription | None = None
        self._presence: Callable[[], dict[str, Any]] | None = None
        self._presence_every = 0.0
        self._presence_written = False

    # ---- the hooks of FeedLogic --------------------------------------------------------------

    def wake_probe(self) -> None:
        self._probe_now.set()

    def signal_up(self) -> None:
        self._feed_up.set()

    def is_up(self) -> bool:
        return self._feed_up.is_set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def events_dropped(self) -> int:
        return self.events.dropped

    def wake_timer(self) -> None:
        self._timer_wake.set()

    def enable_presence(self, record: Callable[[], dict[str, Any]], every: float) -> None:
        self._presence, self._presence_every = record, every

    # ---- start and stop ----------------------------------------------------------------------

    async def start(self, self_check_timeout: float) -> None:
        """As the thread engine: subscribe -> confirmed -> ping round trip -> baseline probe ->
        the tasks.  A write acknowledged before the probe is accounted for by the probe; one
        after it, by its message."""
        handler = FeedHandler(
            lambda data, _position: self.on_feed_message(data),
            self.on_feed_up,
            self.on_feed_down,
            self.on_buckets_up,
            self.bucket_position,
            self.bucket_replayed,
        )
        if self.leasing is not None:
            handler.lease = self.leasing.lease(pong=self.core.guards.pong)
        self._subscription = await self.feed.subscribe(handler)
        try:
            async with asyncio.timeout(self_check_timeout):
                await self._feed_up.wait()
        except TimeoutError:
            raise FeedError(
                f"could not subscribe to {self.feed.topic} on {self.feed.describe()} within "
                f"{self_check_timeout} s; check the broker and the user's permissions"
            ) from None
        await self._self_check(self_check_timeout)
        await self.probe_once()
        await self._refresh_presence()
        self._spawn(self._probe_loop(), "probe")
        self._spawn(self._timer_loop(), "timer")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=f"syncmap-{name}"))

    async def _self_check(self, timeout: float) -> None:
        arrived = asyncio.Event()
        nonce, ping = self.ping_message(arrived.set)
        try:
            async with asyncio.timeout(timeout):
                await self.feed.publish(ping)
                await arrived.wait()
        except TimeoutError:
            raise FeedError(
                f"a test change message published on {self.feed.topic} "
                f"({self.feed.describe()}) did not come back within {timeout} s: invalidations "
                "would never arrive. Check the broker's permissions and what lies in between"
            ) from None
        finally:
            self.pings.pop(nonce, None)

    async def aclose(self) -> None:
        if self._closed:
            return
        # Stop the loops by flag and wake-up, not by cancel: Python 3.11's asyncio.timeout and
        # wait_for can lose a cancellation that meets their own timeout (the loop then runs on
        # and aclose() would wait forever).  A task still busy after STOP_WAIT is cancelled,
        # repeatedly, and at worst left running with an error logged (``aiotasks``).
        self._closed = True
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks, wake=self._wake_loops, grace=STOP_WAIT)
        if self._subscription is not None:
            await self._subscription.aclose()
            self._subscription = None
        await self.events.stop()
        await self.feed.aclose()
        if self._presence_written:
            with contextlib.suppress(Exception):  # readers drop it after three periods anyway
                await self.executor.call(
                    [("HDEL", self.cmds.layout.presence, self.cmds.origin)], write=True
                )

    def _wake_loops(self) -> None:
        self._probe_now.set()
        self._timer_wake.set()

    def raise_background_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise SyncMapError(f"a syncmap background task failed: {err!r}") from err

    # ---- probes, presence and the timer ------------------------------------------------------

    async def relay(self, messages: list[bytes]) -> None:
        """Relay route: publish what a write made, after the write; failures counted, logged."""
        for data in messages:
            try:
                await self.feed.publish(data, confirm=False)
            except Exception as exc:
                self.publish_failed(exc)

    async def probe_once(self, executor: AsyncExecutor | None = None) -> None:
        if self.leasing is not None:
            self.leasing.probing(time.monotonic())
        self._probe_complete = False
        result = await run(admin.probe(self.state), executor or self.executor, self.relay)
        self._probe_complete = all(state is not None for state in result.states)
        self.report(result)

    async def _refresh_presence(self) -> None:
        if self._presence is None:
            return
        try:
            data = json.dumps(self._presence(), separators=(",", ":"))
            key = self.cmds.layout.presence
            ttl_ms = max(1, round(self._presence_every * 3000))
            await self.prober.call(
                [("HSET", key, self.cmds.origin, data), ("PEXPIRE", key, ttl_ms)], write=True
            )
            self._presence_written = True
        except Exception as exc:
            log.debug("syncmap presence refresh failed (%r)", exc)

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.interval
        next_presence = loop.time() + self._presence_every
        while not self._closed:
            # Presence waits while the last probe went unanswered anywhere (as in the thread
            # driver's Engine._probe_loop, which says why).
            presence = self._presence is not None and self._probe_complete
            due = min(next_probe, next_presence) if presence else next_probe
            await _wait(self._probe_now, due - loop.time())
            woken = self._probe_now.is_set()
            self._probe_now.clear()
            if self._closed:
                return
            if presence and loop.time() >= next_presence:
                next_presence = loop.time() + self._presence_every
                await self._refresh_presence()
                if not woken and loop.time() < next_probe:
                    continue
            next_probe = loop.time() + self.interval
            if not woken and self.leasing is not None and self.leasing.may_skip(time.monotonic()):
                continue
            try:
                await self.probe_once(self.prober)
            except SyncMapError as exc:
                log.debug("syncmap probe failed (%s); leases will lapse if this lasts", exc)
            except Exception as exc:  # a bug: surface it on the next call, and keep probing
                log.exception("syncmap probe failed unexpectedly")
                self.error = exc

    async def _timer_loop(self) -> None:
        while not self._closed:
            self._timer_wake.clear()  # a wake_timer() after this is not lost
            with self.lock:
                wake = self.core.tick(time.monotonic())
                freed = self.core.sweep() if self.core.sweeping else None
            if freed is not None:  # a flushed bucket's entries, a chunk per turn of the loop
                del freed
                await asyncio.sleep(0)
                continue
            delay = min(max(wake - time.monotonic(), 0.0), 60.0)
            await _wait(self._timer_wake, delay)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Until ``event`` is set or ``seconds`` passed.  (A cancellation meeting the timeout may be
    lost here on Python 3.11: the loops stop by ``_closed`` and a wake-up, see ``aclose``.)"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await event.wait()
