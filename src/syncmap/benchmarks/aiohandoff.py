"""Lock hand-off between two coroutines on one event loop, against the same between 2 processes.

The asyncio segment runs :mod:`.handoff`'s contender loop as coroutines: each of two tasks owns
its own ``syncmap.aio.Lock`` (one name) and loops ``await acquire()``, hold HOLD seconds (an
``asyncio.sleep``: the loop stays free), stamp ``monotonic_ns()`` just before ``release()``, then
waits (untimed) until the other task has taken the lock.  The peer is :mod:`.handoff`'s syncmap
segment with 2 processes (the sync ``Lock``), run in the same rounds, interleaved; both logs go
through the same :class:`~.handoff.Handoffs`, so a hand-off and its exclusion check mean the same.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from .. import aio
from . import handoff
from .handoff import ACQUIRE_TIMEOUT, HOLD, LEASE, POLL, TARGET_P50_MS, Handoffs, Hold, Report
from .method import Row

CONTENDERS = 2


@dataclass(frozen=True, slots=True)
class AsyncHandoffPlan:
    rounds: int  # interleaved rounds of the two segments (after one warm-up round)
    seconds: float  # length of one segment, each kind
    warmup_seconds: float


async def _contend(lock: aio.Lock, wid: int, last: list[int], end_ns: int) -> list[Hold]:
    holds: list[Hold] = []
    while time.monotonic_ns() < end_ns:
        called = time.monotonic_ns()
        await lock.acquire(timeout=ACQUIRE_TIMEOUT)  # LockNotAcquired after the timeout
        acquired = time.monotonic_ns()
        last[0] = wid
        await asyncio.sleep(HOLD)
        releasing = time.monotonic_ns()  # just before the call: the release is part of the delay
        await lock.release()
        holds.append((called, acquired, releasing))
        while last[0] == wid and time.monotonic_ns() < end_ns:
            await asyncio.sleep(POLL)
    return holds


async def _segment(url: str, ns: str, seconds: float) -> dict[int, list[Hold]]:
    """Two tasks of this loop contend on one lock for ``seconds``; their holds."""
    name = "aio-handoff"
    locks = [aio.Lock(name, url, namespace=ns, lease=LEASE) for _ in range(CONTENDERS)]
    last, end = [-1], time.monotonic_ns() + round(seconds * 1e9)
    try:
        logs = await asyncio.gather(*(_contend(lock, w, last, end) for w, lock in enumerate(locks)))
    finally:
        for lock in locks:
            await lock.aclose()
    return dict(enumerate(logs))


def run(url: str, ns: str, loop: asyncio.AbstractEventLoop, plan: AsyncHandoffPlan) -> Report:
    """The asyncio and process segments in interleaved rounds on ``loop`` (not running)."""
    found = {"asyncio": Handoffs(), "processes": Handoffs()}
    pool, last = handoff.start_pool(url, ns, CONTENDERS)
    try:
        for r in range(plan.rounds + 1):  # round 0: warm-up (connect, subscribe, load scripts)
            seconds = plan.warmup_seconds if r == 0 else plan.seconds
            for kind in ("asyncio", "processes") if r % 2 == 0 else ("processes", "asyncio"):
                if kind == "asyncio":
                    logs = loop.run_until_complete(_segment(url, ns, seconds))
                else:
                    logs = handoff.segment(pool, last, "syncmap", CONTENDERS, seconds)
                if r:
                    found[kind].add(logs)
    finally:
        pool.stop()
    return _report(found)


def _report(found: dict[str, Handoffs]) -> Report:
    a, p = found["asyncio"], found["processes"]
    rows = [
        Row(f"lock hand-off p50, 2 coroutines on one loop (hold {HOLD * 1000:g} ms): `aio.Lock` "
            "vs `Lock` between 2 processes", "ms", a.pct(0.5), p.pct(0.5),
            key="asyncio.handoff.p50", at_most=TARGET_P50_MS),
        Row("  lock hand-off p99, 2 coroutines vs 2 processes", "ms", a.pct(0.99), p.pct(0.99),
            key="asyncio.handoff.p99"),
    ]  # fmt: skip
    notes = [f"lock hand-off: asyncio {a.describe('coroutine')}; processes {p.describe()}"]
    series: dict[str, Any] = {
        kind: {"p50": h.pct(0.5), "p99": h.pct(0.99), "handoffs": len(h.delays_ms)}
        for kind, h in found.items()
    }
    return rows, {"handoff_ms": series}, notes
