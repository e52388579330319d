"""PING leases on a Redis Cluster (docs/design.md, "PING leases"), both drivers, one shared
3 + 3 cluster: each master's SSUBSCRIBE connection of the process tracks the maps' keys and
PINGs every Δ/4; its PONG renews the buckets whose channels it carries.

* A map that is read but not written is renewed by vouches and stops probing (control:
  ``ping_leases=False`` probes every Δ/4), with the thread driver and with ``syncmap.aio``; one
  nobody reads (idle leases, docs/design.md "Idle maps") neither probes nor PINGs every Δ/4.
* A change that publishes nothing (``DEL`` of a bucket's data hash, sent around the scripts) is
  reported by that bucket's master on the same connection (a ``SUBSCRIBE __redis__:invalidate``
  beside the ``SSUBSCRIBE``s, Redis 7.0): the bucket is probed and its cached entries dropped
  within Δ.  Control: notices ignored, the vouches go on renewing it and the entry stays.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from syncmap import MapConfig, SyncMap, aio
from syncmap.feed import leases
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.wait import wait_until

DELTA = 1.0
WINDOW = 1.5  # seconds of idleness counted: 6 probe intervals


def _renewal(probes: int, vouches: int, leased: bool, idle: bool = False) -> None:
    if leased and idle:
        # At most one per master's connection (3): their PINGs are 4 Δ apart, the window 1.5 Δ.
        assert vouches <= 3, f"{vouches} vouches in {WINDOW} s of an idle map (4 Δ apart)"
        assert probes <= 1, f"{probes} probes in {WINDOW} s of an idle map"
    elif leased:
        assert vouches >= 3 * WINDOW / DELTA, f"{vouches} vouches in {WINDOW} s"
        # One late vouch on a loaded machine may bring a probe; the control probes ≥ 4 times.
        assert probes <= 2, f"{probes} probes in {WINDOW} s of a read map with PING leases"
    else:
        assert vouches == 0 and probes >= 4, f"control: {probes} probes, {vouches} vouches"


@pytest.mark.parametrize("leased", [True, False], ids=["leases", "control"])
def test_an_idle_cluster_map_is_renewed_by_pings_not_probes(
    shared_cluster: ClusterSet, leased: bool
) -> None:
    cfg = MapConfig(max_staleness=DELTA, ping_leases=leased)
    with SyncMap("idle", shared_cluster.url, config=cfg) as m:
        m.update({f"k{i}": i for i in range(32)})
        core, leasing = m._core, m._engine.leasing
        if leasing is not None:  # settled: the node connections track the map's keys
            wait_until(lambda: leasing.may_skip(time.monotonic()), 5.0, "every bucket vouched")
        probes, vouches = core._probes, core.counters.vouches
        end = time.monotonic() + WINDOW  # a measuring window, not a wait for an event
        while time.monotonic() < end:  # read (not spinning): the map is busy
            assert m["k3"] == 3
            time.sleep(0.02)
        _renewal(core._probes - probes, core.counters.vouches - vouches, leased)
        if leasing is not None:  # then nobody reads it: idle, few vouches, no probes
            lease = leasing.current
            assert lease is not None
            wait_until(lambda: time.monotonic() >= lease.busy_until, 10.0, "the map idle")
            wait_until(lambda: leasing.may_skip(time.monotonic()), 5.0, "vouched while idle")
            probes, vouches = core._probes, core.counters.vouches
            time.sleep(WINDOW)  # a measuring window, not a wait for an event
            _renewal(core._probes - probes, core.counters.vouches - vouches, leased, idle=True)
        assert m["k3"] == 3


async def test_an_idle_cluster_map_on_asyncio_is_renewed_by_pings_not_probes(
    shared_cluster: ClusterSet,
) -> None:
    """The asyncio driver's node readers (its control is the thread test's: the same count)."""
    leased, cfg = True, MapConfig(max_staleness=DELTA)
    async with aio.SyncMap("aidle", shared_cluster.url, config=cfg) as m:
        await m.update({f"k{i}": i for i in range(32)})
        core, engine = m._state.core, m._engine
        assert engine is not None
        deadline = time.monotonic() + 5.0
        while engine.leasing is not None and not engine.leasing.may_skip(time.monotonic()):
            assert time.monotonic() < deadline, "not every bucket vouched within 5 s"
            await asyncio.sleep(0.05)  # polling what the subscriber task moves
        probes, vouches = core._probes, core.counters.vouches
        end = time.monotonic() + WINDOW  # a measuring window, not a wait for an event
        while time.monotonic() < end:  # read: the map is busy
            assert await m.get("k3") == 3
            await asyncio.sleep(0.02)
        _renewal(core._probes - probes, core.counters.vouches - vouches, leased)


@pytest.mark.parametrize("noticed", [True, False], ids=["notices", "control"])
def test_a_change_around_the_scripts_is_reported_by_its_master(
    shared_cluster: ClusterSet, noticed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not noticed:
        monkeypatch.setattr(leases.LeaseBook, "notice", lambda self, data, targets: [])
    cfg = MapConfig(max_staleness=DELTA)
    with SyncMap("around", shared_cluster.url, config=cfg) as m:
        m["k"] = 1
        assert m["k"] == 1 and m.peek("k") is not None
        leasing = m._engine.leasing
        assert leasing is not None
        # Settled: every bucket vouched lately and no probe wanted (a node connection that
        # reconnected to track the map's keys made its buckets wait for a repair probe).
        wait_until(lambda: leasing.may_skip(time.monotonic()), 5.0, "every bucket vouched")
        bucket = bucket_of(encode_key("k", 1024), 16)
        shared_cluster.client().delete(Layout("sm", "around", 16).data(bucket))
        deleted = time.monotonic()
        dropped = lambda: m.peek("k") is None  # noqa: E731
        if noticed:
            wait_until(dropped, DELTA, "the entry of a bucket deleted around the scripts")
        else:
            time.sleep(1.2 * DELTA)  # a measuring window: the control keeps serving it
            assert not dropped(), "control: the vouches renewed a bucket that changed"
        assert time.monotonic() - deleted < 2 * DELTA
