"""The cache-size rows alone (issue 16 goal 2), at N entries, against an embedded Redis.

    python bench/cachesize.py [N] [IDLE_SECONDS]       (default 1,000,000 and 4.5, as --full)

Prints each row (ours, the dict reader's, the target) and its note.  ``syncmap bench --full
--only scaling`` runs the same rows after the other scaling rows; this takes about a minute
and 1 GB at 1M entries.
"""

from __future__ import annotations

import sys
import uuid

import redis

from syncmap.benchmarks import cachesize
from syncmap.benchmarks.context import Bench
from syncmap.embedded import EmbeddedRedis


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    idle = float(sys.argv[2]) if len(sys.argv) > 2 else 4.5
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        b = Bench(server.url, f"smbench-{uuid.uuid4().hex[:8]}", client)
        try:
            for row in cachesize.rows(b, n, idle):
                target = row.at_most if row.at_most is not None else row.at_least
                base = "" if row.baseline is None else f" (dict reader {row.baseline:.1f})"
                print(f"{row.metric}: {row.syncmap:.1f} {row.unit}{base}, target {target}")
                print(f"    {row.note}")
        finally:
            b.close()
            client.close()


if __name__ == "__main__":
    main()
