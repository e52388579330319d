"""A multi-process workload for scenarios: several servers read and write one map.

Each server is a separate OS process (so SIGSTOP or a killed connection hits only one) running
:func:`serve`, or with ``drivers`` naming ``"async"`` for it, ``syncmap.testing.aworkload``'s
asyncio server (a ``syncmap.aio`` map on the same map, in the same run).  It records every
operation with ``time.monotonic_ns()`` and, after the run and a quiet period of
``max_staleness``, what its near cache holds (for the convergence check, C3).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import MapConfig
from ..core.nearcache import Guards
from ..errors import StoreError, WriteOutcomeUnknown
from ..map import SyncMap
from .history import Op


@dataclass(frozen=True, slots=True)
class Workload:
    url: str
    name: str = "scenario"
    seconds: float = 4.0
    keys: int = 64
    write_ratio: float = 0.1
    pace_s: float = 0.002
    max_staleness: float = 1.0
    feed: str | None = None
    guards: Guards = field(default_factory=Guards)
    drivers: tuple[str, ...] = ()
    """Driver of each server, cycled (``"sync"`` or ``"async"``); empty: every one sync."""
    read_only: tuple[str, ...] = ()
    """Keys the load reads and never writes (a write drawn for one is a read).  A scenario that
    writes one of them in its fault leaves that write the key's last, so a cache that missed
    its message stays stale to the end: the guard-off control is then certain to see it."""

    def driver(self, index: int) -> str:
        return self.drivers[index % len(self.drivers)] if self.drivers else "sync"

    def config(self) -> MapConfig:
        return MapConfig(max_staleness=self.max_staleness, guards=self.guards, socket_timeout=2.0)


@dataclass(slots=True)
class ServerResult:
    process: str
    pid: int
    ops: list[Op]
    cached: dict[str, tuple[Any, int]]
    stats: dict[str, int]


def serve(w: Workload, process: str, seed: int, results: Any, ready: Any, go: Any) -> None:
    """Body of server process number ``seed`` (its index, also its seed); puts a
    :class:`ServerResult` on ``results``."""
    if w.driver(seed) == "async":
        from .aworkload import aserve  # noqa: PLC0415 - the asyncio server's modules

        asyncio.run(aserve(w, process, seed, results, ready, go))
        return
    rng = random.Random(seed)
    cfg = w.config()
    weights = [1 / (i + 1) for i in range(w.keys)]  # Zipf-like skew
    names = [f"k{i}" for i in range(w.keys)]
    ops: list[Op] = []
    with SyncMap(w.name, w.url, config=cfg, feed=w.feed, node_id=process) as m:
        ready.put(os.getpid())
        go.wait()
        end = time.monotonic() + w.seconds
        n = 0
        while time.monotonic() < end:
            key = rng.choices(names, weights)[0]
            write = rng.random() < w.write_ratio and key not in w.read_only
            op = _one(m, process, key, write, n)
            if op is not None:
                ops.append(op)
            n += 1
            time.sleep(w.pace_s)  # pacing the load, not waiting for anything
        time.sleep(w.max_staleness + 0.3)  # C3 is stated "after T + max_staleness"
        cached = {str(k): m.peek(k) for k in list(m._entries)}
        stats = {k: v for k, v in asdict(m.statistics()).items() if isinstance(v, int)}
    results.put(ServerResult(process, os.getpid(), ops, cached, stats))  # type: ignore[arg-type]


def _one(m: SyncMap, process: str, key: str, write: bool, n: int) -> Op | None:
    """One operation; a failed one is dropped, a write of unknown outcome is kept as ``info``."""
    call = time.monotonic_ns()
    try:
        if write:
            value = f"{process}-{n}"
            try:
                version = m.set(key, value)
            except WriteOutcomeUnknown:
                return Op(process, "info", key, value, -1, call, time.monotonic_ns())
            return Op(process, "write", key, value, version, call, time.monotonic_ns())
        value, version, source = m.get_with_meta(key)
    except StoreError:
        return None  # definitely not applied (StoreUnavailable) or nothing read
    return Op(process, "read", key, value, version, call, time.monotonic_ns(), source)


class Cluster:
    """Start ``n`` server processes on a workload; ``pids`` for fault injection; ``join``."""

    def __init__(self, w: Workload, n: int = 3) -> None:
        ctx = mp.get_context("spawn")
        self._results: Any = ctx.Queue()
        ready: Any = ctx.Queue()
        self._go = ctx.Event()
        self._procs = [
            ctx.Process(target=serve, args=(w, f"s{i}", i, self._results, ready, self._go))
            for i in range(n)
        ]
        for p in self._procs:
            p.start()
        self.pids = [ready.get(timeout=60) for _ in self._procs]
        self.started = time.monotonic()
        self._go.set()

    def join(self, timeout: float = 120) -> list[ServerResult]:
        out = [self._results.get(timeout=timeout) for _ in self._procs]
        for p in self._procs:
            p.join(timeout=10)
        return sorted(out, key=lambda r: r.process)

    def kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
