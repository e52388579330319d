"""Change events for asyncio users: ``subscribe()`` callbacks (sync or async) and ``watch()``.

The twin of ``events.py``: the same bounds and counting, on the event loop.  Callbacks run in a
task of their own, so a slow one never delays invalidations (the feed's handler only queues);
``inline`` ones run in the feed's callback, the moment the change is applied (they must be quick
and sync).  Every queue is bounded: past its limit new events are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

from ..aiotasks import stop_task
from ..core.nearcache import Event
from ..events import EVENT_QUEUE_LIMIT
from ..ratelog import RateLimitedLog

log = logging.getLogger("syncmap")
Callback = Callable[[Event], Awaitable[None] | None]


class AsyncFanout:
    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.dropped = 0
        self._callbacks: list[Callback] = []
        self._inline: list[Callable[[Event], None]] = []
        self._watchers: list[asyncio.Queue[Event | None]] = []
        self._events: asyncio.Queue[Event] | None = None
        self._task: asyncio.Task[None] | None = None
        self._dropped_log = RateLimitedLog(log)
        self._callback_log = RateLimitedLog(log, logging.ERROR)

    @property
    def wanted(self) -> bool:
        return bool(self._callbacks or self._watchers or self._inline)

    def subscribe(self, callback: Callback, inline: bool) -> Callable[[], None]:
        if inline:
            sync_cb: Callable[[Event], None] = callback  # type: ignore[assignment]
            self._inline.append(sync_cb)
            return lambda: self._inline.remove(sync_cb) if sync_cb in self._inline else None
        self._callbacks.append(callback)
        if self._task is None:
            self._events = asyncio.Queue(EVENT_QUEUE_LIMIT)
            self._task = asyncio.get_running_loop().create_task(
                self._dispatch(self._events), name="syncmap-events"
            )
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def watch(self, maxsize: int) -> AsyncWatch:
        """The events from now on (registered at once, before the first ``await``)."""
        q: asyncio.Queue[Event | None] = asyncio.Queue(maxsize + 1)  # a slot for the end marker
        self._watchers.append(q)
        return AsyncWatch(self, q)

    def unwatch(self, q: asyncio.Queue[Event | None]) -> None:
        with contextlib.suppress(ValueError):
            self._watchers.remove(q)
            q.put_nowait(None)

    def emit(self, event: Event) -> None:
        for cb in self._inline:
            try:
                cb(event)
            except Exception:
                self._callback_log("syncmap inline subscriber callback failed on %s", event,
                                   exc_info=True)  # fmt: skip
        if self._events is not None and self._callbacks:
            self._offer(self._events, event, 0)
        for q in self._watchers:
            self._offer(q, event, 1)

    def _offer(self, q: asyncio.Queue[Event] | asyncio.Queue[Event | None], event: Event,
               keep: int) -> None:  # fmt: skip
        """Queue ``event`` or drop and count it; ``keep`` slots stay free for the end marker."""
        if q.qsize() < q.maxsize - keep:
            q.put_nowait(event)
            return
        self.dropped += 1
        self._dropped_log(
            "syncmap dropped a change event: a subscribe() callback or watch() consumer of %s "
            "is too slow (%d dropped so far; statistics().events_dropped)",
            self.topic, self.dropped,
        )  # fmt: skip

    async def _dispatch(self, events: asyncio.Queue[Event]) -> None:
        while True:
            event = await events.get()
            for cb in list(self._callbacks):
                try:
                    result = cb(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self._callback_log("syncmap subscriber callback failed on %s", event,
                                       exc_info=True)  # fmt: skip

    async def stop(self) -> None:
        """End the callbacks' task and every ``watch()`` iteration."""
        for q in self._watchers:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        task, self._task, self._events = self._task, None, None
        await stop_task(task)  # cancelled (it may be in a user's callback), repeatedly if need be


class AsyncWatch:
    """``async for event in m.watch()``: ends when the map closes or :meth:`close` is called."""

    def __init__(self, fanout: AsyncFanout, q: asyncio.Queue[Event | None]) -> None:
        self._fanout, self._q = fanout, q

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> Event:
        event = await self._q.get()
        if event is None:
            self._q.put_nowait(None)  # every later __anext__ ends too
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        """Stop watching; a pending or later ``__anext__`` ends the iteration."""
        self._fanout.unwatch(self._q)
