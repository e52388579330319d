"""TESTPLAN S01, S04, S07 and S13 with asyncio clients mixed with sync ones on one map (issue 15
§5): short forms of S01a, S04a, S07a, S13a (``syncmap.testing.scenarios_async``; ``syncmap
torture`` runs the long ones).  Each guarded one also runs with its guard off and must fail.
``pytest -s`` prints the figures."""

from __future__ import annotations

import pytest

from syncmap.testing.scenario import ANOMALIES, OPS, Env, ScenarioResult
from syncmap.testing.scenarios import load_all
from syncmap.testing.scenarios_async import s01a, s04a, s07a, s13a

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    return Env(redis_binary=redis_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def test_the_async_variants_are_registered_for_torture() -> None:
    registry = load_all()
    assert {"S01a", "S04a", "S07a", "S13a"} <= set(registry)
    assert registry["S07a"].faults_server and not registry["S04a"].faults_server


def test_s01a_linearizable_with_a_sync_and_an_async_server(env: Env) -> None:
    r = show(s01a(env, 2.0))
    assert r.id == "S01a" and r.figures["drivers"] == "sync,async"
    assert r.passed, r.failures
    assert r.figures[OPS] > 300 and r.figures["keys_nonlinearizable"] == 0


def test_s01a_oracle_catches_a_planted_stale_read(env: Env) -> None:
    r = show(s01a(env, 1.0, plant=True))
    assert not r.passed and r.figures[ANOMALIES] > 0


def test_s04a_staleness_with_async_and_sync_servers(env: Env) -> None:
    r = show(s04a(env, 3))
    assert r.figures["reads"] > 600 and r.figures["hit_ratio"] > 0.5, "exercise the caches"
    assert r.passed, r.failures


def test_s07a_lost_invalidations_on_async_servers(env: Env) -> None:
    r = show(s07a(env, 4, variant="kill"))
    assert r.figures["disconnects"] > 0
    assert r.passed, r.failures


def test_s07a_without_gap_and_probe_guards_goes_stale(env: Env) -> None:
    r = show(s07a(env, 4, guard=False, variant="kill"))
    assert r.figures["stale_beyond_delta"] > 0 or r.figures["divergent_entries"] > 0
    assert not r.passed


@pytest.mark.parametrize("guard", [True, False], ids=["fenced", "unfenced"])
def test_s13a_a_stalled_async_or_sync_holder(env: Env, guard: bool) -> None:
    """The GIL stall: an asyncio holder's loop (and its lease-renewal task) stops with it."""
    r = show(s13a(env, 6, guard=guard, variant="gil"))
    assert r.figures["faults_hit"] > 0 and r.figures["stalls_observed"] > 0
    assert r.figures["faults_hit_async"] > 0, "no asyncio holder was stalled"
    if guard:
        assert r.figures["stale_fenced_rejected"] > 0, "a stalled holder's write must be refused"
        assert r.figures[ANOMALIES] == 0
        assert r.passed, r.failures
    else:
        assert r.figures["stale_fenced_accepted"] > 0 or r.figures["acked_writes_lost"] > 0
        assert not r.passed
