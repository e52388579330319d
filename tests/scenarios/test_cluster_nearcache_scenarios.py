"""S05, S08 and S09 on a Redis Cluster (issue 14: "the same scenarios as standalone"), short
forms for CI, all on one 3 + 3 cluster per module (``shared_cluster``: each scenario leaves it
settled, its masters announcing their own ports, and a fresh map per run):

* S05-cluster: the fill race, a master's data path slowed by the proxy it announces;
* S08-cluster: the sharded subscriber connections to one master stalled, nothing else;
* S09-cluster: ``gap`` (ghost writes: messages never sent), ``restart`` (a master restarted
  without persistence, no failover), ``flushall`` (every master), ``flushall-one`` (one).

Each control (its guard off: the fill gate; the probes; gap, probe and epoch checks) must fail
through the scenario's oracle; ``restart``'s control runs in ``syncmap torture`` only (the
suite's time).  ``syncmap torture --only S05-cluster,S08-cluster,S09-cluster --controls`` runs
the long forms."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster_feed import s05_cluster, s08_cluster, s09_cluster

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str) -> Env:
    return Env(redis_binary=cluster_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def test_torture_runs_them_on_private_clusters_with_their_controls() -> None:
    registry = load_all()
    for sid, fn in (("S05-cluster", s05_cluster), ("S08-cluster", s08_cluster),
                    ("S09-cluster", s09_cluster)):  # fmt: skip
        assert registry[sid].run is fn and registry[sid].faults_server  # never on --url
        assert control_options(fn) == {"guard": False}


# ---- S05 -----------------------------------------------------------------------------------


def test_s05_cluster_fill_race_on_a_slow_master(env: Env, shared_cluster: ClusterSet) -> None:
    r = show(s05_cluster(env, 1, iterations=12, cluster=shared_cluster))
    assert r.figures["proxied_subscribers"] > 0  # the feed went through the proxy, undelayed
    assert r.figures["races_provoked"] >= 8
    assert r.passed, r.failures


def test_s05_cluster_without_the_fill_gate_caches_stale_values(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s05_cluster(env, 1, guard=False, iterations=12, cluster=shared_cluster))
    assert r.figures["permanently_stale"] > 0, "the S05 oracle must catch the fill race"
    assert not r.passed


# ---- S08 -----------------------------------------------------------------------------------


def test_s08_cluster_one_masters_silent_feed_is_repaired_within_delta(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s08_cluster(env, 3.5, cluster=shared_cluster))
    f = r.figures
    assert f["stalls"] == 1 and f["subscribers_stalled"] > 0, "stall the subscribers"
    assert f["stall_writes"] > 0 and f["repaired"] == f["stall_writes"]
    assert f["detection_s_max"] <= 1.0 and f["other_buckets_flushed"] == 0
    assert f["replicas_through_proxy"] == 1  # the replica replicated through the proxy
    assert r.passed, r.failures


def test_s08_cluster_without_probes_a_silent_master_serves_stale(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s08_cluster(env, 3.5, guard=False, cluster=shared_cluster))
    assert r.figures["stalls"] == 1 and r.figures["subscribers_stalled"] > 0
    assert r.figures["stale_beyond_delta"] > 0, "S08's oracle must catch a silent feed"
    assert not r.passed


def test_s08_cluster_a_ping_lease_counted_without_its_pong_serves_stale(
    env: Env, shared_cluster: ClusterSet
) -> None:
    """The PING-lease control on a Cluster: the silent master's node connection vouches for
    its buckets when its PING is sent, not when the answer comes after the messages."""
    r = show(s08_cluster(env, 3.5, pong=False, cluster=shared_cluster))
    assert r.figures["stalls"] == 1 and r.figures["subscribers_stalled"] > 0
    assert r.figures["stale_beyond_delta"] > 0, "S08's oracle must catch a PING without PONG"
    assert not r.passed


# ---- S09 -----------------------------------------------------------------------------------


def test_s09_cluster_every_lost_message_is_repaired(env: Env, shared_cluster: ClusterSet) -> None:
    r = show(s09_cluster(env, 3.5, variant="gap", cluster=shared_cluster))
    f = r.figures
    assert f["gaps_injected"] == 8 and f["gaps_repaired_by_observer"] == 8
    assert r.passed, r.failures


def test_s09_cluster_without_gap_detection_lost_messages_stay_stale(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s09_cluster(env, 3.5, guard=False, variant="gap", cluster=shared_cluster))
    assert r.figures["gaps_injected"] == 8 and r.figures["gaps_repaired_by_observer"] == 0
    assert r.figures["stale_beyond_delta"] > 0 or r.figures["divergent_entries"] > 0
    assert not r.passed


def test_s09_cluster_a_master_restarted_empty_resets_its_buckets_only(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s09_cluster(env, 3.5, variant="restart", cluster=shared_cluster))
    f = r.figures
    assert f["resets"] == 1 and f["keys_flushed"] > 0 and f["failed_over"] is False
    assert f["epoch_changes"] > 0, "the epoch checks must see the restart"
    assert f["other_buckets_flushed"] == 0
    assert r.passed, r.failures


@pytest.mark.parametrize("how", ["flushall", "flushall-one"])
def test_s09_cluster_store_reset_drops_everything_within_delta(
    env: Env, shared_cluster: ClusterSet, how: str
) -> None:
    r = show(s09_cluster(env, 4, variant=how, cluster=shared_cluster))
    assert r.figures["resets"] == 1 and r.figures["keys_flushed"] > 0, "inject a reset"
    assert r.figures["epoch_changes"] > 0, "the epoch checks must see the reset"
    assert r.passed, r.failures


@pytest.mark.parametrize("how", ["flushall", "flushall-one"])
def test_s09_cluster_without_epoch_checks_a_reset_leaves_stale_caches(
    env: Env, shared_cluster: ClusterSet, how: str
) -> None:
    r = show(s09_cluster(env, 4, guard=False, variant=how, cluster=shared_cluster))
    assert r.figures["resets"] == 1 and r.figures["keys_flushed"] > 0, "inject a reset"
    late, diverged = r.figures["pre_reset_reads"], r.figures["divergent_entries"]
    assert late > 0 or diverged > 0, "S09-cluster's oracle must catch a reset store"
    assert not r.passed
