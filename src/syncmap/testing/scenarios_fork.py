"""S26 ``fork``: maps and locks created in a parent, then ``fork()``; parent and children at once.

A module-level map (as a pre-fork server's app module has one) is warmed in the parent, which
also keeps reading through it while a ``multiprocessing`` pool (fork start method) runs tasks that
read keys whose values name the key, write, and increment one counter atomically.  A separate
forked child checks locks: the parent's hold is not the child's, a lock taken in the child is
renewed there through several leases, and a new map opens in the child.

``guard=False`` forks with ``forksafe.enabled = False`` (children inherit sockets, registries and
holds as they are): the run must then fail.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from typing import Any

import redis

from .. import forksafe
from ..config import MapConfig
from ..errors import LockNotAcquired, SyncMapError
from ..lock import Lock
from ..map import SyncMap
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed

KEYS = [f"k{i}" for i in range(40)]
STALENESS = 0.2
_MAP: SyncMap | None = None  # the pool's tasks find the parent's map here, as a module global
_HELD: Lock | None = None


def _task(task: int, ops: int) -> dict[str, Any]:
    """One pool task: which Redis connection it talks on, checked reads, writes, increments."""
    m = _MAP
    assert m is not None
    wrong = errors = 0
    # Any exception counts as an error, not only SyncMapErrors: on a shared socket a reply meant
    # for another process (an int where a list was due) fails anywhere (the guard-off run).
    try:  # first, before anything else: which Redis connection does the child talk on?
        client_id = int(m._executor.call([("CLIENT", "ID")], write=False)[0])
    except Exception:
        client_id, errors = -1, 1
    for j in range(ops):
        key = KEYS[(task * 7 + j) % len(KEYS)]
        try:
            if m.get(key) != {"k": key}:
                wrong += 1
            m.set(f"w{task}", {"k": f"w{task}", "n": j})
            m.transform("counter", lambda n: n + 1, 0)
        except Exception:
            errors += 1
    # Outlive the leases inherited from the parent: only the child's own probes keep it serving.
    threading.Event().wait(3 * STALENESS)
    try:
        m.get("k0")
        before = m.statistics().hits
        m.get("k0")
        hit = m.statistics().hits - before
    except Exception:
        hit, errors = 0, errors + 1
    return {"wrong": wrong, "errors": errors, "hit": hit, "pid": os.getpid(), "id": client_id}


def _task_star(args: tuple[int, int]) -> dict[str, Any]:
    return _task(*args)


def _pool_run(url: str, name: str, tasks: int, ops: int, workers: int) -> dict[str, Any]:
    global _MAP
    config = MapConfig(socket_timeout=0.5, self_check_timeout=2.0, max_staleness=STALENESS)
    _MAP = m = SyncMap(name, url, config=config)
    admin = redis.Redis.from_url(url)
    stop, parent = threading.Event(), {"wrong": 0, "reads": 0}

    def parent_reads() -> None:  # the parent keeps using its connections during the forks
        while not stop.is_set():
            for k in KEYS[:8]:
                try:
                    parent["wrong"] += m.get(k, consistent=True) != {"k": k}
                except Exception:  # as in _task
                    parent["wrong"] += 1
                parent["reads"] += 1

    try:
        m.update([(k, {"k": k}) for k in KEYS])
        for k in KEYS:
            m[k]  # cached in the parent: the children inherit these entries
        with Lock(f"{name}-warm", url, lease=1.0):  # the parent's watchdog and waker exist
            pass
        reader = threading.Thread(target=parent_reads, name="s26-parent-reads")
        reader.start()
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                inherited = {int(c["id"]) for c in admin.client_list()}  # after the forks
                results = pool.map(_task_star, [(t, ops) for t in range(tasks)], chunksize=1)
        finally:
            stop.set()
            reader.join()
        counter = m.get("counter", consistent=True) or 0
    finally:
        m.close()
        admin.close()
        _MAP = None
    return {
        "results": results, "inherited": inherited, "counter": counter,
        "parent_wrong": parent["wrong"], "parent_reads": parent["reads"],
    }  # fmt: skip


def _child_locks(url: str, name: str, conn: Any) -> None:
    out: dict[str, Any] = {}
    held = _HELD
    assert held is not None
    out["parent_hold_seen_as_ours"] = held.held
    try:
        held.acquire(timeout=0)
        out["took_parents_lock"] = True
        held.release()
    except LockNotAcquired:
        out["took_parents_lock"] = False
    mine = Lock(f"{name}-child", url, lease=0.3)
    fence = mine.acquire()
    threading.Event().wait(1.2)  # hold through four leases: only renewals keep it
    try:
        out["renewed"] = mine.fence == fence
        mine.release()
    except SyncMapError as exc:
        out["renewed"] = f"lost: {exc}"
    try:
        with SyncMap(f"{name}-new", url, config=MapConfig(self_check_timeout=2.0)) as fresh:
            fresh["x"] = 1
            out["new_map"] = fresh["x"]
    except SyncMapError as exc:
        out["new_map"] = f"failed: {exc}"
    conn.send(out)
    conn.close()


def _lock_run(url: str, name: str) -> tuple[dict[str, Any], bool]:
    """The child's lock report, and whether the parent still held its lock afterwards."""
    global _HELD
    _HELD = held = Lock(f"{name}-parent", url, lease=5.0)
    held.acquire()
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child_locks, args=(url, name, theirs))
    child.start()
    try:
        out = ours.recv() if ours.poll(30) else {"reported": False}
        return out, held.valid
    finally:
        child.join(10)
        held.release()
        _HELD = None


