"""Scaling: hit latency vs map size, write throughput vs value size, loading a near cache, and
memory per cached entry.

* **Hit latency vs size**: a map of N entries is written with ``update()``, its near cache filled
  with ``preload()`` (timed: the load rate), then random keys of it are read in interleaved
  rounds against a dict of the same N items.
* **Load**: the largest map's ``preload()``, in entries per second, against the fastest way
  redis-py gets the same N entries into a local dict (``HSCAN``).
* **Write throughput vs value size**: ``m[k] = v`` of random bytes against ``HSET`` of the same
  bytes, in value bytes per second.
* **Memory**: bytes ``tracemalloc`` still counts after filling a near cache with N entries by
  reading them (fresh key strings, short str values), divided by N; against the same N pairs put
  into a dict.
"""

from __future__ import annotations

import gc
import os
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from .. import SyncMap
from . import cachesize
from .context import Bench, settle
from .method import Row, Section, interleave, loop_call, loop_getitem, loop_store, median

LOAD_TARGET = 300_000  # entries/s, DESIGN §4
HEAD = bytes(16)  # syncmap's (version, deadline) head: raw values get the same size


@dataclass(frozen=True, slots=True)
class ScalePlan:
    sizes: tuple[int, ...]  # map sizes for hit latency; the largest one is the load figure
    rounds: int
    reads: int  # reads per timed hit block
    value_sizes: tuple[int, ...]
    value_bytes: int  # bytes written per timed block (3 writes at least)
    mem_n: int
    cache_n: int = 0  # the cache-size rows (:mod:`.cachesize`) at this many entries; 0: none
    idle_seconds: float = 2.5  # their idle reader: longer than the presence interval (2 s)


def run(b: Bench, plan: ScalePlan) -> Section:
    rows, sizes = _hits_vs_size(b, plan)
    rows.append(_load_baseline(b, max(plan.sizes), sizes[str(max(plan.sizes))]["fill_per_s"]))
    value_rows, values = _values(b, plan)
    rows += value_rows
    rows.append(_memory(b, plan.mem_n))
    if plan.cache_n:
        rows += cachesize.rows(b, plan.cache_n, plan.idle_seconds)
    return Section("scaling", "Scaling", rows, {"sizes": sizes, "value_sizes": values})


def _chunks(data: dict[Any, Any], size: int = 100_000) -> Iterator[dict[Any, Any]]:
    it = iter(data.items())
    while chunk := dict(islice(it, size)):
        yield chunk


def _fill(m: SyncMap, keys: list[str]) -> float:
    """Load the near cache with ``preload()`` (whole buckets, a few per round trip); entries
    per second."""
    t0 = time.perf_counter()
    loaded = m.preload()
    rate = loaded / (time.perf_counter() - t0)
    for _ in range(3):  # a fill in flight when a probe started was not installed: read again
        for k in keys:
            if m.peek(k) is None:
                m[k]
    return rate


def _hits_vs_size(b: Bench, plan: ScalePlan) -> tuple[list[Row], dict[str, dict[str, float]]]:
    rows, series = [], {}
    for n in plan.sizes:
        row, series[str(n)] = _hit_point(b, n, plan)
        rows.append(row)
    return rows, series


