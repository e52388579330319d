"""``syncmap.aio.SyncMap`` on ``redis+sentinel://``: the master is failed over (``SENTINEL
FAILOVER``) under two async maps; writes then reach the new master and the other map's near
cache converges on them, with the loop guard of ``conftest.py`` on throughout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from syncmap import MapConfig, StoreError, SyncMap, aio
from syncmap.testing.sentinelset import SentinelSet

CFG = MapConfig(max_staleness=0.5, presence=False, socket_timeout=1.0, self_check_timeout=5.0)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> float:
    """Seconds until ``check()`` holds (a StoreError counts as "not yet"); fails at timeout."""
    start = time.monotonic()
    while True:
        try:
            if await check():
                return time.monotonic() - start
        except StoreError:
            pass  # the switch is under way: the old master refuses, connections drop
        assert time.monotonic() - start < timeout, f"no {what} in {timeout} s"
        await asyncio.sleep(0.02)


async def test_an_aio_map_follows_a_sentinel_failover(sentinel_set: SentinelSet) -> None:
    s = sentinel_set
    async with aio.SyncMap("fo", s.url, config=CFG) as a, aio.SyncMap("fo", s.url, config=CFG) as b:
        await a.set("k", "before")
        assert await b.get("k") == "before" and b.get_cached("k") == "before"
        old, new = await asyncio.to_thread(s.failover)
        assert new != old

        async def write() -> bool:
            await a.set("k", "after")
            return True

        await until("write accepted after the failover", write, 30)

        def on_new_master() -> object:  # a sync map straight on the new master, off the loop
            with SyncMap("fo", f"redis://{new[0]}:{new[1]}/0", config=CFG) as direct:
                return direct.get("k", consistent=True)

        assert await asyncio.to_thread(on_new_master) == "after", "the write missed the master"

        async def b_sees() -> bool:
            return await b.get("k") == "after"

        took = await until("change seen by the other map", b_sees, 10)
        assert took <= CFG.max_staleness + 0.5, f"b served the old value {took:.2f} s"
        assert b.get_cached("k") == "after", "b's near cache holds the new value"
        await b.set("k2", 2)  # and the other map writes to the new master too
        assert await a.get("k2") == 2
