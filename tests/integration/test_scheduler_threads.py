"""Idle cost per process independent of the number of maps (issue 16 goal 1): a process's maps
share one ``syncmap-scheduler`` thread and a bounded pool of ``syncmap-probe`` workers instead of
two threads each (``src/syncmap/scheduler.py``).

Control: the thread-count test fails on the code before the scheduler (each map started a
``syncmap-probe`` and a ``syncmap-timer`` thread: 10 maps counted 18 more threads than 1).
"""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

from syncmap import SyncMap


def _threads() -> list[str]:
    """The process's threads but the probe pool's workers (started on demand, at most
    ``scheduler.WORKERS`` whatever the number of maps: checked separately)."""
    return sorted(t.name for t in threading.enumerate() if t.name != "syncmap-probe")


def _workers() -> int:
    return sum(t.name == "syncmap-probe" for t in threading.enumerate())


def test_ten_maps_run_on_the_threads_of_one(shared_redis_url: str) -> None:
    with ExitStack() as stack:
        maps = [stack.enter_context(SyncMap("threads0", shared_redis_url))]
        maps[0]["k"] = 0
        assert maps[0]["k"] == 0
        one = _threads()
        for i in range(1, 10):
            m = stack.enter_context(SyncMap(f"threads{i}", shared_redis_url))
            m["k"] = i
            assert m["k"] == i
            maps.append(m)
        ten = _threads()
        assert ten == one, f"1 map: {len(one)} threads {one}; 10 maps: {len(ten)} {ten}"
        from syncmap import scheduler  # after the control's assertion: new in this change

        assert one.count("syncmap-scheduler") == 1
        assert _workers() <= scheduler.WORKERS
        sched = scheduler.get()
        tasks = [t for m in maps for t in m._engine._tasks]
        assert len(tasks) == 20 and all(t in sched.tasks for t in tasks)
        for m in maps[:5]:
            m.close()
        # close() takes the map's duties off the scheduler before it returns
        assert not any(t in sched.tasks for m in maps[:5] for t in tasks[:10])
        assert all(t in sched.tasks for t in tasks[10:])
    assert not any(t in sched.tasks for t in tasks)
    assert sched.thread.is_alive()  # the process's thread stays for the next map


def test_a_forked_child_starts_its_own_scheduler(shared_redis_url: str) -> None:
    """The parent's scheduler thread does not exist in a child; the child's first map starts
    a new one (and never registers with the parent's, which would never run its duties)."""
    from syncmap import scheduler

    with SyncMap("forked", shared_redis_url) as m:
        m["k"] = 1
        parent = scheduler.get()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it finds on the pipe, then leave at once
            os.close(read)
            try:
                assert m["k"] == 1  # the inherited map restarts: its duties go to a new one
                child = scheduler.get()
                names = [t.name for t in threading.enumerate()]
                ok = (
                    child is not parent
                    and child.thread.is_alive()
                    and names.count("syncmap-scheduler") == 1
                    and all(t.scheduler is child for t in m._engine._tasks)
                    and len(m._engine._tasks) == 2
                )
                os.write(write, b"ok" if ok else repr(names).encode())
            except BaseException as exc:
                os.write(write, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            said = f.read()
        os.waitpid(pid, 0)
        assert said == b"ok", said
