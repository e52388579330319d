"""PING leases in the near-cache core (``NearCache.on_vouch``, ``on_touched``), one exact order of
events each, in simulated time.  Each rule that keeps a vouch from renewing a bucket has its
control: the same events with the rule's input left out (the notice never delivered, the probe
never applied) serve the stale value past Δ, so the test shows the rule is what protects.
"""

from __future__ import annotations

from syncmap.core.nearcache import NearCache
from syncmap.core.wire import OP_SET, ChangeMessage
from syncmap.keys import encode_key

E1 = 1111


def msg(seq: int, *keys: str) -> ChangeMessage:
    return ChangeMessage(OP_SET, 0, seq, E1, "other", tuple(encode_key(k, 1000) for k in keys))


def started() -> NearCache:
    """One bucket, subscribed and probed at 0 (epoch E1, seq 1), k@1 cached."""
    core = NearCache(1, max_staleness=1.0)
    core.on_feed_up()
    core.on_probe([(E1, 1)], 0.0, 0.0, core.tops())
    token = core.begin_fill("k", 0)
    assert core.complete_fill(token, 0.0, 1, "v1", None)
    return core


def served(core: NearCache, now: float) -> bool:
    """Whether a hit on k at ``now`` would return what is cached (the timer ticked)."""
    core.tick(now)
    return "k" in core.entries and now < core.valid_until


def test_a_vouch_renews_a_settled_bucket_to_its_send_time_plus_delta() -> None:
    core = started()
    assert not core.on_vouch(0.8)
    assert core.buckets[0].lease_until == 1.8
    assert served(core, 1.7)
    assert not served(core, 1.8)  # nothing renewed it since: it lapses


def test_a_flush_notice_stops_vouches_until_a_probe() -> None:
    """FLUSHALL publishes nothing; tracking's null invalidation puts every bucket in doubt."""
    core = started()
    core.on_touched(None)  # FLUSHALL at 0.5, its notice before the PONG of a PING sent at 0.6
    assert core.on_vouch(0.6), "the driver must probe"
    assert not served(core, 1.0)
    core.on_probe([(None, 0)], 1.1, 1.1, core.tops())  # the probe: the store is empty
    assert "k" not in core.entries and core.on_vouch(1.2) is False


def test_control_without_the_flush_notice_the_vouch_serves_the_flushed_value() -> None:
    core = started()
    core.on_vouch(0.6)  # FLUSHALL at 0.5, notice never delivered
    core.on_vouch(1.4)
    assert served(core, 2.0), "k@1 served 1.5 s after the store lost it: the notice matters"


def test_a_change_that_sent_no_message_is_doubted() -> None:
    """A tracking notice with no message since the last one: a write around the scripts (a
    ghost write, an eviction).  A notice after a message is the message's own write."""
    core = started()
    core.on_message(msg(2, "j"), 0.1)
    core.on_touched(0)  # the script's own change: a message came since the last notice
    assert not core.on_vouch(0.2)
    core.on_touched(0)  # nothing came since: someone wrote around the scripts
    assert core.on_vouch(0.3)
    assert not served(core, 1.25), "the bucket lapses at 0.2 + Δ"


def test_control_a_ghost_write_without_its_notice_stays_served() -> None:
    core = started()
    core.on_message(msg(2, "j"), 0.1)
    core.on_touched(0)
    core.on_vouch(0.3)  # the ghost write's notice never delivered
    core.on_vouch(1.1)
    assert served(core, 1.5)


def test_a_bucket_a_probe_found_behind_is_not_vouched() -> None:
    """The probe read seq 2, we are at 1: its message is missing.  A vouch must not renew the
    bucket (on a working connection the message would come first: something is wrong)."""
    core = started()
    core.on_probe([(E1, 2)], 0.5, 0.5, core.tops())
    assert core.on_vouch(0.6)
    assert not served(core, 1.0)


def test_control_the_same_bucket_renewed_by_the_vouch_stays_served() -> None:
    core = started()
    core.on_vouch(0.6)  # the probe that found it behind never came back
    assert served(core, 1.5)


def test_no_vouch_counts_while_the_feed_is_down_and_until_a_repair_probe() -> None:
    core = started()
    core.on_feed_down()
    assert core.on_vouch(0.5) and core.buckets[0].lease_until == 1.0
    core.on_feed_up(0.6)  # re-subscribed: messages may have been lost meanwhile
    assert core.on_vouch(0.7) and core.buckets[0].lease_until == 1.0
    core.on_probe([(E1, 1)], 0.8, 0.8, core.tops())
    assert not core.on_vouch(0.9) and core.buckets[0].lease_until == 1.9


def test_a_duplicate_on_an_ordered_feed_is_doubted() -> None:
    """On an in-script route nothing arrives twice: a second message at a sequence we hold may
    be a forgery that took the real one's place; only a probe's digest can tell."""
    core = started()
    core.on_message(msg(2, "j"), 0.1)
    core.on_message(msg(2, "k"), 0.2)
    assert core.on_vouch(0.3)
    core.on_probe([(E1, 2)], 0.4, 0.4, core.tops())
    assert not core.on_vouch(0.5)
