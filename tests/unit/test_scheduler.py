"""The process's scheduler (``syncmap/scheduler.py``): one map's slow round trip does not hold
back another map's duties.  No store: the duties are stand-ins that block on, or set, events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from syncmap import scheduler


def _blocking_turn(entered: threading.Event, release: threading.Event) -> Callable[[], float]:
    def job() -> float:
        entered.set()
        release.wait(10)
        return float("inf")

    return job


@pytest.mark.parametrize("workers", [scheduler.WORKERS, 1], ids=["pool", "control-one-worker"])
def test_a_hung_round_trip_delays_the_others_by_at_most_grow_after(
    workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Map A's probe hangs on a worker; map B's timer (on the scheduler thread) still runs at
    once and B's probe gets a second worker after GROW_AFTER.  Control: a pool of one worker
    leaves B's probe queued behind A's for as long as A hangs."""
    monkeypatch.setattr(scheduler, "WORKERS", workers)
    s = scheduler.Scheduler()
    entered, release = threading.Event(), threading.Event()
    timer_ran, probe_ran = threading.Event(), threading.Event()
    try:
        a = s.add("A probe", lambda: _blocking_turn(entered, release))
        assert entered.wait(5)
        s.add("B timer", lambda: (timer_ran.set(), float("inf"))[1])
        t0 = time.monotonic()
        b = s.add("B probe", lambda: lambda: (probe_ran.set(), float("inf"))[1])
        assert timer_ran.wait(5), "an in-memory duty waited for another map's round trip"
        if workers > 1:
            assert probe_ran.wait(5)
            assert time.monotonic() - t0 < 5 * scheduler.GROW_AFTER + 1.0
            assert s.workers == 2  # grown by one, not to the limit
        else:  # the control: nothing else can run B's round trip
            assert not probe_ran.wait(3 * scheduler.GROW_AFTER)
        release.set()
        assert probe_ran.wait(5)
        a.cancel()
        b.cancel()
        assert not a.running and not b.running and not s.tasks[1:]
    finally:
        release.set()


def test_a_wake_during_a_turn_runs_the_step_again_after_it() -> None:
    """No wake-up is lost: a wake() while the turn runs makes it due as soon as it ends."""
    s = scheduler.Scheduler()
    inside, go, again = threading.Event(), threading.Event(), threading.Event()
    calls = []

    def step() -> float:
        calls.append(time.monotonic())
        if len(calls) == 1:
            inside.set()
            go.wait(5)
        else:
            again.set()
        return float("inf")  # never due again unless woken

    task = s.add("t", step)
    assert inside.wait(5)
    task.wake()
    go.set()
    assert again.wait(5) and len(calls) == 2
    task.cancel()
    task.wake()  # after cancel: ignored
    assert task not in s.tasks
