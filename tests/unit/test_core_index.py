"""The near cache's per-bucket key index (``NearCache.held``) against its entries."""

from __future__ import annotations

from typing import Any

from syncmap.core.nearcache import INF, NearCache


def _core() -> NearCache:
    core = NearCache(16, capacity=1000, max_staleness=3600)
    for b in core.buckets:
        b.lease_until, b.epoch, b.known = INF, 1, True
    return core


def _consistent(core: NearCache) -> None:
    by_index = {k: b for b in range(16) for k in core.held(b)}
    assert {k: e.bucket for k, e in core.entries.items()} == by_index


def _bulk(core: NearCache, bucket: int, entries: list[tuple[Any, ...]]) -> int:
    return core.complete_bulk(core.begin_bulk(bucket), 0.0, entries)


def test_equal_keys_of_other_types_in_other_buckets_keep_the_index_right() -> None:
    """1 and True are one dict key but two stored fields, which may sit in two buckets: a bulk
    fill of an empty bucket must still replace the other bucket's entry properly (a shortcut
    that skipped the lookup for every key of an empty bucket left the first bucket's index
    naming a key it no longer held, and that bucket's flush raised KeyError)."""
    core = _core()
    assert _bulk(core, 3, [(1, 5, 1, "one", None, INF)]) == 1
    assert _bulk(core, 7, [(True, 9, 1, "true", None, INF)]) == 1
    _consistent(core)
    assert core.entries[True].bucket == 7 and core.entries[True].kc is bool
    core._flush(3)
    core._flush(7)
    assert not core.entries
    _consistent(core)


def test_a_flush_takes_its_bucket_only() -> None:
    core = _core()
    for b in range(16):
        _bulk(core, b, [(f"{b}-{i}", 1, 1, i, None, INF) for i in range(10)])
    core._flush(5)
    assert len(core.entries) == 150 and not core.held(5)
    assert all(e.bucket != 5 for e in core.entries.values())
    _consistent(core)
