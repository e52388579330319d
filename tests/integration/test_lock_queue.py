"""Lock hand-off without a herd (issue 16 goal 5): O(1) Redis calls per release, FIFO order,
a dead waiter at the head of the queue, a waiter that gives up while it is being handed the lock.

Counts come from ``INFO commandstats`` of a private redis-server (nothing else talks to it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from syncmap import Lock, LockNotAcquired
from syncmap.embedded import EmbeddedRedis
from syncmap.lock import flows
from syncmap.sync.run import run
from syncmap.testing.wait import wait_until

WAITERS = 200


@pytest.fixture(scope="module")
def server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    srv = EmbeddedRedis(binary=redis_binary)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = server.client()
    client.flushall()  # the module's private server: nobody else's keys
    try:
        yield client
    finally:
        client.close()


def evalsha_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _start_in_order(locks: list[Lock], admin: redis.Redis, got: list[int],
                    errors: list[BaseException]) -> list[threading.Thread]:  # fmt: skip
    """Start one waiter thread per lock, each only once the previous one is waiting: it has
    tried once, subscribed and tried again (two EVALSHA each; nothing else calls this server),
    so the order of arrival is the order of ``locks``."""
    threads = []
    for i, lock in enumerate(locks):

        def take(i: int = i, lock: Lock = lock) -> None:
            try:
                lock.acquire(timeout=120)
                got.append(i)
                lock.release()
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        before = evalsha_calls(admin)
        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(lambda before=before: evalsha_calls(admin) >= before + 2, 10,
                   f"waiter {i} waiting")  # fmt: skip
    return threads


def test_200_waiters_are_handed_the_lock_in_order_at_two_calls_each(
    server: EmbeddedRedis, admin: redis.Redis
) -> None:
    # Before the queue every release woke all waiters and each tried again: 107 EVALSHA per
    # hand-off with 200 waiters, in no particular order.  Now the release names the head of
    # the queue and only the head tries: one release + one acquire per hand-off (plus each
    # waiter's refresh of its place every third of the queue lease, none within this run).
    holder = Lock("herd", server.url)
    holder.acquire()
    locks = [Lock("herd", server.url) for _ in range(WAITERS)]
    got: list[int] = []
    errors: list[BaseException] = []
    threads = _start_in_order(locks, admin, got, errors)
    before, started = evalsha_calls(admin), time.monotonic()
    holder.release()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - started
    calls = evalsha_calls(admin) - before - 1  # minus the holder's own release
    per = calls / WAITERS
    print(
        f"{WAITERS} hand-offs in {took:.3f} s: {calls} EVALSHA, {per:.2f} per hand-off; "
        f"order of arrival kept: {got == list(range(WAITERS))}"
    )
    assert not errors, errors[:3]
    assert len(got) == WAITERS
    refresh = flows.queue_lease(holder.lease) / 3
    allowance = WAITERS * int(took / refresh)  # every waiter refreshes its place once a period
    assert calls <= 2 * WAITERS + allowance, f"{per:.1f} EVALSHA per hand-off: a herd"
    assert got == list(range(WAITERS)), "not handed over in order of arrival"
    assert not admin.exists(holder.layout.queue), "the queue outlived its last waiter"


def _dead_waiter(url: str, entry_lease: float) -> subprocess.Popen[str]:
    """A waiter in another process that queues, says so, and is then SIGKILLed by the test."""
    code = (
        "import sys, syncmap\n"
        "from syncmap.lock import flows\n"
        f"flows.queue_lease = lambda lease: {entry_lease!r}\n"
        f"lock = syncmap.Lock('dead-head', {url!r}, lease=1.0)\n"
        "print(lock.owner, flush=True)\n"
        "lock.acquire(timeout=600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip


def _dead_head(server: EmbeddedRedis, admin: redis.Redis, entry_lease: float) -> float | None:
    """Holder; a waiter that queues first and is killed; a live waiter behind it; release.
    Seconds the live waiter took after the release, or None if it did not get the lock."""
    holder = Lock("dead-head", server.url, lease=1.0)
    holder.acquire()
    proc = _dead_waiter(server.url, entry_lease)
    try:
        assert proc.stdout is not None
        dead_owner = proc.stdout.readline().strip()
        queue = holder.layout.queue
        wait_until(lambda: admin.zrange(queue, 0, 0) == [dead_owner.encode()], 30,
                   "the doomed waiter at the head of the queue")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    live = Lock("dead-head", server.url, lease=1.0)
    result: list[object] = []

    def take() -> None:
        with contextlib.suppress(LockNotAcquired):  # the control: None returned
            result.append(live.acquire(timeout=4))

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    wait_until(lambda: admin.zcard(queue) == 2, 10, "the live waiter queued behind")
    # The fault is in place: the head of the queue is a killed process.
    assert proc.returncode == -signal.SIGKILL
    assert admin.zrange(queue, 0, 0) == [dead_owner.encode()]
    released = time.monotonic()
    holder.release()
    thread.join(10)
    if not result:
        return None
    live.release()
    return time.monotonic() - released


def test_a_dead_waiter_at_the_head_holds_the_queue_up_for_its_entry_lease_at_most(
    server: EmbeddedRedis, admin: redis.Redis
) -> None:
    # The release names the dead head; nobody answers.  The live waiter refreshes its place
    # every third of the queue lease; once the dead entry's lease has run out that refresh
    # skips it, finds the lock free and takes it.
    took = _dead_head(server, admin, entry_lease=1.0)
    assert took is not None, "the live waiter never got the lock past a dead head"
    assert took < 1.0 + 1.0 / 3 + 2.0, f"{took:.2f} s: more than the dead entry's lease"


def test_control_a_dead_waiter_whose_entry_never_runs_out_blocks_the_queue(
    server: EmbeddedRedis, admin: redis.Redis
) -> None:
    # Guard off: the killed waiter's entry lasts an hour, so nothing skips it: the live waiter
    # times out (4 s).  This is what the test above would see without entry leases.
    assert _dead_head(server, admin, entry_lease=3600.0) is None


def _queue_up(lock: Lock) -> None:
    """One queued attempt that is refused, as a waiter makes; nobody then acts for ``lock``
    (it stands for a waiter that is about to give up, or is slow to take its turn)."""
    got = run(flows.attempt(lock._kind(), count=0, token=0, wait=None, queue=True),
              lock._executor)  # fmt: skip
    assert got.value is None


def test_a_waiter_that_gives_up_at_the_head_passes_its_turn_on_at_once(
    server: EmbeddedRedis, admin: redis.Redis
) -> None:
    # The race: the holder releases while A is the head, so the lock is free and reserved
    # for A; A times out (or is cancelled) instead of taking it.  A's leave names the next
    # head, B, at once.  Without that message B would find out at its next refresh (a third
    # of the 5 s queue lease of a 30 s lock, 1.67 s): the bound below tells the two apart.
    holder, a, b = (Lock("leave", server.url) for _ in range(3))
    holder.acquire()
    queue = holder.layout.queue
    _queue_up(a)
    b_got: list[object] = []
    thread_b = threading.Thread(target=lambda: b_got.append(b.acquire(timeout=60)), daemon=True)
    thread_b.start()
    wait_until(lambda: admin.zcard(queue) == 2, 10, "B queued behind A")
    holder.release()
    assert not admin.exists(holder.layout.hold)
    assert admin.zrange(queue, 0, 0) == [a.owner.encode()]  # free, and A's turn
    left = time.monotonic()
    run(flows.leave(a._kind()), a._executor)
    thread_b.join(10)
    took = time.monotonic() - left
    assert b_got and b.held, "B did not get the lock after A left the head of the queue"
    assert took < 1.0, f"{took:.2f} s: B learnt it from its refresh, not from A's leave"
    b.release()
    assert not admin.exists(queue)


def test_try_acquire_does_not_queue_nor_jump_the_queue(server: EmbeddedRedis,
                                                       admin: redis.Redis) -> None:  # fmt: skip
    holder, waiter, other = (Lock("q-try", server.url) for _ in range(3))
    holder.acquire()
    assert other.try_acquire() is None
    assert not admin.exists(holder.layout.queue)  # a try-once caller leaves no entry
    _queue_up(waiter)
    holder.release()
    # Free in Redis, but it is the waiter's turn: a newcomer is refused, and told why.
    with pytest.raises(LockNotAcquired, match="the turn of"):
        other.acquire(blocking=False)
    assert waiter.acquire(timeout=0) > 0  # the head takes its turn
    assert not admin.exists(holder.layout.queue)
    waiter.release()
