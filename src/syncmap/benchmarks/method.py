"""How every benchmark measures: interleaved rounds, medians, paired ratios, one table format.

* **Interleaved rounds.** Contenders run in rounds, A B C, then C B A, ...: a steady drift (CPU
  clock, a neighbour process) favours no one.  One warm-up round is thrown away.
* **Paired ratios.** A row's ratio is the median of the per-round ratios, not the quotient of the
  two medians: a round's contenders ran back to back, so whatever the machine was doing then
  cancels out of that round's ratio.
* **The same loop shape.** Contenders share one timed loop and differ only in the container or
  the function passed in; the garbage collector is off inside timed blocks, as in ``timeit``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TIMES = "\N{MULTIPLICATION SIGN}"
CAVEAT = (
    "Only ratios within one run are meaningful: idle cores sleep on this kind of machine, so a "
    "Redis round trip measures ~100 us when the machine is idle and ~40 us when the other core "
    "is busy, and absolute times drift between runs."
)
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(slots=True)
class Row:
    """One line of a table.  ``ratio`` is syncmap's cost over the baseline's (> 1: slower).

    ``unit``: "ns", "us", "ms" (times), "B" (bytes; smaller is better), "/s" or "B/s" (rates;
    larger is better); any other unit ("%", "ms/s", "conn", "threads") is shown as it is.
    ``absent`` says why a value is missing (a peer that cannot run here).
    """

    metric: str
    unit: str
    syncmap: float | None
    baseline: float | None = None
    key: str = ""  # a stable id (plots, the headline table, JSON readers)
    max_ratio: float | None = None
    at_most: float | None = None
    at_least: float | None = None
    note: str = ""
    absent: str = ""
    spread: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def paired(cls, metric: str, unit: str, syncmap: Sequence[float], baseline: Sequence[float],
               **kw: Any) -> Row:  # fmt: skip
        """A row from interleaved samples (one per round each): medians and the paired ratio."""
        return cls(metric, unit, median(syncmap), median(baseline),
                   spread={"syncmap": list(syncmap), "baseline": list(baseline)}, **kw)  # fmt: skip

    @property
    def ratio(self) -> float | None:
        a, b = self.spread.get("syncmap"), self.spread.get("baseline")
        if a and b and len(a) == len(b) and all(a) and all(b):
            return median([cost_ratio(x, y, self.unit) for x, y in zip(a, b, strict=True)])
        if not self.baseline or not self.syncmap:
            return None
        return cost_ratio(self.syncmap, self.baseline, self.unit)

    @property
    def target(self) -> str:
        if self.max_ratio is not None:
            return f"ratio ≤ {self.max_ratio:g}{TIMES}"
        if self.at_most is not None:
            return f"≤ {fmt(self.at_most, self.unit)}"
        if self.at_least is not None:
            return f"≥ {fmt(self.at_least, self.unit)}"
        return "—"

    @property
    def met(self) -> bool | None:
        ratio, value = self.ratio, self.syncmap
        if self.max_ratio is not None:
            return None if ratio is None else ratio <= self.max_ratio
        if value is None or math.isnan(value):
            return None
        if self.at_most is not None:
            return value <= self.at_most
        if self.at_least is not None:
            return value >= self.at_least
        return None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ratio=self.ratio, target=self.target, met=self.met)
        return out


def versus(metric: str, unit: str, samples: dict[str, list[float]], mine: str, peer: str,
           absent: str, **kw: Any) -> Row:  # fmt: skip
    """``mine`` against ``peer`` from one interleaved run; when the peer did not run, syncmap's
    median alone and ``absent``, the reason, in the peer's cell."""
    if peer in samples:
        return Row.paired(metric, unit, samples[mine], samples[peer], **kw)
    return Row(metric, unit, median(samples[mine]), None, absent=absent, **kw)


def cost_ratio(syncmap: float, baseline: float, unit: str) -> float:
    return baseline / syncmap if unit.endswith("/s") else syncmap / baseline


def fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "—"
    if unit in _SECONDS:
        return _fmt_seconds(value * _SECONDS[unit])
    if unit == "/s":
        return f"{value / 1000:,.0f}k/s" if value >= 10_000 else f"{value:,.0f}/s"
    if unit == "B/s":
        return f"{_sig(value / 1e6)} MB/s"
    if unit == "calls":
        return f"{value:,.2f} calls"
    return f"{_sig(value)} {unit}"  # counts (B, conn, threads), %, ms/s: 3 digits below 100


def _fmt_seconds(seconds: float) -> str:
    for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if seconds >= scale:
            return f"{_sig(seconds / scale)} {name}"
    return f"{_sig(seconds / 1e-9)} ns"


def _sig(x: float) -> str:
    """Three significant digits, thousands separated."""
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None or math.isnan(ratio):
        return "—"
    return (f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.2g}") + TIMES


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(sorted_xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of an already sorted sequence; NaN when empty."""
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


# ---- timed blocks ---------------------------------------------------------------------------


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Like timeit: no collector pauses inside a timed block."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


Contender = tuple[str, Callable[[], float]]


def interleave(contenders: Sequence[Contender], rounds: int,
               after: Callable[[str], None] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Run the contenders in rounds after one discarded warm-up round; per-name samples.

    Odd rounds run in reverse order (A B, B A, A B, ...) so a steady drift favours no one.
    ``after(name)`` runs untimed after each block (e.g. to let background work settle).
    """
    samples: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(rounds + 1):
        for name, block in contenders if r % 2 == 0 else contenders[::-1]:
            with no_gc():
                value = block()
            if after is not None:
                after(name)
            if r:
                samples[name].append(value)
    return samples


# The timed loops share one shape; only the container or function passed in differs.  Each
# returns nanoseconds per operation.
def loop_getitem(c: Any, keys: Sequence[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = c[k]
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def loop_get(c: Any, keys: Sequence[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = c.get(k)
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def loop_empty(c: Any, keys: Sequence[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = k
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def loop_call(fn: Callable[[Any], Any], args: Sequence[Any], ops: int) -> float:
    """``fn(args[i % len(args)])`` ``ops`` times; ns per call."""
    n = len(args)
    t0 = time.perf_counter_ns()
    for i in range(ops):
        fn(args[i % n])
    return (time.perf_counter_ns() - t0) / ops


def loop_store(fn: Callable[[Any, Any], Any], keys: Sequence[Any], value: Any, ops: int) -> float:
    """``fn(keys[i % len(keys)], value)`` ``ops`` times; ns per call."""
    n = len(keys)
    t0 = time.perf_counter_ns()
    for i in range(ops):
        fn(keys[i % n], value)
    return (time.perf_counter_ns() - t0) / ops


# ---- tables ---------------------------------------------------------------------------------


def table(title: str, rows: Sequence[Row]) -> list[str]:
    """The Markdown table of ``rows`` under a heading, then one line per row that has a note."""
    lines = [title, "", "| metric | syncmap | peer | ratio | target | met? |",
             "|---|---:|---:|---:|---|---|"]  # fmt: skip
    for r in rows:
        ratio = fmt_ratio(r.ratio)
        if r.max_ratio is not None and r.ratio is not None and ratio[:-1] == f"{r.max_ratio:.2f}":
            ratio = f"{r.ratio:.3f}{TIMES}"  # at the limit: show which side of it
        met = {True: "yes", False: "**NO**", None: "—"}[r.met]
        mine = r.absent if r.syncmap is None and r.absent else fmt(r.syncmap, r.unit)
        peer = r.absent if r.baseline is None and r.syncmap is not None and r.absent else "—"
        peer = fmt(r.baseline, r.unit) if r.baseline is not None else peer
        lines.append(f"| {r.metric} | {mine} | {peer} | {ratio} | {r.target} | {met} |")
    notes = [f"- {r.metric.strip()}: {r.note}" for r in rows if r.note]
    return [*lines, *(["", *notes] if notes else [])]


@dataclass(slots=True)
class Section:
    """What one benchmark section found: its table rows, the data of its plots, free notes."""

    name: str
    title: str
    rows: list[Row]
    series: dict[str, Any] = field(default_factory=dict)  # JSON-ready; plots.py draws from it
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    extra: list[str] = field(default_factory=list)  # Markdown lines after the table (a summary)
