"""Open-and-close cycles for the asyncio owners (maps, subscribers, feeds, lock holds): every
``aclose()`` must return within a bound and leave no task behind, whatever its loops were doing
(``syncmap.aiotasks``).  Used by tests/aio/test_stopping.py and tests/feeds/test_astopping.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

CLOSE_BOUND = 12.0
"""Seconds one close may take at worst: ``aiotasks``' grace (5 s) and cancel bound (5 s), plus a
margin.  A close normally takes milliseconds; one that reaches this bound is a hang."""
SETTLE = 2.0
"""Seconds a client library's own tasks get to end after a close (polled, not slept)."""

Opener = Callable[[], Awaitable[Callable[[], Awaitable[Any]]]]
"""Opens an owner and returns its close."""


async def cycle(open_owner: Opener, cycles: int, spread: float = 0.004) -> float:
    """``cycles`` times: open, wait a varying moment (0 to ``spread`` s, so the close meets the
    loops at different points of their waits), close within ``CLOSE_BOUND`` and check that no
    task is left.  Returns the slowest close, in seconds."""
    baseline = _others()
    slowest = 0.0
    for i in range(cycles):
        close = await open_owner()
        await asyncio.sleep(spread * (i % 9) / 8)  # the moment of the close, not a sync
        started = time.monotonic()
        try:
            async with asyncio.timeout(CLOSE_BOUND):
                await close()
        except TimeoutError:
            raise AssertionError(f"cycle {i}: aclose() did not return in {CLOSE_BOUND} s") from None
        slowest = max(slowest, time.monotonic() - started)
        await _no_task_left(baseline, i)
    return slowest


def _others() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _no_task_left(baseline: set[asyncio.Task[Any]], i: int) -> None:
    deadline = time.monotonic() + SETTLE
    while (left := _others() - baseline) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # a library's task ending on its own: poll with a deadline
    assert not left, f"cycle {i}: tasks left after aclose(): {sorted(map(repr, left))[:3]}"
