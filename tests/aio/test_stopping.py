"""Every asyncio owner on Redis closes at any moment: ``aclose()`` returns within a bound and no
task is left (``syncmap.aiotasks``; ``syncmap.testing.stopping.cycle``).

Timeouts are made tiny so the close meets the loops inside their timed waits, where Python 3.11
can lose a cancellation (``aiotasks`` docstring): the map's probe and timer loops, the
subscriber's reads, the stream reader's XREADs, a hold's renewals."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from syncmap import LockLost, aio
from syncmap.config import MapConfig
from syncmap.feed import apubsub, streamlog
from syncmap.feed.aredis_stream import AsyncRedisStreamFeed
from syncmap.feed.base import FeedHandler
from syncmap.feed.pubsub import Handler
from syncmap.store.topology import open_topology
from syncmap.testing.stopping import cycle

CYCLES = 60  # each close lands at another moment of the loops (raise it to hunt: 200 took ~40 s)
Close = Callable[[], Awaitable[Any]]


def _nothing(*_args: object) -> None:
    return None


async def test_a_map_closes_at_any_moment(shared_redis_url: str) -> None:
    config = MapConfig(max_staleness=0.01, presence=False)  # probes every 2.5 ms

    async def open_map() -> Close:
        m = await aio.SyncMap("stopping", shared_redis_url, config=config)
        return m.aclose

    print(f"\nslowest map close: {await cycle(open_map, CYCLES):.3f} s")


async def test_a_subscriber_closes_at_any_moment(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(apubsub, "READ_SLICE", 0.001)  # reads time out all the time
    topology = open_topology(shared_redis_url)

    async def open_subscriber() -> Close:
        handler = Handler(_nothing, _nothing, _nothing)
        sub = apubsub.AsyncSubscriber.attach_to(topology, "stopping", handler)
        return lambda: sub.detach("stopping", handler)

    print(f"\nslowest subscriber close: {await cycle(open_subscriber, CYCLES):.3f} s")


async def test_a_stream_reader_closes_at_any_moment(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streamlog, "BLOCK_MS", 1)  # each XREAD waits 1 ms
    url = shared_redis_url.replace("redis://", "redis+stream://", 1)
    feed = AsyncRedisStreamFeed(url, "stopping", timeout=0.5)

    async def open_reader() -> Close:
        sub = await feed.subscribe(FeedHandler(_nothing, _nothing, _nothing))
        return sub.aclose

    try:
        print(f"\nslowest stream reader close: {await cycle(open_reader, CYCLES):.3f} s")
    finally:
        await feed.aclose()


async def test_a_lock_hold_ends_at_any_moment(shared_redis_url: str) -> None:
    lock = aio.Lock("stopping", shared_redis_url, lease=0.15)  # renewed every 50 ms

    async def release() -> None:
        with contextlib.suppress(LockLost):  # a loaded machine may let so short a lease lapse
            await lock.release()

    async def hold() -> Close:
        await lock.acquire(timeout=5)
        return release

    print(f"\nslowest release: {await cycle(hold, CYCLES, spread=0.1):.3f} s")
