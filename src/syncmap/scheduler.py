"""One thread per process for every map's periodic duties (issue 16 goal 1: idle cost per process
independent of the number of maps).

Each open map (thread driver, ``engine.Engine``) used to start two threads of its own, a probe
loop and a timer loop; ten maps were twenty threads.  Now each map registers two
:class:`Task` objects with the process's :class:`Scheduler`, which runs them from one thread,
``syncmap-scheduler``:

* a task's ``step()`` runs on the scheduler thread when the task is due (or woken by
  :meth:`Task.wake`).  It returns when it is next due, or a callable: the blocking half of the
  turn, which the scheduler hands to a worker of a small pool shared by the process
  (``syncmap-probe``) and which returns when the task is next due.  The pool starts with one
  worker; another is started (up to :data:`WORKERS`) only when a job has waited
  :data:`GROW_AFTER` in the queue, i.e. when a round trip is slow, not merely because ten
  maps' turns (their presence writes, say) came due at once: those take a millisecond each;
* a task is never run twice at once: while its turn runs (here or on a worker) it is not due,
  and a :meth:`Task.wake` meanwhile makes it due again as soon as that turn ends (no wake-up is
  lost, the same as an ``Event`` set while the old loop was busy);
* of the tasks due, the scheduler runs those of the lowest ``rank`` first, then the one due
  first.  A map's timer ranks 0 while it has a deadline to keep: a lease that lapsed while the
  process was paused is seen (and held, for revalidation) before a probe turn queued at the
  same wake-up can renew it, the order the old timer thread, which needed no round trip,
  nearly always won (test_revalidation).  A sweep's next chunk is background work (rank 1,
  due now): it goes behind the tasks already due, so a large flush starves no probe.

Why probe I/O goes to a pool and not onto the scheduler thread: a probe waits for the store, up
to ``probe_deadline`` on a Cluster and the whole ``call_timeout`` elsewhere, and a presence
write up to its own deadline.  On the scheduler thread a hung store would hold back every
other map's timer (leases lapsing, TTL expiry, sweeps) by that long: the old design kept the
timer on its own thread for exactly that reason ("a hung probe cannot keep an expired lease
alive").  The in-memory duties (a timer tick, a sweep chunk, the decision whether a probe turn
may be skipped) stay on the scheduler thread: they take the map's guard only briefly.  With
the pool bounded, :data:`WORKERS` maps whose stores all hang at once delay the others' probes
by one call deadline; their timers are never delayed.

Fork: the scheduler and its pool are the parent's threads; a forked child forgets them
(``forksafe.at_fork``) and the first map started in the child starts its own (:func:`get`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from . import forksafe

log = logging.getLogger("syncmap")

WORKERS = 4
"""At most this many ``syncmap-probe`` worker threads per process (started on demand)."""
GROW_AFTER = 0.1
"""A job queued this long (seconds) with every worker busy starts another worker: the most a
slow round trip of one map delays the others' (well inside a lease of Δ renewed every Δ/4)."""
IDLE_WAIT = 60.0
"""The scheduler thread wakes at least this often with nothing due (as the old timer loop)."""

Step = Callable[[], "float | Callable[[], float]"]


class Task:
    """One periodic duty of one map (:meth:`Scheduler.add`)."""

    def __init__(self, scheduler: Scheduler, name: str, step: Step) -> None:
        self.scheduler = scheduler
        self.name = name
        self.step = step
        self.due = 0.0  # monotonic; 0: at once
        self.running = False  # a turn runs (on the scheduler thread or a worker)
        self.runner: int | None = None  # the thread id running it
        self.kicked = False  # woken while its turn ran: due again when it ends
        self.cancelled = False
        self.rank = 0  # among tasks due, lower first (the step may change it)

    def wake(self) -> None:
        """Run this task's step now (after the turn under way, if one is)."""
        s = self.scheduler
        with s.cond:
            if self.cancelled:
                return
            if self.running:
                self.kicked = True
            else:
                self.due = 0.0
            s.cond.notify_all()

    def cancel(self, timeout: float = 5.0) -> None:
        """No more turns; wait (up to ``timeout``) for the turn under way, unless called from it."""
        s = self.scheduler
        deadline = time.monotonic() + timeout
        with s.cond:
            self.cancelled = True
            if self in s.tasks:
                s.tasks.remove(self)
            for job in [j for j in s.jobs if j[0] is self]:  # queued, not started: dropped
                s.jobs.remove(job)
                self.running = False
            s.cond.notify_all()
            while self.running and self.runner != threading.get_ident():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.cond.wait(left)


