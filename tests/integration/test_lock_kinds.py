"""RWLock, Semaphore and Redlock against real redis-server processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from syncmap import (
    ConfigurationError,
    Fence,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    Redlock,
    RWLock,
    Semaphore,
    StaleFence,
    SyncMap,
)
from syncmap.embedded import EmbeddedRedis
from syncmap.testing.wait import wait_until

# ---- RWLock ----------------------------------------------------------------------------------


def test_readers_share_and_a_writer_excludes_them(shared_redis_url: str) -> None:
    a, b, w = (RWLock("doc", shared_redis_url) for _ in range(3))
    a.read.acquire()
    assert b.read.try_acquire() is not None  # many readers
    assert w.write.try_acquire() is None  # no writer while they read
    a.read.release()
    b.read.release()
    fence = w.write.acquire(timeout=1)
    assert a.read.try_acquire() is None  # no reader while one writes
    assert b.write.try_acquire() is None  # nor another writer
    w.write.release()
    assert a.read.acquire(timeout=1) < fence + 1
    a.read.release()


def test_a_waiting_writer_is_not_starved_by_new_readers(shared_redis_url: str) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    reader, late, writer = (RWLock("feed", shared_redis_url) for _ in range(3))
    reader.read.acquire()
    got: list[Fence] = []
    thread = threading.Thread(target=lambda: got.append(writer.write.acquire(timeout=20)))
    thread.start()
    wait_until(lambda: admin.zcard(writer.layout.rw_queue_writers) == 1, 5, "the writer queued")
    assert late.read.try_acquire() is None, "a new reader overtook the waiting writer"
    reader.read.release()
    thread.join(10)
    assert got and writer.write.held
    writer.write.release()
    assert late.read.acquire(timeout=1) is not None
    late.read.release()
    assert not admin.exists(writer.layout.rw_queue)


def test_a_readers_fence_goes_stale_once_a_writer_acquires(shared_redis_url: str) -> None:
    reader, writer = RWLock("cfg", shared_redis_url, lease=5), RWLock("cfg", shared_redis_url)
    with SyncMap("rwmap", shared_redis_url) as sm:
        read_fence = reader.read.acquire()
        sm.set("k", 1, fence=read_fence)  # accepted: no writer since
        redis.Redis.from_url(shared_redis_url).delete(reader.layout.readers)  # read lease lapses
        write_fence = writer.write.acquire(timeout=1)
        assert write_fence > read_fence
        with pytest.raises(StaleFence):
            sm.set("k", 2, fence=read_fence)
        sm.set("k", 3, fence=write_fence)
        writer.write.release()
    with pytest.raises(LockLost):
        reader.read.release()


def test_an_owner_may_upgrade_and_downgrade(shared_redis_url: str) -> None:
    rw = RWLock("grade", shared_redis_url)
    rw.read.acquire()
    rw.write.acquire(timeout=1)  # the only reader may take the write side
    rw.read.acquire()  # re-entered read
    rw.read.release()
    rw.read.release()
    rw.write.release()
    with pytest.raises(LockNotOwned):
        rw.write.release()


# ---- Semaphore ---------------------------------------------------------------------------------


def test_semaphore_limits_holders(shared_redis_url: str) -> None:
    a, b = Semaphore("pool", 2, shared_redis_url), Semaphore("pool", 2, shared_redis_url)
    a.acquire()
    a.acquire()
    assert a.held == 2 and a.valid
    assert not b.try_acquire()
    with pytest.raises(LockNotAcquired, match="semaphore 'pool'"):
        b.acquire(timeout=0.05)
    a.release()
    with b:
        assert b.held == 1
    a.release()
    with pytest.raises(LockNotOwned):
        a.release()
    with pytest.raises(ConfigurationError, match="same number of permits"):
        Semaphore("pool", 3, shared_redis_url).acquire()


_PERMIT_HOLDER = """
import sys, time
from syncmap import Semaphore
sem = Semaphore("crashpool", 1, sys.argv[1], lease=1.0)
sem.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_crashed_holders_permit_comes_back(shared_redis_url: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", _PERMIT_HOLDER, shared_redis_url],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        sem = Semaphore("crashpool", 1, shared_redis_url)
        assert not sem.try_acquire()
        os.kill(child.pid, signal.SIGKILL)
        sem.acquire(timeout=10)  # woken when the dead holder's lease ends
        sem.release()
    finally:
        child.kill()
        child.wait()


# ---- Redlock -----------------------------------------------------------------------------------


@pytest.fixture
def five(redis_binary: str) -> Iterator[list[EmbeddedRedis]]:
    nodes = [EmbeddedRedis(binary=redis_binary) for _ in range(5)]
    for node in nodes:
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _urls(nodes: list[EmbeddedRedis]) -> list[str]:
    return [n.url for n in nodes]


def test_redlock_works_with_two_nodes_down_and_refuses_with_three(
    five: list[EmbeddedRedis],
) -> None:
    urls = _urls(five)
    lock = Redlock("q", urls, lease=5, retries=1, retry_delay=0.01)
    assert lock.acquire() > 0 and lock.last_acquired_nodes == 5
    with pytest.raises(LockNotAcquired, match="fewer than 3 of 5"):
        Redlock("q", urls, retries=0).acquire()
    lock.release()
    five[0].kill()
    five[1].kill()
    lock = Redlock("q", urls, lease=5, retries=0)
    validity = lock.acquire()
    assert 0 < validity < 5 and lock.last_acquired_nodes == 3 and lock.valid
    lock.release()
    five[2].kill()
    with pytest.raises(LockNotAcquired):
        Redlock("q", urls, lease=5, retries=2, retry_delay=0.01).acquire()
    with pytest.raises(ConfigurationError, match="odd number"):
        Redlock("q", urls[:4])


def test_redlock_restart_without_persistence_allows_a_second_holder(
    five: list[EmbeddedRedis], redis_binary: str
) -> None:
    """The documented limit (TESTPLAN S15): a node of the holder's majority restarts empty
    inside the lease, so a second majority forms while the first holder is still valid.  Fencing
    on the authority still refuses the first holder's writes."""
    urls = _urls(five)
    with EmbeddedRedis(binary=redis_binary) as authority, SyncMap("rl", authority.url) as data:
        five[3].kill()
        five[4].kill()
        a = Redlock("acct", urls, lease=10, retries=0, authority=authority.url)
        a.acquire()  # held on nodes 0, 1, 2
        fence_a = a.fence
        five[2].kill()
        five[2].restart()  # immediately, without persistence: it forgot the lock
        five[3].restart()
        five[4].restart()
        b = Redlock("acct", urls, lease=10, retries=0, authority=authority.url)
        b.acquire()  # nodes 2, 3, 4: a second majority
        assert a.valid and b.valid, "both believe they hold it: the violation Redlock allows"
        fence_b = b.fence
        assert fence_b > fence_a
        data.set("balance", 1, fence=fence_b)
        with pytest.raises(StaleFence):
            data.set("balance", 0, fence=fence_a)  # the authority's counter catches it
        b.release()
        a.release()


def test_redlock_without_authority_has_no_fence(five: list[EmbeddedRedis]) -> None:
    lock = Redlock("nf", _urls(five), lease=0.6)
    lock.acquire()
    with pytest.raises(ConfigurationError, match="authority"):
        _ = lock.fence
    start = time.monotonic()
    while time.monotonic() - start < 1.5:  # 2.5 leases of work: the watchdog extends it
        with pytest.raises(LockNotAcquired):
            Redlock("nf", _urls(five), retries=0).acquire(blocking=False)
        time.sleep(0.1)
    assert lock.valid
    lock.release()
    with pytest.raises(LockNotOwned):
        lock.release()
