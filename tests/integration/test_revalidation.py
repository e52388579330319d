"""Revalidation instead of emptying, on a real Redis (issue 16 goal 2).

A second process holds a map with N entries cached.  It is stopped with SIGSTOP for 2 Δ (every
lease lapses) while this process writes K keys, then continued: the first probe renews every
bucket whose sequence and digest chain did not move, the buffered messages drop the K keys, and
every other entry is still cached.  Control: ``Guards(revalidate=False)`` empties the cache.
The reconnect case cuts the child's subscriber connection (``CLIENT KILL TYPE pubsub``) while
it is stopped and writes meanwhile: those messages are lost for sure, so the buckets written
are restarted, and the entries of every other bucket survive.
"""

from __future__ import annotations

import time

import pytest
import redis

from syncmap import MapConfig, SyncMap
from syncmap.keys import bucket_of, encode_key
from syncmap.testing.pausable import key_of, pausable_map

N, K, DELTA = 2000, 7, 0.5
BUCKETS = 16  # the default


def _write(url: str, name: str, keys: list[str]) -> dict[str, int]:
    with SyncMap(name, url, config=MapConfig(max_staleness=DELTA)) as w:
        w.update({key_of(i): i for i in range(N)} if not keys else {})
        written = {k: -1 - i for i, k in enumerate(keys)}
        for k, v in written.items():
            w[k] = v
        return written


@pytest.mark.parametrize(
    ("revalidate", "leases"),
    [(True, False), (False, False), (True, True)],
    ids=["revalidate", "control-off", "ping-leases"],
)
def test_a_paused_process_keeps_every_entry_but_the_k_written(
    redis_url: str, revalidate: bool, leases: bool
) -> None:
    """Probing maps (no PING leases): the lapse after the pause is held and a probe revalidates
    it; the control flushes.  With PING leases the first vouch after the pause may renew the
    buckets before the timer sees the lapse (sound: the PONG came after the buffered messages),
    so only the survivors are checked there."""
    _write(redis_url, "paused", [])
    with pausable_map(redis_url, "paused", N, delta=DELTA, revalidate=revalidate,
                      ping_leases=leases) as child:  # fmt: skip
        assert child.cached == N
        keys = [key_of(i * 97) for i in range(K)]
        with child.pause():
            written = _write(redis_url, "paused", keys)
            time.sleep(2 * DELTA)  # the fault itself: the process stays stopped past its leases
        got = child.check(written)
    assert got.stale == [], f"written keys served with their old value: {got.stale}"
    if revalidate:
        assert (got.survivors, got.expected) == (N - K, N - K), got
        assert got.revalidations >= 1 or leases, got
    else:  # the control: every lease lapsed and flushed its bucket
        assert got.survivors == 0 and got.revalidations == 0, got


def test_after_a_reconnect_only_the_buckets_written_meanwhile_are_restarted(
    redis_url: str,
) -> None:
    _write(redis_url, "cut", [])
    admin = redis.Redis.from_url(redis_url)
    with pausable_map(redis_url, "cut", N, delta=DELTA) as child:
        keys = [key_of(i * 131) for i in range(3)]
        moved = {bucket_of(encode_key(k, 1024), BUCKETS) for k in keys}
        with child.pause():
            assert admin.client_kill_filter(_type="pubsub") >= 1
            written = _write(redis_url, "cut", keys)  # published to nobody: lost for sure
        got = child.check(written)
    admin.close()
    assert got.stale == [], f"written keys served with their old value: {got.stale}"
    spared = sum(1 for i in range(N) if bucket_of(encode_key(key_of(i), 1024), BUCKETS)
                 not in moved)  # fmt: skip
    assert got.survivors == spared, (got, spared)