def _hit_point(b: Bench, n: int, plan: ScalePlan) -> tuple[Row, dict[str, float]]:
    data = {f"key-{i:07d}": i for i in range(n)}
    keys = list(data)
    m = b.open(f"size-{n}", capacity=n)
    for chunk in _chunks(data):
        m.update(chunk)
    settle(m)
    fill = _fill(m, keys)
    sample = random.sample(keys, min(n, 10_000))
    reps = max(1, plan.reads // len(sample))
    d = dict(data)
    s = interleave([("syncmap", lambda: loop_getitem(m, sample, reps)),
                    ("dict", lambda: loop_getitem(d, sample, reps))], plan.rounds)  # fmt: skip
    note = _uncached(m, n)
    b.release(m)
    row = Row.paired(f"hit `m[k]` on a map of {n:,} entries vs a dict of {n:,}", "ns",
                     s["syncmap"], s["dict"], key=f"scaling.hit.{n}", note=note)  # fmt: skip
    return row, {"syncmap_ns": median(s["syncmap"]), "dict_ns": median(s["dict"]),
                 "fill_per_s": fill}  # fmt: skip


def _load_baseline(b: Bench, n: int, fill: float) -> Row:
    raw_hash = b.raw("load")
    for chunk in _chunks({f"key-{i:07d}": i for i in range(n)}):
        b.client.hset(raw_hash, mapping=chunk)
    t0 = time.perf_counter()
    d = dict(b.client.hscan_iter(raw_hash, count=1000))
    rate = len(d) / (time.perf_counter() - t0)
    b.client.delete(raw_hash)
    return Row(f"load {n:,} entries into the near cache (`preload()`) vs redis-py `HSCAN` "
               "into a dict", "/s", fill, rate, key="scaling.load", at_least=LOAD_TARGET,
               note="`preload()` reads whole buckets (HGETALL, 8 per round trip) and installs "
               "each bucket only if nothing reached it meanwhile")  # fmt: skip


def _values(b: Bench, plan: ScalePlan) -> tuple[list[Row], dict[str, dict[str, float]]]:
    rows, series = [], {}
    for size in plan.value_sizes:
        row, series[str(size)] = _value_point(b, size, plan)
        rows.append(row)
    return rows, series


def _value_point(b: Bench, size: int, plan: ScalePlan) -> tuple[Row, dict[str, float]]:
    keys = [f"value-{i:02d}" for i in range(20)]
    fields = [f"s{k}".encode() for k in keys]
    raw_hash = b.raw(f"values-{size}")
    hset = b.client.hset
    m = b.open(f"values-{size}", capacity=len(keys))
    value = os.urandom(size)
    raw = HEAD + value
    ops = max(3, min(200, plan.value_bytes // size))
    s = interleave(
        [("syncmap", _rate(size, lambda: loop_store(m.__setitem__, keys, value, ops))),
         ("hset", _rate(size, lambda: loop_call(lambda f: hset(raw_hash, f, raw), fields, ops)))],
        plan.rounds, after=lambda name: settle(m) if name == "syncmap" else None,
    )  # fmt: skip
    b.release(m)
    b.client.delete(raw_hash)
    row = Row.paired(f"write throughput, {_size(size)} values: `m[k] = v` vs `HSET`", "B/s",
                     s["syncmap"], s["hset"], key=f"scaling.value.{size}")  # fmt: skip
    return row, {"syncmap_Bps": median(s["syncmap"]), "hset_Bps": median(s["hset"])}


def _rate(size: int, block: Callable[[], float]) -> Callable[[], float]:
    """Bytes per second of a block that returns ns per write of ``size`` bytes."""
    return lambda: size * 1e9 / block()


def _size(n: int) -> str:
    for scale, unit in ((1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def _traced(fill: Callable[[], object]) -> tuple[int, object]:
    """Bytes still allocated after ``fill()`` (whose result is kept alive), per tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def _memory(b: Bench, n: int) -> Row:
    m = b.open("memory", capacity=n)
    for chunk in _chunks({f"key-{i:07d}": f"v{i:07d}" for i in range(n)}):
        m.update(chunk)
    settle(m)

    def fill_cache() -> object:
        for i in range(n):
            m[f"key-{i:07d}"]  # a fresh key object, as a caller would pass; the value is decoded
        return None

    def fill_dict() -> object:
        return {f"key-{i:07d}": f"v{i:07d}" for i in range(n)}

    dict_bytes, _ = _traced(fill_dict)
    cache_bytes, _ = _traced(fill_cache)
    entries = m.statistics().entries
    note = _uncached(m, n)
    b.release(m)
    return Row(f"memory per cached entry ({n:,} str → short str) vs a dict", "B",
               cache_bytes / max(entries, 1), dict_bytes / n, key="scaling.memory", max_ratio=2,
               note=note)  # fmt: skip


def _uncached(m: SyncMap, n: int) -> str:
    """A note when not every entry ended up in the near cache, with the map's own counters."""
    s = m.statistics()
    if s.entries == n:
        return ""
    return (f"only {s.entries:,} of {n:,} entries ended up cached ({s.fills_rejected:,} fills "
            f"rejected, {s.evictions:,} evictions, {s.resyncs:,} resyncs)")  # fmt: skip
