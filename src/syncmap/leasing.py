"""A map's half of PING leases, the same for the thread and the asyncio engine: what a vouch or
a tracking notice does to the near cache, and whether the probe loop may skip a turn
(docs/design.md, "PING leases").  The subscriber's half is ``feed/leases.py``.

The probe loop asks :meth:`Leasing.may_skip` each turn.  It probes when asked (a bucket only a
probe settles, a notice, a flush), when some bucket has had no vouch for ``VOUCH_LATE`` vouch
periods (on a Cluster each node's connection vouches for its own buckets, so one silent node
is noticed though the others go on), and every ``SLOW_PROBE`` seconds while the map is read.

Idle maps (docs/design.md, "Idle maps"): a map nobody reads wants a vouch PING only every
``IDLE_VOUCH`` x Δ, not every Δ/4.  Its leases lapse in between and its buckets are *held*
(entries kept, never served: ``NearCache`` revalidation), and each idle PING's answer
revalidates them, so the cache survives idleness whole while costing Redis a PING per process
every few seconds.  The first read after ``IDLE_AFTER`` x Δ without one (:meth:`demand`, on the
map's slow path) asks the subscriber for a PING at once (``Lease.wakers``) and brings back the
Δ/4 pace; it and the reads until that PING's answer go to Redis, as any read of a lapsed lease
does.  Freshness is untouched: what may be served is still decided by vouches and probes only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import Any

from .core.nearcache import NearCache
from .feed.leases import Lease
from .keys import Layout
from .store.commands import LOGGED_PREFIX, SHARDED_TARGET

SLOW_PROBE = 60.0
"""With PING leases, a probe nothing asked for comes this often (seconds): the bound for a
change that neither a message nor a tracking notice reports (docs/design.md, "PING leases")."""
REAP_SLACK = 2.0
"""With PING leases, probe every interval until this many intervals after the latest deadline of
a TTL'd entry this server cached or wrote (``NearCache.reap_until``): the probe reaps expiries."""
VOUCH_LATE = 2.0
"""With PING leases, probe as before (every interval) once a bucket had no vouch for this many
vouch periods (Δ/4 while read, ``IDLE_VOUCH`` x Δ while idle): its connection is slow, silent
or reconnecting, and probes find what it lost."""
IDLE_AFTER = 5.0
"""A map with no read on its slow path for this many Δ is idle: its vouch PINGs slow down to one
every ``IDLE_VOUCH`` x Δ.  A map being read passes its slow path at least every ``recheck`` (the
hit path's ``check_at``), so reads keep it busy however well they hit."""
IDLE_VOUCH = 4.0
"""An idle map's vouch PING period, in Δ.  Below ``HOLD_LEASES`` (10) with room for one lost
PING: a held bucket that no vouch or probe decides within ``hold_limit`` is flushed."""


def lease_prefix(target: str, layout: Layout, enabled: bool) -> bytes | None:
    """The data-key prefix a map tracks for PING leases, or None where they do not hold: only
    the in-script routes, whose write scripts publish in the write's atomic step on a channel
    the process's (per-node) subscriber carries: the map's channel on one Redis or a Sentinel
    set, each bucket's sharded channel on a Cluster (``!s``, and ``!S`` with its bucket logs).
    Relayed feeds and streams keep probing every Δ/4."""
    in_script = target in (layout.channel, SHARDED_TARGET) or target.startswith(LOGGED_PREFIX)
    return layout.data_prefix.encode() if enabled and in_script else None


def idles_for(config: Any) -> bool:
    """Whether a map of ``config`` (a ``MapConfig``) may idle (module docstring): every read is
    sure to pass the slow path now and then, and a lapse holds the entries for the next vouch.
    Not with ``fast_hits`` (no clock on the hit path), revalidation off (a lapse flushes) or
    serve_stale (a lapse serves stale instead of holding)."""
    return bool(not config.fast_hits and config.guards.revalidate and config.stale_age == 0)


