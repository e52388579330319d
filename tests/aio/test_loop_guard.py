"""The loop guard every asyncio test runs under (tests/conftest.py ``loop_guard``,
``syncmap.testing.loopguard``): it catches syncmap code that blocks the loop, and only that.

These are its guard-off controls: each plants a blocking call and checks what the guard makes of
it, then ``clear()``s so the test itself passes."""

from __future__ import annotations

import asyncio
import time

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
