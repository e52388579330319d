"""One master of a Redis Cluster hung (it accepts, never answers), the others healthy (issue 14
item 3: the near cache flushes only the affected buckets).

A hung master differs from a dead one (test_cluster_probe.py): its connection takes the write
and never replies, so its part of a write ends in ``WriteOutcomeUnknown`` when the call deadline
passes, and a thread executor reading its masters one after another spends that whole deadline
on it before it reads the others' replies (which arrived long before).  The hang is a
:class:`FaultProxy` the master announces (``clusterproxy.announced_proxy``), black-holed; the
cluster bus goes direct, so no failover starts.  One module cluster, left as found.

Before the fix every probe failed as a whole while one master hung (``WriteOutcomeUnknown`` for
the call, then "the call deadline passed" for the replies already there), so every bucket's
lease ran out together."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from syncmap import MapConfig, SyncMap, aio
from syncmap.errors import StoreUnavailable, WriteOutcomeUnknown
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.store.cluster import ClusterTopology, slot_for
from syncmap.store.clusterexec import ClusterExecutor
from syncmap.store.node import NodeExecutor
from syncmap.store.topology import open_topology
from syncmap.testing.clusternode import ClusterNodeProcess
from syncmap.testing.clusterproxy import Announced, announced_proxy
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.wait import wait_until

KEYS = [f"k{i}" for i in range(64)]
DELTA, DEADLINE = 0.5, 0.25
BUCKETS = 16


def _config() -> MapConfig:
    return MapConfig(max_staleness=DELTA, call_timeout=DEADLINE, socket_timeout=1.0)


def _bucket(key: str) -> int:
    return bucket_of(encode_key(key, 1024), BUCKETS)


def _owner(cluster: ClusterSet, name: str, bucket: int) -> ClusterNodeProcess:
    return cluster.master_for_slot(slot_for(Layout("sm", name, BUCKETS).data(bucket)))


def _split(cluster: ClusterSet, name: str) -> tuple[ClusterNodeProcess, list[int], list[str]]:
    """(the hung-to-be master: bucket 0's, its buckets, its keys); the other masters own the
    rest, and some keys of each side exist."""
    victim = _owner(cluster, name, 0)
    theirs = [b for b in range(BUCKETS) if _owner(cluster, name, b) is victim]
    keys = [k for k in KEYS if _bucket(k) in theirs]
    assert 0 < len(theirs) < BUCKETS and 0 < len(keys) < len(KEYS)
    return victim, theirs, keys


@pytest.fixture
def hung(shared_cluster: ClusterSet) -> Iterator[tuple[ClusterSet, Announced]]:
    """Bucket 0's master of map "hung" behind an announced proxy (not yet black-holed)."""
    victim, _, _ = _split(shared_cluster, "hung")
    with announced_proxy(shared_cluster, victim) as announced:
        yield shared_cluster, announced


def _executor_batch(cluster: ClusterSet, victim: ClusterNodeProcess) -> tuple[list[str], list[str]]:
    """Keys on ``victim`` first (its pipeline is sent and read first), then the others'."""
    keys = [f"key:{i}" for i in range(60)]
    theirs = [k for k in keys if cluster.master_for_slot(slot_for(k)) is victim]
    return theirs, [k for k in keys if k not in theirs]


def _topology(cluster: ClusterSet) -> ClusterTopology:
    topology = open_topology(cluster.url, timeout=5.0)
    assert isinstance(topology, ClusterTopology)
    return topology


def test_a_hung_masters_part_of_a_partial_write_is_unknown_in_its_place(
    hung: tuple[ClusterSet, Announced],
) -> None:
    cluster, announced = hung
    theirs, ours = _executor_batch(cluster, announced.node)
    ex = _topology(cluster).executor(timeout=2.0, deadline=DEADLINE)
    try:
        ex.call([("SET", k, 1) for k in theirs + ours], write=True)  # a connection to each
        announced.proxy.blackhole()
        begun = time.monotonic()
        replies = ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
        took = time.monotonic() - begun
        unknown = [r for r in replies[: len(theirs)] if isinstance(r, WriteOutcomeUnknown)]
        assert len(unknown) == len(theirs), replies[: len(theirs)]
        assert replies[len(theirs) :] == [2] * len(ours)  # applied, and their replies read
        assert took < 2 * DEADLINE
        # Another partial call: the hung master now needs a new connection (the first was
        # dropped), which hangs in its handshake; the others' pipelines still go out and are read.
        replies = ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
        assert all(isinstance(r, StoreUnavailable | WriteOutcomeUnknown)
                   for r in replies[: len(theirs)])  # fmt: skip
        assert replies[len(theirs) :] == [3] * len(ours)
        # Without partial the whole call is of unknown outcome, as before.
        with pytest.raises((WriteOutcomeUnknown, StoreUnavailable)):
            ex.call([("INCR", k) for k in theirs + ours], write=True)
    finally:
        announced.proxy.heal()
        ex.close()


def test_a_hung_master_costs_a_partial_call_its_deadline_and_one_slot_map_read(
    hung: tuple[ClusterSet, Announced], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the hung master's connection is lost, each call (each probe) finds the slot map
    stale and reads it, then connects to that master anew.  The call must end at its deadline:
    no second read of the map after the master failed (the map was read during the call), and
    the new connection's handshake given only what is left of the deadline."""
    cluster, announced = hung
    theirs, ours = _executor_batch(cluster, announced.node)
    topology = _topology(cluster)
    ex = topology.executor(timeout=2.0, deadline=DEADLINE)
    me, reads, refresh = threading.current_thread(), [0], topology.refresh

    def counted() -> None:  # this thread's reads of the slot map (a mover may read it too)
        reads[0] += threading.current_thread() is me
        refresh()

    monkeypatch.setattr(topology, "refresh", counted)
    try:
        ex.call([("SET", k, 1) for k in theirs + ours], write=True)
        announced.proxy.blackhole()
        ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)  # conn lost
        for n in range(3, 6):
            reads[0] = 0
            begun = time.monotonic()
            replies = ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
            took = time.monotonic() - begun
            assert all(isinstance(r, StoreUnavailable) for r in replies[: len(theirs)])
            assert replies[len(theirs) :] == [n] * len(ours)
            assert reads[0] == 1, f"the slot map read {reads[0]} times in one call"
            assert took < 2 * DEADLINE, f"a call took {took:.3f} s (deadline {DEADLINE} s)"
    finally:
        announced.proxy.heal()
        ex.close()


def test_a_connection_made_late_in_a_call_shakes_hands_within_its_deadline(
    hung: tuple[ClusterSet, Announced],
) -> None:
    """A new connection to a hung master, made with 0.1 s of a 1 s deadline left, gives up
    after that 0.1 s (connect and handshake), not after the connection's socket timeout."""
    cluster, announced = hung
    node = _topology(cluster).node(f"{announced.proxy.host}:{announced.proxy.port}")
    ex = NodeExecutor(node, timeout=2.0, deadline=1.0)
    announced.proxy.blackhole()
    try:
        begun = time.monotonic()
        with pytest.raises(StoreUnavailable, match="nothing was sent"):
            ex.send([("INCR", "k")], write=True, until=begun + 0.1)
        took = time.monotonic() - begun
        assert took < 0.3, f"the handshake waited {took:.3f} s"
    finally:
        announced.proxy.heal()
        ex.close()


def _view_calls_on_a_hung_master(hung: tuple[ClusterSet, Announced]) -> list[float]:
    """Two partial calls of a view (deadline DEADLINE) of an executor with no call deadline (a
    map's default: replies waited for up to the socket timeout, 2 s), one master hung: how
    long each took.  The first meets the hung master on the executor's idle connection, the
    second on a new one (the first was dropped), whose handshake hangs.  The healthy masters'
    parts are answered, and the executor's connections to them then serve its own calls."""
    cluster, announced = hung
    theirs, ours = _executor_batch(cluster, announced.node)
    ex = _topology(cluster).executor(timeout=2.0)
    view = ex.within(DEADLINE)
    took = []
    try:
        ex.call([("SET", k, 1) for k in theirs + ours], write=True)  # a connection to each
        announced.proxy.blackhole()
        for n in (2, 3):
            begun = time.monotonic()
            replies = view.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
            took.append(time.monotonic() - begun)
            assert all(isinstance(r, StoreUnavailable | WriteOutcomeUnknown)
                       for r in replies[: len(theirs)])  # fmt: skip
            assert replies[len(theirs) :] == [n] * len(ours)
        assert ex.call([("GET", k) for k in ours], write=False) == [b"3"] * len(ours)
    finally:
        announced.proxy.heal()
        ex.close()
    return took


def test_a_view_of_the_executor_waits_its_own_deadline_for_a_hung_master(
    hung: tuple[ClusterSet, Announced],
) -> None:
    """A Cluster map's probes: a view of the data executor (issue 16 goal 1), on its
    connections, each call ended at probe_deadline as a probe executor of its own did."""
    took = _view_calls_on_a_hung_master(hung)
    assert max(took) < 2 * DEADLINE, f"the view's calls took {took} s (deadline {DEADLINE} s)"


def test_control_a_view_with_the_executors_deadline_waits_the_socket_timeout(
    hung: tuple[ClusterSet, Announced], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClusterExecutor, "within", lambda self, deadline: self)
    took = _view_calls_on_a_hung_master(hung)
    assert min(took) >= 1.0, took


def _with_no_idle_connection(hung: tuple[ClusterSet, Announced]) -> tuple[list[object], int]:
    """A partial write once the hung master's connection was lost (it is a suspect) and no
    master has an idle connection (a probe, a view of the same executor, holds them while it
    waits out the hung master's handshake): the healthy masters' replies, and the INCR value
    applied ones read.  The hung master's part comes first in the batch."""
    cluster, announced = hung
    theirs, ours = _executor_batch(cluster, announced.node)
    ex = _topology(cluster).executor(timeout=2.0, deadline=DEADLINE)
    try:
        ex.call([("SET", k, 1) for k in theirs + ours], write=True)
        announced.proxy.blackhole()
        ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)  # conn lost
        ex.close()
        replies = ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
    finally:
        announced.proxy.heal()
        ex.close()
    return replies[len(theirs) :], 3


