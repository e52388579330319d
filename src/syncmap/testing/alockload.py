"""The asyncio worker of :mod:`syncmap.testing.lockload`: the same loop on ``syncmap.aio``.

``LockLoad(drivers=("sync", "async"))`` mixes these with thread workers on one lock and one
map.  A worker is one task on its process's loop: ``await lock.acquire()`` -> read S -> ``await
asyncio.sleep`` (the critical section; the lease is renewed meanwhile by the lock's own task on
the same loop) -> fenced write -> ``await lock.release()``, logged exactly as the sync worker
logs, so the oracles (``lockcheck.analyse``) judge both alike.  The faults hit it as they hit a
sync worker: SIGSTOP and the GIL stall (a signal handler in the loop's thread) stop the loop
and with it the renewal task; ``CLIENT PAUSE WRITE`` holds its renewals in Redis.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable
from typing import Any

from ..aio import Lock, aclose_loop_resources
from ..aio import SyncMap as AioMap
from ..errors import LockLost, LockNotAcquired, StaleFence, SyncMapError, WriteOutcomeUnknown
from .lockcheck import LockLoad

Log = Callable[..., None]


async def aworker(cfg: LockLoad, index: int, owner: str, rng: random.Random, log: Log,
                  shared: tuple[Any, Any, Any]) -> None:  # fmt: skip
    """Body of one asyncio worker (``lockload._worker`` runs it with ``asyncio.run``)."""
    deadline, ready, go = shared
    lock = Lock(cfg.lock, cfg.url, lease=cfg.lease, owner=owner, namespace=cfg.namespace,
                hash_tag=cfg.hash_tag)  # fmt: skip
    try:
        async with AioMap(cfg.map, cfg.url, node_id=f"lockload-{owner}") as m:
            await m.get(cfg.key, consistent=True)  # connections open before the clock starts
            ready.put((index, os.getpid(), owner))
            if not await asyncio.to_thread(go.wait, 120):  # a multiprocessing Event
                return
            end_ns = int(deadline.value)
            n = 0
            while time.monotonic_ns() < end_ns:
                n += 1
                await _iteration(cfg, m, lock, rng, (index, n, end_ns), log)
    finally:
        await lock.aclose()
        await aclose_loop_resources()


async def _iteration(cfg: LockLoad, m: AioMap, lock: Lock, rng: random.Random,
                     at: tuple[int, int, int], log: Log) -> None:  # fmt: skip
    """One acquire / read / write / release, as ``lockload._iteration``."""
    index, n, end_ns = at
    call = time.monotonic_ns()
    try:
        fence = await lock.acquire(timeout=max(0.001, (end_ns - call) / 1e9))
    except LockNotAcquired:
        log(e="acq", w=index, call=call, ret=time.monotonic_ns(), ok=False)
        return
    except SyncMapError as exc:  # Redis unavailable, OOM: count it, and try again
        log(e="acq", w=index, call=call, ret=time.monotonic_ns(), ok=False, err=repr(exc))
        await asyncio.sleep(0.01)  # pacing the retries, not waiting for anything
        return
    enter = time.monotonic_ns()
    token = int(fence)
    log(e="acq", w=index, call=call, ret=enter, ok=True, tok=token)
    try:
        write = await _read_modify_write(cfg, m, fence, rng, f"w{index}-{n}")
    except SyncMapError as exc:  # the read failed: no write
        write = {"call": 0, "ret": 0, "id": "", "out": "noread", "err": repr(exc)}
    exit_ = time.monotonic_ns()
    released = "ok"
    try:
        await lock.release()
    except LockLost:
        released = "lost"
    except SyncMapError:
        released = "error"
    log(e="cs", w=index, tok=token, enter=enter, exit=exit_, write=write, rel=released)


async def _read_modify_write(cfg: LockLoad, m: AioMap, fence: Any, rng: random.Random,
                             wid: str) -> dict[str, Any]:  # fmt: skip
    old: Any = await m.get(cfg.key, 0 if cfg.mode == "counter" else [], consistent=True)
    await asyncio.sleep(rng.uniform(cfg.cs_min, cfg.cs_max))  # the critical section's work
    new: Any = int(old) + 1 if cfg.mode == "counter" else [*old, wid]
    wcall = time.monotonic_ns()
    outcome, err = "ok", ""
    try:
        await m.set(cfg.key, new, fence=fence if cfg.fenced else None)
    except StaleFence:
        outcome = "stale"
    except WriteOutcomeUnknown as exc:
        outcome, err = "unknown", repr(exc)
    except SyncMapError as exc:
        outcome, err = "error", repr(exc)
    return {"call": wcall, "ret": time.monotonic_ns(), "id": wid, "out": outcome, "err": err}


__all__ = ["aworker"]
