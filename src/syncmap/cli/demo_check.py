"""What the demo keeps of each server, and its convergence check against the store.

Each report's sample of cached versions (the hottest keys) is compared with the store at once:
equal, in flight, or late (the store held a newer version ``max_staleness`` before the report).
At the end, :func:`_verdict` compares every entry each server would serve with the store.
Split from demo.py (STYLE: a module is one concept, ~400 lines).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis as redis_lib

from ..errors import StoreError
from ..map import SyncMap
from ..store.endpoint import Endpoint
from ..store.topology import Topology
from .demo_cluster import cluster_info
from .demo_server import Report


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


class ConvergenceCheck:
    """The demo's polling of the store and convergence check (``Demo.__init__`` sets these)."""

    nodes: dict[str, Node]
    truth: SyncMap
    admin: redis_lib.Redis
    _topology: Topology
    _admin_at: Endpoint | None
    max_staleness: float
    store: dict[str, Any]
    entries_in_store: int
    history: dict[str, deque[tuple[float, int]]]
    convergence: str
    up_at: float | None
    run_end: float
    next_chaos: float

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
        if self._topology.kind == "cluster":  # a RedisCluster: it follows the slots itself
            return self.admin
        endpoint = self._topology.endpoint()
        if endpoint != self._admin_at:
            self.admin.close()
            self.admin, self._admin_at = endpoint.client(), endpoint
        return self.admin

    def poll_store(self) -> None:
        try:
            self.entries_in_store = len(self.truth)
            if self._topology.kind == "cluster":
                self.store = cluster_info(self._admin())
            else:
                info = self._admin().info()
                self.store = {
                    "memory": info.get("used_memory_human", "?"),
                    "clients": info.get("connected_clients", 0),
                    "ops": info.get("instantaneous_ops_per_sec", 0),
                }
        except (StoreError, redis_lib.RedisError):  # failing over: the last figures stay
            return
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
