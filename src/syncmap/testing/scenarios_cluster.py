"""Redis Cluster topology scenarios (TESTPLAN §8, issue 14 item 6): S24 a shard's master killed,
S25 a map's bucket slots migrated, S28 a shard's subscriber connections killed.

Each starts a private 3 + 3 cluster (:class:`~syncmap.testing.clusterset.ClusterSet`, node
timeout 1 s) and runs on one map (16 buckets over the 3 masters), all at once:

* **the cache load**: S04's workload (3 server processes, 64 keys, Zipf reads 90 % / writes
  10 %, caches on, Δ = 1 s), swept for C2 (stale beyond Δ), C4-C6, and checked for C3 (entries
  divergent from the store Δ after the last write);
* **the observer** (``clusterload.Observer``): one more server, in this process, whose bucket
  flushes are logged, so "which buckets did the fault cost" has an answer;
* in S24 and S25, **the store load**: S01's workload (cache bypassed; get/set/swap/CAS/CAD/
  delete/setdefault, 8 threads a key group) on keys of its own in the same map, checked per
  key by the WGL search, and "acknowledged writes lost" (C7) from a final snapshot.

Figures are defined where they are computed; the scenario docstrings say what must hold.
``guard=False`` (each scenario's control) runs the cache load and the observer with
``Guards(fill_race, gaps, probe, epoch)`` off: no probe, no gap or epoch check, so a change
message lost to the fault is never repaired.  Each control must fail (stale beyond Δ or
divergent entries); S24's and S25's controls leave the store load out (it has no cache guard).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import MapConfig
from ..core.nearcache import Guards
from .clusterload import (
    DELTA,
    Flush,
    Observer,
    StoreLoad,
    StoreVerdict,
    Writer,
    bucket_of_key,
    bucket_owners,
    keys_in,
    observing,
    redirects,
)
from .clusterset import ClusterSet
from .faults import kill_subscribers, subscribers
from .history import Op, sweep
from .scenario import ACKED_LOST, ANOMALIES, UNKNOWN_KEYS, Env, ScenarioResult, finish, scenario, timed
from .scenarios_cache import OFF, _Tally, divergent, run_cluster
from .wait import wait_until
from .workload import Cluster, ServerResult, Workload

PLAIN_LOSS_BOUND = 50
"""Acknowledged writes S24's plain variant may lose: asynchronous replication's last instant
before the kill (S10's bound; measured 0 here)."""
_ns = time.monotonic_ns


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 2)


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
def _run(env: Env, prefix: str, guard: bool) -> Iterator[Run]:
    with ClusterSet(binary=env.redis_binary) as cs:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with observing(cs.url, name, Guards() if guard else OFF) as obs:
            writer = Writer(cs.url, name)
            try:
                yield Run(cs, name, guard, obs, writer)
            finally:
                writer.close()


def _load(run: Run, seconds: float, fault: Callable[[Run], None]) -> list[ServerResult]:
    """The cache load for ``seconds`` (and the store loads, and the observer) with ``fault``
    injected meanwhile; the servers' results, the observer's last.  When this returns, every
    server waited out Δ after its last operation (workload.serve), so C3 may be checked."""
    w = Workload(run.url, name=run.name, seconds=seconds, guards=run.observer.map.config.guards)

    def inject(_: Cluster) -> None:
        run.observer.start()
        for load in run.stores:
            load.start(seconds)
        run.marks["start"] = _ns()
        fault(run)

    results = run_cluster(w, inject)
    run.observer.stop()
    return [*results, run.observer.result()]


def _cache_verdict(result: ScenarioResult, run: Run, results: list[ServerResult]) -> None:
    """C2, C4-C6 (the sweep, Δ) and C3 (divergent) over the cache load, the observer and the
    scenario's writer: figures and musts, as S04's."""
    ops = [op for r in results for op in r.ops] + run.writer.ops
    tally = _Tally()
    tally.add(sweep(ops, DELTA), divergent(results, run.url, run.name), results)
    tally.figures(result)
    result.figures["writer_refused"] = run.writer.refused
    tally.require_clean(result)
    result.require(tally.rep.local_reads > 0, "the near caches served no read: nothing was tested")


def _first_ack(ops: list[Op], after_ns: int, buckets: set[int]) -> int | None:
    """Return time of the first acknowledged write called after ``after_ns`` on ``buckets``."""
    return min((op.ret_ns for op in ops if op.f == "write" and op.call_ns > after_ns
                and bucket_of_key(op.key) in buckets), default=None)  # fmt: skip


