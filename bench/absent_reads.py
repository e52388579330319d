"""Reads of an absent key (issue 16 goal 4), against an embedded Redis, timeit-style.

    python bench/absent_reads.py [ROUNDS]          (default 7)

Per read of 1,000 keys, the median of ROUNDS interleaved rounds: a hit ``m.get(k)`` on a
present key; ``m.get(k)`` of an absent key with its marker cached (``cache_absent=True``, the
default); the same read with ``cache_absent=False`` (every read a round trip); and a hit
``m[k]`` against ``m[k]`` of an absent key (``KeyError`` from the marker).  The
``syncmap bench --only reads`` row "get_absent" measures the second against the first.
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Callable

from syncmap import MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis

N = 1000


def per_read(fn: Callable[[str], object], keys: list[str], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        for k in keys:
            fn(k)
    return (time.perf_counter_ns() - t0) / (reps * len(keys))


def getitem_or_none(m: SyncMap) -> Callable[[str], object]:
    def read(k: str) -> object:
        try:
            return m[k]
        except KeyError:
            return None

    return read


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    present = [f"p{i:06d}" for i in range(N)]
    missing = [f"a{i:06d}" for i in range(N)]
    name = f"absentbench-{uuid.uuid4().hex[:8]}"
    with EmbeddedRedis() as server, SyncMap(name, server.url) as m, \
            SyncMap(name, server.url, config=MapConfig(cache_absent=False)) as off:  # fmt: skip
        m.update({k: i for i, k in enumerate(present)})
        for _ in range(5):  # a fill that raced a probe is not installed: read again
            for k in present + missing:
                m.get(k)
        print(f"cached: {m.statistics().entries} values, {m.statistics().absent} absent markers")
        contenders = {
            "hit m.get(present)": lambda: per_read(m.get, present, 50),
            "m.get(absent), marker cached": lambda: per_read(m.get, missing, 50),
            "m.get(absent), cache_absent=False": lambda: per_read(off.get, missing[:200], 1),
            "hit m[present] (try/except)": lambda: per_read(getitem_or_none(m), present, 50),
            "m[absent] -> KeyError, marker": lambda: per_read(getitem_or_none(m), missing, 50),
        }
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(rounds):
            for label, run in contenders.items():
                samples[label].append(run())
        for label, xs in samples.items():
            print(f"{label:38s} {statistics.median(xs):10.1f} ns/read  "
                  f"(min {min(xs):.1f}, max {max(xs):.1f})")  # fmt: skip
        s = m.statistics()
        print(f"misses {s.misses} (the warm-up's), absent {s.absent}, fills_rejected "
              f"{s.fills_rejected}")  # fmt: skip


if __name__ == "__main__":
    main()
