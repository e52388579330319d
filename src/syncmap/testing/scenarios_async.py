"""TESTPLAN scenarios S01, S04, S07 and S13 with asyncio clients (issue 15 §5): S01a, S04a,
S07a, S13a, registered for tests and ``syncmap torture``.

Each is its scenario with a *mix* of drivers on one map in one run, same oracles, same
guard-off control (``guard=False`` / ``plant=True``), same figures, plus ``drivers``:

* S01a: of the two servers the recorder's threads share, the second is a ``syncmap.aio`` map
  on a loop thread (``testing.drivers.ThreadedAioMap``): its workers' operations run as
  concurrent tasks on that loop.  WGL and the version sweep judge both servers' operations.
* S04a, S07a: servers 0 and 2 of the three processes are asyncio servers
  (``testing.aworkload``: two client coroutines sharing one ``aio`` map), server 1 a thread
  server; S07a's ``slow-subscriber`` SIGSTOPs server 0, an asyncio one.
* S13a: workers 1-4 of the five are asyncio workers (``testing.alockload``: ``aio.Lock``
  renewed by a task on the worker's loop, ``aio`` map writes fenced by its token), worker 0 a
  thread worker, on one lock.  Four of five so that the faults, which strike whoever holds the
  lock, stall an asyncio holder almost surely (``faults_hit_async`` says how often they did).

Each also runs on Sentinel: S01a-sentinel, S04a-sentinel, S07a-sentinel, S13a-sentinel are the
same runs on a private Sentinel set (``Env(topology="sentinel")``: a master, a replica, three
Sentinels; every map, lock and checker opens ``redis+sentinel://``, the faults strike the
master), always private (also under ``syncmap torture --url``), with the figure ``topology``.
And on a Redis Cluster: S01a-cluster, S04a-cluster, S07a-cluster, S13a-cluster on a private
3 + 3 cluster (``Env(topology="cluster")``, ``redis+cluster://``; a map's buckets spread over
the three masters): S07's faults cut the sharded subscribers on every master, S13's lock lives
in its key's bucket slot (as ``map.lock(key)`` places one) and ``client-pause`` pauses that
slot's master.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .scenario import Env, ScenarioResult, Topology, scenario
from .scenarios_cache import S07Variant, s04, s07
from .scenarios_lock import S13Variant, s13
from .scenarios_store import s01

#: Server i's driver is MIXED[i % 2].
MIXED = ("async", "sync")
S01_DRIVERS = ("sync", "async")
S13_DRIVERS = ("sync", "async", "async", "async", "async")


def _as(sid: str, drivers: tuple[str, ...], r: ScenarioResult) -> ScenarioResult:
    r.id = sid
    r.name += "-async"
    r.figures["drivers"] = ",".join(drivers)
    return r


@scenario("S01a", "auth-linearizable-baseline-async", faults_server=False)
def s01a(env: Env, seconds: float, *, plant: bool = False, **options: Any) -> ScenarioResult:
    """S01 with one sync and one asyncio server (options: S01's)."""
    return _as("S01a", S01_DRIVERS, s01(env, seconds, plant=plant, drivers=S01_DRIVERS,
                                        **options))  # fmt: skip


@scenario("S04a", "nearcache-staleness-load-async", faults_server=False)
def s04a(env: Env, seconds: float = 4.0) -> ScenarioResult:
    """S04 with asyncio and sync servers on one map."""
    return _as("S04a", MIXED, s04(env, seconds, drivers=MIXED))


@scenario("S07a", "lost-invalidation-disconnect-async")
def s07a(
    env: Env, seconds: float = 4.0, *, guard: bool = True, variant: S07Variant | None = None
) -> ScenarioResult:
    """S07 with asyncio and sync servers; the SIGSTOPped subscriber is an asyncio server's."""
    return _as("S07a", MIXED, s07(env, seconds, guard=guard, variant=variant, drivers=MIXED))


@scenario("S13a", "lock-lease-pause-fenced-async")
def s13a(
    env: Env, seconds: float = 6.0, *, guard: bool = True, variant: S13Variant | None = None
) -> ScenarioResult:
    """S13 with asyncio and thread workers on one lock."""
    drivers = S13_DRIVERS
    return _as("S13a", drivers, s13(env, seconds, guard=guard, variant=variant, drivers=drivers))


# ---- on Sentinel and on a Cluster --------------------------------------------------------------


def _on(env: Env, topology: Topology) -> Env:
    return dataclasses.replace(env, url=None, topology=topology)


def _tagged(topology: Topology, r: ScenarioResult) -> ScenarioResult:
    r.id += f"-{topology}"
    r.name += f"-{topology}"
    r.figures["topology"] = topology
    return r


@scenario("S01a-sentinel", "auth-linearizable-baseline-async-sentinel")
def s01a_sentinel(env: Env, seconds: float, *, plant: bool = False,
                  **options: Any) -> ScenarioResult:  # fmt: skip
    """S01a on a Sentinel set."""
    return _tagged("sentinel", s01a(_on(env, "sentinel"), seconds, plant=plant, **options))


@scenario("S04a-sentinel", "nearcache-staleness-load-async-sentinel")
def s04a_sentinel(env: Env, seconds: float = 4.0) -> ScenarioResult:
    """S04a on a Sentinel set."""
    return _tagged("sentinel", s04a(_on(env, "sentinel"), seconds))


@scenario("S07a-sentinel", "lost-invalidation-disconnect-async-sentinel")
def s07a_sentinel(
    env: Env, seconds: float = 4.0, *, guard: bool = True, variant: S07Variant | None = None
) -> ScenarioResult:
    """S07a on a Sentinel set (the subscribers the faults cut are on the master)."""
    return _tagged("sentinel", s07a(_on(env, "sentinel"), seconds, guard=guard, variant=variant))


@scenario("S13a-sentinel", "lock-lease-pause-fenced-async-sentinel")
def s13a_sentinel(
    env: Env, seconds: float = 6.0, *, guard: bool = True, variant: S13Variant | None = None
) -> ScenarioResult:
    """S13a on a Sentinel set (``client-pause`` pauses the master)."""
    return _tagged("sentinel", s13a(_on(env, "sentinel"), seconds, guard=guard, variant=variant))


@scenario("S01a-cluster", "auth-linearizable-baseline-async-cluster")
def s01a_cluster(env: Env, seconds: float, *, plant: bool = False,
                 **options: Any) -> ScenarioResult:  # fmt: skip
    """S01a on a Redis Cluster (each key's operations on the master of its bucket's slot)."""
    return _tagged("cluster", s01a(_on(env, "cluster"), seconds, plant=plant, **options))


@scenario("S04a-cluster", "nearcache-staleness-load-async-cluster")
def s04a_cluster(env: Env, seconds: float = 4.0) -> ScenarioResult:
    """S04a on a Redis Cluster (the changes travel on the buckets' sharded channels)."""
    return _tagged("cluster", s04a(_on(env, "cluster"), seconds))


@scenario("S07a-cluster", "lost-invalidation-disconnect-async-cluster")
def s07a_cluster(
    env: Env, seconds: float = 4.0, *, guard: bool = True, variant: S07Variant | None = None
) -> ScenarioResult:
    """S07a on a Redis Cluster (the faults cut the sharded subscribers on every master)."""
    return _tagged("cluster", s07a(_on(env, "cluster"), seconds, guard=guard, variant=variant))


@scenario("S13a-cluster", "lock-lease-pause-fenced-async-cluster")
def s13a_cluster(
    env: Env, seconds: float = 6.0, *, guard: bool = True, variant: S13Variant | None = None
) -> ScenarioResult:
    """S13a on a Redis Cluster (the lock in its key's slot; ``client-pause`` pauses the master
    of that slot)."""
    return _tagged("cluster", s13a(_on(env, "cluster"), seconds, guard=guard, variant=variant))


__all__ = [
    "MIXED",
    "S01_DRIVERS",
    "S13_DRIVERS",
    "s01a",
    "s01a_cluster",
    "s01a_sentinel",
    "s04a",
    "s04a_cluster",
    "s04a_sentinel",
    "s07a",
    "s07a_cluster",
    "s07a_sentinel",
    "s13a",
    "s13a_cluster",
    "s13a_sentinel",
]
