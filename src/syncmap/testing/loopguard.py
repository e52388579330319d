"""Finding syncmap code that blocked an event loop, from asyncio's own debug-mode warnings.

In debug mode (``loop.set_debug(True)``) asyncio logs ``Executing <handle> took N seconds`` on the
``asyncio`` logger for every callback that ran longer than ``loop.slow_callback_duration``.  The
handle names its code: a task's repr carries its name and the file of its coroutine, a plain
callback its function and, in debug mode, where it was scheduled.  :func:`syncmap_slow_callbacks`
keeps the warnings that name syncmap's code (a file of the ``syncmap`` package, or a task named
``syncmap-...``), so a test's own slow step does not fail it, while a syncmap reader task that
blocks does.

Limit: a syncmap coroutine awaited *inside a test's task* shows as the test's task; only the
library's own tasks and callbacks (readers, subscribers, watchers, timers) are attributed.

**Preemption is not blocking.**  asyncio measures a callback in wall time.  On a loaded machine
(CI: 2 cores, several jobs) the loop's thread waits on the CPU run queue now and then, for up to
~500 ms measured here (below), inside callbacks that block nothing.  While :func:`guarding` is
on, every callback's time on the CPU and on the run queue is read from
``/proc/thread-self/schedstat`` (Linux: its first two fields) and subtracted: what is left is
time the thread was not runnable, i.e. *blocked*: a ``time.sleep``, sync socket I/O, a lock or
event wait (also a wait for the GIL held by another thread, which :func:`guarding` keeps short).
That is what the rules for asyncio code forbid.  A CPU-heavy step (a GC pass, debug mode's own
bookkeeping) is not counted.  Off Linux nothing is subtracted and the wall time counts.

**Nor is another thread holding the GIL.**  A full (generation 2) collection holds the GIL from
start to end: 25-70 ms here in a test process (~70,000 tracked objects), and other long steps of
other threads (a sync map's bulk decode, hiredis parsing a large reply) hold it for a whole switch
interval or more.  While they do, the loop's thread waits for the GIL, not runnable, so the time
looks blocked although the callback did nothing wrong.  Timing only the GC passes (``gc.callbacks``)
failed test_drivers.py's Cluster cases about one run in two before, and still once in a full CI
run afterwards (a 141 ms step late in the suite, with a dozen earlier tests' threads alive).  So
the CPU time every *other* thread of the process used during a callback (process CPU time less
this thread's) is subtracted as well, up to what is left: the callback may have waited for them.
The cost: a callback that waits on a lock held by a CPU-busy thread is excused too.  A
``time.sleep`` or a stalled socket, which is what the guard exists for, is not: nothing else
runs meanwhile (the control in test_drivers.py keeps it honest).  The GC passes of other threads
are still timed too (``gc.callbacks``), in wall time, and the larger of the two is excused: a
collecting thread that the machine's load takes off the CPU keeps the GIL all the same, so its
CPU time alone fell short (a 221 ms step of test_loop_guard.py's GC case under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import syncmap

SLOW_CALLBACK = 0.020
"""Seconds a syncmap callback may be *blocked* (wall time less CPU and run-queue time) before
the asyncio tests fail.  Measured on the 2-core dev machine with ``yes > /dev/null`` busy on one
core while tests/aio, test_alocks.py, test_afeeds.py, test_aredis_feeds.py and
test_fastapi_example.py ran (``$SYNCMAP_LOOPGUARD_LOG``, three runs, every callback over 5 ms
of wall time):

* wall time, the old measure: syncmap's callbacks up to 105-485 ms, others' up to 305 ms (p99
  23-116 ms), none of it blocking.  No wall-time threshold of a few ms holds there (at 5 ms the
  guard failed 20-30 tests per run);
* blocked time: syncmap's callbacks at most 2.8 ms (p99 2.0 ms, 135 samples); anyone's at most
  9 ms (a redis-py send, a test step), besides the tests' deliberate ``time.sleep``.

