"""Issue 16 goal 1: an idle map costs Redis a vouch PING every few seconds, not every Δ/4
(leasing.py, docs/design.md "Idle maps").  Its leases lapse while nobody reads, its entries are
held, and each idle PING's answer revalidates them; the first read after the idle spell asks
for a PING at once and is never stale: a write made meanwhile is seen.  The control turns idle
leases off and must see the Δ/4 pace.

The PINGs are counted by Redis (``INFO commandstats``) over a window: a rate, not a race; the
counts are far apart (Δ = 0.4 s: busy 10 per s, idle ≈ 0.6 per s)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest

from syncmap import MapConfig, SyncMap, aio
from syncmap.embedded import EmbeddedRedis
from syncmap.engine import Engine
from syncmap.leasing import IDLE_AFTER
from syncmap.testing.wait import wait_until

DELTA = 0.4
CFG = MapConfig(max_staleness=DELTA, presence=False)
WINDOW = 3.0


def pings(server: EmbeddedRedis) -> int:
    with server.client() as admin:
        return int(admin.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))


def pings_over(server: EmbeddedRedis, seconds: float) -> float:
    """PINGs Redis ran per second over ``seconds`` in which nothing reads or writes."""
    before = pings(server)
    time.sleep(seconds)  # a window to count in, not a wait for an event
    return (pings(server) - before) / seconds


@pytest.fixture
def idle_map(redis_server: EmbeddedRedis) -> Iterator[SyncMap]:
    with SyncMap("idle", redis_server.url, config=CFG) as m:
        assert m._engine.leasing is not None and m._engine.leasing.idles
        for i in range(50):
            m[f"k{i}"] = i
        for i in range(50):
            assert m[f"k{i}"] == i
        yield m


def idle_for(m: SyncMap) -> None:
    """Until the map is idle (no read on its slow path for IDLE_AFTER x Δ) and a lease lapsed
    (an idle lapse: counted in ``idle_lapses``)."""
    lease = m._engine.leasing.current  # type: ignore[union-attr]
    assert lease is not None
    wait_until(lambda: time.monotonic() >= lease.busy_until, 10, "the map to go idle")
    lapses = m._core.counters.idle_lapses
    wait_until(lambda: m._core.counters.idle_lapses > lapses, 10, "a lease to lapse")


def test_an_idle_map_pings_at_the_idle_pace_and_keeps_its_entries(
    redis_server: EmbeddedRedis, idle_map: SyncMap
) -> None:
    lapses = idle_map.statistics().lease_lapses
    idle_for(idle_map)
    rate = pings_over(redis_server, WINDOW)
    # Counted apart: an idle map's lapses are by design, not the trouble lease_lapses means.
    assert idle_map.statistics().lease_lapses == lapses
    assert idle_map.statistics().idle_lapses > 0
    assert rate < 1.5, f"{rate:.1f} PINGs/s while idle (busy pace: {4 / DELTA:.0f}/s)"
    # Held, not flushed: every entry is still there, and after one vouch served again.
    assert [(idle_map.peek(f"k{i}") or (None,))[0] for i in range(50)] == list(range(50))
    misses = idle_map._core.counters.misses
    wait_until(lambda: idle_map.get_with_meta("k1")[2] == "local", 5, "a hit after idling")
    assert all(idle_map.get_with_meta(f"k{i}")[2] == "local" for i in range(50))
    assert idle_map._core.counters.misses - misses <= 3  # the reads before the vouch came
    assert idle_map._core.counters.revalidations > 0


def test_the_first_read_after_idling_sees_a_write_made_meanwhile(
    redis_server: EmbeddedRedis, idle_map: SyncMap
) -> None:
    # The writer opens first: a map's subscription, once confirmed, brings a vouch for every
    # map on the connection (its first), which would end the idle map's held state.
    with SyncMap("idle", redis_server.url, config=CFG, node_id="writer") as writer:
        idle_for(idle_map)
        # Held (its lease lapsed): nothing is served from the near cache until a vouch, and a
        # vouch's PONG comes after the write's message.  So the first read after the write is
        # acknowledged sees it, from Redis.  (A busy map may serve the old value for up to Δ.)
        writer["k7"] = "new"
        value, _, source = idle_map.get_with_meta("k7")
        assert (value, source) == ("new", "redis")
        wait_until(lambda: idle_map.get_with_meta("k8")[2] == "local", 5, "a hit again")
        assert idle_map.get_with_meta("k7")[:1] == ("new",)


def test_a_read_map_pings_at_the_busy_pace(redis_server: EmbeddedRedis, idle_map: SyncMap) -> None:
    """Reads that all hit keep the map busy (they pass the slow path every Δ/4).  The reader
    pauses a millisecond between reads: a reader spinning on the GIL lets the subscriber's
    thread keep only about half the pace (5 per s here, as before idle leases)."""
    end = time.monotonic() + WINDOW
    before = pings(redis_server)
    hits = 0
    while time.monotonic() < end:
        hits += idle_map["k3"] == 3
        time.sleep(0.001)  # the shape of the load, not a wait for an event
    rate = (pings(redis_server) - before) / WINDOW
    assert rate > 5.0, f"{rate:.1f} PINGs/s while read (busy pace {4 / DELTA:.0f}/s)"
    assert hits > 500


def test_control_without_idle_leases_an_idle_map_pings_every_quarter_delta(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    build = Engine._new_leasing

    def never_idle(self: Engine, prefix: bytes):  # type: ignore[no-untyped-def]
        leasing = build(self, prefix)
        leasing.idles, leasing._idle_every = False, 0.0
        return leasing

    monkeypatch.setattr(Engine, "_new_leasing", never_idle)
    with SyncMap("idle", redis_server.url, config=CFG) as m:
        m["k"] = 1
        assert m["k"] == 1
        # As long as the idle map waits to go idle (IDLE_AFTER x Δ), counted in vouches.
        vouches = m._core.counters.vouches
        wait_until(lambda: m._core.counters.vouches >= vouches + 4 * IDLE_AFTER, 10, "vouches")
        rate = pings_over(redis_server, WINDOW)
    assert rate > 2 / DELTA, f"{rate:.1f} PINGs/s"


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


async def test_asyncio_an_idle_map_pings_at_the_idle_pace_and_sees_a_write_made_meanwhile(
    redis_server: EmbeddedRedis,
) -> None:
    """The asyncio driver idles the same way (its subscriber task sends the wake-up PING)."""
    async with (
        aio.SyncMap("idle-a", redis_server.url, config=CFG) as m,
        aio.SyncMap("idle-a", redis_server.url, config=CFG, node_id="writer") as writer,
    ):
        for i in range(20):
            await m.set(f"k{i}", i)
            assert await m.get(f"k{i}") == i
        leasing = m._engine.leasing  # type: ignore[union-attr]
        assert leasing is not None and leasing.idles and leasing.current is not None
        lease = leasing.current
        # Polled on the loop, which must run while the map idles (wait_until would block it).
        await until(lambda: time.monotonic() >= lease.busy_until, "the map to go idle")
        lapses = m._core.counters.idle_lapses
        await until(lambda: m._core.counters.idle_lapses > lapses, "a lease to lapse")
        before = pings(redis_server)
        await asyncio.sleep(WINDOW)  # a window to count in, not a wait for an event
        rate = (pings(redis_server) - before) / WINDOW
        assert rate < 1.5, f"{rate:.1f} PINGs/s while idle"
        # The window's idle PINGs revalidated the entries for Δ each: wait for the next lapse.
        lapses = m._core.counters.idle_lapses
        await until(lambda: m._core.counters.idle_lapses > lapses, "a lease to lapse again")
        assert m.get_cached("k3") is aio.MISSING  # held: not served until a vouch
        await writer.set("k7", "new")  # acknowledged: the idle map's first read must see it
        assert await m.get("k7") == "new"
        await until(lambda: m.get_cached("k8") == 8, "a hit again")
        assert (await m.get_with_meta("k8"))[:1] == (8,)
        assert m.get_cached("k9") == 9  # kept while idle, served again after the vouch
