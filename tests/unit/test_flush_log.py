"""``clusterload.FlushLog``, the Cluster scenarios' record of an observer's flushes, on a pure
near-cache core in simulated time: each flush's cause, and the "late, not lost" verdict that
S25 and S25-atomic excuse (a restart whose skipped messages all arrived after it).  The
exemption must never hide a message that really was lost: the second and third tests are its
controls.  Then S28's rounds: the restart that settles a chain an earlier round's gap broke
(cause ``chain``) is that round's deferred cost; ``test_s28_what_the_deferral_never_excuses``
holds its controls."""

from __future__ import annotations

from syncmap.core.nearcache import NearCache
from syncmap.core.wire import OP_SET, ChangeMessage
from syncmap.keys import encode_key
from syncmap.testing.clusterfaults import FeedKill
from syncmap.testing.clusterload import Flush, FlushLog
from syncmap.testing.scenarios_cluster import _s28_rounds

E1 = 1111
SECOND = 10**9


def msg(seq: int, bucket: int = 0, epoch: int = E1) -> ChangeMessage:
    return ChangeMessage(OP_SET, bucket, seq, epoch, "other", (encode_key(f"k{seq}", 1000),))


def restarted_for_an_overdue_probe() -> tuple[NearCache, FlushLog]:
    """Two buckets at (E1, 0); a probe sent at 0 reads bucket 0 at 3, whose messages do not
    come; the next probe, past grace (0.25 s), restarts it (``lost_detected``)."""
    core = NearCache(2, max_staleness=1.0)
    log = FlushLog(core)
    core.on_feed_up()
    core.on_probe([(E1, 0), (E1, 0)], 0.0, 0.0, core.tops())
    core.on_probe([(E1, 3), (E1, 0)], 0.1, 0.1, core.tops())
    core.on_probe([(E1, 3), (E1, 0)], 0.4, 0.4, core.tops())
    assert core.counters.lost_detected == 1
    [flush] = log.flushes
    assert (flush.bucket, flush.resync, flush.cause, flush.missing) == (0, True, "lost", (0, 3))
    return core, log


def test_a_restart_whose_skipped_messages_arrive_after_it_is_late_not_lost() -> None:
    core, log = restarted_for_an_overdue_probe()
    for seq in (1, 2, 3):  # delayed, not lost: duplicates to the core now, heard all the same
        core.on_message(msg(seq), 0.5)
    assert log.late(log.flushes[0], SECOND)


def test_a_restart_with_one_skipped_message_never_heard_is_lost() -> None:
    core, log = restarted_for_an_overdue_probe()
    for seq in (1, 3):
        core.on_message(msg(seq), 0.5)
    core.on_message(msg(2, bucket=1), 0.5)  # another bucket's version 2 does not count
    assert not log.late(log.flushes[0], SECOND)


def test_messages_heard_later_than_the_window_do_not_excuse_a_restart() -> None:
    core, log = restarted_for_an_overdue_probe()
    for seq in (1, 2, 3):
        core.on_message(msg(seq), 0.5)
    assert not log.late(log.flushes[0], -1)  # every one arrived after the (empty) window


def test_causes_of_gaps_epochs_and_lapses_and_the_buckets_a_resubscription_repairs() -> None:
    core = NearCache(3, max_staleness=1.0)
    log = FlushLog(core)
    core.on_feed_up()
    core.on_probe([(E1, 0), (E1, 0), (E1, 0)], 0.0, 0.0, core.tops())
    core.on_message(msg(2, bucket=0), 0.1)  # version 1 skipped: a gap
    core.on_message(msg(1, bucket=1, epoch=2222), 0.1)  # another epoch
    core.on_feed_up(0.2, [2])  # bucket 2's channel came back
    core.tick(1.5)  # no probe since 0: every lease lapsed
    causes = [(f.bucket, f.cause) for f in log.flushes]
    assert causes[:2] == [(0, "gap"), (1, "epoch")]
    assert sorted(causes[2:]) == [(0, "lapse"), (1, "lapse"), (2, "lapse")]
    assert not any(log.late(f, SECOND) for f in log.flushes)
    start, since = log.repairs[0], log.repairs[1][0]
    assert start[1] is None  # the subscription's start: every bucket
    assert log.repaired(since) == {2}
    core.on_feed_up(0.3)  # a bad message: every bucket
    assert log.repaired(since) is None


