"""Lock benchmarks: syncmap's locks against redis-py, python-redis-lock and pottery, in one run.

    python bench/locks.py [--url URL] [--redlock-urls U1,U2,U3] [--quick] [--json FILE]

1. Uncontended acquire + release, µs per pair, contenders interleaved in rounds (A B, B A, ...)
   like bench/core.py: medians and per-round paired ratios, so machine drift hits all alike.
2. Contended hand-off latency: 2 and 4 OS processes take turns on one lock; the delay from the
   holder's release call to the next holder's acquire returning, on the shared CLOCK_MONOTONIC.

The table goes to stdout and to bench/results/locks.md.  bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pottery
import redis
import redis_lock

from core import (
    Row,
    _hiredis_parser,
    _load,
    _pct,
    _version,
    interleave,
    table,
)
from syncmap import Lock, Redlock
from syncmap.errors import RedisServerNotFound

CAVEAT = (
    "Only ratios within one run are meaningful: this machine's idle cores sleep, so a Redis round "
    "trip measures ~100 us when idle and ~40 us when the other core is busy."
)
RESULTS = Path(__file__).resolve().parent / "results" / "locks.md"


@dataclass(frozen=True, slots=True)
class Plan:
    """How much work each benchmark does (``--quick`` uses smaller figures)."""

    rounds: int  # interleaved rounds of the uncontended contenders (after one warm-up round)
    ops: int  # acquire + release pairs per timed block, single node
    redlock_ops: int  # the same over 3 nodes
    handoff_rounds: int  # interleaved rounds of the hand-off configurations
    handoff_seconds: float  # length of one syncmap hand-off segment
    polling_seconds: float  # length of one redis-py segment (its hand-offs take ~100 ms each)
    warmup_seconds: float  # length of each configuration's discarded warm-up segment


FULL = Plan(rounds=21, ops=200, redlock_ops=100, handoff_rounds=3, handoff_seconds=1.5,
            polling_seconds=4.0, warmup_seconds=0.4)  # fmt: skip
QUICK = Plan(rounds=7, ops=100, redlock_ops=50, handoff_rounds=1, handoff_seconds=1.0,
             polling_seconds=3.0, warmup_seconds=0.3)  # fmt: skip
LEASE = 30.0  # seconds, every single-node lock (the locks are never held that long here)
REDLOCK_LEASE = 10.0  # syncmap Redlock lease = pottery auto_release_time
HOLD = 0.003  # seconds each contender holds the lock in the hand-off benchmark
POLL = 0.0005  # how often a releaser checks whether someone else took the lock (not timed)
REDPY_SLEEP = 0.1  # redis-py Lock's default polling interval while it waits
ACQUIRE_TIMEOUT = 20.0  # a contender that waits this long reports an error
CONTENDERS = (2, 4)
TARGET_RATIO = 1.3
TARGET_P50_MS = 1.0


# ---- 1: uncontended acquire + release -------------------------------------------------------


def _pairs(acquire: Callable[[], Any], release: Callable[[], Any], ops: int) -> float:
    """µs per acquire + release pair on one lock object."""
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        if not acquire():
            raise RuntimeError("an uncontended acquire failed")
        release()
    return (time.perf_counter_ns() - t0) / ops / 1000


def _pairs_new(make: Callable[[], Any], ops: int) -> float:
    """µs per pair, with a new lock object made for each pair (as ``map.lock(key)`` does)."""
    t0 = time.perf_counter_ns()
    for _ in range(ops):
        lock = make()
        if not lock.acquire():
            raise RuntimeError("an uncontended acquire failed")
        lock.release()
    return (time.perf_counter_ns() - t0) / ops / 1000


def _settle_threads(limit: float = 1.0) -> None:
    """pottery returns once a majority answered; its threads for the other masters finish in the
    background.  Let them finish, untimed, so they do not run inside the next contender's block."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and any(
        t.name.startswith("ThreadPoolExecutor") for t in threading.enumerate()
    ):
        time.sleep(0.0005)


