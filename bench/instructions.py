"""Client-side CPU per map operation, in instructions (callgrind), to compare two versions.

Timing a 40-90 us round trip on a shared VM cannot resolve a few microseconds; counting the
Python client's instructions can (Redis runs in a child process callgrind does not follow):

    valgrind --tool=callgrind --trace-children=no python bench/instructions.py none 0
    valgrind --tool=callgrind --trace-children=no python bench/instructions.py miss 20000

The per-operation cost is (Collected of the OP run - Collected of the "none" run) / N.  OP is
``hit`` (a warm map), ``miss`` (capacity=0: every read an HGET) or ``write``.  To compare a
version, run it with PYTHONPATH pointing at that checkout's ``src``.
"""

from __future__ import annotations

import sys

from syncmap import MapConfig, SyncMap
from syncmap.embedded import EmbeddedRedis

op, n = sys.argv[1], int(sys.argv[2])
server = EmbeddedRedis()
server.start()
try:
    cfg = MapConfig(presence=False, capacity=0 if op == "miss" else 100_000, max_staleness=3600)
    with SyncMap("ops", server.url, config=cfg) as m:
        m["k"] = 1
        for _ in range(200):  # warm every path the timed loop takes
            _ = m["k"]
            m.get("k", consistent=True)
            m["k"] = 1
        if op in ("hit", "miss"):
            for _ in range(n):
                _ = m["k"]
        elif op == "write":
            for i in range(n):
                m["k"] = i
finally:
    server.stop()
