"""Freshness for a CPU-bound reader: how soon a thread spinning on hits sees another process's
write (issue 16 goal 3; docs/design.md, "CPU-bound readers").

A writer process writes 1, 2, ... n to one key, a jittered ``gap`` apart, and notes each write's
acknowledgement on CLOCK_MONOTONIC (``time.monotonic_ns()``, shared by every process of a Linux
host).  This process's main thread reads the key in a loop that never releases the GIL, noting
when each new value first came back.  For write i:

* **delay**: from its acknowledgement to the end of the first read that returned i or later
  (0 when a read returned it before the writer heard its reply);
* **stale**: whether a read that *started* after the acknowledgement still returned an older
  value (the share of writes followed by at least one stale read).

Contenders, one after another in the same run: syncmap as configured (``feed_turn``), syncmap
with ``feed_turn=0`` (the mechanism off: the figure before it), and redis-py's client-side cache
(``CacheConfig``, RESP3 tracking, which reads its socket on every read) where the server allows.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import redis

from .. import MapConfig, SyncMap
from .context import Bench
from .method import Row, pct
from .peers import Unavailable, redis_client_cache
from .workers import Pool, serve

KEY = "spin"
START_DELAY = 0.05  # the writer waits this long first: the reader is spinning by then


@dataclass(frozen=True, slots=True)
class SpinPlan:
    writes: int  # per contender
    gap: float  # mean seconds between two writes (uniform in [gap/2, 3 gap/2])


@dataclass(slots=True)
class Result:
    delays_ms: list[float]  # one per write, sorted
    stale: float  # % of writes followed by a stale read
    reads: int

    @property
    def p50(self) -> float:
        return pct(self.delays_ms, 0.5)

    @property
    def p99(self) -> float:
        return pct(self.delays_ms, 0.99)


def writer(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str) -> None:
    """The writer process: ``(kind, name, n, gap, seed)`` -> the acknowledgement times (ns)."""
    maps: dict[str, SyncMap] = {}
    client = redis.Redis.from_url(url)

    def handle(cmd: tuple[str, str, int, float, int]) -> list[int]:
        kind, name, n, gap, seed = cmd
        write: Callable[[int], Any]
        if kind == "syncmap":
            if name not in maps:
                maps[name] = SyncMap(name, url=url, config=MapConfig(namespace=ns))
            write = _setter(maps[name])
        else:
            write = _raw_setter(client, name)
        rng = random.Random(seed)
        time.sleep(START_DELAY)  # a start delay, not a synchronisation: the reader spins
        acks = []
        for i in range(1, n + 1):
            write(i)
            acks.append(time.monotonic_ns())
            time.sleep(gap * rng.uniform(0.5, 1.5))
        return acks

    serve(wid, cmds, out, handle)


def _setter(m: SyncMap) -> Callable[[int], Any]:
    return lambda i: m.__setitem__(KEY, i)


def _raw_setter(client: redis.Redis, key: str) -> Callable[[int], Any]:
    return lambda i: client.set(key, i)


def spin(read: Callable[[], int], n: int, limit: float) -> tuple[list[tuple[int, int, int]], int]:
    """Read until ``n`` comes back (or ``limit`` seconds): for each new value, (value, start of
    the read before, end of this read), and how many reads were made.  Never releases the GIL
    except inside ``read``."""
    now = time.monotonic_ns
    seen: list[tuple[int, int, int]] = []
    deadline = now() + int(limit * 1e9)
    last, reads = read(), 1
    before = start = now()
    while last < n:
        v = read()
        end = now()
        reads += 1
        if v != last:
            seen.append((v, before, end))
            last = v
        before, start = start, end
        if end > deadline:
            break
    return seen, reads


def score(seen: list[tuple[int, int, int]], acks: list[int], reads: int) -> Result:
    """Each write's delay and whether a stale read followed it (module docstring)."""
    delays, stale = [], 0
    j = 0
    for i, ack in enumerate(acks, start=1):
        while j < len(seen) and seen[j][0] < i:
            j += 1
        if j == len(seen):  # never seen within the limit
            delays.append(float("inf"))
            stale += 1
            continue
        _, before, end = seen[j]
        delays.append(max(0, end - ack) / 1e6)
        stale += before > ack
    return Result(sorted(delays), 100.0 * stale / max(1, len(acks)), reads)


