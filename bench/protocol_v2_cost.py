"""Per-write cost of protocol v2 (digest chain, HMAC) against the v1 SET script, one embedded Redis.

    python bench/protocol_v2_cost.py [writes]      (default 20000; best of three rounds)

The v1 script is read from git (the commit before protocol v2), so run it inside the checkout.
Prints, per variant, sequential writes (one round trip each, as ``m[k] = v`` does), pipelined
writes (1,000 per round trip) and Redis's own ``usec_per_call`` for the script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from syncmap.embedded import EmbeddedRedis, find_redis_server
from syncmap.signing import pads
from syncmap.store import scripts

V1 = "5115141~1:src/syncmap/store/scripts.py"
VARIANTS = ("v1", "v2-digest", "v2-hmac")


def v1_set() -> str:
    source = subprocess.run(["git", "show", V1], capture_output=True, check=True, text=True).stdout
    namespace: dict[str, Any] = {}
    exec(compile(source, V1, "exec"), namespace)  # our own file, from git
    return str(namespace["SET"])


def main(n: int) -> None:
    server = EmbeddedRedis(binary=find_redis_server())
    server.start()
    c = server.client()
    sources = {"v1": v1_set(), "v2": scripts.SET}
    key_pads = pads(os.urandom(32))

    def args(i: int, variant: str) -> tuple[Any, ...]:
        keys = (f"sm:{{b:{i % 16}}}:d", f"sm:{{b:{i % 16}}}:x")
        prefix = ("sm:{b}:ch", i % 16, 12345, "node:1", "", 0, "16/msgpack", "")
        tail = (b"sk%d" % (i % 500), b"\x01" * 20, 0, "set", "")
        if variant == "v1":
            return (shas["v1"], 2, *keys, *prefix, *tail)
        signing = key_pads if variant == "v2-hmac" else b""
        return (shas["v2"], 2, *keys, *prefix, signing, *tail)

    best: dict[str, list[float]] = {v: [float("inf")] * 3 for v in VARIANTS}
    for _round in range(3):
        for variant in VARIANTS:
            c.flushall()
            shas = {name: c.script_load(src) for name, src in sources.items()}
            t = time.perf_counter()
            for i in range(n):
                c.evalsha(*args(i, variant))
            seq = time.perf_counter() - t
            t = time.perf_counter()
            for j in range(0, n, 1000):
                pipe = c.pipeline(transaction=False)
                for i in range(j, min(j + 1000, n)):
                    pipe.evalsha(*args(i, variant))
                pipe.execute()
            piped = time.perf_counter() - t
            c.config_resetstat()
            for i in range(2000):
                c.evalsha(*args(i, variant))
            usec = float(c.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])
            now = (seq, piped, usec)
            best[variant] = [min(a, b) for a, b in zip(best[variant], now, strict=True)]
    server.stop()
    for variant, (seq, piped, usec) in best.items():
        print(f"{variant:10s} sequential {seq / n * 1e6:5.1f} us/write  pipelined "
              f"{piped / n * 1e6:5.1f} us/write  script {usec:5.2f} us/call")  # fmt: skip
    base = best["v1"]
    for variant in VARIANTS[1:]:
        print(f"{variant} / v1: sequential x{best[variant][0] / base[0]:.2f}, "
              f"script x{best[variant][2] / base[2]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
