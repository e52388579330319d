"""The background half of a map: feed handling, sequence probes, the lease timer, event delivery.

Where its work runs (started by the map, stopped by ``close()``, failures re-raised on the map's
next call):

* the feed's thread (for Redis pub/sub, the process's shared subscriber) calls
  :meth:`Engine.on_feed_message` / ``_up`` / ``_down``;
* the map's *probe turn*: every ``max_staleness / 4`` reads every bucket's (epoch, seq) in one
  round trip (the same call reaps due TTL expiries) and renews the buckets' leases (with PING
  leases it may skip: ``Leasing.may_skip``).  It takes part in refreshing the presence records
  (``syncmap top``) of the process's maps on this store (``presence.Board``): one pipelined
  round trip per process every ``presence_interval``, made by whichever map's probe turn finds it
  due first; failures ignored;
* the map's *timer turn*: runs at the next lease or TTL deadline and drops what is due, and frees
  the entries of a large flushed bucket a chunk at a time (``NearCache.sweep``).  It is separate
  from the probe so a hung probe (a stalled socket) cannot keep an expired lease alive;
* ``syncmap-events`` (started by the first ``subscribe``): runs user callbacks, so a slow callback
  never delays invalidations.

The turns of every map in the process run on the process's scheduler (``schedule.py``): one
``syncmap-timer`` thread runs every timer turn and never a probe, ``syncmap-probe`` runs the probe
turns (with spares while probes stall), so the threads do not grow with the number of maps
(issue 16).  A map registers its two turns when it starts and removes them when it closes.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from . import instruments, presence, schedule
from .changes import FeedLogic
from .core.nearcache import Event
from .errors import FeedError, SyncMapError
from .events import Fanout
from .feed.base import Feed, FeedHandler, Subscription
from .flows import admin
from .flows.state import MapState
from .leasing import Leasing, idles_for
from .store.executor import Executor
from .sync.run import run

log = logging.getLogger("syncmap")

REPAIR_EVERY = 0.5
"""A repair probe (after an unusable change message) at most once per this much of the probe
interval: a flood of garbage on the channel cannot turn every message into a probe."""
GUARD_WAIT = 0.002
"""Seconds a timer turn waits for its map's guard before it lets the other maps' timer turns go
first (it is due again at once): a guard held long (a bucket of a large ``preload`` installed
under it) must not hold up the shared clock, where every map's expired leases are dropped."""


