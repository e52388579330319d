"""Sharded pub/sub on a :class:`~syncmap.testing.clusterset.ClusterSet`, seen from the servers:
for the sharded subscriber tests (thread and asyncio).  Every call is blocking (the asyncio tests
run them off the loop)."""

from __future__ import annotations

from .clusternode import ClusterNodeProcess
from .clusterset import ClusterSet


def address(node: ClusterNodeProcess) -> str:
    """``host:port``, as the topology names the node."""
    return f"{node.host}:{node.port}"


def channel_on(cluster: ClusterSet, master: ClusterNodeProcess, prefix: str) -> str:
    """A channel ``prefix:<n>`` whose slot ``master`` serves now."""
    ranges = [(s, e) for s, e, m, _ in cluster.slot_map() if m == master.node_id]
    for i in range(10_000):
        slot = cluster.slot_of(name := f"{prefix}:{i}")
        if any(s <= slot <= e for s, e in ranges):
            return name
    raise LookupError(f"no channel of {prefix!r} on {master!r}")


def spublish(cluster: ClusterSet, channel: str, data: bytes) -> int:
    """SPUBLISH on the channel's master now: how many subscribers got it."""
    with cluster.master_for_slot(cluster.slot_of(channel)).client() as c:
        return int(c.execute_command("SPUBLISH", channel, data))


def pubsub_clients(node: ClusterNodeProcess) -> int:
    """How many pub/sub connections ``node`` has."""
    with node.client() as c:
        return len(c.execute_command("CLIENT", "LIST", "TYPE", "pubsub").splitlines())
