"""Pieces the Cluster scenarios share (``scenarios_cluster``: S24, S25, S28).

* :func:`bucket_owners`: which master serves each bucket of a map now, and the workload keys
  of a set of buckets;
* :class:`Observer`: an in-process server of the scenario's map that reads every workload key
  through its near cache and logs each bucket flush, so a scenario can tell *which* buckets a
  fault cost (the workload's server processes only report totals);
* :class:`Writer`: the scenario's own writer, recording its writes for the sweep like a server;
* :class:`StoreLoad`: S01's workload (cache bypassed, WGL per key) on the same map, with an
  acknowledged-writes-lost count (C7) from a final snapshot;
* :func:`redirects`: the ``MOVED``/``ASK``/``TRYAGAIN`` replies every master has sent so far;
* :class:`Run`, :func:`cluster_run`, :func:`run_load`: one scenario run on a private cluster,
  every load at once with a fault injected meanwhile (``clusterfaults``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import MapConfig
from ..core.nearcache import INF, Event, Guards, NearCache
from ..core.wire import ChangeMessage
from ..errors import StoreError, StoreUnavailable, WriteOutcomeUnknown
from ..keys import Layout, bucket_of, encode_key
from ..map import SyncMap
from ..store.cluster import slot_for
from .clusternode import Addr
from .clusterset import ClusterSet
from .history import Op
from .recorder import History, Record, Recorder
from .scenario import Env
from .scenarios_cache import OFF, run_cluster
from .scenarios_store import _scan_records, _short, _snapshot
from .storecheck import Checked, LostReport, acked_writes_lost, check_records
from .workload import Cluster, ServerResult, Workload

DELTA = 1.0  # max_staleness of every map (the workload's default)
BUCKETS = MapConfig().buckets
KEYS = [f"k{i}" for i in range(64)]  # the workload's keys (testing/workload.py)
_ns = time.monotonic_ns


def bucket_of_key(key: str) -> int:
    return bucket_of(encode_key(key, MapConfig().max_key_bytes), BUCKETS)


def bucket_owners(cs: ClusterSet, name: str) -> dict[int, Addr]:
    """Bucket -> address of the master that serves its slot now (map ``name``, namespace sm)."""
    return {b: cs.master_for_slot(bucket_slot(name, b)).addr for b in range(BUCKETS)}


def keys_in(buckets: Iterable[int]) -> list[str]:
    chosen = set(buckets)
    return [k for k in KEYS if bucket_of_key(k) in chosen]


def _held_keys() -> tuple[str, ...]:
    """One key of each bucket the cache load never writes (``Workload.read_only``): its second
    key (its only one when it has one), so the hottest key of every bucket is still written.
    The observer reads every key in a loop, so each is cached before the fault; a fault that
    writes a bucket's keys (``clusterfaults.hammer``) then leaves the held key's write the last
    one, and an entry that missed its message stays stale to the end unless a guard repairs it:
    the controls' catch does not hang on the load leaving a key alone for Δ."""
    by_bucket: dict[int, list[str]] = {}
    for key in KEYS:
        by_bucket.setdefault(bucket_of_key(key), []).append(key)
    return tuple(keys[1] if len(keys) > 1 else keys[0] for _, keys in sorted(by_bucket.items()))


HELD_KEYS = _held_keys()


def key_in(bucket: int, prefix: str) -> str:
    """The first key ``<prefix><n>`` that falls into ``bucket``."""
    return next(k for n in range(10_000) if bucket_of_key(k := f"{prefix}{n}") == bucket)


def bucket_slot(name: str, bucket: int) -> int:
    """The hash slot of every key of ``bucket`` of map ``name`` (namespace sm)."""
    return slot_for(Layout("sm", name, BUCKETS).data(bucket))


def redirects(cs: ClusterSet) -> dict[str, int]:
    """Error replies ``MOVED``, ``ASK`` and ``TRYAGAIN`` sent so far, summed over the masters
    (``INFO errorstats``, Redis 6.2+): every one is a command a client had to send again."""
    out = {"MOVED": 0, "ASK": 0, "TRYAGAIN": 0}
    for master in cs.masters():
        client = cs.node_client(master, socket_timeout=2.0)
        try:
            stats = client.info("errorstats")
        finally:
            client.close()
        for name in out:
            entry = stats.get(f"errorstat_{name}", {})
            out[name] += int(entry.get("count", 0)) if isinstance(entry, dict) else 0
    return out


# ---- the observer ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flush:
    at_ns: int
    bucket: int
    resync: bool  # a restart (lost messages, an epoch or regression); False: a lease lapsed
    # lapse, gap, epoch, lost (a probe's sequence not reached), digest, chain (a probe at our
    # sequence while our digest chain was unknown: a gap or an epoch message broke it earlier)
    cause: str = "other"
    missing: tuple[int, int] | None = None  # cause "lost": the versions (from, to] not heard


