"""Near-cache scenarios of TESTPLAN §8: S04, S05, S07, S08, S09, registered for tests, ``syncmap
torture`` and ``syncmap verify``.

Each server is its own OS process (:mod:`syncmap.testing.workload`).  A scenario that guards
against a bug takes ``guard=False`` to run with that protection off (through
:class:`~syncmap.core.nearcache.Guards`); it must then report failures.

How they scale with ``seconds`` (the time the load runs; start-up and the quiet period of C3 come
on top, about 2 s a round):

* S04 runs one workload of ``seconds`` (rounds of at most a minute, each on a fresh map).
* S05 repeats its race until ``seconds`` are used, or exactly ``iterations`` times.
* S07, S08, S09 repeat short rounds of their fault schedule, each on a fresh map; with no
  ``variant`` they split ``seconds`` between their variants.

Only S04 may run on a user's Redis (``env.url``): it writes one map of its own, named
``s04-<random>``, and deletes every key of it afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Literal

import redis

from ..config import MapConfig
from ..core.nearcache import Guards
from ..core.wire import pack_value
from ..embedded import EmbeddedRedis
from ..keys import Layout, bucket_of, encode_key
from ..map import SyncMap
from .faults import (
    delete_matching,
    flushall,
    kill_subscribers,
    master_clients,
    set_pubsub_output_limit,
    subscribers,
)
from .history import Op, SweepReport, sweep
from .proxy import FaultProxy
from .scenario import (
    ANOMALIES,
    OPS,
    STALE_MAX,
    STALE_P50,
    STALE_P99,
    Env,
    ScenarioResult,
    finish,
    scenario,
    timed,
)
from .wait import wait_until
from .workload import Cluster, ServerResult, Workload

DELTA = 1.0  # the contract's max_staleness, the workload's default
OFF = Guards(fill_race=False, gaps=False, probe=False, epoch=False)
Fault = Callable[[Cluster], None]

S07Variant = Literal["kill", "slow-subscriber"]
S09Variant = Literal["gap", "flushall", "restart"]
S07_VARIANTS: tuple[S07Variant, ...] = ("kill", "slow-subscriber")
S09_VARIANTS: tuple[S09Variant, ...] = ("gap", "flushall", "restart")


# ---- shared pieces ------------------------------------------------------------------------------


class Writer:
    """The scenario's own writer: records its writes in the history like a server does."""

    def __init__(self, url: str, name: str) -> None:
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


@contextlib.contextmanager
def _writer(url: str, name: str) -> Iterator[Writer]:
    w = Writer(url, name)
    try:
        yield w
    finally:
        w.close()


def divergent(results: list[ServerResult], url: str, name: str) -> list[str]:
    """C3: after quiescence every cached entry equals the store's value and version."""
    out = []
    with SyncMap(name, url, node_id="checker") as truth:
        for r in results:
            for key, cached in r.cached.items():
                if cached is None:
                    continue
                value, version, _ = truth.get_with_meta(key, consistent=True)
                if (value, version) != tuple(cached):
                    out.append(f"{r.process} caches {key}={cached}, store has {value}@{version}")
    return out


def run_cluster(w: Workload, fault: Fault | None = None) -> list[ServerResult]:
    """Run the workload's server processes, inject ``fault(cluster)`` meanwhile, collect them."""
    cluster = Cluster(w)
    try:
        if fault is not None:
            fault(cluster)
        return cluster.join()
    finally:
        cluster.kill()


def _rounds(seconds: float, longest: float, shortest: float) -> list[float]:
    """Split ``seconds`` into equal rounds of at most ``longest`` seconds (fewer if they would be
    shorter than ``shortest``); always one round, of at least ``shortest`` seconds."""
    n = max(1, min(math.ceil(seconds / longest), math.floor(seconds / shortest)))
    return [max(shortest, seconds / n)] * n


