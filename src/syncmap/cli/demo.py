"""``syncmap demo``: several server processes share one map; watch them stay in sync.

Each server is a separate OS process that reads (mostly from its near cache) and writes one map
with a realistic skew, and reports to this process twice a second.  At the end the writers stop,
every server waits ``max_staleness`` and reports what its near cache holds, and the demo checks
that every cached entry equals the store: the convergence verdict (exit code 0 or 1).
"""

from __future__ import annotations

import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from ..core.nearcache import Event
from ..embedded import EmbeddedRedis
from ..map import SyncMap

MAP = "demo"
KEYS = 200
PROBE_KEY = "probe:sent-at"


@dataclass
class Report:
    """What one server process sends to the demo twice a second (and once at the end)."""

    node: str
    reads: int = 0
    writes: int = 0
    hits: int = 0
    misses: int = 0
    entries: int = 0
    delays_ms: list[float] = field(default_factory=list)
    final: dict[str, tuple[Any, int]] | None = None


def server(url: str, node: str, seconds: float, out: Any) -> None:
    """One demo server: Zipf-skewed reads (90 %) and writes (10 %) of user records."""
    rng = random.Random(node)
    keys = [f"user:{i}" for i in range(KEYS)]
    weights = [1 / (i + 1) for i in range(KEYS)]
    delays: list[float] = []
    with SyncMap(MAP, url, node_id=node) as m:

        def on_change(event: Event) -> None:
            # The probe writes its send time; the event's arrival time is taken first.
            if event.key == PROBE_KEY:
                arrived = time.monotonic_ns()
                sent, version, _ = m.get_with_meta(PROBE_KEY, consistent=True)
                if version == event.version and isinstance(sent, int):
                    delays.append((arrived - sent) / 1e6)

        m.subscribe(on_change)
        rep = Report(node)
        end = time.monotonic() + seconds
        next_report = time.monotonic() + 0.5
        while time.monotonic() < end:
            key = rng.choices(keys, weights)[0]
            if rng.random() < 0.1:
                m.set(key, {"by": node, "visits": rep.writes})
                rep.writes += 1
            else:
                m.get(key)
                rep.reads += 1
            time.sleep(0.001)  # pacing: a server doing other work between map calls
            if time.monotonic() >= next_report:
                _flush(m, rep, delays, out)
                next_report += 0.5
        time.sleep(m.config.max_staleness + 0.3)  # the contract: caches converge within it
        rep.final = {}
        for k in list(m._entries):
            cached = m.peek(k)
            if cached is not None:
                rep.final[str(k)] = cached
        _flush(m, rep, delays, out)


def _flush(m: SyncMap, rep: Report, delays: list[float], out: Any) -> None:
    s = m.statistics()
    rep.hits, rep.misses, rep.entries = s.hits, s.misses, s.entries
    rep.delays_ms, delays[:] = list(delays), []
    out.put(rep)


def probe_writer(url: str, stop: Any) -> None:
    """Writes its send time (monotonic ns, one clock for every process here) every 50 ms."""
    with SyncMap(MAP, url, node_id="probe") as m:
        while not stop.is_set():
            m.set(PROBE_KEY, time.monotonic_ns())
            stop.wait(0.05)


def run(url: str, nodes: int, seconds: float, say: Callable[[str], None]) -> bool:
    """Run the demo against ``url``; returns the convergence verdict."""
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    stop = ctx.Event()
    names = [f"server-{i + 1}" for i in range(nodes)]
    procs = [ctx.Process(target=server, args=(url, n, seconds, out)) for n in names]
    probe = ctx.Process(target=probe_writer, args=(url, stop))
    for p in [*procs, probe]:
        p.start()
    latest: dict[str, Report] = {}
    delays: list[float] = []
    finals: dict[str, dict[str, tuple[Any, int]]] = {}
    last_print = time.monotonic()
    stop_probe_at = time.monotonic() + seconds
    try:
        while len(finals) < nodes:
            if time.monotonic() >= stop_probe_at:
                stop.set()  # before the servers' quiet period, so nothing is in flight then
            item = out.get(timeout=seconds + 60)
            latest[item.node] = item
            delays.extend(item.delays_ms)
            if item.final is not None:
                finals[item.node] = item.final
            if time.monotonic() - last_print >= 1.0 and len(latest) == nodes and not finals:
                say(_status_line(latest, delays))
                last_print = time.monotonic()
    finally:
        stop.set()
        for p in [*procs, probe]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    say("final: " + _status_line(latest, delays))
    return _verdict(url, finals, say)


def _status_line(latest: dict[str, Report], delays: list[float]) -> str:
    parts = []
    for node, r in sorted(latest.items()):
        ratio = r.hits / (r.hits + r.misses) if r.hits + r.misses else 0.0
        parts.append(f"{node}: {r.entries:3d} cached, hit {ratio:4.0%}, {r.reads}r/{r.writes}w")
    if delays:
        p50 = statistics.median(delays)
        p99 = sorted(delays)[int(0.99 * (len(delays) - 1))]
        parts.append(f"propagation p50 {p50:.2f} ms p99 {p99:.2f} ms")
    return " | ".join(parts)


def _verdict(url: str, finals: dict[str, dict[str, tuple[Any, int]]], say: Callable[[str], None]
             ) -> bool:  # fmt: skip
    wrong = []
    with SyncMap(MAP, url, node_id="verdict") as truth:
        store_entries = len(truth)
        for node, cached in sorted(finals.items()):
            for key, (value, version) in cached.items():
                have = truth.get_with_meta(key, consistent=True)
                if (have[0], have[1]) != (value, version):
                    wrong.append(f"{node} caches {key}@{version}, store has @{have[1]}")
    total = sum(len(c) for c in finals.values())
    if wrong:
        say(f"NOT CONVERGED: {len(wrong)} of {total} cached entries differ from the store")
        for line in wrong[:10]:
            say(f"  {line}")
        return False
    say(
        f"CONVERGED: all {total} entries cached on {len(finals)} servers equal the store "
        f"({store_entries} entries in Redis)"
    )
    return True


def demo(url: str | None, nodes: int, seconds: float, say: Callable[[str], None]) -> bool:
    """Start an embedded Redis unless ``url`` is given, then :func:`run`."""
    with ExitStack() as stack:
        if url is None:
            server = stack.enter_context(EmbeddedRedis())
            url = server.url
            say(f"started an embedded Redis {server.version} at {url}")
        else:
            with SyncMap(MAP, url) as m:
                m.clear()
        say(f"{nodes} servers share map {MAP!r} for {seconds:g} s (90 % reads, 10 % writes)")
        return run(url, nodes, seconds, say)
    raise AssertionError("unreachable")
