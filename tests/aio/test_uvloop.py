"""syncmap.aio under uvloop (issue 15: "works under uvloop too"): a map and a lock on a uvloop
event loop, with a second map seeing the first one's write through its near cache."""

from __future__ import annotations

import asyncio
import time

import pytest

from syncmap import MapConfig, aio

uvloop = pytest.importorskip("uvloop", reason="pip install uvloop (in the dev extra)")
CFG = MapConfig(max_staleness=0.5, presence=False)


def test_a_map_and_a_lock_work_under_uvloop(redis_url: str) -> None:
    async def main() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        async with aio.SyncMap("uv", redis_url, config=CFG) as a, \
                aio.SyncMap("uv", redis_url, config=CFG) as b:  # fmt: skip
            await a.set("k", 1)
            assert await b.get("k") == 1 and b.get_cached("k") == 1
            async with a.lock("k") as fence:
                await a.set("k", 2, fence=fence)
            deadline = time.monotonic() + CFG.max_staleness
            while await b.get("k") != 2:
                assert time.monotonic() < deadline, "b kept the old value past max_staleness"
                await asyncio.sleep(0.01)
        await aio.aclose_loop_resources()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