class Engine(FeedLogic):
    """The background loops of one map around its :class:`MapState` (shared with the map's
    façade): ``state.core`` and ``state.guard`` are read through ``core`` and ``lock``."""

    events: Fanout

    def __init__(self, state: MapState, executor: Executor, interval: float, feed: Feed,
                 keys: tuple[bytes, ...] = (), prober: Executor | None = None,
                 lease_prefix: bytes | None = None) -> None:  # fmt: skip
        super().__init__(state, interval, feed.topic, keys)
        # PING leases on (lease_prefix: the map's data-key prefix), or None (leasing.py)
        self.leasing = None if lease_prefix is None else self._new_leasing(lease_prefix)
        self._probe_complete = True  # the last probe was answered for every bucket
        self.feed = feed
        self.executor = executor
        # The periodic probes' executor (a Cluster map's waits at most probe_deadline); the
        # baseline probe at start takes ``executor``, with the whole call deadline.
        self.prober = prober or executor
        self._closed = threading.Event()
        self._scheduler = schedule.process()
        # The probe and timer turns start() registers; a new pair once removed (a turn removed
        # after remove()'s wait may still be running: it is never registered again).  A wake
        # before start() is kept for the first turn, as a set Event was for a new thread.
        self._probe, self._timer = self._new_turns()
        self._next_probe = 0.0
        self._feed_up = threading.Event()
        self.events = Fanout(feed.topic)
        self._subscription: Subscription | None = None
        self._presence: presence.Member | None = None
        self._board: presence.Board | None = None
        self._presence_store: tuple[Any, ...] = ()
        self._presence_due = 0.0
        self.needs_start = False  # True in a forked child until its first use (see forked)
        self.start_lock = threading.Lock()
        instruments.engines.add(self)  # read by a metrics exporter when scraped (syncmap.otel)

    # ---- the hooks of FeedLogic (changes.py) ----------------------------------------------

    def wake_probe(self) -> None:
        self._scheduler.wake(self._probe)

    def signal_up(self) -> None:
        self._feed_up.set()

    def is_up(self) -> bool:
        return self._feed_up.is_set()

    def enable_presence(self, record: Callable[[], dict[str, Any]], every: float,
                        store: tuple[Any, ...]) -> None:  # fmt: skip
        """Refresh ``record()`` in the map's presence hash every ``every`` seconds, with the
        other maps of this process on ``store`` (a topology's key; call before ``start``).  The
        hash expires after three periods without any server refreshing it."""
        layout = self.cmds.layout
        self._presence = presence.Member(layout.presence, self.cmds.origin, record, every)
        self._presence_store = store

    def _new_leasing(self, prefix: bytes) -> Leasing:
        """The map's PING-lease state; idle leases where every read is sure to pass the slow
        path now and then and a lapse holds the entries (leasing.py says why)."""
        return Leasing(prefix, self.interval, lambda: self.core, lambda: self.lock,
                       self.wake_probe, self.wake_timer,
                       idles=idles_for(self.state.config))  # fmt: skip

    # ---- start and stop ----------------------------------------------------------------------

    def start(self, self_check_timeout: float) -> None:
        """Subscribe, check a message really arrives, take the baseline probe, register the turns.

        Order: subscribe (a durable feed starts after its newest message, recorded before
        ``subscribe`` returns) -> confirmed -> ping round trip -> baseline probe.  A write
        acknowledged before the probe is accounted for by the probe; one after it, by its
        message.
        """
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
        self._subscription = self.feed.subscribe(handler)
        if not self._feed_up.wait(self_check_timeout):
            raise FeedError(
                f"could not subscribe to {self.feed.topic} on {self.feed.describe()} within "
                f"{self_check_timeout} s; check the broker and the user's permissions"
            )
        self._self_check(self_check_timeout)
        # The feed coming up woke the probe (on_buckets_up); this probe, sent after, answers
        # that wish.  Kept, it would probe again at once, racing the caller's first write:
        # a probe applied while a write is out makes the write's value uncached.
        self._scheduler.answered(self._probe)
        self.probe_once()
        if self._presence is not None:
            self._presence.field = self.cmds.origin  # a forked child's node id names its pid
            self._board = presence.board(self._presence_store)
            self._board.join(self._presence)
        self._refresh_presence()
        self._schedule()
        self.events.start()  # subscribed before a fork: the child's events need a thread too

    def forked(self) -> None:
        """In a forked child (``forksafe``), before ``fork()`` returns there: start over.

        Only the forking thread exists in the child; the scheduler's and the event threads, the
        feed's subscription and any lock one of them held at the fork were the parent's.  So:
        fresh locks and events (never acquire the inherited ones), no turns (the scheduler
        forgot the parent's: ``schedule.py``), no subscription, the map's new empty core, and
        ``needs_start`` so the map's first use in the child runs :meth:`start` with a feed of
        its own, which registers new turns with the child's scheduler.  The old feed object is
        dropped, not closed: its sockets and threads serve the parent.  ``watch()`` iterators
        end (their consumers are the parent's threads); ``subscribe`` callbacks stay and are
        called in the child too.
        """
        self.start_lock = threading.Lock()
        closed, self._closed = self._closed.is_set(), threading.Event()
        if closed:
            self._closed.set()
        # Never touch the scheduler here: it forgets the parent's turns itself (schedule.py).
        self._probe, self._timer = self._new_turns()
        self.pings = {}
        self._feed_up = threading.Event()
        self.events.forked()
        self._subscription = None
        self.error = None
        self._board = None  # the parent's; the child's start() joins the child's board
        if self.leasing is not None:  # the parent's vouches are not the child's
            self.leasing = self._new_leasing(self.leasing.prefix)
        if self._presence is not None:
            self._presence.written = False
        self.needs_start = not closed

    def restart(self, feed: Feed, self_check_timeout: float) -> None:
        """The first use in a forked child: subscribe with the child's own ``feed``, probe,
        register the turns (:meth:`start`).  Callers hold ``start_lock``."""
        self.feed = feed
        try:
            self.start(self_check_timeout)
        except BaseException:
            self._closed.set()  # stop what start() began; the next call starts again
            self._stop_background()
            self._closed.clear()
            raise
        self.needs_start = False

    def _self_check(self, timeout: float) -> None:
        """Publish a ping on the map's channel and wait for it (RESP2/RESP3 or ACL trouble)."""
        arrived = threading.Event()
        nonce, ping = self.ping_message(arrived.set)
        # Published again every 0.5 s until it arrives: the shared subscriber may be
        # reconnecting meanwhile (to track another map's keys, pubsub.RETRACK_AFTER), and a
        # message published while it is away is lost.
        deadline = time.monotonic() + timeout
        while not arrived.is_set() and time.monotonic() < deadline:
            self.feed.publish(ping)
            arrived.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        if not arrived.is_set():
            raise FeedError(
                f"a test change message published on {self.feed.topic} ({self.feed.describe()}) "
                f"did not come back within {timeout} s: invalidations would never arrive. Check "
                "the broker's permissions and that nothing in between drops its traffic"
            )
        del self.pings[nonce]

    def close(self) -> None:
        self._closed.set()
        self._stop_background()
        if not self.needs_start:  # in a child not yet started, the feed is the parent's
            self.feed.close()  # the map opened it (feed/routing.py)
        member, board, self._board = self._presence, self._board, None
        if board is not None and member is not None:
            board.leave(member)
        if member is not None and member.written:
            member.written = False
            try:
                self.executor.call([("HDEL", self.cmds.layout.presence, self.cmds.origin)],
                                   write=True)  # fmt: skip
            except Exception as exc:  # readers drop it after three periods anyway
                log.debug("syncmap could not remove its presence record (%r)", exc)

    def _stop_background(self) -> None:
        """Remove the turns (each waited for if running, at most 5 s; ``_closed`` is set), end
        the subscription, the callbacks' thread and the watches."""
        for turn in (self._probe, self._timer):
            self._scheduler.remove(turn)
        self._probe, self._timer = self._new_turns()
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None
        self.events.stop()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def subscription(self) -> Subscription | None:
        """The feed's subscription (None before ``start``, and in a forked child until then)."""
        return self._subscription

    def raise_background_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise SyncMapError(f"a syncmap background thread failed: {err!r}") from err

    # ---- the feed ----------------------------------------------------------------------------

    def relay(self, messages: list[bytes]) -> None:
        """Publish what a write script made (relay mode), after the write, in the writer's
        thread; a failure is counted and logged, never raised (:meth:`publish_failed`)."""
        for data in messages:
            try:
                self.feed.publish(data, confirm=False)
            except Exception as exc:
                self.publish_failed(exc)

    # ---- probes and the timer ----------------------------------------------------------------

    def probe_once(self, executor: Executor | None = None) -> None:
        """One probe (``flows.admin.probe``), and what it found damaged reported."""
        if self.leasing is not None:
            self.leasing.probing(time.monotonic())
        self._probe_complete = False
        result = run(admin.probe(self.state), executor or self.executor, self.relay)
        self._probe_complete = all(state is not None for state in result.states)
        self.report(result)

    def _refresh_presence(self) -> None:
        """Write the presence records of this process's maps on this store if due (this map's
        thread or another's: ``presence.Board``); a failure is only logged."""
        if self._board is not None:
            self._presence_due = self._board.refresh(self.prober)

    def _new_turns(self) -> tuple[schedule.Turn, schedule.Turn]:
        topic = self.feed.topic
        return (schedule.Turn(self._probe_turn, topic, patience=self.interval / 4),
                schedule.Turn(self._timer_turn, topic))  # fmt: skip

    def _schedule(self) -> None:
        """Register the probe and timer turns with the scheduler: the timer's due now, the
        probe's an interval from now (or the presence refresh's, if sooner)."""
        now = time.monotonic()
        self._next_probe = now + self.interval
        self._scheduler.add(self._timer, now)
        self._scheduler.add(self._probe, self._probe_due())

    def _probe_due(self) -> float:
        """When the next probe turn is due: the next probe, or the presence refresh if that is
        sooner and may go (``_probe_turn`` says when it may not)."""
        presence = self._board is not None and self._probe_complete
        return min(self._next_probe, self._presence_due) if presence else self._next_probe

    def _probe_turn(self, woken: bool) -> float:
        """One turn of the map's probe, on a probe thread of the scheduler; the next due time.

        ``woken``: asked for (``wake_probe``) since the last turn began; such a turn always
        probes.  A turn may start late: a probe thread stalled in another map's probe is
        replaced by a spare after this turn's patience (``schedule.py``); past the spares, this
        map's leases may lapse meanwhile and its reads go to the store, never stale."""
        if self._closed.is_set():
            return math.inf
        # Presence waits while the last probe went unanswered anywhere (a Cluster master, or
        # the store, hung or down): written on this turn, it would wait out the executor's
        # deadline there and hold the next probe back by as much.  Order that prevents: one
        # master hangs; a probe waits probe_deadline for it; the presence write, its hash on
        # that master, waits 0.25 s more; the next probe waits again: the other masters'
        # buckets, renewed to the first probe's send time + Δ, lapsed before the next renewal
        # (S27-cluster, 236 reads flagged stale).
        presence = self._board is not None and self._probe_complete
        if presence and time.monotonic() >= self._presence_due:
            self._refresh_presence()
            if not woken and time.monotonic() < self._next_probe:
                return self._probe_due()
        now = time.monotonic()
        self._next_probe = now + self.interval
        if woken or self.leasing is None or not self.leasing.may_skip(now):
            try:
                self.probe_once(self.prober)
            except SyncMapError as exc:
                log.debug("syncmap probe failed (%s); leases will lapse if this lasts", exc)
            except Exception as exc:  # a bug: surface it on the next call, and keep probing
                log.exception("syncmap probe failed unexpectedly")
                self.error = exc
        return self._probe_due()

    def wake_timer(self) -> None:
        self._scheduler.wake(self._timer)

    def _timer_turn(self, woken: bool) -> float:
        """One turn of the map's timer, on the scheduler's clock thread; the next due time.

        No I/O here, ever: the clock runs every map's timer turn, and a probe (any map's) runs
        elsewhere, so nothing keeps an expired lease alive.  Nor does a guard held long: the
        turn waits at most ``GUARD_WAIT`` for its map's guard, then comes again after the other
        maps' due turns."""
        if self._closed.is_set():
            return math.inf
        try:
            guard = self.lock
            if not guard.acquire(timeout=GUARD_WAIT):
                return time.monotonic()  # after the other maps' turns due now (GUARD_WAIT)
            try:
                wake = self.core.tick(time.monotonic())
                freed = self.core.sweep() if self.core.sweeping else None
            finally:
                guard.release()
            if freed is not None:
                # A flushed bucket's entries, a chunk at a time (NearCache._flush): freeing them
                # here, outside the guard, is the costly half.  Then sleep(0) hands the GIL to a
                # reader waiting for it or for the guard; the next chunk is due at once, after
                # the other maps' turns already due.
                del freed
                time.sleep(0)
                return time.monotonic()
            return min(wake, time.monotonic() + 60.0)
        except Exception as exc:  # a bug: surface it on the next call, keep the timer alive
            log.exception("syncmap timer failed unexpectedly")
            self.error = exc
            return time.monotonic() + 0.1

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
