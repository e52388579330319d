"""asyncio: ``syncmap.aio.SyncMap`` against the sync map, a dict, ``redis.asyncio`` and cashews.

Everything async runs on one event loop this section owns.  An async contender's block is one
``loop.run_until_complete`` of a coroutine that times itself inside the loop (as cashews' hits in
:mod:`.reads`), so starting the loop is not timed; the sync contenders run :mod:`.method`'s loops
with the loop idle.  Each group is interleaved in rounds as every other section's:

* **hits** (1000 cached keys, str key, int value): ``await m.get(k)`` and ``m.get_cached(k)`` on
  a warm ``syncmap.aio.SyncMap``; ``m[k]`` on a sync map of the same data; ``d[k]``; cashews'
  client-side cache hit ``await cache.get(k)``;
* **round trips**: a miss (``capacity=0``) vs ``redis.asyncio`` ``HGET`` of a field of the same
  size, ``await m.set(k, v)`` vs ``HSET``;
* **concurrency**: N coroutines started together, each making R reads; reads per second from
  the first start to the last end, against the same N x R reads as ``redis.asyncio`` ``GET``;
* **lock hand-off** between two coroutines: :mod:`.aiohandoff`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from .. import SyncMap, aio
from ..config import MapConfig
from . import aiohandoff
from .aiohandoff import AsyncHandoffPlan
from .context import Bench
from .method import Contender, Row, Section, interleave, loop_getitem, median, versus
from .peers import Cashews, Unavailable, cashews_invalidates
from .reads import warm

KEYS = 1000
MISS_EVERY = 10  # in the concurrent mix, every 10th key is read from the capacity=0 map
VALUE = 12345
POOL = 100  # the concurrent GET peer's connections: redis.asyncio's default pool size


@dataclass(frozen=True, slots=True)
class AsyncPlan:
    rounds: int  # interleaved rounds of the hit and round-trip contenders
    hit_reps: int  # passes over the KEYS keys per timed hit block
    io_ops: int  # round trips per timed block
    tasks: int  # coroutines started together in a concurrent block
    task_reads: int  # reads each of them makes
    concurrent_rounds: int
    handoff: AsyncHandoffPlan


@dataclass(slots=True)
class Field:
    """The run's loop, data, async maps and clients, and what to close at the end."""

    b: Bench
    loop: asyncio.AbstractEventLoop
    keys: list[str]
    values: dict[Any, Any]
    client: aioredis.Redis | None = None
    absent: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cleanup: list[Callable[[], Any]] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def timed(self, block: Callable[[], Coroutine[Any, Any, float]]) -> Callable[[], float]:
        """A contender whose block is a coroutine timing itself on the loop."""
        return lambda: float(self.loop.run_until_complete(block()))

    def open(self, name: str, **config: Any) -> aio.SyncMap:
        m = aio.SyncMap(name, url=self.b.url, config=MapConfig(namespace=self.b.ns, **config))
        self.run(m.open())
        self.cleanup.append(lambda: self.run(m.aclose()))
        return m

    def breathe(self, name: str = "") -> None:
        """Untimed, after a block: let the loop run what became ready (probes, messages)."""
        self.run(asyncio.sleep(0))

    def close(self) -> None:
        for close in reversed(self.cleanup):
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(Exception):
            self.run(aio.aclose_loop_resources())
        self.run(self.loop.shutdown_asyncgens())
        self.loop.close()


def run(b: Bench, plan: AsyncPlan) -> Section:
    keys = [f"key-{i:06d}" for i in range(KEYS)]
    f = Field(b, asyncio.new_event_loop(), keys, {k: 1000 + i for i, k in enumerate(keys)})
    try:
        s, took = _measure(f, plan)
        t0 = time.monotonic()
        handoff_rows, handoff_series, handoff_notes = aiohandoff.run(b.url, b.ns, f.loop,
                                                                     plan.handoff)  # fmt: skip
        took["hand-off"] = time.monotonic() - t0
    finally:
        f.close()
    series = {"median": {name: median(xs) for name, xs in s.items()}, "absent": f.absent,
              "seconds": took, **handoff_series}  # fmt: skip
    return Section("asyncio", "asyncio (`syncmap.aio`)", _rows(s, f, plan) + handoff_rows,
                   series, f.notes + handoff_notes)  # fmt: skip


