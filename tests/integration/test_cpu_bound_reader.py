"""A reader spinning on the CPU sees another process's write promptly (``MapConfig.feed_turn``;
docs/design.md, "CPU-bound readers"; issue 16 goal 3).

Counted in reads, not milliseconds: after the writer process acknowledged a write (it raises a
byte in a shared mapping), the reader must get the new value within ``WITHIN`` reads.  The
switch interval is raised to 2 s while it spins, so with the mechanism off nothing lets the
subscriber thread run before ``CAP`` reads: the control (``feed_turn=0``) reaches ``CAP`` every
time.  With it the reads needed are about one check period's (0.2 ms, ~1,000 reads): the bound
leaves a factor of ~500 for a slow machine (a turn not taken backs off 50 ms, ~200k reads).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncmap import MapConfig, SyncMap
from syncmap.testing.spinning import Writer, reads_to_see
from syncmap.testing.wait import wait_until

WITHIN = 500_000  # reads after the acknowledgement (the mechanism needs ~1,000)
CAP = 1_000_000  # ~0.3 s of reads: well inside the 2 s switch interval
WRITES = 5


@pytest.fixture(params=["standalone", "cluster"])
def url(request: pytest.FixtureRequest) -> str:
    """A private Redis, or the module's 3-master cluster (sharded pub/sub: one reader per
    master, ``ShardedSubscriber.give_turn``)."""
    if request.param == "cluster":
        return str(request.getfixturevalue("shared_cluster").url)
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture
def writer(url: str, tmp_path: Path) -> Iterator[Writer]:
    w = Writer(url, "spin", "m", tmp_path / "flags")
    try:
        yield w
    finally:
        w.close()


def _reads_needed(url: str, writer: Writer, feed_turn: float, writes: int) -> list[int]:
    # A long max_staleness: no lease may lapse while the spinning starves the probe and PING
    # threads (a lapse would send reads to Redis, releasing the GIL, and let the control pass).
    cfg = MapConfig(namespace="spin", feed_turn=feed_turn, max_staleness=30)
    m = SyncMap("m", url=url, config=cfg)
    old = sys.getswitchinterval()
    # Raised for the whole test, not just the spins: a thread that starts waiting for the GIL
    # waits one interval before it makes the holder let go, so a wait begun under the old 5 ms
    # would end inside a spin and let the subscriber run.  Between spins this thread sleeps
    # (wait_until), which lets every other thread run.
    sys.setswitchinterval(2.0)
    try:
        m["k"] = 0
        counts = []
        for i in range(1, writes + 1):
            # Spin on hits only: a miss is a round trip, which releases the GIL.
            wait_until(lambda i=i: m["k"] == i - 1 and (m.peek("k") or (None,))[0] == i - 1,
                       10, "k cached")  # fmt: skip
            misses = m.statistics().misses
            slot = writer.write("k", i)
            counts.append(reads_to_see(m, "k", i, writer.flags, slot, CAP))
            # At most the one read that found k invalidated went to Redis.
            assert m.statistics().misses - misses <= 1, "the spin was not on hits"
        return counts
    finally:
        sys.setswitchinterval(old)
        m.close()


def test_spinning_reader_sees_a_write_within_a_few_thousand_reads(url: str, writer: Writer) -> None:
    counts = _reads_needed(url, writer, MapConfig().feed_turn, WRITES)
    assert max(counts) < WITHIN, counts


def test_feed_turn_off_control_fails(url: str, writer: Writer) -> None:
    counts = _reads_needed(url, writer, 0, 3)
    assert min(counts) >= WITHIN, f"control passed: {counts}"
