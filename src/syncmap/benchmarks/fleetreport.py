"""The fleet section's report: a table row per figure and window, the linear extrapolation to
1,000 processes x 10 maps next to DESIGN §4's targets, and issue 16's figures from before.

Extrapolation: the server's fixed cost (the M = 0 window: ``hz`` work, no client), plus 1,000 / N
times the cost of N processes at 10 maps, from a least-squares line ``a + b·M`` per process over
the M ≥ 1 windows (through the origin with a single map count).  ``b`` is the cost per map
instance, ``a`` the cost per process that does not grow with its maps.
"""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .method import TIMES, Row, Section

if TYPE_CHECKING:
    from .fleet import FleetPlan

TITLE = "Fleet: idle maps' cost to Redis"
AT_PROCESSES, AT_MAPS = 1000, 10  # DESIGN §4's fleet
CPU_TARGET = 5.0  # % of one Redis core at AT_PROCESSES x AT_MAPS
CONNECTIONS_TARGET = 2  # per process per Redis node
# Issue 16's figures, measured on an older commit (2 connections and 2 threads per map).
BEFORE = {
    "evalsha_per_map": 64.0,
    "cpu_ms_per_map": "1.1\N{EN DASH}1.4",
    "connections_per_map": 2,
    "threads_per_map": 2,
    "at_50x10": "30,741 EVALSHA/s, 0.56 of a Redis core, 1,051 connections",
}


@dataclass(slots=True)
class Window:
    """What one window found with ``maps`` maps open in each of ``processes`` processes."""

    maps: int
    processes: int
    seconds: float
    calls: dict[str, float]  # per command, calls/s Redis ran (commandstats; scripts' own too)
    requests: dict[str, float]  # per command, calls/s clients sent (calls x MONITOR's share)
    usec: dict[str, float]  # per command, µs of Redis time per second
    cpu: float  # cores (used_cpu_sys + used_cpu_user per second)
    cpu_main: float | None  # the main thread's, where the server reports it
    clients: int  # connected_clients, less this section's own
    threads: list[int | None] = field(default_factory=list)  # per process
    python_threads: list[int | None] = field(default_factory=list)
    connections: list[int | None] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return self.maps * self.processes

    @property
    def total(self) -> float:
        return sum(self.calls.values())

    @property
    def sent(self) -> float:
        return sum(self.requests.values())


def section(windows: list[Window], plan: FleetPlan, server: str) -> Section:
    rows = [r for w in windows for r in _window_rows(w)]
    at = extrapolate(windows)
    rows += _at_rows(at, windows)
    series = {"processes": plan.processes, "window": plan.window, "settle": plan.settle,
              "monitor": plan.monitor, "server": server,
              "windows": [asdict(w) for w in windows], "at": at, "before": BEFORE}  # fmt: skip
    notes = [
        f"A private {server} started for the section; {plan.processes} worker processes "
        "(`spawn`), each opening the same M maps (default `MapConfig`), none read or written; "
        f"{plan.settle:g} s to settle after opening, then a {plan.window:g} s window per M. "
        "The maps of a window open together, so work on a period longer than the window (the "
        "presence record, every 2 s) is counted whole only in a window that is a multiple of "
        "that period.",
        "Commands run: `INFO commandstats` deltas, which count a script's own commands as well "
        "as the EVALSHA that ran it (this section's own INFO calls left out). Requests: the "
        "share of each command's calls that clients sent, seen by MONITOR in "
        f"{plan.monitor:g} s after the window (not in it: feeding and reading a monitor costs "
        "CPU), times the window's calls.",
        f"The {AT_PROCESSES:,} {TIMES} {AT_MAPS} rows are linear: the server's fixed cost "
        f"(M = 0), plus {AT_PROCESSES:,} / N {TIMES} the cost of N processes at {AT_MAPS} maps "
        "fitted over the M ≥ 1 windows.",
    ]
    return Section("fleet", TITLE, rows, series, notes, extra=_extra(windows, at))


# ---- rows -----------------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "es" if word.endswith("s") else "s")


def _max(xs: Sequence[int | None]) -> int | None:
    known = [x for x in xs if x is not None]
    return max(known) if known else None


