"""``syncmap demo``: several server processes share one map; watch them stay in sync.

Each server is a separate OS process that reads (mostly from its near cache) and writes one map
with a realistic (Zipf) skew, takes the key's distributed lock for a few of its writes (a fenced
read-modify-write), and reports to this process four times a second over its own pipe.  This
process shows a live view (a rich table on a terminal, plain periodic lines otherwise): per server
its entries, hit ratio, reads and writes per second, propagation delay, lock figures; a line for
the store (from ``INFO``); a running convergence check on the hottest keys.  With ``--chaos`` it
now and then kills every pub/sub connection (``CLIENT KILL TYPE pubsub``) or pauses a server
(SIGSTOP, ~1.5 s, SIGCONT), and shows when every server receives changes again.

At the end the writers stop, every server waits ``max_staleness`` and reports what its near cache
would serve, and the demo checks that every such entry equals the store: the convergence verdict
(exit code 0 or 1).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import redis as redis_lib

from ..core.nearcache import Event
from ..embedded import EmbeddedRedis
from ..errors import ConfigurationError, LockLost, LockNotAcquired, StaleFence, StoreError
from ..map import SyncMap
from ..store.endpoint import Endpoint
from ..store.topology import open_topology
from ..testing.sentinelset import SentinelSet
from .demo_sentinel import FailoverChaos
from .options import redis_client

MAP = "demo"
KEYS = 200
HOT = 10  # the convergence check samples the hottest keys
PROBE_KEY = "probe:sent-at"
WRITE_SHARE = 0.1
LOCK_SHARE = 0.05  # of the writes: a fenced read-modify-write under the key's lock
REPORT_EVERY = 0.25
PAUSE_FOR = 1.5


@dataclass
class Report:
    """What one server process sends to the demo four times a second (and once at the end)."""

    node: str
    t: float = 0.0  # time.monotonic() when sent: one clock for every process here
    reads: int = 0
    writes: int = 0
    hits: int = 0
    misses: int = 0
    entries: int = 0
    resyncs: int = 0
    locks: int = 0
    lock_timeouts: int = 0
    locks_lost: int = 0
    delays_ms: list[float] = field(default_factory=list)
    probe_arrivals: list[float] = field(default_factory=list)
    lock_waits_ms: list[float] = field(default_factory=list)
    sample: dict[str, int] = field(default_factory=dict)  # hot key -> cached version
    final: dict[str, tuple[Any, int]] | None = None
    ends_at: float = 0.0  # time.monotonic() when this server stops its reads and writes
    errors: int = 0  # calls that failed: Redis down or failing over (--sentinel --chaos)


def _hot_keys() -> list[str]:
    return [f"user:{i}" for i in range(HOT)]


def server(url: str, node: str, seconds: float, out: Connection, quiet: bool = False,
           start: Any = None) -> None:  # fmt: skip
    """One demo server: Zipf-skewed reads (90 %) and writes (10 %; 5 % of them under a lock).

    ``start``: a barrier of every server, so that their runs begin together once all are up
    (spawning them may take seconds on a slow machine, one after another)."""
    if quiet:  # the live view shows chaos and healing itself; log lines would tear it
        logging.getLogger("syncmap").setLevel(logging.ERROR)
    rng = random.Random(node)
    keys = [f"user:{i}" for i in range(KEYS)]
    weights = [1 / (i + 1) for i in range(KEYS)]
    hot = _hot_keys()
    delays: list[float] = []
    arrivals: list[float] = []
    with SyncMap(MAP, url, node_id=node) as m:

        def on_change(event: Event) -> None:
            # The probe writes its send time; the event's arrival time is taken first.
            if event.key == PROBE_KEY:
                arrived = time.monotonic_ns()
                try:
                    sent, version, _ = m.get_with_meta(PROBE_KEY, consistent=True)
                except StoreError:
                    return
                if version == event.version and isinstance(sent, int):
                    delays.append((arrived - sent) / 1e6)
                    arrivals.append(arrived / 1e9)

        m.subscribe(on_change)
        if start is not None:
            start.wait(60)
        end = time.monotonic() + seconds
        rep = Report(node, ends_at=end)
        next_report = time.monotonic() + REPORT_EVERY
        while time.monotonic() < end:
            try:
                _one_call(m, rng, rng.choices(keys, weights)[0], node, rep)
            except StoreError:
                rep.errors += 1
            time.sleep(0.001)  # pacing: a server doing other work between map calls
            if time.monotonic() >= next_report:
                rep.sample = _sample(m, hot)
                _flush(m, rep, delays, arrivals, out)
                next_report = time.monotonic() + REPORT_EVERY
        time.sleep(m.config.max_staleness + 0.3)  # the contract: caches converge within it
        rep.final = {}
        for k in list(m._entries):
            # What this server would serve: an entry whose lease ran out is re-read on access.
            if m._servable(k) is not None and (cached := m.peek(k)) is not None:
                rep.final[str(k)] = cached
        rep.sample = _sample(m, hot)
        _flush(m, rep, delays, arrivals, out)


def _one_call(m: SyncMap, rng: random.Random, key: str, node: str, rep: Report) -> None:
    if rng.random() < WRITE_SHARE:
        if rng.random() < LOCK_SHARE:
            _locked_write(m, key, node, rep)
        else:
            m.set(key, {"by": node, "visits": rep.writes})
        rep.writes += 1
    else:
        m.get(key)
        rep.reads += 1


def _locked_write(m: SyncMap, key: str, node: str, rep: Report) -> None:
    """A read-modify-write under the key's lock; the fence makes a stale holder's write fail."""
    lock = m.lock(key, lease=5.0)
    asked = time.monotonic()
    try:
        fence = lock.acquire(timeout=5.0)
    except LockNotAcquired:
        rep.lock_timeouts += 1
        return
    rep.lock_waits_ms.append((time.monotonic() - asked) * 1000)
    rep.locks += 1
    try:
        current = m.get(key, consistent=True)
        visits = current.get("visits", 0) + 1 if isinstance(current, dict) else 1
        m.set(key, {"by": node, "visits": visits, "locked": True}, fence=fence)
    except (LockLost, StaleFence):
        rep.locks_lost += 1
    finally:
        try:
            lock.release()
        except LockLost:
            rep.locks_lost += 1


def _sample(m: SyncMap, hot: list[str]) -> dict[str, int]:
    sample = {}
    for k in hot:
        if m._servable(k) is not None and (cached := m.peek(k)) is not None:
            sample[k] = cached[1]
    return sample


def _flush(m: SyncMap, rep: Report, delays: list[float], arrivals: list[float], out: Connection
           ) -> None:  # fmt: skip
    s = m.statistics()
    rep.hits, rep.misses, rep.entries, rep.resyncs = s.hits, s.misses, s.entries, s.resyncs
    rep.delays_ms, delays[:] = list(delays), []
    rep.probe_arrivals, arrivals[:] = list(arrivals), []
    rep.t = time.monotonic()
    out.send(rep)
    rep.lock_waits_ms = []


def probe_writer(url: str, stop: Any, quiet: bool = False) -> None:
    """Writes its send time (monotonic ns, one clock for every process here) every 50 ms."""
    if quiet:
        logging.getLogger("syncmap").setLevel(logging.ERROR)
    with SyncMap(MAP, url, node_id="probe") as m:
        while not stop.is_set():
            with contextlib.suppress(StoreError):  # failing over (--sentinel): the next one will do
                m.set(PROBE_KEY, time.monotonic_ns())
            stop.wait(0.05)


# ---- what the demo process keeps and shows ----------------------------------------------------


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
class Node:
    """The demo's view of one server."""

    name: str
    latest: Report | None = None
    rates: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=8))
    delays: deque[float] = field(default_factory=lambda: deque(maxlen=2000))
    all_delays: list[float] = field(default_factory=list)
    lock_waits: list[float] = field(default_factory=list)
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=400))
    paused: bool = False
    check: tuple[int, int, int] = (0, 0, 0)  # sampled entries: equal, in flight, late

    def ingest(self, rep: Report) -> None:
        self.latest = rep
        self.rates.append((rep.t, rep.reads, rep.writes))
        self.delays.extend(rep.delays_ms)
        self.all_delays.extend(rep.delays_ms)
        self.lock_waits.extend(rep.lock_waits_ms)
        self.arrivals.extend(rep.probe_arrivals)

    def per_second(self) -> tuple[float, float]:
        if len(self.rates) < 2:
            return 0.0, 0.0
        (t0, r0, w0), (t1, r1, w1) = self.rates[0], self.rates[-1]
        span = max(t1 - t0, 1e-6)
        return (r1 - r0) / span, (w1 - w0) / span

    def hit_ratio(self) -> float:
        r = self.latest
        return r.hits / (r.hits + r.misses) if r and r.hits + r.misses else 0.0

    def first_arrival_after(self, t: float) -> float | None:
        return next((a for a in self.arrivals if a > t), None)


