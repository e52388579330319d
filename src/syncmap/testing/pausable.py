"""A map held by another process that a test (or ``syncmap bench``) can pause with SIGSTOP.

Revalidation (issue 16 goal 2) is about what a *paused* process keeps: every lease lapses while
it is stopped, and the first probe after SIGCONT decides, bucket by bucket, whether the entries
survive.  A process cannot stop itself and observe that, so :class:`PausableMap` starts a child
(``spawn``) that opens the map, caches ``n`` entries and then answers requests on a pipe; the
parent stops and continues it (:meth:`PausableMap.pause`), writes meanwhile, cuts its subscriber
connection (``CLIENT KILL TYPE pubsub``) and asks it what it still caches (:meth:`check`).

Every figure comes from the child's own near cache, read under its map's guard.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..config import MapConfig
from ..core.nearcache import INF, Guards
from ..map import SyncMap
from .wait import wait_until


@dataclass(frozen=True, slots=True)
class Check:
    """What the child found after a pause: ``survivors`` of the ``expected`` entries (keys not
    written meanwhile) still cached and served; ``stale``: written keys read back with their old
    value; ``settled_s``: from the request until no bucket was held and the hit path served."""

    survivors: int
    expected: int
    stale: list[str]
    entries: int
    revalidations: int
    settled_s: float


def key_of(i: int) -> str:
    return f"key-{i:07d}"


def _child(conn: Connection, url: str, name: str, n: int, delta: float, revalidate: bool,
           ping_leases: bool,
           namespace: str) -> None:  # fmt: skip
    config = MapConfig(namespace=namespace, max_staleness=delta, capacity=n + 16,
                       guards=Guards(revalidate=revalidate), ping_leases=ping_leases)  # fmt: skip
    with SyncMap(name, url, config=config) as m:
        m.preload()
        for _ in range(3):  # a fill in flight when a probe started was not installed: read again
            for i in range(n):
                if m.peek(key_of(i)) is None:
                    m[key_of(i)]
        conn.send(len(m._core.entries))
        while True:
            req = conn.recv()
            if req is None:
                return
            conn.send(_check(m, n, req))


def _settled(m: SyncMap) -> bool:
    """No bucket held and the hit path serving: every bucket renewed or restarted."""
    core = m._core
    with m._state.guard:
        held = any(b.held_since != -INF for b in core.buckets)
        return not held and time.monotonic() < core.fresh_until


def _check(m: SyncMap, n: int, written: dict[str, Any]) -> Check:
    t0 = time.monotonic()
    took = wait_until(lambda: _settled(m), 10.0, "the map's buckets revalidated")
    # Written keys' messages may still be on the way to a bucket a probe renewed before they
    # came (the probe read an older sequence): they arrive within one message hop.
    wait_until(lambda: all(m._servable(k) is None for k in written), 5.0, "invalidations")
    others = [key_of(i) for i in range(n) if key_of(i) not in written]
    survivors = sum(1 for k in others if m._servable(k) is not None)
    stale = [k for k, v in written.items() if m[k] != v]
    c = m._core.counters
    return Check(survivors, len(others), stale, len(m._core.entries), c.revalidations,
                 took or time.monotonic() - t0)  # fmt: skip


class PausableMap:
    """The child process and its pipe; use :func:`pausable_map`."""

    def __init__(self, proc: Any, conn: Connection, cached: int) -> None:
        self.proc, self.conn, self.cached = proc, conn, cached

    @contextmanager
    def pause(self) -> Iterator[None]:
        """SIGSTOP the child for the ``with`` block, then SIGCONT it."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def check(self, written: dict[str, Any]) -> Check:
        """Wait in the child until it settled, then count what survived of the keys not in
        ``written`` and read every written key (its new value expected)."""
        self.conn.send(written)
        if not self.conn.poll(30.0):
            raise AssertionError("the paused map's process did not answer within 30 s")
        result = self.conn.recv()
        assert isinstance(result, Check)
        return result


@contextmanager
def pausable_map(url: str, name: str, n: int, *, delta: float = 0.5, revalidate: bool = True,
                 namespace: str = "sm", ping_leases: bool = True,
                 ) -> Iterator[PausableMap]:  # fmt: skip
    """A child process holding map ``name`` with ``n`` entries cached (already written).
    ``ping_leases=False``: the map probes every Δ/4, so a lapse after a pause is decided by a
    probe (revalidation); with leases the first vouch after the pause may renew it first."""
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(theirs, url, name, n, delta, revalidate, ping_leases,
                                                    namespace),
                       daemon=True)  # fmt: skip
    proc.start()
    try:
        deadline = time.monotonic() + 120.0  # 1M entries to load on a busy machine
        while not mine.poll(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise AssertionError(f"the pausable map's process did not start (exit code "
                                     f"{proc.exitcode})")  # fmt: skip
        yield PausableMap(proc, mine, mine.recv())
        mine.send(None)
        proc.join(10.0)
    finally:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.join(5.0)
