"""The near cache against hostile change messages: per-message work and per-bucket state stay
bounded whatever a publisher sends (issue 12 §3).  Pure core, simulated time."""

from __future__ import annotations

from test_core_guards import E1, cached, fill, msg, started

from syncmap.core.nearcache import MAX_AHEAD, NearCache
from syncmap.core.wire import MAX_FIELDS, OP_SET, ChangeMessage, decode_message, encode_message


def oversized(seq: int, n: int = MAX_FIELDS + 1, bucket: int = 0) -> ChangeMessage:
    fields = tuple(b"s" + str(i).encode() for i in range(n))
    return decode_message(encode_message(ChangeMessage(OP_SET, bucket, seq, E1, "x", fields)))


def test_the_field_limit_is_above_what_syncmap_itself_ever_publishes() -> None:
    # update() chunks (map.py) name at most 1,000 keys, the probe's expiry reaping 500.
    assert MAX_FIELDS > 1000
    at_limit = oversized(1, MAX_FIELDS)
    assert not at_limit.oversized and len(at_limit.fields) == MAX_FIELDS


def test_a_message_naming_too_many_keys_is_decoded_without_its_keys() -> None:
    m = oversized(7)
    assert m.oversized and m.fields == ()
    assert (m.bucket, m.seq, m.epoch) == (0, 7, E1)


def test_a_message_naming_too_many_keys_flushes_its_bucket_and_makes_no_events() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    events = core.on_message(oversized(2), 0.1, want_events=True)
    assert events == []
    assert cached(core, "k") is None, "the bucket may have changed: nothing of it is served"
    assert core.buckets[0].seq == 1, "the message's sequence is not trusted"
    token = core.begin_fill("k", 0)  # a fill begun after the flush installs as usual
    assert core.complete_fill(token, 0.2, 1, "v1", None)


def test_an_unordered_bucket_keeps_a_bounded_number_of_early_messages() -> None:
    core = NearCache(1, max_staleness=1.0, ordered=False)
    core.on_feed_up()
    core.on_probe([(E1, 1)], 0.0, 0.0, core.tops())
    assert fill(core, "k", 1, "v1")
    for seq in range(10**9, 10**9 + 3 * MAX_AHEAD):  # forged, far ahead, never contiguous
        core.on_message(msg(seq, "j"), 0.1)
    b = core.buckets[0]
    assert len(b.ahead) <= MAX_AHEAD
    assert core.counters.gap_overflows >= 2
    assert cached(core, "k") is None, "an overflowing bucket is flushed"
    assert b.seq == 1
    # The probe still ends the doubt: the store's real sequence restarts the bucket after grace.
    core.on_probe([(E1, 3)], 0.2, 0.2, core.tops())
    core.on_probe([(E1, 3)], 0.5, 0.5, core.tops())
    assert b.seq == 3 and core.serving(0, 0.5)


def test_a_legit_reordering_below_the_bound_is_not_an_overflow() -> None:
    core = NearCache(1, max_staleness=1.0, ordered=False)
    core.on_feed_up()
    core.on_probe([(E1, 1)], 0.0, 0.0, core.tops())
    for seq in range(3, 3 + MAX_AHEAD):
        core.on_message(msg(seq, "j"), 0.1)
    core.on_message(msg(2, "i"), 0.1)
    assert core.buckets[0].seq == 2 + MAX_AHEAD and not core.buckets[0].ahead
    assert core.counters.gap_overflows == 0
