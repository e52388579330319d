"""TESTPLAN §8 scenarios for the near cache: S04, S05, S07, S08, S09, short forms for CI.

Each server is its own OS process (``syncmap.testing.workload``).  Every scenario that guards
against a bug runs a second time with that guard switched off (``Guards``) and must then fail:
only that proves its green run means something.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from syncmap import MapConfig, SyncMap
from syncmap.core.nearcache import Guards
from syncmap.core.wire import pack_value
from syncmap.embedded import EmbeddedRedis
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.testing.faults import client_kill, flushall, set_pubsub_output_limit
from syncmap.testing.history import Op, SweepReport, sweep
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.wait import wait_until
from syncmap.testing.workload import Cluster, ServerResult, Workload

pytestmark = pytest.mark.scenario
DELTA = 1.0
OFF = Guards(fill_race=False, gaps=False, probe=False, epoch=False)


class Writer:
    """The test's own writer: records its writes in the history like a server does."""

    def __init__(self, url: str, name: str = "scenario") -> None:
        self.map = SyncMap(name, url, node_id="parent")
        self.ops: list[Op] = []
        self.n = 0

    def write(self, key: str) -> None:
        self.n += 1
        value = f"parent-{self.n}"
        call = time.monotonic_ns()
        version = self.map.set(key, value)
        self.ops.append(Op("parent", "write", key, value, version, call, time.monotonic_ns()))

    def close(self) -> None:
        self.map.close()


@pytest.fixture
def writer(redis_server: EmbeddedRedis) -> Iterator[Writer]:
    w = Writer(redis_server.url)
    yield w
    w.close()


def divergent(results: list[ServerResult], url: str) -> list[str]:
    """C3: after quiescence every cached entry equals the store's value and version."""
    out = []
    with SyncMap("scenario", url, node_id="checker") as truth:
        for r in results:
            for key, cached in r.cached.items():
                if cached is None:
                    continue
                value, version, _ = truth.get_with_meta(key, consistent=True)
                if (value, version) != tuple(cached):
                    out.append(f"{r.process} caches {key}={cached}, store has {value}@{version}")
    return out


def report(name: str, rep: SweepReport, results: list[ServerResult], extra: str = "") -> None:
    counters = {k: sum(r.stats.get(k, 0) for r in results) for k in results[0].stats}
    print(f"\n{name}: {rep.summary()} {extra}\n  counters: {counters}")


def run_cluster(w: Workload, fault: Any = None) -> list[ServerResult]:
    """Run the workload's server processes, inject ``fault(cluster)`` meanwhile, collect them."""
    cluster = Cluster(w)
    try:
        if fault is not None:
            fault(cluster)
        return cluster.join()
    finally:
        cluster.kill()


def run_and_check(
    w: Workload, fault: Any = None, writer: Writer | None = None
) -> tuple[SweepReport, list[str], list[ServerResult]]:
    results = run_cluster(w, fault)
    ops = [op for r in results for op in r.ops] + (writer.ops if writer else [])
    return sweep(ops, DELTA), divergent(results, w.url), results


# ---- S04 -----------------------------------------------------------------------------------


def test_s04_nearcache_staleness_load(redis_server: EmbeddedRedis) -> None:
    rep, diverged, results = run_and_check(Workload(redis_server.url, seconds=4))
    report("S04", rep, results)
    assert rep.reads > 1000 and rep.local_reads > rep.reads / 2, "the cache must be exercised"
    assert rep.anomalies == 0, rep.witnesses
    assert diverged == []


# ---- S05 -----------------------------------------------------------------------------------


def fill_race(redis_server: EmbeddedRedis, guard: bool, iterations: int = 15) -> tuple[int, int]:
    """B misses k on a slow data path while A rewrites k; return (races, stale entries)."""
    admin = redis_server.client()
    stale = 0
    with (
        FaultProxy(redis_server.host, redis_server.port) as proxy,
        SyncMap("s05", redis_server.url) as a,
        SyncMap("s05", proxy.url, feed=redis_server.url,
                config=MapConfig(guards=Guards(fill_race=guard))) as b,
    ):  # fmt: skip
        proxy.latency(60, "downstream")  # B's replies arrive 60 ms late; its feed is direct
        for i in range(iterations):
            key = f"k{i}"
            a[key] = "v1"
            hgets = _hget_calls(admin)
            reader = threading.Thread(target=b.get, args=(key,))
            reader.start()
            wait_until(lambda n=hgets: _hget_calls(admin) > n, 5, "B's HGET reaching Redis")
            v2 = a.set(key, "v2")  # its invalidation reaches B long before B's HGET reply
            reader.join()
            cached = b.peek(key)
            if cached is not None and cached[1] < v2:
                stale += 1
        races = b.statistics().fills_rejected
    admin.close()
    return races, stale


