"""Lock hand-off with many waiters (issue 16 goal 5): 8, 64 and 200 waiters on one lock.

Waiters are threads spread over ``PROCESSES`` worker processes (200 interpreters would not fit
on 2 cores); each loops as :mod:`.handoff`'s contenders do: ``acquire()``, hold HOLD, stamp just
before ``release()``, then wait (untimed) until another waiter has taken the lock before it
queues again.  Hand-offs are measured, and mutual exclusion checked, by
:class:`.handoff.Handoffs`.  The peer is redis-py's ``Lock(sleep=0.1)`` in the same rounds.

Redis calls per hand-off: the server's ``INFO commandstats`` delta of the commands the lock
clients send (EVALSHA, and SET for redis-py's acquire) over a segment, divided by the holds in
it; it counts each waiter's tries when it queues again, the refreshes of its place and the
drain after the segment's end.  (Commandstats also counts what scripts run inside, so the sum
of every command, Redis's work, is in the notes.)  Nothing but this benchmark should use the
server meanwhile.
Before the queue (issue 16) a release woke every waiter of syncmap's ``Lock``: 107 EVALSHA per
hand-off with 200 waiters.

``RWLock`` (its write side: writers hand off to writers) and ``Semaphore`` (1 permit, so the
hand-off and the exclusion check mean what they mean for ``Lock``) run in the same rounds; their
queue came with lock queue 2.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import redis

from .handoff import ACQUIRE_TIMEOUT, TARGET_P50_MS, Handoffs, Hold, Report, _contend
from .method import Row
from .workers import CTX, Pool, serve

PROCESSES = 8
CALLS_BEFORE = 107.0  # EVALSHA per hand-off with 200 waiters before issue 16 (wake-all)
TARGET_CALLS = 4.0  # release + acquire, and the 2 tries of the waiter that queues again


@dataclass(frozen=True, slots=True)
class HerdPlan:
    rounds: int  # interleaved rounds of every (lock kind, waiters) configuration
    seconds: float  # one syncmap segment
    polling_seconds: float  # one redis-py segment (its hand-offs take ~100 ms)
    warmup_seconds: float
    waiters: tuple[int, ...] = (8, 64, 200)
    #: syncmap's Lock, redis-py's Lock, RWLock's write side, a Semaphore of 1 permit.
    kinds: tuple[str, ...] = ("syncmap", "redis-py", "rwlock", "semaphore")


def _worker(wid: int, cmds: Queue[Any], out: Queue[Any], url: str, ns: str, last: Any) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    serve(wid, cmds, out, lambda cmd: _threads(client, ns, last, *cmd))
    client.close()


def _threads(client: redis.Redis, ns: str, last: Any, kind: str, name: str, start_ns: int,
             end_ns: int, wids: list[int]) -> dict[int, list[Hold]]:  # fmt: skip
    """This process's waiters (one thread each, ids ``wids``) contend until ``end_ns``."""
    logs: dict[int, list[Hold]] = {}
    errors: list[str] = []

    def one(w: int) -> None:
        try:
            logs[w] = _contend(client, ns, w, last, kind, name, start_ns, end_ns)
        except Exception as exc:  # reported to the parent below
            errors.append(f"waiter {w}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in wids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return logs


def _calls(client: redis.Redis) -> tuple[int, int, int]:
    """(EVALSHA + SET: the lock clients' calls, EVALSHA, every command including those run
    inside scripts) the server has run so far."""
    stats = client.info("commandstats")
    total = sum(int(v.get("calls", 0)) for v in stats.values() if isinstance(v, dict))
    evalsha, set_ = (int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "set"))
    return evalsha + set_, evalsha, total


@dataclass(slots=True)
class Herd:
    handoffs: Handoffs
    calls: int = 0
    evalsha: int = 0
    commands: int = 0
    holds: int = 0

    def per_hold(self, evalsha: bool = False) -> float:
        return (self.evalsha if evalsha else self.calls) / max(self.holds, 1)


def _segment(pool: Pool, last: Any, client: redis.Redis, kind: str, n: int, seconds: float,
             found: Herd | None) -> None:  # fmt: skip
    last.value = -1
    start = time.monotonic_ns() + 300_000_000  # every thread started, its lock made
    end = start + round(seconds * 1e9)
    procs = min(PROCESSES, n)
    wids = {p: [w for w in range(n) if w % procs == p] for p in range(procs)}
    before = _calls(client)
    for p in range(procs):
        pool.cmds[p].put((kind, f"herd-{kind}-{n}", start, end, wids[p]))
    replies = pool.gather(range(procs), seconds + 2 * ACQUIRE_TIMEOUT + 10)
    after = _calls(client)
    if found is None:
        return
    logs = {w: holds for reply in replies.values() for w, holds in reply.items()}
    found.handoffs.add(logs)
    found.calls += after[0] - before[0]
    found.evalsha += after[1] - before[1]
    found.commands += after[2] - before[2]
    found.holds += sum(len(h) for h in logs.values())


