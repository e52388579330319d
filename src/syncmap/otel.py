"""OpenTelemetry metrics for every map and lock of this process (``pip install syncmap[otel]``).

::

    import syncmap.otel
    syncmap.otel.enable()                        # the global MeterProvider, or meter_provider=

One call registers the instruments of docs/metrics.md with a meter named ``syncmap``.  Counters
and gauges are *observable*: the SDK reads the maps' own counters when it collects (a Prometheus
scrape, an OTLP export), so a cache hit costs exactly what it cost before.  Two histograms are
recorded as things happen, and only while enabled: the age of each change message on arrival
(feed thread) and the wait of each lock acquisition.

Attributes: ``syncmap.map.name`` and ``syncmap.node.id`` per map (``node_id=False`` leaves the
node id out: it names host, pid and a random suffix, so it changes with every restart), and
``syncmap.lock.kind`` (plus ``syncmap.lock.result``) for locks.  Never a key or a lock name: their
number is unbounded.  Importing this module imports ``opentelemetry``; nothing else in syncmap
does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Histogram, Meter, MeterProvider, Observation

from . import __version__, forksafe, instruments
from .changes import FeedLogic as Engine
from .core.nearcache import INF

__all__ = ["Instrumentation", "disable", "enable"]

MAP = "syncmap.map.name"
NODE = "syncmap.node.id"
KIND = "syncmap.lock.kind"
RESULT = "syncmap.lock.result"
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0)  # fmt: skip
"""Seconds.  A change normally arrives in well under a millisecond on a LAN; a second or more
means a stalled feed or a durable feed catching up."""
WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0)  # fmt: skip

Counts = Callable[[Engine], Iterable[tuple[dict[str, str], int | float]]]
"""One figure (or several, each with its extra attributes) of one map, read at collection."""


class Instrumentation:
    """The instruments of one :func:`enable` call; :meth:`close` (or :func:`disable`) stops
    them reporting.  OpenTelemetry cannot unregister an instrument: once closed, its callbacks
    report nothing and its histograms record nothing."""

    def __init__(self, meter: Meter, *, node_id: bool) -> None:
        self.meter = meter
        self.node_id = node_id
        self.closed = False
        self._register_map_counters()
        self._register_map_gauges()
        self._register_lock_counters()
        self.feed_lag: Histogram = meter.create_histogram(
            "syncmap.feed.lag", unit="s",
            description="Age of a change when its message reached this server: its write's "
            "Redis time to the arrival, on this server's estimate of the Redis clock",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )  # fmt: skip
        self.staleness: Histogram = meter.create_histogram(
            "syncmap.cache.staleness", unit="s",
            description="Observed staleness: for a change that dropped an entry this server had "
            "cached, how long after the write that entry was still being served",
            explicit_bucket_boundaries_advisory=LAG_BUCKETS,
        )  # fmt: skip
        self.lock_wait: Histogram = meter.create_histogram(
            "syncmap.lock.wait_time", unit="s",
            description="Time an acquire() took, from the call to its return or refusal",
            explicit_bucket_boundaries_advisory=WAIT_BUCKETS,
        )  # fmt: skip
        instruments.change_age = self._on_change
        instruments.lock_wait = self._on_lock_wait

    # ---- what happens as it happens ----------------------------------------------------------

    def _on_change(self, engine: Engine, age: float, dropped: bool) -> None:
        attrs = self._attrs(engine)
        self.feed_lag.record(age, attrs)
        if dropped:
            self.staleness.record(age, attrs)

    def _on_lock_wait(self, kind: str, result: str, seconds: float) -> None:
        self.lock_wait.record(seconds, {KIND: kind, RESULT: result})

    # ---- what is read at collection ----------------------------------------------------------

    def _attrs(self, engine: Engine) -> dict[str, str]:
        cmds = engine.cmds
        if self.node_id:
            return {MAP: cmds.layout.name, NODE: cmds.origin}
        return {MAP: cmds.layout.name}

    def _engines(self) -> list[Engine]:
        if self.closed:
            return []
        return [e for e in list(instruments.engines) if not e.closed]

    def _observe(self, counts: Counts, *, total: bool = True) -> Callable[
            [CallbackOptions], Iterator[Observation]]:  # fmt: skip
        """A callback reporting ``counts`` of every open map, summed over maps that share their
        attributes (``total``; gauges that are not totals keep the largest value)."""

        def callback(_options: CallbackOptions) -> Iterator[Observation]:
            merged: dict[tuple[tuple[str, str], ...], int | float] = {}
            for engine in self._engines():
                base = self._attrs(engine)
                for extra, value in counts(engine):
                    key = tuple(sorted({**base, **extra}.items()))
                    have = merged.get(key)
                    if have is None:
                        merged[key] = value
                    else:
                        merged[key] = have + value if total else max(have, value)
            for key, value in merged.items():
                yield Observation(value, dict(key))

        return callback

    def _counter(self, name: str, unit: str, description: str, counts: Counts) -> None:
        self.meter.create_observable_counter(name, callbacks=[self._observe(counts)], unit=unit,
                                             description=description)  # fmt: skip

    def _register_map_counters(self) -> None:
        none: dict[str, str] = {}

        def counter(name: str, unit: str, description: str, field: str) -> None:
            self._counter(name, unit, description,
                          lambda e: [(none, getattr(e.core.counters, field))])  # fmt: skip

        self._counter(
            "syncmap.cache.requests", "{request}",
            "Cached reads: served from this server's near cache (hit) or read through to Redis "
            "(miss); consistent=True reads are not counted",
            lambda e: [({"syncmap.cache.result": "hit"}, e.core.hits_estimate()),
                       ({"syncmap.cache.result": "miss"}, e.core.counters.misses)],
        )  # fmt: skip
        self._counter(
            "syncmap.cache.evictions", "{entry}",
            "Entries dropped from the near cache, by reason: full (capacity), invalidation (a "
            "change message or clear), expired (TTL)",
            lambda e: [({"syncmap.cache.reason": "full"}, e.core.counters.evictions),
                       ({"syncmap.cache.reason": "invalidation"}, e.core.counters.invalidations),
                       ({"syncmap.cache.reason": "expired"}, e.core.counters.expirations)],
        )  # fmt: skip
        counter("syncmap.cache.fills_rejected", "{fill}",
                "Reads whose result was not cached: a newer version was seen while it was in "
                "flight, or the bucket was flushed meanwhile", "fills_rejected")  # fmt: skip
        counter("syncmap.cache.resyncs", "{bucket}",
                "Buckets flushed and restarted (a gap, a lost message, a new epoch, a digest "
                "mismatch, ...): their cached entries went", "resyncs")  # fmt: skip
        counter("syncmap.cache.stale_reads", "{request}",
                "Reads served stale while Redis was unreachable (on_store_down='serve_stale'); "
                "they are also counted as hits", "stale_reads")  # fmt: skip
        counter("syncmap.cache.lease_lapses", "{bucket}",
                "Buckets whose lease ran out unconfirmed (no probe answered in max_staleness)",
                "lease_lapses")  # fmt: skip
        counter("syncmap.feed.messages", "{message}",
                "Change messages received on the map's feed", "messages")  # fmt: skip
        self._counter(
            "syncmap.feed.dropped_messages", "{message}",
            "Change messages dropped unapplied, by reason: corrupt (did not decode or apply) or "
            "forged (no valid signature on a map with a signing key)",
            lambda e: [({"syncmap.drop.reason": "corrupt"}, e.core.counters.corrupt_messages),
                       ({"syncmap.drop.reason": "forged"}, e.core.counters.forged_messages)],
        )  # fmt: skip
        counter("syncmap.feed.gaps", "{gap}",
                "Sequence gaps seen in a bucket's messages (a lost message: the bucket resyncs)",
                "gaps")  # fmt: skip
        counter("syncmap.feed.lost", "{message}",
                "Lost messages found by a sequence probe (the store moved, no message came)",
                "lost_detected")  # fmt: skip
        counter("syncmap.feed.digest_mismatches", "{bucket}",
                "Buckets whose digest chain differed from the store's (a forged or lost message)",
                "digest_mismatches")  # fmt: skip
        self._counter(
            "syncmap.feed.log_replays", "{bucket}",
            "Buckets whose sharded channel came back after a loss, by outcome: replayed from "
            "the bucket's log (Cluster stream route) or flushed because the log could not cover",
            lambda e: [({"syncmap.replay.outcome": "replayed"}, e.core.counters.log_replays),
                       ({"syncmap.replay.outcome": "flushed"},
                        e.core.counters.log_replay_fallbacks)],
        )  # fmt: skip
        counter("syncmap.store.epoch_changes", "{bucket}",
                "Buckets found with a new epoch: Redis lost their data (restart, flush, eviction)",
                "epoch_changes")  # fmt: skip
        self._counter(
            "syncmap.feed.publish_failures", "{message}",
            "Change messages this server could not relay to its feed (relayed feeds only)",
            lambda e: [(none, e.publish_failures)],
        )  # fmt: skip
        self._counter(
            "syncmap.events.dropped", "{event}",
            "Change events a subscribe() callback or watch() consumer never got (queue full)",
            lambda e: [(none, e.events_dropped)],
        )  # fmt: skip

    def _register_map_gauges(self) -> None:
        none: dict[str, str] = {}
        self.meter.create_observable_gauge(
            "syncmap.cache.items", unit="{item}",
            description="Entries in this server's near cache",
            callbacks=[self._observe(lambda e: [(none, e.core.values_cached())])],
        )  # fmt: skip
        self.meter.create_observable_gauge(
            "syncmap.store.items", unit="{item}",
            description="Live entries of the map in Redis, as of the last sequence probe "
            "(with PING leases an idle map probes only every 60 s)",
            callbacks=[self._observe(lambda e: [(none, e.live_entries)], total=False)],
        )  # fmt: skip
        self.meter.create_observable_gauge(
            "syncmap.cache.freshness", unit="s",
            description="Seconds since the map's least recently confirmed bucket was confirmed "
            "by a probe or a PING; past max_staleness that bucket is not served, or only flagged "
            "stale.  Not reported while the map is idle (no read for 5 max_staleness)",
            callbacks=[self._observe(self._freshness, total=False)],
        )  # fmt: skip

    def _freshness(self, engine: Engine) -> list[tuple[dict[str, str], float]]:
        """Now less the send time of the probe that last confirmed the map's least recently
        confirmed bucket (``confirmed_at``, which outlives a lapsed lease)."""
        confirmed = min((b.confirmed_at for b in engine.core.buckets), default=-INF)
        if confirmed == -INF:  # a bucket never confirmed: not started (a forked child)
            return []
        leasing = engine.leasing
        if leasing is not None and leasing.idle(time.monotonic()):
            return []  # nothing is read: its leases lapse between PINGs by design (leasing.py)
        return [({}, max(0.0, time.monotonic() - confirmed))]

    def _register_lock_counters(self) -> None:
        def per_kind(tables: list[tuple[dict[str, str], dict[str, int]]]) -> Callable[
                [CallbackOptions], Iterator[Observation]]:  # fmt: skip
            def callback(_options: CallbackOptions) -> Iterator[Observation]:
                if self.closed:
                    return
                with instruments.locks.mutex:
                    rows = [(extra, dict(table)) for extra, table in tables]
                for extra, table in rows:
                    for kind, n in table.items():
                        yield Observation(n, {KIND: kind, **extra})

            return callback

        locks = instruments.locks
        self.meter.create_observable_counter(
            "syncmap.lock.acquisitions", unit="{acquisition}",
            description="acquire() calls of this process's locks, by kind and result: acquired, "
            "timeout (not acquired in time, or at once when not blocking) or error",
            callbacks=[per_kind([({RESULT: "acquired"}, locks.acquired),
                                 ({RESULT: "timeout"}, locks.timeouts),
                                 ({RESULT: "error"}, locks.errors)])],
        )  # fmt: skip
        self.meter.create_observable_counter(
            "syncmap.lock.losses", unit="{loss}",
            description="Holds lost: the lease ran out before it was renewed (LockLost)",
            callbacks=[per_kind([({}, locks.lost)])],
        )  # fmt: skip

    def close(self) -> None:
        """Stop reporting (idempotent)."""
        self.closed = True
        if instruments.change_age == self._on_change:
            instruments.change_age = None
        if instruments.lock_wait == self._on_lock_wait:
            instruments.lock_wait = None


_active: Instrumentation | None = None
_active_lock = threading.Lock()


@forksafe.at_fork
def _fresh_active_lock() -> None:
    global _active_lock
    _active_lock = threading.Lock()  # a parent's thread may have held it at the fork


def enable(meter_provider: MeterProvider | None = None, *, node_id: bool = True
           ) -> Instrumentation:  # fmt: skip
    """Report every map and lock of this process through ``meter_provider`` (default: the global
    one, ``opentelemetry.metrics.set_meter_provider``).  Maps opened before or after the call are
    all reported.  A second call replaces the first (whose instruments then report nothing)."""
    global _active
    provider = meter_provider or metrics.get_meter_provider()
    meter = provider.get_meter("syncmap", __version__)
    with _active_lock:
        if _active is not None:
            _active.close()
        _active = Instrumentation(meter, node_id=node_id)
        return _active


def disable() -> None:
    """Stop reporting (the instruments stay registered with their meter, reporting nothing)."""
    global _active
    with _active_lock:
        if _active is not None:
            _active.close()
            _active = None
