"""Locks, uncontended: acquire + release pairs of syncmap's ``Lock`` and ``Redlock`` against
redis-py's ``Lock``, python-redis-lock and pottery's ``Redlock``, interleaved in rounds.

Round trips per pair: syncmap 2 (two EVALSHA), redis-py 2 (SET NX PX, EVALSHA),
python-redis-lock 3 (GET, SET NX EX, EVALSHA; with renewal it also starts and joins a thread),
pottery sends its commands from a new thread pool on every call.  The contended hand-off is in
:mod:`.handoff`, with 8 to 200 waiters in :mod:`.herd`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ..lock import Lock, Redlock
from . import handoff, herd
from .context import Bench, delete_matching
from .method import Contender, Row, Section, interleave, median, versus
from .peers import Unavailable, optional

LEASE = 30.0  # seconds, every single-node lock (the locks are never held that long here)
REDLOCK_LEASE = 10.0  # syncmap Redlock lease = pottery auto_release_time
TARGET_RATIO = 1.3


@dataclass(frozen=True, slots=True)
class LockPlan:
    rounds: int  # interleaved rounds of the uncontended contenders (after one warm-up round)
    ops: int  # acquire + release pairs per timed block, single node
    redlock_ops: int  # the same over 3 nodes
    handoff: handoff.HandoffPlan
    herd: herd.HerdPlan


def _pairs(acquire: Callable[[], Any], release: Callable[[], Any], ops: int) -> float:
    """ns per acquire + release pair on one lock object."""
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        if not acquire():
            raise RuntimeError("an uncontended acquire failed")
        release()
    return (time.perf_counter_ns() - t0) / ops


def _pairs_new(make: Callable[[], Any], ops: int) -> float:
    """ns per pair, with a new lock object made for each pair (as ``map.lock(key)`` does)."""
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        lock = make()
        if not lock.acquire():
            raise RuntimeError("an uncontended acquire failed")
        lock.release()
    return (time.perf_counter_ns() - t0) / ops


def _settle_threads(name: str, limit: float = 1.0) -> None:
    """pottery returns once a majority answered; its threads for the other masters finish in the
    background.  Let them finish, untimed, so they do not run inside the next contender's block."""
    if not name.startswith("pottery"):
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(
        t.name.startswith("ThreadPoolExecutor") for t in threading.enumerate()
    ):
        time.sleep(0.0005)


def _peers(client: redis.Redis, ns: str, ops: int) -> tuple[list[Contender], dict[str, str]]:
    found: list[Contender] = []
    absent: dict[str, str] = {}
    try:
        redis_lock = optional("redis_lock")
        for name, renew in (("prl", False), ("prl-renew", True)):
            prl = redis_lock.Lock(client, f"{ns}:u-{name}", expire=int(LEASE), auto_renewal=renew)
            found.append((name, _bound(prl, ops)))
    except Unavailable as exc:
        absent["prl"] = absent["prl-renew"] = str(exc)
    try:
        pot = optional("pottery").Redlock(key=f"{ns}:u-pot", masters={client},
                                          auto_release_time=LEASE)  # fmt: skip
        found.append(("pottery", _bound(pot, ops)))
    except Unavailable as exc:
        absent["pottery"] = str(exc)
    return found, absent


def _bound(lock: Any, ops: int) -> Callable[[], float]:
    return lambda: _pairs(lock.acquire, lock.release, ops)


def uncontended(client: redis.Redis, ns: str, plan: LockPlan) -> list[Row]:
    ops = plan.ops
    sm = Lock("u-sm", redis=client, namespace=ns, lease=LEASE)
    rp = client.lock(f"{ns}:u-rp", timeout=LEASE)
    contenders: list[Contender] = [
        ("sm", _bound(sm, ops)),
        ("rp", _bound(rp, ops)),
        ("sm-new", lambda: _pairs_new(
            lambda: Lock("u-sm-new", redis=client, namespace=ns, lease=LEASE), ops)),
        ("rp-new", lambda: _pairs_new(lambda: client.lock(f"{ns}:u-rp-new", timeout=LEASE), ops)),
    ]  # fmt: skip
    peers, absent = _peers(client, ns, ops)
    s = interleave(contenders + peers, plan.rounds, after=_settle_threads)
    rows = [
        Row.paired(f"uncontended acquire+release: `Lock` (lease {LEASE:g} s) vs redis-py `Lock`",
                   "ns", s["sm"], s["rp"], key="locks.uncontended", max_ratio=TARGET_RATIO),
        Row.paired("  a new lock object per pair: `Lock(name, redis=client)` vs "
                   "`client.lock(name)`", "ns", s["sm-new"], s["rp-new"], key="locks.new"),
    ]  # fmt: skip
    for name, peer in (("prl", "python-redis-lock (`auto_renewal=False`)"),
                       ("prl-renew", "python-redis-lock (`auto_renewal=True`)"),
                       ("pottery", "pottery `Redlock` on 1 master")):  # fmt: skip
        rows.append(versus(f"  `Lock` vs {peer}", "ns", s, "sm", name, absent.get(name, ""),
                           key=f"locks.vs_{name.replace('-', '_')}"))  # fmt: skip
    return rows


def redlock(urls: Sequence[str], ns: str, plan: LockPlan) -> Row:
    clients = [redis.Redis.from_url(u) for u in urls]
    metric = (f"uncontended acquire+release on {len(urls)} masters: `Redlock` (no renewal) vs "
              "pottery `Redlock`")  # fmt: skip
    try:
        sm = Redlock("u-redlock", clients=clients, lease=REDLOCK_LEASE, auto_renew=False,
                     namespace=ns)  # fmt: skip
        contenders: list[Contender] = [("syncmap", _bound(sm, plan.redlock_ops))]
        try:
            pot = optional("pottery").Redlock(key=f"{ns}:u-redlock", masters=set(clients),
                                              auto_release_time=REDLOCK_LEASE)  # fmt: skip
            contenders.append(("pottery", _bound(pot, plan.redlock_ops)))
        except Unavailable as exc:
            s = interleave(contenders, plan.rounds)
            return Row(metric, "ns", median(s["syncmap"]), None, key="locks.redlock",
                       absent=str(exc))  # fmt: skip
        s = interleave(contenders, plan.rounds, after=_settle_threads)
        return Row.paired(metric, "ns", s["syncmap"], s["pottery"], key="locks.redlock")
    finally:
        for c in clients:
            delete_matching(c, f"*{ns}*")
            c.close()


def run(b: Bench, plan: LockPlan, redlock_urls: Sequence[str], redlock_absent: str) -> Section:
    rows = uncontended(b.client, b.ns, plan)
    if redlock_urls:
        rows.append(redlock(redlock_urls, b.ns, plan))
    else:
        rows.append(Row("uncontended acquire+release on 3 masters: `Redlock` vs pottery", "ns",
                        None, None, key="locks.redlock", absent=redlock_absent))  # fmt: skip
    handoff_rows, series, notes = handoff.run(b.url, b.ns, plan.handoff)
    herd_rows, herd_series, herd_notes = herd.run(b.url, b.ns, plan.herd)
    return Section("locks", "Locks", rows + handoff_rows + herd_rows, {**series, **herd_series},
                   notes + herd_notes)  # fmt: skip