def _g(x: float) -> str:
    """Three significant digits below 100, whole numbers above."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _top(rates: dict[str, float]) -> str:
    return ", ".join(f"{n} {_g(r)}/s" for n, r in list(rates.items())[:6]) or "none"


def _window_rows(w: Window) -> list[Row]:
    head = f"{_plural(w.processes, 'process')} {TIMES} {_plural(w.maps, 'map')}"
    key, per = f"fleet.{w.maps}", max(w.instances, 1)
    main = "" if w.cpu_main is None else f"; main thread {100 * w.cpu_main:.3g} %"
    rows = [
        Row(f"{head}: requests/s clients sent to Redis", "/s", w.sent, key=key + ".requests",
            note=_top(w.requests)),
        Row(f"  {head}: commands/s Redis ran (a script's own included)", "/s", w.total,
            key=key + ".commands", note=_top(w.calls)),
        Row(f"  {head}: Redis CPU, % of one core", "%", 100 * w.cpu, key=key + ".cpu",
            note=f"{1000 * w.cpu:.3g} ms/s{main}"),
        Row(f"  {head}: Redis connected_clients", "conn", w.clients, key=key + ".clients"),
        Row(f"  {head}: connections to Redis per process (max)", "conn", _max(w.connections),
            key=key + ".connections", at_most=CONNECTIONS_TARGET if w.maps else None,
            note=f"per process: {_spread(w.connections)}"),
        Row(f"  {head}: threads per process (max)", "threads", _max(w.threads),
            key=key + ".threads",
            note=f"per process: {_spread(w.threads)}; Python threads {_spread(w.python_threads)}"),
    ]  # fmt: skip
    if w.maps:
        rows[3:3] = [
            Row(f"  {head}: EVALSHA/s per map instance", "/s", w.calls.get("EVALSHA", 0.0) / per,
                key=key + ".evalsha_per_map", note=f"all requests {w.sent / per:,.1f}/s, all "
                f"commands run {w.total / per:,.1f}/s per map instance"),
            Row(f"  {head}: Redis CPU per map instance", "ms/s", 1000 * w.cpu / per,
                key=key + ".cpu_per_map"),
        ]  # fmt: skip
    return rows


def _spread(xs: Sequence[int | None]) -> str:
    known = [x for x in xs if x is not None]
    if not known:
        return "unknown (no /proc)"
    lo, hi = min(known), max(known)
    return f"{lo}" if lo == hi else f"{lo}\N{EN DASH}{hi} (median {statistics.median(known):g})"


# ---- extrapolation --------------------------------------------------------------------------


def fit(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b·x``; through the origin when all points share one ``x``."""
    xs = {x for x, _ in points}
    if len(xs) == 1:
        x = xs.pop()
        return 0.0, statistics.median(y for _, y in points) / x
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def _at(windows: Sequence[Window], value: Callable[[Window], float]) -> dict[str, float]:
    """``value`` at AT_PROCESSES x AT_MAPS: fixed (M = 0) + AT_PROCESSES x the per-process fit."""
    base = [value(w) for w in windows if w.maps == 0]
    fixed = statistics.median(base) if base else 0.0
    a, b = fit([(float(w.maps), (value(w) - fixed) / w.processes) for w in windows if w.maps])
    return {"fixed": fixed, "per_process": a, "per_map": b,
            "at": fixed + AT_PROCESSES * (a + b * AT_MAPS)}  # fmt: skip


def _calls(name: str, w: Window) -> float:
    return w.calls.get(name, 0.0)


def _sent(name: str, w: Window) -> float:
    return w.requests.get(name, 0.0)


def _threads_per_map(windows: Sequence[Window]) -> float | None:
    """Threads a process gains per map it opens: the slope of its median thread count over the
    M ≥ 1 windows (0 when it does not grow; None with fewer than two map counts)."""
    points = [(float(w.maps), statistics.median(t for t in w.threads if t is not None))
              for w in windows if w.maps and any(t is not None for t in w.threads)]  # fmt: skip
    if len({x for x, _ in points}) < 2:
        return None
    return fit(points)[1]


def _by_rate(windows: Sequence[Window], attr: str) -> list[str]:
    rates: dict[str, float] = {}
    for w in windows:
        for name, rate in getattr(w, attr).items():
            rates[name] = max(rates.get(name, 0.0), rate)
    return sorted(rates, key=lambda n: -rates[n])


def extrapolate(windows: Sequence[Window]) -> dict[str, Any]:
    """Requests/s and commands/s (all, and per command), CPU cores, connections at 1,000 x 10."""
    if not any(w.maps for w in windows):
        return {}
    return {
        "processes": AT_PROCESSES, "maps": AT_MAPS,
        "requests": _at(windows, lambda w: w.sent),
        "commands": _at(windows, lambda w: w.total),
        "per_request": {n: _at(windows, functools.partial(_sent, n))
                        for n in _by_rate(windows, "requests")},
        "per_command": {n: _at(windows, functools.partial(_calls, n))
                        for n in _by_rate(windows, "calls")},
        "cpu": _at(windows, lambda w: w.cpu),
        "connections": _at(windows, lambda w: float(w.clients)),
        "threads_per_map": _threads_per_map(windows),
    }  # fmt: skip


