"""A map's half of PING leases, the same for the thread and the asyncio engine: what a vouch or
a tracking notice does to the near cache, and whether the probe loop may skip a turn
(docs/design.md, "PING leases").  The subscriber's half is ``feed/leases.py``.

The probe loop asks :meth:`Leasing.may_skip` each turn.  It probes when asked (a bucket only a
probe settles, a notice, a flush), when some bucket has had no vouch for ``VOUCH_LATE`` probe
intervals (on a Cluster each node's connection vouches for its own buckets, so one silent node
is noticed though the others go on), and every ``SLOW_PROBE`` seconds whatever happens.
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
probe intervals: its connection is slow, silent or reconnecting, and probes find what it lost."""


def lease_prefix(target: str, layout: Layout, enabled: bool) -> bytes | None:
    """The data-key prefix a map tracks for PING leases, or None where they do not hold: only
    the in-script routes, whose write scripts publish in the write's atomic step on a channel
    the process's (per-node) subscriber carries: the map's channel on one Redis or a Sentinel
    set, each bucket's sharded channel on a Cluster (``!s``, and ``!S`` with its bucket logs).
    Relayed feeds and streams keep probing every Δ/4."""
    in_script = target in (layout.channel, SHARDED_TARGET) or target.startswith(LOGGED_PREFIX)
    return layout.data_prefix.encode() if enabled and in_script else None


class Leasing:
    """One map's PING-lease state.  ``core`` and ``guard`` give the map's near cache and its
    lock (both replaced in a forked child, hence getters); ``wake_probe`` and ``wake_timer`` are
    the engine's.  Vouches and notices come on the subscriber's thread (or the
    loop); :meth:`may_skip` and :meth:`probing` on the probe loop's."""

    def __init__(self, prefix: bytes, interval: float, core: Callable[[], NearCache],
                 guard: Callable[[], Any], wake_probe: Callable[[], None],
                 wake_timer: Callable[[], None]) -> None:  # fmt: skip
        self.prefix = prefix
        self.interval = interval
        self._core, self._guard = core, guard
        self._wake_probe, self._wake_timer = wake_probe, wake_timer
        self._vouched = [-float("inf")] * len(core().buckets)  # per bucket, monotonic
        self._probed_at = -float("inf")
        self.wanted = False  # a probe asked for by a vouch or a notice

    def lease(self, pong: bool) -> Lease:
        """What the map hands its feed (``FeedHandler.lease``); ``pong``: ``Guards.pong``."""
        return Lease(self.prefix, self.interval, self.on_vouch, self.on_touched, pong=pong)

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
        """Whether this turn of the probe loop may skip its probe (module docstring)."""
        return (
            not self.wanted
            and now - min(self._vouched, default=-float("inf")) <= VOUCH_LATE * self.interval
            and now - self._probed_at < SLOW_PROBE
            # Expiries are reaped (and their 'expire' changes published) by probes: while an
            # entry this server cached or wrote may be due, probe as before.  REAP_SLACK
            # intervals past the deadline cover the store's clock being a little behind ours.
            and now > self._core().reap_until + REAP_SLACK * self.interval
        )

    def probing(self, now: float) -> None:
        """A probe is being sent now: a wish made during it is kept for the next turn."""
        self.wanted = False
        self._probed_at = now
