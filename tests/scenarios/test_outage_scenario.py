"""S27 outage-policy (issue 17 §3), short form: both ``on_store_down`` policies under a cut of one
map's path longer than ``max_stale_age`` while another map writes.  The guard-off control
(``Guards.stale_bound`` off) must fail.  ``pytest -s`` prints the figures; ``syncmap torture
--only S27`` runs the long form."""

from __future__ import annotations

import pytest

from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_outage import s27

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    return Env(redis_binary=redis_binary)


def test_s27_both_policies_keep_their_bounds(env: Env) -> None:
    r = s27(env, 0.0)  # one round of each policy
    print(f"\n{r.summary()}")
    f = r.figures
    assert f["strict_beyond_delta"] == 0 and f["strict_flagged"] == 0
    assert f["stale_beyond_max_age"] == 0 and f["stale_beyond_delta"] == 0
    assert f["stale_flagged"] == f["stale_counted"] > 0
    assert r.passed, r.failures


def test_s27_guard_off_control_fails(env: Env) -> None:
    r = s27(env, 0.0, guard=False)
    print(f"\n{r.summary()}")
    assert r.figures["stale_beyond_max_age"] > 0, "the oracle caught nothing"
    assert not r.passed
