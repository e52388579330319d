"""TESTPLAN S01, S04, S07 and S13 with asyncio clients mixed with sync ones on one map (issue 15
§5): short forms of S01a, S04a, S07a, S13a (``syncmap.testing.scenarios_async``; ``syncmap
torture`` runs the long ones).  Each guarded one also runs with its guard off and must fail.
``pytest -s`` prints the figures.

On Sentinel, S04a and S07a run here (each starts its own Sentinel set, ~3.5 s, on top of the
run); S01a-sentinel and S13a-sentinel run in ``syncmap torture`` only: with their controls they
would add about 10 and 20 s to the suite, and their oracles judge the store and the locks,
which the drivers table (tests/integration/test_drivers.py) already runs on Sentinel.  Likewise
on a Redis Cluster (each run starts its own 3 + 3 cluster, ~2.5 s): S04a-cluster and S07a-cluster
here, S01a-cluster and S13a-cluster in ``syncmap torture``."""

from __future__ import annotations

import pytest

from syncmap.errors import ConfigurationError
from syncmap.testing.scenario import ANOMALIES, OPS, Env, ScenarioResult, Topology
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_async import (
    s01a,
    s04a,
    s04a_cluster,
    s04a_sentinel,
    s07a,
    s07a_cluster,
    s07a_sentinel,
    s13a,
)
from syncmap.testing.scenarios_cache import s05, s08

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    return Env(redis_binary=redis_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


@pytest.fixture
def sentinel_env(sentinel_binary: str) -> Env:
    """The variants on Sentinel start their own set (skipped where the binary has no Sentinel
    mode, failed under CI=true)."""
    return Env(redis_binary=sentinel_binary)


@pytest.fixture
def cluster_env(cluster_binary: str) -> Env:
    """The variants on a Cluster start their own 3 + 3 cluster (skipped where the binary has no
    cluster mode, failed under CI=true)."""
    return Env(redis_binary=cluster_binary)


def test_the_async_variants_are_registered_for_torture() -> None:
    registry = load_all()
    ids = ("S01a", "S04a", "S07a", "S13a")
    assert set(ids) <= set(registry)
    assert registry["S07a"].faults_server and not registry["S04a"].faults_server
    for sid in ids:  # always on a private Sentinel set or cluster, also under torture --url
        assert registry[f"{sid}-sentinel"].faults_server
        assert registry[f"{sid}-cluster"].faults_server


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_a_scenario_that_needs_one_node_refuses_another_topology(topology: Topology) -> None:
    with pytest.raises(ConfigurationError, match="one redis-server only"):
        s05(Env(topology=topology), 1.0)  # a proxy in front of its one node


def test_s01a_linearizable_with_a_sync_and_an_async_server(env: Env) -> None:
    r = show(s01a(env, 2.0))
    assert r.id == "S01a" and r.figures["drivers"] == "sync,async"
    assert r.passed, r.failures
    assert r.figures[OPS] > 300 and r.figures["keys_nonlinearizable"] == 0


def test_s01a_oracle_catches_a_planted_stale_read(env: Env) -> None:
    r = show(s01a(env, 1.0, plant=True))
    assert not r.passed and r.figures[ANOMALIES] > 0


def test_s04a_staleness_with_async_and_sync_servers(env: Env) -> None:
    r = show(s04a(env, 3))
    assert r.figures["reads"] > 600 and r.figures["hit_ratio"] > 0.5, "exercise the caches"
    assert r.passed, r.failures


def test_s07a_lost_invalidations_on_async_servers(env: Env) -> None:
    r = show(s07a(env, 4, variant="kill"))
    assert r.figures["disconnects"] > 0
    assert r.passed, r.failures


def test_s07a_without_gap_and_probe_guards_goes_stale(env: Env) -> None:
    r = show(s07a(env, 4, guard=False, variant="kill"))
    assert r.figures["stale_beyond_delta"] > 0 or r.figures["divergent_entries"] > 0
    assert not r.passed


def test_s08_on_async_servers_a_ping_lease_without_its_pong_serves_stale(env: Env) -> None:
    """The PING-lease control on the asyncio subscriber (``Guards(pong=False)``).  The guarded
    run, ``s08(env, 5, drivers=("async",))``, passes (docs/design.md, "PING leases"); it stays
    out of the suite for time, as S07a and S04a already run asyncio servers with leases on."""
    r = show(s08(env, 5, pong=False, drivers=("async",)))
    assert r.figures["stale_beyond_delta"] > 0, "S08's oracle must catch a PING without PONG"
    assert not r.passed


@pytest.mark.parametrize("guard", [True, False], ids=["fenced", "unfenced"])
def test_s13a_a_stalled_async_or_sync_holder(env: Env, guard: bool) -> None:
    """The GIL stall: an asyncio holder's loop (and its lease-renewal task) stops with it."""
    r = show(s13a(env, 6, guard=guard, variant="gil"))
    assert r.figures["faults_hit"] > 0 and r.figures["stalls_observed"] > 0
    assert r.figures["faults_hit_async"] > 0, "no asyncio holder was stalled"
    if guard:
        assert r.figures["stale_fenced_rejected"] > 0, "a stalled holder's write must be refused"
        assert r.figures[ANOMALIES] == 0
        assert r.passed, r.failures
    else:
        assert r.figures["stale_fenced_accepted"] > 0 or r.figures["acked_writes_lost"] > 0
        assert not r.passed


# ---- on Sentinel: sync and asyncio servers sharing one map through redis+sentinel:// -----------


def test_s04a_on_sentinel(sentinel_env: Env) -> None:
    r = show(s04a_sentinel(sentinel_env, 3))
    assert (r.id, r.figures["topology"], r.figures["drivers"]) == ("S04a-sentinel", "sentinel",
                                                                   "async,sync")  # fmt: skip
    assert r.figures["reads"] > 600 and r.figures["hit_ratio"] > 0.5, "exercise the caches"
    assert r.passed, r.failures


def test_s07a_on_sentinel(sentinel_env: Env) -> None:
    """The feeds the faults cut are the maps' subscribers on the master (the Sentinels' own
    hello links are left alone and not counted)."""
    r = show(s07a_sentinel(sentinel_env, 4, variant="kill"))
    assert r.id == "S07a-sentinel" and r.figures["topology"] == "sentinel"
    assert r.figures["disconnects"] > 0
    assert r.passed, r.failures


# ---- on a Redis Cluster: the map's buckets over three masters, sharded channels ----------------


def test_s04a_on_a_cluster(cluster_env: Env) -> None:
    r = show(s04a_cluster(cluster_env, 3))
    assert (r.id, r.figures["topology"], r.figures["drivers"]) == ("S04a-cluster", "cluster",
                                                                   "async,sync")  # fmt: skip
    assert r.figures["reads"] > 600 and r.figures["hit_ratio"] > 0.5, "exercise the caches"
    assert r.passed, r.failures


def test_s07a_on_a_cluster(cluster_env: Env) -> None:
    """The faults cut the maps' SSUBSCRIBE connections on every master (each holds some of the
    map's buckets); a run that cut none would fail by itself."""
    r = show(s07a_cluster(cluster_env, 4, variant="kill"))
    assert r.id == "S07a-cluster" and r.figures["topology"] == "cluster"
    assert r.figures["masters"] == 3 and r.figures["disconnects"] > 0
    assert r.figures["lost_detected"] > 0, "the cut subscribers must notice what they missed"
    assert r.passed, r.failures