class Scheduler:
    """The process's scheduler thread and its probe workers (module docstring)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.tasks: list[Task] = []
        self.jobs: deque[tuple[Task, Callable[[], float], float]] = deque()  # (.., queued at)
        self.workers = 0
        self.grown_at = -float("inf")  # when the last worker was started
        self.idle = 0
        self.thread = threading.Thread(target=self._run, name="syncmap-scheduler", daemon=True)
        self.thread.start()

    def add(self, name: str, step: Step, due: float = 0.0, rank: int = 0) -> Task:
        task = Task(self, name, step)
        task.due, task.rank = due, rank
        with self.cond:
            self.tasks.append(task)
            self.cond.notify_all()
        return task

    def _run(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                grow = self._grow_at()
                if grow <= now:  # the oldest job waited GROW_AFTER: every worker is busy
                    self.workers += 1
                    self.grown_at = now
                    self.cond.release()
                    try:
                        self._start_worker()
                    finally:
                        self.cond.acquire()
                    continue
                ready = [t for t in self.tasks if not t.running]
                task = min(ready, key=lambda t: (t.due > now, t.rank, t.due), default=None)
                if task is None or task.due > now:  # none due: wait for the first one due
                    first = min((t.due for t in ready), default=now + IDLE_WAIT)
                    self.cond.wait(min(first - now, grow - now, IDLE_WAIT))
                    continue
                task.running, task.runner, task.kicked = True, threading.get_ident(), False
            result: float | Callable[[], float]
            try:
                result = task.step()
            except Exception:  # the steps catch their own; a bug here must not stop the others
                log.exception("syncmap scheduler: %s failed unexpectedly", task.name)
                result = time.monotonic() + 0.1
            if callable(result):
                self._submit(task, result)
            else:
                self._done(task, result)

    def _done(self, task: Task, due: float) -> None:
        with self.cond:
            task.running, task.runner = False, None
            task.due = 0.0 if task.kicked else due
            task.kicked = False
            self.cond.notify_all()  # the scheduler, and a cancel() waiting for this turn

    def _grow_at(self) -> float:
        """When to start another worker (inf: not now); callers hold ``cond``.  One at a time:
        a worker just started has not taken its job yet, so the queue is as old as before."""
        if not self.jobs or self.workers >= WORKERS or self.idle:
            return float("inf")
        return max(self.jobs[0][2], self.grown_at) + GROW_AFTER

    def _start_worker(self) -> None:
        threading.Thread(target=self._work, name="syncmap-probe", daemon=True).start()

    def _submit(self, task: Task, job: Callable[[], float]) -> None:
        with self.cond:
            task.runner = None  # handed on: a cancel() from the scheduler thread waits too
            self.jobs.append((task, job, time.monotonic()))
            self.cond.notify_all()
            if self.workers:
                return  # a busy pool grows in _run, after GROW_AFTER
            self.workers += 1
            self.grown_at = time.monotonic()
        self._start_worker()

    def _work(self) -> None:
        while True:
            with self.cond:
                self.idle += 1
                while not self.jobs:
                    self.cond.wait()
                self.idle -= 1
                task, job, _ = self.jobs.popleft()
                task.runner = threading.get_ident()
            try:
                due = job()
            except Exception:
                log.exception("syncmap scheduler: %s failed unexpectedly", task.name)
                due = time.monotonic() + 0.1
            self._done(task, due)


_scheduler: Scheduler | None = None
_lock = threading.Lock()


def get() -> Scheduler:
    """The process's scheduler, started by the first map that needs it (in a forked child too)."""
    global _scheduler
    with _lock:
        if _scheduler is None:
            _scheduler = Scheduler()
        return _scheduler


@forksafe.at_fork
def _forget() -> None:
    """In a forked child: the parent's scheduler thread and workers do not exist here, and a lock
    of theirs may be held forever; the child's first map starts a new scheduler."""
    global _scheduler, _lock
    _scheduler = None
    _lock = threading.Lock()
