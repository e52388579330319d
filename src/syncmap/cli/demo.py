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

This module runs it: the processes, the chaos and the loop that collects the reports.  The
servers are in ``demo_server.py``, the convergence check in ``demo_check.py``, the views in
``demo_view.py``, the ``--sentinel`` failover in ``demo_sentinel.py``, the ``--cluster`` shard
failover in ``demo_cluster.py``.  On a Redis Cluster (``--cluster``, or a ``redis+cluster://``
``--url``) the pub/sub kill goes to every master and the store line sums every master's INFO.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from ..embedded import EmbeddedRedis
from ..errors import ConfigurationError
from ..map import SyncMap
from ..store.endpoint import Endpoint
from ..store.topology import open_topology
from ..testing.clusterset import ClusterSet
from ..testing.sentinelset import SentinelSet
from .demo_check import Node, _verdict
from .demo_cluster import ShardFailoverChaos, kill_subscribers
from .demo_cluster import topology as cluster_topology
from .demo_sentinel import FailoverChaos
from .demo_server import LOCK_SHARE, MAP, Report, _hot_keys, probe_writer, server
from .demo_view import ChaosEvent, DemoView, _start_live, rich_available
from .options import redis_client

PAUSE_FOR = 1.5


class OneFailover(Protocol):
    """A failover the demo's chaos makes once (``demo_sentinel.py``, ``demo_cluster.py``)."""

    paused_at: float  # when the fault was injected
    done: bool

    def tick(self, up_at: float | None, run_end: float, say: Callable[[str], None]) -> Any: ...

    def resume(self) -> None: ...


class Demo(DemoView):
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
        self.failover: OneFailover | None = None  # --sentinel or --cluster, with --chaos
        self.failover_only = False  # --sentinel: the failover is all the chaos
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
        # --sentinel: one failover, nothing else; --cluster: the failover first, then the rest
        failover = self.failover
        if self.chaos and failover is not None and (self.failover_only or not failover.done):
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
            cluster = self._topology.kind == "cluster"
            killed = kill_subscribers(self.admin, cluster)
            where = " on every master" if cluster else ""
            event = ChaosEvent(now, f"CLIENT KILL TYPE pubsub{where} ({killed} subscriber "
                               "connections)", heal_from=now)  # fmt: skip
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
        after = ("the kill" if event.what.startswith("CLIENT")
                 else "the promotion" if event.what.startswith("shard failover")
                 else "SIGCONT")  # fmt: skip
        return f"every server receives changes again {took:.2f} s after {after}"


# ---- running it ---------------------------------------------------------------------------------


def run(url: str, nodes: int, seconds: float, say: Callable[[str], None], *,
        chaos: bool = False, live: bool = False, sentinels: SentinelSet | None = None,
        cluster: ClusterSet | None = None) -> bool:  # fmt: skip
    """Run the demo against ``url``; returns the convergence verdict.  ``sentinels``: the set
    ``url`` names (``--sentinel``), whose master ``chaos`` pauses once instead of the usual.
    ``cluster``: the ClusterSet ``url`` names (``--cluster``), one of whose masters ``chaos``
    kills once (a shard failover) before the usual."""
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
        state.failover, state.failover_only = FailoverChaos(sentinels), True
    elif cluster is not None:
        state.failover = ShardFailoverChaos(cluster)
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


def demo(url: str | None, nodes: int, seconds: float, say: Callable[[str], None], *,
         chaos: bool = False, live: bool | None = None, sentinel: bool = False,
         cluster: bool = False) -> bool:  # fmt: skip
    """Start an embedded Redis unless ``url`` is given, then :func:`run`.

    ``live=None``: a rich live view when stdout is a terminal and rich is installed.
    ``sentinel``: start a master, a replica and three Sentinels instead (demo_sentinel.py).
    ``cluster``: start a 3-master Redis Cluster with a replica each instead (demo_cluster.py).
    """
    if live is None:
        live = sys.stdout.isatty() and rich_available()
    if sentinel and cluster:
        raise ConfigurationError("--sentinel and --cluster each start servers: choose one")
    if (sentinel or cluster) and url is not None:
        flag = "--sentinel" if sentinel else "--cluster"
        raise ConfigurationError(f"{flag} starts servers of its own: leave out --url")
    with ExitStack() as stack:
        sentinels = cluster_set = None
        if sentinel:
            sentinels = stack.enter_context(SentinelSet())
            url = sentinels.url
            say(f"started an embedded {sentinels.topology()}")
            say(f"maps open {url}")
        elif cluster:
            cluster_set = stack.enter_context(ClusterSet(masters=3, replicas=1))
            url = cluster_set.url
            say(f"started an embedded {cluster_topology(cluster_set)} "
                f"in {cluster_set.startup_seconds:.1f} s")  # fmt: skip
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
                    else "a master killed once: a shard failover; then pub/sub kills on every "
                    "master, paused servers"
                    if cluster
                    else "pub/sub kills, paused servers"
                )
                + ")"
                if chaos
                else ""
            )
        )
        return run(url, nodes, seconds, say, chaos=chaos, live=live, sentinels=sentinels,
                   cluster=cluster_set)  # fmt: skip
    raise AssertionError("unreachable")
