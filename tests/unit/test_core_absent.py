"""Absent keys in the pure core (simulated time): a read that finds no field caches an *absent
marker* (``NearCache.fill_absent``) under the rules of a value fill.

Each guard has its control: the fill race (a nil reply that left before a write whose message
was applied first) with ``Guards(fill_race=False)``, which then serves "absent" for good.
"""

from __future__ import annotations

from syncmap.core.nearcache import COPY, INF, Guards, NearCache, is_absent
from syncmap.core.wire import OP_CLEAR, OP_SET, ChangeMessage
from syncmap.keys import encode_key

E1, E2 = 1111, 2222
DELTA = 1.0


def msg(seq: int, *keys: str, op: int = OP_SET, epoch: int = E1, bucket: int = 0) -> ChangeMessage:
    return ChangeMessage(op, bucket, seq, epoch, "other", tuple(encode_key(k, 1000) for k in keys))


def started(state: tuple[int | None, int] = (E1, 0), *, buckets: int = 1, **kw: object
            ) -> NearCache:  # fmt: skip
    """Subscribed, then a baseline probe at 0 (as ``Engine.start`` leaves a map)."""
    core = NearCache(buckets, max_staleness=DELTA, **kw)  # type: ignore[arg-type]
    core.on_feed_up()
    core.on_probe([state] * buckets, 0.0, 0.0, core.tops())
    return core


def read_absent(core: NearCache, key: str, now: float, bucket: int = 0) -> bool:
    """A read of ``key`` whose HGET found nothing; whether the marker went in."""
    return core.fill_absent(core.begin_fill(key, bucket), now)


def serves_absent(core: NearCache, key: str, now: float) -> bool:
    """Whether a read of ``key`` at ``now`` answers "absent" without I/O (hit or slow path)."""
    e = core.entries.get(key)
    if e is None or not is_absent(e):
        return False
    if now < core.valid_until:
        return True
    got = core.cached(key, now)
    return got is not None and is_absent(got[0])


def test_a_nil_reply_installs_a_marker_served_as_a_hit_and_counted_apart() -> None:
    core = started()
    assert read_absent(core, "k", 0.1)
    assert core.cached_absent("k") and serves_absent(core, "k", 0.2)
    e = core.entries["k"]
    assert (e.value, e.raw, e.version, e.deadline) == (COPY, None, 0, INF)
    assert core.cached_entry("k") is None, "tools that list values must not see a marker"
    assert (core.absent, core.values_cached(), core.counters.absent_fills) == (1, 0, 1)


def test_cache_absent_off_installs_nothing() -> None:
    core = started(absent=False)
    assert not read_absent(core, "k", 0.1)
    assert "k" not in core.entries and core.absent == 0


def test_a_message_for_the_key_drops_the_marker_and_a_fill_replaces_it() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    read_absent(core, "j", 0.1)
    core.on_message(msg(1, "k"), 0.2)  # another server set k@1
    assert not core.cached_absent("k") and core.cached_absent("j")
    assert core.absent == 1
    # A fill that reads the value replaces a marker without any message, too (0 < 1).
    token = core.begin_fill("j", 0)
    assert core.complete_fill(token, 0.3, 2, "v", None)
    assert core.entries["j"].value == "v" and core.absent == 0


def test_a_clear_message_and_own_writes_drop_markers() -> None:
    core = started()
    for k in ("a", "b", "c"):
        read_absent(core, k, 0.1)
    core.wrote(core.begin_fill("a", 0), 0.2, 1, "mine", epoch=E1)  # read-your-writes
    assert core.entries["a"].value == "mine"
    core.wrote(core.begin_fill("b", 0), 0.2, 2, deleted=True, epoch=E1)
    assert "b" not in core.entries  # dropped (a delete caches nothing itself)
    core.on_message(msg(1, "a"), 0.3)
    core.on_message(msg(2, "b"), 0.3)
    core.on_message(msg(3, op=OP_CLEAR), 0.3)
    assert core.entries == {} and core.absent == 0


def test_race_a_write_applied_while_the_nil_read_was_out_is_not_cached_as_absent() -> None:
    """read sent (k absent) -> another server writes k@1 and its message is applied -> the nil
    reply arrives: caching "absent" now would hide k@1 until k's next write."""
    core = started()
    token = core.begin_fill("k", 0)  # HGET k runs now: nil
    core.on_message(msg(1, "k"), 0.1)  # k@1 written elsewhere; its message overtakes the reply
    assert not core.fill_absent(token, 0.2)
    assert "k" not in core.entries and core.counters.fills_rejected == 1