def _round_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class _Tally:
    """Figures of a cache scenario summed over its rounds."""

    def __init__(self) -> None:
        self.rep = SweepReport()
        self.diverged: list[str] = []
        self.counters: Counter[str] = Counter()
        self.rounds = 0

    def add(
        self, rep: SweepReport | None, diverged: list[str], results: list[ServerResult]
    ) -> None:
        self.rounds += 1
        if rep is not None:
            t = self.rep
            t.reads += rep.reads
            t.writes += rep.writes
            t.local_reads += rep.local_reads
            t.stale_reads += rep.stale_reads
            t.stale_beyond_delta += rep.stale_beyond_delta
            t.monotonic_violations += rep.monotonic_violations
            t.ryw_violations += rep.ryw_violations
            t.phantom_reads += rep.phantom_reads
            t.staleness_ms += rep.staleness_ms
            t.witnesses += rep.witnesses[: max(0, 10 - len(t.witnesses))]
        self.diverged += diverged
        for r in results:
            self.counters.update({k: v for k, v in r.stats.items() if isinstance(v, int)})

    def figures(self, result: ScenarioResult, *, swept: bool = True) -> None:
        """The sweep's figures (when the history was swept) and the C3 check's, into ``result``."""
        f = result.figures
        rep = self.rep
        if swept:
            f[OPS] = rep.reads + rep.writes
            f[ANOMALIES] = f.get(ANOMALIES, 0) + rep.anomalies + len(self.diverged)
            f["reads"] = rep.reads
            f["hit_ratio"] = round(rep.local_reads / rep.reads, 3) if rep.reads else 0.0
            f["stale_reads"] = rep.stale_reads
            f["stale_beyond_delta"] = rep.stale_beyond_delta
            f[STALE_P50] = round(rep.percentile(50), 2)
            f[STALE_P99] = round(rep.percentile(99), 2)
            f[STALE_MAX] = round(max(rep.staleness_ms, default=0.0), 2)
            f["monotonic_regressions"] = rep.monotonic_violations
            f["ryw_violations"] = rep.ryw_violations
            f["phantom_reads"] = rep.phantom_reads
        else:
            f[ANOMALIES] = f.get(ANOMALIES, 0) + len(self.diverged)
        f["divergent_entries"] = len(self.diverged)
        f["rounds"] = self.rounds
        for name in ("lost_detected", "gaps", "epoch_changes", "resyncs", "fills_rejected"):
            f[name] = self.counters.get(name, 0)

    def require_clean(self, result: ScenarioResult, *, swept: bool = True) -> None:
        """The "must 0" of C2 (stale > Δ), C4, C5, C6 and C3 (divergent entries after Δ)."""
        rep = self.rep
        if swept:
            result.require(
                rep.anomalies == 0,
                f"{rep.anomalies} anomalies (stale>Δ {rep.stale_beyond_delta}, monotonic "
                f"{rep.monotonic_violations}, RYW {rep.ryw_violations}, phantom "
                f"{rep.phantom_reads}); e.g. {rep.witnesses[:3]}",
            )
        result.require(
            not self.diverged,
            f"{len(self.diverged)} cached entries differ from the store after Δ (C3); "
            f"e.g. {self.diverged[:3]}",
        )


def _sweep_round(
    w: Workload, fault: Fault | None = None, writer: Writer | None = None
) -> tuple[SweepReport, list[str], list[ServerResult]]:
    results = run_cluster(w, fault)
    ops = [op for r in results for op in r.ops] + (writer.ops if writer else [])
    return sweep(ops, DELTA), divergent(results, w.url, w.name), results


def delete_map(url: str, name: str, namespace: str = "sm") -> int:
    """Remove every Redis key of map ``name`` (meta and buckets, on every master); how many."""
    return delete_matching(url, [f"{namespace}:{{{name}}}*", f"{namespace}:{{{name}:*"])


# ---- S04 --------------------------------------------------------------------------------------


