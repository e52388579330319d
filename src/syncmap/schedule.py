"""Every open map's probe and timer turns on a fixed set of threads per process (issue 16).

A map's engine (thread driver, ``engine.py``) used to start two threads of its own; now it
registers two :class:`Turn` objects with the process's :class:`Scheduler` when it starts and
removes them when it closes.  A turn is a function ``run(woken) -> next due time`` (monotonic);
``woken`` says whether :meth:`Scheduler.wake` asked for it since its last turn began.  Threads,
however many maps are open (none once the last one closed):

* ``syncmap-timer``, the clock: sleeps until the earliest due turn, runs the *timer* turns
  itself and hands the *probe* turns to the probe threads.  Timer turns do no I/O (a near
  cache's tick or one sweep chunk under its map's guard, which nobody holds across I/O or user
  code), and the clock never runs a probe: a hung probe (a stalled socket, a Cluster master
  waited for ``probe_deadline``) cannot keep any map's expired lease alive.
* ``syncmap-probe``: runs handed-over probe turns, oldest due first.
* ``syncmap-probe-spare``, at most :data:`SPARES` at once: when a handed-over probe turn has
  waited its ``patience`` (a quarter of its map's probe interval) because every probe thread is
  inside a turn, the clock starts a spare, which takes waiting turns until none is left, then
  ends.  So one map's slow probe does not hold the other maps' probes back.  Past ``SPARES``
  probes stalled at once, a waiting probe is late: its map's leases may lapse, and its reads
  then go to the store (never stale) until a probe thread is free again.  One map's turns never
  overlap: its next turn is scheduled only when the last one returned, as its own thread did.

Wake-ups are never lost.  ``wake`` sets the turn's wish under the scheduler's lock; a turn about
to begin takes the wish (its ``woken``) under the same lock, so a wish made after that, while the
turn runs, makes the turn due again at once when it returns.  A wish for a turn that is not
registered yet is kept for its first turn; one for a turn removed (its map closed) or inherited
from a parent process is ignored.

The scheduler's lock is a leaf: nothing else is acquired, no I/O done and no turn run while it is
held, so ``wake`` from a feed or user thread (possibly holding its map's guard) never waits long.

Fork (gunicorn ``--preload``, Celery): only the forking thread exists in the child, and a parent
thread may have held the scheduler's lock at the fork.  So in every child, before ``fork()``
returns, every scheduler drops what it had (fresh lock and conditions, no turns, no threads),
registered with ``os.register_at_fork`` here, *not* through ``forksafe``: its test-only switch
(``forksafe.enabled = False``, the fork scenarios' guard-off controls) must leave the maps'
state as inherited, which is what those controls test, but must never leave a child blocked on
a lock a parent thread held.  The child's maps register again when they restart there
(``Engine.restart``); a map that does not restart (the switch off) has its wakes dropped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("syncmap")

SPARES = 8
"""Probe threads at most beyond ``syncmap-probe``, each alive only while probe turns wait for a
thread (module docstring): the process's thread count stays bounded whatever hangs."""
RETRY_AFTER = 0.1
"""Seconds until a turn that raised runs again (the engine's turns catch their own errors and
report them on the map's next call; this only keeps a bug from stopping every map's turns)."""
IDLE_WAIT = 60.0
"""The clock's longest sleep when nothing is due (any change of the schedule wakes it)."""

SLEEPING, READY, RUNNING = "sleeping", "ready", "running"


@dataclass(eq=False, slots=True)
class Turn:
    """One map's recurring background work.  ``patience`` None: a timer turn (the clock runs
    it); else a probe turn, which a spare takes once it waited that long (seconds) for a probe
    thread.  The fields below ``name`` are the scheduler's, read and written under its lock."""

    run: Callable[[bool], float]
    name: str
    patience: float | None = None
    state: str = SLEEPING
    due: float = 0.0
    stamp: int = 0  # the heap entry that is current (older ones are skipped)
    wanted: bool = False
    ready_at: float = 0.0
    thread: threading.Thread | None = field(default=None, repr=False)