@scenario("S26", "fork", faults_server=False)
def s26(env: Env, seconds: float, *, guard: bool = True, workers: int = 4, **_: Any
        ) -> ScenarioResult:  # fmt: skip
    """The pool workload (about ``seconds``) and the child-lock check; see the module."""
    result, started = timed("S26", "fork")
    name = f"s26-{uuid.uuid4().hex[:8]}"
    tasks = max(2 * workers, round(seconds * 8))
    forksafe.enabled = guard
    try:
        with env.server() as server:  # a private Redis: CLIENT LIST must be the run's own
            pool = _pool_run(server.url, name, tasks, 150, workers)
            locks, parent_still_holds = _lock_run(server.url, name)
    finally:
        forksafe.enabled = True
    rs = pool["results"]
    wrong = sum(r["wrong"] for r in rs) + pool["parent_wrong"]
    errors = sum(r["errors"] for r in rs)
    shared = sorted({r["id"] for r in rs} & pool["inherited"])
    no_hits = sum(1 for r in rs if r["hit"] != 1)
    lost = tasks * 150 - pool["counter"]
    result.figures.update({
        OPS: 450 * len(rs) + pool["parent_reads"], "children": len({r["pid"] for r in rs}),
        "reads_wrong": wrong, "errors": errors, "shared_connections": len(shared),
        "increments_lost": lost, "tasks_without_hits": no_hits,
        "child_lock_renewed": locks.get("renewed") is True,
        ANOMALIES: wrong + errors + len(shared) + abs(lost) + no_hits,
    })  # fmt: skip
    result.require(wrong == 0, f"{wrong} reads returned another key's value")
    result.require(errors == 0, f"{errors} operations failed in the children")
    result.require(not shared, f"children talked on the parent's Redis connections {shared}")
    result.require(lost == 0, f"{lost} atomic increments lost (or applied twice if negative)")
    result.require(no_hits == 0, f"{no_hits} tasks served no hit once inherited leases ran out")
    expected = {"parent_hold_seen_as_ours": False, "took_parents_lock": False, "renewed": True,
                "new_map": 1}  # fmt: skip
    result.require(locks == expected, f"child locks: {locks}, expected {expected}")
    result.require(parent_still_holds, "the parent lost its lock while the child ran")
    return finish(result, started)
