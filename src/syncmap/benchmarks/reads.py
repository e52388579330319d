"""Reads: near-cache hits and misses against every peer, all contenders in one interleaved run.

Hits read 1000 cached keys (str key, int value) in passes; the dict contenders run *the same*
loop function on a different container, so loop overhead is identical.  Round-trip contenders
(misses, GET, HGET, pottery, redis-py's cache) read the same 1000 keys once per op.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..config import MapConfig
from .context import Bench
from .method import (
    Contender,
    Row,
    Section,
    interleave,
    loop_call,
    loop_empty,
    loop_get,
    loop_getitem,
    median,
    versus,
)
from .peers import (
    Cashews,
    LockedDict,
    Unavailable,
    cashews_invalidates,
    pottery_dict,
    redis_client_cache,
)
from .spinning import SpinPlan
from .spinning import measure as measure_spinning
from .spinning import rows as spinning_rows

KEYS = 1000
_HAS_FAST_HITS = "fast_hits" in MapConfig.__dataclass_fields__
_HAS_FEED_TURN = "feed_turn" in MapConfig.__dataclass_fields__
_HAS_CACHE_ABSENT = "cache_absent" in MapConfig.__dataclass_fields__


@dataclass(frozen=True, slots=True)
class ReadPlan:
    rounds: int
    hit_reps: int  # passes over the KEYS keys per timed hit block
    io_ops: int  # reads per timed round-trip block
    spin: SpinPlan  # the CPU-bound reader (spinning.py)


@dataclass(slots=True)
class Field:
    """The contenders of this run and why some peers are missing."""

    keys: list[str]
    contenders: list[Contender] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cleanup: list[Callable[[], Any]] = field(default_factory=list)
    miss: Any = None  # the capacity=0 map: any hit on it would make the miss figures wrong

    def add(self, name: str, block: Callable[[], float]) -> None:
        self.contenders.append((name, block))


def run(b: Bench, plan: ReadPlan) -> Section:
    keys = [f"key-{i:06d}" for i in range(KEYS)]
    values: dict[Any, Any] = {k: 1000 + i for i, k in enumerate(keys)}
    f = Field(keys)
    try:
        _local(b, f, values, plan)
        _peers_in_process(b, f, values, plan)
        _round_trips(b, f, values, plan)
        s = interleave(f.contenders, plan.rounds)
    finally:
        for close in f.cleanup:
            with contextlib.suppress(Exception):
                close()
    rows = _rows(s, f)
    spun, spin_absent = measure_spinning(b, plan.spin)
    rows += spinning_rows(spun, spin_absent)
    f.notes.append(
        f"CPU-bound reader rows: a writer process wrote one key {plan.spin.writes} times, "
        f"~{plan.spin.gap * 1e3:g} ms apart; this process's main thread read it in a loop that "
        "never releases the GIL. Delay: from the write's acknowledgement (writer's "
        "CLOCK_MONOTONIC) to the end of the first read returning it; stale: a read that started "
        "after the acknowledgement returned an older value. Reads made: "
        + ", ".join(f"{k} {r.reads:,}" for k, r in spun.items())
    )
    if f.miss is not None and (hits := f.miss.statistics().hits):
        f.notes.append(f"{hits} reads of the capacity=0 map were hits: the miss figures are off")
    series = {"median_ns": {name: median(xs) for name, xs in s.items()}, "absent": f.absent}
    return Section("reads", "Reads", rows, series, f.notes)


def warm(m: Any, keys: list[str]) -> None:
    for _ in range(5):  # a fill in flight when a probe starts is not installed: read again
        for k in keys:
            if m.peek(k) is None:
                m[k]


def _local(b: Bench, f: Field, values: dict[Any, Any], plan: ReadPlan) -> None:
    """syncmap hits and the in-process baselines: dict, dict behind a lock, the bare loop."""
    keys, reps = f.keys, plan.hit_reps
    m = b.open("hits")
    m.update(values)
    warm(m, keys)
    d, locked = dict(values), LockedDict(dict(values))
    f.add("syncmap hit", lambda: loop_getitem(m, keys, reps))
    f.add("dict", lambda: loop_getitem(d, keys, reps))
    f.add("syncmap get", lambda: loop_get(m, keys, reps))
    f.add("dict get", lambda: loop_get(d, keys, reps))
    f.add("bare loop", lambda: loop_empty(d, keys, reps))
    f.add("dict + Lock", lambda: loop_getitem(locked, keys, reps))
    if _HAS_FEED_TURN:  # the cost of the periodic turn (docs/design.md, "CPU-bound readers")
        off = b.open("hits-noturn", feed_turn=0)
        off.update(values)
        warm(off, keys)
        f.add("syncmap hit (feed_turn=0)", lambda: loop_getitem(off, keys, reps))
    if _HAS_CACHE_ABSENT:  # absent markers (docs/design.md, "Absent keys")
        gone = b.open("absent")
        missing = [f"gone-{i:06d}" for i in range(KEYS)]
        for _ in range(5):  # a marker whose read raced a probe is not installed: read again
            for k in missing:
                gone.get(k)
        if gone.statistics().absent != KEYS:
            f.notes.append(f"only {gone.statistics().absent} of {KEYS} absent keys cached")
        f.add("syncmap get absent", lambda: loop_get(gone, missing, reps))
    if _HAS_FAST_HITS:
        fast = b.open("hits-fast", fast_hits=True)
        fast.update(values)
        warm(fast, keys)
        f.add("syncmap hit (fast_hits)", lambda: loop_getitem(fast, keys, reps))


def _peers_in_process(b: Bench, f: Field, values: dict[Any, Any], plan: ReadPlan) -> None:
    """Peers whose hits stay in the process: redis-py's client-side cache, cashews."""
    keys = f.keys
    raw_keys = [b.raw(f"get:{k}") for k in keys]
    b.client.mset({rk: v for rk, v in zip(raw_keys, values.values(), strict=True)})
    try:
        csc = redis_client_cache(b.url, b.server_version)
    except Unavailable as exc:
        f.absent["redis-py cache hit"] = str(exc)
    else:
        f.cleanup.append(csc.close)
        for rk in raw_keys:
            csc.get(rk)  # cache them
        f.add("redis-py cache hit", lambda: loop_call(csc.get, raw_keys, plan.io_ops))
    _cashews(b, f, values, plan)