def _measure(f: Field, plan: AsyncPlan) -> tuple[dict[str, list[float]], dict[str, float]]:
    """The hit, round-trip and concurrency groups: their samples and how long each took."""
    client: aioredis.Redis = aioredis.Redis.from_url(f.b.url)
    f.client = client
    f.cleanup.append(lambda: f.run(client.aclose()))
    hit, miss = f.open("aio-hits"), f.open("aio-misses", capacity=0)
    f.run(hit.update(f.values))
    f.run(_settle(hit))  # its own writes' messages come back: handled before the warm-up
    sync = f.b.open("aio-hits")  # the same map through the thread driver, opened after them
    warm(sync, f.keys)
    f.run(_warm(hit, f.keys))
    hits_before = hit.statistics().hits
    groups: list[tuple[str, Callable[[], dict[str, list[float]]]]] = [
        ("hits", lambda: _hits(f, hit, sync, plan)),
        ("round trips", lambda: _round_trips(f, miss, plan)),
        ("concurrency", lambda: _concurrent(f, hit, miss, plan)),
    ]
    samples: dict[str, list[float]] = {}
    took: dict[str, float] = {}
    for name, group in groups:
        t0 = time.monotonic()
        samples |= group()
        took[name] = time.monotonic() - t0
    _check(f, miss, hit.statistics().hits - hits_before, _expected_hits(plan))
    return samples, took


# ---- timed loops: the shapes of method.py's, awaited --------------------------------------


async def _aloop_get(get: Callable[[Any], Awaitable[Any]], keys: Sequence[Any],
                     reps: int) -> float:  # fmt: skip
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = await get(k)
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def _loop_get_cached(m: aio.SyncMap, keys: Sequence[Any], reps: int) -> float:
    """``method.loop_get`` with ``get_cached``: no await, so no loop is needed to run it."""
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = m.get_cached(k)
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


async def _aloop_call(fn: Callable[[Any], Awaitable[Any]], args: Sequence[Any],
                      ops: int) -> float:  # fmt: skip
    n = len(args)
    t0 = time.perf_counter_ns()
    for i in range(ops):
        await fn(args[i % n])
    return (time.perf_counter_ns() - t0) / ops


async def _crowd(read: Callable[[int], Awaitable[Any]], tasks: int, each: int) -> float:
    """``tasks`` coroutines started together, each making ``each`` reads ``read(key index)``;
    reads per second from the first start to the last end."""

    async def one(t: int) -> None:
        for i in range(t * each, (t + 1) * each):
            await read(i % KEYS)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in range(tasks)))
    return tasks * each / (time.perf_counter() - t0)


async def _settle(m: aio.SyncMap, quiet: float = 0.02, limit: float = 10.0) -> None:
    """``context.settle`` on the loop: until the map has handled its own writes' messages."""
    deadline = time.monotonic() + limit
    last = m.statistics().messages
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        if (now := m.statistics().messages) == last:
            return
        last = now


# ---- the groups -----------------------------------------------------------------------------


async def _warm(m: aio.SyncMap, keys: list[str]) -> None:
    for _ in range(5):  # a fill in flight when a probe starts is not installed: read again
        for k in keys:
            if m.get_cached(k) is aio.MISSING:
                await m.get(k)


def _hits(f: Field, hit: aio.SyncMap, sync: SyncMap, plan: AsyncPlan) -> dict[str, list[float]]:
    keys, reps = f.keys, plan.hit_reps
    d = dict(f.values)
    contenders: list[Contender] = [
        ("sync hit", lambda: loop_getitem(sync, keys, reps)),
        ("dict", lambda: loop_getitem(d, keys, reps)),
        ("async get", f.timed(lambda: _aloop_get(hit.get, keys, reps))),
        ("get_cached", lambda: _loop_get_cached(hit, keys, reps)),
    ]
    contenders += _cashews(f, plan)
    return interleave(contenders, plan.rounds, after=f.breathe)


