"""Core benchmarks of syncmap against plain Python and raw redis-py, measured in one run.

    python bench/core.py [--url URL] [--quick] [--json FILE]

Every figure is a ratio against a baseline measured in the same run, contenders interleaved
(rounds of A B, B A, ...; medians and per-round paired ratios) so machine drift hits both alike.
Absolute times are not comparable between runs or machines: idle cores sleep, so a Redis round
trip costs ~100 us on an idle machine and ~40 us when the other core is busy.  bench/README.md
explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

import msgspec
import redis

from syncmap import Event, MapConfig, SyncMap

READERS = 8
CAVEAT = (
    "Only ratios within one run are meaningful: this machine's idle cores sleep, so a Redis round "
    "trip measures ~100 us when idle and ~40 us when the other core is busy."
)


@dataclass(frozen=True, slots=True)
class Plan:
    """How much work each benchmark does (``--quick`` uses smaller figures)."""

    hit_rounds: int
    hit_reps: int  # passes over HIT_KEYS keys per timed block
    io_rounds: int
    io_ops: int  # round trips per timed block
    bulk_rounds: int
    bulk_n: int
    prop_rounds: int
    prop_writes: int  # writes per contender per round
    prop_gap: float  # seconds between writes (mean; jittered +-25 %)
    mem_n: int


FULL = Plan(hit_rounds=41, hit_reps=100, io_rounds=31, io_ops=300, bulk_rounds=3, bulk_n=100_000,
            prop_rounds=8, prop_writes=200, prop_gap=0.003, mem_n=100_000)  # fmt: skip
QUICK = Plan(hit_rounds=15, hit_reps=50, io_rounds=11, io_ops=200, bulk_rounds=1, bulk_n=100_000,
             prop_rounds=3, prop_writes=100, prop_gap=0.003, mem_n=30_000)  # fmt: skip
HIT_KEYS = 1000
_HAS_FAST_HITS = "fast_hits" in {f.name for f in dataclasses.fields(MapConfig)}
TIMES = "\N{MULTIPLICATION SIGN}"


# ---- results --------------------------------------------------------------------------------


@dataclass(slots=True)
class Row:
    """One line of the report.  ``ratio`` is syncmap's cost over the baseline's (>1: slower)."""

    metric: str
    unit: str  # "ns", "us", "ms", "B" (smaller is better) or "/s" (larger is better)
    syncmap: float
    baseline: float | None = None
    max_ratio: float | None = None
    at_most: float | None = None
    at_least: float | None = None
    note: str = ""
    spread: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def paired(cls, metric: str, unit: str, syncmap: list[float], baseline: list[float],
               **kw: Any) -> Row:  # fmt: skip
        """A row from interleaved samples (one per round each): medians, and the paired ratio."""
        return cls(metric, unit, _median(syncmap), _median(baseline),
                   spread={"syncmap": syncmap, "baseline": baseline}, **kw)  # fmt: skip

    @property
    def ratio(self) -> float | None:
        """The median of the per-round ratios when there are paired samples, else the quotient.

        Each round ran syncmap and its baseline back to back, so a round's ratio cancels whatever
        the machine was doing then (other processes, clock speed); the plain quotient of the two
        medians does not.
        """
        a, b = self.spread.get("syncmap"), self.spread.get("baseline")
        if a and b and len(a) == len(b):
            return _median([_cost_ratio(x, y, self.unit) for x, y in zip(a, b, strict=True)])
        if not self.baseline or not self.syncmap:
            return None
        return _cost_ratio(self.syncmap, self.baseline, self.unit)

    @property
    def target(self) -> str:
        if self.max_ratio is not None:
            return f"ratio ≤ {self.max_ratio:g}{TIMES}"
        if self.at_most is not None:
            return f"≤ {_fmt(self.at_most, self.unit)}"
        if self.at_least is not None:
            return f"≥ {_fmt(self.at_least, self.unit)}"
        return "—"

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.max_ratio is not None:
            return ratio is not None and ratio <= self.max_ratio
        if self.at_most is not None:
            return self.syncmap <= self.at_most
        if self.at_least is not None:
            return self.syncmap >= self.at_least
        return None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ratio=self.ratio, target=self.target, met=self.met)
        return out


def _cost_ratio(syncmap: float, baseline: float, unit: str) -> float:
    return baseline / syncmap if unit == "/s" else syncmap / baseline


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "/s":
        return f"{value / 1000:,.0f}k/s"
    if unit == "B":
        return f"{value:,.0f} B"
    unit_text = {"us": "µs"}.get(unit, unit)
    return f"{value:.3g} {unit_text}" if value < 100 else f"{value:,.0f} {unit_text}"


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def _pct(sorted_xs: Sequence[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


# ---- measurement helpers --------------------------------------------------------------------


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Like timeit: no collector pauses inside a timed block."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleave(contenders: Sequence[tuple[str, Callable[[], float]]], rounds: int,
               after: Callable[[str], None] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Run the contenders in rounds after one discarded warm-up round; per-name samples.

    Odd rounds run in reverse order (A B, B A, A B, ...) so a steady drift favours no one.
    ``after(name)`` runs untimed after each block (e.g. to let background work settle).
    """
    samples: dict[str, list[float]] = {name: [] for name, _ in contenders}
    for r in range(rounds + 1):
        for name, block in contenders if r % 2 == 0 else contenders[::-1]:
            with _no_gc():
                value = block()
            if after is not None:
                after(name)
            if r:
                samples[name].append(value)
    return samples


