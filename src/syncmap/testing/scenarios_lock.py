"""Lock scenarios of TESTPLAN §8: S12, S13, S14, S16, registered for tests and ``syncmap torture``.

Each runs :func:`syncmap.testing.lockload.run` (worker processes appending to a list under the
lock, a fault on whoever holds it) on a private ``redis-server`` and turns its
:class:`~syncmap.testing.lockcheck.LockResult` into standard figures:

``stale_fenced_accepted``  acknowledged writes whose token was already superseded (C8, must 0)
``stale_fenced_rejected``  writes refused by the fence (the fault must produce some)
``acked_writes_lost``      acknowledged appends missing from the final list
``anomalies``              stale accepted + lost + duplicates + refused-but-applied + out of order
                           + refusals without cause

S12 is the control: the same workload *unfenced*, which passes when the oracle sees overlapping
critical sections and the damage they do (its figures carry ``control``).  S13 and S14 take
``guard=False`` to run unfenced; they must then report failures.

S12-cluster and S14-cluster are S12 and S14 on a Redis Cluster (a private 3 + 3 one, or the one
``Env.cluster`` shares): ``lockload.run`` puts the lock under its key's bucket tag, where
``map.lock(key)`` puts one, so the fence counter is in the fenced write's slot, and the nemesis
reads the holder (and cuts its TTL) on that slot's master.

A lock run scales with ``seconds`` by itself (faults repeat until the end); variants split it,
each getting at least the length its test form uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from .lockcheck import LockLoad, LockResult
from .lockload import configure_eviction, run
from .scenario import (
    ACKED_LOST,
    ANOMALIES,
    FENCED_ACCEPTED,
    FENCED_REJECTED,
    OPS,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)

LEASE = 0.5
S13_DOWN_AFTER_MS = 5000  # S13 on Sentinel: see _run_on_store
# Critical sections of 1.2-2 leases (the watchdog keeps them): a waiter's timed retry comes first.
LONG_CS: dict[str, Any] = {"lease": LEASE, "cs_min": 1.2 * LEASE, "cs_max": 2.0 * LEASE}
CONTROL = "control"  # figure present on a control scenario: its anomalies are expected

S13Variant = Literal["sigstop", "gil", "client-pause"]
S13_VARIANTS: tuple[S13Variant, ...] = ("sigstop", "gil", "client-pause")


def anomalies(r: LockResult) -> int:
    """Violations of what fencing promises, whatever the fault."""
    return (
        r.stale_accepted
        + r.lost_appends
        + r.refused_but_applied
        + r.duplicates
        + r.order_violations
        + r.rejected_unexplained
    )


def lock_figures(result: ScenarioResult, runs: Sequence[LockResult]) -> None:
    """The figures of ``runs`` (summed; latencies: the worst) into ``result``."""
    f = result.figures

    def total(attr: str) -> int:
        return sum(int(getattr(r, attr)) for r in runs)

    f[OPS] = total("acquisitions")
    f[ANOMALIES] = sum(anomalies(r) for r in runs)
    f[FENCED_ACCEPTED] = total("stale_accepted")
    f[FENCED_REJECTED] = total("stale_rejected")
    f[ACKED_LOST] = total("lost_appends")
    f["overlaps"] = total("overlaps")
    f["max_overlap_depth"] = max((r.max_overlap_depth for r in runs), default=0)
    f["faults_injected"] = sum(r.faults_injected for r in runs)
    f["faults_hit"] = sum(r.faults_hit for r in runs)
    for attr in ("failed_acquisitions", "writes_ok", "writes_unknown", "writes_error",
                 "duplicates", "refused_but_applied", "order_violations", "rejected_unexplained",
                 "releases_lost", "stalls_observed"):  # fmt: skip
        f[attr] = total(attr)
    f["acquire_p50_ms"] = round(max((r.acquire_p50_ms for r in runs), default=0.0), 1)
    f["acquire_p99_ms"] = round(max((r.acquire_p99_ms for r in runs), default=0.0), 1)


def require_fenced_safe(result: ScenarioResult, r: LockResult, label: str = "") -> None:
    """What fencing promises whatever the fault: no superseded write lands, no append is lost."""
    at = f"{label}: " if label else ""
    stale = [w for w in r.witnesses if w.startswith("stale ACCEPTED")][:3]
    lost = [w for w in r.witnesses if w.startswith("lost append")][:3]
    checks = (
        (r.stale_accepted, f"stale fenced writes accepted; e.g. {stale}"),
        (r.lost_appends, f"acknowledged appends lost; e.g. {lost}"),
        (r.refused_but_applied, "refused writes found applied"),
        (r.duplicates, "duplicate appends"),
        (r.order_violations, "appends out of token order"),
        (r.rejected_unexplained, "writes refused with no newer token issued"),
    )
    for count, what in checks:
        result.require(count == 0, f"{at}{count} {what}")


def _run_on_store(env: Env, **kwargs: Any) -> LockResult:
    """The lock workload on a private store of ``env.topology`` (or the shared cluster of
    ``env.cluster``): one ``redis-server``, a Sentinel set or a Redis Cluster, where
    ``lockload.run`` puts the lock in its key's bucket slot, as ``map.lock(key)`` does.

    On Sentinel with a down-after of 5 s: the data sockets time out at half of it, 2.5 s, longer
    than the longest stall (3 leases, 1.5 s), as on one server (5 s).  With the usual test set's
    1 s the cap is 0.5 s: a holder's write held by ``client-pause`` times out (outcome unknown)
    instead of reaching Redis and being refused, and S13 cannot see the fence at work (measured:
    0 refused, 2 unknown, none accepted).  Nothing here fails over, so down-after is not waited
    for."""
    with env.store(down_after_ms=S13_DOWN_AFTER_MS) as store:
        return run(LockLoad(store.url, **kwargs))


# ---- S12 --------------------------------------------------------------------------------------


@scenario("S12", "lock-lease-pause-unfenced")
def s12(env: Env, seconds: float = 6.0) -> ScenarioResult:
    """The control: unfenced writes, holders SIGSTOPped past their lease.  Passes when the oracle
    sees overlapping critical sections, stale writes accepted and appends lost."""
    result, started = timed("S12", "lock-lease-pause-unfenced")
    r = _run_on_store(env, fenced=False, fault="sigstop", seconds=max(seconds, 4.0))
    lock_figures(result, [r])
    result.figures[CONTROL] = "unfenced: overlaps and lost appends expected"
    result.require(r.faults_hit > 0, "no SIGSTOP landed on a holder")
    result.require(
        r.overlaps > 0, "the oracle must see the paused holder and its successor overlap"
    )
    result.require(
        r.stale_accepted > 0, "the resumed holder's unfenced write must land after a newer token"
    )
    result.require(r.lost_appends > 0, "and overwrite the appends made while it was stopped")
    return finish(result, started)


# ---- S13 --------------------------------------------------------------------------------------


@scenario("S13", "lock-lease-pause-fenced")
def s13(
    env: Env,
    seconds: float = 6.0,
    *,
    guard: bool = True,
    variant: S13Variant | None = None,
    drivers: tuple[str, ...] = (),
) -> ScenarioResult:
    """Fenced writes; the holder stalls past its lease: ``sigstop`` (SIGSTOP), ``gil`` (a C call
    holding the GIL: its own watchdog cannot run), ``client-pause`` (CLIENT PAUSE WRITE: renewals
    wait in Redis; critical sections of 1.2-2 leases).  Stale writes must be refused (> 0) and
    none accepted.  ``guard=False`` runs unfenced.  No ``variant``: all three.  ``drivers``:
    each worker's driver, cycled (``LockLoad.drivers``; S13a mixes in asyncio).  On
    ``env.topology``'s store (``client-pause`` pauses the master)."""
    result, started = timed("S13", "lock-lease-pause-fenced")
    variants = S13_VARIANTS if variant is None else (variant,)
    runs: list[LockResult] = []
    for v in variants:
        extra = LONG_CS if v == "client-pause" else {}
        length = max(seconds / len(variants), 6.0)
        r = _run_on_store(env, fenced=guard, fault=v, seconds=length, drivers=drivers, **extra)
        runs.append(r)
        result.require(r.faults_hit > 0, f"{v}: no fault landed on a holder")
        if v == "gil":
            result.require(r.stalls_observed > 0, "gil: no GIL stall was observed")
        refused = f"{v}: a stalled holder's write must reach Redis and be refused"
        result.require(r.stale_rejected > 0, refused)
        require_fenced_safe(result, r, v)
    lock_figures(result, runs)
    result.figures["variants"] = ",".join(variants)
    if drivers:  # which kind of holder the faults stalled (S13a: the asyncio ones must be hit)
        cfg = LockLoad("", drivers=drivers)
        hits = [
            cfg.driver(f.worker) for r in runs for f in r.faults if f.hit and f.worker is not None
        ]
        result.figures["faults_hit_async"] = hits.count("async")
        result.figures["faults_hit_sync"] = hits.count("sync")
    return finish(result, started)


