"""The near-cache core's protections, one exact order of events each (no I/O, simulated time).

Every guard test runs its scenario twice: with the guard on (the cache does the right thing) and
with that one guard switched off through ``Guards`` (the stale value is served), so a green result
proves the scenario really exercises the guard (TESTPLAN §1: a test counts only once it is shown
to fail without the protection).
"""

from __future__ import annotations

import pytest

from syncmap.core.nearcache import INF, FillToken, Guards, NearCache
from syncmap.core.wire import (
    OP_CLEAR,
    OP_DEL,
    OP_EXPIRE,
    OP_PING,
    OP_SET,
    VALUE_HEAD_SIZE,
    ChangeMessage,
    decode_message,
    encode_message,
    pack_value,
    unpack_value,
)
from syncmap.errors import CorruptData
from syncmap.keys import encode_key

E1, E2 = 1111, 2222  # epochs


def msg(seq: int, *keys: str, op: int = OP_SET, epoch: int = E1, bucket: int = 0) -> ChangeMessage:
    return ChangeMessage(op, bucket, seq, epoch, "other", tuple(encode_key(k, 1000) for k in keys))


def started(
    state: tuple[int | None, int] = (E1, 0), *, guards: Guards | None = None, **kw: float
) -> NearCache:
    """A one-bucket cache as ``Engine.start`` leaves it: subscribed, then a baseline probe at 0."""
    core = NearCache(1, max_staleness=1.0, guards=guards, **kw)  # type: ignore[arg-type]
    core.on_feed_up()
    core.on_probe([state], 0.0, 0.0, core.tops())
    return core


def fill(core: NearCache, key: str, version: int, value: object, now: float = 0.0,
         deadline: float = INF) -> bool:  # fmt: skip
    token = core.begin_fill(key, 0)
    return core.complete_fill(token, now, version, value, None, deadline)


def cached(core: NearCache, key: str) -> tuple[object, int] | None:
    e = core.entries.get(key)
    return None if e is None else (e.value, e.version)


# ---- (1) the fill race, A2 ---------------------------------------------------------------------


def test_fill_race_reply_older_than_a_processed_invalidation_is_not_installed() -> None:
    core = started((E1, 4))
    token = core.begin_fill("k", 0)  # HGET k executes now: k@4
    core.on_message(msg(5, "k"), 0.1)  # another server wrote k@5; the message overtakes the reply
    assert not core.complete_fill(token, 0.2, 4, "v4", None)
    assert cached(core, "k") is None
    assert core.counters.fills_rejected == 1


