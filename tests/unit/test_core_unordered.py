"""The near cache on a relayed feed (``NearCache(ordered=False)``), one exact order of events each.

With a relayed feed two writers of one bucket publish after their writes, so their messages may
arrive in either order.  A jump in the sequence is then no proof of loss: the bucket waits for
the missing versions, and only a probe whose sequence is never reached (after ``grace``) flushes
it, exactly as for a lost last message on an ordered feed.
"""

from __future__ import annotations

from test_core_guards import E1, E2, cached, fill, msg

from syncmap.core.nearcache import NearCache


def started(state: tuple[int | None, int] = (E1, 0)) -> NearCache:
    core = NearCache(1, max_staleness=1.0, ordered=False)
    core.on_feed_up()
    core.on_probe([state], 0.0, 0.0, core.tops())
    return core


def test_a_reordered_pair_keeps_the_bucket_and_confirms_once_both_arrived() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_probe([(E1, 3)], 0.1, 0.1, core.tops())
    core.on_message(msg(3, "j"), 0.12)  # writer B's message first
    assert core.buckets[0].seq == 1, "seq stays at the contiguous high-water mark"
    assert core.buckets[0].lease_until == 1.0, "the probe at 0.1 is not confirmed yet"
    core.on_message(msg(2, "i"), 0.13)  # then writer A's
    assert core.buckets[0].seq == 3
    assert core.buckets[0].lease_until == 1.1, "now every message up to 3 arrived"
    assert cached(core, "k") == ("v1", 1), "other keys of the bucket stay cached"
    assert core.counters.gaps == 0


def test_the_same_reordering_on_an_ordered_feed_flushes() -> None:
    """The control: what ``ordered=False`` saves."""
    core = NearCache(1, max_staleness=1.0)
    core.on_feed_up()
    core.on_probe([(E1, 1)], 0.0, 0.0, core.tops())
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(3, "j"), 0.12)
    assert cached(core, "k") is None
    assert core.counters.gaps == 1


def test_a_message_that_never_comes_is_caught_by_the_probe_after_grace() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(3, "j"), 0.05)  # 2 (a write of k, say) is lost for good
    core.on_probe([(E1, 3)], 0.1, 0.1, core.tops())
    assert cached(core, "k") == ("v1", 1), "within grace it may only be late"
    core.on_probe([(E1, 3)], 0.4, 0.4, core.tops())  # grace (0.25) has passed
    assert cached(core, "k") is None
    assert core.counters.lost_detected == 1
    assert core.buckets[0].seq == 3


def test_messages_past_a_repair_still_count() -> None:
    core = started((E1, 1))
    core.on_message(msg(3, "j"), 0.05)  # 2 is lost
    core.on_message(msg(5, "h"), 0.06)  # 4 is late
    core.on_probe([(E1, 3)], 0.1, 0.1, core.tops())
    core.on_probe([(E1, 3)], 0.4, 0.4, core.tops())  # repaired to 3; 5 already arrived
    assert core.buckets[0].seq == 3
    core.on_message(msg(4, "g"), 0.45)
    assert core.buckets[0].seq == 5, "the early message 5 was kept across the repair"


def test_duplicates_do_nothing() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    for _ in range(3):
        core.on_message(msg(1, "k"), 0.1)
    assert cached(core, "k") == ("v1", 1)
    assert core.buckets[0].seq == 1
    assert not core.buckets[0].ahead


def test_a_new_epoch_forgets_early_messages_of_the_old_one() -> None:
    core = started((E1, 1))
    core.on_message(msg(4, "j"), 0.05)
    assert core.buckets[0].ahead
    core.on_message(msg(1, "k", epoch=E2), 0.06)
    assert not core.buckets[0].ahead
    assert core.buckets[0].epoch == E2
