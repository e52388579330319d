"""S16 (TESTPLAN §8, issue 12 §2): real eviction under a small ``maxmemory``, every policy.

The first test runs the four policies (about 2 s each) and requires every oracle to read 0; the
others are the guard-off controls: each switches one protection back to the old behaviour (Guards,
passed to the scripts) under ``allkeys-random`` and must see its oracle fail (``syncmap torture
--controls`` runs all three as ``guard=False``).  ``pytest -s``
prints the figures.  ``syncmap torture -s S16`` runs the long form.
"""

from __future__ import annotations

import pytest

from syncmap.testing.scenario import Env
from syncmap.testing.scenarios_eviction import CONTROLS, POLICIES, s16

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    return Env(redis_binary=redis_binary)


def test_s16_every_policy_keeps_every_guarantee(env: Env) -> None:
    r = s16(env, 8.0)
    print(f"\n{r.summary()}")
    per = r.figures["per_policy"]
    assert set(per) == set(POLICIES)
    for policy in ("allkeys-lru", "allkeys-random"):
        assert per[policy]["evicted_fence"] > 0, "fence counters must have been evicted"
        assert per[policy]["evicted_data"] > 0, "data hashes must have been evicted"
        assert per[policy]["fence_state_lost_refusals"] > 0
    assert r.figures["stale_fenced_rejected"] > 0
    assert r.passed, r.failures


@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_s16_guard_off_control_fails(env: Env, control: str) -> None:
    # Which keys Redis evicts, and when, is up to its sampling: a planted bug shows in most runs,
    # not in all.  The control must catch it within three runs (each run is independent).
    figure = CONTROLS[control][1]
    for _attempt in range(3):
        r = s16(env, 4.0, control=control)
        print(f"\n{r.summary()}")
        if r.figures[f"control_{control}"][figure] > 0:
            assert not r.passed, "a guard-off control must fail"
            return
    pytest.fail(f"{control!r} did not make {figure} fail in 3 runs: the oracle caught nothing")
