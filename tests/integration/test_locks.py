"""Lock, fencing, leases and the watchdog against real redis-server processes."""

from __future__ import annotations

import logging
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
    Lock,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    RWLock,
    Semaphore,
    StaleFence,
    SyncMap,
)
from syncmap.embedded import EmbeddedRedis
from syncmap.lock.waiting import Waker
from syncmap.testing.wait import wait_until


@pytest.fixture
def m(shared_redis_url: str) -> Iterator[SyncMap]:
    with SyncMap("locked", shared_redis_url) as sm:
        yield sm


def test_tokens_strictly_increase_and_the_owner_re_enters(shared_redis_url: str) -> None:
    a, b = Lock("t", shared_redis_url), Lock("t", shared_redis_url)
    first = a.acquire()
    assert isinstance(first, Fence) and first.lock == "t"
    assert a.acquire() == first  # re-entered: same hold, same token
    a.release()
    assert b.try_acquire() is None  # still held once
    a.release()
    second = b.acquire(timeout=1)
    assert second > first
    b.release()
    assert a.acquire() > second
    a.release()


def test_timeout_and_non_owner_release_are_clear_errors(shared_redis_url: str) -> None:
    holder, other = Lock("busy", shared_redis_url), Lock("busy", shared_redis_url)
    holder.acquire()
    with pytest.raises(LockNotAcquired, match=rf"'busy'.*held by {holder.owner}"):
        other.acquire(timeout=0.05)
    with pytest.raises(LockNotAcquired):
        other.acquire(blocking=False)
    with pytest.raises(LockNotOwned, match="does not hold it"):
        other.release()
    assert holder.valid and holder.locked()  # the refused release changed nothing
    holder.release()
    assert not holder.locked()


def test_a_waiter_is_woken_by_the_release_message_not_by_the_lease(shared_redis_url: str) -> None:
    holder, waiter = Lock("handoff", shared_redis_url), Lock("handoff", shared_redis_url)
    holder.acquire()  # a 30 s lease: only the release message can wake the waiter early
    got: list[float] = []
    thread = threading.Thread(target=lambda: (waiter.acquire(timeout=20), got.append(1.0)))
    thread.start()
    channels = Waker.for_topology(waiter._topology)._channels
    wait_until(lambda: bool(getattr(channels.get(holder.layout.channel), "waiters", None)), 5,
               "the waiter subscribing")  # fmt: skip
    released = time.monotonic()
    holder.release()
    thread.join(10)
    took = time.monotonic() - released
    assert got and waiter.held
    assert took < 2.0, f"hand-off took {took:.3f} s: woken by the lease bound, not the message"
    waiter.release()


def test_a_stale_fence_is_refused_even_before_the_new_holder_writes(
    m: SyncMap, shared_redis_url: str
) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    old, new = Lock("acct", shared_redis_url, lease=5), Lock("acct", shared_redis_url)
    old_fence = old.acquire()
    m.set("balance", 1, fence=old_fence)
    admin.pexpire(old.layout.hold, 1)  # the old holder's lease runs out (a clock-jump nemesis)
    new_fence = new.acquire(timeout=2)
    with pytest.raises(StaleFence, match=rf"lock acct token {int(old_fence)} is older"):
        m.set("balance", 2, fence=old_fence)
    with pytest.raises(StaleFence):
        m.set("balance", 2, fence=("acct", int(old_fence)))  # the (name, token) form
    with pytest.raises(StaleFence):
        m.pop("balance", fence=old_fence)
    with pytest.raises(StaleFence):
        m.update({"balance": 3}, fence=old_fence)
    assert m.get("balance", consistent=True) == 1  # nothing stale landed
    m.set("balance", 10, fence=new_fence)
    m.set("balance", 11, fence=new)  # the Lock itself works as a fence too
    assert m.get("balance", consistent=True) == 11
    with pytest.raises(TypeError, match="fence must be"):
        m.set("balance", 0, fence="acct")  # type: ignore[arg-type]
    new.release()
    with pytest.raises(LockLost):
        old.release()


def test_map_lock_short_form_has_no_lost_update(m: SyncMap) -> None:
    m["n"] = 0

    def worker() -> None:
        for _ in range(40):
            with m.lock("n") as fence:
                m.set("n", m.get("n", consistent=True) + 1, fence=fence)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert m.get("n", consistent=True) == 160
    assert m.lock("n").name == "locked:s:n" and m.lock(b"\x00{").name == "locked:x:007b"


def test_tokens_stay_above_old_ones_after_a_restart_without_persistence(
    redis_server: EmbeddedRedis,
) -> None:
    old = Lock("r", redis_server.url, socket_timeout=1)
    before = old.acquire()
    redis_server.kill()
    redis_server.restart()  # no persistence: the hold and the fence counter are gone
    new = Lock("r", redis_server.url)
    after = new.acquire(timeout=2)
    assert after > before, "the counter restarted below an old token: fencing would break"
    with SyncMap("rs", redis_server.url) as sm:
        with pytest.raises(StaleFence):
            sm.set("k", 1, fence=before)
        sm.set("k", 1, fence=after)
    new.release()
    with pytest.raises(LockLost):
        old.release()  # its hold went with the restart


