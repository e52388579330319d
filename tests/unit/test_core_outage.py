"""The outage policy in the pure core (``max_stale_age``: serve_stale mode), simulated time.

A lease that lapses because no probe came back (the store is unreachable or hung) keeps the
bucket's entries stale-servable until ``max_stale_age`` after its last confirmation; a lapse with
probes coming back (a lost message) flushes as in strict mode; what the core learns meanwhile
(messages, gaps, epochs) still drops entries at once; the first probe back repairs.  Each
protection is shown to matter by switching ``Guards.stale_bound`` off.
"""

from __future__ import annotations

from syncmap.core.nearcache import INF, Guards, NearCache
from syncmap.core.wire import OP_SET, ChangeMessage
from syncmap.keys import encode_key

E1, E2 = 1111, 2222
DELTA, AGE = 1.0, 3.0


def msg(seq: int, *keys: str, epoch: int = E1) -> ChangeMessage:
    return ChangeMessage(OP_SET, 0, seq, epoch, "other", tuple(encode_key(k, 1000) for k in keys))


def warm(age: float = AGE, guards: Guards | None = None) -> NearCache:
    """One bucket at (E1, 1) confirmed by a probe sent at 0, holding k@1."""
    core = NearCache(1, max_staleness=DELTA, max_stale_age=age, guards=guards)
    core.on_feed_up()
    core.on_probe([(E1, 1)], 0.0, 0.0, core.tops())
    token = core.begin_fill("k", 0)
    assert core.complete_fill(token, 0.0, 1, "v1", None)
    return core


def served(core: NearCache, now: float) -> str | None:
    """How a read of k at ``now`` is answered without I/O: "local", "stale" or None (read Redis)."""
    if "k" in core.entries and now < core.valid_until:
        return "local"  # the hit path
    core.tick(now)
    hit = core.cached("k", now)
    return None if hit is None else ("stale" if hit[1] else "local")


def test_strict_mode_holds_at_the_lapse() -> None:
    core = warm(age=0.0)
    assert served(core, 0.5) == "local"
    assert served(core, DELTA) is None  # probes stopped: the lease lapsed, k is not served
    assert "k" in core.entries  # held unserved, for the next probe to revalidate


def test_unreachable_store_keeps_entries_stale_until_max_stale_age() -> None:
    core = warm()
    assert served(core, 0.5) == "local"
    assert served(core, 1.5) == "stale"  # no probe came back since the one sent at 0
    assert core.valid_until == -INF  # the hit path never serves a stale entry
    assert served(core, AGE - 0.1) == "stale"
    assert core.counters.stale_reads == 2
    assert served(core, AGE) is None  # max_stale_age after the last confirmation: not served
    assert "k" in core.entries  # held unserved, for the first probe back to revalidate
    assert core.tick(AGE + 1) == AGE + core.hold_limit - core.margin  # the hold's end
    assert served(core, AGE + core.hold_limit) is None
    assert "k" not in core.entries and core.counters.held_expired == 1
    assert core.tick(AGE + core.hold_limit + 1) == INF - core.margin  # nothing to wake for


def test_without_the_bound_stale_entries_outlive_max_stale_age() -> None:
    core = warm(guards=Guards(stale_bound=False))
    assert served(core, 1.5) == "stale"
    assert served(core, AGE * 10) == "stale"  # the bug the bound prevents


def test_a_lost_message_with_probes_answering_is_never_served_stale() -> None:
    """Order: k@1 cached; another server writes k@2, its message is lost; the probe sent at 0.5
    comes back with seq 2, which we never reach.  The store is up: flush, do not serve stale."""
    for guards, expect in ((Guards(), None), (Guards(stale_bound=False), "stale")):
        core = warm(guards=guards)
        core.on_probe([(E1, 2)], 0.5, 0.5, core.tops())  # replied, not confirmed
        core.tick(0.6)
        assert served(core, 1.2) == expect


def test_a_message_during_the_outage_drops_its_key_and_a_gap_the_bucket() -> None:
    core = warm()
    assert served(core, 1.5) == "stale"
    core.on_message(msg(2, "k"), 1.6)  # k changed: dropped at once
    assert served(core, 1.7) is None
    core = warm()
    token = core.begin_fill("j", 0)
    assert core.complete_fill(token, 0.0, 1, "j1", None)
    assert served(core, 1.5) == "stale"
    core.on_message(msg(5, "x"), 1.6)  # a gap: the bucket may have missed anything
    assert not core.entries


def test_the_first_probe_back_repairs_a_bucket_that_moved() -> None:
    """Order: outage from 0; others write k@2 and its message is lost to us; Redis returns and
    the probe sent at 2.0 reads seq 2.  The stale bucket is flushed at once (not after grace)."""
    core = warm()
    assert served(core, 1.5) == "stale"
    core.on_probe([(E1, 2)], 2.0, 2.0, core.tops())
    assert "k" not in core.entries
    assert served(core, 2.0) is None


def test_the_first_probe_back_renews_a_bucket_that_did_not_move() -> None:
    core = warm()
    assert served(core, 1.5) == "stale"
    core.on_probe([(E1, 1)], 2.0, 2.0, core.tops())
    assert served(core, 2.1) == "local"
    assert core.valid_until == 3.0 - core.margin  # the hit path serves again


def test_a_new_epoch_on_return_flushes() -> None:
    core = warm()
    assert served(core, 1.5) == "stale"
    core.on_probe([(E2, 1)], 2.0, 2.0, core.tops())  # restarted without persistence
    assert "k" not in core.entries


def test_an_old_probe_coming_back_late_vouches_only_for_its_send_time() -> None:
    """Order: a probe sent at 0.25 hangs (SIGSTOP) and comes back at 2.0 unchanged: it proves
    the bucket as of 0.25 only, so the bucket stays stale, now counted from 0.25."""
    core = warm()
    assert served(core, 1.5) == "stale"
    core.on_probe([(E1, 1)], 0.25, 2.0, core.tops())
    assert served(core, 2.0) == "stale"
    assert served(core, 0.25 + AGE) is None
