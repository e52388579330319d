"""Maps, locks and fenced writes on a real Redis Cluster (3 masters + 3 replicas; issue 14).

* every script touches one slot: each map and lock operation runs on the cluster, and the
  control shows such a run would catch a script reaching into another slot (``CROSSSLOT``);
* a map's buckets spread over every master, and servers' near caches agree through per-bucket
  sharded channels (layout 2s), on both drivers;
* a master killed (its replica promoted) and a slot migrated while servers write: every cache
  converges on the store, and changes made on the new owner keep arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest

from syncmap import (
    ConfigurationError,
    Lock,
    LockNotAcquired,
    MapConfig,
    RWLock,
    Semaphore,
    SyncMap,
    aio,
)
from syncmap.errors import StoreError, StoreUnavailable, WriteOutcomeUnknown
from syncmap.keys import Layout, LockLayout, bucket_of, encode_key
from syncmap.store import commands
from syncmap.store.cluster import slot_for
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.lockcheck import LockLoad
from syncmap.testing.lockload import placed
from syncmap.testing.wait import wait_until

KEYS = [f"k{i}" for i in range(64)]  # every one of 16 buckets, several times


def _cached(m: SyncMap, key: str) -> Any:
    got = m.peek(key)
    return None if got is None else got[0]


def _bucket_of(key: str, buckets: int = 16) -> int:
    return bucket_of(encode_key(key, 1024), buckets)


def _write_until_done(m: SyncMap, key: str, value: Any, timeout: float = 30.0) -> None:
    """Retry a write through a failover: refused (nothing ran) or unknown (read it back)."""
    until = time.monotonic() + timeout
    while True:
        try:
            m[key] = value
            return
        except (StoreUnavailable, WriteOutcomeUnknown):
            if time.monotonic() > until:
                raise
            time.sleep(0.05)  # the cluster is electing a new master: back off, then retry


# ---- one slot per script -----------------------------------------------------------------------


def _every_map_script(url: str, feed: str | None) -> None:
    with SyncMap("scripts", url, feed=feed) as m:
        m["a"] = 1
        m.set("b", 2, ttl=60)
        assert m.swap("a", 3) == 1
        m.setdefault("c", 4)
        assert m.compare_and_set("a", 3, 5)
        assert m.compare_and_delete("c", 4)
        del m["b"]
        m.update({k: i for i, k in enumerate(KEYS)})
        assert m.transform("a", lambda v: v + 1) == 6
        assert len(m) == len(KEYS) + 1
        assert dict(m.items())["k7"] == 7
        with m.lock("a") as fence:
            m.set("a", 9, fence=fence)
            m.delete("a", fence=fence)
        m.clear()
        assert len(m) == 0


def test_every_map_and_lock_script_runs_in_one_slot(shared_cluster: ClusterSet) -> None:
    url = shared_cluster.url
    for feed in (None, "redis+stream://?maxlen=100"):  # targets '!s' and '!S:100' (bucket logs)
        _every_map_script(url, feed)
    assert shared_cluster.client().xlen(Layout("sm", "scripts", 16).bucket_log(_bucket_of("a"))) > 0
    with Lock("plain", url, lease=5):
        pass
    rw = RWLock("rw", url, lease=5)
    with rw.read:
        pass
    with rw.write:
        pass
    with Semaphore("sem", 2, url, lease=5):
        pass
    # Waiters that queue, are named and give up: the queues' scripts (lock queue 2).
    with rw.write, pytest.raises(LockNotAcquired):
        RWLock("rw", url, lease=5).read.acquire(timeout=0.2)
    with rw.read, pytest.raises(LockNotAcquired):
        RWLock("rw", url, lease=5).write.acquire(timeout=0.2)
    with Semaphore("sem1", 1, url, lease=5), pytest.raises(LockNotAcquired):
        Semaphore("sem1", 1, url, lease=5).acquire(timeout=0.2)
    # The map's 16 buckets live on every master: one Redis does not hold it.
    owners = {shared_cluster.master_for_slot(slot_for(Layout("sm", "scripts", 16).data(b))).port
              for b in range(16)}  # fmt: skip
    assert len(owners) == 3


def test_a_fence_from_another_slot_is_refused_before_sending(shared_cluster: ClusterSet) -> None:
    with SyncMap("fenced", shared_cluster.url) as m, Lock("elsewhere", shared_cluster.url) as fence:
        with pytest.raises(ConfigurationError, match=r"map\.lock\(key\)"):
            m.set("a", 1, fence=fence)
        assert m.get("a") is None


def test_control_without_the_check_redis_refuses_the_script_crossslot(
    shared_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guard off: the write reaches Redis with its fence counter in another slot.  Redis refuses
    # it (nothing ran), which is what the test above would see for any script that left its slot.
    monkeypatch.setattr(commands, "check_fence_slot", lambda *args: None)
    with SyncMap("fenced", shared_cluster.url) as m, Lock("elsewhere", shared_cluster.url) as fence:
        with pytest.raises(StoreError, match="CROSSSLOT"):
            m.set("a", 1, fence=fence)


def test_the_lock_workload_places_its_lock_where_it_can_fence_the_map(
    shared_cluster: ClusterSet,
) -> None:
    """S13 on a Cluster (``lockload.placed``): its lock goes to the slot of its key's bucket, as
    ``map.lock(key)`` would put it, so its fence is checked in the write's slot.  Control: the
    lock by its name alone is refused there.  Elsewhere the workload is left as it is."""
    cfg = placed(LockLoad(shared_cluster.url))
    with SyncMap(cfg.map, cfg.url) as m:
        assert cfg.hash_tag is not None and cfg.hash_tag == m.lock(cfg.key).layout.tag
        with Lock(cfg.lock, cfg.url, lease=5, hash_tag=cfg.hash_tag) as fence:
            m.set(cfg.key, ["w0-1"], fence=fence)
        with Lock(cfg.lock, cfg.url, lease=5) as fence:
            with pytest.raises(ConfigurationError, match=r"map\.lock\(key\)"):
                m.set(cfg.key, ["w0-2"], fence=fence)
        assert m.get(cfg.key) == ["w0-1"]
    assert placed(LockLoad("redis://127.0.0.1:1/0")).hash_tag is None  # no I/O: not sharded


# ---- coherence -------------------------------------------------------------------------------


def _agree(url: str) -> None:
    """a writes every key once; b, which cached them all, hears each write as a message on its
    bucket's channel (not only through a probe): its message count grows by one per write."""
    with SyncMap("agree", url) as a, SyncMap("agree", url) as b:
        a.update({k: 0 for k in KEYS})
        assert all(b[k] == 0 for k in KEYS)  # b caches every key
        heard = b.statistics().messages
        for k in KEYS:
            a[k] = 1
        wait_until(lambda: b.statistics().messages >= heard + len(KEYS), 2.0,
                   "b hearing every write on the buckets' sharded channels")  # fmt: skip
        assert all(b[k] == 1 for k in KEYS)


