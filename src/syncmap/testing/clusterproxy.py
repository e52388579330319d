"""A :class:`~syncmap.testing.proxy.FaultProxy` in front of one master of a Redis Cluster, for
the scenarios that fault one master's network path (S05-cluster, S08-cluster).

A cluster client does not choose the address it talks to: it reads every master's address from
the slot map (``CLUSTER SHARDS`` / ``CLUSTER SLOTS``), so a proxy the client is merely pointed
at would be bypassed after the first read.  The master is therefore told to *announce* the
proxy's port (``CONFIG SET cluster-announce-port``; with ``tls-cluster``, the TLS port is the
one the cluster uses and ``cluster-announce-tls-port`` is set instead).  Redis then gossips the
proxy's port as the node's port; every node's slot map names it; every client of that master,
data path and sharded subscriber alike, connects through the proxy; and so does the master's
replica, which reconnects to the announced address as soon as it hears of it.  The cluster bus
is not touched: its port is announced apart (``port + 10000`` unless
``cluster-announce-bus-port`` says otherwise), so gossip and failover detection go direct.

What goes through the proxy can be told apart there (``proxy.py``, Scopes): connections that
sent ``SSUBSCRIBE`` are the subscribers; everything else is a data path or replication.

:func:`announced_proxy` waits until the announcement is everywhere before it yields, and undoes
it afterwards (every node names the real port again, the replicas are linked to it) before it
closes the proxy, so a shared cluster is left as it was found.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import ConfigurationError
from ..store.cluster import invalidate_all
from .clusternode import ClusterNodeProcess, parse_cluster_nodes, text
from .clusterset import ClusterSet, Target
from .proxy import FaultProxy


@dataclass(frozen=True, slots=True)
class Announced:
    """What :func:`announced_proxy` checked before it yielded."""

    node: ClusterNodeProcess
    proxy: FaultProxy
    seconds: float  # from CONFIG SET until every node and every replica followed
    replicas_through_proxy: int  # replicas whose replication link runs through the proxy


def _setting(node: ClusterNodeProcess) -> str:
    return "cluster-announce-tls-port" if node.tls is not None else "cluster-announce-port"


def _announced_everywhere(cs: ClusterSet, node: ClusterNodeProcess, port: int) -> str | None:
    """None when every live node names ``node`` at ``port`` and each of its replicas is linked
    to that port; else what is not so yet."""
    for peer in cs._live():
        view = parse_cluster_nodes(cs._run(peer, "CLUSTER", "NODES"))
        seen = next((n.port for n in view if n.node_id == node.node_id), None)
        if seen != port:
            return f"{peer!r} names {node!r} at port {seen}, not {port}"
    for replica in cs.replicas_of(node):
        info = cs._probe(replica).info("replication")
        if int(info.get("master_port", 0)) != port or info.get("master_link_status") != "up":
            return f"{replica!r} is not linked to {node!r} at port {port} yet"
    return cs._settled()


def announce(cs: ClusterSet, target: Target, port: int, timeout: float = 15.0, *,
             tell_topologies: bool = True) -> float:  # fmt: skip
    """Make ``target`` announce ``port`` (0: its own again) and wait until the cluster follows
    (every node's view, every replica's link, the cluster settled); the seconds it took.
    ``tell_topologies=False``: this process's topologies are left to find out by themselves,
    as a client of a real cluster whose master moved would (test_cluster_executor.py)."""
    node = cs.server(target)
    begun = time.monotonic()
    cs._run(node, "CONFIG", "SET", _setting(node), port)
    real = node.cluster_port if port == 0 else port
    cs._until(lambda: _announced_everywhere(cs, node, real), begun + timeout,
              f"{node!r} announcing port {real}")  # fmt: skip
    # This process's topologies of the cluster (one per URL and settings, shared by the maps
    # opened here) keep the node's old address until a call to it fails: without this, a map
    # opened next would bypass a fresh proxy, or fail its first call against a closed one.
    if tell_topologies:
        invalidate_all()
    return time.monotonic() - begun


@contextlib.contextmanager
def announced_proxy(cs: ClusterSet, target: Target) -> Iterator[Announced]:
    """A FaultProxy in front of the master ``target``, which announces the proxy's port for the
    ``with`` block (module docstring).  Yields once every node names the proxy's port, the
    master's replicas replicate through it, and the cluster is settled; afterwards the real port
    is announced again (and waited for) before the proxy closes."""
    node = cs.server(target)
    port = node.tls_port if node.tls is not None else node.port
    with FaultProxy(node.host, port) as proxy:
        try:
            seconds = announce(cs, node, proxy.port)
            through = proxy.connections  # only replication has connected by now
            yield Announced(node, proxy, seconds, min(through, len(cs.replicas_of(node))))
        finally:
            proxy.heal()
            with contextlib.suppress(ConfigurationError):  # a node that died meanwhile
                announce(cs, node, 0)


def replication_works(cs: ClusterSet, node: ClusterNodeProcess, key: str) -> bool:
    """A write to ``key`` (which must be in a slot of ``node``) confirmed by ``WAIT 1``: the
    replication link (through the proxy, when one is announced) carries writes."""
    client = cs.node_client(node, socket_timeout=5.0)
    try:
        client.set(key, "replicated?")
        confirmed = int(client.execute_command("WAIT", 1, 2000))  # type: ignore[no-untyped-call]
        client.delete(key)
        return confirmed >= 1
    finally:
        client.close()


def cluster_ok(cs: ClusterSet) -> bool:
    """Every live node says ``cluster_state:ok`` (the bus carries gossip)."""
    for node in cs._live():
        state = text(cs._run(node, "CLUSTER", "INFO")).split("\r\n", 1)[0]
        if state != "cluster_state:ok":
            return False
    return True


__all__ = ["Announced", "announce", "announced_proxy", "cluster_ok", "replication_works"]
