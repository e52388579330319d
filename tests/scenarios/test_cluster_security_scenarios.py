"""S19-cluster security-forged-messages on a Redis Cluster (issue 14), short form on one 3 + 3
cluster per module (``shared_cluster``): an ACL user allowed only ``SPUBLISH`` on the map's
bucket channels (on every master) injects forged, tampered, replayed, old-epoch, oversized and
current-sequence messages on each bucket's channel on its master, while a load runs, with a
signing key and without; a malicious pickle is planted in a value.  Its control: with a key and
the MAC check off, forged changes are applied.  (S19's ``digest`` control does not apply on this
route: ``scenarios_cluster_security``'s docstring says why.)  ``syncmap torture --only
S19-cluster --controls`` runs the long form and the control."""

from __future__ import annotations

import pytest

from syncmap.cli.torture import control_options
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.scenario import Env
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_cluster_security import s19_cluster
from syncmap.testing.scenarios_security import KINDS

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(cluster_binary: str) -> Env:
    return Env(redis_binary=cluster_binary)


def test_torture_runs_it_on_a_private_cluster_with_its_controls() -> None:
    registered = load_all()["S19-cluster"]
    assert registered.run is s19_cluster and registered.faults_server  # never on --url
    assert control_options(s19_cluster) == {"guard": False}


def test_s19_cluster_forged_messages_change_nothing_they_must_not(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = s19_cluster(env, 4.0, cluster=shared_cluster)
    print(f"\n{r.summary()}")
    for label in ("key", "no_key"):
        run = r.figures["runs"][label]
        assert set(run["injected"]) == set(KINDS)
        assert run["ops"] > 0 and run["write_errors"] == 0
    assert r.figures["runs"]["key"]["dropped"]["forged_messages"] > 0
    assert r.figures["forged_accepted_without_key"] > 0, "without a key forgeries do apply"
    assert r.passed, r.failures


def test_s19_cluster_without_the_mac_check_forged_changes_are_applied(
    env: Env, shared_cluster: ClusterSet
) -> None:
    r = s19_cluster(env, 0.0, guard=False, cluster=shared_cluster)
    print(f"\n{r.summary()}")
    assert r.figures["control"] == "mac"
    assert r.figures["control_mac"]["forged_accepted"] > 0, "the oracle caught nothing"
    assert not r.passed
