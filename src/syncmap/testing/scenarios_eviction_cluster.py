"""Scenario S16-cluster (issue 14's Done-when): S16's eviction run on a Redis Cluster.

The same threads, oracles and guard-off controls as S16 (``scenarios_eviction``), on a 3 + 3
cluster (``Env(topology="cluster")``, or the running one ``Env.cluster`` names), one policy
after another on the one cluster:

* the map (4 buckets, key layout 2s) gets a fresh name whose buckets' slots fall on *every*
  master, so each master holds data hashes, fence counters and holds of the map;
* every master gets ``maxmemory`` = what it uses + the headroom, and the policy; the filler
  writes 16 KiB keys with a TTL to every master (a hash tag per master), so each of them evicts;
  evictions are counted per kind through each master's keyspace notifications (they are
  node-local) and per master from ``INFO stats``;
* the 24 locks are ``map.lock(key)`` locks: on a Cluster each lives under its key's bucket tag,
  so the fence counter a fenced write checks is in that write's own slot (and master).  The
  stale writes pass the ``Fence`` acquire() returned two visits ago, which names that counter;
* the checker reads each bucket's data hash on the master that owns it.

After each policy the masters get their settings back (``maxmemory``, the policy, keyspace
notifications) and the run's keys are deleted, so a shared cluster is left as it was found.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

import redis

from ..core.nearcache import Guards
from ..errors import ConfigurationError
from ..lock import Lock
from .clusterset import ClusterSet
from .faults import delete_matching
from .scenario import Env, ScenarioResult, finish, scenario, timed
from .scenarios_eviction import HEADROOM, POLICIES, _Run, judge
from .scenarios_lock import on_cluster

NAME = "s16c"
_SETTINGS = ("maxmemory", "maxmemory-policy", "notify-keyspace-events")
_FILL_PER_MASTER = 4  # filler keys per master per 10 ms round: ~6.5 MB/s on each of three


def _owner_of(slots: list[tuple[int, int, str]], slot: int) -> str:
    return next(m for start, end, m in slots if start <= slot <= end)


def _slots(cluster: ClusterSet) -> list[tuple[int, int, str]]:
    return [(start, end, master) for start, end, master, _ in cluster.slot_map()]


def _tag_on(slots: list[tuple[int, int, str]], master: str) -> str:
    """A hash tag whose slot ``master`` owns: the filler's keys for that master."""
    return next(
        tag
        for tag in (f"junk{n}" for n in range(100_000))
        if _owner_of(slots, ClusterSet.slot_of(f"{{{tag}}}")) == master
    )


def spread_name(cluster: ClusterSet, buckets: int, prefix: str = NAME) -> str:
    """A fresh map name whose ``buckets`` bucket tags fall on every master (the filler fills
    all of them, so every master must hold some of the map)."""
    slots = _slots(cluster)
    masters = {m for _, _, m in slots}
    while True:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        owners = {_owner_of(slots, ClusterSet.slot_of(f"{{{name}:{b}}}")) for b in range(buckets)}
        if owners == masters:
            return name


class _ClusterRun(_Run):
    """S16's run with the filler, the locks and the checker placed as a Cluster needs."""

    def __init__(self, cluster: ClusterSet, policy: str, guards: Guards, headroom: int,
                 name: str) -> None:  # fmt: skip
        super().__init__(cluster.url, policy, guards, headroom, name)
        self.cluster = cluster

    def fill_targets(self) -> list[tuple[redis.Redis, str, int]]:
        slots = _slots(self.cluster)
        return [
            (self.cluster.node_client(m), f"junk:{{{_tag_on(slots, m)}}}:", _FILL_PER_MASTER)
            for m in dict.fromkeys(m for _, _, m in slots)
        ]

    def make_lock(self, i: int) -> Lock:
        # Under the bucket tag of the key it fences (layout 2s): a Lock of its own name would
        # live in another slot, and the map refuses a fence from another slot before sending.
        return self.maps[0].lock(self.fkeys[i], lease=5)

    def look_targets(self, looked: list[tuple[str, bytes, str]]
                     ) -> list[tuple[redis.Redis, list[tuple[str, bytes, str]]]]:  # fmt: skip
        by_hash: dict[str, list[tuple[str, bytes, str]]] = defaultdict(list)
        for look in looked:
            by_hash[look[2]].append(look)
        return [
            (self.cluster.node_client(self.cluster.master_for_slot(ClusterSet.slot_of(h))), group)
            for h, group in by_hash.items()
        ]