@scenario("S04", "nearcache-staleness-load", faults_server=False)
def s04(env: Env, seconds: float = 4.0, *, drivers: tuple[str, ...] = ()) -> ScenarioResult:
    """64 keys, Zipf reads 90 % / writes 10 % from 3 server processes; sweep C2, C4, C5, C6; C3.

    On ``env.url`` (a user's Redis) it uses a map of its own, ``<env.namespace>-s04-<random>``
    (in the default namespace: the workload's servers use it), and deletes its keys afterwards.
    ``drivers``: each server's driver, cycled (``Workload.drivers``; S04a mixes in asyncio).
    """
    result, started = timed("S04", "nearcache-staleness-load")
    tally = _Tally()
    with contextlib.ExitStack() as stack:
        url = env.url or stack.enter_context(env.store()).url
        for length in _rounds(seconds, 60.0, 1.0):
            name = _round_name(f"{env.namespace}-s04" if env.url else "s04")
            try:
                w = Workload(url, name=name, seconds=length, drivers=drivers)
                tally.add(*_sweep_round(w))
            finally:
                if env.url:
                    delete_map(url, name)
    tally.figures(result)
    reads, local = tally.rep.reads, tally.rep.local_reads
    need = int(100 * seconds)
    # "Exercised" is a count of cached reads, not a ratio: a short run starts cold (every key's
    # first read in each process misses), so its ratio depends on how fast the machine is.
    result.require(
        reads >= need and local >= need // 2,
        f"the cache must be exercised: {reads} reads (need {need}), {local} served from the "
        f"cache (need {need // 2}), hit ratio {result.figures['hit_ratio']}",
    )
    tally.require_clean(result)
    return finish(result, started)


# ---- S05 --------------------------------------------------------------------------------------


def _hget_calls(admin: redis.Redis) -> int:
    stats = admin.info("commandstats")
    return int(stats.get("cmdstat_hget", {}).get("calls", 0))


@scenario("S05", "nearcache-fill-invalidate-race")
def s05(
    env: Env, seconds: float = 1.0, *, guard: bool = True, iterations: int | None = None
) -> ScenarioResult:
    """Server B misses key k on a slow data path (60 ms) while A rewrites k; after each iteration
    B's cache must not hold the older value (C3).  ``guard=False`` disables the fill gate.

    Runs ``iterations`` times, or (None) until ``seconds`` are used, at least 15 times.
    """
    result, started = timed("S05", "nearcache-fill-invalidate-race")
    stale = done = 0
    with env.server() as server:
        admin = server.client()
        with (
            FaultProxy(server.host, server.port) as proxy,
            SyncMap("s05", server.url) as a,
            SyncMap("s05", proxy.url, feed=server.url,
                    config=MapConfig(guards=Guards(fill_race=guard))) as b,
        ):  # fmt: skip
            proxy.latency(60, "downstream")  # B's replies arrive 60 ms late; its feed is direct
            end = time.monotonic() + seconds
            while done < (iterations or 15) or (iterations is None and time.monotonic() < end):
                key = f"k{done}"
                a[key] = "v1"
                hgets = _hget_calls(admin)
                reader = threading.Thread(target=b.get, args=(key,))
                reader.start()

                def reached(n: int = hgets) -> bool:
                    return _hget_calls(admin) > n

                wait_until(reached, 5, "B's HGET reaching Redis")
                v2 = a.set(key, "v2")  # its invalidation reaches B long before B's HGET reply
                reader.join()
                cached = b.peek(key)
                if cached is not None and cached[1] < v2:
                    stale += 1
                done += 1
            races = b.statistics().fills_rejected
        admin.close()
    f = result.figures
    f[OPS] = done
    f[ANOMALIES] = stale
    f["iterations"] = done
    f["races_provoked"] = races
    f["permanently_stale"] = stale
    result.require(stale == 0, f"{stale} permanently stale entries after {done} fill races")
    if guard:
        result.require(races * 2 >= done, f"only {races} races provoked in {done} iterations")
    return finish(result, started)


# ---- S07 --------------------------------------------------------------------------------------


def _kill_subscribers(url: str, writer: Writer, seconds: float, counts: Counter[str]) -> Fault:
    """Every 0.5 s: kill every subscriber on every master (``faults.kill_subscribers``: on
    Sentinel, not the Sentinels' own links; on a Cluster, each master's SSUBSCRIBE
    connections), then rewrite every key while they reconnect."""

    def fault(cluster: Cluster) -> None:
        masters = master_clients(url)
        end = cluster.started + seconds - 1.0
        kills = 0
        try:
            while time.monotonic() < end:
                time.sleep(0.5)  # the fault schedule, not a wait for anything
                kills += sum(kill_subscribers(admin) for admin in masters)
                for i in range(64):
                    writer.write(f"k{i}")
        finally:
            for admin in masters:
                admin.close()
            counts["kill"] += kills

    return fault


def _pubsub_clients(masters: list[redis.Redis]) -> int:
    return sum(len(subscribers(admin)) for admin in masters)


