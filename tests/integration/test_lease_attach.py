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
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack

import pytest
import redis

from syncmap import Lock, LockNotAcquired, MapConfig, SyncMap, aio
from syncmap.embedded import EmbeddedRedis
from syncmap.feed import pubsub
from syncmap.feed.leases import Lease
from syncmap.store.topology import open_topology
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


@pytest.mark.parametrize("waits", [True, False], ids=["waits", "control"])
def test_a_new_subscriber_connects_only_once_its_first_channel_is_attached(
    redis_server: EmbeddedRedis, admin: redis.Redis, waits: bool
) -> None:
    """The reader thread starts before ``attach_to`` attaches the first channel; it waits for
    it, so its one connection tracks that channel's namespace.  Control: the reader let go at
    once (as before the fix) connects with nothing to track, and the leased channel then makes
    it reconnect: two connections where one was enough (S26-cluster's closed connection)."""
    topology = open_topology(redis_server.url)
    made = lambda: int(admin.info("stats")["total_connections_received"])  # noqa: E731
    start = made()
    vouched = threading.Event()
    lease = Lease(b"sm:{direct:", 0.25, lambda sent_at, buckets: vouched.set(), lambda b: None)
    handler = pubsub.Handler(lambda data: None, lambda: None, lambda: None, lease=lease)
    sub = pubsub.Subscriber(topology, ("test-direct", redis_server.url))
    try:
        if waits:  # the reader is parked in its wait, not connected, however long it is given
            wait_until(lambda: _parked(sub._thread), 5.0, "the reader waiting for a channel")
            assert made() == start, "the reader connected before any channel was attached"
        else:
            sub._attached.set()  # the old order: the reader connects before any channel
            wait_until(lambda: made() > start, 5.0, "the reader's first connection")
        sub.attach("sm:{direct}:ch", handler)
        assert vouched.wait(5.0), "no vouch within 5 s"
        connections = made() - start
        if waits:
            assert connections == 1, f"{connections} connections for one subscriber"
        else:
            assert connections == 2, f"control: {connections} connections (no reconnect?)"
    finally:
        sub.stop()


def _parked(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits on an Event called straight from the reader's ``_run`` (the
    wait for its first channel), read from its stack: no timed wait stands in for it."""
    frame = sys._current_frames().get(thread.ident or -1)
    callee = None
    while frame is not None:
        if frame.f_code.co_name == "_run":
            return callee == "wait"
        callee, frame = frame.f_code.co_name, frame.f_back
    return False