def _hget_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


def test_s05_fill_invalidate_race(redis_server: EmbeddedRedis) -> None:
    races, stale = fill_race(redis_server, guard=True)
    print(f"\nS05: races provoked={races} permanently stale entries={stale}")
    assert races >= 10 and stale == 0


def test_s05_without_the_fill_gate_caches_stale_values(redis_server: EmbeddedRedis) -> None:
    _, stale = fill_race(redis_server, guard=False)
    assert stale > 0, "the S05 oracle must catch the fill race when the gate is off"


# ---- S07 -----------------------------------------------------------------------------------


def kill_subscribers(redis_server: EmbeddedRedis, writer: Writer, seconds: float) -> Any:
    """Every 0.5 s: CLIENT KILL TYPE pubsub, then rewrite every key while they reconnect."""

    def fault(cluster: Cluster) -> None:
        admin = redis_server.client()
        end = cluster.started + seconds - 1.0
        while time.monotonic() < end:
            time.sleep(0.5)  # the fault schedule, not a wait for anything
            client_kill(admin, "pubsub")
            for i in range(64):
                writer.write(f"k{i}")
        admin.close()

    return fault


def test_s07_lost_invalidation_disconnect(redis_server: EmbeddedRedis, writer: Writer) -> None:
    w = Workload(redis_server.url, seconds=4)
    rep, diverged, results = run_and_check(w, kill_subscribers(redis_server, writer, 4), writer)
    report("S07", rep, results)
    assert rep.anomalies == 0, rep.witnesses
    assert diverged == []


def test_s07_without_gap_and_probe_guards_goes_stale(
    redis_server: EmbeddedRedis, writer: Writer
) -> None:
    w = Workload(redis_server.url, seconds=4, guards=OFF)
    rep, diverged, _ = run_and_check(w, kill_subscribers(redis_server, writer, 4), writer)
    assert diverged or rep.stale_beyond_delta > 0, "S07's oracle must catch lost invalidations"


def test_s07_slow_subscriber_output_buffer_disconnect(
    redis_server: EmbeddedRedis, writer: Writer
) -> None:
    """A paused server's subscriber is cut by client-output-buffer-limit; it must heal."""
    admin = redis_server.client()
    set_pubsub_output_limit(admin, 65536, 32768, 1)

    def fault(cluster: Cluster) -> None:
        victim = cluster.pids[0]
        before = _pubsub_clients(admin)
        os.kill(victim, signal.SIGSTOP)
        try:
            while _pubsub_clients(admin) >= before:  # until Redis drops the paused subscriber
                for i in range(64):
                    writer.write(f"k{i}")
        finally:
            os.kill(victim, signal.SIGCONT)

    rep, diverged, results = run_and_check(Workload(redis_server.url, seconds=4), fault, writer)
    report("S07b", rep, results)
    admin.close()
    assert rep.anomalies == 0, rep.witnesses
    assert diverged == []


def _pubsub_clients(admin: redis.Redis) -> int:
    return sum(1 for c in admin.client_list() if c.get("flags", "").find("P") >= 0)


# ---- S08 -----------------------------------------------------------------------------------


def silent_feed(guards: Guards) -> Any:
    def run(redis_server: EmbeddedRedis) -> tuple[SweepReport, list[str], list[ServerResult]]:
        with FaultProxy(redis_server.host, redis_server.port) as proxy:
            w = Workload(redis_server.url, seconds=5, feed=proxy.url, guards=guards)

            def fault(cluster: Cluster) -> None:
                time.sleep(1.0)  # fault schedule
                proxy.stall("both")  # the feed goes silent: no error, no FIN, nothing
                time.sleep(2.5)
                proxy.heal()

            return run_and_check(w, fault)

    return run


def test_s08_silent_feed_blackhole(redis_server: EmbeddedRedis) -> None:
    rep, diverged, results = silent_feed(Guards())(redis_server)
    report("S08", rep, results)
    assert sum(r.stats["lost_detected"] for r in results) > 0, "the stall must be detected"
    assert rep.anomalies == 0, rep.witnesses
    assert diverged == []