def _flush_figures(flushes: list[Flush], affected: set[int]) -> dict[str, int]:
    inside = {f.bucket for f in flushes if f.bucket in affected}
    outside = {f.bucket for f in flushes if f.bucket not in affected}
    return {"affected_buckets_flushed": len(inside), "other_buckets_flushed": len(outside),
            "other_flushes_resync": sum(1 for f in flushes if f.bucket not in affected and f.resync),
            "other_flushes_lapse": sum(1 for f in flushes
                                       if f.bucket not in affected and not f.resync)}  # fmt: skip


# ---- S24 ----------------------------------------------------------------------------------------

DURABILITY = {"plain": MapConfig(socket_timeout=2.0),
              "wait": MapConfig(socket_timeout=2.0, wait_replicas=1, wait_timeout=0.5)}  # fmt: skip


def _hammer(run: Run, keys: list[str], stop: threading.Event) -> threading.Thread:
    """The scenario's writer rewrites each of ``keys`` until one write of it is acknowledged
    (or ``stop``): started at the kill, those writes land on the promoted replica as soon as
    this process learns of it, which may be before a server process's subscriber has moved
    there: that server then misses their messages.  Each key is written once on the new master
    and left alone, so an entry that missed it stays stale until the load rewrites the key."""

    def hammer() -> None:
        todo = list(keys)
        while todo and not stop.wait(0.002):  # pacing while the shard refuses every write
            todo = [key for key in todo if not run.writer.write(key)]

    thread = threading.Thread(target=hammer, name="hammer", daemon=True)
    thread.start()
    return thread


def _kill_master(warm: float) -> Callable[[Run], None]:
    """After ``warm`` s: SIGKILL the master of bucket 0 (the scenario's writer rewriting its
    buckets' keys meanwhile, :func:`_hammer`), wait until its replica serves its slots
    everywhere (``failover_s``), then restart it (it rejoins as the new master's replica, so
    ``wait_replicas=1`` writes can be confirmed again: ``restart_s``)."""

    def fault(run: Run) -> None:
        owners = bucket_owners(run.cs, run.name)
        victim = run.cs.server(owners[0])
        buckets = sorted(b for b, a in owners.items() if a == owners[0])
        run.notes["victim_buckets"] = buckets
        time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
        stop = threading.Event()
        hammer = _hammer(run, keys_in(buckets), stop)
        try:
            done = run.cs.kill_master(victim)
            run.marks["failover"] = _ns()
        finally:
            hammer.join(5.0)
            stop.set()
        # Failover.seconds runs from the SIGKILL itself (kill_master asks the cluster a few
        # questions before it): the kill's instant, not this thread's.
        run.marks["fault"] = run.marks["failover"] - int(done.seconds * 1e9)
        run.notes["failover_s"] = round(done.seconds, 2)
        if run.stores:
            run.notes["restart_s"] = round(run.cs.restart(done.old), 2)
            run.marks["restarted"] = _ns()

    return fault


def _judge_store(result: ScenarioResult, v: StoreVerdict, fault_ns: int, victim: set[int],
                 need_ack: bool) -> None:  # fmt: skip
    f = {f"{v.variant}_{k}": x for k, x in v.figures().items()}
    first = v.first_ack_after(fault_ns, victim)
    f[f"{v.variant}_detection_s"] = _seconds(None if first is None else first - fault_ns)
    f[f"{v.variant}_keys_on_failed_shard"] = v.keys_on(victim)
    result.figures.update(f)
    lost, nonlin = v.lost.lost, v.checked.keys_failed + v.checked.sweep.anomalies
    # plain: asynchronous replication may lose what the master acknowledged in its last
    # instant; a key that lost an acknowledged write is not linearizable either, and excused.
    bound = PLAIN_LOSS_BOUND if v.variant == "plain" else 0
    result.require(lost <= bound, f"{v.variant}: {lost} acknowledged writes lost (at most "
                   f"{bound}): {v.lost.witnesses[:3]}")  # fmt: skip
    result.require(nonlin == 0 or (bound and lost > 0), f"{v.variant}: "
                   f"{v.checked.keys_failed} keys not linearizable, sweep "
                   f"{v.checked.sweep.summary()} (first: {v.witness()})")  # fmt: skip
    result.require(not v.history.unexpected,
                   f"{v.variant}: unexpected errors {dict(v.history.unexpected)}")
    if need_ack:
        result.require(first is not None, f"{v.variant}: no write on the failed shard was "
                       "acknowledged after the kill")  # fmt: skip


