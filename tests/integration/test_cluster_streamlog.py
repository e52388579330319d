"""The stream route on a Redis Cluster: a log per bucket, replayed when a subscriber comes back.

``feed="redis+stream://?maxlen=N"`` (no host: the store's own cluster) makes every write script
SPUBLISH on its bucket's channel and XADD to its bucket's log ``<tag>:log``, in the bucket's
slot (target ``!S:<maxlen>``).  Live delivery stays the sharded subscriber; when a master's
subscriber connections are cut (S28's fault: ``CLIENT KILL`` of every pub/sub client there)
while another map writes that master's buckets, the buckets are repaired by replaying their log:
their other cached entries stay, nothing is stale, no flush.  Controls: the same fault with
replay off (``Guards(log_replay=False)``) flushes them; a log trimmed past the cached sequence
falls back to the flush and stays correct.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from syncmap import ConfigurationError, MapConfig, SyncMap, aio
from syncmap.core.nearcache import Guards
from syncmap.core.wire import decode_message
from syncmap.feed.sharded import ShardedSubscriber
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.stats import Statistics
from syncmap.store.cluster import slot_for
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.faults import kill_subscribers, subscribers
from syncmap.testing.wait import wait_until

KEYS = [f"k{i}" for i in range(64)]  # every one of 16 buckets, several times
STREAM = "redis+stream://?maxlen=1000"
SLOW_PROBE = 4.0  # Δ: the probe's own repair of a bucket behind (grace Δ/4) stays out of the way


def _bucket(key: str) -> int:
    return bucket_of(encode_key(key, 1024), 16)


def _cached(m: SyncMap, key: str) -> Any:
    got = m.peek(key)
    return None if got is None else got[0]


# ---- the route -------------------------------------------------------------------------------


def test_a_write_logs_in_its_buckets_slot_and_reaches_others_live(
    shared_cluster: ClusterSet,
) -> None:
    url, layout = shared_cluster.url, Layout("sm", "logged", 16)
    with SyncMap("logged", url, feed=STREAM) as a, SyncMap("logged", url, feed=STREAM) as b:
        a.update({k: 0 for k in KEYS})
        assert all(b[k] == 0 for k in KEYS)
        heard = b.statistics().messages
        for k in KEYS:
            a[k] = 1
        wait_until(lambda: b.statistics().messages >= heard + len(KEYS), 2.0,
                   "b hearing every write live on the buckets' sharded channels")  # fmt: skip
        assert all(_cached(b, k) in (None, 1) for k in KEYS) and all(b[k] == 1 for k in KEYS)
    bucket = _bucket("k7")
    last = [k for k in KEYS if _bucket(k) == bucket][-1]  # the bucket's newest write
    log = layout.bucket_log(bucket)
    assert slot_for(log) == slot_for(layout.data(bucket))
    client = shared_cluster.client()
    newest = client.xrevrange(log, count=1)
    msg = decode_message(newest[0][1][b"m"])
    assert (msg.bucket, msg.fields) == (bucket, (encode_key(last, 1024),))
    assert msg.seq == int(client.hget(layout.data(bucket), "#s"))


def test_a_stream_url_naming_a_node_of_the_cluster_is_refused(shared_cluster: ClusterSet) -> None:
    host, port = shared_cluster.startup_nodes[0]
    with pytest.raises(ConfigurationError, match="without a host"):
        SyncMap("logged", shared_cluster.url, feed=f"redis+stream://{host}:{port}")


# ---- a cut subscriber: replay instead of flush -------------------------------------------------


def _victim(cs: ClusterSet, name: str) -> tuple[Any, list[int]]:
    """A master and the buckets of map ``name`` it serves."""
    layout = Layout("sm", name, 16)
    owner = {b: cs.master_for_slot(slot_for(layout.data(b))) for b in range(16)}
    victim = owner[0]
    return victim, [b for b in range(16) if owner[b] is victim]


@pytest.fixture
def stream_node_size(shared_cluster: ClusterSet) -> Iterator[Callable[[int], None]]:
    """Set ``stream-node-max-entries`` on every master (restored after): with 1, ``MAXLEN ~``
    trims entry by entry, so a small ``maxlen`` really drops the older entries."""
    admins = [shared_cluster.node_client(m.addr) for m in shared_cluster.masters()]
    before = [a.config_get("stream-node-max-entries")["stream-node-max-entries"] for a in admins]

    def set_all(n: int) -> None:
        for a in admins:
            a.config_set("stream-node-max-entries", n)

    try:
        yield set_all
    finally:
        for a, was in zip(admins, before, strict=True):
            a.config_set("stream-node-max-entries", was)
            a.close()


def _cut_and_write(cs: ClusterSet, writer: SyncMap, victim: Any, keys: list[str], rounds: int
                   ) -> None:  # fmt: skip
    """S28's fault: every subscriber connection of ``victim`` cut, then ``keys`` written
    ``rounds`` times before any subscriber of this process can subscribe again: the process's
    sharded subscriber is held (its lock) from before the cut until the writes are done, so a
    node reader that finds its connection lost waits to report it, and every message of those
    writes is certainly lost to the maps (S28 relies on the tens of ms a re-subscription takes;
    a test must not)."""
    sub = ShardedSubscriber._registry[writer._topology.key]
    admin = cs.node_client(victim.addr, socket_timeout=2.0)
    try:
        connected = len(subscribers(admin))
        with sub._lock:
            assert kill_subscribers(admin) > 0
            for n in range(rounds):
                for k in keys:
                    writer[k] = 100 + n
        wait_until(lambda: len(subscribers(admin)) >= connected, 5.0,
                   "the victim's subscriber connections back")  # fmt: skip
    finally:
        admin.close()


def _cut_run(cs: ClusterSet, feed: str, guards: Guards, rounds: int = 3) -> tuple[
    Statistics, Statistics, dict[str, Any], list[str], list[str]
]:  # fmt: skip
    """A reader caching every key; the victim master's subscribers cut while a writer writes
    one key of each of its buckets.  Returns the reader's statistics before and after it came
    back (every victim channel replayed or given up, then two probes), what it caches then,
    the written keys and the untouched keys of those buckets."""
    victim, buckets = _victim(cs, "cut")
    written = [next(k for k in KEYS if _bucket(k) == b) for b in buckets]
    kept = [k for k in KEYS if _bucket(k) in buckets and k not in written]
    # Probing every Δ/4 (no PING leases): the run waits for two probes after the cut; with
    # leases probes come only when asked, so that count would not be a clock.
    cfg = MapConfig(max_staleness=SLOW_PROBE, guards=guards, ping_leases=False)
    with SyncMap("cut", cs.url, feed=feed, config=cfg) as reader, \
            SyncMap("cut", cs.url, feed=feed) as writer:  # fmt: skip
        writer.update({k: 0 for k in KEYS})
        assert all(reader[k] == 0 for k in KEYS)
        before = reader.statistics()
        _cut_and_write(cs, writer, victim, written, rounds)
        if guards.log_replay:
            wait_until(lambda: _replay_rounds(reader.statistics(), before) >= len(buckets), 5.0,
                       "every cut channel back and replayed (or given up)")  # fmt: skip
        # The repair probe goes as soon as the last channel is confirmed (on_buckets_up); a
        # regular one may be sent between the reconnection and that: two probes cover both.
        probes = reader._core._probes
        wait_until(lambda: reader._core._probes >= probes + 2, 3 * SLOW_PROBE,
                   "two probes after the subscribers came back")  # fmt: skip
        cached = {k: _cached(reader, k) for k in KEYS}
        assert all(reader[k] == 100 + rounds - 1 for k in written)  # never stale
        return before, reader.statistics(), cached, written, kept


def _replay_rounds(now: Statistics, before: Statistics) -> int:
    return (now.log_replays - before.log_replays) + (
        now.log_replay_fallbacks - before.log_replay_fallbacks
    )


def test_a_cut_subscriber_replays_the_log_and_flushes_nothing(shared_cluster: ClusterSet) -> None:
    before, after, cached, written, kept = _cut_run(shared_cluster, STREAM, Guards())
    assert after.resyncs == before.resyncs, "a bucket was flushed"
    assert all(cached[k] == 0 for k in kept), "an untouched entry of a cut bucket was dropped"
    assert all(cached[k] in (None, 102) for k in written)
    assert after.log_replayed_messages > before.log_replayed_messages  # missed, then replayed
    assert after.log_replay_fallbacks == before.log_replay_fallbacks


def test_control_replay_off_the_same_cut_flushes_the_buckets(shared_cluster: ClusterSet) -> None:
    before, after, cached, _, kept = _cut_run(shared_cluster, STREAM, Guards(log_replay=False))
    assert after.log_replays == before.log_replays
    assert after.resyncs > before.resyncs
    assert any(cached[k] is None for k in kept)


def test_a_log_trimmed_past_the_cached_sequence_falls_back_to_a_flush(
    shared_cluster: ClusterSet, stream_node_size: Callable[[int], None]
) -> None:
    stream_node_size(1)
    before, after, cached, written, _ = _cut_run(
        shared_cluster, "redis+stream://?maxlen=1", Guards(), rounds=4
    )
    assert after.log_replay_fallbacks > before.log_replay_fallbacks
    assert after.resyncs > before.resyncs  # the flush a lost channel always caused
    assert all(cached[k] in (None, 103) for k in written)


async def test_an_async_map_replays_the_log_after_a_cut(shared_cluster: ClusterSet) -> None:
    cs = shared_cluster
    victim, buckets = _victim(cs, "acut")
    written = [next(k for k in KEYS if _bucket(k) == b) for b in buckets]
    kept = [k for k in KEYS if _bucket(k) in buckets and k not in written]
    cfg = MapConfig(max_staleness=SLOW_PROBE, ping_leases=False)  # as in _cut_run
    writer = await asyncio.to_thread(SyncMap, "acut", cs.url, feed=STREAM)
    try:
        await _async_cut(cs, writer, cfg, victim, buckets, written, kept)
    finally:
        await asyncio.to_thread(writer.close)


async def _async_cut(cs: ClusterSet, writer: SyncMap, cfg: MapConfig, victim: Any,
                     buckets: list[int], written: list[str], kept: list[str]) -> None:  # fmt: skip
    async with aio.SyncMap("acut", cs.url, feed=STREAM, config=cfg) as reader:
        await asyncio.to_thread(writer.update, {k: 0 for k in KEYS})
        assert [await reader.get(k) for k in KEYS] == [0] * len(KEYS)
        before = reader.statistics()
        admin = cs.node_client(victim.addr, socket_timeout=2.0)
        try:
            connected = len(subscribers(admin))
            assert kill_subscribers(admin) > 0  # the loop's subscriber connections to it
            # Written by a thread map, blocking the loop on purpose: its subscriber cannot see
            # the cut, let alone subscribe again, before every write is done (all missed).
            for n in range(3):
                for k in written:
                    writer[k] = 100 + n
            await _poll(lambda: len(subscribers(admin)) >= connected, "subscribers back")
        finally:
            admin.close()
        probes = reader._core._probes  # as in the thread test: two probes cover the repair
        await _poll(lambda: reader._core._probes >= probes + 2, "two probes", 3 * SLOW_PROBE)
        after = reader.statistics()
        assert after.resyncs == before.resyncs, "a bucket was flushed"
        assert all(reader.get_cached(k, None) == 0 for k in kept)
        assert [await reader.get(k) for k in written] == [102] * len(written)
        assert after.log_replayed_messages > before.log_replayed_messages
        assert after.log_replay_fallbacks == before.log_replay_fallbacks


async def _poll(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """``wait_until`` for a test on the loop: the map's tasks must run while it waits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # polling, with a deadline