def bench_uncontended(client: redis.Redis, ns: str, plan: Plan) -> list[Row]:
    ops = plan.ops
    sm = Lock("u-sm", redis=client, namespace=ns, lease=LEASE)
    rp = client.lock(f"{ns}:u-rp", timeout=LEASE)
    prl = redis_lock.Lock(client, f"{ns}:u-prl", expire=int(LEASE), auto_renewal=False)
    prl_renew = redis_lock.Lock(client, f"{ns}:u-prl-renew", expire=int(LEASE), auto_renewal=True)
    pot = pottery.Redlock(key=f"{ns}:u-pot", masters={client}, auto_release_time=LEASE)
    s = interleave(
        [
            ("sm", lambda: _pairs(sm.acquire, sm.release, ops)),
            ("rp", lambda: _pairs(rp.acquire, rp.release, ops)),
            ("sm-new", lambda: _pairs_new(
                lambda: Lock("u-sm-new", redis=client, namespace=ns, lease=LEASE), ops)),
            ("rp-new", lambda: _pairs_new(
                lambda: client.lock(f"{ns}:u-rp-new", timeout=LEASE), ops)),
            ("prl", lambda: _pairs(prl.acquire, prl.release, ops)),
            ("prl-renew", lambda: _pairs(prl_renew.acquire, prl_renew.release, ops)),
            ("pottery", lambda: _pairs(pot.acquire, pot.release, ops)),
        ],
        plan.rounds,
        after=lambda name: _settle_threads() if name == "pottery" else None,
    )  # fmt: skip
    return [
        Row.paired(f"uncontended acquire+release: syncmap `Lock` (one object, lease "
                   f"{LEASE:g} s) vs redis-py `Lock`", "us", s["sm"], s["rp"],
                   max_ratio=TARGET_RATIO),
        Row.paired("  a new lock object per pair: `Lock(name, redis=client)` vs "
                   "`client.lock(name)`", "us", s["sm-new"], s["rp-new"]),
        Row.paired("  syncmap `Lock` vs python-redis-lock (`auto_renewal=False`)", "us", s["sm"],
                   s["prl"]),
        Row.paired("  syncmap `Lock` vs python-redis-lock (`auto_renewal=True`)", "us", s["sm"],
                   s["prl-renew"]),
        Row.paired("  syncmap `Lock` vs pottery `Redlock` on 1 master", "us", s["sm"],
                   s["pottery"]),
    ]  # fmt: skip


def bench_redlock(urls: Sequence[str], ns: str, plan: Plan) -> Row:
    clients = [redis.Redis.from_url(u) for u in urls]
    try:
        sm = Redlock("u-redlock", clients=clients, lease=REDLOCK_LEASE, auto_renew=False,
                     namespace=ns)  # fmt: skip
        pot = pottery.Redlock(key=f"{ns}:u-redlock", masters=set(clients),
                              auto_release_time=REDLOCK_LEASE)  # fmt: skip
        ops = plan.redlock_ops
        s = interleave(
            [("syncmap", lambda: _pairs(sm.acquire, sm.release, ops)),
             ("pottery", lambda: _pairs(pot.acquire, pot.release, ops))],
            plan.rounds,
            after=lambda name: _settle_threads() if name == "pottery" else None,
        )  # fmt: skip
        return Row.paired(f"uncontended acquire+release on {len(urls)} masters: syncmap "
                          f"`Redlock` (no renewal) vs pottery `Redlock`", "us", s["syncmap"],
                          s["pottery"])  # fmt: skip
    finally:
        for c in clients:
            _delete_namespace(c, ns)
            c.close()


# ---- 2: hand-off between processes ----------------------------------------------------------

Hold = tuple[int, int, int]  # CLOCK_MONOTONIC ns: acquire called, acquire returned, release called


def _contender(url: str, ns: str, wid: int, cmds: Queue[Any], out: Queue[Any], last: Any) -> None:
    """One contending process: runs a segment per command, reports its holds."""
    client = redis.Redis.from_url(url)
    client.ping()
    out.put(("ready", wid, None))
    while (cmd := cmds.get()) is not None:
        try:
            out.put(("holds", wid, _contend(client, ns, wid, last, *cmd)))
        except Exception as exc:
            out.put(("error", wid, f"{type(exc).__name__}: {exc}"))
    client.close()


def _contend(client: redis.Redis, ns: str, wid: int, last: Any, kind: str, name: str,
             start_ns: int, end_ns: int) -> list[Hold]:  # fmt: skip
    """Take turns on the lock until ``end_ns``: acquire, hold HOLD s, release, then wait (untimed)
    until another process has taken it before queueing again, so every release has a waiter and
    none is a quick re-acquisition by the releaser."""
    if kind == "syncmap":
        lock: Any = Lock(name, redis=client, namespace=ns, lease=LEASE)

        def acquire() -> bool:
            return bool(lock.acquire(timeout=ACQUIRE_TIMEOUT))
    else:
        lock = client.lock(f"{ns}:{name}", timeout=LEASE, sleep=REDPY_SLEEP,
                           blocking_timeout=ACQUIRE_TIMEOUT)  # fmt: skip
        acquire = lock.acquire
    holds: list[Hold] = []
    while (left := start_ns - time.monotonic_ns()) > 0:
        time.sleep(left / 1e9)
    while time.monotonic_ns() < end_ns:
        called = time.monotonic_ns()
        if not acquire():
            raise RuntimeError(f"not acquired within {ACQUIRE_TIMEOUT:g} s")
        acquired = time.monotonic_ns()
        last.value = wid
        time.sleep(HOLD)
        releasing = time.monotonic_ns()  # just before the call: the release is part of the delay
        lock.release()
        holds.append((called, acquired, releasing))
        while last.value == wid and time.monotonic_ns() < end_ns:
            time.sleep(POLL)
    return holds