def run(url: str, ns: str, plan: HerdPlan) -> Report:
    configs = [(kind, n) for n in plan.waiters for kind in plan.kinds]
    found = {cfg: Herd(Handoffs()) for cfg in configs}
    last = CTX.Value("i", -1, lock=False)
    pool = Pool.start(_worker, min(PROCESSES, max(plan.waiters)), (url, ns, last))
    client = redis.Redis.from_url(url)
    try:
        for r in range(plan.rounds + 1):  # round 0: warm-up (connect, subscribe, load scripts)
            for kind, n in configs if r % 2 == 0 else configs[::-1]:
                seconds = plan.seconds if kind == "syncmap" else plan.polling_seconds
                _segment(pool, last, client, kind, n, plan.warmup_seconds if r == 0 else seconds,
                         found[kind, n] if r else None)  # fmt: skip
    finally:
        client.close()
        pool.stop()
    return _report(found, plan.waiters, plan.kinds)


def _describe(h: Herd, n: int) -> str:
    """Hand-offs, the fewest and most holds of one waiter (a starved one shows as 0), calls."""
    holds = [h.handoffs.per_process[w] for w in range(n)]
    text = (f"{len(h.handoffs.delays_ms)} hand-offs, holds per waiter {min(holds)}-{max(holds)}, "
            f"{h.calls} calls ({h.commands} commands with the scripts' own) for {h.holds} "
            "holds")  # fmt: skip
    if h.handoffs.overlaps:
        text += f"; **MUTUAL EXCLUSION BROKEN {h.handoffs.overlaps} times**"
    return text


LABEL = {"rwlock": "`RWLock` (write side)", "semaphore": "`Semaphore` (1 permit)"}


def _report(found: dict[tuple[str, int], Herd], waiters: tuple[int, ...],
            kinds: tuple[str, ...]) -> Report:  # fmt: skip
    rows, notes = [], []
    for n in waiters:
        sm, rp = found["syncmap", n], found["redis-py", n]
        before = f"; before the queue {CALLS_BEFORE:g} EVALSHA" if n == 200 else ""
        rows += [
            Row(f"hand-off p50, {n} waiters (threads in {min(PROCESSES, n)} processes): `Lock` "
                "vs redis-py `Lock(sleep=0.1)`", "ms", sm.handoffs.pct(0.5),
                rp.handoffs.pct(0.5), key=f"locks.herd.{n}.p50", at_most=TARGET_P50_MS),
            Row(f"  hand-off p99, {n} waiters", "ms", sm.handoffs.pct(0.99),
                rp.handoffs.pct(0.99), key=f"locks.herd.{n}.p99"),
            Row(f"  Redis calls per hand-off, {n} waiters (syncmap EVALSHA alone "
                f"{sm.per_hold(evalsha=True):.2f}{before})", "calls", sm.per_hold(),
                rp.per_hold(), key=f"locks.herd.{n}.calls", at_most=TARGET_CALLS),
        ]  # fmt: skip
        for kind in (k for k in kinds if k in LABEL):
            h = found[kind, n]
            rows += [
                Row(f"  {LABEL[kind]} hand-off p50, {n} waiters, vs redis-py `Lock`", "ms",
                    h.handoffs.pct(0.5), rp.handoffs.pct(0.5),
                    key=f"locks.herd.{kind}.{n}.p50", at_most=TARGET_P50_MS),
                Row(f"  {LABEL[kind]} hand-off p99, {n} waiters", "ms", h.handoffs.pct(0.99),
                    rp.handoffs.pct(0.99), key=f"locks.herd.{kind}.{n}.p99"),
                Row(f"  {LABEL[kind]} EVALSHA per hand-off, {n} waiters", "calls",
                    h.per_hold(evalsha=True), None, key=f"locks.herd.{kind}.{n}.calls",
                    at_most=TARGET_CALLS),
            ]  # fmt: skip
        notes.append(f"{n} waiters: syncmap {_describe(sm, n)}; redis-py {_describe(rp, n)}")
        notes += [f"{n} waiters: {LABEL[k]} {_describe(found[k, n], n)}" for k in kinds
                  if k in LABEL]  # fmt: skip
    series = {
        kind: {str(n): {"p50": found[kind, n].handoffs.pct(0.5),
                        "p99": found[kind, n].handoffs.pct(0.99),
                        "calls": found[kind, n].per_hold()} for n in waiters}
        for kind in kinds
    }  # fmt: skip
    return rows, {"waiters": list(waiters), "herd": series}, notes
