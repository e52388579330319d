"""The oracles of the lock workload (TESTPLAN §4.5): records, figures and how they are computed.

Kept apart from :mod:`syncmap.testing.lockload` (which runs workers and faults) so a user can
analyse logs recorded elsewhere with the same code.  See lockload's docstring for the meaning of
each figure.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

FaultKind = Literal["none", "sigstop", "gil", "client-pause", "ttl", "kill", "evict"]
Mode = Literal["append", "counter"]


@dataclass(frozen=True, slots=True)
class LockLoad:
    """What to run.  Times in seconds; ``stall`` in multiples of the lease."""

    url: str
    workers: int = 5
    seconds: float = 6.0
    lease: float = 0.5
    fenced: bool = True
    mode: Mode = "append"
    """``append``: S is a list of unique ids.  ``counter``: S is an int, each write adds one."""
    cs_min: float = 0.02
    cs_max: float = 0.2
    """Bounds of the random sleep inside each critical section."""
    fault: FaultKind = "none"
    stall: tuple[float, float] = (1.5, 3.0)
    fault_gap: float = 0.2
    """Mean pause between the end of one fault and the hunt for the next holder (jittered)."""
    fill_bytes: int = 64 * 1024
    fill_rate: float = 300.0
    """``evict``: filler keys per second and their size."""
    lock: str = "lockload"
    map: str = "lockload"
    key: str = "S"
    namespace: str = "sm"
    seed: int = 0
    quiet: bool = True
    """Silence the workers' ``syncmap.lock`` log (every lost lease is logged; they are counted)."""
    drivers: tuple[str, ...] = ()
    """Driver of each worker, cycled: ``"sync"`` (threads) or ``"async"`` (``syncmap.aio``'s
    map and lock on an event loop); empty: every one sync."""
    hash_tag: str | None = None
    """The lock's hash tag (``Lock(hash_tag=)``).  ``lockload.run`` sets it on a Redis Cluster
    to the tag of ``key``'s bucket, where ``map.lock(key)`` puts a lock, so that a fenced write
    finds the fence in its own slot (a lock elsewhere cannot fence it there)."""

    def driver(self, index: int) -> str:
        return self.drivers[index % len(self.drivers)] if self.drivers else "sync"


@dataclass(frozen=True, slots=True)
class Acquisition:
    worker: int
    call_ns: int
    ok_ns: int
    token: int


@dataclass(frozen=True, slots=True)
class Write:
    worker: int
    token: int
    id: str
    call_ns: int
    ret_ns: int
    outcome: str
    """``ok``, ``stale`` (StaleFence), ``unknown`` (WriteOutcomeUnknown) or ``error``."""


@dataclass(frozen=True, slots=True)
class Section:
    worker: int
    token: int
    enter_ns: int
    exit_ns: int
    release: str
    """``ok``, ``lost`` (release raised LockLost), ``error`` or ``killed``."""


@dataclass(frozen=True, slots=True)
class FaultEvent:
    kind: str
    worker: int | None
    start_ns: int
    end_ns: int
    hit: bool
    """The victim still held the lock once the fault was in force."""
    detail: str = ""


