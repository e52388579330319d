"""The process's scheduler (``schedule.py``): every map's probe and timer turns on a fixed set of
threads.  Each guard is fed the order of events it exists for, with a control that plants the
bug (or switches the guard off) and must fail."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from syncmap import forksafe, schedule
from syncmap.schedule import Scheduler, Turn
from syncmap.testing.wait import wait_until


@pytest.fixture
def scheduler() -> Iterator[Scheduler]:
    s = Scheduler()
    yield s
    for turn in list(s._turns):
        s.remove(turn, timeout=1.0)


class Recorder:
    """A turn's function: records each run's ``woken`` and returns ``every`` s from now; a run
    may be held (``hold``) until ``release``."""

    def __init__(self, every: float = math.inf) -> None:
        self.every = every
        self.runs: list[bool] = []
        self.times: list[float] = []
        self.hold = threading.Event()  # set: the next run blocks until release is set
        self.holding = threading.Event()
        self.release = threading.Event()

    def __call__(self, woken: bool) -> float:
        self.runs.append(woken)
        self.times.append(time.monotonic())
        if self.hold.is_set():
            self.hold.clear()
            self.holding.set()
            self.release.wait(10)
        return time.monotonic() + self.every


class ClearsLate(Scheduler):
    """The planted bug: a turn's wish is also cleared when the turn *ends* (as a loop that
    clears its event after the work would), so a wake made while it ran is lost."""

    def _run(self, turn: Turn, woken: bool) -> None:
        run = turn.run

        def then_clear(w: bool) -> float:
            try:
                return run(w)
            finally:
                turn.wanted = False

        turn.run = then_clear
        try:
            super()._run(turn, woken)
        finally:
            turn.run = run


@pytest.mark.parametrize("kind", [Scheduler, ClearsLate], ids=["kept", "control-cleared-late"])
def test_a_wake_while_the_turn_runs_is_kept_for_the_next_turn(kind: type[Scheduler]) -> None:
    """Order: a turn begins (its wish taken); wake() while it runs; it returns, never due by
    itself.  The wish must make it run again at once, woken."""
    scheduler, rec = kind(), Recorder()
    turn = Turn(rec, "t")
    rec.hold.set()
    scheduler.add(turn, time.monotonic())
    try:
        assert rec.holding.wait(5)
        scheduler.wake(turn)
        rec.release.set()
        if kind is Scheduler:
            wait_until(lambda: len(rec.runs) == 2, 5, "the woken turn")
            assert rec.runs == [False, True]
        else:
            with pytest.raises(AssertionError):
                wait_until(lambda: len(rec.runs) == 2, 0.5, "the woken turn")
    finally:
        scheduler.remove(turn)


def test_a_wake_before_add_makes_the_first_turn_woken_and_due(scheduler: Scheduler) -> None:
    rec = Recorder()
    turn = Turn(rec, "t")
    scheduler.wake(turn)  # e.g. the feed came up while the map was still starting
    scheduler.add(turn, math.inf)
    wait_until(lambda: rec.runs, 5, "the first turn")
    assert rec.runs == [True]


def test_a_wish_answered_before_add_is_not_kept_and_a_later_one_is(scheduler: Scheduler) -> None:
    """A map's start: the feed comes up and wakes the probe; the baseline probe is sent
    (``answered``); then the turn is registered.  Its first turn must not come at once (it
    would race the caller's first write); a wish made after ``answered`` is kept.  The fence:
    a timer turn added later and due now; the clock runs due turns in order of due time, so a
    first turn due at once would have run before it."""
    rec, fence = Recorder(), Recorder()
    turn = Turn(rec, "t")
    scheduler.wake(turn)
    scheduler.answered(turn)
    scheduler.add(turn, math.inf)
    scheduler.add(Turn(fence, "fence"), time.monotonic())
    wait_until(lambda: fence.runs, 5, "the fence")
    assert rec.runs == []
    scheduler.wake(turn)
    wait_until(lambda: rec.runs, 5, "the woken turn")
    assert rec.runs == [True]


def test_a_removed_turn_is_waited_for_and_never_runs_again(scheduler: Scheduler) -> None:
    rec = Recorder(every=0.0)  # due again at once, every time
    turn = Turn(rec, "t", patience=0.01)
    rec.hold.set()
    scheduler.add(turn, time.monotonic())
    assert rec.holding.wait(5)
    threading.Timer(0.05, rec.release.set).start()
    scheduler.remove(turn)  # returns once the held run has returned
    runs = len(rec.runs)
    scheduler.wake(turn)
    assert rec.release.is_set() and len(rec.runs) == runs
    wait_until(lambda: not scheduler._turns and scheduler._clock is None, 5, "the clock's end")


@pytest.mark.parametrize("spares", [schedule.SPARES, 0], ids=["spares", "control-no-spares"])
def test_a_stalled_probe_does_not_hold_another_maps_probes_back(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, spares: int
) -> None:
    """One probe turn stalls (a hung socket) on the probe thread; another map's probe turn, due
    every 20 ms, must go on at its pace on a spare.  The control allows no spare: it waits."""
    monkeypatch.setattr(schedule, "SPARES", spares)
    stalled, steady = Recorder(), Recorder(every=0.02)
    stalled.hold.set()
    scheduler.add(Turn(stalled, "stalled", patience=0.005), time.monotonic())
    assert stalled.holding.wait(5)
    scheduler.add(Turn(steady, "steady", patience=0.005), time.monotonic())
    try:
        if spares:
            wait_until(lambda: len(steady.runs) >= 10, 5, "ten probes of the other map")
        else:
            with pytest.raises(AssertionError):
                wait_until(lambda: len(steady.runs) >= 1, 0.5, "a probe of the other map")
    finally:
        stalled.release.set()
    gaps = [b - a for a, b in zip(steady.times, steady.times[1:], strict=False)]
    assert not spares or max(gaps) < 1.0


@pytest.mark.parametrize("patience", [None, 0.005], ids=["timer", "control-timer-as-probe"])
def test_a_stalled_probe_never_delays_a_timer_turn(
    scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch, patience: float | None
) -> None:
    """Timer turns run on the clock, never behind a probe: with the probe thread stalled (and
    no spare to take over), a timer turn due every 10 ms still runs.  The control hands that
    turn to the probe threads as if it were a probe: it waits behind the stall."""
    monkeypatch.setattr(schedule, "SPARES", 0)
    stalled, timer = Recorder(), Recorder(every=0.01)
    stalled.hold.set()
    scheduler.add(Turn(stalled, "stalled", patience=0.005), time.monotonic())
    assert stalled.holding.wait(5)
    scheduler.add(Turn(timer, "timer", patience=patience), time.monotonic())
    try:
        if patience is None:
            wait_until(lambda: len(timer.runs) >= 10, 5, "ten timer turns")
        else:
            with pytest.raises(AssertionError):
                wait_until(lambda: len(timer.runs) >= 1, 0.5, "a timer turn")
    finally:
        stalled.release.set()


def test_many_turns_run_on_one_clock_and_one_probe_thread(scheduler: Scheduler) -> None:
    before = set(threading.enumerate())
    probes = [Recorder(every=0.01) for _ in range(20)]
    timers = [Recorder(every=0.01) for _ in range(20)]
    for i in range(20):
        scheduler.add(Turn(probes[i], f"p{i}", patience=0.5), time.monotonic())
        scheduler.add(Turn(timers[i], f"t{i}"), time.monotonic())
    every = probes + timers
    wait_until(lambda: all(len(r.runs) >= 5 for r in every), 10, "every turn, five times")
    started = sorted(t.name for t in set(threading.enumerate()) - before)
    assert started == ["syncmap-probe", "syncmap-timer"]
    for rec in probes:  # each on a probe thread, every timer turn on the clock
        assert rec.runs
    for turn in list(scheduler._turns):
        scheduler.remove(turn)
    wait_until(lambda: scheduler._clock is None and scheduler._prober is None, 5, "the end")


@pytest.mark.parametrize("guard", [True, False], ids=["reset", "control-inherited"])
def test_a_child_forked_while_a_parent_thread_holds_the_lock_can_use_the_scheduler(
    guard: bool,
) -> None:
    """The parent's thread holds the scheduler's lock at the fork (as its clock does for a
    moment every turn).  The child, with ``forksafe`` switched off (the fork scenarios' guard-off
    controls), must still get a scheduler of its own: add, wake, remove, no hang.  The control
    leaves this scheduler out of the at-fork reset: the child hangs on the inherited lock."""
    s = Scheduler()
    if not guard:
        schedule._schedulers.discard(s)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with s._lock:
            held.set()
            release.wait()

    t = threading.Thread(target=hold)
    t.start()
    held.wait()
    forksafe.enabled = False
    try:
        pid = os.fork()
        if pid == 0:  # the child: use the scheduler (hangs on an inherited held lock), leave
            code = 1
            try:
                rec = Recorder()
                turn = Turn(rec, "child", patience=0.01)
                s.wake(turn)
                s.add(turn, math.inf)
                deadline = time.monotonic() + 2
                while not rec.runs and time.monotonic() < deadline:
                    time.sleep(0.001)
                s.remove(turn)
                code = 0 if rec.runs == [True] else 3
            finally:
                os._exit(code)
    finally:
        forksafe.enabled = True
        release.set()
        t.join()
    deadline = time.monotonic() + 3
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a child's exit, bounded
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    finished = done[0] != 0 and os.waitstatus_to_exitcode(done[1]) == 0
    assert finished is guard, (
        "the child hung on (or failed with) the parent's scheduler"
        if guard
        else "control passed: the test cannot fail"
    )