_HOLDER = """
import sys, time
from syncmap import Lock
lock = Lock("crash", sys.argv[1], lease=1.0)
print(int(lock.acquire()), flush=True)
time.sleep(600)
"""


def test_a_killed_holders_lock_is_free_after_its_lease(shared_redis_url: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, shared_redis_url],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        token = int(child.stdout.readline())
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        successor = Lock("crash", shared_redis_url)
        got = successor.acquire(timeout=10)
        recovered = time.monotonic() - killed
        successor.release()
    finally:
        child.kill()
        child.wait()
    assert got > token
    assert recovered <= 1.0 + 1.0, f"recovery took {recovered:.2f} s for a 1 s lease"


def test_the_watchdog_keeps_a_long_critical_section(shared_redis_url: str) -> None:
    lock, other = Lock("long", shared_redis_url, lease=0.3), Lock("long", shared_redis_url)
    fence = lock.acquire()
    end = time.monotonic() + 1.5  # five leases of critical section
    while time.monotonic() < end:
        assert other.try_acquire() is None
        assert lock.valid and lock.fence == fence
        time.sleep(0.05)  # the critical section's work
    lock.release()  # no LockLost: the lease never lapsed
    assert other.try_acquire() is not None
    other.release()


def test_a_lost_lease_is_loud(shared_redis_url: str) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    lost: list[LockLost] = []
    lock = Lock("loud", shared_redis_url, lease=0.6, on_lost=lost.append)
    lock.acquire()
    admin.delete(lock.layout.hold)  # an operator (or eviction) removes the hold
    wait_until(lambda: bool(lost), 3, "on_lost")
    assert "'loud'" in str(lost[0]) and lock.owner in str(lost[0])
    assert not lock.valid
    with pytest.raises(LockLost):
        _ = lock.fence
    with pytest.raises(LockLost):
        lock.acquire()  # release the lost hold first
    with pytest.raises(LockLost):
        lock.release()
    assert lock.acquire(timeout=1) > 0  # usable again
    lock.release()


def test_renewal_failing_while_redis_is_stopped_loses_the_lock(redis_server: EmbeddedRedis) -> None:
    lost: list[LockLost] = []
    lock = Lock("stalled", redis_server.url, lease=0.6, socket_timeout=0.2, on_lost=lost.append)
    lock.acquire()
    redis_server.pause()
    try:
        wait_until(lambda: bool(lost), 5, "on_lost while Redis is stopped")
        assert not lock.valid
    finally:
        redis_server.resume()
    with pytest.raises(LockLost, match="ran out"):
        lock.release()


def test_a_paused_holder_sees_its_lease_gone_at_once(shared_redis_url: str) -> None:
    lock = Lock("gil", shared_redis_url, lease=0.2)
    lock.acquire()
    # Stand in for a SIGSTOP or a long C call: push our clock past the lease, no thread ran.
    assert lock._hold is not None
    lock._hold.valid_until = time.monotonic() - 0.001
    assert not lock.valid
    with pytest.raises(LockLost, match="ran out before it was renewed"):
        _ = lock.fence
    with pytest.raises(LockLost):
        lock.release()


def test_exit_keeps_the_callers_exception(shared_redis_url: str) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    lock = Lock("exit", shared_redis_url)
    with pytest.raises(KeyError):
        with lock:
            admin.delete(lock.layout.hold)
            raise KeyError("the caller's")
    with pytest.raises(LockLost):
        with lock:
            admin.delete(lock.layout.hold)
    assert not lock.held


def test_bad_settings_are_refused(shared_redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="lock name"):
        Lock("a{b}", shared_redis_url)
    with pytest.raises(ConfigurationError, match="lease"):
        Lock("a", shared_redis_url, lease=0)
    with pytest.raises(ConfigurationError, match="replicas"):
        Lock("a", shared_redis_url, replicas="all")  # type: ignore[arg-type]


# ---- replicas ------------------------------------------------------------------------------------


@pytest.fixture
def replica(redis_server: EmbeddedRedis, redis_binary: str) -> Iterator[EmbeddedRedis]:
    follow = ["--replicaof", "127.0.0.1", str(redis_server.port)]
    rep = EmbeddedRedis(binary=redis_binary, extra_args=follow)
    rep.start()
    client = rep.client()
    wait_until(lambda: client.info("replication").get("master_link_status") == "up", 10,
               "the replica linking")  # fmt: skip
    try:
        yield rep
    finally:
        client.close()
        rep.resume()
        rep.stop()