def test_control_race_without_the_guard_serves_absent_for_good() -> None:
    core = started(guards=Guards(fill_race=False))
    token = core.begin_fill("k", 0)
    core.on_message(msg(1, "k"), 0.1)
    assert core.fill_absent(token, 0.2)
    # Nothing will ever drop it: the store's k@1 is accounted for, so probes renew the lease.
    for t in (0.5, 1.0, 1.5, 2.0, 2.5):
        core.on_probe([(E1, 1)], t, t, core.tops())
        core.tick(t)
    assert serves_absent(core, "k", 2.6), "the stale marker is no longer served"


def test_a_fill_begun_before_a_flush_a_probe_or_a_lapse_installs_no_marker() -> None:
    core = started()
    token = core.begin_fill("k", 0)
    core.on_message(msg(2, "x"), 0.1)  # a gap (seq 1 lost): the bucket is flushed
    assert not core.fill_absent(token, 0.2)
    core = started()
    token = core.begin_fill("k", 0)
    core.tops()  # a probe starts while the read is out (A7)
    assert not core.fill_absent(token, 0.2)
    core = started()
    assert not read_absent(core, "k", DELTA)  # the baseline probe's lease has run out


def test_a_gap_or_a_new_epoch_flushes_markers_as_entries() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    core.on_message(msg(3, "x"), 0.2)  # a gap
    assert "k" not in core.entries and core.absent == 0
    core = started()
    read_absent(core, "k", 0.1)
    core.on_probe([(E2, 0)], 0.25, 0.3, core.tops())  # the store restarted: a new epoch
    assert "k" not in core.entries and core.absent == 0


def test_a_lapse_holds_markers_unserved_and_a_probe_renews_them() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    core.tick(DELTA)  # probes stopped (a pause): the lease lapses, the bucket is held
    assert core.cached_absent("k") and not serves_absent(core, "k", DELTA)
    core.on_probe([(E1, 0)], 1.1, 1.1, core.tops())  # nothing moved: renewed
    assert serves_absent(core, "k", 1.2) and core.counters.revalidations == 1


def test_a_held_bucket_that_moved_drops_the_written_key_marker_only() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    read_absent(core, "j", 0.1)
    core.tick(DELTA)  # held
    core.on_probe([(E1, 1)], 1.1, 1.1, core.tops())  # k was written during the pause
    assert not serves_absent(core, "j", 1.15), "served before the probe's target is reached"
    core.on_message(msg(1, "k"), 1.2)  # the buffered message arrives: target reached, renewed
    assert not core.cached_absent("k") and serves_absent(core, "j", 1.25)


def test_a_moved_bucket_after_a_reconnect_is_restarted_with_its_markers() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    core.on_feed_down()
    core.on_feed_up(0.2)
    core.on_probe([(E1, 1)], 0.3, 0.3, core.tops())  # moved while the feed was down
    assert "k" not in core.entries and core.absent == 0


def test_markers_count_against_capacity_and_are_evicted_like_entries() -> None:
    core = started(capacity=3)
    for k in ("a", "b", "c", "d", "e"):
        read_absent(core, k, 0.1)
    assert len(core.entries) == 3 and core.absent == 3 and core.counters.evictions == 2
    assert core.complete_fill(core.begin_fill("v", 0), 0.1, 1, "x", None)
    assert len(core.entries) == 3 and core.absent == 2 and core.values_cached() == 1


def test_a_detached_marker_is_not_served_and_the_sweep_frees_it() -> None:
    core = started(sweep_above=0)
    read_absent(core, "k", 0.1)
    core.on_message(msg(3, "x"), 0.2)  # a gap: the flush detaches (sweep_above=0)
    assert core.sweeping and not core.cached_absent("k") and not serves_absent(core, "k", 0.2)
    assert core.absent == 1  # still in entries until swept
    core.sweep()
    assert "k" not in core.entries and core.absent == 0 and not core.sweeping


def test_forget_all_resets_the_count() -> None:
    core = started()
    read_absent(core, "k", 0.1)
    core.forget_all()
    assert core.absent == 0 and core.entries == {}