SWITCH = 0.0002  # the idea of lowering the switch interval instead (process-wide: not a default)
_SYNCMAP: list[tuple[str, str, float | None, float | None]] = [  # label, map, feed_turn, switch
    ("syncmap", "spin-on", None, None),
    ("syncmap feed_turn=0", "spin-off", 0.0, None),
    ("syncmap feed_turn=0, switch interval 0.2 ms", "spin-switch", 0.0, SWITCH),
]


def measure(b: Bench, plan: SpinPlan) -> tuple[dict[str, Result], dict[str, str]]:
    """Every contender's result, and why some did not run."""
    results: dict[str, Result] = {}
    absent: dict[str, str] = {}
    pool = Pool.start(writer, 1, (b.url, b.ns))
    limit = plan.writes * plan.gap * 1.5 + 10
    try:
        for label, name, turn, switch in _SYNCMAP:
            m = b.open(name) if turn is None else b.open(name, feed_turn=turn)
            m[KEY] = 0
            m[KEY]  # cached: from now on every read is a hit until a change arrives
            old = sys.getswitchinterval()
            sys.setswitchinterval(switch or old)
            try:
                results[label] = _run(pool, ("syncmap", name, plan.writes, plan.gap, 1),
                                      _map_reader(m), plan, limit)  # fmt: skip
            finally:
                sys.setswitchinterval(old)
        raw = b.raw("spin")
        try:
            csc = redis_client_cache(b.url, b.server_version)
        except Unavailable as exc:
            absent["redis-py"] = str(exc)
        else:
            try:
                csc.set(raw, 0)
                csc.get(raw)
                results["redis-py"] = _run(pool, ("redis", raw, plan.writes, plan.gap, 1),
                                           _client_reader(csc, raw), plan, limit)  # fmt: skip
            finally:
                csc.close()
    finally:
        pool.stop()
    return results, absent


def _map_reader(m: SyncMap) -> Callable[[], int]:
    return lambda: int(m[KEY])


def _client_reader(client: redis.Redis, key: str) -> Callable[[], int]:
    return lambda: int(client.get(key))  # type: ignore[arg-type]


def _run(pool: Pool, cmd: tuple[Any, ...], read: Callable[[], int], plan: SpinPlan,
         limit: float) -> Result:  # fmt: skip
    pool.cmds[0].put(cmd)
    seen, reads = spin(read, plan.writes, limit)
    acks = pool.gather([0], limit + 30)[0]
    return score(seen, acks, reads)


_ROWS: list[tuple[str, str, str, Callable[[Result], float], float | None]] = [
    ("spin_p50", "CPU-bound reader: a write seen after its ack, p50", "ms", lambda r: r.p50, 0.5),
    ("spin_p99", "CPU-bound reader: a write seen after its ack, p99", "ms", lambda r: r.p99, 2.0),
    ("spin_stale", "CPU-bound reader: writes followed by a stale read", "%", lambda r: r.stale,
     None),
]  # fmt: skip


def rows(results: dict[str, Result], absent: dict[str, str]) -> list[Row]:
    """The table rows: p50, p99 and the stale share, syncmap against redis-py's cache, and
    syncmap with the mechanism off (the figure before it)."""
    mine, off = results.get("syncmap"), results.get("syncmap feed_turn=0")
    switch = results.get(_SYNCMAP[2][0])
    peer, why = results.get("redis-py"), absent.get("redis-py", "")
    out: list[Row] = []
    if mine is None:
        return out
    for key, label, unit, get, bound in _ROWS:
        out.append(Row(label + " (vs redis-py `CacheConfig`)", unit, get(mine),
                       get(peer) if peer else None, key=f"reads.{key}", at_most=bound,
                       absent="" if peer else why))  # fmt: skip
        if off is not None:
            out.append(Row("  the same with `feed_turn=0` (before)", unit, get(off),
                           key=f"reads.{key}_off"))  # fmt: skip
        if switch is not None:
            out.append(Row("  `feed_turn=0`, `sys.setswitchinterval(0.0002)` instead", unit,
                           get(switch), key=f"reads.{key}_switch"))  # fmt: skip
    return out