@scenario("S24", "cluster-shard-failover")
def s24(env: Env, seconds: float = 7.0, *, guard: bool = True, budget_s: float = 10.0
        ) -> ScenarioResult:  # fmt: skip
    """A shard's master SIGKILLed under load; its replica is promoted (node timeout 1 s).

    Must: the cache load's stale beyond Δ 0 and divergent entries after Δ 0 (C2-C6, C3); the
    store loads, ``plain`` and ``wait`` (``MapConfig(wait_replicas=1)``) at once: keys not
    linearizable 0, acknowledged writes lost 0 with ``wait`` (at most ``PLAIN_LOSS_BOUND`` with
    ``plain``, whose non-linearizable keys are excused only by a lost write); a write to the
    failed shard acknowledged after the kill, in every load.  Reported: ``failover_s`` (kill ->
    every node names the replica), ``*_detection_s`` (kill -> the first acknowledged write on the
    failed shard's buckets), and the buckets the observer flushed on the healthy masters.
    ``seconds``: the load (the kill at 20 %, ≥ 1 s); start-up, Δ and the checks come on top."""
    result, started = timed("S24", "cluster-shard-failover")
    with _run(env, "s24", guard) as run:
        if guard:
            run.stores = [StoreLoad(run.url, run.name, v, c) for v, c in DURABILITY.items()]
        results = _load(run, seconds, _kill_master(max(1.0, 0.2 * seconds)))
        verdicts = [s.finish(budget_s) for s in run.stores]
        _cache_verdict(result, run, results)
        _s24_figures(result, run, results, verdicts)
    return finish(result, started)


def _s24_figures(result: ScenarioResult, run: Run, results: list[ServerResult],
                 verdicts: list[StoreVerdict]) -> None:  # fmt: skip
    fig, fault_ns = result.figures, run.marks.get("fault", 0)
    victim = set(run.notes.get("victim_buckets", ()))
    fig["failover_s"] = run.notes.get("failover_s")
    fig["restart_s"] = run.notes.get("restart_s")
    ops = [op for r in results for op in r.ops] + run.writer.ops
    first = _first_ack(ops, fault_ns, victim)
    fig["cache_detection_s"] = _seconds(None if first is None else first - fault_ns)
    result.require(first is not None, "cache load: no write on the failed shard was "
                   "acknowledged after the kill")  # fmt: skip
    fig.update(_flush_figures(run.observer.flushed(fault_ns), victim))
    _store_figures(result, verdicts, fault_ns, victim, need_ack=True)
    _control_note(result, run)


def _store_figures(result: ScenarioResult, verdicts: list[StoreVerdict], fault_ns: int,
                   victim: set[int], *, need_ack: bool) -> None:  # fmt: skip
    fig = result.figures
    for v in verdicts:
        _judge_store(result, v, fault_ns, victim, need_ack)
    fig[ACKED_LOST] = sum(v.lost.lost for v in verdicts)
    fig[UNKNOWN_KEYS] = sum(v.checked.keys_unknown for v in verdicts)
    fig[ANOMALIES] = fig.get(ANOMALIES, 0) + sum(v.checked.anomalies for v in verdicts)
    fig["ops"] = fig.get("ops", 0) + sum(v.checked.ops for v in verdicts)


# ---- S25 ----------------------------------------------------------------------------------------

ASK_HOLD = 0.2  # s each migration holds its ASK window open (keys moved, slot still the source's)


def _migrate(warm: float, until: float) -> Callable[[Run], None]:
    """From ``warm`` s to ``until`` s into the load: migrate the slot of one bucket after
    another (one bucket of each master, in turn) to the next master, the classic way
    (``ClusterSet.migrate_slot``), each with :func:`_ask_window`."""

    def fault(run: Run) -> None:
        time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
        masters = [m.addr for m in run.cs.masters()]
        owners = bucket_owners(run.cs, run.name)
        chosen = [min(b for b, a in owners.items() if a == m) for m in masters]
        before, moved, keys, n = redirects(run.cs), set(), 0, 0
        end = run.marks["start"] + int(until * 1e9)
        run.marks["fault"] = _ns()
        while _ns() < end:
            bucket = chosen[n % len(chosen)]
            owner = bucket_owners(run.cs, run.name)[bucket]
            target = masters[(masters.index(owner) + 1) % len(masters)]
            hammers: list[threading.Thread] = []
            hook = _ask_window(run, bucket, hammers)
            keys += run.cs.migrate_slot(_slot(run, bucket), target, hook=hook)
            for hammer in hammers:
                hammer.join(5.0)
            moved.add(bucket)
            n += 1
        after = redirects(run.cs)
        run.notes.update(migrations=n, keys_moved=keys, victim_buckets=sorted(moved),
                         **{f"redirects_{k.lower()}": after[k] - before[k] for k in after})

    return fault


