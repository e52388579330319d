"""``syncmap.aio.SyncMap`` on a real redis-server: the map's operations as coroutines, the hit
path without an await, events, cancellation, and a sync and an async server sharing one map."""

from __future__ import annotations

import asyncio
import time

import pytest

from syncmap import Event, MapClosed, MapConfig, SyncMap, aio
from syncmap.embedded import EmbeddedRedis

CFG = MapConfig(max_staleness=0.5, presence=False)


async def test_open_write_read_close(redis_url: str) -> None:
    m = await aio.SyncMap("m", redis_url, config=CFG)
    try:
        assert await m.set("a", {"n": 1}) > 0
        assert await m.get("a") == {"n": 1}
        assert m.get_cached("a") == {"n": 1}  # own write cached: no await needed
        assert m.get_cached("nope") is aio.MISSING
        assert await m.get("nope", "d") == "d"
        assert await m.swap("a", 2) == {"n": 1}
        assert await m.setdefault("a", 3) == 2 and await m.setdefault("b", 3) == 3
        assert await m.compare_and_set("a", 2, 5) and not await m.compare_and_set("a", 2, 6)
        assert await m.compare_and_delete("b", 3) and not await m.contains("b")
        assert await m.transform("c", lambda v: v + 1, 0) == 1

        async def double(v: int) -> int:
            await asyncio.sleep(0)
            return v * 2

        assert await m.transform("c", double) == 2
        await m.update({"x": 1, "y": 2}, ttl=60)
        assert sorted(await m.keys()) == ["a", "c", "x", "y"]
        assert await m.len() == 4
        assert await m.pop("x") == 1 and await m.delete("y") and not await m.delete("y")
        with pytest.raises(KeyError):
            await m.pop("y")
        await m.clear()
        assert await m.copy() == {}
        assert m.statistics().hits >= 1
    finally:
        await m.aclose()
    with pytest.raises(MapClosed):
        await m.get("a")


async def test_a_sync_and_an_async_server_share_one_map(redis_url: str) -> None:
    """Each sees the other's writes through its near cache within max_staleness (one hop)."""
    sync_map = await asyncio.to_thread(SyncMap, "shared", redis_url, config=CFG)
    try:
        async with aio.SyncMap("shared", redis_url, config=CFG) as m:
            await m.set("k", 1)
            assert await asyncio.to_thread(sync_map.get, "k") == 1
            assert await m.get("k") == 1 and m.get_cached("k") == 1
            await asyncio.to_thread(sync_map.set, "k", 2)
            deadline = time.monotonic() + CFG.max_staleness
            while m.get_cached("k") != 2:  # the invalidation arrives; the next get re-reads
                if await m.get("k") == 2:
                    break
                assert time.monotonic() < deadline, "the async map kept the old value"
                await asyncio.sleep(0.005)
    finally:
        await asyncio.to_thread(sync_map.close)


async def test_events_reach_sync_and_async_callbacks_and_watch(redis_url: str) -> None:
    async with aio.SyncMap("ev", redis_url, config=CFG) as a, \
            aio.SyncMap("ev", redis_url, config=CFG) as b:  # fmt: skip
        got_sync: list[str] = []
        got_async: list[str] = []

        async def on_change(event: Event) -> None:
            got_async.append(event.key)

        a.subscribe(lambda e: got_sync.append(e.key))
        a.subscribe(on_change)
        watched = a.watch()
        await b.set("k1", 1)
        first = await asyncio.wait_for(watched.__anext__(), 5)
        assert first.key == "k1"
        deadline = time.monotonic() + 5
        while not (got_sync and got_async):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert got_sync == ["k1"] and got_async == ["k1"]


async def test_a_cancelled_read_leaves_no_fill_behind(redis_server: EmbeddedRedis) -> None:
    async with aio.SyncMap("c", redis_server.url, config=CFG) as m:
        await m.set("k", 1)
        m._state.core.drop("k")
        redis_server.pause()
        try:
            task = asyncio.ensure_future(m.get("k"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            redis_server.resume()
        assert not m._state.core._pending, "the cancelled read's fill token leaked"
        assert await m.get("k") == 1


async def test_a_write_cancelled_after_sending_is_outcome_unknown(
    redis_server: EmbeddedRedis,
) -> None:
    """The key is dropped locally: this server must not keep believing a value the store may
    not hold; the next read fetches the truth."""
    async with aio.SyncMap("w", redis_server.url, config=CFG) as m:
        await m.set("k", 1)
        assert await m.get("k") == 1 and m.get_cached("k") == 1  # cached
        redis_server.pause()
        try:
            task = asyncio.ensure_future(m.set("k", 2))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            redis_server.resume()
        assert m.get_cached("k") is aio.MISSING
        assert await m.get("k") in (1, 2)


async def test_nothing_blocks_the_loop_on_a_slow_server(redis_server: EmbeddedRedis) -> None:
    """While Redis is stopped and five reads wait for it, a ticker task keeps running: no
    syncmap call on the loop waits synchronously (the loop guard of conftest.py fails on one).
    Counted in ticks, not in wall time: on a loaded machine 300 ms may hold only a few."""
    async with aio.SyncMap("slow", redis_server.url, config=CFG) as m:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        redis_server.pause()
        try:
            calls = [asyncio.ensure_future(m.get(f"k{i}")) for i in range(5)]
            deadline = time.monotonic() + 5.0
            while ticks < 15 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            pending = sum(not c.done() for c in calls)
        finally:
            redis_server.resume()
        await asyncio.gather(*calls)
        t.cancel()
        assert ticks >= 15, f"the loop ran only {ticks} ticks in 5 s"
        assert pending == 5, "the reads ended while Redis was stopped: nothing was tested"
