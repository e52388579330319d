"""``clusterload.FlushLog``, the Cluster scenarios' record of an observer's flushes, on a pure
near-cache core in simulated time: each flush's cause, and the "late, not lost" verdict that
S25 and S25-atomic excuse (a restart whose skipped messages all arrived after it).  The
exemption must never hide a message that really was lost: the second and third tests are its
controls."""

from __future__ import annotations

from syncmap.core.nearcache import NearCache
from syncmap.core.wire import OP_SET, ChangeMessage
from syncmap.keys import encode_key
from syncmap.testing.clusterload import FlushLog

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
