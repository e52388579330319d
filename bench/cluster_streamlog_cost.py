"""Cost of the stream route on a Redis Cluster (target ``!S``) against the plain sharded route.

    python bench/cluster_streamlog_cost.py [writes]      (default 4000 per variant, twice each)

Starts a 3 + 3 cluster (``ClusterSet``), writes ``writes`` keys one by one (``m[k] = v``) with
no feed (target ``!s``: SPUBLISH) and with ``feed="redis+stream://?maxlen=1000"`` (target
``!S:1000``: SPUBLISH + XADD), alternating, and prints per variant Redis's own ``usec_per_call``
of EVALSHA (``INFO commandstats`` over the masters, reset before each run), the client's median
write latency, then the log's entries and ``MEMORY USAGE`` per bucket.
"""

from __future__ import annotations

import statistics
import sys
import time

from syncmap import SyncMap
from syncmap.embedded import find_redis_server
from syncmap.keys import Layout
from syncmap.testing.clusterset import ClusterSet

STREAM = "redis+stream://?maxlen=1000"


def run(cs: ClusterSet, feed: str | None, writes: int) -> str:
    admins = [cs.node_client(m.addr) for m in cs.masters()]
    for a in admins:
        a.config_resetstat()
    name = "plain" if feed is None else "logged"
    lat = []
    with SyncMap(name, cs.url, feed=feed) as m:
        for i in range(writes):
            t = time.perf_counter()
            m[f"k{i % 500}"] = i
            lat.append(time.perf_counter() - t)
    calls = usec = 0
    for a in admins:
        stat = a.info("commandstats").get("cmdstat_evalsha", {})
        calls, usec = calls + int(stat.get("calls", 0)), usec + int(stat.get("usec", 0))
        a.close()
    return (
        f"{'!S:1000' if feed else '!s':8} EVALSHA {usec / max(calls, 1):5.1f} us/call in "
        f"Redis, client median {statistics.median(lat) * 1e6:4.0f} us"
    )


def main() -> None:
    writes = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    with ClusterSet(binary=find_redis_server()) as cs:
        for feed in (None, STREAM, None, STREAM):
            print(run(cs, feed, writes))
        layout, client = Layout("sm", "logged", 16), cs.client()
        lens = [client.xlen(layout.bucket_log(b)) for b in range(16)]
        mem = [client.memory_usage(layout.bucket_log(b)) or 0 for b in range(16)]
        print(
            f"log entries per bucket {min(lens)}-{max(lens)}, MEMORY USAGE {min(mem)}-"
            f"{max(mem)} bytes, {sum(mem) / sum(lens):.0f} bytes per entry"
        )


if __name__ == "__main__":
    main()