def chain_broken_by_a_gap() -> tuple[NearCache, FlushLog]:
    """Bucket 0 at (E1, 0, chain ""); a message skips version 1 (a gap: flushed, our chain
    unknown); a probe reads our very sequence, 2: the chain is settled by a restart."""
    core = NearCache(2, max_staleness=1.0)
    log = FlushLog(core)
    core.on_feed_up()
    core.on_probe([(E1, 0, ""), (E1, 0, "")], 0.0, 0.0, core.tops())
    core.on_message(msg(2), 0.1)
    core.on_probe([(E1, 2, "abcd"), (E1, 0, "")], 0.2, 0.2, core.tops())
    return core, log


def test_a_probe_restarting_a_bucket_whose_chain_a_gap_broke_is_cause_chain() -> None:
    core, log = chain_broken_by_a_gap()
    gap, chain = log.flushes
    assert (gap.bucket, gap.cause, chain.bucket, chain.cause) == (0, "gap", 0, "chain")
    assert core.counters.digest_mismatches == 0  # ours was unknown: no counter moves
    assert log.chain_broken_by(chain) is gap


def test_a_digest_mismatch_of_a_known_chain_is_not_cause_chain() -> None:
    core = NearCache(1, max_staleness=1.0)
    log = FlushLog(core)
    core.on_feed_up()
    core.on_probe([(E1, 0, "")], 0.0, 0.0, core.tops())
    core.on_probe([(E1, 0, "ffff")], 0.1, 0.1, core.tops())  # the store's chain differs from ours
    [flush] = log.flushes
    assert flush.cause == "digest" and log.chain_broken_by(flush) is None


def test_a_chain_restart_after_a_lost_restart_names_no_breaking_flush() -> None:
    _, log = chain_broken_by_a_gap()
    chain = log.flushes[1]
    lost = Flush(chain.at_ns - 1, 0, True, "lost", (0, 2))
    log.flushes.insert(1, lost)  # the latest resync before it was a restart, not a gap
    assert log.chain_broken_by(chain) is None


# ---- S28's rounds: which flushes a round of subscriber kills may be charged with -------------


def kill(at_s: float, buckets: tuple[int, ...]) -> FeedKill:
    at = int(at_s * SECOND)
    return FeedKill(f"m{at_s}", buckets, 4, at, at + SECOND // 10, len(buckets))


def rounds_of(*flushes: tuple[float, int, bool, str]) -> tuple[list[float], list[int], int]:
    """Two rounds: master 1's buckets (0, 9) cut at 1 s, master 2's (2, 6) at 2.5 s."""
    log = FlushLog(NearCache(16, max_staleness=1.0))
    log.flushes += [Flush(int(at * SECOND), b, resync, cause) for at, b, resync, cause in flushes]
    detections, others, deferred = _s28_rounds([kill(1.0, (0, 9)), kill(2.5, (2, 6))], log)
    return [round(d, 2) for _, d in detections], sorted(f.bucket for f in others), deferred


def test_s28_a_chain_restart_of_an_earlier_rounds_bucket_is_that_rounds_deferred_cost() -> None:
    # Round 1 flushed bucket 9 for a gap; its chain is settled by round 2's repair probe.
    got = rounds_of((1.08, 9, True, "gap"), (2.6, 2, True, "lost"), (2.6, 9, True, "chain"))
    assert got == ([0.08, 0.1], [], 1)


def test_s28_what_the_deferral_never_excuses() -> None:
    # A bucket no round struck, though a gap broke its chain in round 1: both flushes count.
    assert rounds_of((1.08, 5, True, "gap"), (2.6, 5, True, "chain"))[1:] == ([5, 5], 0)
    # An earlier victim's lease lapsing in a later round is not the earlier fault's.
    assert rounds_of((1.08, 9, True, "gap"), (2.6, 9, False, "lapse"))[1:] == ([9], 0)
    # A chain broken by a restart for lost messages (the probe's chain adopted), not a gap.
    assert rounds_of((1.08, 9, True, "lost"), (2.6, 9, True, "chain"))[1:] == ([9], 0)
    # A chain broken before the bucket's round (before the first kill): not the fault's.
    assert rounds_of((0.5, 9, True, "gap"), (2.6, 9, True, "chain"))[1:] == ([9], 0)