class Scheduler:
    """The process's clock and probe threads for every registered turn (module docstring)."""

    def __init__(self) -> None:
        self._reset()
        _schedulers.add(self)

    def _reset(self) -> None:
        """Empty, with fresh locks: at creation, and in a forked child (:func:`_in_child`)."""
        self._lock = threading.Lock()
        self._clock_cv = threading.Condition(self._lock)  # the clock's sleep
        self._probe_cv = threading.Condition(self._lock)  # idle probe threads
        self._done_cv = threading.Condition(self._lock)  # remove() waiting for a turn to end
        self._turns: set[Turn] = set()
        self._probe_turns = 0
        self._heap: list[tuple[float, int, Turn]] = []
        self._ready: deque[Turn] = deque()
        self._stamps = itertools.count(1)
        self._clock: threading.Thread | None = None
        self._prober: threading.Thread | None = None
        self._spares = 0

    # ---- what engines call -----------------------------------------------------------------

    def add(self, turn: Turn, due: float) -> None:
        """Register ``turn``, first due at ``due`` (now if woken before); starts the threads it
        needs.  A turn is registered once: an engine makes a new one to register again."""
        with self._lock:  # threads first: if one cannot start, nothing was registered
            if self._clock is None:
                self._clock = self._start(self._clock_loop, "syncmap-timer")
            if turn.patience is not None and self._prober is None:
                self._prober = self._start(self._probe_loop, "syncmap-probe", False)
            self._turns.add(turn)
            self._probe_turns += turn.patience is not None
            self._push(turn, time.monotonic() if turn.wanted else due)

    def wake(self, turn: Turn) -> None:
        """Make ``turn`` due now, or, while it waits for a thread or runs, ``woken`` for the
        turn that begins next (module docstring).  Before ``add``, the wish makes its first
        turn due at once; after ``remove`` (or in a forked child), it is ignored."""
        with self._lock:
            turn.wanted = True
            now = time.monotonic()
            if turn in self._turns and turn.state is SLEEPING and turn.due > now:
                self._push(turn, now)

    def answered(self, turn: Turn) -> None:
        """``turn``'s work is being done now outside the scheduler (a map's baseline probe, about
        to be sent): the wishes made before answered, one made from now on kept."""
        with self._lock:
            turn.wanted = False

    def remove(self, turn: Turn, timeout: float = 5.0) -> None:
        """Unregister ``turn``; if it is running on another thread, wait for it to return (at
        most ``timeout`` s: a probe stalled on a socket is left to end by itself, and then is
        not scheduled again).  Threads with nothing left to run end."""
        with self._lock:
            if turn not in self._turns:
                return
            self._turns.discard(turn)
            self._probe_turns -= turn.patience is not None
            if turn.state is READY:
                self._ready.remove(turn)
                turn.state = SLEEPING
            self._clock_cv.notify()
            self._probe_cv.notify_all()
            if turn.thread is not threading.current_thread():
                self._done_cv.wait_for(lambda: turn.state is not RUNNING, timeout)

    # ---- bookkeeping, under the lock -------------------------------------------------------

    def _push(self, turn: Turn, due: float) -> None:
        turn.state, turn.due, turn.stamp = SLEEPING, due, next(self._stamps)
        heap = self._heap
        if len(heap) > 2 * len(self._turns) + 16:  # entries left behind by wakes: drop them
            heap[:] = [e for e in heap if e[2].stamp == e[1] and e[2] in self._turns]
            heapq.heapify(heap)
        heapq.heappush(heap, (due, turn.stamp, turn))
        if heap[0][2] is turn:
            self._clock_cv.notify()

    def _start(self, target: Callable[..., None], name: str, *args: object) -> threading.Thread:
        # Under the lock: start() returns once the thread runs, before it asks for the lock.
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        thread.start()
        return thread

    def _start_spare(self) -> None:
        try:
            self._start(self._probe_loop, "syncmap-probe-spare", True)
        except RuntimeError as exc:  # "can't start new thread": the turn waits for a thread
            log.warning("syncmap could not start a spare probe thread (%s)", exc)
        else:
            self._spares += 1

    def _begin(self, turn: Turn) -> tuple[Turn, bool]:
        """``turn`` runs now on this thread: take its wish (a later one waits for the next)."""
        woken, turn.wanted = turn.wanted, False
        turn.state, turn.thread = RUNNING, threading.current_thread()
        return turn, woken

    def _run(self, turn: Turn, woken: bool) -> None:
        """Run ``turn`` outside the lock, then schedule its next turn (due now if woken since)."""
        due = time.monotonic() + RETRY_AFTER
        try:
            due = turn.run(woken)
        except Exception:  # a bug in a turn: logged, and it runs again; the others go on
            log.exception("syncmap: a background turn of %s failed", turn.name)
        finally:
            with self._lock:
                turn.thread = None
                if turn in self._turns:
                    self._push(turn, time.monotonic() if turn.wanted else due)
                else:
                    turn.state = SLEEPING
                self._done_cv.notify_all()

    # ---- the threads -----------------------------------------------------------------------

    def _clock_loop(self) -> None:
        try:
            while (begun := self._next_timer_turn()) is not None:
                self._run(*begun)
        finally:  # ended by an exception (BaseException past _run): the next add starts one
            with self._lock:
                if self._clock is threading.current_thread():
                    self._clock = None

    def _next_timer_turn(self) -> tuple[Turn, bool] | None:
        """Sleep until a timer turn is due and begin it; meanwhile hand due probe turns over and
        start a spare where one waited its patience.  None: nothing registered (the clock ends;
        the next ``add`` starts another)."""
        with self._lock:
            while self._turns:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, stamp, turn = heapq.heappop(self._heap)
                    if stamp != turn.stamp or turn not in self._turns:
                        continue  # superseded by a wake, or removed
                    if turn.patience is None:
                        return self._begin(turn)
                    turn.state, turn.ready_at = READY, now
                    self._ready.append(turn)
                    self._probe_cv.notify()
                until = min(self._heap[0][0], now + IDLE_WAIT) if self._heap else now + IDLE_WAIT
                if self._ready and self._spares < SPARES:
                    first = self._ready[0]
                    late = first.ready_at + (first.patience or 0.0)
                    if late <= now:
                        first.ready_at = now  # at most one more spare per patience for it
                        self._start_spare()
                        late = now + (first.patience or 0.0)
                    until = min(until, late)
                self._clock_cv.wait(until - now)
            self._clock = None
            return None

    def _probe_loop(self, spare: bool) -> None:
        ended = False
        try:
            while (begun := self._next_probe_turn(spare)) is not None:
                self._run(*begun)
            ended = True
        finally:  # ended by an exception: as _next_probe_turn does when a thread ends
            if not ended:
                with self._lock:
                    if spare:
                        self._spares -= 1
                    elif self._prober is threading.current_thread():
                        self._prober = None

    def _next_probe_turn(self, spare: bool) -> tuple[Turn, bool] | None:
        """The oldest probe turn waiting for a thread, begun.  None: this thread ends (a spare
        when none waits; ``syncmap-probe`` when no probe turn is registered)."""
        with self._lock:
            while not self._ready:
                if spare:
                    self._spares -= 1
                    return None
                if not self._probe_turns:
                    self._prober = None
                    return None
                self._probe_cv.wait()
            return self._begin(self._ready.popleft())


_schedulers: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def _in_child() -> None:
    """A forked child: every scheduler forgets the parent's turns, threads and locks (module
    docstring; deliberately outside ``forksafe.enabled``)."""
    for scheduler in list(_schedulers):
        scheduler._reset()


os.register_at_fork(after_in_child=_in_child)

shared = Scheduler()
"""The process's scheduler, which every thread-driver map's engine registers with."""


def process() -> Scheduler:
    """The scheduler a new engine uses: :data:`shared` (a test's control may give each map one
    of its own, to show what the sharing saves)."""
    return shared
