"""A large bucket's flush detaches its entries in O(1) and frees them later (``NearCache.sweep``):
exact orders of events in which a fill, a hit or the free itself races the deferred free."""

from __future__ import annotations

from typing import Any

import pytest

from syncmap.core.nearcache import INF, NearCache

DELTA = 1.0
N = 10


def _core(sweep_above: int | None = 2) -> NearCache:
    """Bucket 0 known in epoch 1 at sequence N, holding k0..k9 at versions 1..N, under a lease."""
    core = NearCache(4, capacity=1000, max_staleness=DELTA, sweep_above=sweep_above)
    core.on_probe([(1, N), (1, 0), (1, 0), (1, 0)], 0.0, 0.0, core.tops())
    token = core.begin_bulk(0)
    entries = [(f"k{i}", i + 1, 1, f"old{i}", None, INF) for i in range(N)]
    assert core.complete_bulk(token, 0.0, entries) == N
    assert 0.0 < core.valid_until < INF
    return core


def _restart_in_a_new_epoch(core: NearCache, at: float) -> None:
    """The store was flushed (FLUSHALL) and k3 written again as version 1 of epoch 2: a probe
    reads bucket 0 in epoch 2 at sequence 1 and restarts it."""
    core.on_probe([(2, 1), (1, 0), (1, 0), (1, 0)], at, at, core.tops())


def _hit(core: NearCache, key: str, now: float) -> Any:
    """What the map's hit path returns (map.py ``__getitem__``), or the slow path's cached
    entry (``flows.reads.read``); None: a round trip to the store."""
    valid_until = core.valid_until
    e = core.entries.get(key)
    if e is not None and now < valid_until:
        return e.value
    got = core.cached(key, now)
    return None if got is None else got[0].value


def test_a_large_flush_is_detached_and_swept_in_chunks() -> None:
    core = _core()
    _restart_in_a_new_epoch(core, 0.1)
    assert core.sweeping and len(core.entries) == N and not core.held(0)
    assert core.valid_until == -INF  # no hit while detached entries are in ``entries``
    assert all(_hit(core, f"k{i}", t) is None for i in range(N) for t in (0.2, DELTA))
    freed = core.sweep(4)
    assert len(freed) == 8 and len(core.entries) == N - 4 and core.sweeping
    while core.sweeping:
        core.sweep(4)
    assert not core.entries and core.valid_until > 0.2  # hits resume after the last chunk


def test_a_small_flush_frees_at_once() -> None:
    core = _core(sweep_above=None)
    _restart_in_a_new_epoch(core, 0.1)
    assert not core.sweeping and not core.entries and core.valid_until > 0.1


def test_fills_racing_the_deferred_free_never_install_or_serve_a_detached_entry() -> None:
    """Order: a fill of k5 begins; the bucket restarts (detached); a fill of k3 begins and
    reads k3@1 of epoch 2; both complete while the sweep is under way."""
    core = _core()
    before = core.begin_fill("k5", 0)
    _restart_in_a_new_epoch(core, 0.1)
    after = core.begin_fill("k3", 0)
    assert not core.complete_fill(before, 0.2, 6, "old5", None, epoch=1)  # began before: refused
    # k3@1 (epoch 2) is lower than the detached k3@4 (epoch 1): installed all the same.
    assert core.complete_fill(after, 0.2, 1, "new3", None, epoch=2)
    assert _hit(core, "k3", 0.3) == "new3" and _hit(core, "k5", 0.3) is None
    core.sweep(N)
    assert not core.sweeping
    assert _hit(core, "k3", 0.3) == "new3"  # the free left the fill's entry alone
    assert set(core.entries) == {"k3"} == core.held(0)


def _without_the_check(core: NearCache) -> list[object]:
    """The free without its check (step 3 of ``NearCache._flush``): whatever entry a key of the
    detached set has now goes, also one a fill installed after the flush."""
    out: list[object] = []
    while core._detached:
        keys = core._detached.pop()
        out += [core.entries.pop(k, None) for k in keys]
    core._revalidate()
    return out


def test_control_a_free_without_the_check_drops_what_a_later_fill_installed() -> None:
    core = _core()
    _restart_in_a_new_epoch(core, 0.1)
    token = core.begin_fill("k3", 0)
    assert core.complete_fill(token, 0.2, 1, "new3", None, epoch=2)
    _without_the_check(core)
    assert _hit(core, "k3", 0.3) is None and "k3" in core.held(0)  # gone, the index broken


def test_control_a_detached_entry_taken_for_live_is_served_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the liveness check the fill of k3@1 (epoch 2) loses to the detached k3@4 of the
    wiped epoch, which the slow path then serves: a value the store no longer holds."""
    monkeypatch.setattr(NearCache, "_live", lambda self, key, e: True)
    core = _core()
    _restart_in_a_new_epoch(core, 0.1)
    token = core.begin_fill("k3", 0)
    core.complete_fill(token, 0.2, 1, "new3", None, epoch=2)
    assert _hit(core, "k3", 0.3) == "old3"


def test_control_hits_during_the_sweep_serve_the_wiped_epoch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without ``valid_until`` in the past while detached entries are left, the hit path serves
    k5 of the epoch FLUSHALL wiped, under the lease the restart gave the bucket."""
    orig = NearCache._revalidate

    def revalidate(self: NearCache) -> float:
        detached, self._detached = self._detached, []
        try:
            return orig(self)
        finally:
            self._detached = detached

    monkeypatch.setattr(NearCache, "_revalidate", revalidate)
    core = _core()
    _restart_in_a_new_epoch(core, 0.1)
    assert core.sweeping
    assert _hit(core, "k5", DELTA) == "old5"


def test_one_probe_frees_at_most_sweep_above_at_once() -> None:
    """A probe restarting several buckets frees up to ``sweep_above`` entries in that step, and
    detaches the rest: the bound is per step, not per bucket."""
    core = NearCache(4, capacity=1000, max_staleness=DELTA, sweep_above=4)
    core.on_probe([(1, 3)] * 4, 0.0, 0.0, core.tops())
    for b in range(4):
        entries = [(f"b{b}k{i}", i + 1, 1, i, None, INF) for i in range(3)]
        assert core.complete_bulk(core.begin_bulk(b), 0.0, entries) == 3
    core.on_probe([(2, 1)] * 4, 0.1, 0.1, core.tops())  # every bucket restarted
    assert len(core._detached) == 3 and len(core.entries) == 9  # 3 freed at once, 9 detached
    core.tick(0.2)
    core.sweep()
    assert not core.entries and not core.sweeping
