"""TESTPLAN §8 scenarios for the lock: S12, S13 (SIGSTOP, GIL stall, CLIENT PAUSE), S14, S16.

Each worker is its own OS process (``syncmap.testing.lockload``): a holder paused, stalled or
stripped of its lease keeps believing it holds the lock.  S12 runs the workload *without* fencing
and must see overlapping critical sections: it is the guard-off control that proves the oracle
catches a second holder, so the fenced runs' zeros mean something.  The scenarios live in
``syncmap.testing.scenarios_lock`` (``syncmap torture`` runs their long forms); the two tests at
the end call the workload directly.  ``pytest -s`` prints each scenario's figures.
"""

from __future__ import annotations

import pytest

from syncmap.embedded import EmbeddedRedis
from syncmap.testing.lockload import LockLoad, LockResult, run
from syncmap.testing.scenario import Env, ScenarioResult
from syncmap.testing.scenarios_lock import s12, s13, s14, s16

pytestmark = pytest.mark.scenario


@pytest.fixture
def env(redis_binary: str) -> Env:
    """Scenarios start their own redis-server."""
    return Env(redis_binary=redis_binary)


def show(r: ScenarioResult | LockResult, name: str = "") -> None:
    print(f"\n{name}: {r.summary()}" if name else f"\n{r.summary()}")


def assert_fenced_safe(r: LockResult) -> None:
    """What fencing promises whatever the fault: no superseded write lands, no append is lost."""
    assert r.stale_accepted == 0, r.witnesses
    assert r.lost_appends == 0, r.witnesses
    assert r.refused_but_applied == 0
    assert r.duplicates == 0
    assert r.order_violations == 0
    assert r.rejected_unexplained == 0


# ---- S12 / S13: the holder is paused past its lease -----------------------------------------


def test_s12_unfenced_sigstop_holder_lets_a_second_holder_in(env: Env) -> None:
    """The control: its oracle must see overlaps, stale writes accepted and lost appends."""
    r = s12(env, 6)
    show(r)
    assert r.figures["faults_hit"] > 0, "no SIGSTOP landed on a holder"
    assert r.figures["overlaps"] > 0, "the paused holder and its successor must overlap"
    assert r.figures["stale_fenced_accepted"] > 0, "the resumed unfenced write lands late"
    assert r.figures["acked_writes_lost"] > 0, "and overwrites the appends made meanwhile"
    assert r.passed, r.failures


@pytest.mark.parametrize("variant", ["sigstop", "gil", "client-pause"])
def test_s13_fenced_stalled_holder_stale_writes_are_refused(env: Env, variant: str) -> None:
    """SIGSTOP; a C call that keeps the GIL (the holder's watchdog cannot run); ``CLIENT PAUSE
    WRITE`` (renewals wait in Redis while the lease runs out, critical sections of 1.2-2 leases,
    so the waiters' retries queue ahead of the holder's write)."""
    r = s13(env, 6, variant=variant)
    show(r)
    assert r.figures["faults_hit"] > 0
    if variant == "gil":
        assert r.figures["stalls_observed"] > 0
    assert r.figures["stale_fenced_rejected"] > 0, "a stalled holder's write must be refused"
    assert r.figures["stale_fenced_accepted"] == 0 and r.figures["acked_writes_lost"] == 0
    assert r.figures["anomalies"] == 0
    assert r.passed, r.failures


# ---- S14: the lease ends early in Redis (a clock jump's effect) --------------------------------


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "unfenced"])
def test_s14_ttl_shortening_nemesis(env: Env, fenced: bool) -> None:
    """``PEXPIRE <hold> 1`` on each new holder: what a forward jump of Redis's clock does.

    Waiters learn of the lost lease only when they retry (nobody publishes a release), at the
    latest one lease later: critical sections longer than that make the stale write certain.
    Unfenced is the guard-off run: it must fail.
    """
    r = s14(env, 5, guard=fenced)
    show(r)
    assert r.figures["faults_hit"] > 0
    if fenced:
        assert r.figures["stale_fenced_rejected"] > 0
        assert r.figures["anomalies"] == 0
        assert r.passed, r.failures
    else:
        assert r.figures["second_holders"] > 0, "the nemesis must create second holders"
        assert r.figures["stale_fenced_accepted"] > 0 and r.figures["acked_writes_lost"] > 0
        assert not r.passed


# ---- S16: the hold is evicted ---------------------------------------------------------------


def test_s16_eviction_of_the_hold_is_caught_by_the_fence(env: Env) -> None:
    """``volatile-lru`` under memory pressure evicts the hold (it has a TTL) but never the fence
    counter (it has none): second holders appear, and their predecessors' writes are refused.

    Filler keys (64 KiB, with a TTL, 300 a second) replace the 2 MB of headroom several times a
    second, so every volatile key, the hold included, is about as recently used as any other
    (Redis's LRU clock ticks once a second) and the sampled LRU picks the hold often: 17-22 hold
    evictions per 5 s run here.  A waiter notices an evicted hold only when it retries, up to a
    lease later, so critical sections of 0.2-0.6 s make most evictions a second holder.
    """
    r = s16(env, 5)
    show(r)
    assert r.figures["hold_evictions"] > 0, "the hold must be evicted"
    assert r.figures["fence_evictions"] == 0, "volatile-lru never evicts the fence counter"
    assert r.figures["overlaps"] > 0, "an evicted hold lets a second holder in"
    assert r.figures["stale_fenced_rejected"] > 0
    assert r.figures["anomalies"] == 0
    assert r.passed, r.failures


# ---- no faults: mutual exclusion and no lost update; a killed holder -------------------------


def test_fenced_counter_without_faults_loses_no_increment(redis_server: EmbeddedRedis) -> None:
    cfg = LockLoad(redis_server.url, fenced=True, mode="counter", seconds=3, lease=2.0,
                   cs_min=0.0, cs_max=0.01)  # fmt: skip
    r = run(cfg)
    show(r, "lock counter, no faults")
    assert r.writes_ok > 20 and r.writes_unknown == 0 and r.writes_error == 0
    assert r.final_length == r.writes_ok, "every acknowledged increment must be in the total"
    assert r.overlaps == 0 and r.max_overlap_depth == 1
    assert r.stale_rejected == 0 and r.stale_accepted == 0 and r.releases_lost == 0


def test_a_killed_holders_lock_is_taken_again_after_its_lease(redis_server: EmbeddedRedis) -> None:
    """SIGKILL fresh holders: the next holder enters only once the lease ran out (≈ one lease)."""
    cfg = LockLoad(redis_server.url, fenced=True, fault="kill", seconds=4, lease=0.5)
    r = run(cfg)
    show(r, "lock killed holder (time to recover)")
    assert r.recover_s, "a holder must have been killed and the lock taken again"
    assert all(0.5 * cfg.lease <= s <= 1.5 * cfg.lease + 0.2 for s in r.recover_s), r.recover_s
    assert r.overlaps == 0
    assert_fenced_safe(r)