def test_replicas_require_refuses_a_lock_no_replica_confirmed(
    redis_server: EmbeddedRedis, replica: EmbeddedRedis, caplog: pytest.LogCaptureFixture
) -> None:
    url = redis_server.url
    safe = Lock("rep", url, replicas="require", replica_timeout=0.3)
    safe.acquire()
    assert safe.replicated is True
    safe.release()
    replica.pause()  # the replica cannot confirm any more
    with pytest.raises(LockNotAcquired, match="0 of 1 replicas confirmed"):
        safe.acquire(timeout=1)
    assert not safe.held and not safe.locked()  # refused and given back
    checked = Lock("rep", url, replicas="check", replica_timeout=0.1)
    with caplog.at_level(logging.WARNING, logger="syncmap.lock"):
        checked.acquire()
    assert checked.replicated is False and "replicas confirmed" in caplog.text
    checked.release()
    plain = Lock("rep", url)
    plain.acquire()
    assert plain.replicated is None  # "none": not checked, no WAIT
    plain.release()


def test_a_grant_that_arrives_after_its_lease_is_given_back_not_returned(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """Found by the S13 CLIENT PAUSE scenario: acquire() returned a fence whose lease had already
    run out, the watchdog then gave the hold back, and a second owner got in unannounced."""
    a, b = Lock("late", redis_server.url, lease=0.3), Lock("late", redis_server.url, lease=0.3)
    admin.execute_command("CLIENT", "PAUSE", 600, "WRITE")  # the acquire's reply comes late
    fence = a.acquire(timeout=5)
    assert a.valid, "acquire() returned a hold whose lease was already over"
    assert b.try_acquire() is None  # still exclusive
    assert a.fence == fence
    a.release()


def test_a_late_give_back_of_a_lost_hold_spares_the_owners_newer_hold(
    shared_redis_url: str,
) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    lock = Lock("regive", shared_redis_url)
    old = lock.acquire()
    admin.delete(lock.layout.hold)
    with pytest.raises(LockLost):
        lock.release()
    new = lock.acquire()
    lock._abandon(int(old))  # the watchdog's give-back of the old hold, arriving late
    assert lock.locked() and lock.valid and lock.fence == new
    lock.release()


def test_an_evicting_policy_is_warned_about_once(
    redis_server: EmbeddedRedis, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """S16's library side: lock holds have a TTL, so volatile-lru may evict them."""
    admin.config_set("maxmemory", 512 * 1024 * 1024)
    admin.config_set("maxmemory-policy", "volatile-lru")
    with caplog.at_level(logging.WARNING, logger="syncmap.lock"):
        lock = Lock("evictable", redis_server.url)
        lock.acquire()
        lock.release()
        lock.acquire()
        lock.release()
    warnings = [r for r in caplog.records if "evicts keys" in r.getMessage()]
    assert len(warnings) == 1 and "volatile-lru" in warnings[0].getMessage()


def test_the_documented_least_privilege_acl_is_enough(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """docs/locks.md's ACL for lock users: every kind of lock, a contended wait, replicas=."""
    admin.execute_command(
        "ACL", "SETUSER", "locker", "on", ">pw", "resetkeys", "~sm:{lock:*", "resetchannels",
        "&sm:{lock:*}:ch", "-@all", "+@read", "+@write", "+@scripting", "+@pubsub", "+ping",
        "+time", "+wait",
    )  # fmt: skip
    url = f"redis://locker:pw@127.0.0.1:{redis_server.port}/0"
    holder, waiter = Lock("acl", url, replicas="check", replica_timeout=0.01), Lock("acl", url)
    holder.acquire()
    thread = threading.Thread(target=lambda: waiter.acquire(timeout=10))
    thread.start()
    channels = Waker.for_topology(waiter._topology)._channels
    wait_until(lambda: bool(getattr(channels.get(holder.layout.channel), "waiters", None)), 5,
               "the waiter subscribing")  # fmt: skip
    holder.release()
    thread.join(10)
    assert waiter.held
    waiter.release()
    rw = RWLock("acl-rw", url)
    with rw.read, rw.write:  # the only reader upgrades
        pass
    with Semaphore("acl-sem", 2, url):
        pass


def test_a_loss_is_logged_as_an_error_only_when_no_callback_handles_it(
    shared_redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin = redis.Redis.from_url(shared_redis_url)
    told: list[LockLost] = []
    with caplog.at_level(logging.INFO, logger="syncmap.lock"):
        handled = Lock("told", shared_redis_url, lease=0.3, on_lost=told.append)
        handled.acquire()
        admin.delete(handled.layout.hold)
        wait_until(lambda: bool(told), 3, "on_lost")
        unhandled = Lock("untold", shared_redis_url, lease=0.3)
        unhandled.acquire()
        admin.delete(unhandled.layout.hold)
        wait_until(lambda: any("'untold'" in r.getMessage() for r in caplog.records), 3, "log")
    levels = {
        r.getMessage().split("'")[1]: r.levelno
        for r in caplog.records
        if "was lost" in r.getMessage()
    }
    assert levels.get("told") == logging.INFO and levels.get("untold") == logging.ERROR
    for lock in (handled, unhandled):
        with pytest.raises(LockLost):
            lock.release()
