"""S26-cluster (fork) and S27-cluster (outage policy, one master black-holed) on a Redis Cluster
(issue 14: "the same scenarios as standalone"), short forms on one 3 + 3 cluster per module
(``shared_cluster``: each run leaves it settled, every master announcing its own port, and
deletes its keys).

* S26-cluster: pool children and a forked child on ``redis+cluster://`` maps and ``map.lock``
  locks; its control (``forksafe`` off) must fail.
* S27-cluster (each run on a private cluster, ``redis_cluster``: the cut left the shared one's
  replica of that master un-acknowledging for over 30 s in two CI runs, failing the next
  test's FLUSHALL): one master black-holed for ``max_stale_age`` + 1 s, both policies, one round
  each: the cut master's buckets keep the policy, the other masters' are served fresh (none
  flagged stale: their leases stay renewed while every probe waits ``probe_deadline`` for the
  hung master, docs/outages.md §Cluster).  Its control (``stale_bound`` off: the cut master's
  entries served past ``max_stale_age``) must fail.

``syncmap torture --only S26-cluster,S27-cluster --controls`` runs the long forms."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster_fork import s26_cluster
from syncmap.testing.scenarios_cluster_outage import s27_cluster

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str) -> Env:
    return Env(redis_binary=cluster_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def test_torture_runs_them_on_private_clusters_with_their_controls() -> None:
    registry = load_all()
    for sid, fn in (("S26-cluster", s26_cluster), ("S27-cluster", s27_cluster)):
        assert registry[sid].run is fn and registry[sid].faults_server  # never on --url
        assert control_options(fn) == {"guard": False}


def test_s26_cluster_forked_children_start_over_on_every_master(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s26_cluster(env, 1.0, cluster=shared_cluster))
    f = r.figures
    assert f["servers"] == 3 and f["children"] > 1
    assert all(n >= f["children"] for n in f["child_feed_connections"].values())
    assert r.passed, r.failures


def test_s26_cluster_without_forksafe_children_share_the_parents_connections(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = show(s26_cluster(env, 1.0, guard=False, cluster=shared_cluster))
    f = r.figures
    assert f["shared_connections"] > 0 and f["child_feeds_missing"] > 0, (
        "the oracles caught nothing"
    )
    assert not r.passed


def test_s27_cluster_one_hung_master_leaves_the_others_buckets_fresh(
    env: Env, redis_cluster: ClusterSet
) -> None:
    r = show(s27_cluster(env, 0.0, cluster=redis_cluster))
    f = r.figures
    assert f["cut_writes_during_cut"] > 0 and f["others_reads"] > 0
    assert r.passed, r.failures


def test_s27_cluster_without_the_stale_bound_serves_past_max_stale_age(
    env: Env, redis_cluster: ClusterSet
) -> None:
    r = show(s27_cluster(env, 0.0, guard=False, cluster=redis_cluster))
    assert r.figures["stale_beyond_max_age"] > 0, "the oracle caught nothing"
    assert r.figures["cut_writes_during_cut"] > 0  # the writer went direct
    assert not r.passed