def test_servers_agree_through_every_masters_sharded_channels(shared_cluster: ClusterSet) -> None:
    _agree(shared_cluster.url)


def test_control_scripts_publishing_where_nobody_listens_are_not_heard(
    shared_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guard off: the write scripts PUBLISH on the map-wide channel of layout 2 while the servers
    # SSUBSCRIBE the bucket channels, the mismatch a client mixing the layouts would make.
    from syncmap.feed import routing

    opened = routing.open_store_feed

    def mismatched(*args: Any) -> Any:
        feed, _ = opened(*args)
        return feed, args[2].channel

    monkeypatch.setattr(routing, "open_store_feed", mismatched)
    monkeypatch.setattr("syncmap.map.open_store_feed", mismatched)
    with pytest.raises(AssertionError, match="sharded channels"):
        _agree(shared_cluster.url)


async def test_an_async_and_a_sync_server_agree_on_a_cluster(shared_cluster: ClusterSet) -> None:
    url = shared_cluster.url
    sync_map = await asyncio.to_thread(SyncMap, "mixed", url)
    try:
        async with aio.SyncMap("mixed", url) as am:
            await am.update({k: 0 for k in KEYS})
            assert [await am.get(k) for k in KEYS] == [0] * len(KEYS)
            await asyncio.to_thread(sync_map.update, {k: 2 for k in KEYS})
            deadline = time.monotonic() + 2.0
            while any(am.get_cached(k) == 0 for k in KEYS):
                assert time.monotonic() < deadline, "the async map kept a stale value"
                await asyncio.sleep(0.005)
            assert [await am.get(k) for k in KEYS] == [2] * len(KEYS)
    finally:
        await asyncio.to_thread(sync_map.close)


# ---- topology changes --------------------------------------------------------------------------


def test_a_killed_master_is_replaced_and_caches_converge(redis_cluster: ClusterSet) -> None:
    url = redis_cluster.url
    cfg = MapConfig(wait_replicas=1, wait_timeout=2.0)  # acknowledged = on a replica too
    with SyncMap("failover", url, config=cfg) as a, SyncMap("failover", url) as b:
        a.update({k: 0 for k in KEYS})
        assert all(b[k] == 0 for k in KEYS)
        victim = redis_cluster.master_for_slot(slot_for(Layout("sm", "failover", 16).data(0)))
        done = redis_cluster.kill_master(victim)
        redis_cluster.restart(done.old)  # back as the new master's replica: WAIT 1 can succeed
        for k in KEYS:
            _write_until_done(a, k, 1)
        # Every write after the failover, including those of the dead master's buckets, now
        # applied on its replica, reaches b: by its message on the new master's channel or by
        # the probe after b re-subscribed there.
        wait_until(lambda: all(b[k] == 1 for k in KEYS), 5.0, "b converging after the failover")
    # Locks of the failed-over shard: taken, released and handed over on the new master.
    name = next(n for n in (f"lock{i}" for i in range(1000))
                if redis_cluster.master_for_slot(slot_for(f"lock:{n}")) is done.new)  # fmt: skip
    assert _handed_over(redis_cluster, timeout=3.0, name=name) < 1.0


def test_a_slot_migrated_under_writes_keeps_every_cache_coherent(redis_cluster: ClusterSet) -> None:
    url = redis_cluster.url
    layout = Layout("sm", "moving", 16)
    slot = slot_for(layout.data(5))
    source = redis_cluster.master_for_slot(slot)
    target = next(m for m in redis_cluster.masters() if m is not source)
    mine = [k for k in KEYS if _bucket_of(k) == 5]
    with SyncMap("moving", url) as a, SyncMap("moving", url) as b:
        a.update({k: 0 for k in KEYS})
        assert all(b[k] == 0 for k in KEYS)
        stop = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                for k in mine:
                    with contextlib.suppress(StoreUnavailable, WriteOutcomeUnknown):
                        a[k] = n

        t = threading.Thread(target=writer)
        t.start()
        try:
            assert redis_cluster.migrate_slot(slot, target) >= 1
        finally:
            stop.set()
            t.join()
        # a dropped every key whose write's outcome was unknown, so a[k] is the store's value.
        wait_until(lambda: all(b[k] == a[k] for k in mine), 3.0,
                   "b converging on what was written during the move")  # fmt: skip
        # After the move: written on the new owner, and heard as messages on its channel (not
        # only found by a probe): b's message count grows by one per write.
        heard = b.statistics().messages
        for k in mine:
            a[k] = -1
        wait_until(lambda: b.statistics().messages >= heard + len(mine), 3.0,
                   "b hearing the writes on the slot's new owner")  # fmt: skip
        assert all(b[k] == -1 for k in mine)
        assert all(b[k] == 0 for k in KEYS if k not in mine)


# ---- lock waiters ------------------------------------------------------------------------------


def _handed_over(cluster: ClusterSet, timeout: float, name: str = "handoff") -> float:
    """Seconds from the holder's release until a waiter blocked behind its 30 s lease has the
    lock (the waiter gives up after ``timeout``: then its last try at the deadline takes it)."""
    url = cluster.url
    holder, waiter = Lock(name, url, lease=30), Lock(name, url, lease=30)
    holder.acquire()
    acquired: list[float] = []

    def wait() -> None:
        waiter.acquire(timeout=timeout)
        acquired.append(time.monotonic())

    t = threading.Thread(target=wait)
    t.start()
    channel = holder.layout.channel
    node = cluster.node_client(cluster.master_for_slot(slot_for(channel)))
    wait_until(lambda: node.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1] >= 1, 5.0,
               "the waiter subscribing the lock's sharded channel")  # fmt: skip
    # ... and queued (its try after subscribing): the release below must be what it waits for.
    assert slot_for(holder.layout.queue) == slot_for(channel) == slot_for(holder.layout.hold)
    wait_until(lambda: node.zcard(holder.layout.queue) == 1, 5.0, "the waiter queued")
    released = time.monotonic()
    holder.release()
    t.join()
    waiter.release()
    return acquired[0] - released