def _slow_subscriber(masters: list[redis.Redis], writer: Writer, counts: Counter[str]) -> Fault:
    """SIGSTOP one server; write until Redis drops one of its subscribers (the output buffer
    limit, set on every master: on a Cluster it subscribes to each master's channels)."""

    def fault(cluster: Cluster) -> None:
        victim = cluster.pids[0]
        before = _pubsub_clients(masters)
        os.kill(victim, signal.SIGSTOP)
        try:
            while _pubsub_clients(masters) >= before:  # until Redis drops a paused subscriber
                for i in range(64):
                    writer.write(f"k{i}")
        finally:
            os.kill(victim, signal.SIGCONT)
        counts["slow-subscriber"] += 1

    return fault


@scenario("S07", "lost-invalidation-disconnect")
def s07(
    env: Env,
    seconds: float = 4.0,
    *,
    guard: bool = True,
    variant: S07Variant | None = None,
    drivers: tuple[str, ...] = (),
) -> ScenarioResult:
    """Subscribers disconnected while keys change: ``kill`` (every subscriber killed every 0.5 s)
    and ``slow-subscriber`` (a SIGSTOPped server cut by the pubsub output buffer limit: the
    first server's).  ``guard=False`` disables gap detection, probes and epoch checks.  No
    ``variant``: both.  ``drivers``: each server's driver, cycled (S07a mixes in asyncio).
    On ``env.topology``'s store: the faults strike every master, where the feeds subscribe
    (on a Cluster, each master holds some buckets' channels).  A variant that cut no
    subscriber fails: a run that injected nothing proves nothing."""
    result, started = timed("S07", "lost-invalidation-disconnect")
    variants = S07_VARIANTS if variant is None else (variant,)
    guards = Guards() if guard else OFF
    tally = _Tally()
    counts: Counter[str] = Counter()
    with env.store() as store:
        masters = master_clients(store.url)
        try:
            for v in variants:
                share = seconds / len(variants)
                if v == "slow-subscriber":
                    for admin in masters:
                        set_pubsub_output_limit(admin, 65536, 32768, 1)
                for length in _rounds(share, 30.0 if v == "kill" else 4.0, 3.0):
                    name = _round_name("s07")
                    with _writer(store.url, name) as writer:
                        w = Workload(store.url, name=name, seconds=length, guards=guards,
                                     drivers=drivers)  # fmt: skip
                        fault = (
                            _kill_subscribers(store.url, writer, length, counts)
                            if v == "kill"
                            else _slow_subscriber(masters, writer, counts)
                        )
                        tally.add(*_sweep_round(w, fault, writer))
        finally:
            for admin in masters:
                admin.close()
    tally.figures(result)
    result.figures["disconnects"] = sum(counts.values())
    result.figures["masters"] = len(masters)
    result.figures["variants"] = ",".join(variants)
    require_injected(result, variants, counts)
    tally.require_clean(result)
    return finish(result, started)


def require_injected(result: ScenarioResult, variants: Iterable[str], counts: Counter[str]) -> None:
    """Each variant must have cut some subscriber: a chaos run whose fault found nothing to
    strike (no master, no subscriber on the node it looked at) proves nothing and fails."""
    for v in variants:
        result.require(counts[v] > 0, f"{v}: no subscriber was cut (the fault injected nothing)")


# ---- S08 --------------------------------------------------------------------------------------


def _stall_feed(proxy: FaultProxy, seconds: float, stalls: list[int]) -> Fault:
    """From 1 s in: stall the feed (no error, no FIN) 2.5 s, heal; again 1 s later, as long as
    1.5 s remain at the end."""

    def fault(cluster: Cluster) -> None:
        for _ in range(max(1, int((seconds - 1.5) / 3.5))):  # 1 s flowing, 2.5 s stalled
            time.sleep(1.0)  # fault schedule
            proxy.stall("both")  # the feed goes silent: no error, no FIN, nothing
            stalls[0] += 1
            time.sleep(2.5)
            proxy.heal()

    return fault


