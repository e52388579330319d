"""S26 ``fork``: maps and locks made before ``fork()`` work in the child as if opened there.

Each test has a guard-off control (``forksafe.enabled = False``: the child inherits sockets,
registries and holds as they are) that must fail the same checks, so the tests can fail.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from syncmap import Lock, SyncMap, forksafe
from syncmap.config import MapConfig
from syncmap.errors import LockNotAcquired, SyncMapError

KEYS = [f"k{i}" for i in range(40)]
OPS = 150
WORKERS = 4
TASKS = 8
STALENESS = 0.2
_MAP: SyncMap | None = None  # module-level, as a pre-fork server's app module has it


@pytest.fixture
def guard(request: pytest.FixtureRequest) -> Iterator[bool]:
    forksafe.enabled = request.param
    try:
        yield request.param
    finally:
        forksafe.enabled = True


def _work(task: int) -> dict[str, Any]:
    """One pool task: reads checked against the key they name, writes, atomic increments."""
    m = _MAP
    assert m is not None
    # First, before anything else: which Redis connection does the child talk on?
    client_id = int(m._store.call([("CLIENT", "ID")], write=False)[0])
    wrong = errors = 0
    for j in range(OPS):
        key = KEYS[(task * 7 + j) % len(KEYS)]
        try:
            value = m.get(key)
            if value != {"k": key}:
                wrong += 1
            m.set(f"w{task}", {"k": f"w{task}", "n": j})
            m.transform("counter", lambda n: n + 1, 0)
        except SyncMapError:
            errors += 1
    # Outlive the leases inherited from the parent: only the child's own probes keep it serving.
    threading.Event().wait(3 * STALENESS)
    try:
        m.get("k0")
        before = m.statistics().hits
        m.get("k0")
        hit = m.statistics().hits - before
    except SyncMapError:
        hit, errors = 0, errors + 1
    return {"wrong": wrong, "errors": errors, "hit": hit, "pid": os.getpid(), "id": client_id}


def _client_ids(admin: redis.Redis) -> set[int]:
    return {int(c["id"]) for c in admin.client_list()}


def _run_pool(url: str) -> tuple[list[dict[str, Any]], int, int, int, set[int]]:
    """Warm a module-level map in the parent, fork a pool, read in the parent meanwhile.

    Returns the tasks' results, the parent's wrong reads and reads, the final counter, and the
    ids of every Redis connection that existed when the children were forked."""
    global _MAP
    config = MapConfig(socket_timeout=0.5, self_check_timeout=2.0, max_staleness=STALENESS)
    _MAP = m = SyncMap("forked", url, config=config)
    admin = redis.Redis.from_url(url)
    try:
        m.update({k: {"k": k} for k in KEYS})
        for k in KEYS:
            assert m[k] == {"k": k}  # cached in the parent: the child inherits the entries
        with Lock("forked-warm", url, lease=1.0):  # the parent's watchdog and waker exist
            pass
        stop = threading.Event()
        parent = {"wrong": 0, "reads": 0}

        def parent_reads() -> None:  # the parent keeps using its sockets during the fork
            while not stop.is_set():
                for k in KEYS[:8]:
                    try:
                        if m.get(k, consistent=True) != {"k": k}:
                            parent["wrong"] += 1
                    except SyncMapError:
                        parent["wrong"] += 1
                    parent["reads"] += 1

        reader = threading.Thread(target=parent_reads)
        reader.start()
        try:
            with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
                inherited = _client_ids(admin)  # after the forks, before any task runs
                results = pool.map(_work, range(TASKS), chunksize=1)
        finally:
            stop.set()
            reader.join()
        counter = m.get("counter", consistent=True) or 0
        return results, parent["wrong"], parent["reads"], counter, inherited
    finally:
        m.close()
        admin.close()
        _MAP = None


@pytest.mark.scenario
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "guard-off"], indirect=True)
def test_pool_children_read_and_write_their_own_keys(redis_url: str, guard: bool) -> None:
    results, parent_wrong, parent_reads, counter, inherited = _run_pool(redis_url)
    wrong = sum(r["wrong"] for r in results) + parent_wrong
    errors = sum(r["errors"] for r in results)
    shared = [r["id"] for r in results if r["id"] in inherited]
    healthy = (
        not shared
        and wrong == 0
        and errors == 0
        and counter == TASKS * OPS
        and all(r["hit"] for r in results)
    )
    if not guard:  # the control: shared sockets and missing threads must show
        assert not healthy, "guard-off control passed: the fork test cannot fail"
        return
    assert parent_reads > 0
    assert not shared, f"children talked on the parent's Redis connections {shared}"
    assert wrong == 0, f"{wrong} reads returned another key's value"
    assert errors == 0
    assert counter == TASKS * OPS, "an atomic increment was lost or applied twice"
    assert all(r["hit"] == 1 for r in results), "a child never served a hit"
    assert len({r["pid"] for r in results}) > 1


def _child_locks(url: str, held_name: str, conn: Any) -> None:
    """In the child: the parent's hold is not ours; a lock we take is renewed; a new map opens."""
    out: dict[str, Any] = {}
    held: Lock = _HELD[0]
    out["parent_hold_seen_as_ours"] = held.held
    try:
        held.acquire(timeout=0)
        out["took_parents_lock"] = True
        held.release()
    except LockNotAcquired:
        out["took_parents_lock"] = False
    mine = Lock("child-own", url, lease=0.3)
    fence = mine.acquire()
    threading.Event().wait(1.2)  # hold through four leases: only renewals keep it
    try:
        out["renewed"] = mine.fence == fence
        mine.release()
    except SyncMapError as exc:
        out["renewed"] = f"lost: {exc}"
    try:
        with SyncMap("child-new", url, config=MapConfig(self_check_timeout=2.0)) as fresh:
            fresh["x"] = 1
            out["new_map"] = fresh["x"]
    except SyncMapError as exc:
        out["new_map"] = f"failed: {exc}"
    conn.send(out)
    conn.close()


_HELD: list[Lock] = []


@pytest.mark.scenario
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "guard-off"], indirect=True)
def test_child_holds_nothing_of_the_parent_and_renews_its_own(redis_url: str, guard: bool) -> None:
    held = Lock("parent-held", redis_url, lease=5.0)
    held.acquire()
    _HELD[:] = [held]
    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_child_locks, args=(redis_url, "parent-held", theirs))
    child.start()
    try:
        assert ours.poll(30), "the child did not report"
        out = ours.recv()
        parent_still_holds = held.valid
    finally:
        child.join(10)
        held.release()
        _HELD.clear()
    expected = {"parent_hold_seen_as_ours": False, "took_parents_lock": False,
                "renewed": True, "new_map": 1}  # fmt: skip
    if not guard:
        assert out != expected, "guard-off control passed: the fork test cannot fail"
        return
    assert out == expected
    assert parent_still_holds  # untouched by the child
