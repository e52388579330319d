"""S10 sentinel-failover (issue 13 §6), short form: the master SIGSTOPped past down-after while
maps write and read through near caches, Sentinel fails over, the old master resumes.  Each
variant on its own Sentinel set (~12-20 s each).  The control (maps pinned to the first master's
address, no Sentinel) must fail.  ``pytest -s`` prints the figures; ``syncmap torture --only S10``
runs the long form, which adds the ``min-replicas`` variant (~20 s; left out here to keep the
suite near ten minutes; doctor's durability check is tested on min-replicas-to-write in
tests/integration/test_topology.py)."""

from __future__ import annotations

import pytest

from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_sentinel import PLAIN_LOSS_BOUND, s10

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(sentinel_binary: str) -> Env:
    """S10 starts a fresh Sentinel set per variant (skipped where the binary has no Sentinel
    mode, failed under CI=true)."""
    return Env(redis_binary=sentinel_binary)


def test_s10_plain_keeps_caches_convergent(env: Env) -> None:
    """With the default 5 s socket timeout: the topology's cap (half of down-after) keeps writers
    off the resumed old master, so plain mode loses at most replication's last instant."""
    r = s10(env, 0.0, variants=("plain",))
    print(f"\n{r.summary()}")
    f = r.figures
    assert f["socket_timeout_s"] == 5.0
    assert f["plain_divergent"] == 0
    assert f["plain_acked_lost"] <= PLAIN_LOSS_BOUND
    assert f["plain_failover_s"] is not None and f["plain_detection_s"] is not None
    assert f["plain_refused_unavailable"] + f["plain_refused_unknown"] > 0  # the pause was felt
    assert r.passed, r.failures


def test_s10_wait_loses_no_acknowledged_write(env: Env) -> None:
    r = s10(env, 0.0, variants=("wait",))
    print(f"\n{r.summary()}")
    f = r.figures
    assert f["wait_acked_lost"] == 0 and f["wait_divergent"] == 0
    # The new master has no replica to confirm WAIT until the old one is demoted and synced.
    assert f["wait_refused_not_replicated"] > 0
    assert r.passed, r.failures


def test_s10_control_pinned_to_the_old_master_fails(env: Env) -> None:
    r = s10(env, 0.0, guard=False)
    print(f"\n{r.summary()}")
    f = r.figures
    assert f["plain_acked_lost"] > 0 or f["plain_divergent"] > 0, "the oracle caught nothing"
    assert not r.passed