def test_new_connections_go_to_the_healthy_masters_before_a_suspected_one(
    hung: tuple[ClusterSet, Announced],
) -> None:
    replies, applied = _with_no_idle_connection(hung)
    assert replies == [applied] * len(replies)


def test_control_connecting_in_batch_order_loses_the_healthy_masters_parts(
    hung: tuple[ClusterSet, Announced], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClusterTopology, "suspected", lambda self, address: False)
    replies, _ = _with_no_idle_connection(hung)
    assert all(isinstance(r, StoreUnavailable) for r in replies), replies


async def test_the_async_executor_too_reports_a_hung_master_in_its_place(
    hung: tuple[ClusterSet, Announced],
) -> None:
    cluster, announced = hung
    theirs, ours = _executor_batch(cluster, announced.node)
    ex = _topology(cluster).async_executor(timeout=2.0, deadline=DEADLINE)
    try:
        await ex.call([("SET", k, 1) for k in theirs + ours], write=True)
        announced.proxy.blackhole()
        replies = await ex.call([("INCR", k) for k in theirs + ours], write=True, partial=True)
        assert all(isinstance(r, WriteOutcomeUnknown) for r in replies[: len(theirs)]), replies
        assert replies[len(theirs) :] == [2] * len(ours)
        with pytest.raises(WriteOutcomeUnknown):
            await ex.call([("INCR", k) for k in theirs + ours], write=True)
    finally:
        announced.proxy.heal()
        await ex.aclose()


