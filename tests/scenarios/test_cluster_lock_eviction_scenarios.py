"""S12, S14 and S16 on a Redis Cluster (issue 14's Done-when), short forms for CI: S12-cluster
(unfenced holders SIGSTOPped: the oracle must see overlaps), S14-cluster (each new hold's TTL cut
to 1 ms; fenced, and unfenced as its control), S16-cluster (every policy on every master; the
fence control).  All of them share the module's 3 + 3 cluster (``shared_cluster``: settled and
emptied before each test; S16-cluster puts the masters' memory settings back after each policy).
``pytest -s`` prints the figures; ``syncmap torture --only S12-cluster,S14-cluster,S16-cluster
--controls`` runs the long forms and every control.  About 40 s here."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.config import MapConfig
from syncmap.keys import Layout, LockLayout, bucket_of, encode_key
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.lockcheck import LockLoad
from syncmap.testing.lockload import placed
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_eviction import CONTROLS, POLICIES
from syncmap.testing.scenarios_eviction_cluster import s16_cluster
from syncmap.testing.scenarios_lock import s12_cluster, s14_cluster

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str, shared_cluster: ClusterSet) -> Env:
    return Env(redis_binary=cluster_binary, cluster=shared_cluster)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def test_torture_runs_them_on_private_clusters() -> None:
    registry = load_all()
    for sid, fn in (("S12-cluster", s12_cluster), ("S14-cluster", s14_cluster),
                    ("S16-cluster", s16_cluster)):  # fmt: skip
        assert registry[sid].run is fn and registry[sid].faults_server  # never on --url
    assert control_options(s14_cluster) == control_options(s16_cluster) == {"guard": False}
    assert control_options(s12_cluster) is None  # S12 is itself the oracle's proof


def test_the_workload_lock_lives_in_its_keys_bucket_slot(shared_cluster: ClusterSet) -> None:
    """What makes the lock scenarios Cluster ones: the lock is where ``map.lock(key)`` puts it,
    so the fence counter is in the fenced write's slot."""
    cfg = placed(LockLoad(shared_cluster.url))
    lock = LockLayout(cfg.namespace, cfg.lock, cfg.hash_tag)
    defaults = MapConfig()
    bucket = bucket_of(encode_key(cfg.key, defaults.max_key_bytes), defaults.buckets)
    data = Layout("sm", cfg.map, defaults.buckets).data(bucket)
    assert ClusterSet.slot_of(lock.fence) == ClusterSet.slot_of(data)


def test_s12_cluster_unfenced_paused_holders_overlap(env: Env) -> None:
    r = show(s12_cluster(env, 4.0))
    f = r.figures
    assert f["topology"] == "cluster" and f["faults_hit"] > 0
    assert f["overlaps"] > 0 and f["stale_fenced_accepted"] > 0, "the oracle saw nothing"
    assert r.passed, r.failures


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "unfenced-control"])
def test_s14_cluster_ttl_shortening_nemesis(env: Env, fenced: bool) -> None:
    r = show(s14_cluster(env, 4.0, guard=fenced))
    f = r.figures
    assert f["faults_hit"] > 0 and f["second_holders"] > 0
    if fenced:
        assert f["stale_fenced_rejected"] > 0 and f["anomalies"] == 0
        assert r.passed, r.failures
    else:
        assert f["stale_fenced_accepted"] > 0 and f["acked_writes_lost"] > 0
        assert not r.passed


def test_s16_cluster_every_policy_on_every_master_keeps_every_guarantee(env: Env) -> None:
    r = show(s16_cluster(env, 6.0))
    per, evicted = r.figures["per_policy"], r.figures["evicted_per_master"]
    assert set(per) == set(POLICIES)
    for policy in ("allkeys-lru", "allkeys-random"):
        assert per[policy]["evicted_fence"] > 0, "fence counters must have been evicted"
        assert per[policy]["evicted_data"] > 0, "data hashes must have been evicted"
        assert per[policy]["fence_state_lost_refusals"] > 0
        assert len(evicted[policy]) == 3 and all(evicted[policy])
    assert r.figures["stale_fenced_rejected"] > 0
    assert r.passed, r.failures


def test_s16_cluster_fence_control_accepts_stale_writes(env: Env) -> None:
    # Which keys Redis evicts is up to its sampling (S16's controls): caught within three runs.
    figure = CONTROLS["fence"][1]
    for _attempt in range(3):
        r = show(s16_cluster(env, 3.0, control="fence"))
        if r.figures["control_fence"][figure] > 0:
            assert not r.passed, "a guard-off control must fail"
            return
    pytest.fail(f"the fence control did not make {figure} fail in 3 runs")
