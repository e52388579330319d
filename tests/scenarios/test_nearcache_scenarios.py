"""TESTPLAN §8 scenarios for the near cache: S04, S05, S07, S08, S09, short forms for CI.

The scenarios live in ``syncmap.testing.scenarios_cache`` (``syncmap torture`` runs their long
forms).  Every scenario that guards against a bug runs a second time with that guard switched off
(``guard=False``) and must then fail, through the oracle that guards it: only that proves its
green run means something.  ``pytest -s`` prints each scenario's figures.
"""

from __future__ import annotations

from collections import Counter

import pytest

from syncmap.embedded import EmbeddedRedis
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios_cache import require_injected, s04, s05, s07, s08, s09

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    """Scenarios start their own redis-server (they kill, pause and restart it)."""
    return Env(redis_binary=redis_binary)


def show(r: ScenarioResult) -> ScenarioResult:
    print(f"\n{r.summary()}")
    return r


def went_stale(r: ScenarioResult) -> bool:
    """The oracle caught the planted bug: reads stale beyond Δ, or caches diverged after Δ."""
    return bool(r.figures["stale_beyond_delta"] > 0 or r.figures["divergent_entries"] > 0)


# ---- S04 -----------------------------------------------------------------------------------


def test_s04_nearcache_staleness_load_on_a_users_redis(redis_server: EmbeddedRedis) -> None:
    """Run as ``syncmap verify`` does, on a Redis that is not the scenario's: no key left."""
    admin = redis_server.client()
    admin.set("someone-else", "x")
    r = show(s04(Env(url=redis_server.url), 4))
    assert r.figures["reads"] > 1000 and r.figures["hit_ratio"] > 0.5, "exercise the cache"
    assert r.passed, r.failures
    assert admin.keys("*") == [b"someone-else"], "S04 must delete every key it made"
    admin.close()


# ---- S05 -----------------------------------------------------------------------------------


def test_s05_fill_invalidate_race(env: Env) -> None:
    r = show(s05(env, 1, iterations=15))
    assert r.figures["races_provoked"] >= 10
    assert r.passed, r.failures


def test_s05_without_the_fill_gate_caches_stale_values(env: Env) -> None:
    r = show(s05(env, 1, guard=False, iterations=15))
    assert r.figures["permanently_stale"] > 0, "the S05 oracle must catch the fill race"
    assert not r.passed


# ---- S07 -----------------------------------------------------------------------------------


def test_s07_lost_invalidation_disconnect(env: Env) -> None:
    r = show(s07(env, 4, variant="kill"))
    assert r.figures["disconnects"] > 0
    assert r.passed, r.failures


def test_s07_without_gap_and_probe_guards_goes_stale(env: Env) -> None:
    r = show(s07(env, 4, guard=False, variant="kill"))
    assert went_stale(r), "S07's oracle must catch lost invalidations"
    assert not r.passed


def test_s07_fails_a_run_whose_fault_cut_no_subscriber() -> None:
    """The control of S07's own check: a variant that cut nothing (a fault that found no master
    or no subscriber on the node it looked at, as a one-node fault does on a Cluster's other
    masters) fails the run, whatever its oracles say; one that cut some passes it."""
    cut_nothing = ScenarioResult("S07", "control")
    require_injected(cut_nothing, ["kill", "slow-subscriber"], Counter({"slow-subscriber": 1}))
    assert cut_nothing.failures == ["kill: no subscriber was cut (the fault injected nothing)"]
    cut_some = ScenarioResult("S07", "control")
    require_injected(cut_some, ["kill"], Counter({"kill": 3}))
    assert cut_some.passed


def test_s07_slow_subscriber_output_buffer_disconnect(env: Env) -> None:
    """A paused server's subscriber is cut by client-output-buffer-limit; it must heal."""
    r = show(s07(env, 4, variant="slow-subscriber"))
    assert r.figures["disconnects"] == 1
    assert r.passed, r.failures


# ---- S08 -----------------------------------------------------------------------------------


def test_s08_silent_feed_blackhole(env: Env) -> None:
    r = show(s08(env, 5))
    assert r.figures["stalls"] == 1 and r.figures["lost_detected"] > 0, "detect the stall"
    assert r.passed, r.failures


def test_s08_without_probes_a_silent_feed_serves_stale(env: Env) -> None:
    r = show(s08(env, 5, guard=False))
    assert r.figures["stale_beyond_delta"] > 0, "S08's oracle must catch a silent feed"
    assert not r.passed


def test_s08_a_ping_lease_counted_without_its_pong_serves_stale(env: Env) -> None:
    """The PING-lease control: a vouch taken when the PING is sent (not when its answer comes
    back after the messages before it) keeps renewing leases through a silent feed."""
    r = show(s08(env, 5, pong=False))
    assert r.figures["stale_beyond_delta"] > 0, "S08's oracle must catch a PING without PONG"
    assert not r.passed


# ---- S09 -----------------------------------------------------------------------------------


def test_s09_message_gaps_are_detected(env: Env) -> None:
    r = show(s09(env, 4, variant="gap"))
    assert r.figures["gaps_injected"] == 10 and r.figures["gaps_detected"] > 0
    assert r.passed, r.failures


def test_s09_without_gap_detection_lost_messages_stay_stale(env: Env) -> None:
    r = show(s09(env, 4, guard=False, variant="gap"))
    assert went_stale(r), "S09's oracle must catch lost messages"
    assert not r.passed


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_s09_store_reset_drops_everything_within_delta(env: Env, how: str) -> None:
    r = show(s09(env, 4, variant=how))
    assert r.figures["resets"] == 1
    assert r.passed, r.failures


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_s09_without_epoch_checks_a_reset_store_leaves_stale_caches(env: Env, how: str) -> None:
    r = show(s09(env, 4, guard=False, variant=how))
    late, diverged = r.figures["pre_reset_reads"], r.figures["divergent_entries"]
    assert late > 0 or diverged > 0, "S09's oracle must catch a reset store"
    assert not r.passed
