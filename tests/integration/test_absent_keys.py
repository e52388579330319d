"""Absent keys against a real redis-server: a read that finds no field caches an absent marker,
so the next reads of that key make no round trip, and a write elsewhere (another map object,
another process) still reaches it within ``max_staleness``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import redis

from syncmap import MapConfig, SyncMap, aio
from syncmap.testing.wait import wait_until

WRITER = """
import sys
from syncmap import SyncMap
with SyncMap(sys.argv[2], sys.argv[1]) as m:
    m[sys.argv[3]] = sys.argv[4]
"""


def hgets(url: str) -> int:
    """HGET calls the server has run so far (INFO commandstats): each is one miss's round trip."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


def cache_absent(m: SyncMap, key: str) -> int:
    """Read ``key`` (missing) until its marker is in; returns the reads it took.  The first
    read's marker may be refused, as a value fill would be, when a probe (the map's start-up
    sends a few) began while its HGET was out (``NearCache.tops``)."""
    start, reads = time.monotonic(), 0
    while not m._core.cached_absent(key):
        assert m.get(key) is None
        reads += 1
        assert time.monotonic() - start < 5.0, f"no marker for {key!r}: {m.statistics()}"
    return reads


@pytest.mark.parametrize("fast_hits", [False, True], ids=["default", "fast_hits"])
def test_reads_of_a_missing_key_after_the_first_make_no_round_trip(
    shared_redis_url: str, fast_hits: bool
) -> None:
    with SyncMap("absent", shared_redis_url, config=MapConfig(fast_hits=fast_hits)) as m:
        before = hgets(shared_redis_url)
        misses = cache_absent(m, "nope")  # one HGET (rarely more), and the marker goes in
        assert hgets(shared_redis_url) == before + misses
        for _ in range(1000):
            assert m.get("nope", 7) == 7
            assert "nope" not in m
            with pytest.raises(KeyError):
                m["nope"]
        assert m.get_with_meta("nope") == (None, 0, "local")
        assert hgets(shared_redis_url) == before + misses, "a read of the absent key went to Redis"
        s = m.statistics()
        assert (s.misses, s.entries, s.absent, s.absent_fills) == (misses, 0, 1, 1)
        assert s.hits >= 3000 and m.peek("nope") is None
        assert len(m) == 0 and list(m) == [] and not m


def test_control_without_cache_absent_every_read_is_a_round_trip(shared_redis_url: str) -> None:
    with SyncMap("absent", shared_redis_url, config=MapConfig(cache_absent=False)) as m:
        before = hgets(shared_redis_url)
        for _ in range(10):
            assert m.get("nope") is None
        assert hgets(shared_redis_url) == before + 10
        assert m.statistics().absent == 0


def test_a_write_in_another_process_reaches_a_cached_absent_key(shared_redis_url: str) -> None:
    cfg = MapConfig(max_staleness=1.0)
    with SyncMap("absent", shared_redis_url, config=cfg) as a:
        cache_absent(a, "k")
        assert "k" not in a and a.statistics().absent == 1
        subprocess.run([sys.executable, "-c", WRITER, shared_redis_url, "absent", "k", "v"],
                       check=True, timeout=60)  # fmt: skip
        # The write is acknowledged (the writer process has exited): A must see it within Δ.
        took = wait_until(lambda: a.get("k") == "v", cfg.max_staleness, "A sees k")
        assert took < cfg.max_staleness
        assert a.statistics().absent == 0 and a.peek("k") == ("v", 1)


def test_a_write_by_another_map_reaches_the_asyncio_map_s_absent_key(shared_redis_url: str
                                                                      ) -> None:  # fmt: skip
    """The asyncio driver reads through the same flow: its ``get`` answers from the marker too."""

    async def main() -> None:
        async with aio.SyncMap("absent", shared_redis_url) as a:
            # The first read's marker may be refused (a probe of the map's start-up began while
            # its HGET was out: NearCache.tops), as a value fill would be: read until one is in.
            start = time.monotonic()
            while a.statistics().absent == 0:
                assert await a.get("k", "none") == "none"
                assert time.monotonic() - start < 5.0, f"no marker: {a.statistics()}"
            before = hgets(shared_redis_url)
            for _ in range(100):
                assert not await a.contains("k")
                assert await a.get("k") is None
                assert a.get_cached("k", "none") == "none"
            assert await a.get_with_meta("k") == (None, 0, "local")
            after = hgets(shared_redis_url)
            assert after == before, f"the asyncio map went to Redis: {a.statistics()}"
            with SyncMap("absent", shared_redis_url) as b:
                b["k"] = "v"
            start = time.monotonic()
            while await a.get("k") != "v":
                assert time.monotonic() - start < 1.0, "the asyncio map still says absent"
                await asyncio.sleep(0.001)  # hands the loop to the feed (a poll, not a wait)
            assert a.statistics().absent == 0

    asyncio.run(main())