def _renewed_since(core: object, buckets: list[int], since: float) -> bool:
    """Whether a probe sent at ``since`` or later answered every one of ``buckets``."""
    return all(core.buckets[b].replied_at >= since for b in buckets)  # type: ignore[attr-defined]


def _gone(m: SyncMap | aio.SyncMap, keys: list[str]) -> bool:
    """Whether ``keys`` left the near cache (under the guard, under which the timer flushes a
    lapsed bucket in one step)."""
    with m._state.guard:
        return all(k not in m._core.entries for k in keys)


def test_a_hung_masters_buckets_lapse_and_the_others_stay_renewed(
    hung: tuple[ClusterSet, Announced],
) -> None:
    cluster, announced = hung
    _, theirs, cut = _split(cluster, "hung")
    ours = [b for b in range(BUCKETS) if b not in theirs]
    kept = [k for k in KEYS if k not in cut]
    with SyncMap("hung", cluster.url, config=_config()) as m:
        m.update({k: 0 for k in KEYS})
        # Read until every key is cached (a fill that met a probe in flight is not installed).
        wait_until(lambda: all(m[k] == 0 and m._servable(k) is not None for k in KEYS), 2.0,
                   "every key cached")  # fmt: skip
        lapses = m.statistics().lease_lapses
        announced.proxy.blackhole()
        hung_at = time.monotonic()
        wait_until(lambda: _gone(m, cut), 4 * DELTA, "the hung master's buckets lapsing")
        # The other masters' buckets answered probes sent a whole Δ after the hang began: their
        # leases were renewed all along, none lapsed, their entries are still hits.
        wait_until(lambda: _renewed_since(m._core, ours, hung_at + DELTA), 4 * DELTA,
                   "the other masters' buckets renewed by a probe during the hang")  # fmt: skip
        assert m.statistics().lease_lapses - lapses <= len(theirs)  # theirs alone lapsed
        hits = m.statistics().hits
        assert all(m[k] == 0 for k in kept)
        assert m.statistics().hits == hits + len(kept)
        # A write over every master: the hung master's part did not run (its connection, lost
        # to a probe, cannot be made again) or ran with an unknown outcome; the others' parts
        # applied, and read back.
        with pytest.raises((StoreUnavailable, WriteOutcomeUnknown), match="bucket"):
            m.update({k: 1 for k in KEYS})
        assert _gone(m, cut)
        assert all(m[k] == 1 for k in kept)
        announced.proxy.heal()


