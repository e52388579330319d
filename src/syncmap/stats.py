"""What a store-mode map counts (``SyncMap.statistics()``) and publishes as its presence record."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.nearcache import NearCache


@dataclass(frozen=True, slots=True)
class Statistics:
    """Counters of one map on this server since it was opened."""

    hits: int
    misses: int
    invalidations: int
    resyncs: int
    entries: int
    evictions: int
    expirations: int
    gaps: int
    epoch_changes: int
    lost_detected: int
    lease_lapses: int
    fills_rejected: int
    messages: int
    corrupt_messages: int
    events_dropped: int = 0
    """Events a ``subscribe()`` callback or ``watch()`` never got: its queue was full."""
    gap_overflows: int = 0
    """Buckets flushed because a relayed feed held too many early messages (``MAX_AHEAD``)."""
    corrupt_entries: int = 0
    """Stored entries that did not decode, left out by ``preload()`` or ``skip_corrupt=True``."""
    forged_messages: int = 0
    """Change messages dropped for want of a valid signature (a map with ``signing_key``)."""
    idle_lapses: int = 0
    """Bucket leases that lapsed while the map was idle (no read for 5 Δ: leasing.py); by design,
    unlike ``lease_lapses``."""
    digest_mismatches: int = 0
    """Buckets restarted because the store's digest chain differed from the messages applied."""
    stale_reads: int = 0
    """Reads served stale while Redis was unreachable (``on_store_down="serve_stale"``)."""
    log_replays: int = 0
    """Buckets repaired by replaying their log (the stream route on a Redis Cluster) instead of
    being flushed, after their sharded channel was lost and came back."""
    log_replayed_messages: int = 0
    """Log entries those replays applied."""
    log_replay_fallbacks: int = 0
    """Buckets whose log could not cover the gap (trimmed, missing, another epoch): flushed."""
    absent: int = 0
    """Absent markers cached: keys a read found missing, answered from the near cache until a
    change of the key (``MapConfig(cache_absent=True)``).  Not in ``entries``; they count
    against ``capacity``, and their hits are in ``hits``."""
    absent_fills: int = 0
    """Absent markers installed so far."""

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class Presence:
    """This server's presence record (JSON-ready) for ``syncmap top``; see docs/protocol.md.

    Built on the probe thread every ``presence_interval``; the per-second rates are over the time
    since the previous record."""

    def __init__(self, node_id: str, every: float) -> None:
        self.node_id, self.every = node_id, every
        self._last: tuple[float, int, int] | None = None
        self._started = 0

    def record(self, s: Statistics, now_ms: int) -> dict[str, Any]:
        if not self._started:
            self._started = now_ms
        mono, reads = time.monotonic(), s.hits + s.misses
        last, self._last = self._last, (mono, reads, s.invalidations)
        rate_r = rate_i = 0.0
        if last is not None and mono > last[0]:
            rate_r = (reads - last[1]) / (mono - last[0])
            rate_i = (s.invalidations - last[2]) / (mono - last[0])
        return {
            "node": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": self._started, "updated": now_ms,
            "every": self.every, "entries": s.entries, "hits": s.hits,
            "misses": s.misses, "hit_ratio": round(s.hit_ratio, 4),
            "invalidations": s.invalidations, "resyncs": s.resyncs,
            "lost_detected": s.lost_detected, "messages": s.messages,
            "reads_per_s": round(rate_r, 1), "invalidations_per_s": round(rate_i, 1),
        }  # fmt: skip


def statistics_of(core: NearCache, events_dropped: int, *, exact: bool = True) -> Statistics:
    """A map's :class:`Statistics` from its near cache's counters (either driver).

    ``exact=False`` (the periodic presence record): ``hits`` estimated at O(1) cost
    (``NearCache.hits_estimate``) instead of summed over every cached entry."""
    c = core.counters
    return Statistics(
        hits=core.hits() if exact else core.hits_estimate(), misses=c.misses,
        invalidations=c.invalidations,
        resyncs=c.resyncs, entries=core.values_cached(), absent=core.absent,
        absent_fills=c.absent_fills, evictions=c.evictions,
        expirations=c.expirations, gaps=c.gaps, epoch_changes=c.epoch_changes,
        lost_detected=c.lost_detected, lease_lapses=c.lease_lapses, idle_lapses=c.idle_lapses,
        fills_rejected=c.fills_rejected, messages=c.messages,
        corrupt_messages=c.corrupt_messages, events_dropped=events_dropped,
        gap_overflows=c.gap_overflows, corrupt_entries=c.corrupt_entries,
        forged_messages=c.forged_messages, digest_mismatches=c.digest_mismatches,
        stale_reads=c.stale_reads, log_replays=c.log_replays,
        log_replayed_messages=c.log_replayed_messages,
        log_replay_fallbacks=c.log_replay_fallbacks,
    )  # fmt: skip
