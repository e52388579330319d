"""The ``syncmap[otel]`` extra (issue 17 §2): OpenTelemetry metrics of real maps and locks on a real
redis-server, scraped over HTTP from the OpenTelemetry Prometheus exporter, as a Prometheus server
would; and nothing of OpenTelemetry is imported unless the extra is used."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

import syncmap.otel
from syncmap import Lock, MapConfig, SyncMap
from syncmap.errors import LockLost, LockNotAcquired
from syncmap.testing.wait import wait_until

# Probing every Δ/4 (no PING leases): syncmap.store.items is counted by the probes, which PING
# leases make rare (docs/metrics.md).
CFG = MapConfig(buckets=4, max_staleness=0.4, presence=False, ping_leases=False)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def scrape(request: pytest.FixtureRequest) -> Iterator[tuple[str, syncmap.otel.Instrumentation]]:
    """The exporter's HTTP server on a free port, fed by syncmap's instruments (``node_id`` by
    indirect parametrization, default True)."""
    reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    handle = syncmap.otel.enable(provider, node_id=getattr(request, "param", True))
    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics", handle
    finally:
        syncmap.otel.disable()
        server.shutdown()
        server.server_close()
        thread.join(5)
        provider.shutdown()  # unregisters the reader's collector from the default registry


def get(url: str) -> tuple[set[str], Samples]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    names, samples = set(), {}
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return names, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (0 when there is none)."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) <= 1, f"{name} {labels}: {found}"
    return found[0] if found else 0.0


def test_a_prometheus_scrape_shows_every_figure(
    redis_url: str, admin: redis.Redis, scrape: tuple[str, syncmap.otel.Instrumentation]
) -> None:
    url, _ = scrape
    _, before = get(url)  # lock figures are the process's since it started: compare with these
    writer = SyncMap("otel-m", redis_url, config=CFG, node_id="writer")
    reader = SyncMap("otel-m", redis_url, config=CFG, node_id="reader")
    try:
        for i in range(5):
            writer[f"k{i}"] = i
        for _ in range(3):
            assert [reader[f"k{i}"] for i in range(5)] == list(range(5))  # 5 misses, 10 hits
        writer["k0"] = 100  # the reader has k0 cached: its invalidation is observed staleness
        wait_until(lambda: reader.peek("k0") is None, 5, "k0 invalidated on the reader")
        assert reader.get("nope") is None  # one more miss

        held = writer.lock("k1")
        held.acquire()
        with pytest.raises(LockNotAcquired):
            reader.lock("k1").acquire(blocking=False)  # a timeout: held by the writer
        held.release()
        lost: list[LockLost] = []
        doomed = Lock("otel-doomed", redis_url, lease=0.3, on_lost=lost.append)
        doomed.acquire()
        admin.delete(doomed.layout.hold)  # the next renewal finds it gone: lost
        wait_until(lambda: bool(lost), 5, "the lock is lost")

        stats = reader.statistics()
        names, samples = get(url)
        r, w = {"syncmap_map_name": "otel-m", "syncmap_node_id": "reader"}, {
            "syncmap_node_id": "writer"}  # fmt: skip
        assert {
            "syncmap_cache_requests", "syncmap_cache_evictions", "syncmap_cache_fills_rejected",
            "syncmap_cache_resyncs", "syncmap_cache_lease_lapses", "syncmap_cache_stale_reads",
            "syncmap_feed_messages",
            "syncmap_feed_dropped_messages", "syncmap_feed_gaps", "syncmap_feed_lost",
            "syncmap_feed_digest_mismatches", "syncmap_store_epoch_changes",
            "syncmap_feed_publish_failures", "syncmap_events_dropped", "syncmap_cache_items",
            "syncmap_store_items", "syncmap_cache_freshness_seconds", "syncmap_feed_lag_seconds",
            "syncmap_cache_staleness_seconds", "syncmap_lock_acquisitions", "syncmap_lock_losses",
            "syncmap_lock_wait_time_seconds",
        } <= names  # fmt: skip
        hits = value(samples, "syncmap_cache_requests_total", syncmap_cache_result="hit", **r)
        misses = value(samples, "syncmap_cache_requests_total", syncmap_cache_result="miss", **r)
        assert (hits, misses) == (stats.hits, stats.misses) == (10, 6)
        assert value(samples, "syncmap_cache_evictions_total", syncmap_cache_reason="invalidation",
                     **r) == stats.invalidations >= 1  # fmt: skip
        assert value(samples, "syncmap_cache_items", **r) == stats.entries
        assert value(samples, "syncmap_store_items", **r) in (5, 4)  # probed before the last set?
        assert value(samples, "syncmap_feed_messages_total", **r) == stats.messages >= 6
        assert value(samples, "syncmap_feed_dropped_messages_total", syncmap_drop_reason="forged",
                     **r) == 0  # fmt: skip
        assert 0 <= value(samples, "syncmap_cache_freshness_seconds", **r) < CFG.max_staleness
        # Every change reached the reader with its age (feed lag); one of them dropped a cached
        # entry (observed staleness).  On one machine, ages are well under a second.
        lag_count = value(samples, "syncmap_feed_lag_seconds_count", **r)
        assert lag_count == 6  # the six sets, each one message
        assert value(samples, "syncmap_feed_lag_seconds_bucket", le="+Inf", **r) == lag_count
        assert 0 <= value(samples, "syncmap_feed_lag_seconds_sum", **r) < 6 * 1.0
        assert value(samples, "syncmap_cache_staleness_seconds_count", **r) == 1
        assert value(samples, "syncmap_cache_staleness_seconds_count", **w) == 0  # own writes
        assert value(samples, "syncmap_feed_lag_seconds_count", **w) == 6  # their echoes

        def grew(name: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before, name, **labels)

        kind = {"syncmap_lock_kind": "lock"}
        assert grew("syncmap_lock_acquisitions_total", syncmap_lock_result="acquired", **kind) == 2
        assert grew("syncmap_lock_acquisitions_total", syncmap_lock_result="timeout", **kind) == 1
        assert grew("syncmap_lock_losses_total", **kind) == 1
        assert grew("syncmap_lock_wait_time_seconds_count", syncmap_lock_result="acquired",
                    **kind) == 2  # fmt: skip
        with pytest.raises(LockLost):
            doomed.release()
    finally:
        writer.close()
        reader.close()
    # Closed maps are no longer reported; the process-wide lock figures still are.
    _, after = get(url)
    assert value(after, "syncmap_cache_items", syncmap_map_name="otel-m") == 0
    lost_since = value(after, "syncmap_lock_losses_total", syncmap_lock_kind="lock") - value(
        before, "syncmap_lock_losses_total", syncmap_lock_kind="lock")  # fmt: skip
    assert lost_since == 1


@pytest.mark.parametrize("scrape", [False], indirect=True)
def test_without_node_ids_the_maps_of_one_name_add_up(
    redis_url: str, scrape: tuple[str, syncmap.otel.Instrumentation]
) -> None:
    url, handle = scrape
    assert not handle.node_id
    maps = [SyncMap("otel-n", redis_url, config=CFG) for _ in range(2)]
    try:
        maps[0]["x"] = 1
        for m in maps:
            assert (m["x"], m["x"]) == (1, 1)  # the writer: 2 hits; the other: 1 miss, 1 hit
        _, samples = get(url)
        hits = value(samples, "syncmap_cache_requests_total", syncmap_cache_result="hit",
                     syncmap_map_name="otel-n")  # fmt: skip
        assert hits == sum(m.statistics().hits for m in maps) == 3
        assert not [k for k in samples if dict(k[1]).get("syncmap_node_id")]
    finally:
        for m in maps:
            m.close()


def test_syncmap_needs_nothing_of_opentelemetry_without_the_extra(redis_url: str) -> None:
    """With OpenTelemetry and prometheus_client unimportable (as without the extra), a map and a
    lock work and ``syncmap.otel`` is never imported.  (redis-py >= 8 imports OpenTelemetry on
    its own when it is installed, so "not in sys.modules" cannot be the check.)"""
    code = (
        "import sys\n"
        "for name in ('opentelemetry', 'prometheus_client'):\n"
        "    sys.modules[name] = None  # import raises ImportError\n"
        "import syncmap\n"
        f"m = syncmap.SyncMap('plain', {redis_url!r}); m['a'] = 1; assert m['a'] == 1\n"
        "with m.lock('a'):\n"
        "    pass\n"
        "m.close()\n"
        "assert 'syncmap.otel' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