class Leasing:
    """One map's PING-lease state.  ``core`` and ``guard`` give the map's near cache and its
    lock (both replaced in a forked child, hence getters); ``wake_probe`` and ``wake_timer`` are
    the engine's.  Vouches and notices come on the subscriber's thread (or the
    loop); :meth:`may_skip` and :meth:`probing` on the probe loop's."""

    def __init__(self, prefix: bytes, interval: float, core: Callable[[], NearCache],
                 guard: Callable[[], Any], wake_probe: Callable[[], None],
                 wake_timer: Callable[[], None], *, idles: bool = False) -> None:  # fmt: skip
        self.prefix = prefix
        self.interval = interval
        self.idles = idles  # idles_for(config)
        max_staleness = core().max_staleness
        self.recheck = interval
        """The longest a reader's hits go without passing the slow path (``demand``)."""
        self._idle_after = IDLE_AFTER * max_staleness
        self._idle_every = IDLE_VOUCH * max_staleness if idles else 0.0
        self.current: Lease | None = None  # the one handed to the feed (:meth:`lease`)
        self._core, self._guard = core, guard
        self._wake_probe, self._wake_timer = wake_probe, wake_timer
        self._vouched = [-float("inf")] * len(core().buckets)  # per bucket, monotonic
        self._probed_at = -float("inf")
        self.wanted = False  # a probe asked for by a vouch or a notice

    def lease(self, pong: bool) -> Lease:
        """What the map hands its feed (``FeedHandler.lease``); ``pong``: ``Guards.pong``.
        Idle from the start: the baseline probe's lease covers reads in the first Δ, and the
        first of them makes the map busy (:meth:`demand`)."""
        self.current = Lease(self.prefix, self.interval, self.on_vouch, self.on_touched,
                             pong=pong, idle_every=self._idle_every)  # fmt: skip
        if self.idles:
            self._core().idle_after = self.current.busy_until  # idle until a first read
        return self.current

    def idle(self, now: float) -> bool:
        """The map is idle at ``now`` (no read for IDLE_AFTER x Δ; never if it cannot idle)."""
        lease = self.current
        return self.idles and lease is not None and now >= lease.busy_until

    def demand(self, now: float) -> None:
        """A read passed the map's slow path at ``now`` (on a reading thread): the map is busy
        for ``IDLE_AFTER`` x Δ more.  After an idle spell, ask each reader carrying the lease
        for a vouch PING now (``Lease.wakers``).  Cheap when busy: one comparison."""
        lease = self.current
        # Refreshed at most once per ``recheck``: busy until IDLE_AFTER x Δ after the last
        # read, less at most one recheck.
        if (
            lease is None
            or not self.idles
            or now < lease.busy_until - self._idle_after + self.recheck
        ):
            return
        idle = now >= lease.busy_until
        if idle:
            lease.busy_since = now
        lease.busy_until = now + self._idle_after  # before the wake: readers read it then
        self._core().idle_after = lease.busy_until  # a float: the timer reads it under the guard
        if idle:
            for wake in list(lease.wakers):
                wake()

    def on_vouch(self, sent_at: float, buckets: Collection[int] | None = None) -> None:
        """A PING sent at ``sent_at`` was answered after every message before it, on a
        connection carrying ``buckets`` (None: all)."""
        with self._guard():
            wants = self._core().on_vouch(sent_at, buckets)
        now = time.monotonic()
        for i in range(len(self._vouched)) if buckets is None else buckets:
            if i < len(self._vouched):
                self._vouched[i] = now
        if wants:  # a bucket only a probe settles: the probe loop's next turn sends one
            self.wanted = True
        self._wake_timer()

    def on_touched(self, bucket: int | None) -> None:
        """A tracking notice: ``bucket``'s data changed (None: the database was flushed).
        A probe is wanted only when the near cache put a bucket in doubt (no message explained
        the notice): a write through the scripts sends a notice too, and probing after each
        would make a busy map probe every interval, which is what leases are to save (and, on a
        Cluster, would hide a silent master behind the others' traffic)."""
        with self._guard():
            core = self._core()
            doubts = core.counters.doubts
            core.on_touched(bucket)
            doubted = core.counters.doubts != doubts
        if doubted or bucket is None:
            self.wanted = True
        if bucket is None:
            self._wake_probe()

    def may_skip(self, now: float) -> bool:
        """Whether this turn of the probe loop may skip its probe (module docstring).

        A map read again after an idle spell counts its vouches from then (``busy_since``):
        the one it asked for comes within an interval or two, and a bucket whose vouch is late
        *from then* is probed.  An idle map skips the slow probe: nobody reads what it would
        confirm, and the first read after ``SLOW_PROBE`` brings it (``_probed_at`` is old)."""
        lease = self.current
        busy = lease is None or not lease.idle_every or now < lease.busy_until
        since = min(self._vouched, default=-float("inf"))
        if busy and lease is not None:
            since = max(since, lease.busy_since)
        every = self.interval if busy else self._idle_every
        return (
            not self.wanted
            # A vouch would ask for this probe too, but an idle map's next vouch may be 4 Δ
            # away (a flood of unusable messages asks for repairs faster than it comes).
            and not self._core().unsettled()
            and now - since <= VOUCH_LATE * every
            and (now - self._probed_at < SLOW_PROBE or not busy)
            # Expiries are reaped (and their 'expire' changes published) by probes: while an
            # entry this server cached or wrote may be due, probe as before.  REAP_SLACK
            # intervals past the deadline cover the store's clock being a little behind ours.
            and now > self._core().reap_until + REAP_SLACK * self.interval
        )

    def probing(self, now: float) -> None:
        """A probe is being sent now: a wish made during it is kept for the next turn."""
        self.wanted = False
        self._probed_at = now
