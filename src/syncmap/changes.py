"""What a map does with what its feed delivers and its probes find: the part of the background
work that is the same for every driver (the thread engine, ``engine.py``; the asyncio engine,
``aio/engine.py``).

A driver calls :meth:`FeedLogic.on_feed_message`, ``on_feed_up`` and ``on_feed_down`` from its
feed, :meth:`report` with each probe's result, and implements three hooks: ``wake_probe`` (send
a probe now), ``signal_up`` and ``is_up`` (the first subscription is confirmed).  Nothing here
does I/O or blocks: these run on a feed thread or on the event loop, under the map's guard only
for as long as the near cache needs it.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from .errors import CorruptData
from .flows.state import MapState
from .ratelog import RateLimitedLog
from .store.commands import ProbeResult

if TYPE_CHECKING:
    from .leasing import Leasing

log = logging.getLogger("syncmap")

REPAIR_EVERY = 0.5
"""A repair probe (after an unusable change message) at most once per this much of the probe
interval: a flood of garbage on the channel cannot turn every message into a probe."""


class Events(ABC):
    """What a driver's event fan-out offers the feed logic."""

    @property
    @abstractmethod
    def wanted(self) -> bool: ...

    @abstractmethod
    def emit(self, event: Event) -> None: ...


class FeedLogic(ABC):
    """The driver-independent half of a map's background work (see the module docstring)."""

    events: Any  # the driver's fan-out: ``wanted`` and ``emit(event)``
    leasing: Leasing | None  # PING leases (leasing.py), or None: set by the driver's engine

    def __init__(self, state: MapState, interval: float, topic: str,
                 keys: tuple[bytes, ...]) -> None:  # fmt: skip
        self.state = state
        self.cmds = state.cmds
        self.interval = interval
        self.topic = topic  # for log lines
        self.keys = keys  # signing keys (signing.py): with any, only verified messages apply
        self.pings: dict[bytes, Callable[[], None]] = {}
        self.error: BaseException | None = None
        self.publish_failures = 0
        self.damaged_buckets = 0  # probes that found a bucket damaged (counter)
        self.meta_recreated = 0  # probes that found the meta key missing and wrote it again
        self._repair_probe_at = -float("inf")  # no repair probe before then (_repair_after)
        self._bad_message_log = RateLimitedLog(log)
        self._forged_log = RateLimitedLog(log)
        self._damage_log = RateLimitedLog(log)
        self._meta_log = RateLimitedLog(log)

    @abstractmethod
    def wake_probe(self) -> None: ...

    @abstractmethod
    def signal_up(self) -> None: ...

    @abstractmethod
    def is_up(self) -> bool: ...

    @property
    @abstractmethod
    def closed(self) -> bool: ...

    @property
    @abstractmethod
    def events_dropped(self) -> int: ...

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

    def server_now_ms(self) -> float:
        return self.state.server_now_ms()

    def ping_message(self, arrived: Callable[[], None]) -> tuple[bytes, bytes]:
        """(nonce, message) of a self-check ping; ``arrived`` runs when it comes back."""
        nonce = os.urandom(16)
        self.pings[nonce] = arrived
        msg = ChangeMessage(OP_PING, 0, 0, 0, self.cmds.origin, (nonce,))
        return nonce, encode_message(msg, self.keys[0] if self.keys else None)

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
            waiter = self.pings.get(msg.fields[0] if msg.fields else b"")
            if waiter is not None:
                waiter()
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
        if self.core.sweeping:  # a gap or a new epoch flushed a large bucket: the timer frees it
            self.state.wake_timer()
        hook = instruments.change_age
        if hook is not None and msg.stamp_ms:
            # Staleness only for others' writes: this server's own write reached its cache
            # with the write's reply (its echo may merely arrive first).
            age = max(0.0, (self.state.server_now_ms() - msg.stamp_ms) / 1000)
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
            "another key; repairing", self.topic, len(data), bytes(data[:8]),
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
            self.topic, exc, self.core.counters.corrupt_messages,
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
            self.wake_probe()

    def on_feed_up(self, resumed: bool = False) -> None:
        """Subscribed again.  ``resumed``: a durable feed carried on from the last message it
        delivered, so nothing was lost and there is nothing to repair."""
        if resumed and self.is_up():
            return
        self.on_buckets_up(None)

    def on_buckets_up(self, buckets: list[int] | None) -> None:
        """Subscribed again; only ``buckets`` may have lost messages (None: any bucket)."""
        with self.lock:
            self.core.on_feed_up(time.monotonic(), buckets)
        self.signal_up()
        self.wake_probe()

    def on_feed_down(self) -> None:
        with self.lock:
            self.core.on_feed_down()

    def bucket_position(self, bucket: int) -> tuple[int | None, int] | None:
        """Where this server stands in ``bucket`` (epoch, seq), for a feed replaying its log
        (``feed/bucketlog.py``); None: not tracked (nothing cached to keep), or replay is off."""
        if not self.core.guards.log_replay:
            return None
        with self.lock:
            b = self.core.buckets[bucket]
            return (b.epoch, b.seq) if b.known else None

    def bucket_replayed(self, bucket: int, covered: bool, messages: int) -> None:
        """A replay of ``bucket``'s log was applied: counted (``Counters.log_replays``...)."""
        with self.lock:
            c = self.core.counters
            c.log_replayed_messages += messages
            if covered:
                c.log_replays += 1
            else:
                c.log_replay_fallbacks += 1

    def publish_failed(self, exc: Exception) -> None:
        """A relayed message could not be published.  Not the write's failure: the store holds
        the change, and the other servers' probes see the bucket's sequence move without its
        message and drop the bucket within ``max_staleness`` (docs/feeds.md).  Counted, logged."""
        self.publish_failures += 1
        if self.publish_failures == 1 or self.publish_failures % 1000 == 0:
            log.warning(
                "syncmap could not publish a change on %s (%s; %d so far): other servers "
                "will see it through their sequence probes instead",
                self.topic, exc, self.publish_failures,
            )  # fmt: skip

    # ---- probes ------------------------------------------------------------------------------

    def report(self, result: ProbeResult) -> None:
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
