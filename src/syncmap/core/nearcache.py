"""The near cache and its coherence rules: pure code, no I/O, no threads, no clock of its own.

The driver (``syncmap.map``) feeds it events - a fill began or completed, a change message arrived,
a probe of the bucket sequences returned, time passed - and it decides what the cache holds.  Every
method takes ``now`` from the caller, so tests run it in simulated time.

Why a cached entry is never stale beyond ``max_staleness`` (the contract, DESIGN §3.4):

* Every write takes the next *sequence* of its bucket as the key's *version*, and the change message
  carrying that version is published in the same atomic Lua step.  Per bucket we know ``seq``, the
  highest version accounted for.  A message that skips ahead is a **gap**: the bucket is flushed.
* A bucket is *served* only under a **lease**.  A probe sent at ``T`` that reads sequence ``s``
  proves "every write acknowledged before ``T`` is accounted for" once our ``seq >= s``; then the
  lease runs to ``T + max_staleness``.  A probe whose ``s`` we never reach (the last message was
  lost, the subscriber hangs) confirms nothing: after ``grace`` the bucket is flushed, and if
  probes stop altogether the lease lapses and ``tick`` *holds* the bucket (below).  So a hit at
  time ``t``
  only ever comes from a bucket that accounted, at ``T >= t - max_staleness``, for every write
  acknowledged before ``T``.  ``tick`` revokes leases ``margin`` early, because the hit path does
  not read the clock.
* **PING leases** (:meth:`NearCache.on_vouch`, in-script routes only): a PING sent at ``T`` on
  the subscriber connection is answered after every message published before ``T``, so once
  its answer arrives (everything before it applied) a bucket with nothing in doubt (known, no
  repair pending, no probe target unreached, no unexplained tracking notice or duplicate, see
  :meth:`on_touched`) accounts for every write acknowledged before ``T``: its lease runs to
  ``T + max_staleness``.  A lost message needs a broken connection (``on_feed_down``: no vouch
  counts until ``on_feed_up`` marks every bucket for repair); an unanswered PING renews nothing.
* A restarted or flushed Redis shows a new **epoch** (or a sequence that went backwards): flush.
* **Revalidation instead of emptying** (``Guards.revalidate``).  A lapsed lease (the process was
  paused - SIGSTOP, a long GC - or probes failed) does not flush the bucket: it is *held*
  (``held_since``), its entries kept but never served (``valid_until`` stays in the past while
  any bucket is held, and :meth:`cached` serves only under a lease), and the next probe decides:

  - same epoch, ``seq`` equal to ours and the digest chain equal (and no cached version above
    the store's, ``tops``): **renewed**, the entries are served again (``revalidations``).
    Proof: the probe was sent at ``T`` and read ``s``; every write acknowledged before ``T``
    took a version ``<= s`` of this bucket (its version is the bucket's next sequence, taken in
    the same atomic step that published its message); we applied every message up to ``s`` as
    an invalidation (``seq`` only advances over contiguous versions, a gap flushes), and the
    equal digest chain says they were the store's own messages, not forgeries.  So each kept
    entry is its key's state at ``T``, which is exactly what a lease from ``T`` needs; how long
    the bucket was held does not enter the argument.
  - ``seq`` ahead: the usual targets/grace path.  Messages still buffered on a live subscriber
    socket arrive, invalidate the keys written during the pause, and :meth:`_confirm` renews
    the bucket once ``seq`` reaches the probe's; a target not reached within ``grace`` (lost
    messages), or any move after a reconnect (``repair_from``: messages lost for sure),
    restarts that bucket only.
  - epoch changed, ``seq`` went back, or ``tops`` above the store's sequence: restart (flush).

  Only a bucket whose store answered the newest probe that answered at all is held: one whose
  own store stopped answering while others still do (a Cluster master down, a slot moving) is
  flushed as before, since holding any bucket sends every read of the map down the slow path.
  Memory stays bounded: held entries count against ``capacity`` and are evicted like others,
  and a bucket no probe decided within ``hold_limit`` (``max(10 * max_staleness,
  max_stale_age)``: its store is unreachable for that long) is flushed (``held_expired``).
  A reconnect never held anything to begin with: buckets stay served under their leases while
  the subscriber is down (a probe vouches only for what it read, never for messages), and the
  first probe after the reconnect restarts only the buckets that moved.
* Outages (``max_stale_age``, off by default: ``MapConfig(on_store_down="serve_stale")``): a
  lease that lapses because no probe came back since the one that last confirmed the bucket
  (the store is unreachable or hung, not a lost message: then a later probe *did* come back and
  did not renew it) keeps the bucket's entries as *stale-servable* until ``max_stale_age``
  after that confirmation, and held (unserved, as above) after that.  The hit path never
  serves them (``valid_until`` stays in the past while any bucket is stale); the driver's slow
  path asks :meth:`cached` and flags them.  What
  the core learns meanwhile still drops entries at once (messages, gaps, epochs), and the first
  probe that comes back restarts every stale bucket that moved, as a reconnect's repair does.

The fill race (A2), in the order of events it prevents::

    server B: begin_fill(k) -> sends HGET k             (reads version 4)
    server A: writes k -> version 5, publishes "k@5"
    server B: receives "k@5"        -> nothing cached to drop, but the pending fill notes 5
    server B: HGET reply (k@4) arrives -> complete_fill sees 4 < 5 noted: NOT installed

Without the note, B would cache k@4 after having processed k@5, stale until the next write.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Any, NamedTuple

from ..keys import Key, decode_key
from .wire import OP_CLEAR, OP_NAMES, OP_PING, ChangeMessage, link, next_digest

INF = float("inf")
MAX_AHEAD = 1024
"""Most early messages one bucket keeps aside on an unordered (relayed) feed, waiting for an
earlier one.  Legitimate reorderings are a few messages deep; a lost message keeps the bucket
waiting only until the probe's grace period ends.  Forged far-ahead sequences would otherwise grow
this without bound: past the limit the bucket is flushed and forgets them (``gap_overflows``),
which costs hits, never staleness (``ahead`` only ever lets ``seq`` advance)."""
ProbeState = tuple[int | None, int] | tuple[int | None, int, str | None]
"""What a probe read of one bucket: (epoch, seq) or (epoch, seq, digest chain); a digest of None
(or none given, as in model tests) is not compared."""
HOLD_LEASES = 10
"""A held bucket (lapsed, entries kept unserved) is flushed when no probe decided its fate within
``max(HOLD_LEASES * max_staleness, max_stale_age)``: its store is unreachable for that long, and
memory it holds for a revalidation that may never come goes back to the entries that are served
(held entries count against ``capacity`` and are evicted like any other)."""
HITS_SAMPLE = 4096
"""Above this many entries, periodic callers (the presence record, metrics) get the hits of live
entries *estimated* from this many of them (:meth:`NearCache.hits_estimate`): summing a
million counters took 11-16 ms, a read stall every presence interval."""
SWEEP_ABOVE = 4096
"""Flushes free at most this many entries at once (a few ms) between two timer ticks or probes;
a flushed bucket past that is *detached* (O(1)) and its entries freed by :meth:`NearCache.sweep`
in chunks, outside the map's guard between them: freeing a million entries in one step (every
bucket restarted by one probe) held the guard and the GIL for 0.6-0.8 s, a read stall."""
SWEEP_CHUNK = 2048
"""How many detached entries one :meth:`NearCache.sweep` step takes out: about 1 ms under the
guard and as much to free them outside it; a reader waits for one or two such steps."""
COPY = object()
"""Marks an entry whose value is mutable: the hit path decodes ``raw`` afresh for every caller."""
ABSENT_VERSION = 0
"""The version an *absent marker* carries (an entry that says "the store has no such field").

