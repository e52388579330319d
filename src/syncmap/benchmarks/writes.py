"""Writes: ``m[k] = v`` vs raw HSET / SET / pottery, ``update()`` vs a redis-py pipeline,
``compare_and_set`` vs the WATCH/MULTI loop, each group interleaved in one run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .context import Bench, settle
from .method import Contender, Row, Section, interleave, loop_call, loop_store, versus
from .peers import Unavailable, pottery_dict, watch_cas

KEYS = 1000


@dataclass(frozen=True, slots=True)
class WritePlan:
    rounds: int
    ops: int  # writes per timed block
    bulk_n: int  # entries per update() / pipeline
    bulk_rounds: int


def run(b: Bench, plan: WritePlan) -> Section:
    rows = _single(b, plan)
    rows.append(_bulk(b, plan))
    rows.append(_cas(b, plan))
    return Section("writes", "Writes", rows)


def _after(m: Any) -> Callable[[str], None]:
    """After each syncmap block, let its own subscriber handle the echoes (untimed)."""
    return lambda name: settle(m) if name.startswith("syncmap") else None


def _single(b: Bench, plan: WritePlan) -> list[Row]:
    keys = [f"key-{i:06d}" for i in range(KEYS)]
    m = b.open("writes")
    raw_hash = b.raw("hset")
    fields = [f"s{k}".encode() for k in keys]
    raw_keys = [b.raw(f"set:{k}") for k in keys]
    hset, set_ = b.client.hset, b.client.set
    ops = plan.ops
    contenders: list[Contender] = [
        ("syncmap", lambda: loop_store(m.__setitem__, keys, 12345, ops)),
        ("hset", lambda: loop_call(lambda f: hset(raw_hash, f, 12345), fields, ops)),
        ("set", lambda: loop_call(lambda k: set_(k, 12345), raw_keys, ops)),
    ]
    absent = ""
    try:
        pd = pottery_dict(b.client, b.raw("pottery-w"), {})
        contenders.append(("pottery", lambda: loop_store(pd.__setitem__, keys, 12345, ops)))
    except Unavailable as exc:
        absent = str(exc)
    s = interleave(contenders, plan.rounds, after=_after(m))
    rows = [
        Row.paired("write `m[k] = v` vs redis-py `HSET`", "ns", s["syncmap"], s["hset"],
                   key="writes.set_hset", max_ratio=1.3),
        Row.paired("write `m[k] = v` vs redis-py `SET`", "ns", s["syncmap"], s["set"],
                   key="writes.set_set"),
    ]  # fmt: skip
    rows.append(versus("write `m[k] = v` vs pottery `RedisDict[k] = v`", "ns", s, "syncmap",
                       "pottery", absent, key="writes.set_pottery"))  # fmt: skip
    return rows


def _bulk(b: Bench, plan: WritePlan) -> Row:
    n = plan.bulk_n
    data: dict[Any, Any] = {f"key-{i:07d}": i for i in range(n)}
    m = b.open("bulk", capacity=n)
    raw_hash = b.raw("bulk")

    def syncmap_update() -> float:
        t0 = time.perf_counter()
        m.update(data)
        return n / (time.perf_counter() - t0)

    def pipeline() -> float:
        t0 = time.perf_counter()
        with b.client.pipeline(transaction=False) as p:
            for k, v in data.items():
                p.hset(raw_hash, k, v)
            p.execute()
        return n / (time.perf_counter() - t0)

    s = interleave([("syncmap", syncmap_update), ("pipeline", pipeline)], plan.bulk_rounds,
                   after=_after(m))  # fmt: skip
    b.release(m)
    return Row.paired(f"`update()` of {_count(n)} entries vs a redis-py pipeline of {_count(n)} "
                      "`HSET`", "/s", s["syncmap"], s["pipeline"], key="writes.update",
                      at_least=100_000)  # fmt: skip


def _cas(b: Bench, plan: WritePlan) -> Row:
    """Uncontended compare-and-set: each op moves one key from its current value to the next."""
    keys = [f"cas-{i:04d}" for i in range(100)]
    m = b.open("cas")
    m.update(dict.fromkeys(keys, 0).items())
    raw_keys = [b.raw(f"cas:{k}") for k in keys]
    b.client.mset(dict.fromkeys(raw_keys, b"0"))
    mine = dict.fromkeys(keys, 0)
    theirs = dict.fromkeys(raw_keys, 0)

    def syncmap_cas(k: str) -> None:
        if not m.compare_and_set(k, mine[k], mine[k] + 1):
            raise RuntimeError(f"an uncontended compare_and_set({k!r}) failed")
        mine[k] += 1

    def redis_cas(k: str) -> None:
        if not watch_cas(b.client, k, str(theirs[k]).encode(), str(theirs[k] + 1).encode()):
            raise RuntimeError(f"an uncontended WATCH/MULTI compare-and-set of {k!r} failed")
        theirs[k] += 1

    s = interleave([("syncmap", lambda: loop_call(syncmap_cas, keys, plan.ops)),
                    ("watch", lambda: loop_call(redis_cas, raw_keys, plan.ops))],
                   plan.rounds, after=_after(m))  # fmt: skip
    return Row.paired("`compare_and_set` vs a redis-py WATCH / GET / MULTI SET EXEC loop", "ns",
                      s["syncmap"], s["watch"], key="writes.cas")  # fmt: skip


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)
