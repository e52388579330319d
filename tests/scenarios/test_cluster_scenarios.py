"""Redis Cluster topology scenarios (TESTPLAN §8, issue 14 item 6), short forms for CI: S24 a
shard's master killed, S25 the slots of a map's buckets migrated, S28 a shard's subscriber
connections killed.  Each starts its own 3 + 3 cluster (~2 s) and its three server processes;
each control (the cache guards off: no probe, no gap or epoch check) must fail through the
oracle that guards it.  ``pytest -s`` prints the figures; ``syncmap torture --only
S24,S25,S28 --controls`` runs the long forms.  About 60 s for the six runs here."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster import PLAIN_LOSS_BOUND, s24, s25, s28

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str) -> Env:
    """The scenarios start their own cluster (skipped where the binary has no cluster mode,
    failed under CI=true)."""
    return Env(redis_binary=cluster_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def went_stale(r: ScenarioResult) -> bool:
    return r.figures["stale_beyond_delta"] > 0 or r.figures["divergent_entries"] > 0


def test_torture_runs_them_on_private_clusters_with_their_controls() -> None:
    registry = load_all()
    for sid, fn in (("S24", s24), ("S25", s25), ("S28", s28)):
        assert registry[sid].run is fn and registry[sid].faults_server  # never on --url
        assert control_options(fn) == {"guard": False}


def test_s24_a_killed_shard_master_loses_nothing_acknowledged_and_no_cache_diverges(
    env: Env,
) -> None:
    r = show(s24(env, 6.0))
    f = r.figures
    assert f["failover_s"] is not None and f["cache_detection_s"] is not None
    assert f["plain_detection_s"] is not None and f["wait_detection_s"] is not None
    assert f["plain_keys_on_failed_shard"] > 0 and f["wait_keys_on_failed_shard"] > 0
    assert f["wait_acked_lost"] == 0 and f["plain_acked_lost"] <= PLAIN_LOSS_BOUND
    assert f["stale_beyond_delta"] == 0 and f["divergent_entries"] == 0
    assert f["affected_buckets_flushed"] > 0  # the dead master's buckets were dropped
    assert r.passed, r.failures


def test_s24_control_without_cache_guards_serves_stale_after_the_failover(env: Env) -> None:
    r = show(s24(env, 4.0, guard=False))
    assert went_stale(r), "the oracle caught nothing"
    assert not r.passed


def test_s25_migrated_bucket_slots_keep_caches_and_store_coherent(env: Env) -> None:
    r = show(s25(env, 4.0))
    f = r.figures
    assert f["migrations"] >= 2 and f["keys_moved"] >= 2
    assert f["redirects_ask"] + f["redirects_moved"] > 0  # the clients were redirected
    assert f["plain_keys_nonlinearizable"] == 0 and f["acked_writes_lost"] == 0
    assert f["other_buckets_flushed"] == 0
    assert r.passed, r.failures


def test_s25_control_without_cache_guards_serves_stale_after_a_migration(env: Env) -> None:
    r = show(s25(env, 3.5, guard=False))
    assert went_stale(r), "the oracle caught nothing"
    assert not r.passed


def test_s28_a_shards_lost_subscribers_cost_only_its_buckets(env: Env) -> None:
    r = show(s28(env, 4.0))
    f = r.figures
    assert f["feed_kills"] >= 2 and f["rounds_repaired"] >= 1
    assert f["detection_s_max"] is not None and f["detection_s_max"] <= 1.0  # within Δ
    assert f["other_buckets_flushed"] == 0
    assert r.passed, r.failures


def test_s28_control_without_cache_guards_never_repairs(env: Env) -> None:
    r = show(s28(env, 3.5, guard=False))
    assert went_stale(r), "the oracle caught nothing"
    assert r.figures["rounds_repaired"] == 0
    assert not r.passed
