"""S09 on a Redis Cluster (issue 14: "the same scenarios as standalone"), short forms for CI: the
store reset under warm caches, FLUSHALL on every master (``flushall``) or on one master only
(``flushall-one``).  Each run starts its own 3 + 3 cluster (~2 s) and three server processes; each
control (the cache guards off: no epoch check, no gap check, no probe) must fail through S09's
oracle.  ``syncmap torture --only S09-cluster --controls`` runs the long form."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster_feed import s09_cluster

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str) -> Env:
    """The scenario starts its own cluster (skipped where the binary has no cluster mode,
    failed under CI=true)."""
    return Env(redis_binary=cluster_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def test_torture_runs_s09_cluster_on_a_private_cluster_with_its_control() -> None:
    registered = load_all()["S09-cluster"]
    assert registered.run is s09_cluster and registered.faults_server  # never on --url
    assert control_options(s09_cluster) == {"guard": False}


@pytest.mark.parametrize("how", ["flushall", "flushall-one"])
def test_s09_cluster_store_reset_drops_everything_within_delta(env: Env, how: str) -> None:
    r = show(s09_cluster(env, 4, variant=how))
    assert r.figures["resets"] == 1 and r.figures["keys_flushed"] > 0, "inject a reset"
    assert r.figures["epoch_changes"] > 0, "the epoch checks must see the reset"
    assert r.passed, r.failures


@pytest.mark.parametrize("how", ["flushall", "flushall-one"])
def test_s09_cluster_without_epoch_checks_a_reset_leaves_stale_caches(env: Env, how: str) -> None:
    r = show(s09_cluster(env, 4, guard=False, variant=how))
    assert r.figures["resets"] == 1 and r.figures["keys_flushed"] > 0, "inject a reset"
    late, diverged = r.figures["pre_reset_reads"], r.figures["divergent_entries"]
    assert late > 0 or diverged > 0, "S09-cluster's oracle must catch a reset store"
    assert not r.passed