def test_fill_race_without_the_guard_installs_a_stale_value_for_good() -> None:
    core = started((E1, 4), guards=Guards(fill_race=False))
    token = core.begin_fill("k", 0)
    core.on_message(msg(5, "k"), 0.1)
    assert core.complete_fill(token, 0.2, 4, "v4", None)
    # Nothing will ever invalidate it: the store's k@5 is accounted for, so probes renew the lease.
    for t in (0.5, 1.0, 1.5, 2.0):
        core.on_probe([(E1, 5)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") == ("v4", 4)


# ---- (2) gaps ----------------------------------------------------------------------------------


def _gap(guards: Guards | None) -> NearCache:
    core = started((E1, 1), guards=guards)
    assert fill(core, "k", 1, "v1")
    # k@2 is lost on the way; j@3 arrives: seq jumped from 1 to 3.
    core.on_message(msg(3, "j"), 0.1)
    return core


def test_gap_in_the_sequence_flushes_the_bucket() -> None:
    core = _gap(None)
    assert cached(core, "k") is None
    assert core.counters.gaps == 1
    assert core.counters.resyncs == 1


def test_gap_without_the_guard_leaves_the_stale_entry() -> None:
    core = _gap(Guards(gaps=False))
    core.on_probe([(E1, 3)], 0.2, 0.2, core.tops())  # seq 3 is reached: the lease is renewed
    core.tick(0.9)
    assert cached(core, "k") == ("v1", 1)
    assert core.counters.gaps == 0


def test_duplicate_and_old_messages_are_not_gaps() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(2, "j"), 0.1)
    core.on_message(msg(2, "j"), 0.1)  # delivered twice
    core.on_message(msg(1, "k"), 0.1)  # an old one
    assert cached(core, "k") == ("v1", 1)
    assert core.counters.gaps == 0
    assert core.buckets[0].seq == 2


# ---- (3) the last message lost: only a probe can tell -------------------------------------------


def _lost_last(guards: Guards | None) -> NearCache:
    core = started((E1, 1), guards=guards)
    assert fill(core, "k", 1, "v1")
    # k@2's message is lost and nothing follows it in the bucket.
    core.on_probe([(E1, 2)], 0.1, 0.1, core.tops())
    assert cached(core, "k") == ("v1", 1), "a probe ahead of us is not yet proof of loss"
    core.on_probe([(E1, 2)], 0.4, 0.4, core.tops())  # still not reached after grace (0.25)
    return core


def test_lost_last_message_is_detected_by_a_second_probe_after_grace() -> None:
    core = _lost_last(None)
    assert core.grace == 0.25
    assert cached(core, "k") is None
    assert core.counters.lost_detected == 1


def test_lost_last_message_caught_up_in_time_confirms_the_lease() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_probe([(E1, 2)], 0.1, 0.1, core.tops())
    core.on_message(msg(2, "j"), 0.15)  # the message was only late
    assert core.buckets[0].lease_until == pytest.approx(1.1)
    core.tick(1.0)
    assert cached(core, "k") == ("v1", 1)
    assert core.counters.lost_detected == 0


def test_lost_last_message_without_probe_guard_is_served_forever() -> None:
    core = _lost_last(Guards(probe=False))
    for t in (1.0, 5.0, 100.0):
        core.on_probe([(E1, 2)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") == ("v1", 1)
    assert core.counters.lost_detected == 0


def test_repair_after_reconnect_flushes_a_bucket_that_moved_at_once() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_feed_down()  # messages sent meanwhile are lost
    core.on_feed_up()
    core.on_probe([(E1, 2)], 0.1, 0.1, core.tops())
    assert cached(core, "k") is None
    assert core.counters.lost_detected == 1


def test_fill_begun_before_a_disconnect_is_not_installed() -> None:
    core = started((E1, 1))
    token = core.begin_fill("k", 0)
    core.on_feed_down()
    core.on_feed_up()
    assert not core.complete_fill(token, 0.1, 1, "v1", None)


# ---- (4) the lease -----------------------------------------------------------------------------


def test_lease_lapses_when_probes_stop() -> None:
    core = started((E1, 1))
    assert core.margin == pytest.approx(0.05)
    assert fill(core, "k", 1, "v1")
    assert core.tick(0.5) == pytest.approx(0.95)  # next wake: lease end minus margin
    assert cached(core, "k") == ("v1", 1)
    core.tick(0.96)  # lease (0 + 1.0) minus margin has passed
    assert core.cached("k", 0.96) is None and core.valid_until == -INF  # held: never served
    assert core.buckets[0].held_since == 0.96  # kept for the next probe to revalidate
    assert core.counters.lease_lapses == 1
    assert not core.serving(0, 0.96)
    assert not fill(core, "k", 1, "v1", now=0.97), "no fill without a lease"


def test_without_revalidation_a_lapse_flushes() -> None:
    core = started((E1, 1), guards=Guards(revalidate=False))
    assert fill(core, "k", 1, "v1")
    core.tick(0.96)
    assert cached(core, "k") is None and core.buckets[0].held_since == -INF


def test_lease_is_renewed_by_a_probe_whose_sequence_is_reached() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_probe([(E1, 1)], 0.8, 0.8, core.tops())
    core.tick(1.5)
    assert cached(core, "k") == ("v1", 1)
    core.tick(1.76)
    assert core.cached("k", 1.76) is None and not core.serving(0, 1.76)


# ---- (5) epochs --------------------------------------------------------------------------------


def test_epoch_change_seen_by_a_probe_flushes() -> None:
    core = started((E1, 3))
    assert fill(core, "k", 3, "v3")
    core.on_probe([(E2, 1)], 0.1, 0.1, core.tops())
    assert cached(core, "k") is None
    assert core.counters.epoch_changes == 1
    assert core.buckets[0].epoch == E2


def test_epoch_change_seen_by_a_message_flushes() -> None:
    core = started((E1, 3))
    assert fill(core, "k", 3, "v3")
    core.on_message(msg(1, "j", epoch=E2), 0.1)
    assert cached(core, "k") is None
    assert core.counters.epoch_changes == 1


def test_sequence_gone_backwards_in_same_epoch_flushes() -> None:
    core = started((E1, 3))
    assert fill(core, "k", 3, "v3")
    core.on_probe([(E1, 2)], 0.1, 0.1, core.tops())  # a failover lost a write
    assert cached(core, "k") is None


def _flushall_then_rewrite(guards: Guards | None) -> NearCache:
    core = started((E1, 3), guards=guards)
    assert fill(core, "k", 3, "v3")
    # FLUSHALL: no message.  Then k is written in a new epoch: k@1 ("new").
    core.on_message(msg(1, "k", epoch=E2), 0.1)
    core.on_probe([(E2, 1)], 0.2, 0.2, core.tops())
    core.tick(0.5)
    return core


def test_flushall_and_rewrite_is_caught_by_the_epoch() -> None:
    core = _flushall_then_rewrite(None)
    assert cached(core, "k") is None


def test_flushall_and_rewrite_without_epoch_guard_leaves_stale_entry() -> None:
    core = _flushall_then_rewrite(Guards(epoch=False))
    for t in (1.0, 2.0, 3.0):
        core.on_probe([(E2, 1)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") == ("v3", 3), "v3 no longer exists in the store"


def test_store_restarted_empty_is_caught_by_tops() -> None:
    """A7 as fixed in the core: own k@1 cached, its message lost, Redis back empty."""
    core = started((None, 0))
    token = core.begin_fill("k", 0)
    core.wrote(token, 0.1, 1, "v1")
    assert cached(core, "k") == ("v1", 1)
    core.on_feed_down()  # Redis restarts without persistence; k@1's message is lost
    core.on_feed_up()
    core.on_probe([(None, 0)], 0.2, 0.2, core.tops())
    assert cached(core, "k") is None


# ---- (6) own writes (read-your-writes, A6) -------------------------------------------------------


def test_own_write_wins_over_an_older_concurrent_fill() -> None:
    core = started((E1, 4))
    reader = core.begin_fill("k", 0)  # thread 1: HGET k executes now -> k@4
    core.on_message(msg(4, "k"), 0.05)  # (an old message: keeps the two tokens distinct, see below)
    writer = core.begin_fill("k", 0)  # thread 2: set k -> k@5
    core.wrote(writer, 0.1, 5, "v5")
    assert not core.complete_fill(reader, 0.2, 4, "v4", None)
    assert cached(core, "k") == ("v5", 5)


@pytest.mark.parametrize("guard", [True, False])
def test_own_delete_fences_an_older_concurrent_fill(guard: bool) -> None:
    core = started((E1, 4), guards=Guards(fill_race=guard))
    reader = core.begin_fill("k", 0)  # thread 1: HGET k -> k@4
    core.on_message(msg(4, "k"), 0.05)  # (keeps the two tokens distinct, see below)
    writer = core.begin_fill("k", 0)  # thread 2: del k -> version 5, returns
    core.wrote(writer, 0.1, 5, deleted=True)
    installed = core.complete_fill(reader, 0.2, 4, "v4", None)
    if guard:
        assert not installed
        assert cached(core, "k") is None
    else:  # thread 2 would now read back the value it has just deleted
        assert installed
        assert cached(core, "k") == ("v4", 4)


def test_regression_own_delete_removes_the_wrong_pending_token() -> None:
    """The ``wrote`` docstring's order exactly, with nothing in between.

    Both tokens are ``FillToken('k', 0, (0, 0), 0)``, hence equal: ``abort_fill(writer)`` runs
    ``list.remove``, which removes the *reader's* token; ``note_write`` then fences only the
    writer's own (already finished) token, and the reader installs the deleted k@4.
    """
    core = started((E1, 4))
    reader = core.begin_fill("k", 0)  # thread 1: HGET k -> k@4
    writer = core.begin_fill("k", 0)  # thread 2: del k -> version 5, returns
    core.wrote(writer, 0.1, 5, deleted=True)
    core.complete_fill(reader, 0.2, 4, "v4", None)
    assert cached(core, "k") is None, "thread 2 reads back the value it has just deleted"


def test_regression_finished_fill_unregisters_a_concurrent_one() -> None:
    """Two concurrent reads of k; the first reply unregisters the *other* token (equal by value),
    so a later invalidation does not reach it and its reply installs k@4 after k@5 was processed:
    stale until the next write of k (A2, unbounded)."""
    core = started((E1, 4))
    r1 = core.begin_fill("k", 0)  # HGET -> k@4
    r2 = core.begin_fill("k", 0)  # HGET -> k@4
    assert core.complete_fill(r2, 0.1, 4, "v4", None)
    core.on_message(msg(5, "k"), 0.2)  # k@5 written elsewhere: k@4 invalidated ...
    core.complete_fill(r1, 0.3, 4, "v4", None)  # ... and re-installed by the other reply
    for t in (0.5, 1.0, 1.5, 2.0):
        core.on_probe([(E1, 5)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") is None, "k@4 served at t=2.0 although k@5 was processed at 0.2"


def test_own_write_replaces_an_older_cached_value() -> None:
    core = started((E1, 4))
    assert fill(core, "k", 4, "v4")
    core.wrote(core.begin_fill("k", 0), 0.1, 5, "v5")
    assert cached(core, "k") == ("v5", 5)


def test_own_write_after_a_newer_message_is_not_installed() -> None:
    core = started((E1, 4))
    writer = core.begin_fill("k", 0)
    core.on_message(msg(5, "k"), 0.05)  # own write k@5 ...
    core.on_message(msg(6, "k"), 0.06)  # ... and someone else's k@6, before our reply
    core.wrote(writer, 0.1, 5, "v5")
    assert cached(core, "k") is None


def test_unknown_outcome_drops_the_key_and_fences_fills() -> None:
    core = started((E1, 4))
    assert fill(core, "k", 4, "v4")
    reader = core.begin_fill("k", 0)
    core.drop("k")
    assert cached(core, "k") is None
    assert not core.complete_fill(reader, 0.1, 4, "v4", None)


def test_note_write_and_cleared() -> None:
    core = started((E1, 4))
    assert fill(core, "a", 3, "a3")
    assert fill(core, "b", 4, "b4")
    core.note_write("a", 5)  # update(): no install, but nothing older may stay
    assert cached(core, "a") is None
    assert cached(core, "b") == ("b4", 4)
    pending = core.begin_fill("b", 0)
    core.cleared(0, 6)
    assert cached(core, "b") is None
    assert not core.complete_fill(pending, 0.1, 4, "b4", None)


def test_clear_message_removes_older_entries_only() -> None:
    core = started((E1, 4))
    assert fill(core, "a", 4, "a4")
    core.on_message(msg(5, op=OP_CLEAR), 0.1)
    assert cached(core, "a") is None
    assert fill(core, "a", 6, "a6", now=0.2)
    core.on_message(msg(5, op=OP_CLEAR), 0.3)  # a duplicate of the clear: a6 is newer
    assert cached(core, "a") == ("a6", 6)


# ---- (7) CLOCK eviction ------------------------------------------------------------------------


def test_clock_eviction_keeps_a_hot_entry_over_cold_ones() -> None:
    core = NearCache(1, capacity=2, max_staleness=1.0)
    core.on_probe([(E1, 9)], 0.0, 0.0, core.tops())
    assert fill(core, "hot", 1, "h")
    assert fill(core, "cold", 2, "c")
    core.entries["hot"].hits += 1  # what the hit path does
    assert fill(core, "new", 3, "n")
    assert set(core.entries) == {"hot", "new"}
    assert core.counters.evictions == 1
    # "hot" had its second chance (moved behind "new"); "new" is now the oldest.
    assert fill(core, "newer", 4, "n2")
    assert set(core.entries) == {"hot", "newer"}
    # The hand has passed "hot": with no new hit since, it goes next.
    assert fill(core, "newest", 5, "n3")
    assert set(core.entries) == {"newer", "newest"}
    assert core.counters.evictions == 3
    assert core.hits() == 1  # hits of evicted entries are kept in the total


def test_capacity_zero_caches_nothing() -> None:
    core = NearCache(1, capacity=0, max_staleness=1.0)
    core.on_probe([(E1, 9)], 0.0, 0.0, core.tops())
    fill(core, "k", 1, "v")
    assert core.entries == {}


# ---- (8) TTL -----------------------------------------------------------------------------------


def test_ttl_expiry_by_tick() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1", deadline=0.5)
    assert core.tick(0.0) == pytest.approx(0.45)  # next wake: deadline minus margin
    core.tick(0.4)
    assert cached(core, "k") == ("v1", 1)
    core.tick(0.46)  # within margin of the deadline: gone before the deadline itself
    assert cached(core, "k") is None
    assert core.counters.expirations == 1


def test_ttl_of_a_replaced_entry_does_not_remove_its_successor() -> None:
    core = started((E1, 2))
    assert fill(core, "k", 1, "v1", deadline=0.3)
    assert fill(core, "k", 2, "v2")  # newer, no TTL
    core.tick(0.5)
    assert cached(core, "k") == ("v2", 2)
    assert core.counters.expirations == 0


def test_already_expired_value_is_not_installed() -> None:
    core = started((E1, 1))
    assert not fill(core, "k", 1, "v1", now=0.5, deadline=0.5)
    assert cached(core, "k") is None


def test_expire_message_invalidates() -> None:
    core = started((E1, 1))
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(2, "k", op=OP_EXPIRE), 0.1)
    assert cached(core, "k") is None


# ---- regressions: core bugs found by test_core_model.py, fixed ----------------------------


def test_regression_restart_then_rewrite_leaves_permanently_stale_entry() -> None:
    """k@1 cached while the bucket had no epoch; Redis restarts empty, k is rewritten at k@1.

    ``_sequence`` adopts the new epoch silently (``b.epoch is None and msg.seq == 1``), the
    invalidation compares 1 < 1, and every later probe matches (seq 1, tops 1): stale forever.
    """
    core = started((None, 0))
    core.wrote(core.begin_fill("k", 0), 0.1, 1, "mine")  # k@1 in epoch E1; its message is lost
    core.on_feed_down()  # Redis restarts without persistence
    core.on_feed_up()
    core.on_message(msg(1, "k", epoch=E2), 0.2)  # another server writes k: k@1 in epoch E2
    for t in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):
        core.on_probe([(E2, 1)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") is None, f"serves {cached(core, 'k')} at t=1.8; the store has 'theirs'"


def test_regression_own_write_after_flushall_reads_back_the_old_value() -> None:
    core = started((E1, 0))
    core.wrote(core.begin_fill("k", 0), 0.0, 1, "old", epoch=E1)  # k@1 in epoch E1
    # FLUSHALL (no message); then this server writes k again: k@1 in a new epoch, which the
    # write's reply names, so the core can tell that 1 is not older than 1.
    core.wrote(core.begin_fill("k", 0), 0.1, 1, "new", epoch=E2)
    assert cached(core, "k") == ("new", 1), "read-your-writes: the next get() returns 'old'"


def test_regression_older_fill_installed_after_a_read_saw_the_key_absent() -> None:
    core = started((E1, 1))  # the store holds k@1
    older = core.begin_fill("k", 0)  # read 1: HGET executes now -> k@1
    # another server deletes k (version 2); its message is still on the way
    newer = core.begin_fill("k", 0)  # read 2: HGET -> absent; returns "absent" to its caller
    core.fill_absent(newer)
    core.complete_fill(older, 0.1, 1, "v1", None)  # read 1's reply arrives last
    # read 3 starts after read 2 returned "absent", and hits k@1: monotonic reads (C4) broken
    assert cached(core, "k") is None


# ---- regressions: more core bugs found by test_core_model.py, fixed ------------------------


def _flushall_while_in_flight() -> tuple[NearCache, FillToken]:
    """A request of k is in flight and reads/writes k@1 of epoch E1; FLUSHALL follows at once.

    The bucket goes None -> E1 (k@1's message) -> None (the probe after FLUSHALL restarts it): the
    epoch the request began under is back, but the bucket was flushed in between, which only
    ``token.gens`` remembers.  Then probes run for more than Δ.
    """
    core = started((None, 0))
    token = core.begin_fill("k", 0)
    core.on_message(msg(1, "k", epoch=E1), 0.1)
    for t in (0.2, 0.45, 0.7, 0.95, 1.2):
        core.on_probe([(None, 0)], t, t, core.tops())
        core.tick(t)
    return core, token


def test_regression_fill_reply_from_before_flushall_installed_after_delta() -> None:
    """``complete_fill(epoch=E1)``: ``token.epoch`` (None) equals the bucket's epoch (None), so
    ``learn_epoch`` adopts E1 and ``token.gens`` is overwritten with the current generation,
    erasing the flush.  k@1, gone from the store for over 1 s, is then served (C2)."""
    core, token = _flushall_while_in_flight()
    core.complete_fill(token, 1.25, 1, "v1", None, epoch=E1)
    core.tick(1.25)
    assert cached(core, "k") is None, "serves k@1 that FLUSHALL removed more than Δ ago"


def test_regression_own_write_reply_from_before_flushall_installed_after_delta() -> None:
    """The same through ``wrote(epoch=E1)`` (a slow reply of this server's own set)."""
    core, token = _flushall_while_in_flight()
    core.wrote(token, 1.25, 1, "v1", epoch=E1)
    core.tick(1.25)
    assert cached(core, "k") is None, "serves k@1 that FLUSHALL removed more than Δ ago"


# ---- (9) the wire formats ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        ChangeMessage(OP_SET, 0, 1, E1, "host:1:abc", (encode_key("k", 1000),)),
        ChangeMessage(OP_SET, 4095, 2**53 - 1, 2**52 - 1, "", tuple(b"s%d" % i for i in range(5))),
        ChangeMessage(OP_DEL, 3, 7, E2, "é", (b"b\x00\xff",)),
        ChangeMessage(OP_CLEAR, 1, 9, E1, "o", ()),
        ChangeMessage(OP_EXPIRE, 2, 10, E1, "o", (b"sa", b"sb")),
        ChangeMessage(OP_PING, 0, 0, 0, "o", (b"\x01" * 16,)),
        ChangeMessage(OP_SET, 0, 1, E1, "o", (b"",)),
    ],
)
def test_message_round_trip(message: ChangeMessage) -> None:
    data = encode_message(message)
    assert decode_message(data) == message
    assert decode_message(bytearray(data)) == message


def test_last_seq_spans_the_batch() -> None:
    assert msg(5, "a", "b", "c").last_seq == 7
    assert msg(5, "a").last_seq == 5
    assert msg(5, op=OP_CLEAR).last_seq == 5


def test_every_truncation_and_extension_is_corrupt() -> None:
    data = encode_message(msg(3, "key", "other"))
    for n in range(len(data)):
        with pytest.raises(CorruptData):
            decode_message(data[:n])
    with pytest.raises(CorruptData):
        decode_message(data + b"\x00")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage that is long enough to hold a header ....",
        b"xx" + encode_message(msg(1, "k"))[2:],  # bad magic
        b"sm\x03" + encode_message(msg(1, "k"))[3:],  # unknown format version
        b"sm\x01" + encode_message(msg(1, "k"))[3:],  # version 1: refused by v2 readers
        b"sm\x02\x09" + encode_message(msg(1, "k"))[4:],  # unknown op
        encode_message(msg(1, "k"))[:4] + b"\x02" + encode_message(msg(1, "k"))[5:],  # flag
        encode_message(msg(1, "k"))[:4] + b"\x01" + encode_message(msg(1, "k"))[5:],  # no MAC
        encode_message(ChangeMessage(OP_SET, 0, 1, E1, "o", ()))[:-4] + b"\xff\xff\xff\xff",
        encode_message(ChangeMessage(OP_SET, 0, 1, E1, "o", ()))[:-4] + b"\x00\x00\x00\x01",
    ],
)
def test_garbage_is_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptData):
        decode_message(data)


def test_bad_origin_utf8_is_corrupt() -> None:
    data = bytearray(encode_message(ChangeMessage(OP_SET, 0, 1, E1, "ab", (b"sk",))))
    data[data.index(b"ab")] = 0xFF
    with pytest.raises(CorruptData):
        decode_message(bytes(data))


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 10])
@pytest.mark.parametrize(("version", "deadline"), [(0, 0), (1, 0), (2**53 - 1, 1_700_000_000_000)])
def test_value_round_trip(version: int, deadline: int, payload: bytes) -> None:
    raw = pack_value(version, deadline, payload)
    assert len(raw) == VALUE_HEAD_SIZE + len(payload)
    assert unpack_value(raw) == (version, deadline, payload)


