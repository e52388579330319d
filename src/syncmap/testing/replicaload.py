"""Convergence of replicated maps: several server processes write at random, then must agree.

``run(ReplicaLoad(feed_url, ...), fault=...)`` starts ``processes`` OS processes (spawn context),
each holding a :class:`~syncmap.ReplicatedMap` of one name.  Each does ``ops`` random writes
(set 70 %, delete 28 %, clear 2 %) on a few shared keys; a write the broker refused
(``FeedError``) is counted and skipped, as an application would.  ``fault`` runs in the parent
once every process is half-way (restart the broker, cut connections).  Then each process writes a
``done`` marker; when a process sees every marker, every publisher's earlier writes have reached
it (each feed keeps one publisher's order).  The parent then asks every process for its map until
all agree (messages lost to a disconnect come back through the peers' re-send, which takes a
moment) or ``converge_timeout`` passes: the result says which.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FeedError
from ..replicated import ReplicatedMap


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    feed: str
    name: str = "replicaload"
    processes: int = 3
    ops: int = 200
    keys: int = 16
    snapshot: str | None = "peers"
    seed: int = 1
    converge_timeout: float = 20.0


@dataclass(slots=True)
class ReplicaResult:
    converged: bool
    seconds_to_converge: float
    maps: list[dict[str, Any]]
    refused_writes: int
    stats: list[dict[str, int]]


def _body(w: ReplicaLoad, idx: int, ready: Any, half: Any, go: Any, cmds: Any, out: Any) -> None:
    rng = random.Random(w.seed * 1000 + idx)
    refused = 0
    # The done markers live in a map of their own: another process's clear() must not wipe them.
    with (
        ReplicatedMap(w.name, w.feed, node_id=f"p{idx}", snapshot=w.snapshot) as m,
        ReplicatedMap(w.name + ".done", w.feed, node_id=f"p{idx}", snapshot=w.snapshot) as done,
    ):
        ready.put(idx)
        go.wait()
        for i in range(w.ops):
            if i == w.ops // 2:
                half.put(idx)
            key, r = f"k{rng.randrange(w.keys)}", rng.random()
            try:
                if r < 0.70:
                    m[key] = [idx, i]
                elif r < 0.98:
                    m.pop(key, None)
                else:
                    m.clear()
            except FeedError:
                refused += 1
        _until(lambda: _try_set(done, f"p{idx}"), 30.0)
        _until(lambda: all(f"p{j}" in done for j in range(w.processes)), 30.0)
        while cmds.get() != "stop":  # "dump"
            stats = m.statistics()
            out.put((idx, dict(m.items()), refused, {
                "applied": stats.applied, "ignored": stats.ignored,
                "syncs_requested": stats.syncs_requested, "syncs_answered": stats.syncs_answered,
                "feed_drops": stats.feed_drops,
            }))  # fmt: skip


def _try_set(m: ReplicatedMap, key: str) -> bool:
    try:
        m[key] = True
    except FeedError:
        return False
    return True


def _until(predicate: Callable[[], bool], timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("replicaload: a process did not get there in time")
        time.sleep(0.005)  # polling a condition another process makes true


def run(w: ReplicaLoad, fault: Callable[[], None] | None = None) -> ReplicaResult:
    ctx = mp.get_context("spawn")
    ready, half, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    cmds = [ctx.Queue() for _ in range(w.processes)]
    procs = [
        ctx.Process(target=_body, args=(w, i, ready, half, go, cmds[i], out), daemon=True)
        for i in range(w.processes)
    ]
    try:
        for p in procs:  # one at a time: each later one loads from the ones before it
            p.start()
            ready.get(timeout=60)
        go.set()
        for _ in procs:
            half.get(timeout=120)
        if fault is not None:
            fault()
        start = time.monotonic()
        agreed: list[dict[str, Any]] | None = None
        while True:
            maps, refused, stats = _collect(w, cmds, out)
            if all(x == maps[0] for x in maps):
                # Twice in a row, the same: a message still in flight to everyone would have
                # changed it (the markers' map is another topic, ordered apart from this one).
                if agreed == maps:
                    return ReplicaResult(True, time.monotonic() - start, maps, refused, stats)
                agreed = maps
            else:
                agreed = None
            if time.monotonic() - start > w.converge_timeout:
                return ReplicaResult(False, time.monotonic() - start, maps, refused, stats)
            time.sleep(0.2)  # re-sends or stragglers may be on their way; ask again
    finally:
        for q in cmds:
            q.put("stop")
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def _collect(
    w: ReplicaLoad, cmds: list[Any], out: Any
) -> tuple[list[dict[str, Any]], int, list[dict[str, int]]]:
    for q in cmds:
        q.put("dump")
    got: dict[int, tuple[dict[str, Any], int, dict[str, int]]] = {}
    while len(got) < w.processes:
        try:
            idx, data, refused, stats = out.get(timeout=120)
        except queue.Empty as exc:
            raise TimeoutError("replicaload: a process stopped answering") from exc
        got[idx] = (data, refused, stats)
    ordered = [got[i] for i in range(w.processes)]
    return [g[0] for g in ordered], sum(g[1] for g in ordered), [g[2] for g in ordered]