def _slot(run: Run, bucket: int) -> int:
    from ..keys import Layout  # noqa: PLC0415
    from ..store.cluster import slot_for  # noqa: PLC0415

    return slot_for(Layout("sm", run.name, run.observer.map.config.buckets).data(bucket))


def _ask_window(run: Run, bucket: int, hammers: list[threading.Thread]) -> Callable[[str], None]:
    """At the step "moved" (every key on the target, the slot still the source's): start
    :func:`_hammer` on the bucket's workload keys and hold the window ``ASK_HOLD`` s.  Its
    writes are refused (``TRYAGAIN``: a multi-key script finds some keys missing) until the
    slot is handed over; the first that succeed run on the target, possibly before the server
    processes' subscribers have moved there."""

    def hook(step: str) -> None:
        if step == "moved":
            hammers.append(_hammer(run, keys_in([bucket]), threading.Event()))
            time.sleep(ASK_HOLD)  # the window's length is the fault's shape

    return hook


@scenario("S25", "cluster-slot-migration")
def s25(env: Env, seconds: float = 5.0, *, guard: bool = True, budget_s: float = 10.0
        ) -> ScenarioResult:  # fmt: skip
    """The slots of some of the map's buckets migrated between masters, again and again, while
    the loads read and write (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE; Redis 7.0 has no
    atomic slot migration).  Must: stale beyond Δ 0, divergent after Δ 0 (cache load); keys not
    linearizable 0, acknowledged writes lost 0 (store load, plain); migrations done > 0.
    Reported: migrations, keys moved, redirects answered by the masters (``MOVED``, ``ASK``,
    ``TRYAGAIN``), the buckets the observer flushed beyond the migrated ones.
    ``seconds``: the load; migrations from 1 s to 1.5 s before its end."""
    result, started = timed("S25", "cluster-slot-migration")
    with _run(env, "s25", guard) as run:
        if guard:
            run.stores = [StoreLoad(run.url, run.name, "plain", DURABILITY["plain"], threads=16)]
        results = _load(run, seconds, _migrate(1.0, max(2.0, seconds - 1.5)))
        verdicts = [s.finish(budget_s) for s in run.stores]
        _cache_verdict(result, run, results)
        fig, notes = result.figures, run.notes
        for name in ("migrations", "keys_moved", "redirects_moved", "redirects_ask",
                     "redirects_tryagain"):  # fmt: skip
            fig[name] = notes.get(name)
        moved = set(notes.get("victim_buckets", ()))
        fig.update(_flush_figures(run.observer.flushed(run.marks.get("fault", 0)), moved))
        result.require(bool(notes.get("migrations")), "no slot was migrated")
        _store_figures(result, verdicts, run.marks.get("fault", 0), moved, need_ack=False)
        _control_note(result, run)
    return finish(result, started)


# ---- S28 ----------------------------------------------------------------------------------------

FEED_KILL_EVERY = 1.5  # s between two rounds: longer than Δ, so each round's repair is its own


@dataclass(frozen=True, slots=True)
class FeedKill:
    victim: str
    buckets: tuple[int, ...]
    killed: int  # subscriber connections CLIENT KILL cut
    at_ns: int
    back_ns: int | None  # every subscriber of the victim connected again (CLIENT LIST)
    writes: int  # the scenario's writes to the victim's buckets while they were away


def _kill_feeds(warm: float, until: float) -> Callable[[Run], None]:
    """From ``warm`` s to ``until`` s into the load, every ``FEED_KILL_EVERY`` s: ``CLIENT KILL
    TYPE pubsub`` on one master (each in turn), then the scenario's writer writes the workload
    keys of that master's buckets, each once a pass, until the master has as many subscriber
    connections as before (their messages are lost to the killed subscribers)."""

    def fault(run: Run) -> None:
        time.sleep(warm)  # the load before the fault: a schedule, not a synchronisation
        owners = bucket_owners(run.cs, run.name)
        masters = list(dict.fromkeys(owners.values()))
        end, kills = run.marks["start"] + int(until * 1e9), []
        run.marks["fault"] = _ns()
        while _ns() < end:
            victim = masters[len(kills) % len(masters)]
            buckets = tuple(b for b, a in owners.items() if a == victim)
            kills.append(_kill_feed(run, victim, buckets))
            time.sleep(max(0.0, FEED_KILL_EVERY - (_ns() - kills[-1].at_ns) / 1e9))  # schedule
        run.notes["kills"] = kills

    return fault


