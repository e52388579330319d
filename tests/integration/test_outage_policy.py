"""The outage policy against real redis-server processes: strict (the default) and serve_stale,
a SIGSTOPped (hung) Redis, a killed and restarted one, and one map cut off by a proxy while
another writes.  docs/outages.md describes what these prove."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from syncmap import MapConfig, StoreUnavailable, SyncMap
from syncmap.embedded import EmbeddedRedis
from syncmap.errors import ConfigurationError
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.wait import wait_until

DELTA, AGE, DEADLINE = 0.5, 2.0, 0.3
STRICT = MapConfig(max_staleness=DELTA, call_timeout=DEADLINE, self_check_timeout=2.0)
STALE = MapConfig(max_staleness=DELTA, call_timeout=DEADLINE, self_check_timeout=2.0,
                  on_store_down="serve_stale", max_stale_age=AGE)  # fmt: skip
SLACK = 0.15  # scheduling slack on a loaded two-core machine


@pytest.fixture
def paused(redis_server: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """The server, resumed after the test whatever happened."""
    try:
        yield redis_server
    finally:
        redis_server.resume()


def read_until_failure(m: SyncMap, key: str, limit: float) -> tuple[list[tuple[float, str]], float]:
    """Read ``key`` until it raises StoreUnavailable: ((time, provenance) per read, failed at)."""
    reads, started = [], time.monotonic()
    while time.monotonic() - started < limit:
        t = time.monotonic()
        try:
            _, _, source = m.get_with_meta(key)
        except StoreUnavailable:
            return reads, time.monotonic()
        reads.append((t, source))
    raise AssertionError(f"{key} still served {limit} s into the outage: {reads[-3:]}")


def test_config_refuses_nonsense() -> None:
    with pytest.raises(ConfigurationError, match="on_store_down"):
        MapConfig(on_store_down="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_stale_age"):
        MapConfig(on_store_down="serve_stale", max_staleness=2.0, max_stale_age=1.0)
    with pytest.raises(ConfigurationError, match="fast_hits"):
        MapConfig(on_store_down="serve_stale", fast_hits=True)
    with pytest.raises(ConfigurationError, match="call_timeout"):
        MapConfig(call_timeout=0)
    MapConfig(max_staleness=100.0)  # max_stale_age matters only in serve_stale mode


def test_strict_mode_raises_within_delta_of_a_hung_redis(paused: EmbeddedRedis) -> None:
    with SyncMap("m", paused.url, config=STRICT) as m:
        m["hot"] = 1
        assert m.get_with_meta("hot")[2] == "local"
        paused.pause()
        cut = time.monotonic()
        reads, failed = read_until_failure(m, "hot", 5.0)
        assert all(source == "local" for _, source in reads)
        assert reads[-1][0] - cut < DELTA  # never served beyond Δ from the last confirmation
        assert failed - cut < DELTA + 2 * DEADLINE + SLACK  # raises about Δ after the cut
        t = time.monotonic()  # every later call is bounded by the deadline, not the socket's 5 s
        with pytest.raises(StoreUnavailable):
            m.get("hot")
        with pytest.raises(StoreUnavailable):
            m["other"] = 2
        assert time.monotonic() - t < 2 * DEADLINE + SLACK
        assert m.statistics().stale_reads == 0


def test_serve_stale_serves_flagged_counted_and_bounded_reads_of_a_hung_redis(
    paused: EmbeddedRedis,
) -> None:
    with SyncMap("m", paused.url, config=STALE) as m:
        m["hot"] = 1
        paused.pause()
        cut = time.monotonic()
        reads, failed = read_until_failure(m, "hot", AGE + 3.0)
        stale = [t for t, source in reads if source == "stale"]
        assert stale, "nothing was served stale"
        assert all(t - cut < DELTA for t, source in reads if source == "local")
        assert max(stale) - cut < AGE  # never beyond max_stale_age
        assert failed - cut > AGE - DELTA  # served about max_stale_age, then loud
        assert m.statistics().stale_reads == len(stale)
        # A stale read does not wait for the socket: it never touches it.
        assert len(stale) > 1000
        t = time.monotonic()
        with pytest.raises(StoreUnavailable):  # an uncached key still fails, within the deadline
            m.get("cold")
        assert time.monotonic() - t < 2 * DEADLINE + SLACK


def test_serve_stale_during_a_kill_then_repairs_after_a_restart_with_new_data(
    redis_server: EmbeddedRedis,
) -> None:
    with SyncMap("m", redis_server.url, config=STALE) as m:
        m["hot"] = "old"
        redis_server.kill()
        wait_until(lambda: m.get_with_meta("hot")[2] == "stale", 2 * DELTA + 1, "a stale read")
        assert m["hot"] == "old"
        redis_server.restart()  # no persistence: empty, a new epoch
        with SyncMap("m", redis_server.url, config=STRICT) as other:
            other["hot"] = "new"
            back = time.monotonic()
            took = wait_until(lambda: m.get("hot") == "new", 5, "the new value after the restart")
        assert took <= DELTA + SLACK + DEADLINE
        assert m.get_with_meta("hot")[2] in ("local", "redis")
        assert time.monotonic() - back < 5


def test_serve_stale_repairs_within_delta_after_a_cut_during_which_another_map_wrote(
    redis_server: EmbeddedRedis,
) -> None:
    """Only this map's path is cut (black-holed: no FIN, no RST, like a dead link); another map
    writes meanwhile and its change message never reaches this one.  Served stale and flagged
    during the cut; after the heal the new value is read within Δ, never the old one after."""
    with (
        FaultProxy(redis_server.host, redis_server.port) as proxy,
        SyncMap("m", proxy.url, config=STALE) as m,
        SyncMap("m", redis_server.url, config=STRICT) as writer,
    ):
        writer["k"] = "old"
        assert m["k"] == "old"
        proxy.blackhole()
        writer["k"] = "new"
        wait_until(lambda: m.get_with_meta("k")[2] == "stale", 2 * DELTA + 1, "a stale read")
        value, _, source = m.get_with_meta("k")
        assert (value, source) == ("old", "stale")
        proxy.heal()
        healed = time.monotonic()
        took = wait_until(lambda: m.get("k") == "new", 5, "the write made during the cut")
        # The probe thread may still be waiting out a call sent into the black hole.
        assert took <= DELTA + DEADLINE + SLACK
        for _ in range(1000):  # the old value never comes back
            assert m.get("k") == "new"
        assert time.monotonic() - healed < 5
