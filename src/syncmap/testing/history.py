"""Operation histories and the versioned-register sweep (TESTPLAN §2.6 A), for big runs.

Every value a map returns carries the version the store gave it, so most near-cache properties are
an O(n log n) sweep instead of a search: bounded staleness (C2), monotonic reads (C4),
read-your-writes (C5) and no phantom reads (C6).  Times come from ``time.monotonic_ns()``:
CLOCK_MONOTONIC is one clock for every process of a host, so real-time order across our processes
is trustworthy.
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Op:
    """One completed operation.  ``version`` 0 on a read means "absent"."""

    process: str
    f: str  # "read" | "write" | "info" (a write whose outcome is unknown: version -1)
    key: str
    value: Any
    version: int
    call_ns: int
    ret_ns: int
    source: str = ""  # reads: "local" (near cache) or "redis"


@dataclass(slots=True)
class SweepReport:
    reads: int = 0
    writes: int = 0
    local_reads: int = 0
    stale_reads: int = 0
    stale_beyond_delta: int = 0
    monotonic_violations: int = 0
    ryw_violations: int = 0
    phantom_reads: int = 0
    staleness_ms: list[float] = field(default_factory=list)
    witnesses: list[str] = field(default_factory=list)

    @property
    def anomalies(self) -> int:
        return (
            self.stale_beyond_delta
            + self.monotonic_violations
            + self.ryw_violations
            + self.phantom_reads
        )

    def percentile(self, p: float) -> float:
        if not self.staleness_ms:
            return 0.0
        ordered = sorted(self.staleness_ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        hit = self.local_reads / self.reads if self.reads else 0.0
        return (
            f"reads={self.reads} (hit ratio {hit:.2f}) writes={self.writes} "
            f"stale={self.stale_reads} stale>delta={self.stale_beyond_delta} "
            f"staleness p50={self.percentile(50):.2f}ms p99={self.percentile(99):.2f}ms "
            f"max={max(self.staleness_ms, default=0.0):.2f}ms "
            f"monotonic={self.monotonic_violations} ryw={self.ryw_violations} "
            f"phantom={self.phantom_reads}"
        )

    def _witness(self, text: str) -> None:
        if len(self.witnesses) < 10:
            self.witnesses.append(text)


def sweep(ops: Iterable[Op], delta_s: float) -> SweepReport:
    """Check a history of reads and sets (unique values, no deletes) against C2, C4, C5, C6."""
    report = SweepReport()
    writes: dict[str, list[Op]] = defaultdict(list)
    reads: list[Op] = []
    unknown: set[tuple[str, Any]] = set()
    for op in ops:
        if op.f == "write":
            writes[op.key].append(op)
        elif op.f == "read":
            reads.append(op)
        else:
            unknown.add((op.key, op.value))
    by_version = {(w.key, w.version): w for ws in writes.values() for w in ws}
    report.writes = len(by_version)
    index = {k: _WriteIndex(ws) for k, ws in writes.items()}
    delta_ns = int(delta_s * 1e9)
    for r in reads:
        report.reads += 1
        report.local_reads += r.source == "local"
        written = by_version.get((r.key, r.version))
        if (
            r.version
            and (written is None or written.value != r.value)
            and (r.key, r.value) not in unknown
        ):
            report.phantom_reads += 1
            report._witness(f"phantom: {r}")
        idx = index.get(r.key)
        if idx is None:
            continue
        newest = idx.newest_acked_before(r.call_ns)
        if newest > r.version:
            report.stale_reads += 1
            lag = r.call_ns - idx.first_ack_above(r.version)
            report.staleness_ms.append(lag / 1e6)
            if idx.newest_acked_before(r.call_ns - delta_ns) > r.version:
                report.stale_beyond_delta += 1
                report._witness(f"stale by {lag / 1e6:.1f} ms > delta: {r}")
    _session_checks(reads, writes, report)
    return report


class _WriteIndex:
    """Writes of one key sorted by return time, with the running maximum version."""

    def __init__(self, ws: Sequence[Op]) -> None:
        ordered = sorted(ws, key=lambda w: w.ret_ns)
        self.rets = [w.ret_ns for w in ordered]
        self.versions = [w.version for w in ordered]
        self.prefix_max: list[int] = []
        top = 0
        for v in self.versions:
            top = max(top, v)
            self.prefix_max.append(top)

    def newest_acked_before(self, t_ns: int) -> int:
        i = bisect.bisect_left(self.rets, t_ns)
        return self.prefix_max[i - 1] if i else 0

    def first_ack_above(self, version: int) -> int:
        i = bisect.bisect_right(self.prefix_max, version)
        return self.rets[i]


def _session_checks(reads: list[Op], writes: dict[str, list[Op]], report: SweepReport) -> None:
    """C4 and C5: per (process, key), in the process's own order of operations."""
    events: dict[tuple[str, str], list[tuple[int, int, str]]] = defaultdict(list)
    for r in reads:
        events[(r.process, r.key)].append((r.call_ns, r.version, "read"))
    for ws in writes.values():
        for w in ws:
            events[(w.process, w.key)].append((w.ret_ns, w.version, "write"))
    for (process, key), seq in events.items():
        seen_read, own_write = 0, 0
        for _, version, kind in sorted(seq):
            if kind == "write":
                own_write = max(own_write, version)
                continue
            if version < seen_read:
                report.monotonic_violations += 1
                report._witness(f"{process} read {key}@{version} after @{seen_read}")
            if version < own_write:
                report.ryw_violations += 1
                report._witness(f"{process} read {key}@{version} after writing @{own_write}")
            seen_read = max(seen_read, version)


def save(ops: Iterable[Op], path: str | Path) -> None:
    """JSON lines, one operation a line (TESTPLAN §2.4), so failures can be re-checked offline."""
    with open(path, "w", encoding="utf-8") as fh:
        for op in ops:
            fh.write(json.dumps(asdict(op)) + "\n")


def load(path: str | Path) -> list[Op]:
    with open(path, encoding="utf-8") as fh:
        return [Op(**json.loads(line)) for line in fh if line.strip()]