def test_s08_without_probes_a_silent_feed_serves_stale(redis_server: EmbeddedRedis) -> None:
    rep, _, _ = silent_feed(Guards(probe=False))(redis_server)
    assert rep.stale_beyond_delta > 0, "S08's oracle must catch a silent feed without probes"


# ---- S09 -----------------------------------------------------------------------------------


def ghost_writes(redis_server: EmbeddedRedis, writer: Writer, count: int) -> Any:
    """Writes whose change message is lost: the version is taken, nothing is published."""

    def fault(cluster: Cluster) -> None:
        admin = redis_server.client()
        layout = Layout("sm", "scenario", 16)
        for n in range(count):
            time.sleep(0.25)  # fault schedule
            key = f"k{32 + n % 32}"  # cold keys: nobody rewrites them soon
            field = encode_key(key, 1000)
            m, d, _ = layout.bucket_keys(bucket_of(field, 16))
            value = f"ghost-{n}"
            call = time.monotonic_ns()
            version = int(admin.hincrby(m, "seq", 1))
            epoch = int(admin.hget(m, "epoch") or 0)
            payload = writer.map._codec.encode(value)
            admin.hset(d, field, pack_value(version, 0, payload, epoch))
            writer.ops.append(Op("ghost", "write", key, value, version, call, time.monotonic_ns()))
            writer.write(f"k{n % 4}")  # a later real write in some bucket (gap there)
        admin.close()

    return fault


def test_s09_message_gaps_are_detected(redis_server: EmbeddedRedis, writer: Writer) -> None:
    w = Workload(redis_server.url, seconds=4)
    rep, diverged, results = run_and_check(w, ghost_writes(redis_server, writer, 10), writer)
    detected = sum(r.stats["gaps"] + r.stats["lost_detected"] for r in results)
    report("S09-gap", rep, results, f"injected=10 detected={detected}")
    assert detected > 0
    assert rep.anomalies == 0, rep.witnesses
    assert diverged == []


def test_s09_without_gap_detection_lost_messages_stay_stale(
    redis_server: EmbeddedRedis, writer: Writer
) -> None:
    w = Workload(redis_server.url, seconds=4, guards=OFF)
    rep, diverged, _ = run_and_check(w, ghost_writes(redis_server, writer, 10), writer)
    assert diverged or rep.stale_beyond_delta > 0, "S09's oracle must catch lost messages"


def reset_store(redis_server: EmbeddedRedis, how: str, guards: Guards) -> list[str]:
    """FLUSHALL or restart without persistence mid-run; returns the violations found."""
    marks: dict[str, int] = {}

    def fault(cluster: Cluster) -> None:
        time.sleep(1.5)  # fault schedule
        marks["call"] = time.monotonic_ns()
        if how == "flushall":
            admin = redis_server.client()
            flushall(admin)
            admin.close()
        else:
            redis_server.kill()
            redis_server.restart()
        marks["ret"] = time.monotonic_ns()

    w = Workload(redis_server.url, seconds=4, guards=guards)
    results = run_cluster(w, fault)
    ops = [op for r in results for op in r.ops]
    return pre_reset_reads(ops, marks["call"], marks["ret"]) + divergent(results, w.url)


def pre_reset_reads(ops: list[Op], reset_call: int, reset_ret: int) -> list[str]:
    """Reads invoked more than DELTA after the reset must not return a value from before it."""
    before = {(o.key, o.value) for o in ops if o.f in ("write", "info") and o.ret_ns < reset_call}
    late = reset_ret + int(DELTA * 1e9)
    return [
        f"{o.process} read pre-reset {o.key}={o.value} {(o.call_ns - reset_ret) / 1e6:.0f} ms after"
        for o in ops
        if o.f == "read" and o.call_ns > late and (o.key, o.value) in before
    ]


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_s09_store_reset_drops_everything_within_delta(
    redis_server: EmbeddedRedis, how: str
) -> None:
    violations = reset_store(redis_server, how, Guards())
    assert violations == [], violations[:5]


@pytest.mark.parametrize("how", ["flushall", "restart"])
def test_s09_without_epoch_checks_a_reset_store_leaves_stale_caches(
    redis_server: EmbeddedRedis, how: str
) -> None:
    assert reset_store(redis_server, how, OFF), "S09's oracle must catch a reset store"
