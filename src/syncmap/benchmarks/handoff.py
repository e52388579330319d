"""Contended lock hand-off: 2, 4, 8 processes take turns on one lock.

Each process loops: ``acquire()``, hold HOLD seconds, stamp ``monotonic_ns()`` just before
``release()``; then it waits (untimed, through a shared integer) until another process has taken
the lock, and only then queues again: every release has a waiter, and the releaser never simply
takes the lock back.  A hand-off is one holder's "just before ``release()``" to the next holder's
"``acquire()`` returned", counted only when the next holder is another process that had called
``acquire()`` before the release began.  It also checks mutual exclusion: no hold may begin
before the previous one's release.

The peer is redis-py's ``Lock`` with its default ``sleep=0.1``: a waiter that finds the lock taken
polls again 100 ms later, so its hand-offs take about one polling interval whatever the network.
syncmap's waiters are woken by the release message.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from multiprocessing.queues import Queue
from typing import Any

import redis

from ..lock import Lock, RWLock, Semaphore
from .method import Row, pct
from .workers import CTX, Pool, serve

LEASE = 30.0
HOLD = 0.003  # seconds each contender holds the lock
POLL = 0.0005  # how often a releaser checks whether someone else took the lock (not timed)
REDPY_SLEEP = 0.1  # redis-py Lock's default polling interval while it waits
ACQUIRE_TIMEOUT = 20.0  # a contender that waits this long reports an error
TARGET_P50_MS = 1.0
Hold = tuple[int, int, int]  # CLOCK_MONOTONIC ns: acquire called, acquire returned, release called
Report = tuple[list[Row], dict[str, Any], list[str]]  # rows, plot series, notes


@dataclass(frozen=True, slots=True)
class HandoffPlan:
    rounds: int  # interleaved rounds of every (lock kind, process count) configuration
    seconds: float  # length of one syncmap segment
    polling_seconds: float  # length of one redis-py segment (its hand-offs take ~100 ms each)
    warmup_seconds: float  # length of each configuration's discarded warm-up segment
    contenders: tuple[int, ...]


def _contender(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str, last: Any) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    serve(wid, cmds, out, lambda cmd: _contend(client, ns, wid, last, *cmd))
    client.close()


def _lock(client: redis.Redis, ns: str, kind: str, name: str) -> tuple[Any, Any]:
    """(lock, acquire) for one segment: ``syncmap`` (Lock), ``rwlock`` (RWLock's write side),
    ``semaphore`` (a Semaphore of 1 permit: exclusive, so the exclusion check holds), or
    redis-py's Lock."""
    if kind == "syncmap":
        lock: Any = Lock(name, redis=client, namespace=ns, lease=LEASE)
        return lock, lambda: lock.acquire(timeout=ACQUIRE_TIMEOUT)
    if kind == "rwlock":
        side = RWLock(name, redis=client, namespace=ns, lease=LEASE).write
        return side, lambda: side.acquire(timeout=ACQUIRE_TIMEOUT)
    if kind == "semaphore":
        sem = Semaphore(name, 1, redis=client, namespace=ns, lease=LEASE)

        def take() -> bool:
            sem.acquire(timeout=ACQUIRE_TIMEOUT)  # raises when it was not acquired
            return True

        return sem, take
    lock = client.lock(f"{ns}:{name}", timeout=LEASE, sleep=REDPY_SLEEP,
                       blocking_timeout=ACQUIRE_TIMEOUT)  # fmt: skip
    return lock, lock.acquire


def _contend(client: redis.Redis, ns: str, wid: int, last: Any, kind: str, name: str,
             start_ns: int, end_ns: int) -> list[Hold]:  # fmt: skip
    lock, acquire = _lock(client, ns, kind, name)
    holds: list[Hold] = []
    while (left := start_ns - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)
    while time.monotonic_ns() < end_ns:
        called = time.monotonic_ns()
        if not acquire():
            raise RuntimeError(f"not acquired within {ACQUIRE_TIMEOUT:g} s")
        acquired = time.monotonic_ns()
        last.value = wid
        time.sleep(HOLD)
        releasing = time.monotonic_ns()  # just before the call: the release is part of the delay
        lock.release()
        holds.append((called, acquired, releasing))
        while last.value == wid and time.monotonic_ns() < end_ns:
            time.sleep(POLL)
    return holds


@dataclass(slots=True)
class Handoffs:
    """The hand-offs of one configuration (lock kind, process count) over all its rounds."""

    delays_ms: list[float] = field(default_factory=list)
    not_waiting: int = 0  # next holder had not called acquire yet at the release: not counted
    overlaps: int = 0  # a holder acquired before the previous one released: exclusion broken
    per_process: Counter[int] = field(default_factory=Counter)

    def add(self, logs: dict[int, list[Hold]]) -> None:
        holds = sorted((acq, rel, called, wid) for wid, hs in logs.items()
                       for called, acq, rel in hs)  # fmt: skip
        self.per_process.update(h[3] for h in holds)
        for (_, rel, _, wid), (acq, _, called, nxt) in pairwise(holds):
            if acq < rel:
                self.overlaps += 1
            elif nxt == wid or called > rel:
                self.not_waiting += 1
            else:
                self.delays_ms.append((acq - rel) / 1e6)

    def pct(self, q: float) -> float:
        return pct(sorted(self.delays_ms), q)

    def describe(self, each: str = "process") -> str:
        turns = "/".join(str(self.per_process[w]) for w in sorted(self.per_process))
        text = f"{len(self.delays_ms)} hand-offs (holds per {each} {turns}"
        if self.not_waiting:
            text += f"; {self.not_waiting} releases with no waiter yet, not counted"
        text += f"; max {max(self.delays_ms, default=float('nan')):.3g} ms)"
        if self.overlaps:
            text += f"; **MUTUAL EXCLUSION BROKEN {self.overlaps} times**"
        return text


def start_pool(url: str, ns: str, n: int) -> tuple[Pool, Any]:
    """``n`` contender processes and the shared integer they take turns through (``last``)."""
    last = CTX.Value("i", -1, lock=False)
    return Pool.start(_contender, n, (url, ns, last)), last


def segment(pool: Pool, last: Any, kind: str, n: int, seconds: float) -> dict[int, list[Hold]]:
    """``n`` processes contend on one lock for ``seconds``; their holds."""
    last.value = -1
    start = time.monotonic_ns() + 150_000_000  # all start together, their locks made
    end = start + round(seconds * 1e9)
    cmd = (kind, f"handoff-{kind}-{n}", start, end)
    logs: dict[int, list[Hold]] = pool.ask(range(n), cmd, seconds + 2 * ACQUIRE_TIMEOUT)
    return logs


def run(url: str, ns: str, plan: HandoffPlan) -> Report:
    configs = [(kind, n) for n in plan.contenders for kind in ("syncmap", "redis-py")]
    found = {cfg: Handoffs() for cfg in configs}
    pool, last = start_pool(url, ns, max(plan.contenders))
    try:
        for r in range(plan.rounds + 1):  # round 0: warm-up (connect, subscribe, load scripts)
            for kind, n in configs if r % 2 == 0 else configs[::-1]:
                seconds = plan.seconds if kind == "syncmap" else plan.polling_seconds
                logs = segment(pool, last, kind, n, plan.warmup_seconds if r == 0 else seconds)
                if r:
                    found[kind, n].add(logs)
    finally:
        pool.stop()
    return _report(found, plan.contenders)


def _report(found: dict[tuple[str, int], Handoffs], contenders: tuple[int, ...]) -> Report:
    rows, notes = [], []
    for n in contenders:
        sm, rp = found["syncmap", n], found["redis-py", n]
        rows += [
            Row(f"contended hand-off p50, {n} processes (hold {HOLD * 1000:g} ms): `Lock` vs "
                f"redis-py `Lock(sleep={REDPY_SLEEP:g})`", "ms", sm.pct(0.5), rp.pct(0.5),
                key=f"locks.handoff.{n}.p50", at_most=TARGET_P50_MS),
            Row(f"  hand-off p99, {n} processes", "ms", sm.pct(0.99), rp.pct(0.99),
                key=f"locks.handoff.{n}.p99"),
        ]  # fmt: skip
        notes.append(f"hand-off, {n} processes: syncmap {sm.describe()}; redis-py "
                     f"{rp.describe()}")  # fmt: skip
    series = {kind: {str(n): {"p50": found[kind, n].pct(0.5), "p99": found[kind, n].pct(0.99)}
                     for n in contenders} for kind in ("syncmap", "redis-py")}  # fmt: skip
    return rows, {"contenders": list(contenders), "handoff_ms": series}, notes