# The timed loops share one shape; only the container passed in differs.
def _loop_getitem(c: Any, keys: list[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = c[k]
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def _loop_get(c: Any, keys: list[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = c.get(k)
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def _loop_empty(c: Any, keys: list[Any], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            _ = k
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def _loop_setitem(c: Any, keys: list[Any], ops: int) -> float:
    n = len(keys)
    t0 = time.perf_counter_ns()
    for i in range(ops):
        c[keys[i % n]] = i
    return (time.perf_counter_ns() - t0) / ops / 1000


def _loop_call(fn: Callable[[Any], Any], keys: list[Any], ops: int) -> float:
    n = len(keys)
    t0 = time.perf_counter_ns()
    for i in range(ops):
        fn(keys[i % n])
    return (time.perf_counter_ns() - t0) / ops / 1000


def _settle(m: SyncMap, quiet: float = 0.02, limit: float = 10.0) -> None:
    """Wait until this process has handled the change messages its own writes published."""
    deadline = time.monotonic() + limit
    last = m.statistics().messages
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = m.statistics().messages
        if now == last:
            return
        last = now


def _hiredis_parser(client: redis.Redis) -> bool:
    conn = client.connection_pool.get_connection()
    try:
        return "Hiredis" in type(conn._parser).__name__
    finally:
        client.connection_pool.release(conn)


# ---- 1-3: hits, misses, writes --------------------------------------------------------------


@dataclass(slots=True)
class Bench:
    url: str
    plan: Plan
    ns: str  # namespace of every Redis key this run creates
    client: redis.Redis
    maps: list[SyncMap] = field(default_factory=list)

    def open(self, name: str, **config: Any) -> SyncMap:
        m = SyncMap(name, url=self.url, config=MapConfig(namespace=self.ns, **config))
        self.maps.append(m)
        return m

    def close(self) -> None:
        for m in self.maps:
            m.close()
        for key in self.client.scan_iter(match=f"{self.ns}*", count=1000):
            self.client.delete(key)


def bench_hits(b: Bench) -> list[Row]:
    keys = [f"key-{i:06d}" for i in range(HIT_KEYS)]
    values = {k: 1000 + i for i, k in enumerate(keys)}
    m = b.open("hits")
    m.update(values)
    fast = b.open("hits-fast", fast_hits=True) if _HAS_FAST_HITS else None
    d = dict(values)
    reps = b.plan.hit_reps
    contenders: list[tuple[str, Callable[[], float]]] = [
        ("m[k]", lambda: _loop_getitem(m, keys, reps)),
        ("d[k]", lambda: _loop_getitem(d, keys, reps)),
        ("m.get", lambda: _loop_get(m, keys, reps)),
        ("d.get", lambda: _loop_get(d, keys, reps)),
        ("loop", lambda: _loop_empty(d, keys, reps)),
    ]
    if fast is not None:
        fast.update(values)
        contenders.append(("fast[k]", lambda: _loop_getitem(fast, keys, reps)))
    maps = [m] if fast is None else [m, fast]
    for cached in maps:
        for _ in range(5):  # a fill in flight when a probe starts is not installed: read again
            for k in keys:
                if cached.peek(k) is None:
                    cached[k]  # fill the near cache
    before = sum(x.statistics().misses for x in maps)
    s = interleave(contenders, b.plan.hit_rounds)
    misses = sum(x.statistics().misses for x in maps) - before
    note = f"{misses} reads missed during the hit benchmark: figures are off" if misses else ""
    rows = [
        Row.paired("near-cache hit `m[k]` vs dict `d[k]`", "ns", s["m[k]"], s["d[k]"],
                   max_ratio=4, note=note),
        Row.paired("near-cache hit `m.get(k)` vs `d.get(k)`", "ns", s["m.get"], s["d.get"],
                   max_ratio=4, note=note),
        Row.paired(f"  `m[k]` vs `d[k]` net of the bare loop (~{_median(s['loop']):.1f} ns)", "ns",
                   [x - y for x, y in zip(s["m[k]"], s["loop"], strict=True)],
                   [x - y for x, y in zip(s["d[k]"], s["loop"], strict=True)]),
    ]  # fmt: skip
    if fast is not None:
        metric = "near-cache hit `m[k]`, opt-in `MapConfig(fast_hits=True)`, vs `d[k]`"
        rows.append(Row.paired(metric, "ns", s["fast[k]"], s["d[k]"], max_ratio=4, note=note))
    return rows


def bench_misses(b: Bench) -> Row:
    keys = [f"key-{i:06d}" for i in range(HIT_KEYS)]
    m = b.open("misses", capacity=0)  # nothing is kept: every read goes to Redis
    m.update({k: 1000 + i for i, k in enumerate(keys)})
    raw_hash = f"{b.ns}:raw:hget"
    # Same field and value sizes as syncmap stores: a 16-byte (version, deadline) head + msgpack.
    head = bytes(16)
    b.client.hset(raw_hash, mapping={f"s{k}": head + msgspec.msgpack.encode(1000 + i)
                                     for i, k in enumerate(keys)})  # fmt: skip
    fields = [f"s{k}".encode() for k in keys]
    hget = b.client.hget
    ops = b.plan.io_ops
    s = interleave(
        [
            ("syncmap", lambda: _loop_call(m.__getitem__, keys, ops)),
            ("hget", lambda: _loop_call(lambda f: hget(raw_hash, f), fields, ops)),
        ],
        b.plan.io_rounds,
    )
    hits = m.statistics().hits
    note = f"{hits} reads were hits (capacity=0 should cache nothing)" if hits else ""
    return Row.paired("miss `m[k]` (capacity=0) vs redis-py `HGET`", "us", s["syncmap"], s["hget"],
                      max_ratio=1.15, note=note)  # fmt: skip


def bench_writes(b: Bench) -> Row:
    keys = [f"key-{i:06d}" for i in range(HIT_KEYS)]
    m = b.open("writes")
    raw_hash = f"{b.ns}:raw:hset"
    fields = [f"s{k}".encode() for k in keys]
    hset = b.client.hset
    ops = b.plan.io_ops
    s = interleave(
        [
            ("syncmap", lambda: _loop_setitem(m, keys, ops)),
            ("hset", lambda: _loop_call(lambda f: hset(raw_hash, f, 12345), fields, ops)),
        ],
        b.plan.io_rounds,
        # The map's own subscriber handles the echo of each write after it returns; let that finish
        # so it does not run inside the next baseline block.
        after=lambda name: _settle(m) if name == "syncmap" else None,
    )
    return Row.paired("write `m[k] = v` vs redis-py `HSET`", "us", s["syncmap"], s["hset"],
                      max_ratio=1.3)  # fmt: skip


# ---- 4: bulk update -------------------------------------------------------------------------


def bench_update(b: Bench) -> Row:
    n = b.plan.bulk_n
    data = {f"key-{i:06d}": i for i in range(n)}
    m = b.open("bulk")
    raw_hash = f"{b.ns}:raw:bulk"

    def syncmap_update() -> float:
        t0 = time.perf_counter()
        m.update(data)
        return n / (time.perf_counter() - t0)

    def pipeline() -> float:
        t0 = time.perf_counter()
        with b.client.pipeline(transaction=False) as p:
            for k, v in data.items():
                p.hset(raw_hash, k, v)
            p.execute()
        return n / (time.perf_counter() - t0)

    s = interleave([("syncmap", syncmap_update), ("pipeline", pipeline)], b.plan.bulk_rounds,
                   after=lambda name: _settle(m) if name == "syncmap" else None)  # fmt: skip
    return Row.paired(f"`update()` of {n // 1000}k entries vs pipeline of {n // 1000}k `HSET`",
                      "/s", s["syncmap"], s["pipeline"], at_least=100_000)  # fmt: skip


# ---- 5: propagation to reader processes -----------------------------------------------------

STOP = "stop"
Deliveries = list[tuple[int, int]]  # (write id, CLOCK_MONOTONIC ns when the reader saw it)


def _syncmap_reader(url: str, ns: str, name: str, ready: Queue[Any], out: Queue[Any]) -> None:
    m = SyncMap(name, url=url, config=MapConfig(namespace=ns))
    got: Deliveries = []
    done = threading.Event()

    def on_event(event: Event) -> None:
        now = time.monotonic_ns()
        if event.key == STOP:
            done.set()
        elif isinstance(event.key, int):
            got.append((event.key, now))

    m.subscribe(on_event, inline=True)  # runs when the invalidation is applied: "visible"
    ready.put(os.getpid())
    cpu = time.process_time()
    done.wait(300)
    out.put(("syncmap", got, time.process_time() - cpu))
    m.close()


def _raw_reader(url: str, channel: str, ready: Queue[Any], out: Queue[Any]) -> None:
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait for the confirmation: now PUBLISH reaches us
        msg = pubsub.get_message(timeout=1)
        if msg is not None and msg["type"] == "subscribe":
            break
    ready.put(os.getpid())
    cpu = time.process_time()
    got: Deliveries = []
    for msg in pubsub.listen():
        now = time.monotonic_ns()
        if msg["type"] != "message":
            continue
        if msg["data"] == STOP.encode():
            break
        got.append((int(msg["data"]), now))
    out.put(("raw", got, time.process_time() - cpu))
    pubsub.close()


def _start_readers(b: Bench, name: str, channel: str) -> tuple[list[BaseProcess], Queue[Any]]:
    """READERS syncmap readers and READERS raw subscribers, all subscribed when this returns."""
    ctx = mp.get_context("spawn")
    ready: Queue[Any] = ctx.Queue()
    out: Queue[Any] = ctx.Queue()
    procs: list[BaseProcess] = []
    for _ in range(READERS):
        procs.append(ctx.Process(target=_syncmap_reader, args=(b.url, b.ns, name, ready, out),
                                 daemon=True))  # fmt: skip
        procs.append(ctx.Process(target=_raw_reader, args=(b.url, channel, ready, out),
                                 daemon=True))  # fmt: skip
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    return procs, out


@dataclass(slots=True)
class Flow:
    """One contender of the propagation benchmark: when each write was sent, what readers saw."""

    sent: dict[int, int] = field(default_factory=dict)
    received: list[Deliveries] = field(default_factory=list)
    cpu: float = 0.0  # seconds of CPU all its readers used while the benchmark ran

    def delays_ms(self) -> list[float]:
        return sorted((t - self.sent[i]) / 1e6 for got in self.received for i, t in got
                      if i in self.sent)  # fmt: skip

    def missing(self) -> int:
        return len(self.sent) * len(self.received) - len(self.delays_ms())

    def forget_first(self, n: int) -> None:
        """Leave the first ``n`` writes (the warm-up round) out of the figures."""
        for i in list(self.sent)[:n]:
            del self.sent[i]


def bench_propagation(b: Bench) -> list[Row]:
    plan = b.plan
    name, channel = "prop", f"{b.ns}:raw:ch"
    m = b.open(name)
    procs, out = _start_readers(b, name, channel)
    flows = {"syncmap": Flow(), "raw": Flow()}
    ids = iter(range(10**9))

    def writer(flow: Flow, write: Callable[[int], Any]) -> Callable[[], float]:
        def block() -> float:
            for _ in range(plan.prop_writes):
                i = next(ids)
                t = time.monotonic_ns()
                write(i)
                flow.sent[i] = t
                time.sleep(plan.prop_gap * random.uniform(0.75, 1.25))
            return 0.0

        return block

    try:
        interleave(
            [("syncmap", writer(flows["syncmap"], lambda i: m.set(i, 0))),
             ("raw", writer(flows["raw"], lambda i: b.client.publish(channel, str(i))))],
            plan.prop_rounds,
        )  # fmt: skip
        for flow in flows.values():
            flow.forget_first(plan.prop_writes)
        time.sleep(0.2)
        m.set(STOP, 0)
        b.client.publish(channel, STOP)
        for _ in procs:
            kind, got, cpu = out.get(timeout=60)
            flows[kind].received.append(got)
            flows[kind].cpu += cpu
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return _propagation_rows(flows["syncmap"], flows["raw"])


def _propagation_rows(sm: Flow, raw: Flow) -> list[Row]:
    d_sm, d_raw = sm.delays_ms(), raw.delays_ms()
    note = (f"{len(d_sm)} syncmap and {len(d_raw)} raw deliveries, "
            f"{len(sm.received)} + {len(raw.received)} reader processes")  # fmt: skip
    if sm.missing() or raw.missing():
        note += f"; MISSING deliveries: syncmap {sm.missing()}, raw {raw.missing()}"
    # CPU per delivery includes the readers' idle background work (syncmap's probes, 4/s).
    cpu_sm, cpu_raw = (f.cpu / max(len(f.delays_ms()), 1) * 1e6 for f in (sm, raw))
    what = f"write → inline Event in {READERS} processes vs raw PUBLISH → subscriber"
    return [
        Row(f"propagation p50 ({what})", "ms", _pct(d_sm, 0.5), _pct(d_raw, 0.5), at_most=0.5,
            note=note),
        Row("propagation p99", "ms", _pct(d_sm, 0.99), _pct(d_raw, 0.99), at_most=2.0),
        Row("propagation max", "ms", d_sm[-1], d_raw[-1]),
        Row("  reader CPU per delivered change (informational)", "us", cpu_sm, cpu_raw),
    ]  # fmt: skip


# ---- 6: memory per cached entry -------------------------------------------------------------


def _traced(fill: Callable[[], object]) -> tuple[int, object]:
    """Bytes still allocated after ``fill()`` (whose result is kept alive), per tracemalloc."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def bench_memory(b: Bench) -> Row:
    n = b.plan.mem_n
    m = b.open("memory", capacity=n)
    m.update({f"key-{i:06d}": f"v{i:07d}" for i in range(n)})

    def fill_cache() -> object:
        for i in range(n):
            m[f"key-{i:06d}"]  # a fresh key object, as a caller would pass; the value is decoded
        return None

    def fill_dict() -> object:
        return {f"key-{i:06d}": f"v{i:07d}" for i in range(n)}

    dict_bytes, _ = _traced(fill_dict)
    cache_bytes, _ = _traced(fill_cache)
    entries = m.statistics().entries
    note = "" if entries == n else f"only {entries} of {n} entries ended up cached"
    return Row(f"memory per cached entry ({n // 1000}k str→short str) vs dict", "B",
               cache_bytes / max(entries, 1), dict_bytes / n, max_ratio=2, note=note)  # fmt: skip


# ---- report ---------------------------------------------------------------------------------


def environment(b: Bench) -> dict[str, Any]:
    info = b.client.info("server")
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")  # fmt: skip
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "redis-py": redis.__version__,
        "hiredis": _version("hiredis"),
        "hiredis parser in use": _hiredis_parser(b.client),
        "msgspec": _version("msgspec"),
        "syncmap": _version("syncmap"),
        "redis server": f"{info.get('redis_version')} ({b.url.split('@')[-1]})",
        "cpus": os.cpu_count(),
        "cpus usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu model": cpu_model,
        "platform": platform.platform(),
        "load average at start": _load(),
    }


def _load() -> str:
    """Other processes' CPU use skews every figure (most of all the tails): worth recording."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def table(title: str, rows: list[Row]) -> list[str]:
    """The Markdown table of ``rows`` under a heading, then one note line per row that has one
    (shared by every bench script)."""
    lines = [
        title,
        "",
        "| metric | syncmap | baseline | ratio | target | met? |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ratio = "—" if r.ratio is None else f"{r.ratio:.2f}" if r.ratio >= 0.1 else f"{r.ratio:.2g}"
        if r.max_ratio is not None and ratio == f"{r.max_ratio:.2f}":
            ratio = f"{r.ratio:.3f}"  # at the limit: show which side of it
        ratio = ratio if ratio == "—" else ratio + TIMES
        met = {True: "yes", False: "**NO**", None: "—"}[r.met]
        lines.append(f"| {r.metric} | {_fmt(r.syncmap, r.unit)} | {_fmt(r.baseline, r.unit)} "
                     f"| {ratio} | {r.target} | {met} |")  # fmt: skip
    return lines


def markdown(rows: list[Row], env: dict[str, Any], mode: str, seconds: float) -> str:
    lines = table(f"## syncmap core benchmark ({mode} run, {seconds:.0f} s)", rows)
    notes = [f"- {r.metric.strip()}: {r.note}" for r in rows if r.note]
    lines += ["", "Ratio = syncmap's cost ÷ the baseline's (time, delay, bytes; for rates the "
              "baseline's rate ÷ syncmap's); > 1 means syncmap is slower or larger. Where both "
              "ran in interleaved rounds it is the median of the per-round ratios, so it can "
              "differ from the quotient of the two medians shown.", *notes, "",
              f"Caveat: {CAVEAT}", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in env.items()]
    return "\n".join(lines)


def run(url: str, plan: Plan) -> tuple[list[Row], dict[str, Any]]:
    client = redis.Redis.from_url(url)
    b = Bench(url, plan, f"smbench-{uuid.uuid4().hex[:8]}", client)
    try:
        env = environment(b)
        steps: list[tuple[str, Callable[[], Row | list[Row]]]] = [
            ("hits", lambda: bench_hits(b)), ("misses", lambda: bench_misses(b)),
            ("writes", lambda: bench_writes(b)), ("update", lambda: bench_update(b)),
            ("propagation", lambda: bench_propagation(b)), ("memory", lambda: bench_memory(b)),
        ]  # fmt: skip
        rows: list[Row] = []
        for label, step in steps:
            t0 = time.monotonic()
            got = step()
            rows += got if isinstance(got, list) else [got]
            print(f"  {label}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
        env["load average at end"] = _load()
        return rows, env
    finally:
        b.close()
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--url", help="use this Redis instead of starting an embedded one "
                    "(keys are namespaced per run and deleted afterwards)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="fewer rounds; finishes in < 60 s")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    plan, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from syncmap.embedded import EmbeddedRedis

            url = stack.enter_context(EmbeddedRedis()).url
        print(f"benchmarking against {url} ({mode})", file=sys.stderr, flush=True)
        rows, env = run(url, plan)
    seconds = time.monotonic() - t0
    print(markdown(rows, env, mode, seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "seconds": seconds, "caveat": CAVEAT, "environment": env,
                       "rows": [r.as_json() for r in rows]}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