def _cashews(b: Bench, f: Field, values: dict[Any, Any], plan: ReadPlan) -> None:
    prefix = f"cashews:{b.ns}:"
    try:
        works = {p: cashews_invalidates(b.url, prefix + f"check{p}:", p) for p in (None, 2)}
        loop = asyncio.new_event_loop()
        f.cleanup.append(loop.close)
        cache = Cashews(b.url, prefix, 2 if works[2] or not works[None] else None, loop)
    except Unavailable as exc:
        f.absent["cashews hit"] = str(exc)
        return
    f.cleanup.insert(0, cache.close)
    cache.run(cache.cache.set_many(values))
    for k in f.keys:
        cache.run(cache.cache.get(k))  # cache them locally
    f.add("cashews hit", lambda: cache.get_loop(f.keys, plan.hit_reps // 10 or 1))
    f.notes.append(
        "cashews `Cache().setup(url, client_side=True)`: with redis-py's default protocol "
        f"(RESP3 in redis-py 8) another client's write {_seen(works[None])}; with "
        f"`protocol=2` it {_seen(works[2])}. The figure is from the "
        f"{'RESP2' if works[2] or not works[None] else 'default'} setup."
    )


def _seen(works: bool) -> str:
    return ("reached a reader's cache (invalidation arrived)" if works else
            "never reached a reader's cache: it kept serving the old value for 1 s, "
            "**no invalidation arrived**")  # fmt: skip


def _round_trips(b: Bench, f: Field, values: dict[Any, Any], plan: ReadPlan) -> None:
    """syncmap misses (capacity=0), raw GET and HGET, pottery's RedisDict."""
    keys, ops = f.keys, plan.io_ops
    miss = b.open("misses", capacity=0)  # nothing is kept: every read goes to Redis
    miss.update(values)
    f.miss = miss
    # Same field and value sizes as syncmap stores: a 16-byte (version, deadline) head + msgpack.
    head = bytes(16)
    raw_hash = b.raw("hget")
    b.client.hset(raw_hash, mapping={f"s{k}": head + msgspec.msgpack.encode(v)
                                     for k, v in values.items()})  # fmt: skip
    fields = [f"s{k}".encode() for k in keys]
    raw_keys = [b.raw(f"get:{k}") for k in keys]
    hget, get = b.client.hget, b.client.get
    f.add("syncmap miss", lambda: loop_call(miss.__getitem__, keys, ops))
    f.add("redis-py HGET", lambda: loop_call(lambda x: hget(raw_hash, x), fields, ops))
    f.add("redis-py GET", lambda: loop_call(get, raw_keys, ops))
    try:
        pd = pottery_dict(b.client, b.raw("pottery"), values)
    except Unavailable as exc:
        f.absent["pottery RedisDict"] = str(exc)
    else:
        f.add("pottery RedisDict", lambda: loop_call(pd.__getitem__, keys, ops))


# (key, metric, syncmap contender, peer contender, DESIGN §4 target: the largest ratio)
_ROWS: list[tuple[str, str, str, str, float | None]] = [
    ("hit_dict", "near-cache hit `m[k]` vs dict `d[k]`", "syncmap hit", "dict",
     4),
    ("get_dict", "near-cache hit `m.get(k)` vs `d.get(k)`", "syncmap get", "dict get",
     4),
    ("hit_fast", "near-cache hit, `MapConfig(fast_hits=True)`, vs `d[k]`",
     "syncmap hit (fast_hits)", "dict", 4),
    ("hit_turn", "near-cache hit vs the same with `feed_turn=0` (the turn's cost)",
     "syncmap hit", "syncmap hit (feed_turn=0)", 1.05),
    ("get_absent", "`m.get(k)` of an absent key (cached marker) vs a hit `m.get(k)`",
     "syncmap get absent", "syncmap get", None),
    ("hit_locked", "near-cache hit vs a dict behind a `threading.Lock`", "syncmap hit",
     "dict + Lock", None),
    ("hit_csc", "near-cache hit vs redis-py client-side cache hit (`CacheConfig`, RESP3)",
     "syncmap hit", "redis-py cache hit", 0.01),
    ("hit_cashews", "near-cache hit vs cashews client-side cache hit (asyncio)", "syncmap hit",
     "cashews hit", None),
    ("hit_pottery", "near-cache hit vs pottery `RedisDict[k]`", "syncmap hit",
     "pottery RedisDict", 0.01),
    ("hit_get", "near-cache hit vs redis-py `GET`", "syncmap hit", "redis-py GET", None),
    ("miss_hget", "miss `m[k]` (capacity=0) vs redis-py `HGET`", "syncmap miss",
     "redis-py HGET", 1.15),
    ("miss_get", "miss vs redis-py `GET`", "syncmap miss", "redis-py GET", None),
    ("miss_pottery", "miss vs pottery `RedisDict[k]`", "syncmap miss", "pottery RedisDict",
     None),
]  # fmt: skip


def _rows(s: dict[str, list[float]], f: Field) -> list[Row]:
    rows = []
    for key, metric, mine, peer, target in _ROWS:
        if mine not in s:
            continue
        if peer in s or peer in f.absent:
            rows.append(versus(metric, "ns", s, mine, peer, f.absent.get(peer, ""),
                               key=f"reads.{key}", max_ratio=target))  # fmt: skip
        if key == "get_dict":
            net = [x - y for x, y in zip(s["syncmap hit"], s["bare loop"], strict=True)]
            base = [x - y for x, y in zip(s["dict"], s["bare loop"], strict=True)]
            rows.append(Row.paired(f"  `m[k]` vs `d[k]` net of the bare loop "
                                   f"(~{median(s['bare loop']):.1f} ns)", "ns", net, base,
                                   key="reads.hit_net"))  # fmt: skip
    return rows