@dataclass(slots=True)
class Handoffs:
    """The hand-offs of one configuration (lock kind, process count) over all its rounds."""

    delays_ms: list[float] = field(default_factory=list)
    not_waiting: int = 0  # next holder had not called acquire yet at the release: not counted
    overlaps: int = 0  # a holder acquired before the previous one released: exclusion broken
    per_process: Counter[int] = field(default_factory=Counter)

    def add(self, logs: dict[int, list[Hold]]) -> None:
        holds = sorted((acq, rel, called, wid) for wid, hs in logs.items()
                       for called, acq, rel in hs)  # fmt: skip
        self.per_process.update(h[3] for h in holds)
        for (_, rel, _, wid), (acq, _, called, nxt) in pairwise(holds):
            if acq < rel:
                self.overlaps += 1
            elif nxt == wid or called > rel:
                self.not_waiting += 1
            else:
                self.delays_ms.append((acq - rel) / 1e6)

    def pct(self, q: float) -> float:
        return _pct(sorted(self.delays_ms), q) if self.delays_ms else float("nan")

    def describe(self) -> str:
        turns = "/".join(str(self.per_process[w]) for w in sorted(self.per_process))
        text = f"{len(self.delays_ms)} hand-offs (holds per process {turns}"
        if self.not_waiting:
            text += f"; {self.not_waiting} releases with no waiter yet, not counted"
        text += f"; max {max(self.delays_ms, default=float('nan')):.3g} ms)"
        if self.overlaps:
            text += f"; **MUTUAL EXCLUSION BROKEN {self.overlaps} times**"
        return text


@dataclass(slots=True)
class Pool:
    """The contending processes, started once (spawn) and reused for every segment."""

    procs: list[BaseProcess]
    cmds: list[Queue[Any]]
    out: Queue[Any]
    last: Any  # shared int: the id of the process that took the lock last

    @classmethod
    def start(cls, url: str, ns: str, n: int) -> Pool:
        ctx = mp.get_context("spawn")
        last = ctx.Value("i", -1, lock=False)
        cmds: list[Queue[Any]] = [ctx.Queue() for _ in range(n)]
        out: Queue[Any] = ctx.Queue()
        procs: list[BaseProcess] = [
            ctx.Process(target=_contender, args=(url, ns, i, cmds[i], out, last), daemon=True)
            for i in range(n)
        ]
        for p in procs:
            p.start()
        pool = cls(procs, cmds, out, last)
        for _ in procs:
            kind, wid, _ = out.get(timeout=60)
            if kind != "ready":
                raise RuntimeError(f"contender {wid} did not start")
        return pool

    def segment(self, kind: str, n: int, seconds: float) -> dict[int, list[Hold]]:
        """``n`` processes contend on one lock for ``seconds``; their holds."""
        self.last.value = -1
        start = time.monotonic_ns() + 150_000_000  # all start together, their locks made
        end = start + round(seconds * 1e9)
        for wid in range(n):
            self.cmds[wid].put((kind, f"handoff-{kind}-{n}", start, end))
        logs: dict[int, list[Hold]] = {}
        errors = []
        for _ in range(n):
            what, wid, got = self.out.get(timeout=seconds + 2 * ACQUIRE_TIMEOUT)
            if what == "error":
                errors.append(f"process {wid}: {got}")
            else:
                logs[wid] = got
        if errors:
            raise RuntimeError(f"hand-off segment {kind} x{n} failed: " + "; ".join(errors))
        return logs

    def stop(self) -> None:
        for q in self.cmds:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


def bench_handoff(url: str, ns: str, plan: Plan) -> list[Row]:
    configs = [(kind, n) for n in CONTENDERS for kind in ("syncmap", "redis-py")]
    found = {cfg: Handoffs() for cfg in configs}
    pool = Pool.start(url, ns, max(CONTENDERS))
    try:
        for r in range(plan.handoff_rounds + 1):  # round 0: warm-up (connect, subscribe, load)
            for kind, n in configs if r % 2 == 0 else configs[::-1]:
                seconds = plan.handoff_seconds if kind == "syncmap" else plan.polling_seconds
                if r == 0:
                    seconds = plan.warmup_seconds
                logs = pool.segment(kind, n, seconds)
                if r:
                    found[kind, n].add(logs)
    finally:
        pool.stop()
    rows = []
    for n in CONTENDERS:
        sm, rp = found["syncmap", n], found["redis-py", n]
        what = (f"contended hand-off p50, {n} processes (each holds {HOLD * 1000:g} ms): "
                f"syncmap `Lock` vs redis-py `Lock(sleep={REDPY_SLEEP:g})`")  # fmt: skip
        note = f"syncmap {sm.describe()}; redis-py {rp.describe()}"
        rows += [
            Row(what, "ms", sm.pct(0.5), rp.pct(0.5), at_most=TARGET_P50_MS, note=note),
            Row(f"  hand-off p99, {n} processes", "ms", sm.pct(0.99), rp.pct(0.99)),
        ]
    return rows