@dataclass
class ChaosEvent:
    at: float  # monotonic
    what: str
    heal_from: float  # monotonic: the kill, or the SIGCONT
    healed_at: float | None = None


class Demo:
    """The state of one run: servers, store, convergence check, chaos events; and its views."""

    def __init__(self, url: str, names: list[str], seconds: float, chaos: bool) -> None:
        self.url, self.seconds, self.chaos = url, seconds, chaos
        self.nodes = {n: Node(n) for n in names}
        self.started = time.monotonic()
        # INFO goes to the node the URL names *now*: on Sentinel, the master after a failover
        # (a client pinned to the paused one would stall the demo's loop for its timeout).
        self._topology = open_topology(url, timeout=1.0)
        self._admin_at: Endpoint | None = None
        self.admin = redis_client(url, 5)
        self.truth = SyncMap(MAP, url, node_id="demo-check")
        self.failover: FailoverChaos | None = None  # --sentinel --chaos
        self.max_staleness = self.truth.config.max_staleness
        self.store: dict[str, Any] = {}
        self.entries_in_store = 0
        self.history: dict[str, deque[tuple[float, int]]] = {
            k: deque(maxlen=200) for k in _hot_keys()
        }
        self.convergence = "waiting for the first reports"
        self.events: list[ChaosEvent] = []
        # Chaos is scheduled from "servers up" (every server has reported), not from the start:
        # spawning them may take seconds on a slow machine, and their runs end `seconds` after
        # each one started, so counting from here once left no time for any event.
        self.up_at: float | None = None
        self.run_end = float("inf")  # the first server's end, once every server is up
        self.next_chaos = float("inf")
        self.chaos_turn = 0
        self.paused: tuple[str, int, float, ChaosEvent] | None = None  # node, pid, until, event

    def close(self) -> None:
        self.truth.close()
        self.admin.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- polling the store and checking convergence

    def _store_version(self, key: str) -> int:
        _, version, _ = self.truth.get_with_meta(key, consistent=True)
        hist = self.history[key]
        if not hist or hist[-1][1] != version:
            hist.append((time.monotonic(), version))
        return version

    def ingest(self, rep: Report) -> None:
        """Take a report; check its sample of cached versions against the store right now."""
        node = self.nodes[rep.node]
        node.ingest(rep)
        if self.up_at is None and all(n.latest is not None for n in self.nodes.values()):
            self.up_at = time.monotonic()
            self.run_end = min(n.latest.ends_at for n in self.nodes.values() if n.latest)
            self.next_chaos = self.up_at + 1.0
        equal = in_flight = late = 0
        try:
            store = {k: self._store_version(k) for k in rep.sample}
        except StoreError:  # Redis failing over: this report goes unchecked
            return
        for k, version in rep.sample.items():
            if version >= store[k]:
                equal += 1
            # Late: the store already held a newer version max_staleness before the report.
            elif any(v > version and t <= rep.t - self.max_staleness for t, v in self.history[k]):
                late += 1
            else:
                in_flight += 1
        node.check = (equal, in_flight, late)

    def _admin(self) -> redis_lib.Redis:
        endpoint = self._topology.endpoint()
        if endpoint != self._admin_at:
            self.admin.close()
            self.admin, self._admin_at = endpoint.client(), endpoint
        return self.admin

    def poll_store(self) -> None:
        try:
            self.entries_in_store = len(self.truth)
            info = self._admin().info()
        except (StoreError, redis_lib.RedisError):  # failing over: the last figures stay
            return
        self.store = {
            "memory": info.get("used_memory_human", "?"),
            "clients": info.get("connected_clients", 0),
            "ops": info.get("instantaneous_ops_per_sec", 0),
        }
        self._check_convergence()

    def _check_convergence(self) -> None:
        equal = sum(n.check[0] for n in self.nodes.values())
        in_flight = sum(n.check[1] for n in self.nodes.values())
        late = sum(n.check[2] for n in self.nodes.values())
        total = equal + in_flight + late
        if not total:
            self.convergence = "waiting for the first reports"
            return
        state = "converged" if equal == total else ("LATE" if late else "converging")
        self.convergence = (
            f"{state}: {equal}/{total} sampled cached entries equal the store, "
            f"{in_flight} in flight, {late} late"
        )

    # -- chaos

    def chaos_tick(self, procs: dict[str, Any], say: Callable[[str], None]) -> None:
        now = time.monotonic()
        if self.paused is not None and now >= self.paused[2]:
            name, pid, _, event = self.paused
            os.kill(pid, signal.SIGCONT)
            event.heal_from = time.monotonic()
            self.nodes[name].paused = False
            self.paused = None
            say(self._stamp(f"chaos: SIGCONT {name} after {PAUSE_FOR:g} s"))
        for event in self.events:
            if event.healed_at is None and time.monotonic() >= event.heal_from:
                firsts = [n.first_arrival_after(event.heal_from) for n in self.nodes.values()]
                if all(a is not None for a in firsts):
                    event.healed_at = max(a for a in firsts if a is not None)
                    say(self._stamp(f"chaos: healed: {self._heal_text(event)}"))
        if self.chaos and self.failover is not None:  # --sentinel: one failover, nothing else
            self._failover_tick(say)
            return
        end = self.run_end
        if not self.chaos or self.paused is not None or now < self.next_chaos:
            return
        if any(n.latest is None for n in self.nodes.values()):  # not every server is up yet
            return
        if now + PAUSE_FOR > end - 1.0:  # leave the run's end quiet
            return
        self.chaos_turn += 1
        if self.chaos_turn % 2 == 1:
            killed = self.admin.client_kill_filter(_type="pubsub")
            event = ChaosEvent(now, f"CLIENT KILL TYPE pubsub ({killed} subscriber connections)",
                               heal_from=now)  # fmt: skip
            self.next_chaos = now + 1.0 + random.random() / 2
        else:
            name = random.choice([n for n, p in procs.items() if p.is_alive()])
            pid = procs[name].pid
            os.kill(pid, signal.SIGSTOP)
            self.nodes[name].paused = True
            event = ChaosEvent(now, f"SIGSTOP {name} for {PAUSE_FOR:g} s", heal_from=float("inf"))
            self.paused = (name, pid, now + PAUSE_FOR, event)
            self.next_chaos = now + PAUSE_FOR + 1.0 + random.random() / 2
        self.events.append(event)
        say(self._stamp(f"chaos: {event.what}"))

    def _failover_tick(self, say: Callable[[str], None]) -> None:
        assert self.failover is not None
        resumed = self.failover.tick(self.up_at, self.run_end, lambda t: say(self._stamp(t)))
        if resumed is not None:
            what, at = resumed
            self.events.append(ChaosEvent(self.failover.paused_at, what, heal_from=at))

    def resume_all(self, procs: dict[str, Any]) -> None:
        if self.failover is not None:
            self.failover.resume()
        if self.paused is not None:
            name, pid, _, event = self.paused
            os.kill(pid, signal.SIGCONT)
            event.heal_from = time.monotonic()
            self.nodes[name].paused = False
            self.paused = None

    def _heal_text(self, event: ChaosEvent) -> str:
        assert event.healed_at is not None
        took = max(event.healed_at - event.heal_from, 0.0)
        after = "the kill" if event.what.startswith("CLIENT") else "SIGCONT"
        return f"every server receives changes again {took:.2f} s after {after}"

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
        return (
            f"store: {self.entries_in_store} entries in Redis, {s.get('memory', '?')} used, "
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


# ---- running it ---------------------------------------------------------------------------------


def run(url: str, nodes: int, seconds: float, say: Callable[[str], None], *,
        chaos: bool = False, live: bool = False, sentinels: SentinelSet | None = None
        ) -> bool:  # fmt: skip
    """Run the demo against ``url``; returns the convergence verdict.  ``sentinels``: the set
    ``url`` names (``--sentinel``), whose master ``chaos`` pauses once instead of the usual."""
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    names = [f"server-{i + 1}" for i in range(nodes)]
    pipes = {n: ctx.Pipe(duplex=False) for n in names}
    start = ctx.Barrier(nodes)
    procs = {
        n: ctx.Process(target=server, args=(url, n, seconds, pipes[n][1], live, start))
        for n in names
    }
    probe = ctx.Process(target=probe_writer, args=(url, stop, live))
    for p in [*procs.values(), probe]:
        p.start()
    for _, w in pipes.values():
        w.close()  # the children hold the writing ends
    readers = {r: n for n, (r, _) in pipes.items()}
    state = Demo(url, names, seconds, chaos)
    if sentinels is not None:
        state.failover = FailoverChaos(sentinels)
    finals: dict[str, dict[str, tuple[Any, int]]] = {}
    try:
        _watch(state, readers, procs, stop, finals, say, live)
    finally:
        state.resume_all(procs)
        stop.set()
        for p in [*procs.values(), probe]:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    try:
        for line in state.final_lines():
            say(line)
        missing = sorted(set(names) - set(finals))
        if missing:
            say(f"NOT CONVERGED: no final report from {', '.join(missing)}")
            return False
        converged = _verdict(state.truth, finals, say)
        if chaos and not state.events:
            say(
                "NOT A CHAOS RUN: --chaos injected no events (the servers were up together for "
                "too short a time to fit one); run longer, e.g. --seconds 10"
            )
            return False
        return converged
    finally:
        state.close()


def _watch(state: Demo, readers: dict[Connection, str], procs: dict[str, Any], stop: Any,
           finals: dict[str, dict[str, tuple[Any, int]]], say: Callable[[str], None],
           live: bool) -> None:  # fmt: skip
    """Collect the reports until every server sent its final one; show them; make chaos."""
    rich_live = _start_live(state) if live else None
    events_out: Callable[[str], None] = (lambda _line: None) if rich_live else say
    try:
        deadline = time.monotonic() + state.seconds + 60
        next_poll = next_show = time.monotonic() + 1.0
        while readers and len(finals) < len(state.nodes) and time.monotonic() < deadline:
            if time.monotonic() >= state.run_end:
                stop.set()  # before the servers' quiet period, so nothing is in flight then
            _receive(state, readers, finals)
            state.chaos_tick(procs, events_out)
            now = time.monotonic()
            if now >= next_poll:
                state.poll_store()
                next_poll = now + (0.5 if rich_live else 1.0)
            if rich_live is not None:
                rich_live.update(state.rich_view(), refresh=True)
            elif now >= next_show and not finals:
                for line in state.plain_lines():
                    say(line)
                next_show = now + 1.0
        state.poll_store()
        if rich_live is not None:
            rich_live.update(state.rich_view(), refresh=True)
    finally:
        if rich_live is not None:
            rich_live.stop()


def _receive(state: Demo, readers: dict[Connection, str],
             finals: dict[str, dict[str, tuple[Any, int]]]) -> None:  # fmt: skip
    for conn in wait(list(readers), timeout=0.1):
        assert isinstance(conn, Connection)
        try:
            item: Report = conn.recv()
        except EOFError:  # the server died: its verdict is missing
            del readers[conn]
            continue
        state.ingest(item)
        if item.final is not None:
            finals[item.node] = item.final


def _start_live(state: Demo) -> Any:
    from rich.live import Live  # noqa: PLC0415 (rich is optional: the cli extra)

    live = Live(state.rich_view(), auto_refresh=False, redirect_stdout=False)
    live.start()
    return live


def _verdict(truth: SyncMap, finals: dict[str, dict[str, tuple[Any, int]]],
             say: Callable[[str], None]) -> bool:  # fmt: skip
    wrong = []
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


def rich_available() -> bool:
    try:
        import rich  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def demo(url: str | None, nodes: int, seconds: float, say: Callable[[str], None], *,
         chaos: bool = False, live: bool | None = None, sentinel: bool = False
         ) -> bool:  # fmt: skip
    """Start an embedded Redis unless ``url`` is given, then :func:`run`.

    ``live=None``: a rich live view when stdout is a terminal and rich is installed.
    ``sentinel``: start a master, a replica and three Sentinels instead (demo_sentinel.py).
    """
    if live is None:
        live = sys.stdout.isatty() and rich_available()
    if sentinel and url is not None:
        raise ConfigurationError("--sentinel starts servers of its own: leave out --url")
    with ExitStack() as stack:
        sentinels = None
        if sentinel:
            sentinels = stack.enter_context(SentinelSet())
            url = sentinels.url
            say(f"started an embedded {sentinels.topology()}")
            say(f"maps open {url}")
        elif url is None:
            embedded = stack.enter_context(EmbeddedRedis())
            url = embedded.url
            say(f"started an embedded {embedded.label} at {url}")
        else:
            with SyncMap(MAP, url) as m:
                m.clear()
        say(
            f"{nodes} servers share map {MAP!r} for {seconds:g} s (90 % reads, 10 % writes, "
            f"{LOCK_SHARE:.0%} of them under the key's lock)"
            + (
                ": chaos on ("
                + (
                    "the master paused once: a failover"
                    if sentinel
                    else "pub/sub kills, paused servers"
                )
                + ")"
                if chaos
                else ""
            )
        )
        return run(url, nodes, seconds, say, chaos=chaos, live=live, sentinels=sentinels)
    raise AssertionError("unreachable")
