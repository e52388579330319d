"""S02 and S03 on a Redis Cluster (issue 14: "the same scenarios as standalone"), on a 3 + 3
cluster (a private one, or the one ``Env.cluster`` shares: each run puts back every setting it
changes and deletes its map's keys).

* **S02-cluster**: S01's store workload (cache bypassed; WGL per key, C7 from two snapshots) on
  one map spread over every master, while ``CLIENT KILL TYPE normal`` hits every master every
  0.3 s, one ``CLIENT PAUSE WRITE`` holds every master's writes for 300 ms, and the master of
  bucket 0 is killed -9 and restarted on its port with its AOF.  Every node (replicas too) runs
  ``appendfsync always``.  The killed master's replicas are told ``cluster-replica-no-failover
  yes`` for the run, so the master keeps its slots however long it is away, and what survives
  the kill is what its own AOF kept: the honest analogue of S02's one Redis.  A replica taking
  over instead is S24's ground: asynchronous replication may lose what the master acknowledged
  in its last instant, whatever its fsync.  Control (``guard=False``): the victim master runs
  without persistence (its replica resyncs the empty data set), which must lose writes.
* **S03-cluster**: steady writes (each to a key of its own) in the map's two durability modes
  at once (``plain`` and ``wait_replicas=1``, S24's ``DURABILITY``), in two rounds.
  ``restart``: each master runs one of S03's persistence modes (none, everysec, always), all
  three are killed -9 at once while the writes run and restarted (no failover, as above); lost
  writes are counted per persistence mode (the master that owns the key) and per map mode.
  ``failover``: no persistence; the master of bucket 0 is killed -9 and its replica promoted
  (then the old master rejoins and takes its slots back by ``CLUSTER FAILOVER``); lost writes
  per map mode.  Musts: ``always`` loses none (every map mode), ``wait`` loses none in the
  failover.  Control (``guard=False``, the restart round only): the ``always`` master restarts
  without its AOF, which must lose writes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from ..config import MapConfig
from ..errors import ConfigurationError
from ..map import SyncMap
from .clusterload import BUCKETS, bucket_of_key, bucket_owners, bucket_slot
from .clusternode import ClusterNodeProcess
from .clusterset import ClusterSet
from .recorder import OPS_PER_KEY
from .scenario import ACKED_LOST, Env, ScenarioResult, finish, scenario, timed
from .scenarios_cluster import DURABILITY
from .scenarios_eviction_cluster import spread_name
from .scenarios_lock import on_cluster
from .scenarios_store import Durability, SteadyWriters, delete_map_keys, judge_s02_run, run_s02
from .scenarios_store import scan as scan_map

NAMESPACE = MapConfig().namespace  # the Cluster helpers (clusterload) assume the default
PERSISTENCE: dict[str, str | None] = {"none": None, "everysec": "everysec", "always": "always"}
"""S03's persistence modes (``scenarios_store.DURABILITY_MODES``) as ``appendfsync`` values
for ``ClusterSet.set_persistence``; ``None``: no AOF."""


def _cluster(store: object) -> ClusterSet:
    if not isinstance(store, ClusterSet):
        raise ConfigurationError(f"this scenario needs a ClusterSet, not {store!r}")
    return store


@contextlib.contextmanager
def persistence(cs: ClusterSet, modes: dict[ClusterNodeProcess, str | None]
                ) -> Iterator[None]:  # fmt: skip
    """Each node of ``modes`` with that persistence for the ``with`` block; afterwards every
    running node of ``cs`` without (the fixture's default), for a shared cluster."""
    try:
        for node, appendfsync in modes.items():
            cs.set_persistence(node, appendfsync)
        yield
    finally:
        for node in cs.servers:
            if node.running:
                cs.set_persistence(node, None)


@contextlib.contextmanager
def no_failover(cs: ClusterSet, masters: list[ClusterNodeProcess]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for master in masters:
            stack.enter_context(cs.no_failover(master))
        yield


def _admins(cs: ClusterSet) -> list[redis.Redis]:
    return [cs.node_client(m, socket_timeout=2.0, socket_connect_timeout=2.0)
            for m in cs.masters()]  # fmt: skip


# ---- S02-cluster ---------------------------------------------------------------------------------


@scenario("S02-cluster", "auth-linearizable-conn-faults-cluster")
def s02_cluster(
    env: Env,
    seconds: float = 6.0,
    *,
    threads: int = 16,
    ops_per_key: int = OPS_PER_KEY,
    budget_s: float = 10.0,
    workers: int = 2,
    seed: int | None = None,
    socket_timeout: float = 1.0,
    kill_every: float = 0.3,
    pause_ms: int = 300,
    guard: bool = True,
    history_path: str | Path | None = None,
) -> ScenarioResult:
    """S02 on a Cluster (module docstring).  Must, as S02: keys not linearizable 0, version
    sweep anomalies 0, acknowledged writes lost 0 (at the restart and at the end), the kill -9
    + restart done, clients killed; and here: the victim master kept its slots (no failover),
    some of the history's keys were on it.  ``guard=False``: the victim without persistence
    (the control, which must fail)."""
    result, started = timed("S02-cluster", "auth-linearizable-conn-faults-cluster")
    config = MapConfig(socket_timeout=socket_timeout)  # see s02 on the timeout
    with on_cluster(env).store() as store:
        cs = _cluster(store)
        name = spread_name(cs, BUCKETS, "s02c")
        victim = cs.server(bucket_owners(cs, name)[0])
        modes = {n: "always" for n in cs.servers} | ({} if guard else {victim: None})
        notes: dict[str, Any] = {}

        def crash() -> None:
            victim.kill()
            notes["restart_s"] = round(cs.restart(victim), 2)  # settled: loaded, replica synced
            notes["failed_over"] = cs.master_for_slot(bucket_slot(name, 0)) is not victim

        victim_buckets = {b for b, a in bucket_owners(cs, name).items() if a == victim.addr}
        try:
            with persistence(cs, modes), cs.no_failover(victim):
                run = run_s02(cs.url, name, config, seconds, admins=lambda: _admins(cs),
                              crash=crash, threads=threads, ops_per_key=ops_per_key,
                              seed=seed, kill_every=kill_every, pause_ms=pause_ms)  # fmt: skip
        finally:
            delete_map_keys(cs.url, name, NAMESPACE)
    judge_s02_run(result, run, budget_s=budget_s, workers=workers, history_path=history_path)
    fig = result.figures
    fig.update(topology="cluster", masters=3, aof="always" if guard else "always, victim off",
               keys_on_victim=sum(1 for k in run.history.keys
                                  if bucket_of_key(k) in victim_buckets), **notes)  # fmt: skip
    result.require(notes.get("failed_over") is not True, "the victim's replica took its slots "
                   "over: its data came from replication, not from its AOF")  # fmt: skip
    result.require(fig["keys_on_victim"] > 0, "no key of the history was on the killed master")
    return finish(result, started)


# ---- S03-cluster ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _writing(cs: ClusterSet, name: str, writers: int) -> Iterator[dict[str, SteadyWriters]]:
    """:class:`SteadyWriters` on map ``name`` in each durability mode of the map (``plain``,
    ``wait``), their keys prefixed with the mode; stopped and closed after the block."""
    maps = {v: SyncMap(name, cs.url, config=c, node_id=f"{name}-{v}")
            for v, c in DURABILITY.items()}  # fmt: skip
    loads = {v: SteadyWriters(m, writers, prefix=f"{v}-") for v, m in maps.items()}
    try:
        for load in loads.values():
            load.start()
        yield loads
    finally:
        for load in loads.values():
            load.stop()
        for m in maps.values():
            m.close()


def restart_round(cs: ClusterSet, seconds: float, writers: int, guard: bool
                  ) -> tuple[dict[tuple[str, str], Durability], float]:  # fmt: skip
    """The restart round (module docstring): per (persistence mode, map mode) what was lost;
    and the seconds from the restart until the cluster settled."""
    name = spread_name(cs, BUCKETS, "s03c")
    masters = cs.masters()
    mode_of = dict(zip((m.addr for m in masters), PERSISTENCE, strict=True))
    modes = {m: PERSISTENCE[mode_of[m.addr]] for m in masters}
    if not guard:  # the control: the "always" master restarts without its AOF
        modes[masters[2]] = None
    on = {b: mode_of[a] for b, a in bucket_owners(cs, name).items()}
    try:
        with persistence(cs, modes), no_failover(cs, masters):
            with _writing(cs, name, writers) as loads:
                time.sleep(seconds)  # the steady writes before the crash: a schedule
                for master in masters:  # at once, while the writers run
                    master.kill()
            restart_s = cs.restart(*masters)
            have = scan_map(cs.url, name, MapConfig(socket_timeout=2.0))
    finally:
        delete_map_keys(cs.url, name, NAMESPACE)

    def on_mode(p: str) -> Callable[[str], bool]:
        return lambda key: on[bucket_of_key(key)] == p

    out = {(p, v): load.tally(p, have, on_mode(p))
           for v, load in loads.items() for p in PERSISTENCE}  # fmt: skip
    return out, restart_s


def failover_round(cs: ClusterSet, seconds: float, writers: int
                   ) -> tuple[dict[str, Durability], float]:  # fmt: skip
    """The failover round (module docstring): per map mode what was lost on the failed shard's
    keys (the others are not at risk, and counted in ``restart``), and the failover's
    seconds.  The old master is restarted (as a replica) and given its slots back."""
    name = spread_name(cs, BUCKETS, "s03f")
    victim = cs.server(bucket_owners(cs, name)[0])
    on_victim = {b for b, a in bucket_owners(cs, name).items() if a == victim.addr}
    try:
        with _writing(cs, name, writers) as loads:
            time.sleep(seconds)  # the steady writes before the crash: a schedule
            done = cs.kill_master(victim)  # returns once the replica serves the slots
            time.sleep(min(0.5, seconds))  # writes on the promoted replica: a schedule
        have = scan_map(cs.url, name, MapConfig(socket_timeout=2.0))
        cs.restart(done.old)
        cs.failover(done.old)  # the shard as it was: the fixture's masters stay its masters
    finally:
        delete_map_keys(cs.url, name, NAMESPACE)
    out = {v: load.tally(v, have, lambda k: bucket_of_key(k) in on_victim)
           for v, load in loads.items()}  # fmt: skip
    return out, done.seconds


@scenario("S03-cluster", "durability-modes-cluster")
def s03_cluster(env: Env, seconds: float = 4.0, *, writers: int = 2, failover: bool = True,
                guard: bool = True) -> ScenarioResult:  # fmt: skip
    """S03 on a Cluster (module docstring): acknowledged writes lost per persistence mode and
    per map durability mode.  Must: ``always`` 0 in each map mode; ``wait`` 0 in the failover;
    every cell acknowledged some writes.  ``seconds``: the steady writes, split over the
    rounds (at least 0.5 s each); ``failover=False``: the restart round only.  ``guard=False``:
    the control (the restart round, the ``always`` master without its AOF: must fail)."""
    result, started = timed("S03-cluster", "durability-modes-cluster")
    rounds = 2 if failover and guard else 1
    each = max(0.5, seconds / rounds)
    fig = result.figures
    with on_cluster(env).store() as store:
        cs = _cluster(store)
        lost, restart_s = restart_round(cs, each, writers, guard)
        fig["restart_s"] = round(restart_s, 2)
        for (p, v), d in lost.items():
            fig[f"lost_{p}_{v}"] = f"{d.lost}/{d.acked}"
            fig[f"in_flight_{p}_{v}"] = f"{d.unknown_applied}/{d.unknown} applied"
            result.require(d.acked > 0, f"{p}, {v}: no write was acknowledged")
        always = [d for (p, _), d in lost.items() if p == "always"]
        fig[ACKED_LOST] = sum(d.lost for d in always)
        result.require(
            fig[ACKED_LOST] == 0,
            "appendfsync always lost "
            + ", ".join(f"{d.lost} of {d.acked}" for d in always)
            + " acknowledged writes (plain, wait)",
        )
        if rounds == 2:
            by_mode, failover_s = failover_round(cs, each, writers)
            fig["failover_s"] = round(failover_s, 2)
            for v, d in by_mode.items():
                fig[f"lost_failover_{v}"] = f"{d.lost}/{d.acked}"
                fig[f"in_flight_failover_{v}"] = f"{d.unknown_applied}/{d.unknown} applied"
                result.require(d.acked > 0, f"failover, {v}: no write was acknowledged")
            wait = by_mode["wait"]
            fig[ACKED_LOST] += wait.lost
            result.require(wait.lost == 0, f"wait_replicas=1 lost {wait.lost} of {wait.acked} "
                           "acknowledged writes in a failover")  # fmt: skip
    fig["topology"] = "cluster"
    if not guard:
        fig["control"] = "the always master restarted without its AOF"
    return finish(result, started)


__all__ = [
    "PERSISTENCE",
    "failover_round",
    "no_failover",
    "persistence",
    "restart_round",
    "s02_cluster",
    "s03_cluster",
]
