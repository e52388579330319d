"""The loop's shared Redis subscriber (``syncmap.feed.apubsub``), on real servers, with the loop
guard on (5 ms): one connection for every attach, on_down/on_up around a drop, PING on a silent
server, detach and loop shutdown end it, a Sentinel switch moves it, and a blocking handler is
what the guard catches (its control)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest

from syncmap.embedded import EmbeddedRedis
from syncmap.feed import apubsub
from syncmap.feed.apubsub import AsyncSubscriber, Handler
from syncmap.feed.aredis_pubsub import AsyncRedisPubSubFeed
from syncmap.store.topology import open_topology
from syncmap.testing import loopguard
from syncmap.testing.handlerlog import AsyncHandlerLog as Events
from syncmap.testing.sentinelset import SentinelSet

pytestmark = pytest.mark.usefixtures("loop_guard")
WAIT = 10.0


async def off_loop(server: EmbeddedRedis, *command: object) -> object:
    def run() -> object:
        with server.client() as admin:
            return admin.execute_command(*command)

    return await asyncio.to_thread(run)


async def pubsub_clients(server: EmbeddedRedis) -> list[dict[str, str]]:
    def ask() -> list[dict[str, str]]:
        with server.client() as admin:
            return [c for c in admin.client_list() if "P" in c.get("flags", "")]

    return await asyncio.to_thread(ask)


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    async with asyncio.timeout(WAIT):
        while not await predicate():
            await asyncio.sleep(0.02)  # polling a server's state, not waiting for a delivery


async def test_one_connection_for_every_attach_on_a_loop(redis_server: EmbeddedRedis) -> None:
    topology = open_topology(redis_server.url)
    handlers = [Events() for _ in range(3)]
    subs = [AsyncSubscriber.attach_to(topology, ch, e.handler)
            for ch, e in zip(("a", "b", "a"), handlers, strict=True)]  # fmt: skip
    assert subs[0] is subs[1] is subs[2]
    for e in handlers:
        await e.wait(lambda e: e.log == ["up"], "on_up after the confirmation")
    assert len(await pubsub_clients(redis_server)) == 1
    await off_loop(redis_server, "PUBLISH", "a", b"to-a")
    await handlers[0].wait(lambda e: e.messages == [b"to-a"], "a message on a")
    await handlers[2].wait(lambda e: e.messages == [b"to-a"], "the same message, second handler")
    assert handlers[1].messages == []
    for ch, e in zip(("a", "b", "a"), handlers, strict=True):
        await subs[0].detach(ch, e.handler)
    assert not subs[0].running, "the last detach stops the reader task"

    async def none_left() -> bool:
        return await pubsub_clients(redis_server) == []

    await until(none_left, "the connection closed")


async def test_a_killed_connection_is_on_down_then_on_up(redis_server: EmbeddedRedis) -> None:
    feed = AsyncRedisPubSubFeed(redis_server.url, "k")
    e = Events()
    sub = AsyncSubscriber.attach_to(feed.topology, "k", e.handler)
    await e.wait(lambda e: e.log == ["up"], "the first on_up")
    killed = await off_loop(redis_server, "CLIENT", "KILL", "TYPE", "pubsub")
    assert killed == 1
    await e.wait(lambda e: e.log == ["up", "down", "up"], "on_down, then on_up once resubscribed")
    await feed.publish(b"after")
    await e.wait(lambda e: e.messages == [b"after"], "a message after the reconnect")
    await sub.detach("k", e.handler)
    await feed.aclose()


async def test_a_silent_server_is_found_by_ping(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    topology = open_topology(redis_server.url)
    e = Events()
    sub = AsyncSubscriber.attach_to(topology, "p", e.handler)
    await e.wait(lambda e: e.log == ["up"], "the first on_up")
    started = time.monotonic()
    redis_server.pause()  # SIGSTOP: the socket stays open and nothing answers
    try:
        with caplog.at_level(logging.WARNING, logger="syncmap.feed"):
            await e.wait(lambda e: "down" in e.log, "on_down while the server is stopped")
        took = time.monotonic() - started
    finally:
        redis_server.resume()
    assert took >= apubsub.PING_AFTER, f"dropped after {took:.1f} s, before any PING went out"
    assert any("no answer to PING" in r.getMessage() for r in caplog.records)
    await e.wait(lambda e: e.log == ["up", "down", "up"], "on_up once the server answers again")
    await sub.detach("p", e.handler)


async def test_a_failing_handler_does_not_silence_the_others(
    redis_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    topology = open_topology(redis_server.url)
    good = Events()

    def broken(data: bytes) -> None:
        raise RuntimeError("handler bug")

    bad = Handler(broken, lambda: None, lambda: None)
    sub = AsyncSubscriber.attach_to(topology, "f", bad)
    AsyncSubscriber.attach_to(topology, "f", good.handler)
    await good.wait(lambda e: e.log == ["up"], "on_up")
    with caplog.at_level(logging.ERROR, logger="syncmap.feed"):
        await off_loop(redis_server, "PUBLISH", "f", b"x")
        await good.wait(lambda e: e.messages == [b"x"], "the message reaching the good handler")
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    assert good.log == ["up"], "a handler's failure is not a lost connection"
    await sub.detach("f", bad)
    await sub.detach("f", good.handler)


async def test_a_sentinel_switch_moves_the_subscriber(sentinel_set: SentinelSet) -> None:
    topology = open_topology(sentinel_set.url, timeout=2.0)
    e = Events()
    sub = AsyncSubscriber.attach_to(topology, "s", e.handler)
    await e.wait(lambda e: e.log == ["up"], "the first on_up")
    old = sentinel_set.master_addr()

    def failover() -> None:
        with sentinel_set.sentinels[0].client() as s:
            s.execute_command("SENTINEL", "FAILOVER", sentinel_set.service)
        sentinel_set.wait_failover(old)

    await asyncio.to_thread(failover)
    await e.wait(lambda e: e.log[-2:] == ["down", "up"], "on_down then on_up on the new master")
    new = sentinel_set.master_addr()
    assert new != old

    def publish_on_new() -> None:
        with sentinel_set.node_at(new).client() as c:
            c.publish("s", b"from the new master")

    await asyncio.to_thread(publish_on_new)
    await e.wait(lambda e: b"from the new master" in e.messages, "a message from the new master")
    await sub.detach("s", e.handler)


def test_a_loop_that_ends_leaves_nothing_behind(redis_server: EmbeddedRedis) -> None:
    """asyncio.run cancels the reader as it shuts the loop down: no registry entry (so no
    reference to the closed loop) and no connection remain, with no detach at all."""
    topology = open_topology(redis_server.url)
    e = Events.__new__(Events)  # made on the loop below: its Event belongs there

    async def attach_and_leave() -> None:
        Events.__init__(e)
        AsyncSubscriber.attach_to(topology, "gone", e.handler)
        await e.wait(lambda e: e.log == ["up"], "on_up")

    asyncio.run(attach_and_leave())
    assert not [k for k in AsyncSubscriber._registry if k[1] == topology.key]
    with redis_server.client() as admin:
        deadline = time.monotonic() + WAIT
        while [c for c in admin.client_list() if "P" in c.get("flags", "")]:
            assert time.monotonic() < deadline, "the subscriber's connection outlived its loop"
            time.sleep(0.02)  # polling the server's client list


async def test_the_guard_catches_a_blocking_callback(
    redis_server: EmbeddedRedis, loop_guard: loopguard.SlowCallbackLog
) -> None:
    """The loop guard's control: a handler that blocks for 4x the threshold on the subscriber's
    task is reported as syncmap code blocking the loop.  (It blocked for the threshold itself,
    20 ms, until the guard excused other threads' CPU time too: then another thread's few ms
    during the sleep took it under, and a CI run failed.)"""
    topology = open_topology(redis_server.url)
    e = Events()
    block = 4 * loopguard.SLOW_CALLBACK
    blocking = Handler(lambda data: time.sleep(block), lambda: None, lambda: None)
    sub = AsyncSubscriber.attach_to(topology, "g", blocking)
    AsyncSubscriber.attach_to(topology, "g", e.handler)
    await e.wait(lambda e: e.log == ["up"], "on_up")
    await off_loop(redis_server, "PUBLISH", "g", b"slow")
    await e.wait(lambda e: e.messages == [b"slow"], "the message")
    await sub.detach("g", blocking)
    await sub.detach("g", e.handler)
    caught = loop_guard.syncmap()
    assert caught and "syncmap-async-subscriber" in caught[0], caught
    loop_guard.records.clear()  # caught on purpose: the fixture's own check must not fail