def cluster_eviction_run(cluster: ClusterSet, policy: str, seconds: float,
                         guards: Guards | None = None, headroom: int = HEADROOM
                         ) -> dict[str, Any]:  # fmt: skip
    """One S16 run under ``policy`` on every master of ``cluster``; the masters' settings are
    put back and the run's keys deleted afterwards.  Figures: S16's, plus ``evicted_per_master``
    (``INFO stats`` evicted_keys, in the masters' order) and ``masters_holding_buckets``."""
    run = _ClusterRun(cluster, policy, guards or Guards(), headroom, spread_name(cluster, 4))
    admins = [cluster.node_client(m) for m in cluster.masters()]
    saved = [{k: a.config_get(k)[k] for k in _SETTINGS} for a in admins]
    before = [int(a.info("stats")["evicted_keys"]) for a in admins]
    try:
        figures = run.run_on(admins, seconds)
        after = [int(a.info("stats")["evicted_keys"]) for a in admins]
    finally:
        for admin, settings in zip(admins, saved, strict=True):
            for k, v in settings.items():
                if v is not None:
                    admin.config_set(k, v)
            admin.close()
        delete_matching(cluster.url, ["junk:*", f"sm:{{{run.name}:*", f"sm:{{{run.name}}}:*"])
    slots = _slots(cluster)
    figures["evicted_per_master"] = [b - a for a, b in zip(before, after, strict=True)]
    figures["masters_holding_buckets"] = len(
        {_owner_of(slots, ClusterSet.slot_of(run.layout.data(b))) for b in range(4)}
    )
    figures["masters"] = len(admins)
    return figures


@scenario("S16-cluster", "eviction-cluster")
def s16_cluster(env: Env, seconds: float = 10.0, *, policies: tuple[str, ...] = POLICIES,
                control: str | None = None, guard: bool = True) -> ScenarioResult:  # fmt: skip
    """S16 on a Redis Cluster (module docstring): every policy in turn on every master, the same
    musts (stale fenced writes accepted, duplicate versions compared, acknowledged writes lost
    beyond what eviction removed, entries served after their data was evicted beyond Δ: each
    0), plus: the map's buckets on every master, and every master evicting (``noeviction``:
    none).  ``control`` / ``guard=False``: S16's guard-off controls, which must fail."""
    result, started = timed("S16-cluster", "eviction-cluster")
    extra: list[dict[str, Any]] = []
    with on_cluster(env).store() as store:
        if not isinstance(store, ClusterSet):
            raise ConfigurationError(f"S16-cluster needs a ClusterSet, not {store!r}")

        def one(policy: str, each: float, guards: Guards | None, headroom: int
                ) -> dict[str, Any]:  # fmt: skip
            r = cluster_eviction_run(store, policy, each, guards, headroom)
            extra.append(r)
            return r

        # Shorter per policy than S16's 2 s: the CI form runs four policies in about 10 s.
        judge(result, one, seconds, policies, control, guard, shortest=(3.0, 1.5))
    _require_spread(result, extra)
    result.figures["topology"] = "cluster"
    return finish(result, started)


def _require_spread(result: ScenarioResult, runs: list[dict[str, Any]]) -> None:
    """Every master held some of the map and (but under ``noeviction``) evicted."""
    result.figures["evicted_per_master"] = {
        r["maxmemory_policy"]: r["evicted_per_master"] for r in runs
    }
    for r in runs:
        policy, per = r["maxmemory_policy"], r["evicted_per_master"]
        result.require(r["masters_holding_buckets"] == r["masters"], f"{policy}: the map's "
                       f"buckets were on {r['masters_holding_buckets']} of {r['masters']} "
                       "masters")  # fmt: skip
        if policy == "noeviction":
            result.require(not any(per), f"{policy}: masters evicted {per}")
        else:
            result.require(all(per), f"{policy}: a master evicted nothing: {per}")


__all__ = ["cluster_eviction_run", "s16_cluster", "spread_name"]
