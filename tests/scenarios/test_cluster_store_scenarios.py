"""S02 and S03 on a Redis Cluster (issue 14: "the same scenarios as standalone"), short forms for
CI, all on one 3 + 3 cluster per module (``shared_cluster``: each run sets the persistence it
needs and puts the nodes back without, gives a failed-over shard back to its master, and deletes
its map):

* S02-cluster: S01's store workload while clients are killed on every master, every master's
  writes paused once, and one master (AOF ``always``, its replica kept from taking over) killed
  -9 and restarted; its control runs that master without persistence, and must lose writes;
* S03-cluster: steady writes in the map's ``plain`` and ``wait_replicas=1`` modes; every master
  (one per persistence mode: none, everysec, always) killed -9 at once and restarted, then one
  master's replica promoted; its control restarts the ``always`` master without its AOF.

``pytest -s`` prints the figures; ``syncmap torture --only S02-cluster,S03-cluster --controls``
runs the long forms on private clusters."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.scenario import ACKED_LOST, ANOMALIES, Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_store_cluster import s02_cluster, s03_cluster

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str, shared_cluster: ClusterSet) -> Env:
    return Env(redis_binary=cluster_binary, cluster=shared_cluster)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def lost(r: ScenarioResult, cell: str) -> tuple[int, int]:
    """``lost_<cell>`` ("lost/acked") as numbers."""
    n, acked = r.figures[f"lost_{cell}"].split("/")
    return int(n), int(acked)


def test_torture_runs_them_on_private_clusters_with_their_controls() -> None:
    registry = load_all()
    for sid, fn in (("S02-cluster", s02_cluster), ("S03-cluster", s03_cluster)):
        assert registry[sid].run is fn and registry[sid].faults_server  # never on --url
        assert control_options(fn) == {"guard": False}


def test_s02_cluster_loses_nothing_acknowledged_through_kills_pauses_and_a_restart(
    env: Env,
) -> None:
    r = show(s02_cluster(env, 5.0))
    f = r.figures
    assert f["restarts"] == 1 and f["failed_over"] is False and f["keys_on_victim"] > 0
    assert f["pauses"] == 1 and f["clients_killed"] > 0
    assert f["ops_info"] > 0, "connection kills must leave some writes indeterminate"
    assert f["write_latency_max_ms"] >= 200, "the CLIENT PAUSE WRITE must hold some write"
    assert f[ACKED_LOST] == 0 and f[ANOMALIES] == 0 and f["keys_nonlinearizable"] == 0
    assert r.passed, r.failures


def test_s02_cluster_control_a_master_without_persistence_loses_writes(env: Env) -> None:
    r = show(s02_cluster(env, 4.0, guard=False))
    assert r.figures[ACKED_LOST] > 0, "the C7 oracle must see the lost writes"
    assert r.figures["keys_nonlinearizable"] > 0, "so must the linearizability checker"
    assert not r.passed


def test_s03_cluster_always_and_wait_lose_nothing_none_loses_all(env: Env) -> None:
    r = show(s03_cluster(env, 3.0))
    for mode in ("plain", "wait"):
        assert lost(r, f"always_{mode}")[0] == 0
        n, acked = lost(r, f"none_{mode}")
        assert n == acked > 0, "no persistence, no failover: the restart forgets every write"
    assert lost(r, "failover_wait")[0] == 0 and lost(r, "failover_wait")[1] > 0
    assert r.figures[ACKED_LOST] == 0
    assert r.passed, r.failures


def test_s03_cluster_control_the_always_master_without_its_aof_loses_writes(env: Env) -> None:
    r = show(s03_cluster(env, 1.5, guard=False))
    assert lost(r, "always_plain")[0] > 0 and r.figures[ACKED_LOST] > 0
    assert not r.passed