def _presence_on(cluster: ClusterSet, victim: ClusterNodeProcess) -> str:
    """A map name whose presence hash is on ``victim``, which owns some of its buckets."""
    for i in range(1000):
        name, layout = f"hungp{i}", Layout("sm", f"hungp{i}", BUCKETS)
        mine = [b for b in range(BUCKETS) if _owner(cluster, name, b) is victim]
        if cluster.master_for_slot(slot_for(layout.presence)) is victim and 0 < len(mine) < 16:
            return name
    raise AssertionError("no map name puts its presence hash on the victim")


def test_a_presence_write_to_the_hung_master_holds_no_probe_back(
    hung: tuple[ClusterSet, Announced],
) -> None:
    """The map's presence hash on the hung master, due every 0.1 s: written on the probe thread
    between probes, it waited ``call_timeout`` there and the next probe came too late for the
    other masters' leases.  Now it waits while probes go unanswered: none of theirs lapses."""
    cluster, announced = hung
    name = _presence_on(cluster, announced.node)
    theirs = [b for b in range(BUCKETS) if _owner(cluster, name, b) is announced.node]
    kept = [k for k in KEYS if _bucket(k) not in theirs]
    cfg = MapConfig(max_staleness=DELTA, call_timeout=DEADLINE, socket_timeout=1.0,
                    presence_interval=0.1)  # fmt: skip
    with SyncMap(name, cluster.url, config=cfg) as m:
        m.update({k: 0 for k in KEYS})
        wait_until(lambda: all(m[k] == 0 and m._servable(k) is not None for k in kept), 2.0,
                   "every other master's key cached")  # fmt: skip
        lapses = m.statistics().lease_lapses
        announced.proxy.blackhole()
        try:
            # The hang itself: its length is what is observed.  The map is read meanwhile (hits,
            # no I/O): an unread map would idle and let every lease lapse (leasing.py).
            end = time.monotonic() + 4 * DELTA
            while time.monotonic() < end:
                m.get(kept[0])
                time.sleep(0.02)
            hits = m.statistics().hits
            assert all(m[k] == 0 for k in kept)
            assert m.statistics().hits == hits + len(kept), "another master's entry was dropped"
            lapsed = m.statistics().lease_lapses - lapses
            assert lapsed <= len(theirs), f"{lapsed} leases lapsed, {len(theirs)} on the hung one"
        finally:
            announced.proxy.heal()


async def test_an_async_maps_probe_too_renews_the_answering_masters_buckets(
    hung: tuple[ClusterSet, Announced],
) -> None:
    cluster, announced = hung
    _, theirs, cut = _split(cluster, "hung")
    ours = [b for b in range(BUCKETS) if b not in theirs]
    kept = [k for k in KEYS if k not in cut]
    async with aio.SyncMap("hung", cluster.url, config=_config()) as m:
        await m.update({k: 0 for k in KEYS})
        until = time.monotonic() + 2.0

        async def all_cached() -> bool:
            # A read may fail while the proxy is being announced (this fixture's) and the map
            # re-reads the slot map: that is before the fault, so read again.
            try:
                values = [await m.get(k) for k in KEYS]
            except StoreUnavailable:
                return False
            return values == [0] * len(KEYS) and all(m.get_cached(k, None) == 0 for k in KEYS)

        while not await all_cached():  # (a fill that met a probe in flight is not installed)
            assert time.monotonic() < until, "the keys were not cached"
        lapses = m.statistics().lease_lapses
        announced.proxy.blackhole()
        hung_at = time.monotonic()
        until = hung_at + 5 * DELTA
        while not (_gone(m, cut) and _renewed_since(m._core, ours, hung_at + DELTA)):
            assert time.monotonic() < until, "no lapse of the hung master's buckets alone"
            await asyncio.sleep(0.005)
        # The hung master's buckets may also go by its sharded feed's loss (a resync, not a
        # lapse); the others' neither lapsed nor were flushed.
        assert m.statistics().lease_lapses - lapses <= len(theirs)
        assert all(m.get_cached(k) == 0 for k in kept)
        with pytest.raises((StoreUnavailable, WriteOutcomeUnknown), match="bucket"):
            await m.update({k: 1 for k in KEYS})
        assert _gone(m, cut)
        assert [await m.get(k) for k in kept] == [1] * len(kept)
        announced.proxy.heal()
