"""Change events for users: ``subscribe()`` callbacks and ``watch()`` queues of one map.

Callbacks run on a thread of their own (``syncmap-events``, started by the first ``subscribe``),
so a slow callback never delays invalidations; ``inline`` ones run on the feed thread.  Every
queue is bounded: past its limit new events are dropped and counted (``dropped``), so a slow
consumer or a flood costs bounded memory, and the feed never blocks.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable

from .core.nearcache import Event
from .ratelog import RateLimitedLog

log = logging.getLogger("syncmap")

EVENT_QUEUE_LIMIT = 10_000
"""Events queued for ``subscribe()`` callbacks at most (see the module docstring)."""
Callback = Callable[[Event], None]


class Fanout:
    def __init__(self, topic: str) -> None:
        self.topic = topic  # for log lines
        self.dropped = 0  # events that found their queue full
        self._callbacks: list[Callback] = []
        self._inline: list[Callback] = []
        self._watchers: list[queue.Queue[Event | None]] = []
        self._events: queue.Queue[Event | None] | None = None
        self._thread: threading.Thread | None = None
        self._dropped_log = RateLimitedLog(log)
        self._callback_log = RateLimitedLog(log, logging.ERROR)

    @property
    def wanted(self) -> bool:
        """Whether anyone listens (the core builds events only then)."""
        return bool(self._callbacks or self._watchers or self._inline)

    def subscribe(self, callback: Callback, inline: bool) -> Callable[[], None]:
        if inline:
            self._inline.append(callback)
            return lambda: self._inline.remove(callback) if callback in self._inline else None
        self._callbacks.append(callback)
        self.start()
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def start(self) -> None:
        """Start the callbacks' thread if there are callbacks and it is not running."""
        if self._events is not None or not self._callbacks:
            return
        events: queue.Queue[Event | None] = queue.Queue(EVENT_QUEUE_LIMIT + 1)  # see _offer
        self._events = events
        self._thread = threading.Thread(target=self._dispatch, args=(events,),
                                        name="syncmap-events", daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self) -> None:
        """End the callbacks' thread (after the events queued) and every watch iteration."""
        if self._events is not None:
            self._events.put(None)
            self._events = None
        for q in self._watchers:
            q.put(None)
        t, self._thread = self._thread, None
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def forked(self) -> None:
        """In a forked child: the thread and the watch consumers were the parent's; callbacks
        stay (they are called in the child too, on a thread of its own: :meth:`start`)."""
        self._watchers, self._events, self._thread = [], None, None

    def watch_queue(self, maxsize: int) -> queue.Queue[Event | None]:
        q: queue.Queue[Event | None] = queue.Queue(maxsize + 1)  # see _offer
        self._watchers.append(q)
        return q

    def unwatch(self, q: queue.Queue[Event | None]) -> None:
        """Stop feeding ``q`` and put its end marker, which ends an iteration of it that is
        blocked in another thread (``Watch.close()``).  A second call does nothing."""
        try:
            self._watchers.remove(q)
        except ValueError:
            return
        while True:  # the last slot is kept free for the marker (_offer), but an event being
            try:  # offered as we removed q may just have taken it: drop events to make room
                q.put_nowait(None)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    q.get_nowait()

    def emit(self, event: Event) -> None:
        for cb in self._inline:
            try:
                cb(event)
            except Exception:
                self._callback_log("syncmap inline subscriber callback failed on %s", event,
                                   exc_info=True)  # fmt: skip
        if self._events is not None and self._callbacks:
            self._offer(self._events, event)
        for q in self._watchers:
            self._offer(q, event)

    def _offer(self, q: queue.Queue[Event | None], event: Event) -> None:
        """Queue ``event``, or drop and count it when ``q`` is full: never block the feed.

        The last slot stays free for the end marker ``stop()`` puts, which must not block."""
        try:
            if q.qsize() < q.maxsize - 1:
                q.put_nowait(event)
                return
        except queue.Full:  # another feed thread took the slot (a reconnect's overlap)
            pass
        self.dropped += 1
        self._dropped_log(
            "syncmap dropped a change event: a subscribe() callback or watch() consumer of %s "
            "is too slow (%d dropped so far; statistics().events_dropped)",
            self.topic, self.dropped,
        )  # fmt: skip

    def _dispatch(self, events: queue.Queue[Event | None]) -> None:
        while (event := events.get()) is not None:
            for cb in list(self._callbacks):
                try:
                    cb(event)
                except Exception:
                    self._callback_log("syncmap subscriber callback failed on %s", event,
                                       exc_info=True)  # fmt: skip