# ---- report ---------------------------------------------------------------------------------


def _delete_namespace(client: redis.Redis, ns: str) -> None:
    """Every key this run made has ``ns`` in its name (peers add prefixes: lock:, redlock:)."""
    for key in client.scan_iter(match=f"*{ns}*", count=1000):
        client.delete(key)


def _server(client: redis.Redis, url: str) -> str:
    return f"{client.info('server').get('redis_version')} ({url.rsplit('@', maxsplit=1)[-1]})"


def _server_at(url: str) -> str:
    with redis.Redis.from_url(url) as c:
        return _server(c, url)


def environment(client: redis.Redis, url: str, redlock: str) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         "")  # fmt: skip
    return {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "syncmap": _version("syncmap"),
        "redis-py": redis.__version__,
        "hiredis": _version("hiredis"),
        "hiredis parser in use": _hiredis_parser(client),
        "python-redis-lock": _version("python-redis-lock"),
        "pottery": _version("pottery"),
        "redis server": _server(client, url),
        "redlock servers": redlock,
        "cpus": os.cpu_count(),
        "cpus usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu model": cpu_model,
        "platform": platform.platform(),
        "load average at start": _load(),
    }


def markdown(rows: list[Row], env: dict[str, Any], mode: str, seconds: float,
             extra: Sequence[str] = ()) -> str:  # fmt: skip
    lines = table(f"## syncmap lock benchmark ({mode} run, {seconds:.0f} s)", rows)
    notes = [f"- {r.metric.strip()}: {r.note}" for r in rows if r.note]
    lines += ["", "Ratio = syncmap's time ÷ the baseline's; > 1 means syncmap is slower. For the "
              "uncontended rows (interleaved rounds) it is the median of the per-round ratios, so "
              "it can differ from the quotient of the two medians shown; for the hand-off rows it "
              "is the quotient of the percentiles over every hand-off of every round. Hand-off = "
              "the holder's `monotonic_ns()` just before `release()` → the next holder's just "
              "after `acquire()` returned, in another process.", *notes, *extra, "",
              f"Caveat: {CAVEAT}", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def _step(label: str, fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    got = fn()
    print(f"  {label}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return got


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--url", help="use this Redis instead of starting an embedded one "
                    "(keys are namespaced per run and deleted afterwards)")  # fmt: skip
    ap.add_argument("--redlock-urls", metavar="U1,U2,U3", help="3 (or 5, ...) independent Redis "
                    "masters for the Redlock row; default: start 3 embedded ones")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="fewer and shorter rounds; about 30 s")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    plan, mode = (QUICK, "quick") if args.quick else (FULL, "full")
    t0 = time.monotonic()
    ns = f"smbench-{uuid.uuid4().hex[:8]}"
    extra: list[str] = []
    with contextlib.ExitStack() as stack:
        from syncmap.embedded import EmbeddedRedis

        url = args.url or stack.enter_context(EmbeddedRedis()).url
        redlock_urls: list[str] = []
        if args.redlock_urls:
            redlock_urls = args.redlock_urls.split(",")
        else:
            try:
                redlock_urls = [stack.enter_context(EmbeddedRedis()).url for _ in range(3)]
            except RedisServerNotFound as exc:
                extra.append(f"- no Redlock row: {exc}")
        print(f"benchmarking against {url}, Redlock on {len(redlock_urls)} servers ({mode})",
              file=sys.stderr, flush=True)  # fmt: skip
        client = redis.Redis.from_url(url)
        stack.callback(client.close)
        stack.callback(_delete_namespace, client, ns)
        redlock_info = ", ".join(_server_at(u) for u in redlock_urls)
        env = environment(client, url, redlock_info or "none")
        rows: list[Row] = _step("uncontended", lambda: bench_uncontended(client, ns, plan))
        if redlock_urls:
            rows.append(_step("redlock", lambda: bench_redlock(redlock_urls, ns, plan)))
        rows += _step("hand-off", lambda: bench_handoff(url, ns, plan))
        env["load average at end"] = _load()
    seconds = time.monotonic() - t0
    text = markdown(rows, env, mode, seconds, extra)
    print(text, end="")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(f"written to {RESULTS}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "seconds": seconds, "caveat": CAVEAT, "environment": env,
                       "rows": [r.as_json() for r in rows]}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