@dataclass(slots=True)
class LockResult:
    """The figures of TESTPLAN §4.5 for one run."""

    config: LockLoad
    elapsed_s: float
    acquisitions: int
    failed_acquisitions: int
    acquire_p50_ms: float
    acquire_p99_ms: float
    overlaps: int
    max_overlap_depth: int
    writes_ok: int
    writes_unknown: int
    writes_error: int
    stale_rejected: int
    stale_accepted: int
    rejected_unexplained: int
    """Refused writes with no newer token issued in the whole run (a refusal without cause)."""
    lost_appends: int
    duplicates: int
    refused_but_applied: int
    order_violations: int
    releases_lost: int
    final_length: int
    """Length of the final list, or the final counter value in ``counter`` mode."""
    faults: list[FaultEvent]
    recover_s: list[float]
    stalls_observed: int
    hold_evictions: int
    fence_evictions: int
    keys_evicted: int
    witnesses: list[str] = field(default_factory=list)

    @property
    def faults_injected(self) -> int:
        return len(self.faults)

    @property
    def faults_hit(self) -> int:
        return sum(f.hit for f in self.faults)

    def summary(self) -> str:
        c = self.config
        rec = ", ".join(f"{s:.3f}" for s in self.recover_s) or "-"
        lines = [
            f"{c.fault} {'fenced' if c.fenced else 'UNFENCED'} {c.mode}: {c.workers} workers, "
            f"lease {c.lease:g} s, critical section {c.cs_min:g}-{c.cs_max:g} s, "
            f"{self.elapsed_s:.1f} s",
            f"  acquisitions={self.acquisitions} failed={self.failed_acquisitions} "
            f"acquire p50={self.acquire_p50_ms:.1f} ms p99={self.acquire_p99_ms:.1f} ms "
            f"releases_lost={self.releases_lost}",
            f"  faults injected={self.faults_injected} hit={self.faults_hit} "
            f"gil_stalls={self.stalls_observed} recover_s=[{rec}]",
            f"  overlaps={self.overlaps} max_depth={self.max_overlap_depth} "
            f"writes ok={self.writes_ok} unknown={self.writes_unknown} error={self.writes_error}",
            f"  stale rejected={self.stale_rejected} stale ACCEPTED={self.stale_accepted} "
            f"rejected_unexplained={self.rejected_unexplained}",
            f"  lost appends={self.lost_appends} duplicates={self.duplicates} "
            f"refused_but_applied={self.refused_but_applied} "
            f"order_violations={self.order_violations} final={self.final_length}",
        ]
        if c.fault == "evict":
            lines.append(
                f"  evicted keys={self.keys_evicted} hold evictions={self.hold_evictions} "
                f"fence-counter evictions={self.fence_evictions}"
            )
        lines += [f"  witness: {w}" for w in self.witnesses[:5]]
        return "\n".join(lines)


# ---- the worker process ----------------------------------------------------------------------


def _percentile(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] / 1e6


def overlaps(sections: list[Section]) -> tuple[int, int, list[str]]:
    """(overlapping pairs of different workers, max overlap depth, a few witnesses)."""
    ordered = sorted(sections, key=lambda s: s.enter_ns)
    pairs, witnesses = 0, list[str]()
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.enter_ns >= a.exit_ns:
                break
            if b.worker != a.worker:
                pairs += 1
                if len(witnesses) < 3:
                    witnesses.append(
                        f"overlap: w{a.worker} token {a.token} held "
                        f"{(a.exit_ns - a.enter_ns) / 1e6:.0f} ms, w{b.worker} token {b.token} "
                        f"entered {(b.enter_ns - a.enter_ns) / 1e6:.0f} ms after it"
                    )
    edges = sorted([(s.enter_ns, 1) for s in sections] + [(s.exit_ns, -1) for s in sections])
    depth = deepest = 0
    for _, step in edges:  # at equal times an exit (-1) sorts first: touching is no overlap
        depth += step
        deepest = max(deepest, depth)
    return pairs, deepest, witnesses


def stale_accepted(acquisitions: list[Acquisition], writes: list[Write]) -> list[Write]:
    """Acknowledged writes whose token was already superseded when they were invoked."""
    done = sorted(acquisitions, key=lambda a: a.ok_ns)
    times = [a.ok_ns for a in done]
    newest: list[int] = []
    for a in done:
        newest.append(max(a.token, newest[-1] if newest else 0))
    out = []
    for w in writes:
        if w.outcome != "ok":
            continue
        k = bisect_left(times, w.call_ns)  # acquisitions that completed before the write
        if k and newest[k - 1] > w.token:
            out.append(w)
    return out