def _cashews(f: Field, plan: AsyncPlan) -> list[Contender]:
    """cashews' client-side cache on this section's loop, set up as in :mod:`.reads`."""
    prefix = f"cashews:{f.b.ns}:aio:"
    try:
        works = cashews_invalidates(f.b.url, prefix + "check:", 2)
        cache = Cashews(f.b.url, prefix, 2 if works else None, f.loop)
    except Unavailable as exc:
        f.absent["cashews hit"] = str(exc)
        return []
    f.cleanup.append(cache.close)
    f.run(cache.cache.set_many(f.values))
    for k in f.keys:
        f.run(cache.cache.get(k))  # cache them locally
    f.notes.append(
        "cashews `Cache().setup(url, client_side=True"
        + (", protocol=2)`: checked in this run, another client's write reached a reader's "
           "cache" if works else ")`: with `protocol=2` another client's write never reached a "
           "reader's cache in this run's check, so the default setup was timed")
        + " (the Reads section checks both protocols)."
    )  # fmt: skip
    reps = max(1, plan.hit_reps // 10)  # ~20x slower per hit than syncmap: fewer passes
    return [("cashews hit", lambda: cache.get_loop(f.keys, reps))]


def _round_trips(f: Field, miss: aio.SyncMap, plan: AsyncPlan) -> dict[str, list[float]]:
    """A miss vs ``HGET``, a write vs ``HSET``: one round trip each."""
    b, keys, ops, client = f.b, f.keys, plan.io_ops, f.client
    assert client is not None
    f.run(miss.update(f.values))
    writes = f.open("aio-writes")
    # Same field and value sizes as syncmap stores: a 16-byte (version, deadline) head + msgpack.
    raw_get, raw_set, head = b.raw("aio-hget"), b.raw("aio-hset"), bytes(16)
    b.client.hset(raw_get, mapping={f"s{k}": head + msgspec.msgpack.encode(v)
                                    for k, v in f.values.items()})  # fmt: skip
    fields = [f"s{k}".encode() for k in keys]
    contenders: list[Contender] = [
        ("async miss", f.timed(lambda: _aloop_call(miss.get, keys, ops))),
        ("HGET", f.timed(lambda: _aloop_call(lambda x: client.hget(raw_get, x), fields, ops))),
        ("async write", f.timed(lambda: _aloop_call(lambda k: writes.set(k, VALUE), keys, ops))),
        ("HSET", f.timed(lambda: _aloop_call(lambda x: client.hset(raw_set, x, VALUE), fields,
                                             ops))),
    ]  # fmt: skip

    def after(name: str) -> None:  # the writer's own change messages are handled untimed
        f.run(_settle(writes)) if name == "async write" else f.breathe()

    return interleave(contenders, plan.rounds, after=after)


def _concurrent(f: Field, hit: aio.SyncMap, miss: aio.SyncMap,
                plan: AsyncPlan) -> dict[str, list[float]]:  # fmt: skip
    b, keys = f.b, f.keys
    # redis.asyncio's default pool raises MaxConnectionsError past 100 connections in use; the
    # pool its docs give for many concurrent callers makes them wait for one instead.
    pool = aioredis.BlockingConnectionPool.from_url(b.url, max_connections=POOL)
    client = aioredis.Redis(connection_pool=pool)
    f.cleanup.append(lambda: f.run(client.aclose(close_connection_pool=True)))
    raw_keys = [b.raw(f"aio-get:{k}") for k in keys]
    b.client.mset(dict(zip(raw_keys, f.values.values(), strict=True)))

    def mixed(j: int) -> Awaitable[Any]:
        return (miss if j % MISS_EVERY == MISS_EVERY - 1 else hit).get(keys[j])

    def misses(j: int) -> Awaitable[Any]:
        return miss.get(keys[j])

    def get(j: int) -> Awaitable[Any]:
        return client.get(raw_keys[j])

    n, each = plan.tasks, plan.task_reads
    contenders: list[Contender] = [
        (name, f.timed(lambda read=read: _crowd(read, n, each)))  # type: ignore[misc]
        for name, read in (("crowd mixed", mixed), ("crowd misses", misses), ("crowd GET", get))
    ]
    before = _clients(b)
    s = interleave(contenders, plan.concurrent_rounds, after=f.breathe)
    f.notes.append(
        f"concurrency: {n:,} coroutines started together, {each} reads each; in the mix every "
        f"{MISS_EVERY}th key is read from a `capacity=0` map (a miss), the others are hits. The "
        f"peer is `redis.asyncio` on a `BlockingConnectionPool(max_connections={POOL})` (its "
        "default pool raises `MaxConnectionsError` past 100 connections in use); syncmap's "
        "executor does not bound its connections: the server's connected clients went from "
        f"{before:,} to {_clients(b):,} over these blocks."
    )
    return s


def _clients(b: Bench) -> int:
    return int(b.client.info("clients")["connected_clients"])


def _expected_hits(plan: AsyncPlan) -> int:
    """Reads of the warm map in the timed blocks (warm-up rounds included): all must be hits."""
    crowd = sum(1 for i in range(plan.tasks * plan.task_reads)
                if i % KEYS % MISS_EVERY != MISS_EVERY - 1)  # fmt: skip
    return 2 * (plan.rounds + 1) * plan.hit_reps * KEYS + (plan.concurrent_rounds + 1) * crowd


def _check(f: Field, miss: aio.SyncMap, hits: int, expected: int) -> None:
    """Hit figures from reads that were not served by the near cache (``get_cached`` returns
    MISSING then, at once), or miss figures from hits, would be wrong: say so."""
    if (wrong := miss.statistics().hits) != 0:
        f.notes.append(f"{wrong} reads of the capacity=0 map were hits: the miss figures are off")
    if hits != expected:
        f.notes.append(f"**{expected - hits} of {expected} reads of the warm map were not "
                       "near-cache hits: the hit figures are off**")  # fmt: skip


# ---- rows -----------------------------------------------------------------------------------


def _rows(s: dict[str, list[float]], f: Field, plan: AsyncPlan) -> list[Row]:
    crowd = f"{plan.tasks:,} concurrent coroutines"
    # (key, metric, unit, syncmap contender, peer contender, target: the largest ratio)
    table: list[tuple[str, str, str, str, str, float | None]] = [
        ("get_sync", "async hit `await m.get(k)` vs the sync hit `m[k]`", "ns", "async get",
         "sync hit", None),
        ("get_dict", "async hit `await m.get(k)` vs dict `d[k]`", "ns", "async get", "dict",
         None),
        ("cached_sync", "`m.get_cached(k)` (no `await`) vs the sync hit `m[k]`", "ns",
         "get_cached", "sync hit", None),
        ("get_cashews", "async hit `await m.get(k)` vs cashews client-side cache hit "
         "`await cache.get(k)`", "ns", "async get", "cashews hit", None),
        ("miss_hget", "async miss `await m.get(k)` (capacity=0) vs redis.asyncio `HGET`", "ns",
         "async miss", "HGET", 1.15),
        ("set_hset", "async write `await m.set(k, v)` vs redis.asyncio `HSET`", "ns",
         "async write", "HSET", 1.3),
        ("crowd_mixed", f"{crowd}, {100 - 100 // MISS_EVERY} % hits + {100 // MISS_EVERY} % "
         "misses, vs the same reads as redis.asyncio `GET`", "/s", "crowd mixed", "crowd GET",
         None),
        ("crowd_misses", f"  {crowd}, misses only (capacity=0), vs redis.asyncio `GET`", "/s",
         "crowd misses", "crowd GET", None),
    ]  # fmt: skip
    rows = []
    for key, metric, unit, mine, peer, target in table:
        if mine in s:
            rows.append(versus(metric, unit, s, mine, peer, f.absent.get(peer, ""),
                               key=f"asyncio.{key}", max_ratio=target,
                               note=_NOTES.get(key, "")))  # fmt: skip
    return rows


_NOTES = {
    "set_hset": "the writer's own change messages reach it on the same loop, so handling them "
    "is inside the timed block (the sync driver does it on its subscriber thread)",
    "cached_sync": "the same checks (entry, key type, lease clock); `m[k]` makes them inline, "
    "`get_cached` in one more Python call (`_servable`, which also checks the map is open)",
}