# ---- S14 --------------------------------------------------------------------------------------


@scenario("S14", "lock-clock-jump")
def s14(env: Env, seconds: float = 5.0, *, guard: bool = True) -> ScenarioResult:
    """``PEXPIRE <hold> 1`` on each new holder: what a forward jump of Redis's clock does.

    Waiters learn of the lost lease only when they retry, at the latest one lease later: critical
    sections of 1.2-2 leases make the stale write certain.  Fenced: refused, none accepted.
    ``guard=False`` runs unfenced: second holders and accepted stale writes must show up as
    failures."""
    result, started = timed("S14", "lock-clock-jump")
    r = _run_on_store(env, fenced=guard, fault="ttl", seconds=max(seconds, 4.0), **LONG_CS)
    lock_figures(result, [r])
    result.figures["second_holders"] = r.overlaps
    result.require(r.faults_hit > 0, "no TTL cut landed on a holder")
    result.require(r.stale_rejected > 0, "a superseded holder's write must be refused")
    require_fenced_safe(result, r)
    return finish(result, started)


# ---- S12 and S14 on a Redis Cluster -------------------------------------------------------------


def on_cluster(env: Env) -> Env:
    """``env`` on a Redis Cluster: the one ``env.cluster`` shares, else a private 3 + 3 one
    (always private under ``syncmap torture``, also with ``--url``)."""
    return dataclasses.replace(env, url=None, topology="cluster")


