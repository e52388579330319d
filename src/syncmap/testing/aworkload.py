"""The asyncio server of :mod:`syncmap.testing.workload`: the same load on a ``syncmap.aio`` map.

A scenario run with ``Workload(drivers=("async", "sync", ...))`` mixes these with sync servers
on one map.  Each async server runs ``CLIENTS`` client coroutines on its loop, sharing its map
and near cache as a web app's request handlers do, at the sync server's total pace.  Each client
records its operations under a process name of its own (``s0.c1``): the oracles' per-process
checks (monotonic reads, read-your-writes) assume a process issues one operation at a time.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import asdict
from typing import Any

from ..aio import SyncMap as AioMap
from ..errors import StoreError, WriteOutcomeUnknown
from .drivers import cached_entry
from .history import Op
from .workload import ServerResult, Workload

CLIENTS = 2


async def aserve(w: Workload, process: str, seed: int, results: Any, ready: Any, go: Any) -> None:
    """Body of one asyncio server process; puts a :class:`ServerResult` on ``results``."""
    ops: list[Op] = []
    async with AioMap(w.name, w.url, config=w.config(), feed=w.feed, node_id=process) as m:
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)  # a multiprocessing Event: wait off the loop
        end = time.monotonic() + w.seconds
        clients = [
            _client(m, w, f"{process}.c{j}", random.Random(seed * 100 + j), end, ops)
            for j in range(CLIENTS)
        ]
        await asyncio.gather(*clients)
        await asyncio.sleep(w.max_staleness + 0.3)  # C3 is stated "after T + max_staleness"
        cached = {str(k): cached_entry(m, k) for k in list(m._entries)}
        stats = {k: v for k, v in asdict(m.statistics()).items() if isinstance(v, int)}
    results.put(ServerResult(process, os.getpid(), ops, cached, stats))  # type: ignore[arg-type]


async def _client(m: AioMap, w: Workload, name: str, rng: random.Random, end: float,
                  ops: list[Op]) -> None:  # fmt: skip
    weights = [1 / (i + 1) for i in range(w.keys)]  # Zipf-like skew, as the sync server's
    names = [f"k{i}" for i in range(w.keys)]
    n = 0
    while time.monotonic() < end:
        key = rng.choices(names, weights)[0]
        write = rng.random() < w.write_ratio and key not in w.read_only
        op = await _one(m, name, key, write, n)
        if op is not None:
            ops.append(op)
        n += 1
        await asyncio.sleep(w.pace_s * CLIENTS)  # pacing the load, not waiting for anything


async def _one(m: AioMap, process: str, key: str, write: bool, n: int) -> Op | None:
    """As ``workload._one``: a failed operation is dropped, an unknown write kept as ``info``."""
    call = time.monotonic_ns()
    try:
        if write:
            value = f"{process}-{n}"
            try:
                version = await m.set(key, value)
            except WriteOutcomeUnknown:
                return Op(process, "info", key, value, -1, call, time.monotonic_ns())
            return Op(process, "write", key, value, version, call, time.monotonic_ns())
        value, version, source = await m.get_with_meta(key)
    except StoreError:
        return None
    return Op(process, "read", key, value, version, call, time.monotonic_ns(), source)


__all__ = ["CLIENTS", "aserve"]