20 ms is twice the largest incidental blocked time seen anywhere and 7x syncmap's, and a
``time.sleep`` of 4x it (the controls) is blocked time all through.  A syncmap step that does a
sync round trip to a local Redis (~0.1-1 ms) can slip under it: the guard catches sleeps, stalls
and slow servers, not every single fast sync call."""
_PACKAGE = os.path.dirname(syncmap.__file__)
_TESTING = os.path.join(_PACKAGE, "testing") + os.sep
_TOOK = re.compile(r" took (\d+(?:\.\d+)?) seconds")
_CALLBACK = re.compile(r"<(?:Timer)?Handle (?:when=\S+ )?([\w.<>]+)\(")


def guard(loop: asyncio.AbstractEventLoop, threshold: float = SLOW_CALLBACK) -> None:
    """Debug mode on ``loop``, with ``threshold`` as its slow-callback duration."""
    loop.set_debug(True)
    loop.slow_callback_duration = threshold


def syncmap_slow_callbacks(records: Iterable[logging.LogRecord]) -> list[str]:
    """The slow-callback warnings among ``records`` that name syncmap code."""
    found = []
    for record in records:
        if record.name != "asyncio":
            continue
        text = record.getMessage()
        if text.startswith("Executing") and " took " in text and _names_syncmap(text):
            found.append(text)
    return found


def blocked(record: logging.LogRecord) -> float:
    """Seconds the callback of a slow-callback warning was blocked: not runnable, and not
    waiting for another thread that was on a CPU (see above)."""
    return took(record.getMessage()) - float(getattr(record, "excused", 0.0))


def took(text: str) -> float:
    """The seconds a slow-callback warning reports (0.0 if it names none)."""
    match = _TOOK.search(text)
    return float(match.group(1)) if match else 0.0


def _names_syncmap(text: str) -> bool:
    """A syncmap task (by name or by its coroutine's file), or a plain callback that is a method
    of a syncmap class (its repr gives the qualified name only, e.g. ``InlineDispatch.submit``).
    Only the callback itself counts, not where it was created: a test's callback scheduled from
    syncmap code is the test's."""
    head = text.split(" created at ", 1)[0]
    if "name='syncmap-" in head or 'name="syncmap-' in head:
        return True
    if _PACKAGE in head:  # syncmap's coroutine or callback, but not the tests' helpers here
        return _PACKAGE in head.replace(_TESTING, "")
    match = _CALLBACK.search(head)
    return match is not None and match.group(1).split(".", 1)[0] in _syncmap_classes()


def _syncmap_classes() -> set[str]:
    """Names of the classes defined in syncmap's imported modules (read at each check: modules
    are imported lazily)."""
    names = set()
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "syncmap" or name.startswith("syncmap.")):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value.__module__ == name:
                names.add(attr)
    return names - set(dir(asyncio))  # Event, Lock, ...: also asyncio's own


class SlowCallbackLog(logging.Handler):
    """Keeps the ``asyncio`` logger's warnings while installed (:meth:`install`/:meth:`remove`).

    Its own handler rather than pytest's ``caplog``: in a fixture's teardown ``caplog.records``
    holds only the teardown phase's records, so a check there would never see the test's."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.excused = getattr(_thread, "excused", 0.0)  # of the callback just run (above)
        self.records.append(record)

    def install(self) -> SlowCallbackLog:
        logging.getLogger("asyncio").addHandler(self)
        return self

    def remove(self) -> None:
        logging.getLogger("asyncio").removeHandler(self)

    def syncmap(self, threshold: float = SLOW_CALLBACK) -> list[str]:
        """The warnings so far that name syncmap code and were blocked ``threshold`` s or more
        (wall time less run-queue wait)."""
        return syncmap_slow_callbacks(r for r in self.records if blocked(r) >= threshold)

    def all(self) -> list[str]:
        """Every slow-callback warning so far, syncmap's or not."""
        return [t for r in self.records if (t := r.getMessage()).startswith("Executing")]

    def clear(self) -> None:
        """Forget what was seen (a test that blocked on purpose, once it has checked)."""
        self.records.clear()

    def check(self, threshold: float = SLOW_CALLBACK) -> None:
        """``AssertionError`` if syncmap code blocked the loop ``threshold`` s or more."""
        slow = self.syncmap(threshold)
        assert not slow, "syncmap code blocked the event loop:\n" + "\n".join(slow[:3])


