"""``syncmap.aio.ReplicatedMap`` and ``syncmap.aio.open_map`` on real brokers (a redis-server of
the test's own; the machine's NATS on 127.0.0.1:4222): an async and a sync replicated server
converge on one map, a late joiner loads it, what needs a store is refused as the sync map
refuses it, and ``open_map`` picks the mode.  Every test runs under the loop guard
(``conftest.py``): a syncmap task or callback that blocks the loop fails it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from syncmap import (
    ConfigurationError,
    Event,
    MapClosed,
    MapConfig,
    NoSnapshotSource,
    ReplicatedMap,
    UnsupportedInMode,
    aio,
)

NATS_URL = "nats://127.0.0.1:4222"
CFG = MapConfig(presence=False)


def _nats() -> str:
    try:
        socket.create_connection(("127.0.0.1", 4222), timeout=1).close()
    except OSError:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must test replicated mode on NATS: no nats-server on :4222")
        pytest.skip("no nats-server on 127.0.0.1:4222")
    return NATS_URL


@pytest.fixture(params=["redis", "nats"])
def feed(request: pytest.FixtureRequest) -> str:
    if request.param == "nats":
        return _nats()
    return str(request.getfixturevalue("redis_url"))


def _name(request: pytest.FixtureRequest) -> str:
    """A map of its own per test run: the NATS server is shared with other tests and runs."""
    return f"ar{abs(hash(request.node.nodeid)) % 10**6}x{time.monotonic_ns() % 10**9}"


async def _until(check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 10
                 ) -> None:  # fmt: skip
    """Poll ``check`` until it holds, with a deadline (a condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.005)


async def test_writes_from_an_async_and_a_sync_server_converge(
    feed: str, request: pytest.FixtureRequest
) -> None:
    name = _name(request)
    async with aio.ReplicatedMap(name, feed, config=CFG, snapshot={}) as a:
        b = await asyncio.to_thread(ReplicatedMap, name, feed, config=CFG, snapshot="peers")
        try:
            seen: list[Event] = []
            a.subscribe(seen.append, inline=True)
            version = await a.set("own", {"n": 1})
            assert a.get_cached("own") == {"n": 1} and await a.get("own") == {"n": 1}
            assert (await a.get_with_meta("own"))[:2] == ({"n": 1}, version)

            def sync_writes() -> None:
                for i in range(40):
                    b[f"k{i % 25}"] = ("sync", i)
                    if i % 7 == 0:
                        b.pop(f"k{i % 25}", None)

            async def async_writes() -> None:
                for i in range(40):
                    await a.set(f"k{i % 25}", ("async", i))
                    if i % 5 == 0:
                        await a.delete(f"k{(i + 3) % 25}")

            await asyncio.gather(asyncio.to_thread(sync_writes), async_writes())
            await _until(lambda: a.get_cached("own") is not aio.MISSING and "own" in b,
                         "b has a's write")  # fmt: skip

            async def same() -> bool:
                return await a.copy() == b.copy()

            await _until(same, "the two maps agree")
            for key in await a.keys():  # the same version everywhere: the same write won
                assert (await a.get_with_meta(key))[1] == b.get_with_meta(key)[1]
            assert any(e.origin == b.node_id for e in seen), "b's writes reached a's events"
            await asyncio.to_thread(b.clear)
            await _until(lambda: not a.get_cached("own", None), "the clear reaches a")
            assert await a.len() == 0 and await a.copy() == {}
        finally:
            await asyncio.to_thread(b.close)
    assert a.statistics().applied > 40


@pytest.mark.parametrize("kind", ["redis", "nats", "redis+stream"])
async def test_a_late_joiner_loads_the_map(kind: str, request: pytest.FixtureRequest) -> None:
    """From its peers on a feed that keeps nothing (an async peer answers a sync joiner, and a
    sync peer an async joiner), from the log on a durable feed (no snapshot= needed)."""
    url = _nats() if kind == "nats" else str(request.getfixturevalue("redis_url"))
    url = url.replace("redis://", "redis+stream://") if kind == "redis+stream" else url
    name = _name(request)
    durable = kind == "redis+stream"
    async with aio.ReplicatedMap(name, url, config=CFG, snapshot=None if durable else {}) as a:
        await a.update({f"k{i}": i for i in range(300)})
        await a.delete("k0")
        want = await a.copy()
        sync_joiner = await asyncio.to_thread(
            ReplicatedMap, name, url, config=CFG, snapshot=None if durable else "peers"
        )
        try:
            assert sync_joiner.copy() == want, "the sync joiner loaded what the async map holds"
            async with aio.ReplicatedMap(name, url, config=CFG,
                                         snapshot=None if durable else "peers") as c:  # fmt: skip
                assert await c.copy() == want
                assert c.get_cached("k0") is aio.MISSING and not await c.contains("k0")
            if not durable:
                assert a.statistics().syncs_answered >= 1, "the async map answered a sync"
        finally:
            await asyncio.to_thread(sync_joiner.close)