def _at_rows(at: dict[str, Any], windows: Sequence[Window]) -> list[Row]:
    if not at:
        return []
    head = f"{AT_PROCESSES:,} processes {TIMES} {AT_MAPS} maps (linear)"
    key = f"fleet.at_{AT_PROCESSES}x{AT_MAPS}"
    cpu, conns = at["cpu"], at["connections"]
    rows = [
        Row(f"{head}: requests/s clients send to Redis", "/s", at["requests"]["at"],
            key=key + ".requests", note=_top({n: p["at"] for n, p in at["per_request"].items()})),
        Row(f"  {head}: commands/s Redis runs", "/s", at["commands"]["at"],
            key=key + ".commands"),
        Row(f"  {head}: Redis CPU, % of one core", "%", 100 * cpu["at"], key=key + ".cpu",
            at_most=CPU_TARGET, note=f"{1000 * cpu['per_map']:.3g} ms/s per map instance "
            f"(slope), {1000 * cpu['per_process']:.3g} ms/s per process, "
            f"{1000 * cpu['fixed']:.3g} ms/s fixed"),
        Row(f"  {head}: connections to Redis", "conn", conns["at"], key=key + ".connections",
            at_most=CONNECTIONS_TARGET * AT_PROCESSES,
            note=f"{conns['per_map']:.3g} per map instance (slope) + "
            f"{conns['per_process']:.3g} per process; target ≤ {CONNECTIONS_TARGET} per process"),
    ]  # fmt: skip
    opened = sorted((w for w in windows if w.maps), key=lambda w: w.maps)
    lo, hi = (opened[0], opened[-1]) if opened else (None, None)
    if lo is not None and hi is not None and lo.maps != hi.maps:
        grew = (_max(hi.threads) or 0) - (_max(lo.threads) or 0)
        rows.append(Row(f"threads per process: {_plural(hi.maps, 'map')} vs "
                        f"{_plural(lo.maps, 'map')} (max, difference)", "threads", grew,
                        key="fleet.threads_growth", at_most=0,
                        note="DESIGN §4: threads per process independent of its maps"))  # fmt: skip
    return rows


# ---- the tables under the section's table ---------------------------------------------------


def _extra(windows: Sequence[Window], at: dict[str, Any]) -> list[str]:
    if not windows:
        return []
    names = list(dict.fromkeys(_by_rate(windows, "requests") + _by_rate(windows, "calls")))
    lines = ["By command: requests/s clients sent / commands/s Redis ran (µs of Redis time per "
             "second), and the slope per map instance:", "",
             "| command | " + " | ".join(f"M = {w.maps}" for w in windows) + " | per map |",
             "|---|" + "---:|" * (len(windows) + 1)]  # fmt: skip
    for n in names:
        cells = [f"{w.requests.get(n, 0.0):,.1f} / {w.calls.get(n, 0.0):,.1f} "
                 f"({w.usec.get(n, 0.0):,.0f})" for w in windows]  # fmt: skip
        sent = (at.get("per_request", {}).get(n) or {}).get("per_map", 0.0)
        ran = (at.get("per_command", {}).get(n) or {}).get("per_map", 0.0)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {sent:,.2f} / {ran:,.2f} |")
    return lines + (_before(at) if at else [])


def _before(at: dict[str, Any]) -> list[str]:
    """The per-map-instance figures and the extrapolation next to issue 16's and the targets."""
    evalsha = (at["per_command"].get("EVALSHA") or {}).get("per_map", 0.0)
    tpm = at["threads_per_map"]
    fleet = f"{AT_PROCESSES:,} {TIMES} {AT_MAPS}"
    return ["", f"Per idle map instance (slope over the M ≥ 1 windows) and at {fleet}, next to "
            "issue 16's figures (an older commit):", "",
            "| figure | issue 16, before | this run | target |", "|---|---:|---:|---|",
            f"| EVALSHA/s per map instance | {BEFORE['evalsha_per_map']:g} | {evalsha:,.1f} | — |",
            f"| requests/s per map instance | — | {at['requests']['per_map']:,.1f} | — |",
            f"| Redis CPU per map instance | {BEFORE['cpu_ms_per_map']} ms/s | "
            f"{1000 * at['cpu']['per_map']:.3g} ms/s | — |",
            f"| connections per map instance | {BEFORE['connections_per_map']} | "
            f"{at['connections']['per_map']:.3g} | ≤ {CONNECTIONS_TARGET} per process |",
            f"| threads per map instance | {BEFORE['threads_per_map']} | "
            f"{'—' if tpm is None else f'{tpm:.3g}'} | constant per process |",
            f"| Redis CPU at {fleet} | — | {_g(100 * at['cpu']['at'])} % of a core | "
            f"≤ {CPU_TARGET:g} % |",
            f"| connections at {fleet} | — | {at['connections']['at']:,.0f} | "
            f"≤ {CONNECTIONS_TARGET * AT_PROCESSES:,} |",
            f"| 50 processes {TIMES} 10 maps | {BEFORE['at_50x10']} | {_at50(at)} | — |",
            ]  # fmt: skip


def _at50(at: dict[str, Any]) -> str:
    """Issue 16's 50 x 10 figures from this run's fit, to compare like with like."""

    def at50(part: dict[str, float] | None) -> float:
        return 0.0 if part is None else part["fixed"] + 50 * (
            part["per_process"] + part["per_map"] * AT_MAPS)  # fmt: skip

    return (
        f"{at50(at['per_command'].get('EVALSHA')):,.0f} EVALSHA/s, "
        f"{at50(at['cpu']):.2f} of a Redis core, {at50(at['connections']):,.0f} connections"
    )
