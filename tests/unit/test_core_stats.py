"""O(1) statistics for periodic callers (issue 16 goal 2): the presence record and the metrics
read ``NearCache.hits_estimate`` (at most ``HITS_SAMPLE`` entries), never a sum over the whole
cache; a user's ``statistics()`` stays exact."""

from __future__ import annotations

import pytest

from syncmap.core import nearcache
from syncmap.core.nearcache import HITS_SAMPLE, NearCache
from syncmap.stats import statistics_of


def filled(n: int, hits: int) -> NearCache:
    core = NearCache(4, capacity=n, max_staleness=1.0)
    core.on_feed_up()
    core.on_probe([(1, 0)] * 4, 0.0, 0.0, core.tops())
    for i in range(n):
        key = f"k{i}"
        assert core.complete_fill(core.begin_fill(key, i % 4), 0.0, 0, i, None)
        core.entries[key].hits = hits
    return core


def test_small_caches_are_counted_exactly() -> None:
    core = filled(100, 3)
    assert core.hits_estimate() == core.hits() == 300


def test_large_caches_are_estimated_from_a_sample_and_never_go_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = filled(3 * HITS_SAMPLE, 2)
    read: list[int] = []
    real = nearcache.islice

    def counting(it: object, n: int) -> object:
        read.append(n)
        return real(it, n)  # type: ignore[call-overload]

    monkeypatch.setattr(nearcache, "islice", counting)
    assert core.hits_estimate() == core.hits() == 6 * HITS_SAMPLE  # uniform: exact
    assert read == [HITS_SAMPLE]  # a sample, not every entry
    for key in list(core.entries)[:HITS_SAMPLE]:  # the sampled third loses its hits
        core.entries[key].hits = 0
    assert core.hits_estimate() == 6 * HITS_SAMPLE  # an OTel counter never goes back


def test_the_presence_statistics_do_not_sum_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    core = filled(2 * HITS_SAMPLE, 1)

    def scan() -> int:
        raise AssertionError("a periodic caller summed every entry")

    monkeypatch.setattr(core, "hits", scan)
    assert statistics_of(core, 0, exact=False).hits == 2 * HITS_SAMPLE
    with pytest.raises(AssertionError, match="summed every entry"):
        statistics_of(core, 0)  # the control: a user's statistics() is the exact sum