@contextlib.asynccontextmanager
async def guarding(threshold: float = SLOW_CALLBACK) -> AsyncIterator[SlowCallbackLog]:
    """Guard the running loop for the block's duration, then fail (``AssertionError``) if
    syncmap code blocked it.  ``$SYNCMAP_LOOPGUARD_LOG``: append every slow callback's duration
    and whether it was syncmap's to that file (how ``THRESHOLD`` was measured)."""
    loop = asyncio.get_running_loop()
    debug, slow = loop.get_debug(), loop.slow_callback_duration
    # Measuring ($SYNCMAP_LOOPGUARD_LOG): asyncio reports from 5 ms on; the check is the same.
    guard(loop, 0.005 if os.environ.get("SYNCMAP_LOOPGUARD_LOG") else threshold)
    # A callback's time is wall time, GIL waits included: another busy Python thread (a fault
    # proxy's, a Kafka consumer's) may keep the GIL for a whole switch interval, 5 ms by
    # default.  A shorter interval keeps such waits well below the threshold.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(min(interval, threshold / 10))
    log = SlowCallbackLog().install()
    start_measuring()
    try:
        yield log
    finally:
        stop_measuring()
        log.remove()
        sys.setswitchinterval(interval)
        loop.set_debug(debug)
        loop.slow_callback_duration = slow
        _record(log)
    log.check(threshold)


_thread = threading.local()


def _runnable_time() -> float:
    """Seconds the calling thread has run or waited on the run queue so far (0.0 off Linux)."""
    fd = getattr(_thread, "fd", None)
    try:
        if fd is None:
            fd = _thread.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        fields = os.pread(fd, 128, 0).split()
        return (int(fields[0]) + int(fields[1])) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


_ORIGINAL_RUN = asyncio.events.Handle._run
_measuring = 0  # guards measuring now (guarding() blocks, LoopThreads in debug mode)
_measuring_lock = threading.Lock()
_gc_seconds = [0.0]  # every thread's GC passes so far, while measuring (written under the GIL)


def start_measuring() -> None:
    """Make every callback record the time it is excused (``SlowCallbackLog.emit`` reads it):
    its thread's CPU and run-queue time, other threads' CPU time or GC passes.  Counted: a
    guard that starts while another measures (a LoopThread inside an async test) shares the
    one patch, and :func:`stop_measuring` undoes it when the last one stops."""
    global _measuring
    with _measuring_lock:
        _measuring += 1
        if _measuring == 1:
            gc.callbacks.append(_time_gc)
            setattr(asyncio.events.Handle, "_run", _measured_run)  # noqa: B010  (swapped back)


def stop_measuring() -> None:
    global _measuring
    with _measuring_lock:
        _measuring -= 1
        if _measuring == 0:
            setattr(asyncio.events.Handle, "_run", _ORIGINAL_RUN)  # noqa: B010
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(_time_gc)


def _time_gc(phase: str, _info: dict[str, Any]) -> None:
    """``gc.callbacks`` hook: called on the collecting thread, GIL held, at start and stop."""
    now = time.perf_counter()
    if phase == "start":
        _thread.gc_start = now
        return
    took_s = now - getattr(_thread, "gc_start", now)
    _gc_seconds[0] += took_s
    _thread.gc_seconds = getattr(_thread, "gc_seconds", 0.0) + took_s


def _own_gc() -> float:
    return float(getattr(_thread, "gc_seconds", 0.0))


def _measured_run(handle: asyncio.Handle) -> None:
    """``Handle._run`` that records how long its callback was runnable, or may have waited for
    another thread of the process that was on a CPU (holding the GIL, see above), for
    ``SlowCallbackLog.emit``, which asyncio calls right after the callback, on the same thread.

    Order: every clock is read before the callback and again after it, on this thread; the
    other threads' share is the process's CPU time less this thread's over the same span."""
    before, process, own = _runnable_time(), time.process_time(), time.thread_time()
    gc_all, gc_mine = _gc_seconds[0], _own_gc()
    started = time.perf_counter()
    try:
        _ORIGINAL_RUN(handle)
    finally:
        wall = time.perf_counter() - started
        runnable = _runnable_time() - before
        others = (time.process_time() - process) - (time.thread_time() - own)
        gc_elsewhere = (_gc_seconds[0] - gc_all) - (_own_gc() - gc_mine)
        _thread.excused = runnable + max(0.0, min(max(others, gc_elsewhere), wall - runnable))


def _record(log: SlowCallbackLog) -> None:
    path = os.environ.get("SYNCMAP_LOOPGUARD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            for record in log.records:
                text = record.getMessage()
                if text.startswith("Executing"):
                    ours = "syncmap" if _names_syncmap(text) else "other"
                    out.write(f"{took(text):.4f} {blocked(record):.4f} {ours} {text[:200]!r}\n")
