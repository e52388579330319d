"""What the demo shows: a rich live table on a terminal, plain periodic lines otherwise.

Per server its entries, hit ratio, reads and writes per second, propagation delay and lock
figures; a line for the store; the convergence check; the latest chaos events.  Split from
demo.py (STYLE: a module is one concept, ~400 lines).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .demo_check import ConvergenceCheck, Node
from .demo_server import HOT, MAP, Report


def _pct(values: list[float] | deque[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@dataclass
class ChaosEvent:
    at: float  # monotonic
    what: str
    heal_from: float  # monotonic: the kill, or the SIGCONT
    healed_at: float | None = None


class DemoView(ConvergenceCheck):
    """The demo's views of its state (``Demo.__init__`` sets these attributes)."""

    seconds: float
    chaos: bool
    started: float
    events: list[ChaosEvent]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _stamp(self, text: str) -> str:
        return f"[{self.elapsed():5.1f} s] {text}"

    # -- views

    def server_line(self, node: Node, final: bool = False) -> str:
        r = node.latest or Report(node.name)
        reads, writes = node.per_second()
        delays = node.all_delays if final else node.delays
        rate = (f"{r.reads} reads, {r.writes} writes" if final
                else f"{reads:4.0f} reads/s, {writes:3.0f} writes/s")  # fmt: skip
        return (
            f"{node.name}: {r.entries:3d} entries, hit {node.hit_ratio():4.0%}, {rate}, "
            f"propagation p50 {_ms(_pct(delays, 0.5))} p99 {_ms(_pct(delays, 0.99))}, "
            f"locks {r.locks} (wait p50 {_ms(_pct(node.lock_waits, 0.5))} "
            f"p99 {_ms(_pct(node.lock_waits, 0.99))}), resyncs {r.resyncs}"
            + (f", store errors {r.errors}" if r.errors else "")
            + (" [paused]" if node.paused else "")
        )

    def store_line(self) -> str:
        s = self.store
        where = f" ({s['masters']} masters)" if "masters" in s else ""
        return (
            f"store{where}: {self.entries_in_store} entries in Redis, {s.get('memory', '?')} used, "
            f"{s.get('clients', 0)} clients, {s.get('ops', 0)} ops/s"
        )

    def plain_lines(self) -> list[str]:
        lines = [self.server_line(n) for n in self.nodes.values()]
        lines += [self.store_line(), f"convergence: {self.convergence}"]
        return [self._stamp(line) for line in lines]

    def final_lines(self) -> list[str]:
        lines = ["final " + self.server_line(n, final=True) for n in self.nodes.values()]
        if self.chaos:
            healed = sum(e.healed_at is not None for e in self.events)
            lines.append(f"chaos: {len(self.events)} events, {healed} healed")
        self._check_convergence()
        lines.append(f"convergence: {self.convergence}")
        return lines

    def rich_view(self) -> Any:
        from rich import box  # noqa: PLC0415 (rich is optional: the cli extra)
        from rich.console import Group  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
        from rich.text import Text  # noqa: PLC0415

        left = max(self.seconds - self.elapsed(), 0.0)
        when = f"{left:4.1f} s left" if left > 0 else "writers stopped: final check"
        chaos = " (chaos)" if self.chaos else ""
        title = f"syncmap demo: {len(self.nodes)} servers share map {MAP!r}{chaos}, {when}"
        table = Table(
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        table.add_column("server")
        for col in ("entries", "hit", "reads/s", "writes/s", "prop\np50 ms", "prop\np99 ms",
                    "locks", "lock wait\np50 ms", "lock wait\np99 ms", "resyncs"):  # fmt: skip
            table.add_column(col, justify="right")
        for n in self.nodes.values():
            r = n.latest or Report(n.name)
            reads, writes = n.per_second()
            table.add_row(
                n.name, str(r.entries), f"{n.hit_ratio():.0%}", f"{reads:.0f}", f"{writes:.0f}",
                _num(_pct(n.delays, 0.5)), _num(_pct(n.delays, 0.99)), str(r.locks),
                _num(_pct(n.lock_waits, 0.5)), _num(_pct(n.lock_waits, 0.99)), str(r.resyncs),
                style="reverse yellow" if n.paused else None,
            )  # fmt: skip
        parts: list[Any] = [table, Text(self.store_line())]
        style = "green" if self.convergence.startswith("converged") else (
            "red" if self.convergence.startswith("LATE") else "yellow")  # fmt: skip
        parts.append(Text(f"convergence: {self.convergence}", style=style))
        parts.append(Text(f"  (sampled: the {HOT} hottest keys on every server; late: behind the "
                          f"store by more than max_staleness)", style="dim"))  # fmt: skip
        for e in self.events[-4:]:
            at = e.at - self.started
            heal = "..."
            if e.healed_at is not None:
                heal = f"healed in {max(e.healed_at - e.heal_from, 0.0):.2f} s"
            parts.append(Text(f"[{at:4.1f} s] chaos: {e.what}: {heal}", style="magenta"))
        return Group(*parts)


def _start_live(state: DemoView) -> Any:
    from rich.live import Live  # noqa: PLC0415 (rich is optional: the cli extra)

    live = Live(state.rich_view(), auto_refresh=False, redirect_stdout=False)
    live.start()
    return live


def rich_available() -> bool:
    try:
        import rich  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True