@pytest.mark.parametrize("n", range(VALUE_HEAD_SIZE))
def test_short_value_is_corrupt(n: int) -> None:
    with pytest.raises(CorruptData):
        unpack_value(b"\x00" * n)


# ---- bulk fills (SyncMap.preload) ---------------------------------------------------------------


def _bulk(core: NearCache, *entries: tuple[str, int]) -> int:
    token = core.begin_bulk(0)
    return core.complete_bulk(token, 0.1, [(k, v, E1, f"v{v}", None, INF) for k, v in entries])


def test_a_bulk_read_is_installed_when_nothing_happened_meanwhile() -> None:
    core = started((E1, 2))
    assert _bulk(core, ("a", 1), ("b", 2)) == 2
    assert cached(core, "a") == ("v1", 1)


def test_a_bulk_read_overtaken_by_a_message_installs_nothing() -> None:
    """The fill race for a whole bucket: b@3's message is applied while the read (which saw
    b@2) is out; installing b@2 afterwards would leave it stale until the next write."""
    core = started((E1, 2))
    token = core.begin_bulk(0)
    core.on_message(msg(3, "b"), 0.05)
    n = core.complete_bulk(
        token, 0.1, [("a", 1, E1, "v1", None, INF), ("b", 2, E1, "v2", None, INF)]
    )
    assert n == 0
    assert cached(core, "b") is None


