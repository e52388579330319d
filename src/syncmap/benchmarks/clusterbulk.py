"""Redis Cluster, continued: write throughput of several writer processes, and whole-map
operations on a large map, on the 3-master cluster against one Redis (:mod:`.clusterbench`).

* **Writers**: N processes (``spawn``, started once, reused) each open the map on the target and
  write ``m[k] = v`` to random keys of 10,000 from a common start instant for ``seconds``; the
  row is the writes of all N per second, the cluster against one Redis in the same rounds (every
  N and target in each round, the order reversed every other round).  Each writer also receives
  every writer's change messages, as servers sharing a map do.
* **Whole-map operations** on an N-entry map (100k in the quick plan, 1M in the full one):
  ``update()`` of every entry, ``copy()`` (the one round trip ``items()`` and ``len()``-free
  views read) and ``preload()`` into an empty near cache (a map opened for each block, outside
  the timing), each on the cluster against one Redis.  Issue 14 asks ``preload()`` on a 3-master
  cluster to be at least as fast as on one Redis: that row's target is a ratio of at most 1.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from multiprocessing.queues import Queue
from typing import Any

from .. import MapConfig, SyncMap
from .context import settle
from .method import Contender, Row, interleave, median
from .workers import Pool, serve

KEYS = 10_000
START_IN = 0.3  # seconds from the command to the writers' common start


@dataclass(frozen=True, slots=True)
class BulkPlan:
    writers: tuple[int, ...]  # writer processes per segment
    writer_seconds: float  # how long each segment writes
    writer_rounds: int
    n: int  # entries of the whole-map operations' map
    rounds: int  # interleaved rounds of the whole-map operations


def run(one_url: str, cluster_url: str, ns: str, plan: BulkPlan,
        took: dict[str, float]) -> tuple[list[Row], dict[str, Any]]:  # fmt: skip
    """The writer and whole-map rows; ``took`` gets each group's seconds."""
    targets = {"cluster": cluster_url, "one": one_url}
    t0 = time.monotonic()
    rows, per_n = _writers(targets, ns, plan)
    took["writers"] = time.monotonic() - t0
    t0 = time.monotonic()
    bulk_rows, bulk = _whole_map(targets, ns, plan.n, plan.rounds)
    took["whole-map"] = time.monotonic() - t0
    notes = [
        f"writers: each of N processes writes `m[k] = v` to random keys of {KEYS:,} for "
        f"{plan.writer_seconds:g} s from a common start; writes/s of all N together. Each "
        "writer's map also receives every writer's change messages.",
        f"whole-map operations: a map of {plan.n:,} entries (str key, int value); `preload()` "
        "into a map opened for the block (untimed), `update()` in chunks of 100k.",
    ]
    return rows + bulk_rows, {"writers": per_n, "whole_map": bulk, "notes": notes}


# ---- writers (other processes) --------------------------------------------------------------


def writer(wid: int, cmds: Queue[Any], out: Queue[Any], ns: str) -> None:
    current: list[SyncMap] = []
    keys = [f"key-{i:05d}" for i in range(KEYS)]
    rng = random.Random(wid)

    def handle(cmd: tuple[Any, ...]) -> Any:
        if cmd[0] == "open":  # ("open", url, map name)
            m = SyncMap(cmd[2], url=cmd[1], config=MapConfig(namespace=ns, presence=False))
            m[f"warm-{wid}"] = 0  # connections made and scripts loaded before the timing
            current.append(m)
            return None
        if cmd[0] == "run":  # ("run", start at, seconds): writes made
            return _write_until(current[-1], keys, rng, cmd[1], cmd[2])
        current.pop().close()
        return None

    serve(wid, cmds, out, handle)


def _write_until(m: SyncMap, keys: list[str], rng: random.Random, start_ns: int,
                 seconds: float) -> int:  # fmt: skip
    time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))  # the common start instant
    end, n = start_ns + int(seconds * 1e9), 0
    while time.monotonic_ns() < end:
        m[keys[rng.randrange(KEYS)]] = n
        n += 1
    return n


