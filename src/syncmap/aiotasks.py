"""Stopping syncmap's own asyncio tasks so that ``aclose()`` always returns.

Why a helper: on Python 3.11 a cancellation can be lost.  ``asyncio.wait_for`` (which
``redis.asyncio`` wraps around sends, and nats-py and aio-pika use) returns the inner result when
the cancel arrives just as the inner call completes (CPython gh-86296, fixed in 3.12), and it
leaves the task's cancel count raised, so a later ``asyncio.timeout`` that expires alongside the
next cancel takes that cancel for its own and raises ``TimeoutError``, which a loop catches and
runs on.  A single ``task.cancel(); await task`` then waits forever.  Seen twice: the map
engine's probe loop and a Redis stream reader.

How :func:`stop_task` stops a task, in this order:

1. **Flag and wake-up**, where the loop is ours (``wake`` given): the owner has already set the
   flag the loop checks; ``wake()`` ends the wait the loop sits in, and the loop returns by itself
   within ``grace`` seconds.  Nothing is cancelled, so nothing can be lost.
2. **Cancel, repeated** every ``RECANCEL_EVERY`` s while the task runs on (a lost cancel is
   followed by another one at the task's next await), for at most ``bound`` seconds.
3. **Give up**: log an error naming the task and return ``False``, so the owner's ``aclose()``
   returns anyway.  A task left running is a bug to report, never a hang.

The task's own exception, if any, is logged (at debug level: the owner reported it when it
happened), so asyncio never warns "exception was never retrieved".

The same loss on a *caller's* task (a request handler awaiting ``lock.acquire()``) cannot be
repeated by syncmap: the cancel is the caller's.  There :func:`cancels_requested` and
:func:`cancel_lost` find it (the task's cancel count rose across awaits that returned
normally), and the caller raises the ``CancelledError`` the await swallowed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "GRACE",
    "RECANCEL_EVERY",
    "STOP_BOUND",
    "cancel_lost",
    "cancels_requested",
    "stop_task",
    "stop_tasks",
]

log = logging.getLogger("syncmap")

GRACE = 5.0
"""Seconds a woken loop gets to return by itself before it is cancelled."""
RECANCEL_EVERY = 0.1
"""Seconds between two cancels of a task that runs on."""
STOP_BOUND = 5.0
"""Seconds of cancelling before :func:`stop_task` gives up on a task."""


async def stop_task(
    task: asyncio.Task[Any] | None,
    *,
    wake: Callable[[], object] | None = None,
    grace: float = GRACE,
    bound: float = STOP_BOUND,
) -> bool:
    """Stop ``task`` (module docstring): True once it has ended, False if it was left running.

    ``wake``: the loop is ours and its stop flag is set; ``wake()`` ends its wait.  Without it,
    the task is cancelled at once.  If the caller is cancelled meanwhile, the task is cancelled
    too and the caller's cancellation goes on."""
    if task is None:
        return True
    try:
        if wake is not None and not task.done():
            wake()
            await asyncio.wait([task], timeout=grace)
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + bound
        while not task.done() and loop.time() < give_up_at:
            task.cancel()
            await asyncio.wait([task], timeout=RECANCEL_EVERY)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.done():
        log.error(
            "syncmap: task %s did not stop within %.1f s of cancelling; left running "
            "(please report this)", task.get_name(), bound,
        )  # fmt: skip
        return False
    if not task.cancelled() and task.exception() is not None:
        log.debug("syncmap: task %s had ended with %r", task.get_name(), task.exception())
    return True


async def stop_tasks(
    tasks: Iterable[asyncio.Task[Any]],
    *,
    wake: Callable[[], object] | None = None,
    grace: float = GRACE,
    bound: float = STOP_BOUND,
) -> bool:
    """:func:`stop_task` for several tasks at once (``wake`` called once): True if all ended."""
    tasks = list(tasks)
    running = [task for task in tasks if not task.done()]
    if wake is not None and running:
        wake()
        await asyncio.wait(running, timeout=grace)
    stopped = await asyncio.gather(*(stop_task(task, bound=bound) for task in tasks))
    return all(stopped)


def cancels_requested() -> int:
    """The running task's cancel requests so far (``Task.cancelling()``; 0 outside a task):
    read it before awaits that may lose a cancel, and pass it to :func:`cancel_lost` after."""
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def cancel_lost(before: int) -> bool:
    """Whether the running task was asked to cancel since ``before`` (:func:`cancels_requested`)
    although the awaits since then returned normally: one of them swallowed the
    ``CancelledError`` (module docstring), which the caller must now raise itself.

    A cancel that was delivered raised instead, and ``asyncio.timeout`` takes back (uncancels)
    the cancel it makes when it expires, so a count still raised after a normal return is a
    lost cancel.  Never true on Python 3.12+, whose ``wait_for`` loses none."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > before