A marker is an :class:`Entry` with ``value is COPY`` and ``raw is None`` (a real mutable entry
always has its bytes), so the hit path's existing ``value is not COPY`` test keeps a hit on an
immutable value at its cost, and the decode branch, taken only for mutable values, tells a
marker apart by ``raw is None`` (:func:`is_absent`).  A nil reply names no version, so the
marker carries 0, below every real version: any later message, own write or ``clear()`` of the
key (every version is at least 1) drops it, and a fill of any real value replaces it.  It lives
in its key's bucket like an entry, so leases, holds, flushes, detaching, sweeps, eviction and
``capacity`` treat it exactly as one; it has no TTL (an absent key has nothing to expire)."""


def is_absent(e: Entry) -> bool:
    """Whether ``e`` is an absent marker (see :data:`ABSENT_VERSION`)."""
    return e.raw is None and e.value is COPY


class Entry:
    """One cached key.  ``hits`` counts hits and doubles as the CLOCK eviction signal."""

    __slots__ = ("bucket", "deadline", "hits", "kc", "raw", "seen", "value", "version")

    def __init__(
        self, value: Any, raw: bytes | None, version: int, bucket: int, kc: type, deadline: float
    ) -> None:
        self.value = value
        self.raw = raw
        self.version = version
        self.bucket = bucket
        self.kc = kc
        self.deadline = deadline
        self.hits = 0
        self.seen = 0


@dataclass(slots=True, eq=False)  # identity: two fills of one key must never be confused
class FillToken:
    """A read (or write) in flight whose result may be installed if nothing newer was seen."""

    key: Key
    bucket: int
    gens: tuple[int, int]
    epoch: int | None  # the bucket's epoch as this server knew it when the fill began
    probes: int  # probes started before this fill began (see NearCache.tops)
    max_seen: float = 0


class BulkToken(NamedTuple):
    """What :meth:`NearCache.begin_bulk` saw of a bucket; the bulk read is installed only if
    the bucket still looks the same when it returns."""

    bucket: int
    feed_gen: int
    gen: int
    heard: int
    writes: int
    epoch: int | None  # the values of this epoch are the ones to install


@dataclass(slots=True)
class BulkRead:
    """A whole bucket, read and decoded outside the lock for :meth:`NearCache.install_bulk`.

    Built by :meth:`add`, or inline by ``flows.bulk`` (the same fields: at a million entries a
    method call per entry counts).  str keys go in a dict: distinct fields are distinct str
    keys, and a bucket that has only those can be installed whole by :meth:`dict.update`."""

    entries: dict[Key, Entry] = field(default_factory=dict)  # str keys, of the token's epoch
    others: list[tuple[Key, Entry]] = field(default_factory=list)  # other keys, of that epoch
    foreign: list[tuple[Key, Entry]] = field(default_factory=list)  # of another epoch
    expiring: list[Key] = field(default_factory=list)  # keys in ``entries`` with a deadline
    top: int = 0  # the highest version in ``entries`` and ``others``

    def add(self, token: BulkToken, key: Key, e: Entry, epoch: int) -> None:
        if epoch != token.epoch:
            self.foreign.append((key, e))
            return
        self.top = max(self.top, e.version)
        if key.__class__ is not str:
            self.others.append((key, e))
            return
        self.entries[key] = e
        if e.deadline != INF:
            self.expiring.append(key)

    def __len__(self) -> int:
        """Entries of the token's epoch (the ones to install)."""
        return len(self.entries) + len(self.others)


