"""S26-cluster ``fork-cluster``: S26 (``scenarios_fork``) with the maps on ``redis+cluster://``.

On a Cluster a map has one connection pool per master (``store/clusterexec.py``), a slot map
(``store/cluster.py``), and the process's sharded subscriber: one ``SSUBSCRIBE`` connection per
master with its reader threads and a mover thread (``feed/sharded.py``).  A forked child must
start each of them over.  The run is S26's, with "the server" read as "every master":

* the map (16 buckets) gets a fresh name whose buckets fall on every master, so each child
  reads, writes and increments on all three;
* each child asks ``CLIENT ID`` of every master through the map's own per-master executor
  before anything else; none may be a connection the parent had open at the fork (``CLIENT
  LIST`` of each master, taken after the forks and before any task);
* each child must have opened sharded subscriber connections of its own (``ssub`` > 0 in
  ``CLIENT LIST``) on every master (at least one per child that ran a task), and the parent's
  must still be open when the tasks are done;
* the locks are ``map.lock(key)`` locks (each in its key's bucket slot): the parent's is not the
  child's, the child's is renewed through four leases, and a write fenced with its token
  (checked in the write's own slot) is applied.

``guard=False`` forks with ``forksafe.enabled = False``, as S26's control: the run must fail.
"""

from __future__ import annotations

from typing import Any

from .clusterload import BUCKETS
from .clusterset import ClusterSet
from .faults import delete_matching
from .scenario import Env, ScenarioResult, finish, scenario, timed
from .scenarios_cluster_feed import _cluster
from .scenarios_eviction_cluster import spread_name
from .scenarios_fork import Servers, run_fork

# A task's 450 calls go to three masters on a cluster; at S26's 8 tasks a second a 13 s share
# of `syncmap torture --minutes 1` ran 61 s on 2 loaded cores.


@scenario("S26-cluster", "fork-cluster")
def s26_cluster(env: Env, seconds: float = 2.0, *, guard: bool = True, workers: int = 4,
                cluster: ClusterSet | None = None, **_: Any) -> ScenarioResult:  # fmt: skip
    """S26 on a 3 + 3 cluster (the module): a private one, or ``cluster`` (settled, and only
    this run's clients on it while it runs; the run's keys are deleted afterwards)."""
    result, started = timed("S26-cluster", "fork-cluster")
    with _cluster(env, cluster) as cs:
        name = spread_name(cs, BUCKETS, prefix="s26c")
        servers = Servers([(f"{m.host}:{m.port}", cs.node_client(m)) for m in cs.masters()])
        try:
            run_fork(result, cs.url, name, servers, seconds=seconds, workers=workers,
                     guard=guard, on_map=True, tasks_per_second=2.0)  # fmt: skip
        finally:
            servers.close()
            delete_matching(cs.url, [f"sm:{{{name}*"])
    result.figures["topology"] = "cluster"
    return finish(result, started)


__all__ = ["s26_cluster"]
