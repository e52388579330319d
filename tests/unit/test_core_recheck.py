"""``check_at`` (``MapConfig.feed_turn``, docs/design.md "CPU-bound readers"): the hit path's
deadline is ``min(fresh_until, check_at)``, and moving ``check_at`` never serves past a lease,
a TTL or a held bucket."""

from __future__ import annotations

from syncmap.core.nearcache import INF, NearCache


def started() -> NearCache:
    core = NearCache(1, max_staleness=1.0, margin=0.05)
    core.on_feed_up()
    core.on_probe([(1111, 0)], 0.0, 0.0, core.tops())
    return core


def fill(core: NearCache, key: str, version: int, now: float, deadline: float = INF) -> bool:
    return core.complete_fill(core.begin_fill(key, 0), now, version, key, None, deadline)


def test_off_by_default_the_hit_path_deadline_is_the_lease() -> None:
    core = started()
    assert core.check_at == INF
    assert core.valid_until == core.fresh_until == 1.0 - 0.05


def test_check_at_brings_the_deadline_forward_and_recheck_moves_it_on() -> None:
    core = started()
    core.check_at = -INF  # as SyncMap._new_core does
    core.tick(0.1)
    assert core.valid_until == -INF and core.fresh_until == 0.95  # the first read: slow path
    core.recheck(0.1002)
    assert core.valid_until == 0.1002
    core.recheck(5.0)  # never past the lease
    assert core.valid_until == 0.95


def test_a_ttl_installed_after_recheck_lowers_both_deadlines() -> None:
    core = started()
    core.recheck(0.5)
    assert fill(core, "k", 1, 0.1, deadline=0.3)
    assert core.valid_until == core.fresh_until == 0.3 - 0.05
    core.recheck(0.6)  # a later check does not raise the TTL's deadline back
    assert core.valid_until == 0.25


def test_a_held_bucket_stays_unserved_whatever_check_at_says() -> None:
    core = started()
    assert fill(core, "k", 1, 0.1)
    core.tick(0.96)  # the lease lapsed: held
    assert core.valid_until == core.fresh_until == -INF
    core.recheck(1.2)
    assert core.valid_until == -INF
