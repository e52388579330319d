"""A restarted bucket's entries are freed by the map's timer thread (``NearCache.sweep``), not in
the probe's step: a real map, with every flush deferred (``SWEEP_ABOVE`` = 0), after FLUSHALL
(a new epoch in every bucket).  Checks the wiring (the timer frees them, hits resume) and that
no detached value is ever read.  The control: a timer that never sweeps leaves hits off."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from syncmap import MapConfig, SyncMap, aio, mapbase
from syncmap.aio import map as aiomap
from syncmap.core.nearcache import NearCache
from syncmap.testing.pausable import key_of
from syncmap.testing.wait import wait_until

N, DELTA, BUCKETS = 2000, 0.5, 16


def _serving(m: SyncMap) -> bool:
    with m._state.guard:
        return time.monotonic() < m._core.fresh_until  # valid_until also waits for feed_turn


@pytest.mark.parametrize("timer_sweeps", [True, False], ids=["sweep", "control-no-sweep"])
def test_a_restart_is_freed_by_the_timer_and_hits_resume(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, timer_sweeps: bool
) -> None:
    monkeypatch.setattr(mapbase, "SWEEP_ABOVE", 0)  # every non-empty flush is detached
    if not timer_sweeps:  # the control: the timer never sees anything to free
        monkeypatch.setattr(NearCache, "sweeping", property(lambda self: False))
    cfg = MapConfig(max_staleness=DELTA)
    admin = redis.Redis.from_url(redis_url)
    with SyncMap("df", redis_url, config=cfg) as m:
        m.update({key_of(i): i for i in range(N)})
        wait_until(lambda: m.preload() >= N and _serving(m), 10, "the map caches everything")
        # A new epoch in every bucket: the next probe restarts (flushes) all of them.
        admin.flushall()
        keys = [key_of(i * 131) for i in range(3)]
        admin_written = {k: -1 - i for i, k in enumerate(keys)}
        with SyncMap("df", redis_url, config=cfg) as w:
            w.update(admin_written)
        # Every bucket restarted (a message of the new epoch may restart one first; the others
        # wait for the probe, within Δ: until then their old entries are within the contract).
        wait_until(lambda: m._core.counters.detached >= BUCKETS, 10, "every bucket detached")
        # Never a detached (pre-FLUSHALL) value, whether or not the sweep is done.
        assert [m[k] for k in keys] == [-1, -2, -3]
        assert all(m.get(key_of(i)) is None for i in range(1, N, 97))
        if timer_sweeps:
            wait_until(lambda: _serving(m), 10, "hits resume once the timer freed the entries")
            assert not m._core.sweeping
            assert all(m.peek(key_of(i)) is None for i in range(1, N, 97))
        else:
            time.sleep(4 * DELTA)  # long enough for the timer to have freed them
            assert m._core._detached and not _serving(m), "the control frees nothing"
    admin.close()


async def test_the_asyncio_timer_frees_a_restart_too(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same on ``syncmap.aio``: its timer task frees a chunk per turn of the loop."""
    monkeypatch.setattr(aiomap, "SWEEP_ABOVE", 0)
    cfg = MapConfig(max_staleness=DELTA)
    admin = redis.Redis.from_url(redis_url)
    async with aio.SyncMap("adf", redis_url, config=cfg) as m:
        await m.update({key_of(i): i for i in range(N)})
        assert await m.preload() >= N
        admin.flushall()
        with SyncMap("adf", redis_url, config=cfg) as w:
            w[key_of(0)] = -1
        core = m._core
        deadline = time.monotonic() + 10
        while not (core.counters.detached >= BUCKETS and not core.sweeping and _serving_aio(m)):
            assert time.monotonic() < deadline, "the timer task did not free the restart"
            await asyncio.sleep(0.01)
        assert await m.get(key_of(0)) == -1 and await m.get(key_of(1)) is None
    admin.close()


def _serving_aio(m: aio.SyncMap) -> bool:
    return time.monotonic() < m._core.fresh_until  # valid_until also waits for feed_turn