@dataclass(slots=True)
class BucketState:
    known: bool = False
    epoch: int | None = None
    seq: int = 0
    lease_until: float = -INF
    gen: int = 0
    top: int = 0  # highest version cached in this bucket since it was last (re)started
    heard_at: float = -INF  # when a message last told us this bucket's epoch and sequence
    targets: list[tuple[int, float, str | None]] = field(default_factory=list)  # probes to
    # reach: (seq, sent_at, the store's digest there)
    heard: int = 0  # messages applied to this bucket (a bulk fill checks none came meanwhile)
    ahead: dict[int, tuple[int, str]] = field(default_factory=dict)  # unordered feeds: first
    # seq -> (last seq, chain link) of messages that arrived before an earlier one; ``seq``
    # stays the contiguous high-water mark
    digest: str | None = None  # the digest chain at ``seq`` (wire.next_digest); None: unknown
    # (a gap, or an epoch learned from a reply): the next probe at ``seq`` restarts the bucket
    confirmed_at: float = -INF  # send time of the probe that gave ``lease_until``
    replied_at: float = -INF  # send time of the newest probe that read this bucket
    repair_from: float | None = None  # a probe sent at or after this time repairs the bucket
    stale_until: float = -INF  # lapsed in an outage: entries servable stale until then
    held_since: float = -INF  # lapsed (a pause): entries kept but NOT served since then, until
    # a probe revalidates the bucket (``NearCache._renew``) or restarts it; -INF: not held
    doubt: bool = False  # vouches may not renew it until a probe has (see NearCache.on_vouch)
    touch_heard: int = 0  # ``heard`` at the store's last word that the bucket's data changed


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen on the feed: which key, what happened, its version and the writing server."""

    key: Key | None
    op: str
    version: int
    origin: str


@dataclass(slots=True)
class Guards:
    """Protections that tests switch off (one at a time) to prove their scenario catches the bug."""

    fill_race: bool = True
    gaps: bool = True
    probe: bool = True
    epoch: bool = True
    # Store-side protections (eviction, issue 12): passed to the write scripts as ARGV[8]
    # (store/scripts.py ``off``), never read by the near cache itself.
    fence_missing_refuses: bool = True  # a lost fence counter refuses fenced writes
    ver_epoch: bool = True  # 'ver' conditions (transform, CAS retry) compare epoch and version
    bookkeeping_in_data: bool = True  # epoch/seq live in the data hash (layout 2), not apart
    settings_stamp: bool = True  # buckets stamped with another map's settings refuse writes,
    # and a map opened without its meta key adopts the stamps' settings
    damage_isolated: bool = True  # a damaged bucket fails its own probe only, not the map's
    # Protocol v2 (issue 12 §3): the digest chain is compared with the probe's (here), and a
    # map with a signing key drops messages without a valid MAC (engine.py).
    digest_chain: bool = True
    message_mac: bool = True
    # Outages (serve_stale mode): stale entries only while no probe came back, and only until
    # ``max_stale_age`` after the bucket's last confirmation.  Off: any lapse keeps them, unbounded.
    stale_bound: bool = True
    # Cluster stream route (target '!S'): a bucket whose sharded channel came back replays its
    # log instead of being flushed (feed/bucketlog.py).  Off: it is flushed, as without a log.
    log_replay: bool = True
    # Revalidation (issue 16): a lapsed lease keeps the bucket's entries unserved until the next
    # probe renews it (sequence and digest unchanged) or restarts it.  Off: a lapse flushes.
    revalidate: bool = True
    # PING leases (MapConfig.ping_leases): a vouch counts once the PING's reply arrived after
    # the messages before it.  Off: the subscriber vouches when it *sends* the PING, the bug a
    # silent feed (S08) must catch.  Read by the subscriber (feed/pubsub.py), not the core.
    pong: bool = True

    def script_flags(self) -> str:
        """The letters of the store-side protections switched off (ARGV[8] of the scripts)."""
        switches = (
            ("f", self.fence_missing_refuses),
            ("v", self.ver_epoch),
            ("m", self.bookkeeping_in_data),
            ("s", self.settings_stamp),
        )
        return "".join(c for c, on in switches if not on)


@dataclass(slots=True)
class Counters:
    misses: int = 0
    invalidations: int = 0
    resyncs: int = 0
    gaps: int = 0
    epoch_changes: int = 0
    lost_detected: int = 0
    lease_lapses: int = 0
    idle_lapses: int = 0  # lapses while the map was idle (leasing.py): by design, not trouble
    evictions: int = 0
    expirations: int = 0
    fills_rejected: int = 0
    messages: int = 0
    corrupt_messages: int = 0
    hits_retired: int = 0
    gap_overflows: int = 0  # a bucket held MAX_AHEAD early messages: flushed, forgotten
    corrupt_entries: int = 0  # stored entries skipped by whole-map reads (the driver counts)
    digest_mismatches: int = 0  # a probe's digest at our sequence differed: flushed, restarted
    forged_messages: int = 0  # unsigned or badly signed messages dropped (the driver counts)
    stale_reads: int = 0  # reads served stale during an outage (serve_stale mode, :meth:`cached`)
    # Buckets whose sharded channel came back after a loss, on a map with bucket logs (the
    # stream route on a Cluster): repaired by replaying the log (not flushed), the log entries
    # applied doing so, and those the log could not cover (left to the flush).  The feed
    # driver counts them (changes.py ``bucket_replayed``).
    log_replays: int = 0
    log_replayed_messages: int = 0
    log_replay_fallbacks: int = 0
    revalidations: int = 0  # held buckets a probe renewed with their entries (no refill)
    held_expired: int = 0  # held buckets flushed because no probe decided within ``hold_limit``
    vouches: int = 0  # subscriber PINGs answered that renewed leases (:meth:`NearCache.on_vouch`)
    doubts: int = 0  # buckets a vouch may not renew until a probe has (a touch, a duplicate, ...)
    detached: int = 0  # flushed buckets left for the timer to free (NearCache.sweep)
    absent_fills: int = 0  # absent markers installed (a read found no field: fill_absent)


def _unsettled(b: BucketState) -> bool:
    """The bucket is in a state only a probe settles: not known yet, awaiting repair after a
    reconnect, behind a probe's target, in doubt, held stale in an outage, or holding early
    messages aside.  A vouch renews none of these (:meth:`NearCache.on_vouch`)."""
    return bool(
        not b.known or b.repair_from is not None or b.targets or b.doubt
        or b.stale_until != -INF or b.ahead
    )  # fmt: skip


class NearCache:
    """Coherence state of one map on one server."""

    def __init__(
        self,
        buckets: int,
        *,
        capacity: int = 100_000,
        max_staleness: float = 1.0,
        margin: float | None = None,
        grace: float | None = None,
        guards: Guards | None = None,
        ordered: bool = True,
        max_stale_age: float = 0.0,
        holds: bool = True,
        sweep_above: int | None = SWEEP_ABOVE,
        absent: bool = True,
    ) -> None:
        self.entries: dict[Key, Entry] = {}
        self.cache_absent = absent
        """Whether a read that finds no field installs an absent marker (:meth:`fill_absent`)."""
        self.absent = 0
        """How many of ``entries`` are absent markers (detached ones included until swept):
        ``statistics().entries`` leaves them out and counts them apart."""
        self.holds = holds
        """Whether a lapsed bucket may be *held* (kept unserved for a probe to revalidate).
        False for ``MapConfig(fast_hits=True)``: its hit path reads no clock, so only an entry
        that is gone is not served, and a lapse must flush."""
        self._held: list[set[Key]] = [set() for _ in range(buckets)]
        """The keys of ``entries`` per bucket, so a bucket's flush or clear touches that
        bucket's entries only (not the whole cache: at a million entries a resync of every
        bucket scanned it once per bucket).  Kept by the two installs, :meth:`_remove` and
        :meth:`_evict`, the only places ``entries`` changes.  An entry whose key is not in its
        bucket's set is *detached* (:meth:`_flush`): dead, never served, gone at the next
        :meth:`sweep` (:meth:`_live`)."""
        self.sweep_above = sweep_above
        """A flush of more entries than this detaches them for :meth:`sweep` to free; None:
        never (``MapConfig(fast_hits=True)``: its hit path does not read ``valid_until``, so
        an entry must be gone from ``entries`` to be unservable)."""
        self._step_freed = 0  # entries flushes freed at once since the last tick or probe
        self._detached: list[set[Key]] = []
        """Key sets of flushed buckets whose entries :meth:`sweep` has not freed yet.  While any
        is left, ``valid_until`` is in the past (:meth:`_revalidate`)."""
        self.max_stale_age = max_stale_age
        """0: strict (a lapsed lease holds its bucket unserved).  More: serve_stale mode."""
        self.hold_limit = max(HOLD_LEASES * max_staleness, max_stale_age)
        """How long a held bucket waits for a probe to decide before it is flushed anyway."""
        self.ordered = ordered
        """``True``: messages of a bucket arrive in version order, so a jump means a loss and the
        bucket is flushed at once.  ``False`` (relayed feeds): a jump may be a reordering; the
        bucket's ``seq`` advances only over contiguous versions, so a probe is confirmed only once
        every earlier message arrived, and a message that never comes is caught by the probe's
        grace period like any other loss."""
        self.buckets = [BucketState() for _ in range(buckets)]
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.margin = min(0.05, max_staleness / 10) if margin is None else margin
        self.grace = max_staleness / 4 if grace is None else grace
        self.guards = guards or Guards()
        self.counters = Counters()
        self._pending: dict[Key, list[FillToken]] = {}
        self._ttl: list[tuple[float, int, Key]] = []
        self.reap_until = -INF
        """The latest deadline of a TTL'd entry this server cached or wrote.  The store removes
        an expired entry, and publishes its 'expire' change, only when a probe reaps it, so with
        PING leases (which skip the periodic probe) the driver keeps probing until shortly after
        this (``leasing.Leasing.may_skip``)."""
        self._feed_gen = 0
        self._probes = 0
        self._writes = 0  # this server's own acknowledged writes (a bulk fill checks none came)
        self._hits_shown = 0  # the largest hits_estimate() returned (it never goes back)
        self._answered = -INF  # send time of the newest probe that read any bucket
        self._down = False  # between on_feed_down and on_feed_up: no vouch counts
        self.fresh_until = -INF
        """Every cached entry may be served until then (earliest lease or TTL deadline, less
        ``margin``; -inf while a bucket is stale or held)."""
        self.check_at = INF
        self.idle_after = INF
        """When the map goes idle (``Leasing.demand`` keeps it; INF: never): a lease that
        lapses after it is counted in ``idle_lapses``, not ``lease_lapses``."""
        """When the sync map's slow path next lets the feed's thread run (``SyncMap`` sets it,
        :meth:`recheck`; docs/design.md, "CPU-bound readers").  +inf: never (the default)."""
        self.valid_until = -INF
        """``min(fresh_until, check_at)``: the hit path compares the clock with this one number,
        so a process resumed from a pause (SIGSTOP, a long GIL-holding call) never serves what
        expired meanwhile, and a thread spinning on hits reaches the slow path by ``check_at``."""

    # ---- fills -------------------------------------------------------------------------------

    def begin_fill(self, key: Key, bucket: int) -> FillToken:
        """Call *before* sending the read or write whose result may be cached."""
        b = self.buckets[bucket]
        token = FillToken(key, bucket, (self._feed_gen, b.gen), b.epoch, self._probes)
        self._pending.setdefault(key, []).append(token)
        return token

    def abort_fill(self, token: FillToken) -> None:
        tokens = self._pending.get(token.key)
        if tokens is not None:
            if token in tokens:
                tokens.remove(token)
            if not tokens:
                del self._pending[token.key]

    def complete_fill(
        self, token: FillToken, now: float, version: int, value: Any, raw: bytes | None,
        deadline: float = INF, epoch: int | None = None,
    ) -> bool:  # fmt: skip
        """Install ``value`` at ``version`` if that cannot be stale; returns whether it was.

        ``epoch`` (from the stored value's header) lets a read notice a new epoch first: after a
        FLUSHALL the store's k@2 must not lose to our cached k@7 of the old epoch.
        """
        self.abort_fill(token)
        b = self.buckets[token.bucket]
        if epoch and epoch != b.epoch and self.guards.epoch:
            # News only if nothing happened to the bucket while the fill was out: otherwise it may
            # have read the epoch before a FLUSHALL we have already heard about (even one that
            # took the bucket from no epoch to E1 and back to none, so compare generations too).
            if token.epoch != b.epoch or token.gens != (self._feed_gen, b.gen):
                return self._refuse(token, version, other_epoch=True)
            self.learn_epoch(token.bucket, epoch, version, now)
            token.gens = (self._feed_gen, b.gen)
        if (
            (token.max_seen > version and self.guards.fill_race)
            or token.gens != (self._feed_gen, b.gen)
            or token.probes != self._probes
            or now >= b.lease_until - self.margin
            or deadline <= now
        ):
            return self._refuse(token, version, other_epoch=bool(epoch) and epoch != b.epoch)
        old = self.entries.get(token.key)
        if old is not None:
            # A detached entry (its bucket flushed, not swept yet) is no longer the key's
            # state as far as the cache knows: replaced, never taken for a newer value.
            if old.version >= version and self._live(token.key, old):
                return True
            self._remove(token.key, old)
        if deadline != INF:  # before the entry is visible: the hit path reads valid_until first
            heapq.heappush(self._ttl, (deadline, version, token.key))
            self.reap_until = max(self.reap_until, deadline)
            self._lower(deadline - self.margin)
        entry = Entry(value, raw, version, token.bucket, token.key.__class__, deadline)
        self.entries[token.key] = entry
        self._held[token.bucket].add(token.key)
        b.top = max(b.top, version)
        if len(self.entries) > self.capacity:
            self._evict()
        return True

    # ---- bulk fills (``SyncMap.preload``) ----------------------------------------------------

    def begin_bulk(self, bucket: int) -> BulkToken:
        """Call *before* reading a whole bucket; pass the result to :meth:`install_bulk`."""
        b = self.buckets[bucket]
        return BulkToken(bucket, self._feed_gen, b.gen, b.heard, self._writes, b.epoch)

    def complete_bulk(
        self, token: BulkToken, now: float,
        entries: Iterable[tuple[Key, int, int, Any, bytes | None, float]],
    ) -> int:  # fmt: skip
        """:meth:`install_bulk` of (key, version, epoch, value, raw, deadline) tuples."""
        read = BulkRead()
        for key, version, epoch, value, raw, deadline in entries:
            read.add(token, key, Entry(value, raw, version, token.bucket, key.__class__, deadline),
                     epoch)  # fmt: skip
        return self.install_bulk(token, now, read)

    def install_bulk(self, token: BulkToken, now: float, read: BulkRead) -> int:
        """Install a whole bucket read at once, or nothing; returns how many were installed.

        Why all or nothing, in the order of events it prevents: a per-key fill is protected by
        noting every version seen for its key while it is out (the fill race, A2); a bulk read
        has no keys to note until it returns.  So it is installed only if *nothing* reached this
        bucket while it was out: no change message (``heard``), no repair or flush (``gen``,
        ``feed_gen``), none of this server's own writes, no new epoch (the token holds all
        five).  Unlike a fill it need not fear a probe (:meth:`tops`): it installs only values
        of the bucket's known epoch, and a store that restarted or was flushed meanwhile shows a
        probe another epoch (or none), which restarts the bucket and so changes ``gen``.
        Then every value read is at least as new as anything this server has seen, exactly as
        for a fill.  A value of another epoch than the bucket's is not installed (its version
        is not comparable); ``read.foreign`` has them.
        """
        bucket = token.bucket
        b = self.buckets[bucket]
        if token != self.begin_bulk(bucket) or now >= b.lease_until - self.margin:
            return 0
        held, entries = self.entries, read.entries
        room = self.capacity - len(held)
        if room < len(read) and self._detached:  # detached entries make room first
            self.sweep(len(read) - room)
            room = self.capacity - len(held)
        index = self._held[bucket]
        # Nothing of this bucket cached, every key a str, room for all: nothing to compare with
        # (a str key lives in its own bucket only), so the bucket goes in with two C-level
        # updates instead of a Python step per entry.  Not so for other keys: 1, 1.0 and True
        # are one dict key but three stored fields, maybe in three buckets.  Nor while detached
        # entries are left (one may be this key's, to be retired, not overwritten).
        if not read.others and not index and not self._detached and len(entries) <= room:
            return self._install_whole(b, index, now, read)
        installed, top, fresh = 0, b.top, not index and not self._detached
        for key, e in read.foreign:  # another epoch: only an older cached value goes
            if not (fresh and key.__class__ is str) and (old := held.get(key)) is not None:
                if old.version >= e.version and self._live(key, old):
                    continue
                self._remove(key, old)
                room += 1
        for key, e in chain(entries.items(), read.others):
            if installed >= room:
                break
            if not (fresh and key.__class__ is str) and (old := held.get(key)) is not None:
                if old.version >= e.version and self._live(key, old):
                    continue
                self._remove(key, old)
                room += 1
            if e.deadline <= now:
                continue
            if e.deadline != INF:
                self._expire_at(e.deadline, e.version, key)
            held[key] = e
            index.add(key)
            top = e.version if e.version > top else top
            installed += 1
        b.top = top
        return installed

    def _install_whole(self, b: BucketState, index: set[Key], now: float, read: BulkRead) -> int:
        """:meth:`install_bulk`'s shortcut: every entry of ``read`` goes in."""
        entries, top = read.entries, read.top
        for key in read.expiring:  # TTLs first: the hit path reads valid_until first
            e = entries[key]
            if e.deadline <= now:
                del entries[key]
                top = -1  # ``top`` is of what is cached (as the per-entry path counts it)
            else:
                self._expire_at(e.deadline, e.version, key)
        if top < 0:
            top = max((e.version for e in entries.values()), default=0)
        self.entries.update(entries)
        index.update(entries)
        b.top = max(b.top, top)
        return len(entries)

    def _expire_at(self, deadline: float, version: int, key: Key) -> None:
        """Schedule an entry's TTL; call before the entry is visible."""
        heapq.heappush(self._ttl, (deadline, version, key))
        self._lower(deadline - self.margin)
        self.reap_until = max(self.reap_until, deadline)

    def _refuse(self, token: FillToken, version: int, *, other_epoch: bool) -> bool:
        """Do not install a read's value; returns False.

        The caller still hands that value out, so an older one left cached would be served next
        (monotonic reads, C4): drop it.  A value of another epoch is not comparable by version
        (after a restart both may be k@1), so then drop whatever is cached.  Costs at most a miss.
        """
        self.counters.fills_rejected += 1
        old = self.entries.get(token.key)
        if old is not None and (old.version < version or other_epoch):
            self._remove(token.key, old)
        return False

    def wrote(
        self, token: FillToken, now: float, version: int, value: Any = None,
        raw: bytes | None = None, deadline: float = INF, *, deleted: bool = False,
        epoch: int | None = None,
    ) -> None:  # fmt: skip
        """This server's own write took ``version``: read-your-writes.

        Order it prevents: thread 1 starts a fill of k (HGET reads k@4); thread 2 sets k -> k@5
        and returns; thread 1's reply arrives and installs k@4; thread 2 reads k@4, older than its
        own write.  So every other fill in flight for k is told about version 5 right here, before
        the writer returns, and the writer's value is installed if nothing newer was seen.
        """
        self.abort_fill(token)
        b = self.buckets[token.bucket]
        if epoch is not None and epoch != b.epoch and self.guards.epoch:
            if token.epoch != b.epoch or token.gens != (self._feed_gen, b.gen):
                # Our epoch changed while the write was out (Redis restarted or was flushed and
                # we heard of it): the write belongs to a past epoch.  Cache nothing of it.
                self.drop(token.key)
                return
            self.learn_epoch(token.bucket, epoch, version, now)
            token.gens = (self._feed_gen, b.gen)  # the flush was for the old epoch's entries
        self.note_write(token.key, version)
        if deadline != INF and deadline > self.reap_until:
            self.reap_until = deadline  # even if nothing is installed: someone must reap it
        if not deleted:
            self.complete_fill(token, now, version, value, raw, deadline)

    def note_write(self, key: Key, version: int) -> None:
        """A write of ``key`` at ``version`` is acknowledged: nothing older may stay or arrive."""
        self._writes += 1
        e = self.entries.get(key)
        if e is not None and e.version < version:
            self._remove(key, e)
        if self.guards.fill_race:
            for token in self._pending.get(key, ()):
                token.max_seen = max(token.max_seen, version)

    def learn_epoch(self, bucket: int, epoch: int, version: int, now: float) -> bool:
        """A reply (write) or a stored value (read) says the bucket is in ``epoch`` at ``version``.

        Returns whether the bucket's epoch changed (fills begun before are then cancelled).

        Order it prevents: this server caches k@7 (epoch E); FLUSHALL; this server writes k and
        gets k@1 in epoch E'.  Comparing 1 with 7 would keep k@7, so a new epoch in a reply
        flushes what the bucket holds first.  Nothing here advances ``seq``: the messages up to
        ``version`` may still be on their way.
        """
        b = self.buckets[bucket]
        if not b.known or epoch == b.epoch or not self.guards.epoch:
            return False
        if b.epoch is not None or b.top > 0:
            self.counters.epoch_changes += 1
            self._flush(bucket)
        b.epoch, b.seq, b.targets = epoch, max(version - 1, 0), []
        b.digest = "" if version <= 1 else None  # a new epoch's chain starts from ""
        b.heard_at = now  # newer than any probe still in flight
        return True

    def cleared(self, bucket: int, version: int) -> None:
        """This server cleared ``bucket`` at ``version``."""
        self._writes += 1
        self._clear_bucket(bucket, version)

    def fill_absent(self, token: FillToken, now: float | None = None) -> bool:
        """The store said the key is absent: whatever we hold for it is older than that read.
        At ``now`` (None: install nothing) cache that as an *absent marker* (version
        :data:`ABSENT_VERSION`) if it cannot be stale; returns whether it was installed.

        Other fills of the key still in flight may carry a value older than this "absent" (a
        delete whose message has not arrived yet): they must not install it after us (C4).

        The marker passes the gate a value fill passes (A2), in the order of events it
        prevents::

            server B: begin_fill(k) -> sends HGET k            (k does not exist yet)
            server A: writes k -> version 5, publishes "k@5"
            server B: receives "k@5"  -> nothing cached to drop, but the pending fill notes 5
            server B: HGET reply (nil) arrives -> a nil reply names no version, so ANY noted
                      version may be newer than what it read: NOT installed

        Without the note B would cache "absent" after having applied k@5, and answer "no such
        key" from the cache until the next write of k.  The generation, probe and lease checks
        are those of :meth:`complete_fill` (a flush, a repair or a probe while it was out).
        """
        self.abort_fill(token)
        old = self.entries.get(token.key)
        if old is not None:
            self._remove(token.key, old)
        for other in self._pending.get(token.key, ()):
            other.max_seen = INF
        if now is None or not self.cache_absent or self.capacity <= 0:
            return False
        b = self.buckets[token.bucket]
        if (
            (token.max_seen > ABSENT_VERSION and self.guards.fill_race)
            or token.gens != (self._feed_gen, b.gen)
            or token.probes != self._probes
            or now >= b.lease_until - self.margin
        ):
            self.counters.fills_rejected += 1
            return False
        key = token.key
        self.entries[key] = Entry(COPY, None, ABSENT_VERSION, token.bucket, key.__class__, INF)
        self._held[token.bucket].add(key)
        self.absent += 1
        self.counters.absent_fills += 1
        if len(self.entries) > self.capacity:
            self._evict()
        return True

    def forget_bucket(self, bucket: int) -> None:
        """A write of unknown outcome touched keys of ``bucket`` we cannot name (a ``clear()``
        part whose master hung): forget every entry of it, and refuse the fills in flight (a
        new generation), as :meth:`drop` does for one key.  Its lease is left as it is (not to
        be confused with ``BucketState.doubt``, which only keeps vouches from renewing it)."""
        self._flush(bucket, count=False)

    def drop(self, key: Key) -> None:
        """Forget ``key`` (unknown write outcome): neither it nor a fill in flight stays."""
        old = self.entries.get(key)
        if old is not None:
            self._remove(key, old)
        for token in self._pending.get(key, ()):
            token.max_seen = INF

    # ---- the feed ----------------------------------------------------------------------------

    def on_message(self, msg: ChangeMessage, now: float, want_events: bool = False) -> list[Event]:
        """Apply one change message; returns the events for subscribers when asked."""
        self.counters.messages += 1
        if msg.op == OP_PING or msg.bucket >= len(self.buckets):
            return []
        if msg.oversized:  # too many keys to apply one by one: the bucket is in doubt
            if self.buckets[msg.bucket].known:
                self._flush(msg.bucket)
            return []
        keys = [decode_key(f) for f in msg.fields]  # CorruptData here leaves every state untouched
        b = self.buckets[msg.bucket]
        b.heard += 1
        if b.known:
            self._sequence(msg.bucket, msg)
            b.heard_at = now
        if msg.op == OP_CLEAR:
            self._clear_bucket(msg.bucket, msg.seq)
            self._confirm(msg.bucket)
            return [Event(None, "clear", msg.seq, msg.origin)] if want_events else []
        events = []
        op = OP_NAMES[msg.op]
        for i, key in enumerate(keys):
            self._invalidate(key, msg.seq + i)
            if want_events:
                events.append(Event(key, op, msg.seq + i, msg.origin))
        self._confirm(msg.bucket)
        return events

    def _sequence(self, i: int, msg: ChangeMessage) -> None:
        """Gap and epoch detection for one message of a bucket we track."""
        b = self.buckets[i]
        if msg.epoch != b.epoch:
            b.ahead.clear()
            if b.epoch is None and msg.seq == 1 and not b.top:
                b.epoch = msg.epoch  # the bucket's very first write, and nothing cached
            elif self.guards.epoch:
                self.counters.epoch_changes += 1
                self._flush(i)
                b.epoch = msg.epoch
            b.seq = msg.last_seq
            b.digest = next_digest("", link(msg)) if msg.seq == 1 else None
            return
        if msg.last_seq <= b.seq:
            # A duplicate: already accounted for (and chained).  On an ordered feed none comes
            # twice, so it may be a forgery that took the real message's sequence first: only
            # a probe's digest can tell, so no vouch renews the bucket until one has.
            if self.ordered:
                self._doubt(b)
            return
        if msg.seq > b.seq + 1 and self.guards.gaps:
            if not self.ordered:
                self._keep_ahead(i, msg)
                return
            self.counters.gaps += 1
            self._flush(i)
        self._extend(b, msg.seq, msg.last_seq, link(msg))
        self._catch_up(i)

    @staticmethod
    def _extend(b: BucketState, first: int, last: int, link_hex: str) -> None:
        """Account for versions ``first .. last`` of one message and chain its link; a message
        that does not continue ``seq`` exactly leaves the digest unknown."""
        if first == b.seq + 1 and b.digest is not None:
            b.digest = next_digest(b.digest, link_hex)
        else:
            b.digest = None
        b.seq = last

    def _keep_ahead(self, i: int, msg: ChangeMessage) -> None:
        """Keep an early message of an unordered feed aside, at most :data:`MAX_AHEAD` a bucket."""
        b = self.buckets[i]
        if len(b.ahead) >= MAX_AHEAD and msg.seq not in b.ahead:
            self.counters.gap_overflows += 1
            b.ahead.clear()  # seq stays behind: no probe is confirmed until one restarts it
            self._flush(i)
        have = b.ahead.get(msg.seq)
        if have is None or have[0] < msg.last_seq:
            b.ahead[msg.seq] = (msg.last_seq, link(msg))

    def _catch_up(self, i: int) -> None:
        """Advance over messages that arrived early and now continue the contiguous run, checking
        probe targets at each step (a target's sequence is a message boundary)."""
        b = self.buckets[i]
        while b.ahead:
            first = min(b.ahead)
            if first > b.seq + 1:
                return
            last, link_hex = b.ahead.pop(first)
            if last > b.seq:
                self._extend(b, first, last, link_hex)
                self._confirm(i)

    def _invalidate(self, key: Key, version: int) -> None:
        e = self.entries.get(key)
        if e is not None and e.version < version:
            self._remove(key, e)
            self.counters.invalidations += 1
        if self.guards.fill_race:
            for token in self._pending.get(key, ()):
                token.max_seen = max(token.max_seen, version)

    def _clear_bucket(self, bucket: int, version: int) -> None:
        entries = self.entries
        doomed = [k for k in self._held[bucket] if entries[k].version < version]
        for k in doomed:
            self._remove(k, entries[k])
        self.counters.invalidations += len(doomed)
        self.buckets[bucket].gen += 1

    def on_feed_down(self) -> None:
        """The subscription dropped: messages may be lost until it is back."""
        self._feed_gen += 1
        self._down = True

    def on_feed_up(self, now: float = -INF, buckets: Iterable[int] | None = None) -> None:
        """Re-subscribed and confirmed at ``now``: the first probe *sent* after that repairs
        (flushes every bucket that moved at once).  A probe sent before it cannot: the messages it
        would have to account for were published after it read the sequences.

        ``buckets``: only those may have lost messages (a feed with a channel per bucket lost
        some channels, the others stayed subscribed); None: every bucket.  Order it spares: a
        bucket whose channel stayed up is written, the probe reads its new sequence while the
        message is still on the way; the message will come, and flushing it would cost hits."""
        self._down = False
        for i in range(len(self.buckets)) if buckets is None else buckets:
            self.buckets[i].repair_from = now

    def epoch_snapshot(self, bucket: int) -> tuple[int | None, int, int]:
        """What a multi-key write (update, clear) records before sending, see learn_epoch_if."""
        b = self.buckets[bucket]
        return b.epoch, b.gen, self._feed_gen

    def learn_epoch_if(
        self, bucket: int, epoch: int, version: int, now: float,
        before: tuple[int | None, int, int],
    ) -> None:  # fmt: skip
        """Learn ``epoch`` from a reply only if the bucket did not change while it was out (the
        same rule fills and single-key writes follow: an old reply must not roll a bucket back)."""
        if self.epoch_snapshot(bucket) == before:
            self.learn_epoch(bucket, epoch, version, now)

    # ---- probes and time ---------------------------------------------------------------------

    def tops(self) -> list[int]:
        """Each bucket's highest cached version; the driver takes this just before a probe.

        Taking it also marks every fill in flight as unfit to install.  Order it prevents: a
        read fetches k@1; FLUSHALL; a probe starts (its ``tops`` cannot include k@1, not cached
        yet) and confirms the empty bucket; the read's reply arrives.  Nothing would ever show
        k@1 stale.  Fills are microseconds and probes a quarter of ``max_staleness`` apart, so
        this refuses about one fill in several thousand.
        """
        self._probes += 1
        return [b.top for b in self.buckets]

    def on_probe(
        self, states: Sequence[ProbeState | None], sent_at: float, now: float,
        tops: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """Apply the ``(epoch, seq[, digest])`` of every bucket, read by a probe sent at
        ``sent_at``.  ``None``: that bucket's probe did not run (on a Cluster, its master is
        down or its slot moving): it is left as it is, so its lease runs out (:meth:`tick`)
        while the buckets that answered are renewed.

        The digest (the store's digest chain) closes the hole a lost message leaves open to a
        forger.  Order it prevents: a writer dies between its write (version N of key k) and the
        publish (relayed feed); a forger publishes version N naming another key; this server
        applies it and reaches N; the probe reads N.  By sequence alone the bucket is up to date
        and k stays stale forever.  Our chain at N includes the forged message, the store's the
        real one: they differ, so the bucket is restarted (``digest_mismatches``).  A reader
        ahead of or behind the probe compares when it reaches that sequence (:meth:`_confirm`).

        ``tops`` (from :meth:`tops` taken before sending) catches a store that went backwards
        while looking unchanged.  Order it prevents (A7): this server writes k -> k@1 and caches
        it; Redis dies before k@1's message reaches anyone and restarts empty; bucket and store
        both read (no epoch, seq 0), so without ``tops`` the probe would confirm k@1 forever.
        """
        self._step_freed = 0  # one probe restarting every bucket frees at most sweep_above at once
        answered = any(state is not None for state in states)
        self._answered = max(self._answered, sent_at) if answered else self._answered
        for i, state in enumerate(states):
            if state is None:  # a bucket left out keeps its repair for the next probe
                self._unanswered(i, sent_at)
                continue
            epoch, seq = state[0], state[1]
            digest = state[2] if len(state) == 3 else None
            b = self.buckets[i]
            b.replied_at = max(b.replied_at, sent_at)
            repair = b.repair_from is not None and sent_at >= b.repair_from
            if repair:
                b.repair_from = None
            # A message heard after this probe left knows better than the probe: the probe read
            # (no epoch, 0), then the bucket's first write's message taught us epoch E; the
            # reply must not undo that.  A restart after that message shows up in the next
            # probe, or in the next message (which must carry the new epoch).
            overtaken = b.heard_at > sent_at
            seq_went_back = (tops is not None and seq < tops[i] and self.guards.epoch) or (
                seq < b.seq and not overtaken
            )
            if not self.guards.probe:
                if not b.known:
                    b.known, b.epoch, b.seq, b.digest = True, epoch, seq, digest
                b.lease_until, b.stale_until, b.held_since = INF, -INF, -INF
                continue
            changed = epoch != b.epoch and not overtaken and self.guards.epoch
            if changed and b.epoch is None and not b.top and b.known and not seq_went_back:
                # The bucket's first writes since we looked, and nothing cached: follow them
                # (their messages may still be on the way) instead of flushing, which would
                # cancel fills in flight for nothing.
                b.epoch, changed = epoch, False
            if not b.known or changed or seq_went_back:
                if b.known and b.epoch is not None:
                    self.counters.epoch_changes += 1
                self._restart_bucket(i, epoch, seq, sent_at, digest)
            elif seq > b.seq:
                b.targets.append((seq, sent_at, digest))
                overdue = b.targets[0][1] + self.grace <= now
                # A stale bucket that moved during an outage: its messages may be lost, so it is
                # repaired as after a reconnect, at once (its entries must not outlive Δ).
                if repair or overdue or b.stale_until != -INF:
                    self.counters.lost_detected += 1
                    self._restart_bucket(i, epoch, seq, sent_at, digest)
            elif seq == b.seq and self._chain_differs(b, seq, digest):
                self._mismatch(i, seq, sent_at, digest)
            else:
                self._renew(b, sent_at)
                b.targets.clear()
        self._revalidate()

    def _unanswered(self, i: int, sent_at: float) -> None:
        """A probe sent at ``sent_at`` read other buckets but not ``i`` (its Cluster master is
        down or its slot moving): a held bucket ``i`` is flushed (see :meth:`_hold`)."""
        if self.buckets[i].held_since != -INF and self._answered >= sent_at:
            self._flush(i, count=False)

    def _renew(self, b: BucketState, sent_at: float) -> None:
        """A probe sent at ``sent_at`` vouches for the bucket: its lease runs to ``sent_at + Δ``
        (and a bucket served stale in an outage is current again).  A probe also settles any
        doubt that kept vouches from renewing it (it compared sequences and digests)."""
        if sent_at + self.max_staleness > b.lease_until:
            b.lease_until, b.confirmed_at = sent_at + self.max_staleness, sent_at
        b.stale_until = -INF
        if b.held_since != -INF:  # revalidated: its entries are served again, not refilled
            b.held_since = -INF
            self.counters.revalidations += 1
        b.doubt = False
        b.touch_heard = b.heard

    # ---- vouches: leases renewed by the subscriber connection (PING leases) ------------------

    def on_vouch(self, sent_at: float, buckets: Iterable[int] | None = None) -> bool:
        """The reply to a PING sent at ``sent_at`` on the subscriber connection has arrived, and
        every message received before it has been applied.  Renews the lease of each of
        ``buckets`` (None: all) that nothing puts in doubt to ``sent_at + Δ``; returns whether
        some bucket was left out for a reason only a probe settles (the driver then probes).

        Why it is sound (the in-script routes only: the write script publishes in the same
        atomic step as the write, on the channel this connection subscribes): Redis answers
        commands of one connection in order, and a message published before it ran the PING
        was written to this connection before the PONG.  So every write acknowledged before
        ``sent_at`` was published before the PING ran, its message came before the reply, and
        the bucket's ``seq`` accounts for it; a lost message would need a broken connection,
        which ``on_feed_down`` reports (no vouch counts until ``on_feed_up``, and that marks
        every bucket for repair by a probe).  A PING that is never answered renews nothing: a
        silent subscriber lets every lease lapse within Δ.

        Left out: a bucket not known yet (no probe has set its epoch and sequence), one
        awaiting repair after a reconnect (``repair_from``), one a probe found behind
        (``targets``: a message we have not seen), one in doubt (:meth:`on_touched`, a
        duplicate message), one held stale in an outage, and any bucket while the feed is down.
        """
        if self._down:
            return bool(self.buckets)
        wants_probe = False
        lease = sent_at + self.max_staleness
        for i in range(len(self.buckets)) if buckets is None else buckets:
            b = self.buckets[i]
            if _unsettled(b):
                wants_probe = True
                continue
            if lease > b.lease_until:  # a vouch confirms as a probe does (the outage rule)
                b.lease_until, b.confirmed_at = lease, sent_at
            if b.held_since != -INF:
                # Held after a lapse (a pause): the vouch proves what a probe reading our own
                # sequence proves, that every write acknowledged before ``sent_at`` was applied
                # as an invalidation, so the kept entries are current: served again.
                b.held_since = -INF
                self.counters.revalidations += 1
        self.counters.vouches += 1
        self._revalidate()
        return wants_probe

    def unsettled(self) -> bool:
        """Some bucket is in a state only a probe settles, the ones :meth:`on_vouch` leaves
        out (not known, awaiting repair, behind a probe's target, in doubt, held stale, early
        messages aside).  Read without the guard by the probe loop: a stale answer only moves
        the probe to the next turn."""
        return any(_unsettled(b) for b in self.buckets)

    def on_touched(self, bucket: int | None) -> None:
        """The store says the bucket's data changed (``None``: the whole database was flushed),
        on the subscriber connection, after the messages of the writes that changed it
        (CLIENT TRACKING's broadcast invalidation, sent once the event loop's commands ran).

        A write through the scripts sends its message first, so some message arrived since
        the last touch.  A touch with none means a change that published nothing (a write
        around the scripts, an eviction, FLUSHALL): the bucket is in doubt until a probe reads
        it.  A flush puts every bucket in doubt and needs a probe at once."""
        targets = range(len(self.buckets)) if bucket is None else (bucket,)
        for i in targets:
            if i >= len(self.buckets):
                continue
            b = self.buckets[i]
            if bucket is None or b.heard == b.touch_heard:
                self._doubt(b)
            b.touch_heard = b.heard

    def _doubt(self, b: BucketState) -> None:
        if not b.doubt:
            b.doubt = True
            self.counters.doubts += 1

    def _revalidate(self) -> float:
        """Set ``valid_until``; returns when :meth:`tick` has work next.  While any bucket is
        stale-servable, ``valid_until`` is in the past: every read takes the slow path, which
        flags and counts stale entries (:meth:`cached`)."""
        wake = self._ttl[0][0] if self._ttl else INF
        stale, any_stale = INF, False
        for b in self.buckets:
            if b.lease_until != -INF:
                wake = min(wake, b.lease_until)
            if b.stale_until != -INF:
                stale, any_stale = min(stale, b.stale_until), True
            if b.held_since != -INF:  # held entries are never hits: the slow path asks cached()
                stale, any_stale = min(stale, b.held_since + self.hold_limit), True
        # Detached entries are still in ``entries`` until swept: no hit until they are gone.
        self.fresh_until = -INF if any_stale or self._detached else wake - self.margin
        self.valid_until = min(self.fresh_until, self.check_at)
        return min(wake, stale) - self.margin

    def _lower(self, deadline: float) -> None:
        """An entry that expires at ``deadline`` is about to be installed."""
        self.fresh_until = min(self.fresh_until, deadline)
        self.valid_until = min(self.valid_until, deadline)

    def recheck(self, at: float) -> None:
        """The map's slow path has let the feed's thread run: hits may go on until ``at`` (or
        ``fresh_until``) before it runs again.  Under the map's guard, as every other write of
        ``valid_until``: a deadline lowered meanwhile by another thread is never raised back."""
        self.check_at = at
        self.valid_until = min(self.fresh_until, at)

    def _restart_bucket(
        self, i: int, epoch: int | None, seq: int, sent_at: float, digest: str | None = None
    ) -> None:
        b = self.buckets[i]
        if b.known:
            self._flush(i)
        if epoch != b.epoch:
            b.ahead.clear()
        else:  # messages past ``seq`` that already arrived still count (unordered feeds)
            b.ahead = {k: v for k, v in b.ahead.items() if v[0] > seq}
        b.known, b.epoch, b.seq, b.targets, b.top = True, epoch, seq, [], 0
        b.digest = digest
        b.doubt, b.touch_heard = False, b.heard
        self._catch_up(i)
        b.lease_until, b.confirmed_at, b.stale_until = sent_at + self.max_staleness, sent_at, -INF

    def _chain_differs(self, b: BucketState, seq: int, digest: str | None) -> bool:
        """Whether the store's ``digest`` at ``seq`` fails to vouch for what we applied up to
        ``b.seq``: it differs, or ours is unknown, or we passed ``seq`` in one step."""
        if digest is None or not self.guards.digest_chain:
            return False
        return seq != b.seq or b.digest != digest

    def _mismatch(self, i: int, seq: int, sent_at: float, digest: str | None) -> None:
        """Our chain at ``seq`` is not the store's: a message we applied was not the store's (a
        forgery standing in for a lost message), or ours was unknown.  Flush and adopt the
        store's state, as after a lost message."""
        b = self.buckets[i]
        if b.digest is not None:
            self.counters.digest_mismatches += 1
        self._restart_bucket(i, b.epoch, seq, sent_at, digest)
        self._revalidate()

    def _confirm(self, i: int) -> None:
        """Probes whose sequence we have now reached renew the lease, if our digest chain there
        is the store's (a probe we passed in one step cannot vouch: the next one will)."""
        b = self.buckets[i]
        renewed = False
        while b.targets and b.targets[0][0] <= b.seq:
            seq, sent_at, digest = b.targets.pop(0)
            if self._chain_differs(b, seq, digest):
                if seq == b.seq:
                    self._mismatch(i, seq, sent_at, digest)
                    return
                continue
            self._renew(b, sent_at)
            renewed = True
        if renewed:
            self._revalidate()

    def tick(self, now: float) -> float:
        """Expire entries and revoke lapsed leases; returns when to call again."""
        self._step_freed = 0
        while self._ttl and self._ttl[0][0] <= now + self.margin:
            _, version, key = heapq.heappop(self._ttl)
            e = self.entries.get(key)
            if e is not None and e.version == version:
                self._remove(key, e)
                self.counters.expirations += 1
        for i, b in enumerate(self.buckets):
            if b.lease_until not in (-INF, INF) and now >= b.lease_until - self.margin:
                if now >= self.idle_after:
                    self.counters.idle_lapses += 1
                else:
                    self.counters.lease_lapses += 1
                b.lease_until = -INF
                if self._keeps_stale(b):
                    bound = self.guards.stale_bound
                    b.stale_until = b.confirmed_at + self.max_stale_age if bound else INF
                else:
                    self._hold(i, now)
            if b.stale_until != -INF and now >= b.stale_until - self.margin:
                self._hold(i, now)
            if b.held_since != -INF and now >= b.held_since + self.hold_limit - self.margin:
                self.counters.held_expired += 1
                self._flush(i, count=False)
        return self._revalidate()

    def _hold(self, i: int, now: float) -> None:
        """The bucket may no longer be served: keep its entries unserved for the next probe to
        revalidate (see the module docstring), or flush it (nothing held, or the guard off)."""
        b = self.buckets[i]
        b.stale_until = -INF
        # Not when a probe read other buckets after this one's last answer: its own store (a
        # Cluster master) is down or its slot moving while the others answer.  Holding it would
        # send every read of the map down the slow path (valid_until) for as long as that lasts.
        lone = b.replied_at < self._answered
        if self.guards.revalidate and self.holds and self._held[i] and not lone:
            b.held_since = now
        else:
            self._flush(i, count=False)

    def _keeps_stale(self, b: BucketState) -> bool:
        """Whether a bucket whose lease just lapsed may be served stale (serve_stale mode).

        Only when no probe sent after the one that last confirmed it has read it: its store
        (on a Cluster, its master) is unreachable or hung.  Order it tells apart: a message is
        lost; the next probe comes back with a sequence we never reach, so the lease is not
        renewed and lapses.  That probe read the bucket (``replied_at`` > ``confirmed_at``):
        the store is up and the bucket is known to be behind, so it is flushed as in strict
        mode, never served stale.
        """
        if self.max_stale_age <= 0 or b.top <= 0:
            return False
        return b.replied_at <= b.confirmed_at or not self.guards.stale_bound

    def cached(self, key: Key, now: float) -> tuple[Entry, bool] | None:
        """The entry a read of ``key`` may serve at ``now`` without I/O, and whether it is
        stale; None: read the store.  The slow path's check in serve_stale mode: under its
        bucket's lease (as a hit would be), or stale-servable during an outage (counted)."""
        e = self.entries.get(key)
        if e is None or now >= e.deadline - self.margin or not self._live(key, e):
            return None
        b = self.buckets[e.bucket]
        if now < b.lease_until - self.margin:
            return e, False
        if now < b.stale_until - self.margin:
            self.counters.stale_reads += 1
            return e, True
        return None

    # ---- housekeeping ------------------------------------------------------------------------

    def _flush(self, bucket: int, count: bool = True) -> None:
        """Forget every entry of ``bucket`` and refuse its fills in flight (a new generation).

        Up to ``sweep_above`` entries per tick or probe are freed here.  Past that a bucket is
        *detached* in O(1): its key set is swapped for an empty one, which makes each of its
        entries dead (:meth:`_live`), and :meth:`sweep` frees them later in chunks, outside the
        guard in between (freeing a million entries here held the guard 0.6-0.8 s: every read
        that missed waited that long).  Order of events, all but the reader's under the guard:

        1. ``valid_until = -INF``, then the set is swapped and ``gen`` bumped.  A hit that read
           ``valid_until`` after step 1 goes to the slow path, where :meth:`cached` refuses dead
           entries.  A hit that read it before (a concurrent read) may still find the entry and
           serve it while the clock is below that old value: it was under its lease, exactly as
           a read that found the entry just before an immediate free would have served it.
        2. A fill begun before step 1 is refused (its ``gens``); one begun after it replaces
           the dead entry (:meth:`complete_fill` does not take it for a newer version), and a
           bulk fill likewise.  Invalidations, writes and expiries may remove a dead entry early.
        3. :meth:`sweep` removes a key's entry only if it is still dead: a fill installed after
           step 1 put the key in the bucket's new set, so it stays.
        4. When every detached set is swept, :meth:`_revalidate` lets hits resume.
        """
        keys = self._held[bucket]
        defer = self.sweep_above is not None and self._step_freed + len(keys) > self.sweep_above
        if defer:
            # Step 1, before the swap; fresh_until too, or a reader's recheck (feed_turn)
            # would raise valid_until back while the detached entries are still there.
            self.fresh_until = self.valid_until = -INF
        self._held[bucket] = set()
        if defer:
            self._detached.append(keys)
            self.counters.detached += 1
        else:
            self._step_freed += len(keys)
            entries, retired, absent = self.entries, 0, 0
            for k in keys:
                e = entries.pop(k)
                retired += e.hits
                if e.raw is None and e.value is COPY:  # is_absent, inline: a loop per entry
                    absent += 1
            self.counters.hits_retired += retired
            self.absent -= absent
        self.buckets[bucket].gen += 1
        self.buckets[bucket].top = 0
        self.buckets[bucket].stale_until = -INF
        self.buckets[bucket].held_since = -INF
        if count:
            self.counters.resyncs += 1

    def _remove(self, key: Key, e: Entry) -> None:
        del self.entries[key]
        self._held[e.bucket].discard(key)
        self.counters.hits_retired += e.hits
        if e.raw is None and e.value is COPY:  # is_absent
            self.absent -= 1

    def _evict(self) -> None:
        """CLOCK: the oldest entry goes unless it was hit since the hand last passed it."""
        entries = self.entries
        while len(entries) > self.capacity:
            key = next(iter(entries))
            e = entries.pop(key)
            if not self._live(key, e):  # detached: freed now instead of by the sweep
                self.counters.hits_retired += e.hits
            elif e.hits != e.seen:
                e.seen = e.hits
                entries[key] = e  # second chance: back of the queue
                continue
            else:
                self._held[e.bucket].discard(key)
                self.counters.hits_retired += e.hits
                self.counters.evictions += 1
            if is_absent(e):  # markers count against capacity and are evicted like entries
                self.absent -= 1

    def forget_all(self) -> None:
        """Drop every entry (the map is closing)."""
        self.entries.clear()
        self.absent = 0
        for keys in self._held:
            keys.clear()
        self._detached.clear()

    def cached_entry(self, key: Key) -> Entry | None:
        """The entry of ``key``, valid or not, unless detached or an absent marker (for tools
        and tests, which list values; no I/O)."""
        e = self.entries.get(key)
        return e if e is not None and self._live(key, e) and not is_absent(e) else None

    def cached_absent(self, key: Key) -> bool:
        """Whether ``key`` has a live absent marker, valid or not (for tools and tests)."""
        e = self.entries.get(key)
        return e is not None and self._live(key, e) and is_absent(e)

    def values_cached(self) -> int:
        """Entries that hold a value (absent markers left out): ``statistics().entries``."""
        return len(self.entries) - self.absent

    def _live(self, key: Key, e: Entry) -> bool:
        """Whether ``e`` (the entry of ``key``) is its bucket's, not detached by a flush."""
        return key in self._held[e.bucket]

    @property
    def sweeping(self) -> bool:
        """Whether detached entries wait for :meth:`sweep` (the driver's timer calls it)."""
        return bool(self._detached)

    def sweep(self, limit: int = SWEEP_CHUNK) -> list[object]:
        """Take up to ``limit`` detached entries out of the cache (see :meth:`_flush`) and
        return them with their keys: the caller drops the list *outside* the guard, since
        freeing them is the costly half.  The last step lets hits resume (``valid_until``)."""
        entries, held, retired = self.entries, self._held, 0
        out: list[object] = []
        while self._detached and limit > 0:
            keys = self._detached[-1]
            for _ in range(min(len(keys), limit)):
                k = keys.pop()
                e = entries.get(k)
                if e is not None and k not in held[e.bucket]:  # still the dead one (step 3)
                    del entries[k]
                    retired += e.hits
                    if e.raw is None and e.value is COPY:  # is_absent
                        self.absent -= 1
                    out.append(e)
                out.append(k)
                limit -= 1
            if not keys:
                self._detached.pop()
        self.counters.hits_retired += retired
        if not self._detached:
            self._revalidate()
        return out

    def held(self, bucket: int) -> set[Key]:
        """The keys cached in ``bucket`` (for checks; do not change it)."""
        return self._held[bucket]

    def hits(self) -> int:
        """Every hit so far, exact: a sum over every entry (O(entries)), for a user's
        ``statistics()``.  Periodic callers use :meth:`hits_estimate`."""
        # list() copies in one step under the GIL: other threads may change the dict meanwhile.
        return self.counters.hits_retired + sum(e.hits for e in list(self.entries.values()))

    def hits_estimate(self) -> int:
        """:meth:`hits` at O(1) cost (at most :data:`HITS_SAMPLE` entries read), for what runs
        periodically.  Exact up to that many entries; above, the hits of entries already gone
        (exact) plus the live entries' hits scaled from the first ``HITS_SAMPLE`` in the
        cache's order.  Never below a value it returned before (OpenTelemetry counters must not
        go backwards), so it may run ahead of :meth:`hits` by the sampling error."""
        n = len(self.entries)
        if n <= HITS_SAMPLE:
            got = self.hits()
        else:
            # list(islice(...)) runs in C without releasing the GIL: one consistent step even
            # while another thread adds or removes entries.
            sample = list(islice(self.entries.values(), HITS_SAMPLE))
            live = sum(e.hits for e in sample) * n // max(len(sample), 1)
            got = self.counters.hits_retired + live
        self._hits_shown = max(self._hits_shown, got)
        return self._hits_shown

    def serving(self, bucket: int, now: float) -> bool:
        return now < self.buckets[bucket].lease_until - self.margin
