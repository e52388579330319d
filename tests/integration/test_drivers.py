"""One set of behaviours, two drivers (issue 15 §5): every case below runs against the thread
driver (``syncmap.SyncMap``) and the asyncio driver (``syncmap.aio.SyncMap``), so the two cannot
drift, and each on three topologies: one standalone ``redis-server``, a Sentinel set (a master,
a replica and three Sentinels, reached by ``redis+sentinel://``; one set for the module) and a
Redis Cluster (3 masters + 3 replicas, reached by ``redis+cluster://``; one for the module, so a
map's 16 buckets spread over three masters and its changes travel on sharded channels).  A test
calls ``h.call(name, *args)`` on a handle of either kind: the sync handle calls the method, the
async handle runs the coroutine on a loop thread (``testing/drivers.py``) in asyncio's debug
mode, and the test fails if any syncmap callback blocked that loop (20 ms of blocked time) or
if a task was still running after every map and lock was closed.

Where the drivers legitimately differ (and only there), the handles hide it:

* construction: ``SyncMap(...)`` connects in its constructor; ``aio.SyncMap(...)`` does no I/O
  until ``await m`` / ``async with`` / ``await m.open()`` (so a dead server surfaces there);
* the no-I/O hit path: ``m.peek(k)`` (any cached entry) vs ``m.get_cached(k)`` (a servable one,
  else ``aio.MISSING``);
* ``len(m)`` / ``k in m`` / ``m.items()`` (a view) vs ``await m.len()`` / ``await m.contains(k)``
  / ``await m.items()`` (a list);
* locks: ``with m.lock(k) as fence`` / ``acquire()`` vs ``async with`` / ``await acquire()``;
  a held aio Lock object refuses a second *task* (the thread Lock cannot tell threads apart);
* ``statistics()``, ``subscribe()``, ``watch()`` and ``lock()`` are plain methods on both (no
  I/O); ``watch()`` is iterated with ``async for`` on the async map;
* ``transform``: the async map also takes an ``async def`` function;
* closing: ``close()`` / ``with`` vs ``await aclose()`` / ``async with``.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

import syncmap.feed.arouting  # noqa: F401 - see below
from syncmap import (
    CorruptData,
    InvalidKey,
    KeyTypeError,
    MapConfig,
    StaleFence,
    StoreUnavailable,
    SyncMap,
    ValueTooLarge,
    WriteOutcomeUnknown,
    aio,
)
from syncmap.core.wire import pack_value
from syncmap.embedded import EmbeddedRedis, free_port
from syncmap.keys import bucket_of, encode_key
from syncmap.testing import loopguard
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.drivers import LoopThread
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.sentinelset import SentinelSet
from syncmap.testing.wait import wait_until

# aio.SyncMap.open() imports syncmap.feed.arouting (and its feeds) on first use, on the loop:
# 4-7 ms, once per process, which the 5 ms guard reports as a blocked loop.  Imported here,
# before any loop runs, so the guard watches the steady state (reported to the lead).
KINDS = ("sync", "async")
TOPOLOGIES = ("standalone", "sentinel", "cluster")
# The loop guard's threshold here: 20 ms of blocked time, as tests/aio's (loopguard.SLOW_CALLBACK).
# This file runs a sync map's threads, the caller's thread and a proxy's loop in the process of
# the async map, on 2 shared cores: the library's own tasks (subscriber, probe) were measured
# taking 5-11 ms of wall time a step now and then while another process kept one core busy
# (preemption, not blocking), and a full GC pass run by a sync map's thread holds the GIL for
# 25-70 ms; LoopThread counts neither (loopguard's measure).  What the guard is for, a wait on a
# sync socket, a lock or a sleep, takes a socket timeout or a pause: far more than 20 ms.
SLOW_STEP_S = loopguard.SLOW_CALLBACK
CFG = MapConfig(max_staleness=0.5, presence=False, socket_timeout=0.5, self_check_timeout=2.0)


class SyncHandle:
    kind = "sync"

    def __init__(self, m: SyncMap) -> None:
        self.m = m

    def call(self, op: str, *args: Any, **kw: Any) -> Any:
        m = self.m
        if op == "len":
            return len(m)
        if op == "contains":
            return args[0] in m
        if op in ("items", "keys", "values"):
            return list(getattr(m, op)(**kw))
        return getattr(m, op)(*args, **kw)

    def cached(self, key: Any) -> bool:
        return self.m.peek(key) is not None

    def acquire(self, key: str, **kw: Any) -> tuple[Any, Callable[[], None]]:
        """A new lock of this map on ``key``, acquired: (fence, release)."""
        lock = self.m.lock(key, lease=5.0)
        return lock.acquire(**kw), lock.release

    def close(self) -> None:
        self.m.close()


class AsyncHandle:
    kind = "async"

    def __init__(self, loop: LoopThread, m: aio.SyncMap) -> None:
        self.loop, self.m = loop, m

    def call(self, op: str, *args: Any, **kw: Any) -> Any:
        return self.loop.run(_invoke(getattr(self.m, op), args, kw))

    def cached(self, key: Any) -> bool:
        return self.loop.run(_invoke(self.m.get_cached, (key,), {})) is not aio.MISSING

    def acquire(self, key: str, **kw: Any) -> tuple[Any, Callable[[], None]]:
        lock = self.m.lock(key, lease=5.0)
        fence = self.loop.run(_invoke(lock.acquire, (), kw))
        return fence, lambda: self.loop.run(_invoke(lock.release, (), {}))

    def close(self) -> None:
        self.loop.run(_invoke(self.m.aclose, (), {}))


Handle = SyncHandle | AsyncHandle


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    """On the loop: a coroutine method awaited, a plain one (``statistics``) called.

    Every call goes through this coroutine of the test's, so the loop guard treats the call's
    steps as the test's own, as ``tests/aio/conftest.py`` does for a test's task: on a loaded
    2-core machine any step is preempted for a few ms now and then.  The library's own tasks
    (subscriber, probes, timers, lease renewals) stay attributed to syncmap and guarded."""
    result = fn(*args, **kw)
    return await result if inspect.isawaitable(result) else result


class Drivers:
    """Opens maps of either kind; closes them, then checks the async loop."""

    def __init__(self) -> None:
        self._loop: LoopThread | None = None
        self._open: list[Handle] = []

    @property
    def loop(self) -> LoopThread:
        if self._loop is None:
            self._loop = LoopThread("syncmap-test-drivers", debug=True, threshold=SLOW_STEP_S)
        return self._loop

    def open(self, kind: str, name: str, url: str, **options: Any) -> Handle:
        options.setdefault("config", CFG)
        h: Handle
        if kind == "sync":
            h = SyncHandle(SyncMap(name, url, **options))
        else:
            m = aio.SyncMap(name, url, **options)
            h = AsyncHandle(self.loop, self.loop.run(_invoke(m.open, (), {})))
        self._open.append(h)
        return h

    def close(self) -> None:
        for h in self._open:
            h.close()
        if self._loop is not None:
            leftover = self._loop.close()
            assert not leftover, f"tasks still running after every map was closed: {leftover}"
            slow = self._loop.slow_callbacks()
            assert not slow, f"syncmap code blocked the event loop: {slow[:3]}"


@pytest.fixture
def drivers() -> Iterator[Drivers]:
    d = Drivers()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def other(kind: str) -> str:
    return "async" if kind == "sync" else "sync"


@dataclass(frozen=True, slots=True)
class Store:
    """Where a case's maps connect (``url``), and a client that reaches the node that takes a
    key's writes (the master the Sentinels name; on a Cluster a ``RedisCluster``, which routes
    each command to the master of its key's slot), for what a case plants behind the maps'
    backs."""

    topology: str
    url: str
    admin: Callable[[], redis.Redis | redis.RedisCluster]


@pytest.fixture(scope="module")
def sentinels(sentinel_binary: str) -> Iterator[SentinelSet]:
    """One Sentinel set for the whole module (~3.5 s to start and stop: one per case would add
    a minute); each case empties its master first (``store``).  Nothing here fails it over."""
    with SentinelSet(binary=sentinel_binary) as s:
        yield s


@pytest.fixture(params=TOPOLOGIES)
def store(request: pytest.FixtureRequest) -> Store:
    """The store of a case, on each topology; emptied (FLUSHALL on its own private server)."""
    if request.param == "standalone":
        url = request.getfixturevalue("shared_redis_url")  # flushed by the fixture
        return Store("standalone", url, lambda: redis.Redis.from_url(url))
    if request.param == "cluster":
        c: ClusterSet = request.getfixturevalue("shared_cluster")  # one per module, flushed
        return Store("cluster", c.url, c.client)
    s: SentinelSet = request.getfixturevalue("sentinels")
    with s.client() as admin:
        admin.flushall()  # the module's private master (never the shared 6379)
    return Store("sentinel", s.url, s.client)


# ---- the table ---------------------------------------------------------------------------------


def test_every_write_returns_what_it_promises(drivers: Drivers, kind: str,
                                              store: Store) -> None:  # fmt: skip
    h = drivers.open(kind, "ops", store.url)
    v1 = h.call("set", "a", 1)
    assert isinstance(v1, int) and v1 > 0
    assert h.call("set", "a", 2) > v1  # versions grow
    assert h.call("get", "a") == 2 and h.call("get", "nope", "d") == "d"
    assert h.call("get_with_meta", "a", consistent=True)[:2] == (2, v1 + 1)
    assert h.call("swap", "a", 3) == 2 and h.call("swap", "s", 1, "none") == "none"
    assert h.call("setdefault", "a", 9) == 3 and h.call("setdefault", "b", 4) == 4
    assert h.call("compare_and_set", "a", 3, 5) is True
    assert h.call("compare_and_set", "a", 3, 6) is False
    assert h.call("compare_and_delete", "b", 0) is False
    assert h.call("compare_and_delete", "b", 4) is True
    assert h.call("transform", "c", lambda v: v + 1, 10) == 11
    assert h.call("transform", "c", lambda v: v * 2) == 22
    assert h.call("update", {"x": 1}, y=2) is None
    assert h.call("pop", "x") == 1 and h.call("pop", "x", "gone") == "gone"
    with pytest.raises(KeyError):
        h.call("pop", "x")
    assert h.call("delete", "y") is True and h.call("delete", "y") is False
    assert h.call("contains", "a") and not h.call("contains", "y")
    assert sorted(h.call("keys")) == ["a", "c", "s"] and h.call("len") == 3
    assert sorted(h.call("items")) == [("a", 5), ("c", 22), ("s", 1)]
    assert sorted(h.call("values")) == [1, 5, 22] and h.call("copy") == {"a": 5, "c": 22, "s": 1}
    assert h.call("clear") is None and h.call("len") == 0 and h.call("copy") == {}


def test_read_your_writes_and_the_hit_path(drivers: Drivers, kind: str,
                                           store: Store) -> None:  # fmt: skip
    h = drivers.open(kind, "ryw", store.url)
    for i in range(30):
        h.call("set", f"k{i % 5}", i)
        assert h.call("get", f"k{i % 5}") == i  # the own write, at once
        assert h.cached(f"k{i % 5}"), "an own write is cached: the next read costs no I/O"
    hits = h.call("statistics").hits
    assert h.call("get", "k0") == 25 and h.call("statistics").hits == hits + 1


def test_a_ttl_expires(drivers: Drivers, kind: str, store: Store) -> None:
    h = drivers.open(kind, "ttl", store.url)
    peer = drivers.open(other(kind), "ttl", store.url)
    h.call("set", "k", "v", ttl=0.3)
    h.call("set", "keep", "v")
    assert h.call("get", "k") == "v" and peer.call("get", "k") == "v"
    wait_until(lambda: h.call("get", "k") is None, 3, "the entry's expiry")
    took = wait_until(lambda: peer.call("get", "k") is None, 3, "the peer seeing the expiry")
    assert took <= CFG.max_staleness + 0.2
    assert h.call("keys") == ["keep"] and h.call("len") == 1


def test_a_stale_fence_is_refused(drivers: Drivers, kind: str, store: Store) -> None:
    """The lock of the same driver: its second holder's token supersedes the first's."""
    h = drivers.open(kind, "fence", store.url)
    first, release = h.acquire("k")
    h.call("set", "k", "first", fence=first)
    release()
    second, release = h.acquire("k")
    assert int(second) > int(first)
    with pytest.raises(StaleFence):
        h.call("set", "k", "late", fence=first)
    with pytest.raises(StaleFence):
        h.call("delete", "k", fence=first)
    assert h.call("set", "k", "second", fence=second) > 0
    release()
    assert h.call("get", "k", consistent=True) == "second"


def test_bad_input_is_refused_before_sending(drivers: Drivers, kind: str,
                                             store: Store) -> None:  # fmt: skip
    small = MapConfig(max_value_bytes=1000, presence=False)
    h = drivers.open(kind, "bad", store.url, config=small)
    for key in (1.5, None, ("t",)):
        with pytest.raises(KeyTypeError, match=type(key).__name__):
            h.call("set", key, 1)
    for unhashable in (["l"], {"d": 1}):  # refused on reads too
        with pytest.raises(KeyTypeError):
            h.call("get", unhashable)
    with pytest.raises(InvalidKey, match="UTF-8"):
        h.call("set", "\ud800", 1)
    with pytest.raises(ValueTooLarge, match="max_value_bytes=1000"):
        h.call("set", "big", "x" * 2000)
    assert h.call("len") == 0


def test_a_corrupt_entry_is_named(drivers: Drivers, kind: str, store: Store) -> None:
    h = drivers.open(kind, "rot", store.url)
    h.call("update", {"good": 1, "bad": 2})
    field = encode_key("bad", CFG.max_key_bytes)
    raw = store.admin()
    # A valid header around bytes that are never valid MessagePack (0xc1).
    raw.hset(f"sm:{{rot:{bucket_of(field, CFG.buckets)}}}:d", field, pack_value(99, 0, b"\xc1", 1))
    raw.close()
    with pytest.raises(CorruptData):
        h.call("get", "bad", consistent=True)
    with pytest.raises(CorruptData, match="skip_corrupt=True"):
        h.call("items")
    assert h.call("items", skip_corrupt=True) == [("good", 1)]


def test_a_change_from_the_other_driver_arrives_within_max_staleness(
    drivers: Drivers, kind: str, store: Store
) -> None:
    reader = drivers.open(kind, "x", store.url)
    writer = drivers.open(other(kind), "x", store.url)
    writer.call("set", "k", 0)
    for i in range(1, 6):
        assert reader.call("get", "k") == i - 1 and reader.cached("k")  # cached, then changed
        writer.call("set", "k", i)

        def seen(n: int = i) -> bool:
            return bool(reader.call("get", "k") == n)

        took = wait_until(seen, 5, "the other's write")
        assert took <= CFG.max_staleness, f"{kind} saw the change after {took:.3f} s"


def test_an_unreachable_store_is_store_unavailable(
    drivers: Drivers, kind: str, store: Store, shared_redis: EmbeddedRedis
) -> None:
    """Opening on nothing that answers: the error names where it looked and says nothing ran."""
    dead = f"127.0.0.1:{free_port()}"
    at = re.escape(dead)
    if store.topology == "standalone":
        unreachable = {f"redis://{dead}/0": rf"cannot reach redis {at}/0"}
    elif store.topology == "cluster":
        plain = f"{shared_redis.host}:{shared_redis.port}"  # a node that is no cluster's
        unreachable = {
            f"redis+cluster://{dead}": rf"no node told the slot map; nothing ran.*\({at}: ",
            f"redis+cluster://{plain}": r"nothing ran\. These servers are not in cluster mode: "
            r"for one Redis use redis://.*cluster support disabled",
        }
    else:
        service = store.url.split("/")[3]
        unreachable = {
            f"redis+sentinel://{dead}/{service}/0": rf"no sentinel named .*\({at}: .*nothing ran",
            store.url.replace(f"/{service}/", "/nosuch/"): r"does not know 'nosuch'.*nothing ran",
        }
    for url, message in unreachable.items():
        with pytest.raises(StoreUnavailable, match=message):
            drivers.open(kind, "m", url)


# ---- standalone only ---------------------------------------------------------------------------
# These two put a fault on the one node the maps talk to: a FaultProxy in front of it, or a
# kill.  On Sentinel the maps find the master through the Sentinels, which name the real node,
# not a proxy (a Sentinel form would need a proxy the Sentinels announce), and a killed master
# is a failover, which scenario S10 covers (tests/scenarios/test_sentinel_scenario.py); killing
# the module's shared set here would also make every later case wait for that failover.  On a
# Cluster likewise: the maps route by the slot map, whose CLUSTER SHARDS names every master's
# real address (a proxy named in the URL is only asked for that map, then bypassed), and a
# killed master is a failover (tests/integration/test_cluster_maps.py kills one under writes).


def test_a_lost_reply_is_outcome_unknown_and_drops_the_key(
    drivers: Drivers, kind: str, redis_server: EmbeddedRedis
) -> None:
    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        h = drivers.open(kind, "lost", proxy.url, feed=redis_server.url)
        h.call("set", "k", "old")
        assert h.cached("k")
        proxy.blackhole("downstream")  # the write reaches Redis; its reply never comes back
        with pytest.raises(WriteOutcomeUnknown, match="may or may not"):
            h.call("set", "k", "new")
        assert not h.cached("k"), "the next read must fetch the truth"
        proxy.heal()
        proxy.close_all()
        assert h.call("get", "k", consistent=True) == "new"  # it did apply


def test_a_killed_server_is_store_unavailable(drivers: Drivers, kind: str,
                                              redis_server: EmbeddedRedis) -> None:  # fmt: skip
    h = drivers.open(kind, "m", redis_server.url)
    h.call("set", "cached", 1)
    redis_server.kill()
    with pytest.raises(StoreUnavailable):
        h.call("set", "x", 1)
    with pytest.raises(StoreUnavailable):
        h.call("get", "uncached")


# ---- the harness's own control ---------------------------------------------------------------


def test_the_harness_catches_a_blocked_loop_and_a_leaked_task() -> None:
    """Guard-off control of the checks ``Drivers.close`` makes: a syncmap task that blocks the
    loop for 4x the threshold is reported, and so is a task still running at the end."""
    loop = LoopThread("syncmap-test-control", debug=True, threshold=SLOW_STEP_S)

    async def block_then_linger() -> None:
        time.sleep(4 * SLOW_STEP_S)  # blocks the loop: what the guard exists to catch
        await asyncio.Event().wait()

    # Held here: the loop keeps only weak references to its tasks, so a task parked on an
    # Event nobody else holds is garbage, and a GC pass before close() would take it out of
    # the loop's view (it did once in CI: "Task was destroyed but it is pending").
    held: list[asyncio.Task[None]] = []

    async def start() -> None:
        held.append(
            asyncio.get_running_loop().create_task(block_then_linger(), name="syncmap-blocker")
        )
        await asyncio.sleep(0.1)

    loop.run(start())
    leftover = loop.close()
    assert leftover == ["syncmap-blocker"]
    assert any("syncmap-blocker" in s for s in loop.slow_callbacks())
