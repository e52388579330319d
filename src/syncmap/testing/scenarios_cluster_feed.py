"""The standalone near-cache scenarios S05, S08 and S09 on a Redis Cluster (issue 14: "a map
spread over a 3-master cluster passes the same scenarios as standalone").

Each runs on a 3 + 3 cluster (:class:`~syncmap.testing.clusterset.ClusterSet`), a private one,
or the one passed as ``cluster=`` (the CI tests share one per module: every scenario leaves it
as it found it, settled, with every master announcing its own port).

* **S05-cluster**: S05's fill race.  A map learns every master's address from the slot map, so
  a proxy in front of a master is put in the clients' way by making the master announce the
  proxy's port (``clusterproxy.announced_proxy``); the proxy then slows the replies of every
  connection but the sharded subscribers' (``only="others"``): reads of that master's buckets
  arrive 60 ms late, their invalidations on time.
* **S08-cluster**: S08's silent feed, on one master only: the proxy stalls the ``SSUBSCRIBE``
  connections of every process to that master (no RST, no FIN: ``only="subscribers"``) while
  the data path and the replication link through the same proxy keep working.  The probe must
  repair the struck master's buckets within Δ of each write they missed, and flush no other.
* **S09-cluster**: S09's gap and store resets.  ``gap``: single change messages lost (ghost
  writes: a version taken and a value stored with no message, on every master); ``restart``:
  one master SIGKILLed and restarted without persistence (its replica told
  ``cluster-replica-no-failover yes`` for the while), so it comes back as the master of its
  slots with no data and its replica full-syncs the empty data set: every sequence of the
  shard goes back to 0 (a master that failed over instead is S24's ground, and keeps its data);
  ``flushall`` / ``flushall-one``: FLUSHALL on every master, or one.

The observer (``clusterload.Observer``: a server in this process whose bucket flushes are
logged) tells which buckets a fault cost; the cache load is S04's (3 server processes).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import redis
import redis.cluster

from ..config import MapConfig
from ..core.nearcache import Guards
from ..keys import Layout, bucket_of, encode_key
from ..map import SyncMap
from .clusterload import (
    DELTA,
    KEYS,
    Run,
    bucket_of_key,
    bucket_owners,
    bucket_slot,
    keys_in,
    map_name,
    map_run,
    run_load,
)
from .clusterproxy import announced_proxy, cluster_ok, replication_works
from .clusterset import ClusterSet
from .faults import flushall, master_clients
from .history import Op, sweep
from .proxy import FaultProxy
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed
from .scenarios_cache import (
    OFF,
    Fault,
    _hget_calls,
    _rounds,
    _Tally,
    divergent,
    forge_ghost,
    pre_reset_reads,
    run_cluster,
)
from .scenarios_cluster import _cache_verdict
from .wait import wait_until
from .workload import Cluster, ServerResult, Workload

_ns = time.monotonic_ns


@contextlib.contextmanager
def _cluster(env: Env, shared: ClusterSet | None) -> Iterator[ClusterSet]:
    """``shared`` (checked to be settled), or a private 3 + 3 cluster stopped afterwards."""
    if shared is not None:
        shared.wait_settled(timeout=15.0)
        yield shared
        return
    with ClusterSet(binary=env.redis_binary) as cs:
        yield cs


def _victim(cs: ClusterSet, name: str) -> tuple[tuple[str, int], list[int]]:
    """The master of bucket 0 of map ``name`` and every bucket it serves."""
    owners = bucket_owners(cs, name)
    return owners[0], sorted(b for b, a in owners.items() if a == owners[0])


def _bucket_key(name: str, bucket: int, what: str) -> str:
    """A key (not a map's) in the slot of ``bucket`` of map ``name``."""
    return f"{{{Layout('sm', name, MapConfig().buckets).bucket_tag(bucket)}}}:{what}"


# ---- S05 on a Cluster -------------------------------------------------------------------------


def _race_keys(buckets: list[int], n: int) -> list[str]:
    """``n`` key names in ``buckets`` (so on the proxied master)."""
    chosen, out, i = set(buckets), list[str](), 0
    while len(out) < n:
        if bucket_of_key(key := f"race{i}") in chosen:
            out.append(key)
        i += 1
    return out


@scenario("S05-cluster", "nearcache-fill-invalidate-race-cluster")
def s05_cluster(env: Env, seconds: float = 1.0, *, guard: bool = True,
                iterations: int | None = None, cluster: ClusterSet | None = None
                ) -> ScenarioResult:  # fmt: skip
    """S05 on a Cluster: server B misses key k of a bucket on master M, whose replies reach B
    60 ms late (the proxy M announces, ``only="others"``: its sharded subscribers' pushes are
    not delayed), while A rewrites k; after each iteration B's cache must not hold the older
    value.  ``guard=False`` disables the fill gate.  ``iterations`` times, or (None) until
    ``seconds`` are used, at least 15 times."""
    result, started = timed("S05-cluster", "nearcache-fill-invalidate-race-cluster")
    name = map_name("s05c")
    stale = done = races = 0
    with _cluster(env, cluster) as cs:
        victim, buckets = _victim(cs, name)
        node = cs.server(victim)
        keys = _race_keys(buckets, 1000)
        with (
            announced_proxy(cs, node) as ann,
            SyncMap(name, cs.url) as a,
            SyncMap(name, cs.url, config=MapConfig(guards=Guards(fill_race=guard))) as b,
        ):  # fmt: skip
            admin = cs.node_client(node, socket_timeout=5.0)
            try:
                # Both maps reach M through the proxy (it is in every slot map), the subscriber
                # connections too: only replies on the others are delayed.
                ann.proxy.latency(60, "downstream", only="others")
                end = time.monotonic() + seconds
                while done < (iterations or 15) or (iterations is None and time.monotonic() < end):
                    stale += _s05_round(a, b, admin, keys[done % len(keys)])
                    done += 1
                races = b.statistics().fills_rejected
                subscribers = ann.proxy.subscribers
            finally:
                admin.close()
    f = result.figures
    f[OPS] = f["iterations"] = done
    f[ANOMALIES] = f["permanently_stale"] = stale
    f["races_provoked"] = races
    f["proxied_subscribers"] = subscribers
    f["topology"] = "cluster"
    result.require(stale == 0, f"{stale} permanently stale entries after {done} fill races")
    result.require(subscribers > 0, "no sharded subscriber went through the proxy")
    if guard:
        result.require(races * 2 >= done, f"only {races} races provoked in {done} iterations")
    return finish(result, started)


def _s05_round(a: SyncMap, b: SyncMap, admin: redis.Redis, key: str) -> int:
    """One race; 1 if B is left caching a value older than A's second write.  Order: A writes
    v1; B's read misses and its HGET reaches M (``commandstats``); A writes v2, whose SPUBLISH
    reaches B's subscriber long before B's HGET reply (60 ms late) brings v1."""
    a[key] = "v1"
    hgets = _hget_calls(admin)
    reader = threading.Thread(target=b.get, args=(key,))
    reader.start()
    wait_until(lambda: _hget_calls(admin) > hgets, 5, "B's HGET reaching the master")
    v2 = a.set(key, "v2")
    reader.join()
    cached = b.peek(key)
    return int(cached is not None and cached[1] < v2)


# ---- S08 on a Cluster -------------------------------------------------------------------------

STALL_S = 2.5  # as S08: longer than Δ, shorter than the subscriber's PING timeout (2 x 2 s)


@dataclass(frozen=True, slots=True)
class Stall:
    at_ns: int
    healed_ns: int
    subscribers: int  # proxied subscriber connections when it began (each process has one)
    writes: list[tuple[int, int, int]]  # (bucket, call_ns, ret_ns) acknowledged meanwhile
    replicated: bool  # a write to M confirmed by WAIT 1 meanwhile (replication via the proxy)
    cluster_ok: bool  # every node said cluster_state:ok meanwhile (the bus)


def _stall_rounds(node_name: str, proxy: FaultProxy, buckets: list[int], seconds: float,
                  stalls: list[Stall]) -> Callable[[Run], None]:  # fmt: skip
    """From 1 s in: stall M's subscriber connections (no error, no FIN) ``STALL_S``, heal; again
    1 s later, as long as 1.5 s remain at the end (S08's schedule).  At each stall's start the
    scenario's writer writes every workload key of M's buckets once: their messages are held
    in the proxy, and only the probe can tell the maps (the data path is not stalled).  Then,
    while the stall lasts, it checks that M still replicates through the proxy and that the
    cluster is ok."""

    def fault(run: Run) -> None:
        node = run.cs.server(node_name)
        for _ in range(max(1, int((seconds - 1.5) / (STALL_S + 1.0)))):
            time.sleep(1.0)  # fault schedule: the feed flows a second first
            held = proxy.subscribers
            proxy.stall("both", only="subscribers")
            at, writes = _ns(), []
            for key in keys_in(buckets):
                call = _ns()
                if run.writer.write(key):
                    writes.append((bucket_of_key(key), call, _ns()))
            replicated = replication_works(run.cs, node, _bucket_key(run.name, buckets[0], "w"))
            ok = cluster_ok(run.cs)
            time.sleep(max(0.0, STALL_S - (_ns() - at) / 1e9))  # the stall's length
            proxy.heal()
            stalls.append(Stall(at, _ns(), held, writes, replicated, ok))

    return fault


@scenario("S08-cluster", "silent-feed-blackhole-cluster")
def s08_cluster(env: Env, seconds: float = 5.0, *, guard: bool = True, pong: bool = True,
                cluster: ClusterSet | None = None) -> ScenarioResult:  # fmt: skip
    """S08 on a Cluster: the sharded subscriber connections of every process to one master M go
    silent (the proxy M announces stalls them, ``STALL_S``, no RST) while the data path and the
    replication link through the same proxy keep working.  Must: stale beyond Δ 0, divergent
    after Δ 0 (the cache load and the observer); each write to M's buckets during a stall
    repaired by the observer within Δ of its acknowledgement (a flush of its bucket: the probe
    found the sequence ahead of the messages); no other bucket flushed during a stall or Δ after
    it; ``lost_detected`` > 0; M replicated (``WAIT 1``) and the cluster ok during each stall;
    subscribers stalled > 0.  ``guard=False`` disables the probes (S08's control);
    ``pong=False`` counts a PING lease when M's PING is sent, not when its answer arrives
    (``Guards.pong``: the PING-lease control, as S08's)."""
    result, started = timed("S08-cluster", "silent-feed-blackhole-cluster")
    name, stalls = map_name("s08c"), list[Stall]()
    with _cluster(env, cluster) as cs:
        victim, buckets = _victim(cs, name)
        node = cs.server(victim)
        with (
            announced_proxy(cs, node) as ann,
            map_run(cs, name, guard and pong, Guards(probe=guard, pong=pong)) as run,
        ):
            fault = _stall_rounds(node.node_id, ann.proxy, buckets, seconds, stalls)
            results = run_load(run, seconds, fault)
            _cache_verdict(result, run, results)
            result.figures["announce_s"] = round(ann.seconds, 2)
            result.figures["replicas_through_proxy"] = ann.replicas_through_proxy
            _s08_judge(result, run, stalls, set(buckets))
    result.figures["topology"] = "cluster"
    return finish(result, started)


def _s08_judge(result: ScenarioResult, run: Run, stalls: list[Stall], victim: set[int]) -> None:
    late, detections, others = [], [], set()
    for s in stalls:
        flushes = run.observer.flushed(s.at_ns, s.healed_ns + int(DELTA * 1e9))
        others |= {f.bucket for f in flushes if f.bucket not in victim}
        for bucket, call, ret in s.writes:
            mine = [f.at_ns for f in flushes if f.bucket == bucket and f.at_ns >= call]
            took = (min(mine) - ret) / 1e9 if mine else None
            if took is None or took > DELTA:
                late.append(f"bucket {bucket}: {'never' if took is None else f'{took:.2f} s'}")
            else:
                detections.append(max(0.0, took))
    f = result.figures
    f.update(stalls=len(stalls), subscribers_stalled=sum(s.subscribers for s in stalls),
             stall_writes=sum(len(s.writes) for s in stalls), repaired=len(detections),
             repaired_late=len(late), other_buckets_flushed=len(others),
             detection_s_max=round(max(detections), 3) if detections else None)  # fmt: skip
    result.require(bool(stalls) and all(s.subscribers > 0 for s in stalls),
                   "a stall found no subscriber behind the proxy: it injected nothing")  # fmt: skip
    result.require(all(s.writes for s in stalls), "no write was acknowledged during a stall: "
                   "the data path must keep working while the feed is silent")  # fmt: skip
    healthy = all(s.replicated and s.cluster_ok for s in stalls)
    result.require(healthy, "during a stall the master did not replicate through the proxy, or "
                   "the cluster was not ok")  # fmt: skip
    result.require(not late, f"writes to the silent master's buckets not repaired within Δ: "
                   f"{late[:5]}")  # fmt: skip
    result.require(not others, f"buckets of other masters flushed: {sorted(others)}")
    if run.guard:
        result.require(f["lost_detected"] > 0, "the silent feed must be detected (0 seen)")


# ---- S09 on a Cluster -------------------------------------------------------------------------

S09ClusterVariant = Literal["gap", "flushall", "flushall-one", "restart"]
S09_CLUSTER_VARIANTS: tuple[S09ClusterVariant, ...] = ("gap", "flushall", "flushall-one",
                                                       "restart")  # fmt: skip
GHOST_EVERY = 0.25  # s between two ghost writes (S09's pace)


def _reset_keys(admin: redis.Redis, name: str) -> set[str]:
    """The workload's keys whose bucket's data hash is on ``admin``'s master now: the keys a
    reset of that master loses (a bucket with no data hash yet holds no value to go stale)."""
    layout = Layout("sm", name, MapConfig().buckets)
    held = {k.decode() if isinstance(k, bytes) else k for k in admin.keys(f"sm:{{{name}:*}}:d")}
    limit = MapConfig().max_key_bytes
    return {k for k in KEYS if layout.data(bucket_of(encode_key(k, limit), layout.buckets)) in held}


Reset = tuple[int, int, set[str]]  # (call_ns, ret_ns, the keys it reset)


def _flush_masters(w: Workload, one: bool, resets: list[Reset], flushed: list[int]) -> Fault:
    """FLUSHALL 1.5 s in, then every 3 s while 2 s remain: on every master, or (``one``) on the
    first master that holds some of the map's buckets then, so only that shard's buckets lose
    their data and epochs.  ``flushed`` counts the keys each reset deleted (DBSIZE just before):
    0 means it hit nothing.  Order: the victims' keys are listed, then each is flushed, one
    master after the other (no atomic reset across a Cluster)."""

    def fault(cluster: Cluster) -> None:
        at = 1.5
        while at + 2.0 <= w.seconds:
            time.sleep(max(0.0, cluster.started + at - time.monotonic()))  # fault schedule
            masters = master_clients(w.url)
            try:
                keys = [_reset_keys(admin, w.name) for admin in masters]
                victims = [i for i, k in enumerate(keys) if k][:1] if one else range(len(keys))
                reset: set[str] = set()
                deleted = 0
                call = time.monotonic_ns()
                for i in victims:
                    deleted += int(masters[i].dbsize())
                    flushall(masters[i])
                    reset |= keys[i]
                resets.append((call, time.monotonic_ns(), reset))
                flushed.append(deleted)
            finally:
                for admin in masters:
                    admin.close()
            at += 3.0

    return fault


def _restart_master(resets: list[Reset], flushed: list[int], notes: dict[str, object]
                    ) -> Callable[[Run], None]:  # fmt: skip
    """1.5 s in: SIGKILL the master of bucket 0 and start it again on its port and dir (no
    persistence but ``nodes.conf``): it rejoins as the master of its slots with no data, and its
    replica, whose ``PSYNC`` the new process cannot continue, full-syncs the empty data set.
    Its replicas are told ``cluster-replica-no-failover yes`` first, so a restart slower than
    the node timeout cannot become a failover (S24's ground: the shard would keep its data);
    ``failed_over`` says whether some other node served the slot after all."""

    def fault(run: Run) -> None:
        cs = run.cs
        node = cs.server(bucket_owners(cs, run.name)[0])
        with cs.no_failover(node):
            time.sleep(1.5)  # fault schedule: the caches warm first
            admin = cs.node_client(node, socket_timeout=5.0)
            try:
                keys, deleted = _reset_keys(admin, run.name), int(admin.dbsize())
            finally:
                admin.close()
            call = _ns()
            node.kill()
            notes["restart_s"] = round(cs.restart(node), 2)  # until the cluster settled
            resets.append((call, _ns(), keys))
            flushed.append(deleted)
            notes["failed_over"] = cs.master_for_slot(bucket_slot(run.name, 0)) is not node

    return fault


@dataclass(frozen=True, slots=True)
class Ghost:
    bucket: int
    call_ns: int
    ret_ns: int


def _ghost_writes(count: int, ghosts: list[Ghost]) -> Callable[[Run], None]:
    """Every ``GHOST_EVERY`` s a ghost write (``forge_ghost``: a version taken, no message) of a
    cold key, k32-k63 in turn (so on every master), then a real write of one of k0-k3 (a later
    message, in some bucket)."""

    def fault(run: Run) -> None:
        host, port = run.cs.startup_nodes[0]
        admin = redis.cluster.RedisCluster(host, port)
        try:
            for n in range(count):
                time.sleep(GHOST_EVERY)  # fault schedule
                op = forge_ghost(admin, run.writer.map, f"k{32 + n % 32}", f"ghost-{n}")
                run.writer.ops.append(op)
                ghosts.append(Ghost(bucket_of_key(op.key), op.call_ns, op.ret_ns))
                run.writer.write(f"k{n % 4}")
        finally:
            admin.close()

    return fault


class _S09:
    """What S09-cluster's rounds add up to."""

    def __init__(self, guards: Guards) -> None:
        self.guards = guards
        self.gaps, self.resets = _Tally(), _Tally()
        self.ghosts, self.repaired = list[Ghost](), 0
        self.marks, self.flushed, self.late_reads = list[Reset](), list[int](), list[str]()
        self.reset_ops = self.other_flushed = 0
        self.notes: dict[str, object] = {}

    def gap(self, run: Run, length: float) -> None:
        """Ghost writes under the loads; each must be followed by a flush of its bucket in the
        observer within Δ (the gap or the probe found it)."""
        ghosts: list[Ghost] = []
        count = max(1, int((length - 1.5) / GHOST_EVERY))
        results = run_load(run, length, _ghost_writes(count, ghosts))
        ops = [op for r in results for op in r.ops] + run.writer.ops
        self.gaps.add(sweep(ops, DELTA), divergent(results, run.url, run.name), results)
        late, flushes = int(DELTA * 1e9), run.observer.log.flushes
        self.repaired += sum(
            any(f.bucket == g.bucket and g.call_ns <= f.at_ns <= g.ret_ns + late for f in flushes)
            for g in ghosts
        )
        self.ghosts += ghosts

    def restart(self, run: Run, length: float) -> None:
        marks: list[Reset] = []
        results = run_load(run, length, _restart_master(marks, self.flushed, self.notes))
        self._reset(results, marks, run.writer.ops, run.url, run.name)
        victim = {b for b, a in bucket_owners(run.cs, run.name).items()
                  if a == bucket_owners(run.cs, run.name)[0]}  # fmt: skip
        for call, ret, _ in marks:
            flushes = run.observer.flushed(call, ret + int(DELTA * 1e9))
            self.other_flushed += len({f.bucket for f in flushes if f.bucket not in victim})

    def flush(self, cs: ClusterSet, name: str, length: float, one: bool) -> None:
        w = Workload(cs.url, name=name, seconds=length, guards=self.guards)
        marks: list[Reset] = []
        results = run_cluster(w, _flush_masters(w, one, marks, self.flushed))
        self._reset(results, marks, [], w.url, name)

    def _reset(self, results: list[ServerResult], marks: list[Reset], extra: list[Op], url: str,
               name: str) -> None:  # fmt: skip
        ops = [op for r in results for op in r.ops] + extra
        self.reset_ops += len(ops)
        for call, ret, keys in marks:
            self.late_reads += pre_reset_reads(ops, call, ret, keys)
        self.marks += marks
        self.resets.add(None, divergent(results, url, name), results)

    def figures(self, result: ScenarioResult) -> None:
        f = result.figures
        if self.gaps.rounds:
            self.gaps.figures(result)
            c = self.gaps.counters
            f["gaps_injected"] = len(self.ghosts)
            f["gaps_detected"] = c.get("gaps", 0) + c.get("lost_detected", 0)
            f["gaps_repaired_by_observer"] = self.repaired
            result.require(self.repaired == len(self.ghosts) > 0, f"{len(self.ghosts)} lost "
                           f"messages injected, {self.repaired} repaired within Δ by the "
                           "observer")  # fmt: skip
            self.gaps.require_clean(result)
        if self.resets.rounds:
            f[OPS] = f.get(OPS, 0) + self.reset_ops
            f[ANOMALIES] = f.get(ANOMALIES, 0) + len(self.late_reads) + len(self.resets.diverged)
            f["resets"] = len(self.marks)
            f["keys_flushed"] = sum(self.flushed)
            f["epoch_changes"] = f.get("epoch_changes", 0) + self.resets.counters.get(
                "epoch_changes", 0)  # fmt: skip
            f["pre_reset_reads"] = len(self.late_reads)
            f["divergent_entries"] = f.get("divergent_entries", 0) + len(self.resets.diverged)
            result.require(bool(self.flushed) and all(n > 0 for n in self.flushed),
                           f"a reset deleted no key (keys deleted per reset: {self.flushed}): "
                           "it injected nothing")  # fmt: skip
            result.require(not self.late_reads, f"{len(self.late_reads)} reads returned a value "
                           f"from before a store reset more than Δ after it; e.g. "
                           f"{self.late_reads[:3]}")  # fmt: skip
            self.resets.require_clean(result, swept=False)
        if "restart_s" in self.notes:
            f["restart_s"] = self.notes["restart_s"]
            f["failed_over"] = self.notes.get("failed_over")
            f["other_buckets_flushed"] = self.other_flushed
            result.require(self.notes.get("failed_over") is False, "the restarted master's "
                           "slots were failed over: the restart tested nothing")  # fmt: skip
            if self.guards.probe:
                result.require(self.other_flushed == 0, f"{self.other_flushed} buckets of the "
                               "other masters flushed after the restart")  # fmt: skip


@scenario("S09-cluster", "message-gap-and-epoch-cluster")
def s09_cluster(env: Env, seconds: float = 4.0, *, guard: bool = True,
                variant: S09ClusterVariant | None = None, cluster: ClusterSet | None = None
                ) -> ScenarioResult:  # fmt: skip
    """S09 on a Cluster (module docstring).  ``gap``: every ghost write (its message never sent,
    on every master) repaired within Δ by the observer, no read stale beyond Δ; ``flushall``,
    ``flushall-one``, ``restart``: no read more than Δ after the reset returns a value from
    before it (only the reset master's keys count in ``flushall-one`` and ``restart``), a reset
    that deleted no key fails the run; ``restart``: no failover, and no other master's bucket
    flushed; C3 after each round.  ``guard=False`` disables gap detection, probes and epoch
    checks.  No ``variant``: all four."""
    result, started = timed("S09-cluster", "message-gap-and-epoch-cluster")
    variants = S09_CLUSTER_VARIANTS if variant is None else (variant,)
    acc = _S09(Guards() if guard else OFF)
    with _cluster(env, cluster) as cs:
        for v in variants:
            for length in _rounds(seconds / len(variants), 30.0, 3.5):
                name = map_name("s09c")
                if v in ("flushall", "flushall-one"):
                    acc.flush(cs, name, length, v == "flushall-one")
                    continue
                with map_run(cs, name, guard, acc.guards) as run:
                    (acc.gap if v == "gap" else acc.restart)(run, length)
    acc.figures(result)
    result.figures["variants"] = ",".join(variants)
    result.figures["topology"] = "cluster"
    return finish(result, started)


__all__ = ["S09_CLUSTER_VARIANTS", "s05_cluster", "s08_cluster", "s09_cluster"]
