"""Redis Cluster: a map spread over a 3-master cluster against redis-py's ``RedisCluster``, and
against the same map on one Redis.

The section starts a private :class:`~syncmap.testing.clusterset.ClusterSet` of 3 masters, no
replicas (the one-Redis peer has none either, and a replica's copying would take CPU from the
same 2 cores), with the redis-server the run's embedded Redis uses.  Groups, each interleaved in
rounds as every other section's:

* **round trips** (1000 keys, str key, int value): a near-cache hit ``m[k]`` and a miss
  (``capacity=0``) against ``RedisCluster.hget`` of a field of the same size; ``m[k] = v``
  against ``RedisCluster.hset``; the miss and the write also against the same map on one Redis
  (what routing by slot costs);
* **propagation**: write to visible in N receiver processes through the buckets' sharded
  channels, against raw ``RedisCluster.spublish`` to N ``ssubscribe``\\ rs (:mod:`.propagation`'s
  receivers and segments);
* **writers** and **whole-map operations**: :mod:`.clusterbulk`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.cluster import RedisCluster

from .. import MapConfig, SyncMap
from ..testing.clusternode import ClusterModeUnavailable
from ..testing.clusterset import ClusterSet
from . import clusterbulk, propagation
from .clusterbulk import BulkPlan
from .context import Bench, settle
from .method import Contender, Row, Section, interleave, loop_call, loop_getitem, loop_store
from .propagation import PropagationPlan, receivers
from .reads import warm
from .workers import Pool

KEYS = 1000
VALUE = 12345
RAW = "raw RedisCluster SPUBLISH"


@dataclass(frozen=True, slots=True)
class ClusterPlan:
    rounds: int  # interleaved rounds of the round-trip contenders
    hit_reps: int  # passes over the KEYS keys per timed hit block
    io_ops: int  # round trips per timed block
    propagation: PropagationPlan
    bulk: BulkPlan


@dataclass(slots=True)
class Field:
    """The run's cluster, its maps and clients, and what to close at the end."""

    b: Bench
    cluster: ClusterSet
    client: RedisCluster
    maps: list[SyncMap]

    def open(self, name: str, url: str | None = None, **config: Any) -> SyncMap:
        """A map of this run's namespace, on the cluster unless ``url`` says otherwise."""
        m = SyncMap(name, url=url or self.cluster.url,
                    config=MapConfig(namespace=self.b.ns, **config))  # fmt: skip
        self.maps.append(m)
        return m


def run(b: Bench, plan: ClusterPlan) -> Section:
    try:
        cluster = ClusterSet(masters=3, replicas=0)
    except ClusterModeUnavailable as exc:
        why = f"not measured: {exc}"
        return Section("cluster", "Redis Cluster (3 masters)",
                       [Row("a map on a Redis Cluster", "ns", None, absent=why,
                            key="cluster.absent")], notes=[why])  # fmt: skip
    f = Field(b, cluster, cluster.client(), [])
    took: dict[str, float] = {}
    try:
        rows = _timed(took, "round trips", lambda: _round_trips(f, plan))
        rows += _timed(took, "propagation", lambda: _propagation(f, plan.propagation))
        more, series = clusterbulk.run(b.url, cluster.url, b.ns, plan.bulk, took)
        rows += more
    finally:
        for m in f.maps:
            with contextlib.suppress(Exception):
                m.close()
        cluster.close()
    notes = [
        f"A private cluster of 3 masters, no replicas, {cluster.binary} (started in "
        f"{cluster.startup_seconds:.1f} s), on the same machine as the one-Redis peer "
        f"({b.server_version}) and this process. Its ratios compare syncmap on the cluster with "
        "redis-py's `RedisCluster` (hiredis parser), or with the same syncmap call on one "
        "Redis, in the same rounds.",
        *series.pop("notes"),
    ]
    series["seconds"] = took
    return Section("cluster", "Redis Cluster (3 masters)", rows, series, notes)


def _timed(took: dict[str, float], name: str, group: Callable[[], list[Row]]) -> list[Row]:
    t0 = time.monotonic()
    rows = group()
    took[name] = time.monotonic() - t0
    return rows


# ---- round trips ----------------------------------------------------------------------------


