"""A map's probe on a Redis Cluster when one shard cannot answer it (issue 14 item 3: only the
affected buckets lapse).  The probe reads every bucket; a bucket whose master is down, or
whose slot is being migrated, gets no answer.  Its lease runs out and it is held (unserved) or
flushed, while the buckets of the masters that answered are renewed and keep serving hits.
Before, one shard's failure failed the whole probe, and every bucket of the map lapsed
together."""

from __future__ import annotations

from syncmap import MapConfig, SyncMap
from syncmap.core.nearcache import INF
from syncmap.keys import Layout, bucket_of, encode_key
from syncmap.store.cluster import slot_for
from syncmap.testing.clusterset import ClusterSet
from syncmap.testing.wait import wait_until

KEYS = [f"k{i}" for i in range(64)]
DELTA = 0.5


def _split(cluster: ClusterSet, name: str, bucket: int) -> tuple[int, list[str], list[str]]:
    """(slot of ``bucket``, keys on its master, keys on the other masters)."""
    layout = Layout("sm", name, 16)
    slot = slot_for(layout.data(bucket))
    owner = cluster.master_for_slot(slot)
    mine = [k for k in KEYS
            if cluster.master_for_slot(slot_for(layout.data(bucket_of(encode_key(k, 1024), 16))))
            is owner]  # fmt: skip
    return slot, mine, [k for k in KEYS if k not in mine]


def _flushed(m: SyncMap, keys: list[str]) -> bool:
    """Whether ``keys``' bucket lapsed: flushed, or held (entries kept unserved until a probe
    revalidates it, ``NearCache._hold``).  Read under the map's guard: the timer holds or
    flushes a lapsed bucket and recomputes the hit path's deadline (``valid_until``) in one
    step under it.  Not ``m._servable(k) is None``: that is also true of *every* key in the
    moment between the lapsed lease's deadline passing and the timer's step (the hit path
    compares one deadline, the earliest lease's), and a check of the other buckets made in that
    moment failed one run in three."""
    with m._state.guard:
        core = m._core
        return all(k not in core.entries or core.buckets[core.entries[k].bucket].held_since
                   != -INF for k in keys)  # fmt: skip


def _cached_map(url: str, name: str) -> SyncMap:
    m = SyncMap(name, url, config=MapConfig(max_staleness=DELTA, socket_timeout=1.0))
    m.update({k: 0 for k in KEYS})
    assert all(m[k] == 0 for k in KEYS)
    return m


def test_a_dead_masters_buckets_lapse_and_the_others_stay_served(
    redis_cluster: ClusterSet,
) -> None:
    _, theirs, ours = _split(redis_cluster, "probe", 0)
    with _cached_map(redis_cluster.url, "probe") as m:
        redis_cluster.master_for_slot(slot_for(Layout("sm", "probe", 16).data(0))).kill()
        # No failover yet (that takes 2 s or more): its buckets' leases lapse within Δ.
        wait_until(lambda: _flushed(m, theirs), 3 * DELTA, "the dead master's buckets lapsing")
        # The answering masters' buckets were renewed by the probes meanwhile: still hits.
        assert all(m._servable(k) is not None for k in ours)
        hits = m.statistics().hits
        assert all(m[k] == 0 for k in ours)
        assert m.statistics().hits == hits + len(ours)


def test_a_migrating_buckets_slot_lapses_alone(redis_cluster: ClusterSet) -> None:
    # While a bucket's slot moves, its probe script (two keys, one of them absent) is refused
    # with TRYAGAIN on both sides: that bucket gets no answer, the other fifteen do.
    slot, _, _ = _split(redis_cluster, "moving", 3)
    mine = [k for k in KEYS if bucket_of(encode_key(k, 1024), 16) == 3]
    others = [k for k in KEYS if k not in mine]
    source = redis_cluster.master_for_slot(slot)
    target = next(n for n in redis_cluster.masters() if n is not source)
    with _cached_map(redis_cluster.url, "moving") as m:

        def held(step: str) -> None:
            if step == "moved":  # the ASK window, held until the bucket's lease has lapsed
                wait_until(lambda: _flushed(m, mine), 3 * DELTA, "the migrating bucket lapsing")
                assert all(m._servable(k) is not None for k in others)

        assert redis_cluster.migrate_slot(slot, target, hook=held) >= 1
        assert all(m[k] == 0 for k in KEYS)  # and the moved bucket is read from its new owner
