"""``syncmap demo --cluster``: the demo's map spread over a 3-master Redis Cluster.

The demo starts a :class:`~syncmap.testing.clusterset.ClusterSet` (3 masters, a replica each, on
loopback ports) and gives every server process its ``redis+cluster://`` URL: the map's 16
buckets spread over the 3 masters, each bucket's changes on its own sharded channel.

With ``--chaos`` one shard fails over first: 1 s after every server is up, the master of the
map's bucket 0 is killed (SIGKILL) and the demo waits, without stopping its loop, until the
cluster names its replica as the slots' owner; then it restarts the old master in a thread (it
rejoins as the new master's replica) and prints the topology before and after.  The usual chaos
(pub/sub connections killed on every master, servers paused) follows in the time left.

Also here: what the demo asks of a Cluster's nodes through the admin ``RedisCluster`` (INFO
summed over the masters, ``CLIENT KILL TYPE pubsub`` on each master).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster

from ..keys import Layout
from ..testing.clusternode import ClusterNodeProcess
from ..testing.clusterset import ClusterSet
from .demo_server import MAP

NEEDS = 8.0  # seconds of run left to fit it: node timeout, election, restart, healing
KILL_AFTER = 1.0  # seconds after every server is up


def topology(cluster: ClusterSet) -> str:
    """One line: each master with its slot ranges and replicas, as the cluster says now."""
    by_master: dict[str, list[str]] = {}
    for start, end, master, _ in cluster.slot_map():
        by_master.setdefault(master, []).append(f"{start}-{end}")
    parts = []
    for master_id, ranges in by_master.items():
        node = cluster.server(master_id)
        replicas = ", ".join(_addr(r) for r in cluster.replicas_of(node)) or "no replica"
        parts.append(f"{_addr(node)} (slots {' '.join(ranges)}; replica {replicas})")
    return f"Redis Cluster, {len(parts)} masters: " + "; ".join(parts)


def _addr(node: ClusterNodeProcess) -> str:
    return f"{node.host}:{node.port}"


class ShardFailoverChaos:
    """One shard failover: kill the master of the map's bucket 0 once every server is up, watch
    its replica take over, restart the old master (it rejoins as a replica), tell what happened.

    :meth:`tick` never blocks on the failover: the demo's loop keeps reading the servers'
    reports meanwhile.  Only the restart thread uses the ClusterSet while it runs (the set is
    not thread-safe), so :meth:`tick` looks at nothing but that thread until it ends."""

    def __init__(self, cluster: ClusterSet) -> None:
        self.cluster = cluster
        self.slot = cluster.slot_of(Layout("sm", MAP, 16).data(0))
        self.old: ClusterNodeProcess | None = None
        self.paused_at = 0.0  # when the master was killed (the demo's ChaosEvent.at)
        self.promoted_at: float | None = None
        self._restart: threading.Thread | None = None
        self._restarted: list[float | BaseException] = []
        self.done = False

    def tick(self, up_at: float | None, run_end: float, say: Callable[[str], None]) -> Any:
        """Called often by the demo's loop; returns ``(what, promoted_at)`` once the replica
        serves the slots (a chaos event whose healing the demo then watches), else None."""
        now = time.monotonic()
        if self.done or up_at is None:
            return None
        if self.old is None:
            if now >= up_at + KILL_AFTER and now + NEEDS <= run_end:
                self._kill(now, say)
            return None
        if self.promoted_at is None:
            return self._promotion(now, say)
        self._rejoined(say)
        return None

    def _kill(self, now: float, say: Callable[[str], None]) -> None:
        say(f"chaos: topology before: {topology(self.cluster)}")
        self.old = self.cluster.master_for_slot(self.slot)
        self.paused_at = now
        self.old.kill()
        say(f"chaos: SIGKILL the master {_addr(self.old)} (it serves slot {self.slot}, the "
            f"map's bucket 0, and about a third of the map)")  # fmt: skip

    def _promotion(self, now: float, say: Callable[[str], None]) -> Any:
        assert self.old is not None
        try:
            new = self.cluster.master_for_slot(self.slot)
        except (LookupError, ConnectionError, redis.RedisError):
            return None  # no live node answered, or the slot is unassigned for a moment
        if new is self.old:
            return None
        self.promoted_at = now
        say(f"chaos: the cluster promoted its replica {_addr(new)} "
            f"{now - self.paused_at:.2f} s after the kill; restarting the old master")  # fmt: skip
        self._restart = threading.Thread(target=self._run_restart, args=(self.old,), daemon=True)
        self._restart.start()
        return (f"shard failover: SIGKILL the master {_addr(self.old)} until the cluster "
                f"promoted its replica {_addr(new)}", now)  # fmt: skip

    def _run_restart(self, old: ClusterNodeProcess) -> None:
        try:
            self._restarted.append(self.cluster.restart(old))
        except BaseException as exc:  # told by _rejoined, on the demo's thread
            self._restarted.append(exc)

    def _rejoined(self, say: Callable[[str], None]) -> None:
        assert self._restart is not None and self.old is not None
        if self._restart.is_alive():
            return
        self.done = True
        result = self._restarted[0] if self._restarted else RuntimeError("no result")
        if isinstance(result, BaseException):
            say(f"chaos: the old master {_addr(self.old)} did not rejoin: {result}")
            return
        say(f"chaos: the old master {_addr(self.old)} restarted and rejoined as a replica in "
            f"{result:.2f} s; topology after: {topology(self.cluster)}")  # fmt: skip

    def resume(self) -> None:
        """The demo is ending: let a restart under way finish (the set is closed next)."""
        if self._restart is not None:
            self._restart.join(timeout=35)
        self.done = True


def kill_subscribers(admin: Any, cluster: bool) -> int:
    """``CLIENT KILL TYPE pubsub``: on a Cluster on every master (each holds its buckets'
    sharded subscribers), the connections killed in all."""
    if not cluster:
        return int(admin.client_kill_filter(_type="pubsub"))
    killed = admin.client_kill_filter(_type="pubsub", target_nodes=RedisCluster.PRIMARIES)
    return sum(killed.values()) if isinstance(killed, dict) else int(killed)


def cluster_info(admin: Any) -> dict[str, Any]:
    """INFO of every master, summed: the store line's figures for a Cluster."""
    infos = admin.info(target_nodes=RedisCluster.PRIMARIES)
    if not isinstance(infos, dict) or "redis_version" in infos:  # one master answered
        infos = {"one": infos}
    masters = list(infos.values())
    return {
        "memory": _human(sum(int(i.get("used_memory", 0)) for i in masters)),
        "clients": sum(int(i.get("connected_clients", 0)) for i in masters),
        "ops": sum(int(i.get("instantaneous_ops_per_sec", 0)) for i in masters),
        "masters": len(masters),
    }


def _human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n}B"