def test_a_bulk_read_overtaken_by_a_message_control_a_later_token_installs_it() -> None:
    """Control for the test above: the same read checked against a token taken *after* the
    message (as if ``install_bulk`` did not compare tokens) installs b@2 over b@3's
    invalidation, so that scenario does catch a missing check."""
    core = started((E1, 2))
    core.on_message(msg(3, "b"), 0.05)
    token = core.begin_bulk(0)
    n = core.complete_bulk(
        token, 0.1, [("a", 1, E1, "v1", None, INF), ("b", 2, E1, "v2", None, INF)]
    )
    assert n == 2
    assert cached(core, "b") == ("v2", 2), "stale: the message said b@3"


def test_a_whole_bucket_of_str_keys_goes_in_at_once_with_its_ttls() -> None:
    """The fast install (an empty bucket, str keys only): an entry already expired is left out,
    one with a deadline is scheduled to expire like any other."""
    core = started((E1, 3))
    n = core.complete_bulk(core.begin_bulk(0), 0.1, [
        ("a", 1, E1, "v1", None, INF), ("b", 2, E1, "v2", None, 0.05),
        ("c", 3, E1, "v3", None, 0.5),
    ])  # fmt: skip
    assert n == 2
    assert cached(core, "a") == ("v1", 1) and cached(core, "b") is None
    assert cached(core, "c") == ("v3", 3) and core.reap_until == 0.5
    assert core.buckets[0].top == 3
    core.tick(0.6)
    assert cached(core, "c") is None and cached(core, "a") == ("v1", 1)


def test_a_bulk_read_overtaken_by_an_own_write_installs_nothing() -> None:
    core = started((E1, 2))
    token = core.begin_bulk(0)
    core.note_write("b", 3)  # this server deleted b at version 3 while the read was out
    n = core.complete_bulk(token, 0.1, [("b", 2, E1, "v2", None, INF)])
    assert n == 0 and cached(core, "b") is None


def test_a_bulk_read_skips_other_epochs_and_expired_values_and_keeps_newer_entries() -> None:
    core = started((E1, 5))
    assert fill(core, "a", 5, "v5")
    token = core.begin_bulk(0)
    n = core.complete_bulk(token, 0.1, [
        ("a", 4, E1, "v4", None, INF), ("b", 2, E2, "v2", None, INF),
        ("c", 3, E1, "v3", None, 0.05), ("d", 1, E1, "v1", None, INF),
    ])  # fmt: skip
    assert n == 1
    assert cached(core, "a") == ("v5", 5) and cached(core, "d") == ("v1", 1)
    assert cached(core, "b") is None and cached(core, "c") is None
