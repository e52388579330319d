"""The background half of a map: feed handling, sequence probes, the lease timer, event delivery.

Threads (all owned by the map, stopped by ``close()``, failures re-raised on the next call):

* the feed's thread (for Redis pub/sub, the process's shared subscriber) calls
  :meth:`Engine.on_feed_message` / ``_up`` / ``_down``;
* ``syncmap-probe``: every ``max_staleness / 4`` reads every bucket's (epoch, seq) in one round trip
  (the same call reaps due TTL expiries) and renews the buckets' leases;
  The same thread refreshes the map's presence record (``syncmap top``) every
  ``presence_interval``: one HSET + PEXPIRE round trip, failures ignored;
* ``syncmap-timer``: wakes at the next lease or TTL deadline and drops what is due.  It is separate
  from the probe so a hung probe (a stalled socket) cannot keep an expired lease alive;
* ``syncmap-events`` (started by the first ``subscribe``/``watch``): runs user callbacks, so a slow
  callback never delays invalidations.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .core.nearcache import Event, NearCache
from .core.wire import OP_PING, ChangeMessage, decode_message, encode_message
from .errors import CorruptData, FeedError, SyncMapError
from .feed.base import Feed, FeedHandler, Subscription
from .store.redis_store import RedisStore

log = logging.getLogger("syncmap")


class Engine:
    def __init__(self, core: NearCache, store: RedisStore, interval: float, feed: Feed) -> None:
        self.core = core
        self.feed = feed
        self.store = store
        self.interval = interval
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self.server_offset_ms = 0.0
        self.live_entries = 0
        self._closed = threading.Event()
        self._probe_now = threading.Event()
        self._timer_wake = threading.Condition()
        self._timer_dirty = False
        self._pings: dict[bytes, threading.Event] = {}
        self._feed_up = threading.Event()
        self._callbacks: list[Callable[[Event], None]] = []
        self._inline: list[Callable[[Event], None]] = []
        self._watchers: list[queue.Queue[Event | None]] = []
        self._events: queue.Queue[Event | None] | None = None
        self._threads: list[threading.Thread] = []
        self._subscription: Subscription | None = None
        self.publish_failures = 0
        if store.target == "":
            store.relay = self._relay
        self._presence: Callable[[], dict[str, Any]] | None = None
        self._presence_every = 0.0
        self._presence_due = 0.0
        self._presence_written = False

    def enable_presence(self, record: Callable[[], dict[str, Any]], every: float) -> None:
        """Refresh ``record()`` in the map's presence hash every ``every`` seconds (call before
        ``start``).  The hash expires after three periods without any server refreshing it."""
        self._presence, self._presence_every = record, every

    # ---- start and stop ----------------------------------------------------------------------

    def start(self, self_check_timeout: float) -> None:
        """Subscribe, check a message really arrives, take the baseline probe, start threads.

        Order: subscribe (a durable feed starts after its newest message, recorded before
        ``subscribe`` returns) -> confirmed -> ping round trip -> baseline probe.  A write
        acknowledged before the probe is accounted for by the probe; one after it, by its
        message.
        """
        handler = FeedHandler(
            lambda data, _position: self.on_feed_message(data), self.on_feed_up, self.on_feed_down
        )
        self._subscription = self.feed.subscribe(handler)
        if not self._feed_up.wait(self_check_timeout):
            raise FeedError(
                f"could not subscribe to {self.feed.topic} on {self.feed.describe()} within "
                f"{self_check_timeout} s; check the broker and the user's permissions"
            )
        self._self_check(self_check_timeout)
        self.probe_once()
        self._refresh_presence()
        for name, target in (("probe", self._probe_loop), ("timer", self._timer_loop)):
            t = threading.Thread(target=target, name=f"syncmap-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def _self_check(self, timeout: float) -> None:
        """Publish a ping on the map's channel and wait for it (RESP2/RESP3 or ACL trouble)."""
        nonce = os.urandom(16)
        arrived = self._pings[nonce] = threading.Event()
        msg = ChangeMessage(OP_PING, 0, 0, 0, self.store.origin, (nonce,))
        self.feed.publish(encode_message(msg))
        if not arrived.wait(timeout):
            raise FeedError(
                f"a test change message published on {self.feed.topic} ({self.feed.describe()}) "
                f"did not come back within {timeout} s: invalidations would never arrive. Check "
                "the broker's permissions and that nothing in between drops its traffic"
            )
        del self._pings[nonce]

    def close(self) -> None:
        self._closed.set()
        self._probe_now.set()
        with self._timer_wake:
            self._timer_wake.notify_all()
        if self._subscription is not None:
            self._subscription.close()
        self.feed.close()  # the map opened it (feed/routing.py)
        if self._events is not None:
            self._events.put(None)
        for q in self._watchers:
            q.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        if self._presence_written:
            self._presence_written = False
            try:
                self.store.call([("HDEL", self.store.layout.presence, self.store.origin)],
                                write=True)  # fmt: skip
            except Exception as exc:  # readers drop it after three periods anyway
                log.debug("syncmap could not remove its presence record (%r)", exc)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def raise_background_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise SyncMapError(f"a syncmap background thread failed: {err!r}") from err

    # ---- the feed ----------------------------------------------------------------------------

    def on_feed_message(self, data: bytes) -> None:
        try:
            msg = decode_message(data)
        except CorruptData as exc:
            self._repair_after(exc)
            return
        if msg.op == OP_PING:
            waiter = self._pings.get(msg.fields[0] if msg.fields else b"")
            if waiter is not None:
                waiter.set()
            return
        want = bool(self._callbacks or self._watchers or self._inline)
        try:
            with self.lock:
                events = self.core.on_message(msg, time.monotonic(), want)
        except Exception as exc:
            self._repair_after(exc)
            return
        for event in events:
            self._emit(event)

    def _repair_after(self, exc: Exception) -> None:
        """A message we cannot decode or apply may hide a change: count it, log it, and repair
        as after a lost message (the next probe flushes every bucket that moved)."""
        self.core.counters.corrupt_messages += 1
        log.warning("syncmap could not use a change message (%r); repairing", exc)
        with self.lock:
            self.core.on_feed_up(time.monotonic())
        self._probe_now.set()

    def on_feed_up(self, resumed: bool = False) -> None:
        """Subscribed again.  ``resumed``: a durable feed carried on from the last message it
        delivered, so nothing was lost and there is nothing to repair."""
        if resumed and self._feed_up.is_set():
            return
        with self.lock:
            self.core.on_feed_up(time.monotonic())
        self._feed_up.set()
        self._probe_now.set()

    def _relay(self, messages: list[bytes]) -> None:
        """Publish what a write script made (relay mode), after the write, in the writer's thread.

        A failure here is not the write's: the store holds the change, and the other servers' probes
        see the bucket's sequence move without its message and drop the bucket within
        ``max_staleness`` (docs/feeds.md).  So it is counted and logged, never raised.
        """
        for data in messages:
            try:
                self.feed.publish(data, confirm=False)
            except Exception as exc:
                self.publish_failures += 1
                if self.publish_failures == 1 or self.publish_failures % 1000 == 0:
                    log.warning(
                        "syncmap could not publish a change on %s (%s; %d so far): other servers "
                        "will see it through their sequence probes instead",
                        self.feed.describe(), exc, self.publish_failures,
                    )  # fmt: skip

    def on_feed_down(self) -> None:
        with self.lock:
            self.core.on_feed_down()

    # ---- probes and the timer ----------------------------------------------------------------

    def probe_once(self) -> None:
        with self.lock:
            tops = self.core.tops()
        sent = time.monotonic()
        wall = time.time() * 1000
        states, server_ms, live = self.store.probe()
        self.server_offset_ms = server_ms - (wall + time.time() * 1000) / 2
        self.live_entries = live
        with self.lock:
            self.core.on_probe(states, sent, time.monotonic(), tops)
        self.wake_timer()

    def _refresh_presence(self) -> None:
        """Write this server's presence record: one round trip; a failure is only logged."""
        if self._presence is None:
            return
        self._presence_due = time.monotonic() + self._presence_every
        try:
            record = self._presence()
            data = json.dumps(record, separators=(",", ":"))
            key = self.store.layout.presence
            ttl_ms = max(1, round(self._presence_every * 3000))
            self.store.call([("HSET", key, self.store.origin, data), ("PEXPIRE", key, ttl_ms)],
                            write=True)  # fmt: skip
            self._presence_written = True
        except Exception as exc:
            log.debug("syncmap presence refresh failed (%r)", exc)

    def _probe_loop(self) -> None:
        next_probe = time.monotonic() + self.interval
        while not self._closed.is_set():
            due = min(next_probe, self._presence_due) if self._presence else next_probe
            woken = self._probe_now.wait(max(due - time.monotonic(), 0.0))
            self._probe_now.clear()
            if self._closed.is_set():
                return
            if self._presence is not None and time.monotonic() >= self._presence_due:
                self._refresh_presence()
                if not woken and time.monotonic() < next_probe:
                    continue
            next_probe = time.monotonic() + self.interval
            try:
                self.probe_once()
            except SyncMapError as exc:
                log.debug("syncmap probe failed (%s); leases will lapse if this lasts", exc)
            except Exception as exc:  # a bug: surface it on the next call, and keep probing
                log.exception("syncmap probe failed unexpectedly")
                self.error = exc

    def wake_timer(self) -> None:
        with self._timer_wake:
            self._timer_dirty = True
            self._timer_wake.notify()

    def _timer_loop(self) -> None:
        while not self._closed.is_set():
            try:
                with self._timer_wake:
                    self._timer_dirty = False  # a wake_timer() after this is not lost
                with self.lock:
                    wake = self.core.tick(time.monotonic())
                delay = min(max(wake - time.monotonic(), 0.0), 60.0)
                with self._timer_wake:
                    if not self._closed.is_set() and not self._timer_dirty:
                        self._timer_wake.wait(delay)
            except Exception as exc:  # a bug: surface it on the next call, keep the timer alive
                log.exception("syncmap timer failed unexpectedly")
                self.error = exc
                self._closed.wait(0.1)

    # ---- events for users --------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None], inline: bool) -> Callable[[], None]:
        if inline:
            self._inline.append(callback)
            return lambda: self._inline.remove(callback) if callback in self._inline else None
        if self._events is None:
            self._events = queue.Queue()
            t = threading.Thread(target=self._dispatch, name="syncmap-events", daemon=True)
            t.start()
            self._threads.append(t)
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def watch_queue(self, maxsize: int) -> queue.Queue[Event | None]:
        q: queue.Queue[Event | None] = queue.Queue(maxsize)
        self._watchers.append(q)
        return q

    def unwatch(self, q: queue.Queue[Event | None]) -> None:
        if q in self._watchers:
            self._watchers.remove(q)

    def _emit(self, event: Event) -> None:
        for cb in self._inline:
            try:
                cb(event)
            except Exception:
                log.exception("syncmap inline subscriber callback failed on %s", event)
        if self._events is not None and self._callbacks:
            self._events.put(event)
        for q in self._watchers:
            try:
                q.put_nowait(event)
            except queue.Full:
                log.warning("syncmap watch() consumer is too slow; an event was dropped")

    def _dispatch(self) -> None:
        assert self._events is not None
        while (event := self._events.get()) is not None:
            for cb in list(self._callbacks):
                try:
                    cb(event)
                except Exception:
                    log.exception("syncmap subscriber callback failed on %s", event)

    def server_now_ms(self) -> float:
        return time.time() * 1000 + self.server_offset_ms

    def local_deadline(self, deadline_ms: int, now: float) -> float:
        """Convert a Redis-clock deadline (ms) into this process's monotonic clock."""
        return now + (deadline_ms - self.server_now_ms()) / 1000
