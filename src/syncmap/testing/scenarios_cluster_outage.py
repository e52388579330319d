"""S27-cluster ``outage-policy-cluster``: S27 (``scenarios_outage``) with one master of a 3-master
cluster black-holed, both ``on_store_down`` policies.

On a Cluster "the store is down" is, as a rule, *one shard* down: the other masters answer.  The
run checks both halves of that, per bucket:

* the **cut** master's buckets follow the policy exactly as S27's single store does (strict: no
  read stale beyond Δ, none flagged, reads raise ``StoreUnavailable`` within the call deadline;
  serve_stale: nothing beyond ``max_stale_age``, every read stale beyond Δ flagged and counted,
  none once Δ has passed since the heal; C3 after the writes stop);
* the **other** masters' buckets are served fresh throughout: no read fails, none is flagged
  stale, none is stale beyond Δ, no call outlasts the deadline.  One shard's outage must not
  take the other shards' buckets down.

How the cut is made.  The map (16 buckets) gets a name whose buckets fall on every master; the
keys are four of the cut master's buckets and two of each other master's.  A cluster client
learns each master's address from the slot map, so the cut master announces a
:class:`FaultProxy`'s port (``clusterproxy.announce``, as S05/S08-cluster do): the reader,
opened afterwards, reaches that master (data connections and its ``SSUBSCRIBE`` connection)
through the proxy only.  The writer must keep writing the cut master's buckets (else nothing
goes stale), so it is opened *before* the announcement on a URL naming one other master (a
topology of its own: topologies are shared per startup list), and the announcement is made
without telling this process's topologies; the writer's routes stay direct, which the run
checks (writes to the cut keys during the cut > 0).  The proxy black-holes everything (no FIN,
no RST) for ``max_stale_age`` + 1 s; the cluster bus is not proxied, so no failover starts.

Each round (one per policy; repeated while ``seconds`` last) opens a fresh reader on the one
writer's map with values tagged by round.  ``guard=False`` runs the serve_stale round with
``Guards.stale_bound`` off: the cut master's entries are then served past ``max_stale_age``,
which the sweep must catch.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigurationError
from ..map import SyncMap
from ..store.cluster import from_url
from .clusterload import BUCKETS, bucket_of_key, bucket_owners
from .clusternode import Addr, ClusterNodeProcess
from .clusterproxy import announce
from .clusterset import ClusterSet
from .faults import delete_matching
from .proxy import FaultProxy
from .scenario import ANOMALIES, Env, ScenarioResult, finish, scenario, timed
from .scenarios_cluster_feed import _cluster
from .scenarios_eviction_cluster import spread_name
from .scenarios_outage import (
    AFTER,
    AGE,
    DEADLINE,
    DELTA,
    WARM,
    Load,
    _config,
    _figures,
    differs,
    judge,
    require,
)

CUT_KEYS, OTHER_KEYS_PER_MASTER = 4, 2
_ns = time.monotonic_ns


def pick_keys(cs: ClusterSet, name: str, victim: Addr) -> tuple[list[str], list[str]]:
    """Keys of map ``name`` in buckets of ``victim`` (four) and of each other master (two)."""
    owners = bucket_owners(cs, name)
    cut: list[str] = []
    other: dict[Addr, list[str]] = defaultdict(list)
    masters = len(cs.masters())
    for n in range(100_000):
        key, owner = f"k{n}", owners[bucket_of_key(f"k{n}")]
        mine = cut if owner == victim else other[owner]
        if len(mine) < (CUT_KEYS if owner == victim else OTHER_KEYS_PER_MASTER):
            mine.append(key)
        if len(cut) == CUT_KEYS and sum(map(len, other.values())) == 2 * (masters - 1):
            break
    return cut, [k for keys in other.values() for k in keys]


@contextlib.contextmanager
def _proxy_for_new_topologies(cs: ClusterSet, node: ClusterNodeProcess) -> Iterator[FaultProxy]:
    """A FaultProxy whose port ``node`` announces for the ``with`` block (as
    ``clusterproxy.announced_proxy``), except that this process's topologies are not told:
    those opened before (the writer's) keep routing to the real port."""
    with FaultProxy(node.host, node.port) as proxy:
        try:
            announce(cs, node, proxy.port, tell_topologies=False)
            yield proxy
        finally:
            proxy.heal()
            with contextlib.suppress(ConfigurationError):  # a node that died meanwhile
                announce(cs, node, 0)  # and every topology of this process told


Figures = dict[str, Any]


def _round(url: str, proxy: FaultProxy, writer: SyncMap, policy: str, guard: bool,
           keys: tuple[list[str], list[str]], tag: str) -> tuple[Figures, Figures]:  # fmt: skip
    """One round: (the cut master's keys' figures, the other masters' keys' figures)."""
    cut_keys, other_keys = keys
    # The reader's topology (this URL's, shared in this process) may predate the announcement.
    from_url(url, None).invalidate()
    with SyncMap(writer.name, url, node_id="reader", config=_config(policy, guard)) as reader:
        with Load(reader, writer, cut_keys + other_keys, [cut_keys, other_keys], tag) as load:
            subscribers = proxy.subscribers  # the reader's SSUBSCRIBE to the cut master
            time.sleep(WARM)  # load before the cut (a schedule, not a synchronisation)
            proxy.blackhole()
            cut = _ns()
            time.sleep(AGE + 1.0)  # the outage itself: its length is what is measured
            proxy.heal()
            healed = _ns()
            time.sleep(AFTER)
        time.sleep(DELTA + DEADLINE)  # quiet: waiting out a lease is the point (C3)
        diverged = [k for k in cut_keys + other_keys if differs(reader, writer, k)]
        on_cut = judge(policy, load.seen(cut_keys), reader, cut, healed,
                       [k for k in diverged if k in cut_keys])  # fmt: skip
        elsewhere = judge(policy, load.seen(other_keys), reader, cut, healed,
                          [k for k in diverged if k in other_keys])  # fmt: skip
    chosen = set(cut_keys)
    on_cut["writes_during_cut"] = sum(
        1 for op in load.ops if op.f == "write" and op.key in chosen and cut <= op.call_ns <= healed
    )
    on_cut["proxied_subscribers"] = subscribers
    return on_cut, elsewhere


def _require_fresh(result: ScenarioResult, f: dict[str, Any]) -> None:
    """The other masters' buckets during one master's outage: as if nothing happened."""
    p, need, seen = f["policy"], result.require, f["witnesses"]
    need(f["errors"] == 0, f"{p}: {f['errors']} reads of other masters' buckets failed")
    need(f["stale_flagged"] == 0,
         f"{p}: {f['stale_flagged']} reads of other masters' buckets flagged stale")  # fmt: skip
    need(f["unflagged_beyond_delta"] + f["beyond_max_age"] == 0,
         f"{p}: reads of other masters' buckets stale beyond Δ; {seen}")  # fmt: skip
    need(f["other_anomalies"] == 0, f"{p}: {f['other_anomalies']} C4-C6 anomalies (others)")
    need(not f["divergent"], f"{p}: other masters' entries differ after Δ: {f['divergent']}")
    need(
        f["longest_call_ms"] <= (2 * DEADLINE + 0.25) * 1000,
        f"{p}: a read of another master's bucket blocked {f['longest_call_ms']} ms",
    )
    need(f["reads"] > 0, f"{p}: no read of another master's bucket")


@scenario("S27-cluster", "outage-policy-cluster")
def s27_cluster(env: Env, seconds: float = 8.0, *, guard: bool = True,
                cluster: ClusterSet | None = None) -> ScenarioResult:  # fmt: skip
    """Rounds of both policies (serve_stale only with ``guard=False``) until ``seconds`` are
    used, each cutting one master for ``max_stale_age`` + 1 s; see the module.  ``cluster``: a
    settled cluster to run on (left as found), else a private one."""
    result, started = timed("S27-cluster", "outage-policy-cluster")
    policies = ("raise", "serve_stale") if guard else ("serve_stale",)
    cut_rounds: list[dict[str, Any]] = []
    other_rounds: list[dict[str, Any]] = []
    with _cluster(env, cluster) as cs:
        victim = cs.masters()[0]
        name = spread_name(cs, BUCKETS, prefix="s27c")
        keys = pick_keys(cs, name, victim.addr)
        direct = next(m for m in cs.masters() if m.addr != victim.addr)
        try:
            with SyncMap(name, f"redis+cluster://{direct.host}:{direct.port}",
                         node_id="writer") as writer:  # fmt: skip
                for key in keys[0] + keys[1]:  # every master's route known, direct, before
                    writer.get(key)
                with _proxy_for_new_topologies(cs, victim) as proxy:
                    while not cut_rounds or time.monotonic() - started < seconds:
                        for policy in policies:
                            tag = f"r{len(cut_rounds)}"
                            on_cut, elsewhere = _round(cs.url, proxy, writer, policy, guard,
                                                       keys, tag)  # fmt: skip
                            cut_rounds.append(on_cut)
                            other_rounds.append(elsewhere)
        finally:
            delete_matching(cs.url, [f"sm:{{{name}*"])
    staleness = [s for f in cut_rounds + other_rounds for s in f.pop("staleness_ms")]
    for on_cut, elsewhere in zip(cut_rounds, other_rounds, strict=True):
        require(result, on_cut)
        result.require(on_cut["writes_during_cut"] > 0, "the writer wrote none of the cut "
                       "master's keys during the cut: it went through the proxy too")  # fmt: skip
        result.require(on_cut["proxied_subscribers"] > 0,
                       "the reader's sharded subscriber did not go through the proxy")  # fmt: skip
        _require_fresh(result, elsewhere)
    _figures(result, cut_rounds, staleness, guard)
    fig = result.figures
    fig["ops"] += sum(f["reads"] for f in other_rounds)
    fig[ANOMALIES] += sum(f["unflagged_beyond_delta"] + f["beyond_max_age"] + f["other_anomalies"]
                          for f in other_rounds)  # fmt: skip
    fig["cut_writes_during_cut"] = sum(f["writes_during_cut"] for f in cut_rounds)
    for name_, figure in (("reads", "reads"), ("errors", "errors"), ("stale_flagged", "flagged"),
                          ("unflagged_beyond_delta", "beyond_delta")):  # fmt: skip
        fig[f"others_{figure}"] = sum(f[name_] for f in other_rounds)
    fig["others_longest_call_ms"] = max(f["longest_call_ms"] for f in other_rounds)
    fig["topology"] = "cluster"
    return finish(result, started)


__all__ = ["pick_keys", "s27_cluster"]