@scenario("S08", "silent-feed-blackhole")
def s08(env: Env, seconds: float = 5.0, *, guard: bool = True, pong: bool = True,
        drivers: tuple[str, ...] = ()) -> ScenarioResult:  # fmt: skip
    """Pub/sub through a proxy that goes silent for 2.5 s (repeatedly in long rounds): the
    heartbeat probes must detect it, and no read may be stale beyond Δ.  ``guard=False``
    disables the probes; ``pong=False`` makes a PING lease count when the PING is sent, not
    when its answer arrives (``Guards.pong``: the PING-lease control).  ``drivers``: each
    server's driver, cycled (``("async",)``: the asyncio subscriber's PING leases)."""
    result, started = timed("S08", "silent-feed-blackhole")
    tally = _Tally()
    stalls = [0]
    with env.server() as server, FaultProxy(server.host, server.port) as proxy:
        for length in _rounds(seconds, 60.0, 5.0):
            name = _round_name("s08")
            w = Workload(server.url, name=name, seconds=length, feed=proxy.url,
                         guards=Guards(probe=guard, pong=pong), drivers=drivers)  # fmt: skip
            tally.add(*_sweep_round(w, _stall_feed(proxy, length, stalls)))
            proxy.heal()
    tally.figures(result)
    result.figures["stalls"] = stalls[0]
    detected = result.figures["lost_detected"]
    result.require(detected > 0, f"the silent feed must be detected ({stalls[0]} stalls, 0 seen)")
    tally.require_clean(result)
    return finish(result, started)


# ---- S09 --------------------------------------------------------------------------------------


_FORGE = """
local s = redis.call('HGET', KEYS[1], '#s') or '0'
local e = redis.call('HGET', KEYS[1], '#e') or '0'
if s ~= ARGV[1] or e ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], '#s', ARGV[3], ARGV[4], ARGV[5])
return 1
"""
"""Store a forged entry only if the bucket's sequence and epoch are still the ones it was
packed for (a compare-and-set: the value's version is packed before the call)."""


def forge_ghost(admin: Any, m: SyncMap, key: str, value: str) -> Op:
    """A write of ``key`` whose change message is lost: the bucket's next version is taken and
    the value stored under it (bookkeeping too: ``#s``, ``#e``, keys.py), nothing is published.
    ``admin``: a client that reaches the bucket's data hash (a ``RedisCluster`` routes it).

    One atomic step, retried until no write came between reading the sequence and storing.
    Order of events it prevents (it took three commands before): the ghost takes version 5
    (``HINCRBY``), a server's real write of the same key takes 6 and stores it, the ghost's
    ``HSET`` then stores 5 over 6: the store went back, and the oracle saw that server read
    ``@5`` after writing ``@6`` (S09-cluster, one read-your-writes "anomaly" of the harness)."""
    cfg = m.config
    field = encode_key(key, cfg.max_key_bytes)
    d = Layout(cfg.namespace, m.name, cfg.buckets).data(bucket_of(field, cfg.buckets))
    encoded = m._codec.encode(value)
    call = time.monotonic_ns()
    while True:
        seq, epoch = (int(v or 0) for v in admin.hmget(d, ["#s", "#e"]))
        version = seq + 1
        packed = pack_value(version, 0, encoded, epoch)
        if admin.eval(_FORGE, 1, d, str(seq), str(epoch), str(version), field, packed):
            return Op("ghost", "write", key, value, version, call, time.monotonic_ns())


def _ghost_writes(server: EmbeddedRedis, writer: Writer, name: str, count: int) -> Fault:
    """Writes whose change message is lost: the version is taken, nothing is published."""

    def fault(cluster: Cluster) -> None:
        admin = server.client()
        for n in range(count):
            time.sleep(0.25)  # fault schedule
            key = f"k{32 + n % 32}"  # cold keys: nobody rewrites them soon
            writer.ops.append(forge_ghost(admin, writer.map, key, f"ghost-{n}"))
            writer.write(f"k{n % 4}")  # a later real write in some bucket (gap there)
        admin.close()

    return fault


def _reset_store(server: EmbeddedRedis, how: str, seconds: float, marks: list[tuple[int, int]]
                 ) -> Fault:  # fmt: skip
    """FLUSHALL or a restart without persistence 1.5 s in, then every 3 s while 2 s remain."""

    def fault(cluster: Cluster) -> None:
        at = 1.5
        while at + 2.0 <= seconds:
            time.sleep(max(0.0, cluster.started + at - time.monotonic()))  # fault schedule
            call = time.monotonic_ns()
            if how == "flushall":
                admin = server.client()
                flushall(admin)
                admin.close()
            else:
                server.kill()
                server.restart()
            marks.append((call, time.monotonic_ns()))
            at += 3.0

    return fault


