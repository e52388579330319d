"""Cache size: what a large near cache costs when nothing happens, and what survives a pause.

Issue 16 goal 2 ("cost independent of cache size"), measured at ``n`` cached entries (100,000 in
the quick run, 1,000,000 with ``--full``):

* **Idle read stall**: a reader thread reads one cached key in a loop for ``idle_seconds``
  (longer than the presence interval, so every periodic task runs at least once) while the map
  is otherwise idle; the longest gap between two consecutive reads.  Before issue 16 the
  presence refresh summed a counter over every entry (11-16 ms at 1M entries every 2 s).  The
  same reader on a one-entry dict, in the same process, alternates with it for ``ROUNDS``
  rounds: the gaps the machine makes itself (scheduler, other processes), next to ours, with
  how many gaps over 1 ms each saw per second of reading.
* **Survivors of a pause**: another process (:mod:`syncmap.testing.pausable`) caches the ``n``
  entries and is stopped (SIGSTOP) for 2 s with the default ``max_staleness`` of 1 s, so every
  lease lapses, while this one writes K keys; after SIGCONT, the entries other than those K
  still cached and served, over how many there are (target: all of them), and the time from
  the request until no bucket was held.
* **Resync stall**: the map's subscriber connection is cut (``CLIENT KILL TYPE pubsub``) and one
  key is written in every bucket at once, so the messages are lost and the next probe restarts
  every bucket that moved; the longest gap between reads of a reader thread meanwhile (its
  key's bucket is among them: a miss, then a hit again).  The note says how long the restarted
  buckets' entries waited for the timer to free them (``NearCache.sweep``; every read takes the
  slow path meanwhile) and when hits resumed.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..keys import bucket_of, encode_key
from ..map import SyncMap
from ..testing.pausable import key_of, pausable_map
from .context import Bench, settle
from .method import Row

INF_NEG = float("-inf")
GC_PASS = [0.0]  # the longest full GC pass during the last _longest_gap (s)
IDLE_STALL_MS = 1.0  # targets, issue 16 goal 2
RESYNC_STALL_MS = 50.0
PAUSE_WRITES = 10
PAUSE_SECONDS = 2.0
ROUNDS = 3  # idle rounds, each a dict reader then the map's


@dataclass(slots=True)
class Gaps:
    """What a reader thread saw: its longest gap between two reads (s), how many gaps were
    over 1 ms, how many reads, and for how long (s).  ``busy``: the most CPU time the process's
    *other* threads used within one gap over 1 ms (s): what this process itself did while the
    reader waited (holding the GIL, or the guard), as opposed to the machine not running it."""

    worst: float = 0.0
    over_1ms: int = 0
    reads: int = 0
    seconds: float = 0.0
    busy: float = 0.0

    def add(self, other: Gaps) -> None:
        self.worst = max(self.worst, other.worst)
        self.busy = max(self.busy, other.busy)
        self.over_1ms += other.over_1ms
        self.reads += other.reads
        self.seconds += other.seconds

    @property
    def per_s(self) -> float:
        return self.over_1ms / max(self.seconds, 1e-9)


def rows(b: Bench, n: int, idle_seconds: float) -> list[Row]:
    name = f"cachesize-{n}"
    # presence every 2 s: the idle window (longer) then sees every periodic task run
    m = b.open(name, capacity=n + 16, presence_interval=2.0)
    data = {key_of(i): i for i in range(n)}
    items = list(data.items())
    for start in range(0, n, 100_000):
        m.update(dict(items[start : start + 100_000]))
    settle(m)
    m.preload()
    for _ in range(3):  # a fill in flight when a probe started was not installed: read again
        for k in data:
            if m.peek(k) is None:
                m[k]
    cached = len(m._core.entries)
    hot, plain = key_of(0), {key_of(0): 0}
    # The same reader on a plain dict, same process, alternating with ours: the machine's own
    # gaps (the OS scheduler, other processes on the cores), which no cache can do better than.
    floor, idle, idle_gc, rounds = Gaps(), Gaps(), 0.0, []
    for _ in range(ROUNDS):
        f = _longest_gap(lambda: plain[hot], lambda: time.sleep(idle_seconds))
        g = _longest_gap(lambda: m[hot], lambda: time.sleep(idle_seconds))
        idle_gc = max(idle_gc, GC_PASS[0])
        floor.add(f)
        idle.add(g)
        rounds.append(f"{g.worst * 1e3:.1f}/{f.worst * 1e3:.1f}")
    resync, restarted = _resync(b, m, n)
    b.release(m)
    survivors = _pause(b, n)
    note = (f"{cached:,} of {n:,} entries cached; {ROUNDS} rounds of {idle_seconds:g} s, a dict "
            f"reader then the map's (the dict: the machine's own gaps); longest gap per round, "
            f"map/dict ms: {', '.join(rounds)}; gaps over 1 ms per s: map {idle.per_s:.2f}, "
            f"dict {floor.per_s:.2f}; most CPU the process's other threads used within one gap "
            f"(what this process did while the reader waited): map {idle.busy * 1e3:.2f} ms, "
            f"dict {floor.busy * 1e3:.2f} ms; longest full GC pass in the map's windows: "
            f"{idle_gc * 1e3:.1f} ms (it scans every cached entry)")  # fmt: skip
    return [
        Row(f"longest read stall while idle, {n:,} entries cached, vs a dict reader", "ms",
            idle.worst * 1e3, floor.worst * 1e3, key="cachesize.idle_stall",
            at_most=IDLE_STALL_MS, note=note),
        Row(f"entries still cached after a {PAUSE_SECONDS:g} s SIGSTOP during which "
            f"{PAUSE_WRITES} keys were written ({n:,} cached)", "%", survivors[0],
            key="cachesize.pause_survivors", at_least=100.0, note=survivors[1]),
        Row(f"longest read stall during a resync after missed writes in every bucket "
            f"({n:,} cached), vs the idle dict reader", "ms", resync * 1e3, floor.worst * 1e3,
            key="cachesize.resync_stall", at_most=RESYNC_STALL_MS, note=restarted),
    ]  # fmt: skip


def _longest_gap(read: Callable[[], object], meanwhile: Callable[[], None]) -> Gaps:
    """The gaps between two reads of a reader thread while ``meanwhile()`` runs; the longest
    full garbage-collector pass meanwhile goes to ``GC_PASS[0]``."""
    stop, seen = threading.Event(), Gaps()
    started = [0.0]
    GC_PASS[0] = 0.0

    def timed(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            GC_PASS[0] = max(GC_PASS[0], time.perf_counter() - started[0])

    def reader() -> None:
        clock, cpu, own = time.perf_counter, time.process_time, time.thread_time
        first = last = clock()
        others = cpu() - own()  # CPU time of the process's other threads so far
        gap, over, reads, busy = 0.0, 0, 0, 0.0
        while not stop.is_set():
            read()
            now = clock()
            if now - last > 1e-3:
                over += 1
                gap = max(gap, now - last)
                busy = max(busy, cpu() - own() - others)
            others = cpu() - own()
            last = now
            reads += 1
        seen.worst, seen.over_1ms, seen.reads, seen.seconds = gap, over, reads, last - first
        seen.busy = busy

    t = threading.Thread(target=reader, name="cachesize-reader", daemon=True)
    gc.callbacks.append(timed)
    t.start()
    time.sleep(0.05)  # the reader is in its loop
    try:
        meanwhile()
    finally:
        stop.set()
        t.join()
        gc.callbacks.remove(timed)
    return seen


def _resync(b: Bench, m: SyncMap, n: int) -> tuple[float, str]:
    """Cut the map's subscriber, write one key per bucket at once (lost to it), and time the
    longest read gap until the map has restarted what moved and serves again."""
    core = m._core
    nb = len(core.buckets)
    firsts: dict[int, str] = {}
    for i in range(n):
        k = key_of(i)
        firsts.setdefault(bucket_of(encode_key(k, m.config.max_key_bytes), nb), k)
        if len(firsts) == nb:
            break
    before = core.counters.resyncs
    hot = key_of(n - 1)
    times = {"strike": 0.0, "sweeping": 0.0, "swept": 0.0, "served": 0.0}

    def strike() -> None:
        times["strike"] = time.monotonic()
        b.client.client_kill_filter(_type="pubsub")
        # One round trip (update() pipelines a write per bucket): most land before the
        # subscriber is back, so their messages are lost and those buckets must be restarted.
        m.update(dict.fromkeys(firsts.values(), -1))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with m._state.guard:
                # getattr: the same rows run against a near cache without a deferred free
                sweeping = getattr(core, "sweeping", False)
                done = time.monotonic() < core.fresh_until and not any(
                    bs.held_since != INF_NEG for bs in core.buckets
                )
            now = time.monotonic()
            if sweeping and not times["sweeping"]:
                times["sweeping"] = now
            if times["sweeping"] and not sweeping and not times["swept"]:
                times["swept"] = now
            if done and core.counters.resyncs > before:
                times["served"] = now
                break
            time.sleep(0.01)
        time.sleep(m.config.max_staleness / 2)  # a few more probes: the stall window is over

    gap = _longest_gap(lambda: m[hot], strike)
    after = core.counters.resyncs - before
    t0 = times["strike"]
    freed = (f"the restarted entries freed by the timer within "
             f"{(times['swept'] - times['sweeping']) * 1e3:.0f} ms (reads took the slow path "
             f"meanwhile)" if times["swept"] else "no deferred free seen")  # fmt: skip
    served = f"{(times['served'] - t0) * 1e3:.0f} ms" if times["served"] else "not within 10 s"
    note = (f"{after} of the {nb} buckets written were restarted (their messages lost); "
            f"{freed}; hits again {served} after the cut (10 ms polls); "
            f"{gap.reads:,} reads, {gap.over_1ms} gaps over 1 ms; most CPU the process's other "
            f"threads used within one gap: {gap.busy * 1e3:.1f} ms")  # fmt: skip
    return gap.worst, note


def _pause(b: Bench, n: int) -> tuple[float, str]:
    """(percent of the untouched entries still cached after the pause, a note)."""
    name = f"paused-{n}"
    m = b.open(name, capacity=16)
    data = {key_of(i): i for i in range(n)}
    items = list(data.items())
    for start in range(0, n, 100_000):
        m.update(dict(items[start : start + 100_000]))
    with pausable_map(b.url, name, n, delta=1.0, namespace=b.ns) as child:
        keys = [key_of(i * (n // PAUSE_WRITES)) for i in range(PAUSE_WRITES)]
        with child.pause():
            written = {}
            for i, k in enumerate(keys):
                m[k] = written[k] = -1 - i
            time.sleep(PAUSE_SECONDS)  # the fault: the process stays stopped past its leases
        got = child.check(written)
    b.release(m)
    note = (f"{got.survivors:,} of {got.expected:,} survived ({child.cached:,} cached before); "
            f"{len(got.stale)} written keys read stale; served again {got.settled_s * 1e3:.0f} ms "
            f"after the check began; {got.revalidations} buckets revalidated")  # fmt: skip
    return 100.0 * got.survivors / max(got.expected, 1), note
