"""A leased map opened after the process's subscriber connection exists is covered by it: the
connection tracks the namespace (``ns:{``) of every channel from its start, locks' and
unleased maps' included, so the map attaching needs no reconnect (docs/design.md, "PING
leases").  A reconnect would drop every channel of the process for a moment: the messages of
its window are lost (each map repairs by probing) and, under a fork, the parent saw its feed
connection closed (S26-cluster).

Each test opens the subscriber first with something that asks no lease (a lock's waiter, a map
with ``ping_leases=False``), then a leased map, and checks on the server that the subscriber
connection is the same one once the leased map is vouched.  Control: channels carry no
namespace to track (the old rule: only leased maps' prefixes), and the connection is remade.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import pytest
import redis

from syncmap import Lock, LockNotAcquired, MapConfig, SyncMap, aio
from syncmap.embedded import EmbeddedRedis
from syncmap.feed import pubsub
from syncmap.testing.wait import wait_until

DELTA = 1.0


def _subscriber_ids(admin: redis.Redis) -> set[int]:
    """The ids of the pub/sub connections on the server (only this test's process uses it)."""
    return {int(c["id"]) for c in admin.client_list(_type="pubsub")}


@pytest.fixture(params=[True, False], ids=["namespace", "control"])
def tracked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether channels bring their namespace to track; False is the control (only a leased
    map's prefix is tracked, the old rule)."""
    if not request.param:
        monkeypatch.setattr(pubsub, "channel_namespace", lambda channel: None)
    return bool(request.param)


def _check_kept(before: set[int], after: set[int], tracked: bool) -> None:
    """The subscriber connection is the same one (the control: it was remade)."""
    if tracked:
        assert after == before, "the subscriber connection was remade for the leased map"
    else:
        assert after != before, "control: the connection was not remade"


def _lock_waiter(url: str) -> Callable[[ExitStack], None]:
    def first(stack: ExitStack) -> None:
        holder = Lock("first", url)
        holder.acquire()
        stack.callback(holder.release)
        with pytest.raises(LockNotAcquired):  # waited on the lock's channel: now subscribed
            Lock("first", url).acquire(timeout=0.2)

    return first


def _unleased_map(url: str) -> Callable[[ExitStack], None]:
    def first(stack: ExitStack) -> None:
        m = stack.enter_context(SyncMap("plain", url, config=MapConfig(ping_leases=False)))
        m["x"] = 1

    return first


@pytest.mark.parametrize("opener", ["lock", "unleased-map"])
def test_a_leased_map_opened_later_keeps_the_subscriber_connection(
    redis_server: EmbeddedRedis, admin: redis.Redis, opener: str, tracked: bool
) -> None:
    url = redis_server.url
    first = (_lock_waiter if opener == "lock" else _unleased_map)(url)
    with ExitStack() as stack:
        first(stack)
        wait_until(lambda: len(_subscriber_ids(admin)) == 1, 5.0, "the subscriber connection")
        before = _subscriber_ids(admin)
        m: AbstractContextManager[SyncMap] = SyncMap(
            "leased", url, config=MapConfig(max_staleness=DELTA)
        )
        leased = stack.enter_context(m)
        leased["k"] = 1
        leasing = leased._engine.leasing
        assert leasing is not None
        # Vouched: the connection tracks the map's keys (the control only after its reconnect).
        wait_until(lambda: leasing.may_skip(time.monotonic()), 5.0, "every bucket vouched")
        _check_kept(before, _subscriber_ids(admin), tracked)
        assert leased["k"] == 1


async def test_asyncio_a_leased_map_opened_after_a_lock_keeps_the_subscriber_connection(
    redis_server: EmbeddedRedis, admin: redis.Redis, tracked: bool
) -> None:
    url = redis_server.url
    ids = lambda: asyncio.to_thread(_subscriber_ids, admin)  # noqa: E731
    holder = aio.Lock("first", url)
    await holder.acquire()
    try:
        with pytest.raises(LockNotAcquired):  # waited on the lock's channel: now subscribed
            await aio.Lock("first", url).acquire(timeout=0.2)
        before = await ids()
        assert len(before) == 1
        async with aio.SyncMap("leased", url, config=MapConfig(max_staleness=DELTA)) as m:
            await m.set("k", 1)
            engine = m._engine
            assert engine is not None and engine.leasing is not None
            deadline = time.monotonic() + 5.0
            while not engine.leasing.may_skip(time.monotonic()):
                assert time.monotonic() < deadline, "not every bucket vouched within 5 s"
                await asyncio.sleep(0.05)  # polling what the subscriber task moves
            _check_kept(before, await ids(), tracked)
    finally:
        await holder.release()