def _writers(targets: dict[str, str], ns: str,
             plan: BulkPlan) -> tuple[list[Row], dict[str, dict[str, float]]]:  # fmt: skip
    pool = Pool.start(writer, max(plan.writers), (ns,))
    try:
        contenders: list[Contender] = [
            (f"{target} {n}", _segment(pool, url, n, plan.writer_seconds))
            for n in plan.writers
            for target, url in targets.items()
        ]
        s = interleave(contenders, plan.writer_rounds)
    finally:
        pool.stop()
    rows = []
    for n in plan.writers:
        procs = f"{n} writer process" + ("" if n == 1 else "es")
        rows.append(Row.paired(f"{procs}: writes/s on the 3-master cluster vs one Redis", "/s",
                               s[f"cluster {n}"], s[f"one {n}"],
                               key=f"cluster.writers.{n}"))  # fmt: skip
    per_n = {str(n): {t: median(s[f"{t} {n}"]) for t in targets} for n in plan.writers}
    return rows, per_n


def _segment(pool: Pool, url: str, n: int, seconds: float) -> Callable[[], float]:
    def block() -> float:
        wids = range(n)
        pool.ask(wids, ("open", url, "cl-writers"), 60)
        try:
            start = time.monotonic_ns() + int(START_IN * 1e9)
            counts = pool.ask(wids, ("run", start, seconds), seconds + 60)
        finally:
            pool.ask(wids, ("close",), 60)
        return float(sum(counts.values())) / seconds

    return block


# ---- whole-map operations -------------------------------------------------------------------


def _whole_map(targets: dict[str, str], ns: str, n: int,
               rounds: int) -> tuple[list[Row], dict[str, dict[str, float]]]:  # fmt: skip
    data = {f"key-{i:07d}": i for i in range(n)}
    config = MapConfig(namespace=ns, capacity=n, presence=False)
    maps = {t: SyncMap("cl-bulk", url=url, config=config) for t, url in targets.items()}
    try:
        contenders: list[Contender] = [(f"update {t}", _update(maps[t], data)) for t in targets]
        contenders += [(f"copy {t}", _copy(maps[t], n)) for t in targets]
        contenders += [(f"preload {t}", _preload(url, config, n)) for t, url in targets.items()]

        def after(name: str) -> None:  # a writer's own change messages are handled untimed
            if name.startswith("update"):
                settle(maps[name.split()[1]])

        s = interleave(contenders, rounds, after=after)
    finally:
        for m in maps.values():
            m.close()
    count = f"{n // 1000:,}k" if n < 1_000_000 else f"{n / 1e6:g}M"
    rows = [
        Row.paired(f"`update()` of {count} entries on the 3-master cluster vs one Redis", "/s",
                   s["update cluster"], s["update one"], key="cluster.update"),
        Row.paired(f"`copy()` (`items()`) of {count} entries, cluster vs one Redis", "/s",
                   s["copy cluster"], s["copy one"], key="cluster.copy"),
        Row.paired(f"`preload()` of {count} entries, cluster vs one Redis", "/s",
                   s["preload cluster"], s["preload one"], key="cluster.preload",
                   max_ratio=1.0),
    ]  # fmt: skip
    series = {name: median(xs) for name, xs in s.items()}
    return rows, {"entries": {"n": n}, "per_s": series}


def _update(m: SyncMap, data: dict[Any, Any]) -> Callable[[], float]:
    def block() -> float:
        it = iter(data.items())
        t0 = time.perf_counter()
        while chunk := dict(islice(it, 100_000)):
            m.update(chunk)
        return len(data) / (time.perf_counter() - t0)

    return block


def _copy(m: SyncMap, n: int) -> Callable[[], float]:
    def block() -> float:
        t0 = time.perf_counter()
        got = len(m.copy())
        rate = got / (time.perf_counter() - t0)
        if got != n:
            raise RuntimeError(f"copy() of {m.name!r} found {got:,} of {n:,} entries")
        return rate

    return block


def _preload(url: str, config: MapConfig, n: int) -> Callable[[], float]:
    """``preload()`` into a fresh map ``cl-bulk`` at ``url`` (opened and closed untimed)."""

    def block() -> float:
        with SyncMap("cl-bulk", url=url, config=config) as fresh:
            t0 = time.perf_counter()
            loaded = fresh.preload()
            rate = loaded / (time.perf_counter() - t0)
        if loaded != n:
            raise RuntimeError(f"preload() at {url} cached {loaded:,} of {n:,} entries")
        return rate

    return block