CAUSES = (("gaps", "gap"), ("gap_overflows", "gap"), ("epoch_changes", "epoch"),
          ("lost_detected", "lost"), ("digest_mismatches", "digest"))  # fmt: skip
"""Core counters each incremented just before the flush it causes (``NearCache``), and the
cause a flush is logged with when one of them moved since the previous flush."""


class FlushLog:
    """Every flush of one near cache, with its cause, and what a scenario needs to judge it:
    which buckets re-subscriptions repaired, and every change message heard.  It wraps the
    core's ``_flush`` (every flush passes there: a restart after lost messages, a gap or an
    epoch change, ``count=True``: a resync; a lapsed lease, ``False``), ``_restart_bucket``
    (the versions a restart skips), ``_mismatch`` (whether our chain was unknown), ``on_feed_up``
    and ``on_message``.  All of them run under the map's guard, so the counters read at a flush
    are that flush's own.  Test instrumentation of one map, in this process only."""

    def __init__(self, core: NearCache) -> None:
        self.flushes: list[Flush] = []  # list.append is atomic: the map's threads append
        self.repairs: list[tuple[int, list[int] | None]] = []  # (at_ns, buckets; None: all)
        self.heard: list[tuple[int, int, int, int]] = []  # (at_ns, bucket, seq, last_seq)
        flush, restart, feed_up, message = (core._flush, core._restart_bucket, core.on_feed_up,
                                            core.on_message)  # fmt: skip
        mismatch = core._mismatch
        counts = {name: 0 for name, _ in CAUSES}
        skipped: list[tuple[int, int] | None] = [None]
        unchained = [False]  # in a _mismatch whose bucket's chain was unknown (no counter moves)

        def logged(bucket: int, count: bool = True) -> None:
            cause = "lapse" if not count else "other"
            for name, why in CAUSES:
                now = getattr(core.counters, name)
                if now != counts[name]:
                    counts[name], cause = now, why
            if cause == "other" and unchained[0]:
                cause = "chain"
            missing = skipped[0] if cause == "lost" else None
            self.flushes.append(Flush(_ns(), bucket, count, cause, missing))
            flush(bucket, count)

        def restarted(i: int, epoch: int | None, seq: int, sent_at: float,
                      digest: str | None = None) -> None:  # fmt: skip
            skipped[0] = (core.buckets[i].seq, seq)
            restart(i, epoch, seq, sent_at, digest)
            skipped[0] = None

        def mismatched(i: int, seq: int, sent_at: float, digest: str | None) -> None:
            unchained[0] = core.buckets[i].digest is None
            mismatch(i, seq, sent_at, digest)
            unchained[0] = False

        def repaired(now: float = -INF, buckets: Iterable[int] | None = None) -> None:
            listed = None if buckets is None else list(buckets)
            self.repairs.append((_ns(), listed))
            feed_up(now, listed)

        def heard(msg: ChangeMessage, now: float, want_events: bool = False) -> list[Event]:
            self.heard.append((_ns(), msg.bucket, msg.seq, msg.last_seq))
            return message(msg, now, want_events)

        core._flush = logged  # type: ignore[method-assign]
        core._restart_bucket = restarted  # type: ignore[method-assign]
        core._mismatch = mismatched  # type: ignore[method-assign]
        core.on_feed_up = repaired  # type: ignore[method-assign]
        core.on_message = heard  # type: ignore[method-assign]

    def flushed(self, since_ns: int, until_ns: int | None = None) -> list[Flush]:
        end = until_ns if until_ns is not None else 2**63
        return [f for f in self.flushes if since_ns <= f.at_ns < end]

    def repaired(self, since_ns: int, until_ns: int | None = None) -> set[int] | None:
        """The buckets re-subscriptions repaired (None: every bucket, after a bad message)."""
        end = until_ns if until_ns is not None else 2**63
        out: set[int] = set()
        for at, buckets in self.repairs:
            if since_ns <= at < end:
                if buckets is None:
                    return None
                out |= set(buckets)
        return out

    def chain_broken_by(self, flush: Flush) -> Flush | None:
        """For a restart of cause ``chain``: the flush that broke the bucket's chain (its latest
        resync before, when that was a gap or an epoch message), else None.  Order of events: a
        fault loses messages; the next message skips ahead (gap) or names another epoch, so the
        bucket is flushed and its digest is unknown from then on; the repair probe after the
        re-subscription is overtaken by newer messages (it read a lower sequence), so it renews
        the bucket without comparing chains; the next probe that reads our sequence restarts the
        bucket (docs/design.md: "every error of the chain costs a flush").  With PING leases
        that probe comes only when something asks for one, so it may come seconds later: the
        second half of the earlier repair, at no staleness."""
        if flush.cause != "chain":
            return None
        before = [f for f in self.flushes
                  if f.bucket == flush.bucket and f.resync and f.at_ns < flush.at_ns]  # fmt: skip
        return before[-1] if before and before[-1].cause in ("gap", "epoch") else None

    def late(self, flush: Flush, within_ns: int) -> bool:
        """Whether a restart for a probe's sequence not reached (cause ``lost``) was a false
        alarm: every version it skipped arrived after it, within ``within_ns``.  Order of
        events: a probe sent at T reads s; the message of s is delayed (this process or its
        machine stalled) past T + grace (max_staleness / 4); the next probe restarts the
        bucket; the message arrives after all.  Nothing was lost: the restart cost hits only."""
        if flush.cause != "lost" or flush.missing is None:
            return False
        low, high = flush.missing
        need = set(range(low + 1, high + 1))
        for at, bucket, seq, last in self.heard:
            if bucket == flush.bucket and flush.at_ns <= at <= flush.at_ns + within_ns:
                need.difference_update(range(seq, last + 1))
        return not need


