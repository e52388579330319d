"""A probe some buckets did not answer (a Cluster shard down or its slot moving), in the pure core
and in ``parse_probe``, simulated time.

A bucket without an answer (``None``) is neither renewed nor flushed by that probe: its lease
runs out and ``tick`` flushes it (or, in serve_stale mode, keeps it stale-servable: its store
did not answer).  The buckets that answered are renewed as usual.  A repair owed after a
reconnect waits for a probe that reads every bucket.
"""

from __future__ import annotations

import pytest

from syncmap.core.nearcache import NearCache
from syncmap.errors import StoreUnavailable
from syncmap.keys import Layout
from syncmap.store.commands import parse_probe

E = 4242
DELTA = 1.0


def warm(age: float = 0.0) -> NearCache:
    """Two buckets at (E, 1), confirmed by a probe sent at 0; a@1 cached in bucket 0, b@1 in 1."""
    core = NearCache(2, max_staleness=DELTA, max_stale_age=age)
    core.on_feed_up()
    core.on_probe([(E, 1), (E, 1)], 0.0, 0.0, core.tops())
    for key, bucket in (("a", 0), ("b", 1)):
        assert core.complete_fill(core.begin_fill(key, bucket), 0.0, 1, key, None)
    return core


def test_a_bucket_without_an_answer_lapses_alone() -> None:
    core = warm()
    core.on_probe([None, (E, 1)], 0.6, 0.6, core.tops())  # bucket 0's master is down
    core.tick(DELTA + 0.1)
    assert "a" not in core.entries  # its lease ran out, its store alone silent: not held
    assert "b" in core.entries and core.serving(1, DELTA + 0.1)  # renewed by the probe at 0.6
    assert core.counters.lease_lapses == 1


def test_in_serve_stale_mode_the_unanswered_bucket_is_kept_stale() -> None:
    core = warm(age=3.0)
    core.on_probe([None, (E, 2)], 0.6, 0.6, core.tops())  # bucket 1 answered: it is behind
    core.tick(2.0)
    hit = core.cached("a", 2.0)
    assert hit is not None and hit[1]  # bucket 0's store did not answer: stale-servable
    assert core.cached("b", 2.0) is None  # bucket 1's store answered: a lost message, flushed


def test_a_repair_owed_waits_for_a_probe_that_reads_every_bucket() -> None:
    core = warm()
    core.on_feed_down()
    core.on_feed_up(0.5)  # messages may have been lost meanwhile: the next probe repairs
    core.on_probe([None, (E, 1)], 0.6, 0.6, core.tops())
    core.on_probe([(E, 2), (E, 1)], 0.7, 0.7, core.tops())  # bucket 0 moved unseen
    assert "a" not in core.entries and core.counters.lost_detected == 1  # repaired at once
    assert "b" in core.entries


def _reply(seq: int) -> list[object]:
    return [str(E).encode(), seq, 1_700_000_000_000, 1, b""]  # epoch, seq, ms, live, digest


def test_parse_probe_marks_unanswered_buckets_and_raises_when_none_answered() -> None:
    layout = Layout("sm", "m", 2)
    down = StoreUnavailable("127.0.0.1:7000: connection refused")
    result = parse_probe(layout, [down, _reply(3)])
    assert result.states[0] is None and result.states[1] is not None
    assert result.states[1][:2] == (E, 3) and not result.damaged
    with pytest.raises(StoreUnavailable, match="refused"):
        parse_probe(layout, [down, down])


# ---- a repair scoped to the buckets whose channel was lost (sharded feeds) ----------------------


def test_a_repair_after_one_channel_was_lost_restarts_only_its_buckets() -> None:
    """Order: bucket 1's channel is lost and comes back (its messages may be lost); meanwhile
    bucket 0's k is written and its message is still on the way when the repair probe reads
    the sequences.  Bucket 0's channel never went down: its message will come, nothing was
    lost there, so the repair must not flush it (bucket 1 moved unseen: flushed)."""
    core = warm()
    core.on_feed_down()
    core.on_feed_up(0.5, buckets=[1])
    core.on_probe([(E, 2), (E, 2)], 0.6, 0.6, core.tops())
    assert "b" not in core.entries and core.counters.lost_detected == 1
    assert "a" in core.entries  # waiting for its message (or the grace period), not flushed


def test_channel_set_reports_the_buckets_whose_channel_went_down() -> None:
    from syncmap.feed.base import FeedHandler
    from syncmap.feed.redis_sharded import ChannelSet

    told: list[object] = []
    handler = FeedHandler(lambda data, position: None, lambda resumed: told.append("all"),
                          on_buckets_up=lambda buckets: told.append(sorted(buckets)))  # fmt: skip
    channels = ChannelSet(["c0", "c1", "c2"], handler)
    ups = {name: h.on_up for name, h in channels.handlers()}
    downs = {name: h.on_down for name, h in channels.handlers()}
    for name in ("c0", "c1", "c2"):
        ups[name]()
    assert told == [[0, 1, 2]]  # the first confirmation: every channel was down
    downs["c2"]()
    downs["c0"]()
    ups["c2"]()
    ups["c0"]()
    assert told == [[0, 1, 2], [0, 2]]