def _round_trips(f: Field, plan: ClusterPlan) -> list[Row]:
    keys = [f"key-{i:06d}" for i in range(KEYS)]
    values: dict[Any, Any] = {k: 1000 + i for i, k in enumerate(keys)}
    hit, miss, writes = f.open("cl-hits"), f.open("cl-misses", capacity=0), f.open("cl-writes")
    hit.update(values)
    miss.update(values)
    warm(hit, keys)
    one_miss = f.open("cl-one-misses", f.b.url, capacity=0)
    one_miss.update(values)
    one_writes = f.open("cl-one-writes", f.b.url)
    # Same field and value sizes as syncmap stores: a 16-byte (version, deadline) head + msgpack.
    raw_get, raw_set, head = f.b.raw("cl-hget"), f.b.raw("cl-hset"), bytes(16)
    f.client.hset(raw_get, mapping={f"s{k}": head + msgspec.msgpack.encode(v)
                                    for k, v in values.items()})  # fmt: skip
    fields = [f"s{k}".encode() for k in keys]
    hget, hset, ops = f.client.hget, f.client.hset, plan.io_ops
    contenders: list[Contender] = [
        ("hit", lambda: loop_getitem(hit, keys, plan.hit_reps)),
        ("miss", lambda: loop_call(miss.__getitem__, keys, ops)),
        ("one miss", lambda: loop_call(one_miss.__getitem__, keys, ops)),
        ("HGET", lambda: loop_call(lambda x: hget(raw_get, x), fields, ops)),
        ("write", lambda: loop_store(writes.__setitem__, keys, VALUE, ops)),
        ("one write", lambda: loop_store(one_writes.__setitem__, keys, VALUE, ops)),
        ("HSET", lambda: loop_call(lambda x: hset(raw_set, x, VALUE), fields, ops)),
    ]
    mine = {"write": writes, "one write": one_writes}

    def after(name: str) -> None:  # the writer's own change messages are handled untimed
        if name in mine:
            settle(mine[name])

    s = interleave(contenders, plan.rounds, after=after)
    return [
        Row.paired("near-cache hit `m[k]` on a cluster map vs `RedisCluster.hget`", "ns",
                   s["hit"], s["HGET"], key="cluster.hit_hget"),
        Row.paired("miss `m[k]` (capacity=0) vs `RedisCluster.hget`", "ns", s["miss"],
                   s["HGET"], key="cluster.miss_hget", max_ratio=1.15),
        Row.paired("write `m[k] = v` vs `RedisCluster.hset`", "ns", s["write"], s["HSET"],
                   key="cluster.set_hset", max_ratio=1.3),
        Row.paired("  miss on the cluster vs the same miss on one Redis", "ns", s["miss"],
                   s["one miss"], key="cluster.miss_one"),
        Row.paired("  write on the cluster vs the same write on one Redis", "ns", s["write"],
                   s["one write"], key="cluster.set_one"),
    ]  # fmt: skip


# ---- propagation ----------------------------------------------------------------------------


def _propagation(f: Field, plan: PropagationPlan) -> list[Row]:
    channel = f.b.raw("cl-prop-ch")
    spublish = f.client.spublish
    contenders = [
        propagation.Contender("syncmap", ("open", "map", "cl-prop", None),
                              lambda: _map_writer(f, "cl-prop")),
        propagation.Contender(RAW, ("open", "sraw", channel),
                              lambda: contextlib.nullcontext(lambda i: spublish(channel, str(i)))),
    ]  # fmt: skip
    absent: dict[str, str] = {}
    pool = Pool.start(propagation.receiver, max(plan.receivers), (f.cluster.url, f.b.ns))
    try:
        propagation.measure(pool, contenders, plan, absent)
    finally:
        pool.stop()
    if absent:
        raise RuntimeError(f"propagation on the cluster failed: {absent}")
    mine, raw = contenders
    rows = []
    for n in plan.receivers:
        a, r = mine.stats(n), raw.stats(n)
        note = f"{a['deliveries']:,.0f} deliveries"
        if a["missing"] or r["missing"]:
            note += f"; **MISSING deliveries: {a['missing']:,.0f} (raw {r['missing']:,.0f})**"
        rows += [
            Row(f"write → visible in {receivers(n)} (sharded channels): p50 vs {RAW} → "
                "`ssubscribe`", "ms", a["p50"], r["p50"], key=f"cluster.propagation.{n}.p50",
                note=note),
            Row(f"  write → visible in {receivers(n)}: p99", "ms", a["p99"], r["p99"],
                key=f"cluster.propagation.{n}.p99"),
        ]  # fmt: skip
    return rows


@contextlib.contextmanager
def _map_writer(f: Field, name: str) -> Iterator[Callable[[int], Any]]:
    """The writer's cluster map, open only during its own segments (as propagation.py's)."""
    m = SyncMap(name, url=f.cluster.url, config=MapConfig(namespace=f.b.ns, presence=False))
    try:
        yield lambda i: m.set(i, 0)
    finally:
        m.close()