class Observer:
    """A server of map ``name`` in this process (node id ``observer``): a thread reads every
    workload key through the near cache, and each bucket flush is logged (:class:`FlushLog`),
    so a scenario can tell which buckets a fault cost, and why."""

    def __init__(self, url: str, name: str, guards: Guards) -> None:
        config = MapConfig(max_staleness=DELTA, guards=guards, socket_timeout=2.0)
        self.map = SyncMap(name, url, config=config, node_id="observer")
        self.log = FlushLog(self.map._core)
        self.ops: list[Op] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="observer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _read(self) -> None:
        while not self._stop.wait(0.005):  # pacing: a pass over the keys every ~5 ms
            for key in KEYS:
                call = _ns()
                try:
                    value, version, source = self.map.get_with_meta(key)
                except StoreError:
                    continue
                self.ops.append(Op("observer", "read", key, value, version, call, _ns(), source))

    def result(self) -> ServerResult:
        """What it holds now (call it ``max_staleness`` after the last write), as a workload
        server reports it, for the sweep and the convergence check (C3)."""
        cached = {k: got for k in KEYS if (got := self.map.peek(k)) is not None}
        stats = {"resyncs": self.map.statistics().resyncs}
        return ServerResult("observer", os.getpid(), self.ops, cached, stats)

    def flushed(self, since_ns: int, until_ns: int | None = None) -> list[Flush]:
        return self.log.flushed(since_ns, until_ns)

    def close(self) -> None:
        self.stop()
        self.map.close()


@contextlib.contextmanager
def observing(url: str, name: str, guards: Guards) -> Iterator[Observer]:
    obs = Observer(url, name, guards)
    try:
        yield obs
    finally:
        obs.close()


# ---- the scenario's own writer ------------------------------------------------------------------


class Writer:
    """Writes unique values and records them as a workload server does (``workload._one``):
    acknowledged -> "write", outcome unknown -> "info", refused (nothing ran) -> dropped."""

    def __init__(self, url: str, name: str) -> None:
        self.map = SyncMap(name, url, config=MapConfig(socket_timeout=2.0), node_id="writer")
        self.ops: list[Op] = []
        self.refused = 0
        self.n = 0

    def write(self, key: str) -> bool:
        """True if acknowledged."""
        self.n += 1
        value, call = f"writer-{self.n}", _ns()
        try:
            version = self.map.set(key, value)
        except WriteOutcomeUnknown:
            self.ops.append(Op("writer", "info", key, value, -1, call, _ns()))
            return False
        except StoreUnavailable:
            self.refused += 1
            return False
        self.ops.append(Op("writer", "write", key, value, version, call, _ns()))
        return True

    def close(self) -> None:
        self.map.close()


# ---- S01's workload on the same map -------------------------------------------------------------


@dataclass(slots=True)
class StoreLoad:
    """S01's recorder (cache bypassed) on map ``name`` with ``config``, its keys prefixed with
    ``variant`` so several loads share the map, on a thread of its own."""

    url: str
    name: str
    variant: str
    config: MapConfig
    threads: int = 8
    maps: list[SyncMap] = field(default_factory=list)
    recorder: Recorder | None = None
    history: History | None = None
    _thread: threading.Thread | None = None

    def start(self, seconds: float) -> None:
        self.maps = [SyncMap(self.name, self.url, config=self.config, node_id=f"{self.variant}{i}")
                     for i in range(2)]  # fmt: skip
        self.recorder = Recorder(self.maps, threads=self.threads, key_prefix=f"{self.variant}-")
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        assert self.recorder is not None
        self.history = self.recorder.run(seconds)

    def finish(self, budget_s: float) -> StoreVerdict:
        """Join, snapshot every key (C7), close the maps, check the history (WGL + sweep)."""
        assert self._thread is not None and self.recorder is not None
        self._thread.join(120)
        history = self.history or History()
        try:
            snap = _snapshot(self.maps[0], history.keys)
        finally:
            for m in self.maps:
                m.close()
        records = list(history.records)
        lost = acked_writes_lost(records, *snap)
        records += _scan_records(*snap, "scan-final")
        records.sort(key=lambda r: r.call_ns)
        return StoreVerdict(self.variant, history, records, lost,
                            check_records(records, budget_s=budget_s, workers=1))  # fmt: skip