def analyse(
    cfg: LockLoad,
    records: list[dict[str, Any]],
    faults: list[FaultEvent],
    final: Any,
    killed: dict[int, int],
    elapsed_s: float,
    evictions: Evictions | None = None,
) -> LockResult:
    """Every figure of :class:`LockResult` from the workers' records and the final value."""
    acqs = [
        Acquisition(r["w"], r["call"], r["ret"], r["tok"])
        for r in records
        if r["e"] == "acq" and r["ok"]
    ]
    failed = sum(1 for r in records if r["e"] == "acq" and not r["ok"])
    cs = [r for r in records if r["e"] == "cs"]
    sections = [Section(r["w"], r["tok"], r["enter"], r["exit"], r["rel"]) for r in cs]
    closed = {(r["w"], r["tok"], r["enter"]) for r in cs}
    for a in acqs:  # a killed worker's last section ends when it was killed
        if a.worker in killed and (a.worker, a.token, a.ok_ns) not in closed:
            sections.append(Section(a.worker, a.token, a.ok_ns, killed[a.worker], "killed"))
    writes = [
        Write(r["w"], r["tok"], w["id"], w["call"], w["ret"], w["out"])
        for r in cs
        if (w := r["write"]) is not None and w["out"] != "noread"
    ]
    outcomes = Counter(w.outcome for w in writes)
    pairs, depth, witnesses = overlaps(sections)
    bad = stale_accepted(acqs, writes)
    witnesses += [
        f"stale ACCEPTED: w{w.worker} token {w.token} wrote {w.id} after a newer token was issued"
        for w in bad[:3]
    ]
    top = max((a.token for a in acqs), default=0)
    unexplained = sum(1 for w in writes if w.outcome == "stale" and w.token >= top)
    lost = dups = applied = disorder = 0
    if cfg.mode == "counter":
        length = int(final or 0)
        lost = max(0, outcomes["ok"] - length)
    else:
        ids = [str(x) for x in final] if isinstance(final, list) else []
        length = len(ids)
        present = Counter(ids)
        dups = sum(c - 1 for c in present.values() if c > 1)
        lost_ids = [w.id for w in writes if w.outcome == "ok" and w.id not in present]
        lost = len(lost_ids)
        witnesses += [f"lost append: {i}" for i in lost_ids[:3]]
        applied = sum(1 for w in writes if w.outcome == "stale" and w.id in present)
        token_of = {w.id: w.token for w in writes}
        high = 0
        for i in ids:
            t = token_of.get(i)
            if t is None:
                continue
            disorder += t < high
            high = max(high, t)
    recover = [  # a kill never recovered from counts as forever
        (f.end_ns - f.start_ns) / 1e9 if f.end_ns > f.start_ns else float("inf")
        for f in faults
        if f.kind == "kill"
    ]
    ev = evictions or Evictions()
    return LockResult(
        config=cfg,
        elapsed_s=elapsed_s,
        acquisitions=len(acqs),
        failed_acquisitions=failed,
        acquire_p50_ms=_percentile([a.ok_ns - a.call_ns for a in acqs], 0.50),
        acquire_p99_ms=_percentile([a.ok_ns - a.call_ns for a in acqs], 0.99),
        overlaps=pairs,
        max_overlap_depth=depth,
        writes_ok=outcomes["ok"],
        writes_unknown=outcomes["unknown"],
        writes_error=outcomes["error"],
        stale_rejected=outcomes["stale"],
        stale_accepted=len(bad),
        rejected_unexplained=unexplained,
        lost_appends=lost,
        duplicates=dups,
        refused_but_applied=applied,
        order_violations=disorder,
        releases_lost=sum(1 for s in sections if s.release == "lost"),
        final_length=length,
        faults=faults,
        recover_s=recover,
        stalls_observed=sum(1 for r in records if r["e"] == "stall"),
        hold_evictions=ev.hold,
        fence_evictions=ev.fence,
        keys_evicted=ev.total,
        witnesses=witnesses,
    )


@dataclass(slots=True)
class Evictions:
    """Keys evicted during an ``evict`` run, by kind."""

    hold: int = 0
    fence: int = 0
    total: int = 0


__all__ = [
    "Acquisition",
    "Evictions",
    "FaultEvent",
    "FaultKind",
    "LockLoad",
    "LockResult",
    "Mode",
    "Section",
    "Write",
    "analyse",
    "overlaps",
    "stale_accepted",
]
