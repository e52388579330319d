"""Oracles over recorded store histories: WGL + version sweep, a planted-bug control, and
"acknowledged writes lost" (C7).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .history import SweepReport, sweep
from .recorder import MUTATIONS, Record, to_operations, to_sweep_ops
from .scenario import (
    OPS,
    UNKNOWN_KEYS,
)


@dataclass(slots=True)
class Checked:
    """What the oracles said about one history."""

    verdict: str
    ops: int
    keys: int
    keys_failed: int
    keys_unknown: int
    seconds: float
    witness: str
    sweep: SweepReport

    @property
    def anomalies(self) -> int:
        return self.keys_failed + self.sweep.anomalies

    def figures(self) -> dict[str, Any]:
        return {
            OPS: self.ops,
            "keys_checked": self.keys,
            "keys_nonlinearizable": self.keys_failed,
            UNKNOWN_KEYS: self.keys_unknown,
            "checker_s": round(self.seconds, 2),
            "sweep_reads": self.sweep.reads,
            "sweep_anomalies": self.sweep.anomalies,
            "phantom_reads": self.sweep.phantom_reads,
        }


def check_records(records: Sequence[Record], *, budget_s: float = 10.0, workers: int = 2
                  ) -> Checked:  # fmt: skip
    """WGL per key (indeterminate mutations return at infinity) + the version sweep (Δ = 0)."""
    from .linearizability import MAP_MODEL, check  # noqa: PLC0415

    result = check(to_operations(records), MAP_MODEL, budget_s=budget_s, workers=workers)
    report = sweep(to_sweep_ops(records), delta_s=0.0)
    return Checked(
        verdict=str(result.verdict),
        ops=result.ops,
        keys=result.keys,
        keys_failed=result.keys_failed,
        keys_unknown=result.keys_unknown,
        seconds=float(result.seconds),
        witness=result.witness,
        sweep=report,
    )


def plant_stale_read(records: Sequence[Record]) -> tuple[list[Record], str]:
    """A copy of ``records`` with one read changed to a stale value: certainly not linearizable.

    It picks the earliest read R of a key with acknowledged sets S1, S2 such that S1 returned
    before S2 was called and S2 returned before R was called, and makes R return S1's value (and
    version).  Only S1 ever wrote that value (values are unique) and S2 must take effect after S1
    and before R, so no linearization lets R see it.  Without such a read, R returns a value no
    one wrote (a phantom), equally impossible.
    """
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_key[r.key].append(r)
    best: tuple[int, int, Record] | None = None  # (call_ns of R, index of R, S1)
    for ops in by_key.values():
        sets = sorted((r for r in ops if r.f == "set" and r.ret_ns is not None),
                      key=lambda r: r.call_ns)  # fmt: skip
        for r in ops:
            if r.f != "get" or r.ret_ns is None or r.source != "redis":
                continue
            if best is not None and r.call_ns >= best[0]:
                break
            s2 = max((s for s in sets if s.ret_ns is not None and s.ret_ns < r.call_ns),
                     key=lambda s: s.call_ns, default=None)  # fmt: skip
            if s2 is None:
                continue
            s1 = next((s for s in sets if s.ret_ns is not None and s.ret_ns < s2.call_ns
                       and s.input != r.output), None)  # fmt: skip
            if s1 is not None:
                best = (r.call_ns, records.index(r), s1)
                break
    out = list(records)
    if best is not None:
        _, i, s1 = best
        old = out[i]
        out[i] = Record(old.process, old.key, "get", None, s1.input, old.call_ns, old.ret_ns,
                        s1.version, old.server, old.source)  # fmt: skip
        return out, f"read of {old.key!r} by {old.process} now returns stale {s1.input!r}"
    for i, old in enumerate(out):
        if old.f == "get" and old.ret_ns is not None:
            out[i] = Record(old.process, old.key, "get", None, "never-written", old.call_ns,
                            old.ret_ns, 1, old.server, old.source)  # fmt: skip
            return out, f"read of {old.key!r} by {old.process} now returns a phantom"
    raise ValueError("the history has no completed read to corrupt")


@dataclass(slots=True)
class LostReport:
    lost: int = 0
    phantom_keys: int = 0  # final value that no write (acked or indeterminate) stored
    witnesses: list[str] = field(default_factory=list)


_INF, _NEG_INF = 2**63, -(2**63)


def _latest_producer(ops: Iterable[Record], final: str | None, end_ns: int) -> int | None:
    """The latest return time of a mutation that may have produced ``final`` (+inf for an
    indeterminate one, -inf for the initial state), or None if nothing could have."""
    latest: int | None = _NEG_INF if final is None else None  # absent: the initial state
    for p in ops:
        if p.call_ns > end_ns or not (p.indeterminate or p.effective):
            continue
        if p.removes if final is None else p.new_value == final:
            ret = _INF if p.ret_ns is None else p.ret_ns
            latest = ret if latest is None else max(latest, ret)
    return latest


def acked_writes_lost(records: Iterable[Record], snapshot: dict[str, str | None], start_ns: int,
                      end_ns: int) -> LostReport:  # fmt: skip
    """C7: acknowledged writes a snapshot of the keys, read during [start_ns, end_ns], has lost.

    The value F a key holds in the snapshot was produced by some mutation P: the write of F (values
    are unique), or for F = absent a delete (or the initial state, which "returned" at -inf).  P
    counts as a producer if it was acknowledged or indeterminate (never a definitely failed one)
    and was called before the snapshot read ended.  Then an acknowledged mutation W that certainly
    changed the key is *lost* when

        W returned before the snapshot started, and every producer P of F returned before W was
        called (so F's producer precedes W in real time: the snapshot should show W or newer).

    That is sound for a linearizable, durable store: the snapshot shows the last mutation
    linearized before it, and one linearized after W cannot have returned before W was called.
    Indeterminate producers return at +inf, so they never make W lost (conservative).  Every
    acknowledged write after the surviving one counts, as in TESTPLAN §5.5's "2,740 of 3,188".
    """
    by_key: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.f in MUTATIONS and r.source == "redis":
            by_key[r.key].append(r)
    report = LostReport()
    for key, ops in by_key.items():
        if key not in snapshot:
            continue
        final = snapshot[key]
        latest = _latest_producer(ops, final, end_ns)
        if latest is None:
            report.phantom_keys += 1
            latest = _NEG_INF
            if len(report.witnesses) < 10:
                report.witnesses.append(f"{key!r} holds {final!r}, which no write stored")
        for w in ops:
            if w.effective and w.ret_ns is not None and w.ret_ns < start_ns and w.call_ns > latest:
                report.lost += 1
                if len(report.witnesses) < 10:
                    report.witnesses.append(
                        f"{key!r}: acked {w.f}({w.input!r}) by {w.process} lost; holds {final!r}"
                    )
    return report


# ---- helpers shared by the scenarios -------------------------------------------------------------


__all__ = [
    "Checked",
    "LostReport",
    "acked_writes_lost",
    "check_records",
    "plant_stale_read",
]
