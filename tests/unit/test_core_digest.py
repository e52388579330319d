"""The digest chain in the pure core (protocol v2, docs/protocol.md §4.2), one exact order of events
each.  The store's chain is computed here with the same wire functions the scripts mirror (their
equality with the Lua side is tested against a real redis-server in
tests/integration/test_signed_messages.py).

The attack each test replays: a message is lost (a relay writer died between write and publish),
then a forger publishes the bucket's exact current sequence naming another key.  By sequence the
reader is up to date; only the chain tells it applied something the store never did."""

from __future__ import annotations

from test_core_guards import E1, E2, cached, fill, msg

from syncmap.core.nearcache import Guards, NearCache
from syncmap.core.wire import ChangeMessage, link, next_digest


def chain(*messages: ChangeMessage, start: str = "") -> str:
    digest = start
    for m in messages:
        digest = next_digest(digest, link(m))
    return digest


def started(ordered: bool = True, guards: Guards | None = None) -> NearCache:
    """A reader that took its baseline probe at (E1, 1) with the store's real chain."""
    core = NearCache(1, max_staleness=1.0, ordered=ordered, guards=guards)
    core.on_feed_up()
    core.on_probe([(E1, 1, chain(msg(1, "k")))], 0.0, 0.0, core.tops())
    return core


def test_messages_the_store_made_keep_the_chain_and_the_lease() -> None:
    core = started()
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(2, "j"), 0.05)
    core.on_message(msg(3, "a", "b"), 0.06)  # an MSET: one link for two versions
    assert core.buckets[0].digest == chain(msg(1, "k"), msg(2, "j"), msg(3, "a", "b"))
    core.on_probe(
        [(E1, 4, chain(msg(1, "k"), msg(2, "j"), msg(3, "a", "b")))], 0.1, 0.1, core.tops()
    )
    assert core.buckets[0].lease_until == 1.1
    assert cached(core, "k") == ("v1", 1)
    assert core.counters.digest_mismatches == 0 and core.counters.resyncs == 0


def test_a_forged_current_sequence_is_caught_by_the_next_probe() -> None:
    core = started()
    assert fill(core, "k", 1, "v1")
    real = msg(2, "k")  # the store's write of k@2, whose message is lost
    core.on_message(msg(2, "other"), 0.05)  # the forger's, at the exact current sequence
    assert core.buckets[0].seq == 2 and cached(core, "k") == ("v1", 1)
    core.on_probe([(E1, 2, chain(msg(1, "k"), real))], 0.1, 0.1, core.tops())
    assert cached(core, "k") is None, "k@1 must not outlive the probe"
    assert core.counters.digest_mismatches == 1
    assert core.buckets[0].digest == chain(msg(1, "k"), real), "the store's chain adopted"
    assert core.buckets[0].lease_until == 1.1


def test_the_forgery_after_the_probe_is_caught_when_the_target_is_reached() -> None:
    core = started()
    assert fill(core, "k", 1, "v1")
    core.on_probe([(E1, 2, chain(msg(1, "k"), msg(2, "k")))], 0.1, 0.1, core.tops())
    assert cached(core, "k") == ("v1", 1), "behind the probe: a target, within grace"
    core.on_message(msg(2, "other"), 0.12)
    assert cached(core, "k") is None and core.counters.digest_mismatches == 1


def test_guard_off_control_the_forgery_confirms_the_stale_bucket_for_ever() -> None:
    core = started(guards=Guards(digest_chain=False))
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(2, "other"), 0.05)
    real = chain(msg(1, "k"), msg(2, "k"))
    for t in (0.1, 1.0, 5.0, 8.0):
        core.on_probe([(E1, 2, real)], t, t, core.tops())
        core.tick(t)
    assert cached(core, "k") == ("v1", 1), "stale after 8 x max_staleness (protocol v1's hole)"


def test_on_a_relayed_feed_the_chain_follows_the_contiguous_run() -> None:
    core = started(ordered=False)
    assert fill(core, "k", 1, "v1")
    store = chain(msg(1, "k"), msg(2, "i"), msg(3, "j"))
    core.on_message(msg(3, "j"), 0.05)  # early
    core.on_probe([(E1, 3, store)], 0.1, 0.1, core.tops())
    core.on_message(msg(2, "i"), 0.12)  # the missing one: catch-up chains 2 then 3
    assert core.buckets[0].digest == store and core.buckets[0].lease_until == 1.1
    assert cached(core, "k") == ("v1", 1)
    core.on_message(msg(4, "forged"), 0.2)
    core.on_probe([(E1, 4, chain(msg(4, "k"), start=store))], 0.3, 0.3, core.tops())
    assert cached(core, "k") is None and core.counters.digest_mismatches == 1


def test_an_unknown_chain_restarts_the_bucket_at_the_next_probe() -> None:
    """After a gap (ordered feed) the chain cannot be known: the probe at our sequence restarts
    the bucket, counted as a resync, not as a mismatch."""
    core = started()
    core.on_message(msg(3, "j"), 0.05)  # 2 lost: a gap
    assert core.buckets[0].digest is None and core.counters.gaps == 1
    assert fill(core, "j", 3, "v3", now=0.06)
    store = chain(msg(1, "k"), msg(2, "x"), msg(3, "j"))
    core.on_probe([(E1, 3, store)], 0.1, 0.1, core.tops())
    assert core.buckets[0].digest == store and cached(core, "j") is None
    assert core.counters.digest_mismatches == 0


def test_a_new_epoch_starts_the_chain_from_empty() -> None:
    core = started()
    first = msg(1, "k", epoch=E2)
    core.on_message(first, 0.05)
    assert core.buckets[0].digest == chain(first)
    core.learn_epoch(0, E1, 1, 0.06)  # a reply in yet another epoch, at version 1
    assert core.buckets[0].digest == ""
    core.learn_epoch(0, E2, 5, 0.07)  # one at version 5: its first four messages unknown
    assert core.buckets[0].digest is None


def test_probes_without_a_digest_compare_nothing() -> None:
    """A store that reports no digest (model tests, a damaged bucket) is not compared."""
    core = started()
    assert fill(core, "k", 1, "v1")
    core.on_message(msg(2, "other"), 0.05)
    core.on_probe([(E1, 2)], 0.1, 0.1, core.tops())
    assert cached(core, "k") == ("v1", 1) and core.counters.digest_mismatches == 0
