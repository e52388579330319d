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

from . import instruments
from .core.nearcache import Event, NearCache
from .core.wire import (
    MAX_FIELDS,
    OP_PING,
    ChangeMessage,
    decode_message,
    encode_message,
    verify,
)
from .errors import CorruptData, FeedError, SyncMapError
from .events import Fanout
from .feed.base import Feed, FeedHandler, Subscription
from .flows import admin
from .flows.state import MapState
from .ratelog import RateLimitedLog
from .store.commands import ProbeResult
from .store.executor import Executor
from .sync.run import run

log = logging.getLogger("syncmap")

REPAIR_EVERY = 0.5
"""A repair probe (after an unusable change message) at most once per this much of the probe
interval: a flood of garbage on the channel cannot turn every message into a probe."""


class Engine:
    """The background loops of one map around its :class:`MapState` (shared with the map's
    façade): ``state.core`` and ``state.guard`` are read through ``core`` and ``lock``."""

    def __init__(self, state: MapState, executor: Executor, interval: float, feed: Feed,
                 keys: tuple[bytes, ...] = ()) -> None:  # fmt: skip
        self.state = state
        self.cmds = state.cmds
        self.keys = keys  # signing keys (signing.py): with any, only verified messages apply
        self.feed = feed
        self.executor = executor
        self.interval = interval
        self.error: BaseException | None = None
        self.damaged_buckets = 0  # probes that found a bucket damaged (counter)
        self.meta_recreated = 0  # probes that found the meta key missing and wrote it again
        self._damage_log = RateLimitedLog(log)
        self._meta_log = RateLimitedLog(log)
        self._closed = threading.Event()
        self._probe_now = threading.Event()
        self._timer_wake = threading.Condition()
        self._timer_dirty = False
        self._pings: dict[bytes, threading.Event] = {}
        self._feed_up = threading.Event()
        self.events = Fanout(feed.topic)
        self._threads: list[threading.Thread] = []
        self._subscription: Subscription | None = None
        self.publish_failures = 0
        self._repair_probe_at = -float("inf")  # no repair probe before then (_repair_after)
        self._bad_message_log = RateLimitedLog(log)
        self._forged_log = RateLimitedLog(log)
        self._presence: Callable[[], dict[str, Any]] | None = None
        self._presence_every = 0.0
        self._presence_due = 0.0
        self._presence_written = False
        self.needs_start = False  # True in a forked child until its first use (see forked)
        self.start_lock = threading.Lock()
        instruments.engines.add(self)  # read by a metrics exporter when scraped (syncmap.otel)

    @property
    def core(self) -> NearCache:
        return self.state.core

    @property
    def lock(self) -> Any:
        """The map's guard (``MapState.guard``): protects ``core``."""
        return self.state.guard

    @property
    def live_entries(self) -> int:
        return self.state.live_entries

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
        self.events.start()  # subscribed before a fork: the child's events need a thread too

    def forked(self) -> None:
        """In a forked child (``forksafe``), before ``fork()`` returns there: start over.

        Only the forking thread exists in the child; the probe, timer and event threads, the
        feed's subscription and any lock one of them held at the fork were the parent's.  So:
        fresh locks and events (never acquire the inherited ones), no threads, no subscription,
        the map's new empty core, and ``needs_start`` so the map's first use in the child runs
        :meth:`start` with a feed of its own.  The old feed object is dropped, not closed: its
        sockets and threads serve the parent.  ``watch()`` iterators end (their consumers are
        the parent's threads); ``subscribe`` callbacks stay and are called in the child too.
        """
        self.start_lock = threading.Lock()
        closed, self._closed = self._closed.is_set(), threading.Event()
        if closed:
            self._closed.set()
        self._probe_now = threading.Event()
        self._timer_wake = threading.Condition()
        self._timer_dirty = False
        self._pings = {}
        self._feed_up = threading.Event()
        self.events.forked()
        self._threads = []
        self._subscription = None
        self.error = None
        self._presence_written = False
        self.needs_start = not closed

    def restart(self, feed: Feed, self_check_timeout: float) -> None:
        """The first use in a forked child: subscribe with the child's own ``feed``, probe,
        start the threads (:meth:`start`).  Callers hold ``start_lock``."""
        self.feed = feed
        try:
            self.start(self_check_timeout)
        except BaseException:
            self._closed.set()  # stop what start() began; the next call starts again
            self._stop_threads()
            self._closed.clear()
            raise
        self.needs_start = False

    def _self_check(self, timeout: float) -> None:
        """Publish a ping on the map's channel and wait for it (RESP2/RESP3 or ACL trouble)."""
        nonce = os.urandom(16)
        arrived = self._pings[nonce] = threading.Event()
        msg = ChangeMessage(OP_PING, 0, 0, 0, self.cmds.origin, (nonce,))
        self.feed.publish(encode_message(msg, self.keys[0] if self.keys else None))
        if not arrived.wait(timeout):
            raise FeedError(
                f"a test change message published on {self.feed.topic} ({self.feed.describe()}) "
                f"did not come back within {timeout} s: invalidations would never arrive. Check "
                "the broker's permissions and that nothing in between drops its traffic"
            )
        del self._pings[nonce]

    def close(self) -> None:
        self._closed.set()
        self._stop_threads()
        if not self.needs_start:  # in a child not yet started, the feed is the parent's
            self.feed.close()  # the map opened it (feed/routing.py)
        if self._presence_written:
            self._presence_written = False
            try:
                self.executor.call([("HDEL", self.cmds.layout.presence, self.cmds.origin)],
                                   write=True)  # fmt: skip
            except Exception as exc:  # readers drop it after three periods anyway
                log.debug("syncmap could not remove its presence record (%r)", exc)

    def _stop_threads(self) -> None:
        """Wake and join the threads (``_closed`` is set), end the subscription and watches."""
        self._probe_now.set()
        with self._timer_wake:
            self._timer_wake.notify_all()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self.events.stop()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        self._threads = []

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def raise_background_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise SyncMapError(f"a syncmap background thread failed: {err!r}") from err

    # ---- the feed ----------------------------------------------------------------------------

    def on_feed_message(self, data: bytes) -> None:
        if self.keys and self.core.guards.message_mac and not verify(data, self.keys):
            self._forged(data)
            return
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
        want = self.events.wanted
        try:
            with self.lock:
                dropped = self.core.counters.invalidations
                events = self.core.on_message(msg, time.monotonic(), want)
                dropped = self.core.counters.invalidations - dropped
        except Exception as exc:
            self._repair_after(exc)
            return
        hook = instruments.change_age
        if hook is not None and msg.stamp_ms:
            # Staleness only for others' writes: this server's own write reached its cache
            # with the write's reply (its echo may merely arrive first).
            age = max(0.0, (self.server_now_ms() - msg.stamp_ms) / 1000)
            hook(self, age, dropped > 0 and msg.origin != self.cmds.origin)
        if msg.oversized:  # the core flushed its bucket (core/wire.py MAX_FIELDS)
            self._repair_after(CorruptData(f"a message names over {MAX_FIELDS} keys"))
        for event in events:
            self.events.emit(event)

    def _forged(self, data: bytes) -> None:
        """A message without a valid MAC on a map with a signing key: never applied, no event.
        Counted, logged (rate-limited), and repaired like an unusable message: someone who may
        PUBLISH on the channel without the key sent it, or a server has another key; either way
        this server may have missed a real change, so the bucket may be stale."""
        self.core.counters.forged_messages += 1
        self._forged_log(
            "syncmap dropped a change message on %s without a valid signature (%d bytes, starts "
            "%r; %d so far): a publisher without this map's signing key, or a server with "
            "another key; repairing", self.feed.topic, len(data), bytes(data[:8]),
            self.core.counters.forged_messages,
        )  # fmt: skip
        self._request_repair()

    def _repair_after(self, exc: Exception) -> None:
        """A message we cannot decode or apply may hide a change: count it, log it (rate-limited),
        and repair as after a lost message: the next probe *sent* after now flushes every bucket
        that moved (``NearCache.on_feed_up``).

        That probe goes at once, but at most once per ``REPAIR_EVERY`` of the probe interval;
        later requests wait for it or for the regular probe, so a flood at most doubles the
        probe rate.  Waiting costs no staleness: a bucket is served only under a lease that a
        probe whose sequence this server reached renewed, so a change hidden by the bad message
        keeps its bucket from being renewed, and after ``grace`` it is flushed anyway."""
        self.core.counters.corrupt_messages += 1
        self._bad_message_log(
            "syncmap could not use a change message on %s (%r; %d so far); repairing",
            self.feed.topic, exc, self.core.counters.corrupt_messages,
        )  # fmt: skip
        self._request_repair()

    def _request_repair(self) -> None:
        """The next probe sent after now flushes every bucket that moved; it goes at once, at
        most once per ``REPAIR_EVERY`` of the probe interval (see :meth:`_repair_after`)."""
        now = time.monotonic()
        with self.lock:
            self.core.on_feed_up(now)
        if now >= self._repair_probe_at:
            self._repair_probe_at = now + self.interval * REPAIR_EVERY
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

    def relay(self, messages: list[bytes]) -> None:
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
        """One probe (``flows.admin.probe``), and what it found damaged reported."""
        self._report(run(admin.probe(self.state), self.executor, self.relay))

    def _report(self, result: ProbeResult) -> None:
        """Damage stays in its bucket (``store.commands.parse_probe``): counted and logged at
        WARNING at most once a minute per map; a re-created meta key likewise."""
        layout = self.cmds.layout
        if result.meta_recreated:
            self.meta_recreated += 1
            self._meta_log("syncmap map %r: its meta key %s was missing (evicted or deleted) and "
                           "was written again (%d buckets, codec %s; %d times so far)",
                           layout.name, layout.meta, layout.buckets, self.cmds.codec,
                           self.meta_recreated)  # fmt: skip
        if result.damaged:
            self.damaged_buckets += len(result.damaged)
            bucket, why = result.damaged[0]
            self._damage_log(
                "syncmap map %r: %d bucket(s) damaged (first: bucket %d, %s); their near cache "
                "is dropped and writes to them fail until the keys are repaired or deleted; the "
                "other buckets are unaffected (%d damaged bucket probes so far)",
                layout.name, len(result.damaged), bucket, why[:300], self.damaged_buckets,
            )  # fmt: skip

    def _refresh_presence(self) -> None:
        """Write this server's presence record: one round trip; a failure is only logged."""
        if self._presence is None:
            return
        self._presence_due = time.monotonic() + self._presence_every
        try:
            record = self._presence()
            data = json.dumps(record, separators=(",", ":"))
            key = self.cmds.layout.presence
            ttl_ms = max(1, round(self._presence_every * 3000))
            self.executor.call([("HSET", key, self.cmds.origin, data), ("PEXPIRE", key, ttl_ms)],
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

    # ---- events for users (events.py) ---------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None], inline: bool) -> Callable[[], None]:
        return self.events.subscribe(callback, inline)

    def watch_queue(self, maxsize: int) -> queue.Queue[Event | None]:
        return self.events.watch_queue(maxsize)

    def unwatch(self, q: queue.Queue[Event | None]) -> None:
        self.events.unwatch(q)

    @property
    def events_dropped(self) -> int:
        return self.events.dropped

    def server_now_ms(self) -> float:
        return self.state.server_now_ms()