def as_cluster(r: ScenarioResult) -> ScenarioResult:
    r.id += "-cluster"
    r.name += "-cluster"
    r.figures["topology"] = "cluster"
    return r


@scenario("S12-cluster", "lock-lease-pause-unfenced-cluster")
def s12_cluster(env: Env, seconds: float = 6.0) -> ScenarioResult:
    """S12 on a Redis Cluster: the lock lives in the slot of its key's bucket (as
    ``map.lock(key)`` places one), the nemesis reads its holder on that slot's master; the
    writes are not fenced, so the oracle must see the overlaps and their damage."""
    return as_cluster(s12(on_cluster(env), seconds))


@scenario("S14-cluster", "lock-clock-jump-cluster")
def s14_cluster(env: Env, seconds: float = 5.0, *, guard: bool = True) -> ScenarioResult:
    """S14 on a Redis Cluster: ``PEXPIRE <hold> 1`` on the master of the lock's slot (the
    key's bucket slot, so the fence counter is in the fenced write's slot).  ``guard=False``
    runs unfenced and must fail."""
    return as_cluster(s14(on_cluster(env), seconds, guard=guard))


# ---- S16 --------------------------------------------------------------------------------------


@scenario("S16L", "lock-eviction")  # S16 proper (every policy, map keys too): scenarios_eviction
def s16(env: Env, seconds: float = 5.0) -> ScenarioResult:
    """``volatile-lru`` under memory pressure evicts the hold (it has a TTL) but never the fence
    counter (it has none): second holders appear, and their predecessors' writes are refused.

    Filler keys (64 KiB with a TTL, 300 a second) replace 2 MB of headroom several times a
    second; critical sections of 0.2-0.6 s make most evictions a second holder."""
    result, started = timed("S16", "lock-eviction")
    with env.server() as server:
        admin = server.client()
        try:
            configure_eviction(admin, headroom=2_000_000, policy="volatile-lru")
        finally:
            admin.close()
        cfg = LockLoad(
            server.url,
            fenced=True,
            fault="evict",
            seconds=max(seconds, 4.0),
            fill_rate=300,
            cs_min=0.2,
            cs_max=0.6,
        )
        r = run(cfg)
    lock_figures(result, [r])
    f = result.figures
    f["hold_evictions"] = r.hold_evictions
    f["fence_evictions"] = r.fence_evictions
    f["keys_evicted"] = r.keys_evicted
    result.require(r.hold_evictions > 0, "the hold must be evicted")
    result.require(
        r.fence_evictions == 0, f"the fence counter was evicted {r.fence_evictions} times"
    )
    result.require(r.overlaps > 0, "an evicted hold must let a second holder in")
    result.require(r.stale_rejected > 0, "the superseded holders' writes must be refused")
    require_fenced_safe(result, r)
    return finish(result, started)


__all__ = [
    "CONTROL",
    "LONG_CS",
    "anomalies",
    "as_cluster",
    "lock_figures",
    "on_cluster",
    "require_fenced_safe",
    "s12",
    "s12_cluster",
    "s13",
    "s14",
    "s14_cluster",
    "s16",
]