def _kill_feed(run: Run, victim: tuple[str, int], buckets: tuple[int, ...]) -> FeedKill:
    admin = run.cs.node_client(victim, socket_timeout=2.0)
    try:
        before = len(subscribers(admin))
        at = _ns()
        killed = kill_subscribers(admin)
        writes, keys, back = 0, keys_in(buckets), None
        give_up = time.monotonic() + 5.0
        while time.monotonic() < give_up:
            if len(subscribers(admin)) >= before:
                back = _ns()
                break
            for key in keys:
                writes += run.writer.write(key)
        return FeedKill(f"{victim[0]}:{victim[1]}", buckets, killed, at, back, writes)
    finally:
        admin.close()


@scenario("S28", "cluster-shard-subscriber-lost")
def s28(env: Env, seconds: float = 4.0, *, guard: bool = True) -> ScenarioResult:
    """Every subscriber connection of one master cut (``CLIENT KILL TYPE pubsub``), one master
    after another, while the cache load runs and the scenario writes that master's keys until
    the subscribers are back.  Must: stale beyond Δ 0, divergent after Δ 0; the observer
    repairs (flushes) the killed master's buckets within Δ of the kill and flushes no other
    bucket; at least one round needed a repair.  Reported per run: ``detection_s`` (kill -> the
    observer's first flush of the victim's buckets: p50/max), ``resubscribe_s`` (kill -> as many
    subscriber connections as before, max).  ``seconds``: the load; kills from 1 s to 1 s
    before its end."""
    result, started = timed("S28", "cluster-shard-subscriber-lost")
    with _run(env, "s28", guard) as run:
        results = _load(run, seconds, _kill_feeds(1.0, max(1.5, seconds - 1.0)))
        _cache_verdict(result, run, results)
        _s28_judge(result, run)
        _control_note(result, run)
    return finish(result, started)


def _s28_judge(result: ScenarioResult, run: Run) -> None:
    kills: list[FeedKill] = run.notes.get("kills", [])
    detections, others, late = [], set(), []
    for i, k in enumerate(kills):
        until = kills[i + 1].at_ns if i + 1 < len(kills) else None
        flushes = run.observer.flushed(k.at_ns, until)
        mine = [f.at_ns for f in flushes if f.bucket in k.buckets]
        others |= {f.bucket for f in flushes if f.bucket not in k.buckets}
        if mine:
            detections.append((min(mine) - k.at_ns) / 1e9)
            if detections[-1] > DELTA:
                late.append(f"{k.victim}: {detections[-1]:.2f} s")
    backs = [(k.back_ns - k.at_ns) / 1e9 for k in kills if k.back_ns is not None]
    fig = result.figures
    fig.update(feed_kills=len(kills), subscribers_killed=sum(k.killed for k in kills),
               gap_writes=sum(k.writes for k in kills), rounds_repaired=len(detections),
               other_buckets_flushed=len(others))  # fmt: skip
    fig["detection_s_p50"] = round(sorted(detections)[len(detections) // 2], 3) if detections else None
    fig["detection_s_max"] = round(max(detections), 3) if detections else None
    fig["resubscribe_s_max"] = round(max(backs), 3) if backs else None
    result.require(len(backs) == len(kills) > 0, f"subscribers came back in {len(backs)} of "
                   f"{len(kills)} rounds")  # fmt: skip
    result.require(not late, f"victim buckets repaired later than Δ after the kill: {late}")
    result.require(not others, f"buckets of masters whose subscribers were not killed were "
                   f"flushed: {sorted(others)}")  # fmt: skip
    if run.guard:
        result.require(bool(detections), "no round needed a repair: the fault did not bite")


def _control_note(result: ScenarioResult, run: Run) -> None:
    if not run.guard:
        result.figures["control"] = "cache guards off (probe, gaps, epoch, fill race)"


__all__ = ["PLAIN_LOSS_BOUND", "s24", "s25", "s28"]