# ---- a slot moved: the channel's sunsubscribe takes the same replay ----------------------------


def _moved_run(cs: ClusterSet, guards: Guards) -> tuple[Statistics, Statistics, dict[str, Any],
                                                        str, list[str]]:  # fmt: skip
    """A reader caching every key; one bucket's slot migrated (the classic way) to another
    master while a writer writes one key of it.  Returns the reader's statistics before and
    after (the channel back on the new owner and replayed or given up, then two probes), what
    it caches then, the written key and the bucket's untouched keys.  The slot goes back to its
    first owner afterwards (the module's cluster is left as found).

    Order: the process's sharded subscriber is held (as in :func:`_cut_and_write`) from before
    the migration until the writes are done -> SETSLOT NODE everywhere: the old owner pushes
    ``sunsubscribe`` for the bucket's channel (its node reader waits for the hold to report it)
    -> the writer, redirected by MOVED, writes on the new owner, where nothing of this process
    subscribes the channel yet: every one of those messages is missed -> released: on_down,
    re-SSUBSCRIBE on the new owner, confirmed -> the log, moved with the slot, is replayed."""
    bucket = next(b for b in range(16) if sum(_bucket(k) == b for k in KEYS) >= 3)
    written, *kept = [k for k in KEYS if _bucket(k) == bucket]
    slot = slot_for(Layout("sm", "moved", 16).data(bucket))
    source = cs.master_for_slot(slot)
    target = next(m for m in cs.masters() if m is not source)
    cfg = MapConfig(max_staleness=SLOW_PROBE, guards=guards, ping_leases=False)  # as in _cut_run
    try:
        with SyncMap("moved", cs.url, feed=STREAM, config=cfg) as reader, \
                SyncMap("moved", cs.url, feed=STREAM) as writer:  # fmt: skip
            writer.update({k: 0 for k in KEYS})
            assert all(reader[k] == 0 for k in KEYS)
            before = reader.statistics()
            sub = ShardedSubscriber._registry[writer._topology.key]
            with sub._lock:
                cs.migrate_slot(slot, target)
                for n in range(3):
                    writer[written] = 100 + n
            assert cs.master_for_slot(slot) is target
            if guards.log_replay:
                wait_until(lambda: _replay_rounds(reader.statistics(), before) >= 1, 5.0,
                           "the moved channel back and replayed (or given up)")  # fmt: skip
            probes = reader._core._probes  # as in _cut_run: two probes cover the repair
            wait_until(lambda: reader._core._probes >= probes + 2, 3 * SLOW_PROBE,
                       "two probes after the channel moved")  # fmt: skip
            cached = {k: _cached(reader, k) for k in KEYS}
            assert reader[written] == 102  # never stale
            return before, reader.statistics(), cached, written, kept
    finally:
        cs.migrate_slot(slot, source)


def test_a_moved_slot_replays_its_buckets_log_and_flushes_nothing(
    shared_cluster: ClusterSet,
) -> None:
    before, after, cached, written, kept = _moved_run(shared_cluster, Guards())
    assert after.log_replays > before.log_replays
    assert after.log_replayed_messages >= before.log_replayed_messages + 3  # all three missed
    assert after.log_replay_fallbacks == before.log_replay_fallbacks
    assert after.resyncs == before.resyncs, "the moved bucket was flushed"
    assert all(cached[k] == 0 for k in kept), "an untouched entry of the moved bucket was dropped"
    assert cached[written] in (None, 102)


def test_control_replay_off_a_moved_slot_flushes_its_bucket(shared_cluster: ClusterSet) -> None:
    before, after, cached, _, kept = _moved_run(shared_cluster, Guards(log_replay=False))
    assert after.log_replays == before.log_replays
    assert after.resyncs > before.resyncs
    assert any(cached[k] is None for k in kept)
