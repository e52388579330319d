"""TESTPLAN §8 scenarios for the lock: S12, S13 (SIGSTOP, GIL stall, CLIENT PAUSE), S14, S16.

Each worker is its own OS process (``syncmap.testing.lockload``): a holder paused, stalled or
stripped of its lease keeps believing it holds the lock.  S12 runs the workload *without* fencing
and must see overlapping critical sections: it is the guard-off control that proves the oracle
catches a second holder, so the fenced runs' zeros mean something.  ``pytest -s`` prints each
scenario's figures.
"""

from __future__ import annotations

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.testing.lockload import LockLoad, LockResult, configure_eviction, run

pytestmark = pytest.mark.scenario
LEASE = 0.5
# Critical sections of 1.2-2 leases (the watchdog keeps them): a waiter's timed retry comes first.
LONG_CS = {"lease": LEASE, "cs_min": 1.2 * LEASE, "cs_max": 2.0 * LEASE}


def show(name: str, r: LockResult) -> None:
    print(f"\n{name}: {r.summary()}")


def assert_fenced_safe(r: LockResult) -> None:
    """What fencing promises whatever the fault: no superseded write lands, no append is lost."""
    assert r.stale_accepted == 0, r.witnesses
    assert r.lost_appends == 0, r.witnesses
    assert r.refused_but_applied == 0
    assert r.duplicates == 0
    assert r.order_violations == 0
    assert r.rejected_unexplained == 0


# ---- S12 / S13: the holder is paused past its lease -----------------------------------------


def test_s12_unfenced_sigstop_holder_lets_a_second_holder_in(redis_server: EmbeddedRedis) -> None:
    r = run(LockLoad(redis_server.url, fenced=False, fault="sigstop", seconds=6))
    show("S12 lock-lease-pause-unfenced", r)
    assert r.faults_hit > 0, "no SIGSTOP landed on a holder"
    assert r.overlaps > 0, "the oracle must see the paused holder and its successor overlap"
    assert r.stale_accepted > 0, "the resumed holder's unfenced write lands after a newer token"
    assert r.lost_appends > 0, "and it overwrites the appends made while it was stopped"


def test_s13_fenced_sigstop_stale_writes_are_refused(redis_server: EmbeddedRedis) -> None:
    r = run(LockLoad(redis_server.url, fenced=True, fault="sigstop", seconds=6))
    show("S13 lock-lease-pause-fenced (SIGSTOP)", r)
    assert r.faults_hit > 0
    assert r.stale_rejected > 0, "a paused holder's write must reach Redis and be refused"
    assert_fenced_safe(r)


def test_s13_fenced_gil_stall_stale_writes_are_refused(redis_server: EmbeddedRedis) -> None:
    """The holder's own process stalls in a C call that keeps the GIL: its watchdog cannot run."""
    r = run(LockLoad(redis_server.url, fenced=True, fault="gil", seconds=6))
    show("S13 lock-lease-pause-fenced (GIL stall)", r)
    assert r.stalls_observed > 0 and r.faults_hit > 0
    assert r.stale_rejected > 0
    assert_fenced_safe(r)


def test_s13_fenced_client_pause_write(redis_server: EmbeddedRedis) -> None:
    """``CLIENT PAUSE WRITE``: renewals wait in Redis while the lease runs out.

    Each pause strikes a fresh holder.  Its critical section outlasts the lease, so the waiters'
    retries (due when the lease they were told of ends) queue in Redis ahead of the holder's write,
    take the expired lock first, and the write arrives stale.
    """
    r = run(LockLoad(redis_server.url, fenced=True, fault="client-pause", seconds=6, **LONG_CS))
    show("S13 lock-lease-pause-fenced (CLIENT PAUSE WRITE)", r)
    assert r.faults_hit > 0
    assert r.stale_rejected > 0
    assert_fenced_safe(r)


# ---- S14: the lease ends early in Redis (a clock jump's effect) --------------------------------


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "unfenced"])
def test_s14_ttl_shortening_nemesis(redis_server: EmbeddedRedis, fenced: bool) -> None:
    """``PEXPIRE <hold> 1`` on each new holder: what a forward jump of Redis's clock does.

    Waiters learn of the lost lease only when they retry (nobody publishes a release), at the
    latest one lease later: critical sections longer than that make the stale write certain.
    """
    r = run(LockLoad(redis_server.url, fenced=fenced, fault="ttl", seconds=5, **LONG_CS))
    show(f"S14 lock-clock-jump ({'fenced' if fenced else 'unfenced'})", r)
    assert r.faults_hit > 0
    if fenced:
        assert r.stale_rejected > 0
        assert_fenced_safe(r)
    else:
        assert r.overlaps > 0, "the nemesis must create second holders"
        assert r.stale_accepted > 0 and r.lost_appends > 0


# ---- S16: the hold is evicted ---------------------------------------------------------------


def test_s16_eviction_of_the_hold_is_caught_by_the_fence(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """``volatile-lru`` under memory pressure evicts the hold (it has a TTL) but never the fence
    counter (it has none): second holders appear, and their predecessors' writes are refused.

    Filler keys (64 KiB, with a TTL, 300 a second) replace the 2 MB of headroom several times a
    second, so every volatile key, the hold included, is about as recently used as any other
    (Redis's LRU clock ticks once a second) and the sampled LRU picks the hold often: 17-22 hold
    evictions per 5 s run here.  A waiter notices an evicted hold only when it retries, up to a
    lease later, so critical sections of 0.2-0.6 s make most evictions a second holder.
    """
    configure_eviction(admin, headroom=2_000_000, policy="volatile-lru")
    cfg = LockLoad(redis_server.url, fenced=True, fault="evict", seconds=5, fill_rate=300,
                   cs_min=0.2, cs_max=0.6)  # fmt: skip
    r = run(cfg)
    show("S16 lock-eviction (volatile-lru)", r)
    assert r.hold_evictions > 0, "the hold must be evicted"
    assert r.fence_evictions == 0, "the fence counter has no TTL: volatile-lru never evicts it"
    assert r.overlaps > 0, "an evicted hold lets a second holder in"
    assert r.stale_rejected > 0
    assert_fenced_safe(r)


# ---- no faults: mutual exclusion and no lost update; a killed holder -------------------------


def test_fenced_counter_without_faults_loses_no_increment(redis_server: EmbeddedRedis) -> None:
    cfg = LockLoad(redis_server.url, fenced=True, mode="counter", seconds=3, lease=2.0,
                   cs_min=0.0, cs_max=0.01)  # fmt: skip
    r = run(cfg)
    show("lock counter, no faults", r)
    assert r.writes_ok > 20 and r.writes_unknown == 0 and r.writes_error == 0
    assert r.final_length == r.writes_ok, "every acknowledged increment must be in the total"
    assert r.overlaps == 0 and r.max_overlap_depth == 1
    assert r.stale_rejected == 0 and r.stale_accepted == 0 and r.releases_lost == 0


def test_a_killed_holders_lock_is_taken_again_after_its_lease(redis_server: EmbeddedRedis) -> None:
    """SIGKILL fresh holders: the next holder enters only once the lease ran out (≈ one lease)."""
    cfg = LockLoad(redis_server.url, fenced=True, fault="kill", seconds=4, lease=0.5)
    r = run(cfg)
    show("lock killed holder (time to recover)", r)
    assert r.recover_s, "a holder must have been killed and the lock taken again"
    assert all(0.5 * cfg.lease <= s <= 1.5 * cfg.lease + 0.2 for s in r.recover_s), r.recover_s
    assert r.overlaps == 0
    assert_fenced_safe(r)