def pre_reset_reads(
    ops: list[Op], reset_call: int, reset_ret: int, keys: Collection[str] | None = None
) -> list[str]:
    """Reads invoked more than DELTA after the reset must not return a value from before it.
    ``keys``: only these keys were reset (a Cluster's master flushed alone); ``None``: all."""
    before = {
        (o.key, o.value)
        for o in ops
        if o.f in ("write", "info") and o.ret_ns < reset_call and (keys is None or o.key in keys)
    }
    late = reset_ret + int(DELTA * 1e9)
    return [
        f"{o.process} read pre-reset {o.key}={o.value} {(o.call_ns - reset_ret) / 1e6:.0f} ms after"
        for o in ops
        if o.f == "read" and o.call_ns > late and (o.key, o.value) in before
    ]


@scenario("S09", "message-gap-and-epoch")
def s09(
    env: Env, seconds: float = 4.0, *, guard: bool = True, variant: S09Variant | None = None
) -> ScenarioResult:
    """``gap``: single change messages lost (ghost writes), which must be detected, with no read
    stale beyond Δ; ``flushall`` / ``restart`` (no persistence): no read more than Δ after the
    reset returns a value from before it.  C3 after each round.  ``guard=False`` disables gap
    detection, probes and epoch checks.  No ``variant``: all three."""
    result, started = timed("S09", "message-gap-and-epoch")
    variants = S09_VARIANTS if variant is None else (variant,)
    guards = Guards() if guard else OFF
    gaps, resets = _Tally(), _Tally()
    injected = 0
    marks: list[tuple[int, int]] = []
    late_reads: list[str] = []
    reset_ops = 0
    with env.server() as server:
        for v in variants:
            for length in _rounds(seconds / len(variants), 30.0, 3.5):
                name = _round_name("s09")
                w = Workload(server.url, name=name, seconds=length, guards=guards)
                if v == "gap":
                    count = max(1, int((length - 1.5) / 0.25))
                    injected += count
                    with _writer(server.url, name) as writer:
                        fault = _ghost_writes(server, writer, name, count)
                        gaps.add(*_sweep_round(w, fault, writer))
                    continue
                round_marks: list[tuple[int, int]] = []
                results = run_cluster(w, _reset_store(server, v, length, round_marks))
                ops = [op for r in results for op in r.ops]
                reset_ops += len(ops)
                for call, ret in round_marks:
                    late_reads += pre_reset_reads(ops, call, ret)
                marks += round_marks
                resets.add(None, divergent(results, w.url, name), results)
    f = result.figures
    if gaps.rounds:
        gaps.figures(result)
        detected = gaps.counters.get("gaps", 0) + gaps.counters.get("lost_detected", 0)
        f["gaps_injected"] = injected
        f["gaps_detected"] = detected
        result.require(detected > 0, f"{injected} lost messages injected, none detected")
        gaps.require_clean(result)
    if resets.rounds:
        f[OPS] = f.get(OPS, 0) + reset_ops
        f[ANOMALIES] = f.get(ANOMALIES, 0) + len(late_reads) + len(resets.diverged)
        f["resets"] = len(marks)
        f["epoch_changes"] = f.get("epoch_changes", 0) + resets.counters.get("epoch_changes", 0)
        f["pre_reset_reads"] = len(late_reads)
        f["divergent_entries"] = f.get("divergent_entries", 0) + len(resets.diverged)
        result.require(
            not late_reads,
            f"{len(late_reads)} reads returned a value from before a store reset more than Δ "
            f"after it; e.g. {late_reads[:3]}",
        )
        resets.require_clean(result, swept=False)
    f["variants"] = ",".join(variants)
    return finish(result, started)


__all__ = [
    "DELTA",
    "OFF",
    "Writer",
    "delete_map",
    "divergent",
    "forge_ghost",
    "pre_reset_reads",
    "require_injected",
    "run_cluster",
    "s04",
    "s05",
    "s07",
    "s08",
    "s09",
]
