"""asyncio tests: every one runs in asyncio's debug mode and fails when a callback of syncmap's
own (a task or callback in the syncmap package, ``syncmap.testing.loopguard``) blocked the loop.
A test's own slow step does not count: on a loaded 2-core machine one is preempted now and then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from syncmap.testing.loopguard import guard, syncmap_slow_callbacks


@pytest.fixture(autouse=True)
async def loop_guard(caplog: pytest.LogCaptureFixture) -> AsyncIterator[asyncio.AbstractEventLoop]:
    loop = asyncio.get_running_loop()
    guard(loop)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        yield loop
    slow = syncmap_slow_callbacks(caplog.records)
    assert not slow, f"syncmap code blocked the event loop: {slow[:3]}"
