"""The loop guard every asyncio test runs under (tests/conftest.py ``loop_guard``,
``syncmap.testing.loopguard``): it catches syncmap code that blocks the loop, and only that.

These are its guard-off controls: each plants a blocking call and checks what the guard makes of
it, then ``clear()``s so the test itself passes."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from syncmap.aio.events import AsyncFanout
from syncmap.core.nearcache import Event
from syncmap.testing import loopguard

BLOCK = 4 * loopguard.SLOW_CALLBACK  # well past the threshold, however loaded the machine


async def _until_seen(log: loopguard.SlowCallbackLog) -> None:
    deadline = time.monotonic() + 2
    while not log.all() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


async def test_a_syncmap_task_that_blocks_fails_the_guard(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    fanout = AsyncFanout("control")  # its callbacks run in the syncmap-events task
    fanout.subscribe(lambda _event: time.sleep(BLOCK), inline=False)
    fanout.emit(Event(b"k", "set", 1, "here"))
    await _until_seen(loop_guard)
    await fanout.stop()
    assert any("syncmap-events" in text for text in loop_guard.syncmap()), loop_guard.all()
    with pytest.raises(AssertionError, match="syncmap code blocked the event loop"):
        loop_guard.check()
    loop_guard.clear()


async def test_a_syncmap_callback_that_blocks_fails_the_guard(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    """A plain callback's repr names only its qualified name: a syncmap class's method counts."""
    fanout = AsyncFanout("control")
    fanout.subscribe(lambda _event: time.sleep(BLOCK), inline=True)
    asyncio.get_running_loop().call_soon(fanout.emit, Event(b"k", "set", 1, "here"))
    await _until_seen(loop_guard)
    assert any("AsyncFanout.emit" in text for text in loop_guard.syncmap()), loop_guard.all()
    loop_guard.clear()


async def test_the_tests_own_blocking_step_does_not_count(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    await asyncio.sleep(0)
    time.sleep(BLOCK)  # this test's task, not syncmap's (a loaded machine preempts tests too)
    await asyncio.sleep(0)
    await _until_seen(loop_guard)
    assert loop_guard.all() and not loop_guard.syncmap(), loop_guard.all()


def test_a_sync_test_runs_without_the_guard(request: pytest.FixtureRequest) -> None:
    assert "loop_guard" not in request.fixturenames


# ---- GC passes and GIL waits: another thread's CPU time is excused, nothing else -----------


def _ballast() -> tuple[list[list[object]], float]:
    """Objects that make a full collection take 2x the threshold at least (its references are
    what a pass traverses: ~7 ms per million here), and how long one took."""
    shared: list[object] = []
    ballast: list[list[object]] = []
    took = 0.0
    while took < 2 * loopguard.SLOW_CALLBACK and len(ballast) < 200_000:
        ballast += [[shared] * 1000 for _ in range(5000)]
        started = time.perf_counter()
        gc.collect()
        took = time.perf_counter() - started
    assert took >= 2 * loopguard.SLOW_CALLBACK, f"a full collection took only {took:.3f} s"
    return ballast, took


def _run_queue_wait() -> float:
    """Seconds the calling thread has waited on the run queue (Linux; 0.0 elsewhere)."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


PREEMPTED = 0.005  # more run-queue wait than this during ``runs``: the attempt says nothing
ATTEMPTS = 5


async def _step_while_another_thread(runs: Callable[[], object]) -> float:
    """A syncmap task whose one step lasts exactly as long as ``runs`` on another thread: the
    step spins (wanting the GIL) until that thread is done.  Returns how long that thread
    waited on the run queue meanwhile: a GIL holder the machine's load took off the CPU holds
    the GIL without using CPU, which the guard cannot tell from blocking (loopguard.py)."""
    started, done = threading.Event(), threading.Event()
    waited = [0.0]

    def other() -> None:
        started.wait(10)
        before = _run_queue_wait()
        try:
            runs()
        finally:
            waited[0] = _run_queue_wait() - before
            done.set()

    async def spin() -> None:
        started.set()
        while not done.is_set():  # holds the loop, runnable whenever it has the GIL
            pass

    thread = threading.Thread(target=other)
    thread.start()
    await asyncio.get_running_loop().create_task(spin(), name="syncmap-control")
    thread.join(10)
    return waited[0]


async def _excused(loop_guard: loopguard.SlowCallbackLog, runs: Callable[[], object]) -> None:
    """``runs`` on another thread is not reported, in an attempt where that thread was not
    taken off the CPU (at most :data:`ATTEMPTS`; none such fails the test: the machine is too
    loaded to check this)."""
    waits = []
    for _ in range(ATTEMPTS):
        loop_guard.clear()
        waits.append(await _step_while_another_thread(runs))
        if waits[-1] <= PREEMPTED:
            assert any("syncmap-control" in t for t in loop_guard.all()), loop_guard.all()
            assert not loop_guard.syncmap(), loop_guard.syncmap()
            return
    pytest.fail(f"the other thread was preempted in every attempt (run-queue waits {waits})")


async def test_another_threads_gc_pass_is_not_blocking(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    """A full collection on another thread (a sync map's, the caller's) holds the GIL all
    through; the loop's thread waits, not runnable, but blocked nothing: not counted.  Failed
    before the guard timed GC passes (test_drivers.py's Cluster cases, one run in two)."""
    ballast, _took = _ballast()
    await _excused(loop_guard, gc.collect)
    del ballast


async def test_another_threads_long_c_step_is_not_blocking(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    """Another thread's long C call on the CPU (one ``sum`` over a range holds the GIL from
    start to end, like hiredis parsing a large reply) is not the loop's fault either: failed
    once in a full CI run while only GC passes were excused (a 141 ms step)."""
    n = 1_000_000
    while True:  # sized to last 2x the threshold at least on this machine
        started = time.perf_counter()
        sum(range(n))
        if time.perf_counter() - started >= 2 * loopguard.SLOW_CALLBACK:
            break
        n *= 2
    await _excused(loop_guard, lambda: sum(range(n)))


async def test_control_another_thread_holding_the_gil_otherwise_still_counts(
    loop_guard: loopguard.SlowCallbackLog,
) -> None:
    """Only other threads' CPU time is excused: a C call that holds the GIL as long while
    using no CPU (libc ``usleep`` through a PyDLL) still blocks the loop's step and is
    reported."""
    usleep: Any = ctypes.PyDLL(None).usleep
    usleep.argtypes = [ctypes.c_uint]
    await _step_while_another_thread(lambda: usleep(round(BLOCK * 1e6)))
    assert any("syncmap-control" in t for t in loop_guard.syncmap()), loop_guard.all()
    loop_guard.clear()