def test_a_lock_waiter_is_woken_by_the_sharded_release_message(shared_cluster: ClusterSet) -> None:
    assert _handed_over(shared_cluster, timeout=3.0) < 1.0  # woken, not at its deadline


def test_control_a_release_published_unsharded_wakes_nobody(
    shared_cluster: ClusterSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Guard off: the release goes out with plain PUBLISH while waiters SSUBSCRIBE: the waiter
    # sleeps until it next refreshes its place in the queue (a third of 5 s with a 30 s lease).
    monkeypatch.setattr(LockLayout, "notify", property(lambda self: self.channel))
    assert _handed_over(shared_cluster, timeout=3.0) > 1.0


def test_lock_waiters_take_turns_in_order_on_a_cluster(shared_cluster: ClusterSet) -> None:
    # The queue lives in the lock's slot and the release names the next waiter on the sharded
    # channel: 12 waiters, queued one after another, get the lock in that order, at one
    # release and one acquire per hand-off on the lock's master.
    url, name = shared_cluster.url, "queue"
    holder = Lock(name, url, lease=30)
    node = shared_cluster.node_client(shared_cluster.master_for_slot(slot_for(holder.layout.hold)))
    holder.acquire()
    order: list[int] = []
    threads = []
    for i in range(12):
        lock = Lock(name, url, lease=30)

        def take(i: int = i, lock: Lock = lock) -> None:
            lock.acquire(timeout=60)
            order.append(i)
            lock.release()

        threads.append(threading.Thread(target=take, daemon=True))
        threads[-1].start()
        wait_until(lambda i=i: node.zcard(holder.layout.queue) == i + 1, 10, f"waiter {i} queued")
    before = int(node.info("commandstats")["cmdstat_evalsha"]["calls"])
    holder.release()
    for t in threads:
        t.join(30)
    calls = int(node.info("commandstats")["cmdstat_evalsha"]["calls"]) - before
    assert order == list(range(12))
    assert calls <= 2 * 12 + 1, f"{calls} EVALSHA for 12 hand-offs"


def test_a_users_redis_cluster_client_opens_a_cluster_map(shared_cluster: ClusterSet) -> None:
    client = shared_cluster.client()
    with SyncMap("byclient", redis=client) as a, SyncMap("byclient", shared_cluster.url) as b:
        assert a._topology.kind == "cluster"
        a.update({k: 1 for k in KEYS})
        assert all(b[k] == 1 for k in KEYS)
    client.close()