@dataclass(slots=True)
class StoreVerdict:
    variant: str
    history: History
    records: list[Record]
    lost: LostReport
    checked: Checked

    def first_ack_after(self, t_ns: int, keys_of: set[int]) -> int | None:
        """Return time of the first acknowledged mutation that changed a key (so a
        ``wait_replicas`` write was confirmed) called after ``t_ns``, on the buckets
        ``keys_of`` (or None)."""
        rets = [r.ret_ns for r in self.records
                if r.source == "redis" and r.effective and r.ret_ns is not None
                and r.call_ns > t_ns and bucket_of_key(r.key) in keys_of]  # fmt: skip
        return min(rets, default=None)

    def keys_on(self, buckets: set[int]) -> int:
        return sum(1 for k in self.history.keys if bucket_of_key(k) in buckets)

    def figures(self) -> dict[str, Any]:
        h, c = self.history, self.checked
        return {
            "ops": c.ops, "ops_info": h.info, "ops_refused": h.failed, "keys": c.keys,
            "keys_nonlinearizable": c.keys_failed, "keys_unknown": c.keys_unknown,
            "sweep_anomalies": c.sweep.anomalies, "acked_lost": self.lost.lost,
            "checker_s": round(c.seconds, 2),
        }  # fmt: skip

    def witness(self) -> str:
        return _short(self.checked.witness)


# ---- one run ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """One scenario run on one cluster: the map, the loads, what the fault recorded."""

    cs: ClusterSet
    name: str
    guard: bool
    observer: Observer
    writer: Writer
    stores: list[StoreLoad] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)  # event -> monotonic ns
    notes: dict[str, Any] = field(default_factory=dict)  # the fault's own figures

    @property
    def url(self) -> str:
        return self.cs.url


@contextlib.contextmanager
def cluster_run(env: Env, prefix: str, guard: bool, extra_args: tuple[str, ...] = ()
                ) -> Iterator[Run]:  # fmt: skip
    """A private 3 + 3 cluster (``extra_args`` on every node's command line), a fresh map
    ``<prefix>-<random>``, its observer and the scenario's writer; ``guard=False``: the
    observer (and the cache load, see :func:`run_load`) with the cache guards off."""
    with (
        ClusterSet(binary=env.redis_binary, extra_args=extra_args) as cs,
        map_run(cs, map_name(prefix), guard, Guards() if guard else OFF) as run,
    ):
        yield run


def map_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def map_run(cs: ClusterSet, name: str, guard: bool, guards: Guards) -> Iterator[Run]:
    """A run of map ``name`` on the cluster ``cs`` (private or shared): its observer and the
    scenario's writer, both opened now (so they read the slot map as it is now), the observer
    and the cache load with ``guards``; ``guard`` says whether this is the control."""
    with observing(cs.url, name, guards) as obs:
        writer = Writer(cs.url, name)
        try:
            yield Run(cs, name, guard, obs, writer)
        finally:
            writer.close()


def run_load(run: Run, seconds: float, fault: Callable[[Run], None]) -> list[ServerResult]:
    """The cache load for ``seconds`` (and the store loads, and the observer) with ``fault``
    injected meanwhile; the servers' results, the observer's last.  When this returns, every
    server waited out Δ after its last operation (workload.serve), so C3 may be checked."""
    w = Workload(
        run.url,
        name=run.name,
        seconds=seconds,
        guards=run.observer.map.config.guards,
        read_only=HELD_KEYS,
    )

    def inject(_: Cluster) -> None:
        run.observer.start()
        for load in run.stores:
            load.start(seconds)
        run.marks["start"] = _ns()
        fault(run)

    results = run_cluster(w, inject)
    run.observer.stop()
    return [*results, run.observer.result()]


__all__ = [
    "BUCKETS",
    "DELTA",
    "HELD_KEYS",
    "KEYS",
    "Flush",
    "FlushLog",
    "Observer",
    "Run",
    "StoreLoad",
    "StoreVerdict",
    "Writer",
    "bucket_of_key",
    "bucket_owners",
    "bucket_slot",
    "cluster_run",
    "key_in",
    "keys_in",
    "map_name",
    "map_run",
    "observing",
    "redirects",
    "run_load",
]