async def test_a_feed_that_keeps_nothing_needs_a_snapshot_source(redis_url: str) -> None:
    m = aio.ReplicatedMap("nosnap", redis_url, config=CFG)  # no I/O yet
    with pytest.raises(NoSnapshotSource):
        await m
    with pytest.raises(MapClosed):  # a failed open closes the map, as the sync constructor does
        await m.get("k")

    async def from_function() -> dict[str, int]:
        return {"a": 1}

    async with aio.ReplicatedMap("nosnap", redis_url, config=CFG, snapshot=from_function) as m2:
        assert await m2.get("a") == 1  # control: with a source it opens and loads


async def test_what_needs_a_store_is_refused_as_the_sync_map_refuses_it(redis_url: str) -> None:
    m = aio.ReplicatedMap("refuse", redis_url, config=CFG, snapshot={})
    with pytest.raises(MapClosed, match="not open yet"):
        m.get_cached("k")
    async with m:
        refused: list[Callable[[], Awaitable[Any]]] = [
            lambda: m.swap("k", 1),
            lambda: m.setdefault("k", 1),
            lambda: m.compare_and_set("k", 1, 2),
            lambda: m.compare_and_delete("k", 1),
            lambda: m.transform("k", lambda v: v, 0),
            lambda: m.get("k", consistent=True),
            lambda: m.get_with_meta("k", consistent=True),
            lambda: m.set("k", 1, fence=object()),
            lambda: m.delete("k", fence=object()),
            lambda: m.update({"k": 1}, fence=object()),
            lambda: m.clear(fence=object()),
        ]
        for call in refused:
            with pytest.raises(UnsupportedInMode, match="store mode"):
                await call()
        with pytest.raises(UnsupportedInMode, match="store mode"):
            m.lock("k")
        assert await m.copy() == {}, "a refused write sent nothing"
        assert await m.set("k", 1) and await m.pop("k") == 1  # control: the plain ones work
        with pytest.raises(KeyError):
            await m.pop("k")
        assert await m.preload() == 0
    with pytest.raises(MapClosed, match="closed"):
        await m.set("k", 2)
    with pytest.raises(MapClosed):
        m.get_cached("k")


async def test_open_map_picks_the_mode(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCMAP_URL", raising=False)
    with pytest.raises(ConfigurationError, match="no store and no feed"):
        aio.open_map("om")
    unopened = aio.open_map("om", feed="redis://127.0.0.1:1")  # nothing connects here
    assert isinstance(unopened, aio.ReplicatedMap)
    replicated = aio.open_map("om", feed=redis_url, config=CFG, snapshot={})
    assert isinstance(replicated, aio.ReplicatedMap)
    async with replicated as r:
        await r.set("k", 1)
        assert r.get_cached("k") == 1
    monkeypatch.setenv("SYNCMAP_URL", redis_url)  # read first: feed= alone keeps the store
    store = aio.open_map("om", feed=redis_url, config=CFG)
    assert isinstance(store, aio.SyncMap)
    async with store as s:
        assert await s.get("k") is None, "store mode: not the replicated map's entries"
        await s.set("k", 2)
        assert await s.get("k") == 2


async def test_answering_a_large_sync_does_not_block_the_loop(redis_url: str) -> None:
    """The worker task publishes an answer one message per await: with 3000 entries held, a
    joiner's request keeps the loop free (the loop guard fails the test otherwise); a tick
    task measures the largest gap between its wake-ups while the answer is sent."""
    async with aio.ReplicatedMap("big", redis_url, config=CFG, snapshot={}) as a:
        await a.update({f"k{i}": "x" * 100 for i in range(3000)})
        gaps: list[float] = []
        stop = asyncio.Event()

        async def tick() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        try:
            async with aio.ReplicatedMap("big", redis_url, config=CFG, snapshot="peers",
                                         peers_timeout=30) as b:  # fmt: skip
                assert await b.len() == 3000
        finally:
            stop.set()
            await ticker
        assert a.statistics().syncs_answered == 1
        assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f} s"
