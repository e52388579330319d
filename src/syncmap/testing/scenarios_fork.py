"""S26 ``fork``: maps and locks created in a parent, then ``fork()``; parent and children at once.

A module-level map (as a pre-fork server's app module has one) is warmed in the parent, which
also keeps reading through it while a ``multiprocessing`` pool (fork start method) runs tasks that
read keys whose values name the key, write, and increment one counter atomically.  A separate
forked child checks locks: the parent's hold is not the child's, a lock taken in the child is
renewed there through several leases, and a new map opens in the child.

On the servers (``CLIENT LIST`` of each, before the tasks and once they are done): the
connection each child talks on (``CLIENT ID``, asked of every server it uses) must not be one
the parent had open at the fork, and every child must have opened change-feed connections of
its own (``sub``/``ssub`` > 0) while the parent's stay open.  The same functions run S26-cluster
(``scenarios_cluster_fork``), where a map has one connection pool and one sharded subscriber
connection per master: "the servers" are then the masters.

``guard=False`` forks with ``forksafe.enabled = False`` (children inherit sockets, registries and
holds as they are): the run must then fail.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from .. import forksafe
from ..config import MapConfig
from ..errors import LockNotAcquired, SyncMapError
from ..lock import Lock
from ..map import SyncMap
from ..store.clusterexec import ClusterExecutor
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed

KEYS = [f"k{i}" for i in range(40)]
STALENESS = 0.2
OPS_PER_TASK = 150  # each: a checked read, a write, an atomic increment
_MAP: SyncMap | None = None  # the pool's tasks find the parent's map here, as a module global
_HELD: Lock | None = None
_LOCK_MAP: SyncMap | None = None
_ADDRESSES: list[str] = []  # the servers the tasks ask CLIENT ID of (Cluster: each master)
Conn = tuple[str, int]  # (a server's host:port, a CLIENT ID there): ids are per server


@dataclass(frozen=True, slots=True)
class Servers:
    """The servers of a run, each with an admin client (none of the map's connections)."""

    admins: Sequence[tuple[str, redis.Redis]]  # (host:port, client)

    def connections(self, *, feeds_only: bool = False) -> set[Conn]:
        """Every client connection open now (``feeds_only``: those subscribed to a channel,
        plain or sharded), named by server and id."""
        out = set()
        for address, admin in self.admins:
            for c in admin.client_list():
                if not feeds_only or int(c.get("sub", 0)) + int(c.get("ssub", 0)) > 0:
                    out.add((address, int(c["id"])))
        return out

    def close(self) -> None:
        for _, admin in self.admins:
            admin.close()


def _client_ids(m: SyncMap) -> list[Conn]:
    """The connection the map's executor talks on to each server, as the server names it.

    Asked through the map's own pools (on a Cluster, the per-master executor that routing
    uses for that master), so an inherited idle connection would be the one asked."""
    executor = m._executor
    if isinstance(executor, ClusterExecutor):
        return [(a, int(executor._node(a).call([("CLIENT", "ID")], write=False)[0]))
                for a in _ADDRESSES]  # fmt: skip
    return [(_ADDRESSES[0], int(executor.call([("CLIENT", "ID")], write=False)[0]))]


def _task(task: int, ops: int) -> dict[str, Any]:
    """One pool task: which Redis connection it talks on, checked reads, writes, increments."""
    m = _MAP
    assert m is not None
    wrong = errors = 0
    # Any exception counts as an error, not only SyncMapErrors: on a shared socket a reply meant
    # for another process (an int where a list was due) fails anywhere (the guard-off run).
    try:  # first, before anything else: which Redis connections does the child talk on?
        ids = _client_ids(m)
    except Exception:
        ids, errors = [], 1
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
    return {"wrong": wrong, "errors": errors, "hit": hit, "pid": os.getpid(), "ids": ids}


def _task_star(args: tuple[int, int]) -> dict[str, Any]:
    return _task(*args)


def _pool_run(url: str, name: str, tasks: int, ops: int, workers: int,
              servers: Servers) -> dict[str, Any]:  # fmt: skip
    global _MAP
    config = MapConfig(socket_timeout=0.5, self_check_timeout=2.0, max_staleness=STALENESS)
    _MAP = m = SyncMap(name, url, config=config)
    _ADDRESSES[:] = [a for a, _ in servers.admins]
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
                # After the forks, before any task: what is open now is the parent's.
                inherited = servers.connections()
                parent_feeds = servers.connections(feeds_only=True)
                results = pool.map(_task_star, [(t, ops) for t in range(tasks)], chunksize=1)
                # The workers are still alive, each with its map subscribed (or not).
                feeds_after = servers.connections(feeds_only=True)
        finally:
            stop.set()
            reader.join()
        counter = m.get("counter", consistent=True) or 0
    finally:
        m.close()
        _MAP = None
    return {
        "results": results, "inherited": inherited, "counter": counter,
        "parent_wrong": parent["wrong"], "parent_reads": parent["reads"],
        "parent_feeds": parent_feeds, "feeds_after": feeds_after,
    }  # fmt: skip


def _child_locks(url: str, name: str, conn: Any) -> None:
    out: dict[str, Any] = {}
    held, on_map = _HELD, _LOCK_MAP
    assert held is not None
    out["parent_hold_seen_as_ours"] = held.held
    try:
        held.acquire(timeout=0)
        out["took_parents_lock"] = True
        held.release()
    except LockNotAcquired:
        out["took_parents_lock"] = False
    # A map's lock (the parent's map, inherited) lives in its key's bucket slot (Cluster).
    mine = on_map.lock("k2", lease=0.3) if on_map else Lock(f"{name}-child", url, lease=0.3)
    fence = mine.acquire()
    threading.Event().wait(1.2)  # hold through four leases: only renewals keep it
    try:
        out["renewed"] = mine.fence == fence
        if on_map is not None:  # the fence is checked in the write's own slot
            on_map.set("k2", "fenced", fence=fence)
            out["fenced_write"] = on_map.get("k2", consistent=True)
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


def _lock_run(url: str, name: str, *, on_map: bool = False) -> tuple[dict[str, Any], bool]:
    """The child's lock report, and whether the parent still held its lock afterwards.
    ``on_map``: the locks are ``map.lock(key)`` locks of a map opened in the parent (on a
    Cluster they live in their keys' bucket slots), and the child writes with its fence."""
    global _HELD, _LOCK_MAP
    lock_map = SyncMap(name, url, config=MapConfig(self_check_timeout=2.0)) if on_map else None
    _LOCK_MAP = lock_map
    if lock_map is not None:
        _HELD = held = lock_map.lock("k1", lease=5.0)
    else:
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
        _HELD = _LOCK_MAP = None
        if lock_map is not None:
            lock_map.close()


def run_fork(result: ScenarioResult, url: str, name: str, servers: Servers, *, seconds: float,
             workers: int, guard: bool, on_map: bool = False,
             tasks_per_second: float = 8.0) -> None:  # fmt: skip
    """The pool workload (about ``seconds``: ``tasks_per_second`` tasks a second, at least two
    per worker) and the child-lock check on ``url``, whose servers are ``servers`` (only this
    run's clients on them); figures and musts into ``result``."""
    tasks = max(2 * workers, round(seconds * tasks_per_second))
    forksafe.enabled = guard
    try:
        pool = _pool_run(url, name, tasks, OPS_PER_TASK, workers, servers)
        locks, parent_still_holds = _lock_run(url, name, on_map=on_map)
    finally:
        forksafe.enabled = True
    rs = pool["results"]
    children = len({r["pid"] for r in rs})
    wrong = sum(r["wrong"] for r in rs) + pool["parent_wrong"]
    errors = sum(r["errors"] for r in rs)
    shared = sorted({tuple(i) for r in rs for i in r["ids"]} & pool["inherited"])
    no_hits = sum(1 for r in rs if r["hit"] != 1)
    lost = tasks * OPS_PER_TASK - pool["counter"]
    # Each child subscribed on its own: per server, at least one feed connection per child that
    # ran a task, none of them open at the fork; and the parent's feed connections still open.
    parent_feeds, after = pool["parent_feeds"], pool["feeds_after"]
    new_feeds = {a: len({c for c in after - parent_feeds if c[0] == a}) for a in _ADDRESSES}
    feeds_missing = sum(max(0, children - n) for n in new_feeds.values())
    parent_feeds_closed = len(parent_feeds - after)
    result.figures.update({
        OPS: 3 * OPS_PER_TASK * len(rs) + pool["parent_reads"], "children": children,
        "servers": len(servers.admins), "reads_wrong": wrong, "errors": errors,
        "shared_connections": len(shared), "child_feed_connections": new_feeds,
        "child_feeds_missing": feeds_missing, "parent_feeds_closed": parent_feeds_closed,
        "increments_lost": lost, "tasks_without_hits": no_hits,
        "child_lock_renewed": locks.get("renewed") is True,
        ANOMALIES: wrong + errors + len(shared) + abs(lost) + no_hits + feeds_missing
        + parent_feeds_closed,
    })  # fmt: skip
    result.require(wrong == 0, f"{wrong} reads returned another key's value")
    result.require(errors == 0, f"{errors} operations failed in the children")
    result.require(not shared, f"children talked on the parent's Redis connections {shared}")
    result.require(lost == 0, f"{lost} atomic increments lost (or applied twice if negative)")
    result.require(no_hits == 0, f"{no_hits} tasks served no hit once inherited leases ran out")
    result.require(
        feeds_missing == 0,
        f"{children} children, but feed connections of their own "
        f"per server {new_feeds}: a child listens on the parent's (or not at all)",
    )
    result.require(
        parent_feeds_closed == 0,
        f"{parent_feeds_closed} of the parent's feed connections closed meanwhile",
    )
    expected: dict[str, Any] = {"parent_hold_seen_as_ours": False, "took_parents_lock": False,
                                "renewed": True, "new_map": 1}  # fmt: skip
    if on_map:
        expected["fenced_write"] = "fenced"
    result.require(locks == expected, f"child locks: {locks}, expected {expected}")
    result.require(parent_still_holds, "the parent lost its lock while the child ran")


@scenario("S26", "fork", faults_server=False)
def s26(env: Env, seconds: float, *, guard: bool = True, workers: int = 4, **_: Any
        ) -> ScenarioResult:  # fmt: skip
    """The pool workload (about ``seconds``) and the child-lock check; see the module."""
    result, started = timed("S26", "fork")
    name = f"s26-{uuid.uuid4().hex[:8]}"
    with env.server() as server:  # a private Redis: CLIENT LIST must be the run's own
        servers = Servers([(f"{server.host}:{server.port}", redis.Redis.from_url(server.url))])
        try:
            run_fork(result, server.url, name, servers, seconds=seconds, workers=workers,
                     guard=guard)  # fmt: skip
        finally:
            servers.close()
    return finish(result, started)
