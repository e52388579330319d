"""``ClusterTopology``: a Redis Cluster, its masters and which of them owns each hash slot.

The slot map comes from ``CLUSTER SHARDS`` (``CLUSTER SLOTS`` where a server has no SHARDS),
asked of any node that answers: the masters known last first, then the URL's nodes.  It is read
again when an executor reports a redirect (``MOVED``: :meth:`ClusterTopology.moved` applies the
hint at once and marks the map stale) or a lost connection (:meth:`invalidate`).  Every change of
an owner bumps :attr:`generation` and tells the listeners (``on_change``), so the sharded
subscribers move their subscriptions (``feed/sharded.py``).

URLs::

    redis+cluster://[user:password@]h1:7000,h2:7001[?options]      TCP
    rediss+cluster://...                                           TLS to every node

The options are those of ``redis://`` (``socket_timeout``, ``ssl_*``, ...); a Cluster has one
database, so there is no ``/db``.  A user's ``redis.cluster.RedisCluster`` gives its startup
nodes and connection settings (public attributes only).

Each master gets one :class:`NodeTopology`, a one-node topology the per-node executors
(``clusterexec.py``) connect through; its ``invalidate`` (a connection failure) marks the
cluster's map stale, so the next call routes by a fresh one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import unquote

import redis
from redis.crc import key_slot

from .. import forksafe
from ..errors import ConfigurationError, StoreUnavailable
from .endpoint import (
    TLS_ADVICE,
    URL_OPTIONS,
    Endpoint,
    bad_url,
    host_port,
    seconds_option,
    tls_failed,
    tls_from_query,
    url_query,
)
from .executor import AsyncPooledExecutor, PooledExecutor
from .slotmap import SLOTS, read_slot_map
from .topology import Interned, Listener, NodeExecutors, shared_executor


def slot_for(key: str | bytes) -> int:
    """The hash slot of ``key`` (its ``{hash tag}`` when it has one), as Redis computes it."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


class NodeTopology(NodeExecutors):
    """One master of a cluster, as a topology of its own for the per-node executors."""

    kind: Literal["standalone"] = "standalone"
    sharded = False

    def __init__(self, cluster: ClusterTopology, endpoint: Endpoint) -> None:
        self.cluster = cluster
        self._endpoint = endpoint
        self._generation = 0

    @property
    def where(self) -> str:
        return f"redis cluster node {self._endpoint.address}"

    @property
    def key(self) -> tuple[Any, ...]:
        return ("cluster-node", *self._endpoint.key)

    @property
    def generation(self) -> int:
        return self._generation

    def endpoint(self) -> Endpoint:
        return self._endpoint

    def invalidate(self) -> None:
        """A connection to this node failed: drop its idle connections, re-read the slot map
        (asking this node last: it may be gone, and a silent one costs a connect timeout)."""
        self._generation += 1
        self.cluster.invalidate(suspect=self._endpoint.address)

    def on_change(self, listener: Listener) -> None:
        self.cluster.on_change(listener)

    def remove_listener(self, listener: Listener) -> None:
        self.cluster.remove_listener(listener)


class ClusterTopology:
    """A Redis Cluster reached through ``startup`` nodes; see the module docstring."""

    kind: Literal["cluster"] = "cluster"
    sharded = True

    def __init__(self, startup: Sequence[Endpoint]) -> None:
        if not startup:
            raise ConfigurationError("a Redis Cluster URL needs at least one node")
        self.startup = list(startup)
        self._template = startup[0]
        self._reset()
        forksafe.register(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # guards the fields below
        self._refreshing = threading.Lock()  # one refresh at a time (it does I/O)
        self._owners: list[str | None] = [None] * SLOTS  # slot -> master address
        self._nodes: dict[str, NodeTopology] = {}
        self._replicas: dict[str, list[str]] = {}  # master address -> its replicas' addresses
        self._stale = True
        # Nodes a connection to failed, asked last until one answers a slot-map read.
        self._suspects: set[str] = set()
        self._generation = 0
        self._listeners: list[Listener] = []
        self.read_at = -float("inf")  # monotonic time the slot map was last read (installed)

    def _after_fork_in_child(self) -> None:
        self._reset()  # the parent's listeners are not the child's; re-read on first use

    # ---- the Topology protocol ----------------------------------------------------------------

    @property
    def where(self) -> str:
        return f"redis cluster {','.join(e.address for e in self.startup)}"

    @property
    def key(self) -> tuple[Any, ...]:
        return ("cluster", tuple(sorted(e.address for e in self.startup)), self._template.key[3:])

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def stale(self) -> bool:
        """The slot map must be read again before the next routing (blocking I/O)."""
        return self._stale or not self._nodes

    def endpoint(self) -> Endpoint:
        """Some master that answers (for what needs one connection to any node: lock waiters'
        plain pub/sub, which a Cluster broadcasts to every node)."""
        return self.node(self.any_master()).endpoint()

    def invalidate(self, suspect: str | None = None) -> None:
        """Read the slot map again before the next routing (``suspect``: a node a connection
        to just failed, asked last)."""
        with self._lock:
            self._stale = True
            if suspect is not None:
                self._suspects.add(suspect)

    def suspected(self, address: str) -> bool:
        """Whether a connection to ``address`` failed and it has not answered a slot-map read
        since (a hung or lost master)."""
        with self._lock:
            return address in self._suspects

    def executor(self, *, timeout: float | None = None,
                 deadline: float | None = None) -> PooledExecutor:  # fmt: skip
        from .clusterexec import ClusterExecutor  # noqa: PLC0415 - it imports this module

        return ClusterExecutor(self, timeout=timeout, deadline=deadline)

    def async_executor(self, *, timeout: float | None = None,
                       deadline: float | None = None) -> AsyncPooledExecutor:  # fmt: skip
        from .clusterexec import AsyncClusterExecutor  # noqa: PLC0415

        return AsyncClusterExecutor(self, timeout=timeout, deadline=deadline)

    def shared_executor(self, timeout: float | None = None,
                        deadline: float | None = None) -> PooledExecutor:  # fmt: skip
        return shared_executor(self, timeout, deadline)

    def on_change(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    # ---- routing ------------------------------------------------------------------------------

    def owner(self, slot: int) -> str:
        """The address of the master that owns ``slot`` (the map read first if stale)."""
        if self._stale:
            self.refresh()
        address = self._owners[slot]
        if address is None:
            # A slot without a master (its master failed, a replica not yet promoted) says
            # nothing lasting: read the map again now, and on every call until one is named.
            # Without this the map, not stale, stayed so until some other call lost a
            # connection or met a MOVED: a promoted replica went unseen (0.6-0.8 s in S24).
            self.invalidate()
            self.refresh()
            address = self._owners[slot]
            if address is None:
                self.invalidate()
                raise StoreUnavailable(
                    f"{self.where}: no master serves hash slot {slot} (the cluster is "
                    "reconfiguring or down); nothing ran: retry later"
                )
        return address

    def any_master(self) -> str:
        if self._stale or not self._nodes:
            self.refresh()
        for address in self._owners:
            if address is not None:
                return address
        raise StoreUnavailable(f"{self.where}: no master serves any slot; nothing ran")

    def masters(self) -> list[str]:
        """Every master that owns a slot now, in slot order."""
        if self._stale or not self._nodes:
            self.refresh()
        return list(dict.fromkeys(a for a in self._owners if a is not None))

    def node(self, address: str) -> NodeTopology:
        with self._lock:
            node = self._nodes.get(address)
            if node is None:
                host, _, port = address.rpartition(":")
                node = self._nodes[address] = NodeTopology(self, self._template.at(host, int(port)))
            return node

    def moved(self, slot: int, address: str) -> None:
        """A ``MOVED`` reply: route ``slot`` to ``address`` now, and re-read the whole map."""
        with self._lock:
            changed = self._owners[slot] != address
            self._owners[slot] = address
            self._stale = True
            if changed:
                self._generation += 1
        if changed:
            self._notify()

    def client(self, **overrides: Any) -> Any:
        """A redis-py ``RedisCluster`` on this cluster, for the command line's inspections
        (``syncmap doctor``, ``top``, ...): it routes each command by slot as our executors do.
        Typed ``Any``: it offers the commands of ``redis.Redis`` that those use."""
        from redis.cluster import ClusterNode, RedisCluster  # noqa: PLC0415

        t = self._template
        kwargs: dict[str, Any] = {
            "username": t.username, "password": t.password, "socket_timeout": t.socket_timeout,
            "socket_connect_timeout": t.connect_timeout,
        }  # fmt: skip
        if t.tls is not None:
            kwargs.update(ssl=True, **t.tls.kwargs())
        kwargs.update(overrides)
        nodes = [ClusterNode(e.host, e.port) for e in self.startup]  # type: ignore[no-untyped-call]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def describe(self) -> dict[str, Any]:
        """The masters, their slot ranges and replicas (``syncmap doctor``)."""
        self.refresh()
        ranges: dict[str, list[tuple[int, int]]] = {}
        start = 0
        for slot in range(1, SLOTS + 1):
            if slot == SLOTS or self._owners[slot] != self._owners[start]:
                owner = self._owners[start]
                if owner is not None:
                    ranges.setdefault(owner, []).append((start, slot - 1))
                start = slot
        return {address: {"slots": r, "replicas": self._replicas.get(address, [])}
                for address, r in ranges.items()}  # fmt: skip

    # ---- reading the slot map -----------------------------------------------------------------

    def refresh(self) -> None:
        """Read the slot map from the first node that answers; tell listeners if owners moved."""
        with self._refreshing:
            if not self._stale and self._nodes:
                return  # another thread just read it
            known = list(dict.fromkeys(
                [a for a in self._owners if a is not None] + [e.address for e in self.startup]
            ))  # fmt: skip
            with self._lock:
                suspects = set(self._suspects)
            candidates = sorted(known, key=lambda a: a in suspects)  # stable: suspects last
            errors: list[tuple[str, Exception]] = []
            for address in candidates:
                try:
                    owners, replicas = read_slot_map(self.node(address).endpoint())
                except (redis.RedisError, OSError, ValueError) as exc:
                    errors.append((address, exc))
                    with self._lock:
                        self._suspects.add(address)
                    continue
                self._install(owners, replicas)
                # A suspect stays one until it answers: a read that another node answered
                # says nothing of it.  Order this prevents: a hung master is a suspect; a read
                # answered by another node cleared it; the next invalidation without a suspect
                # (the sharded subscriber's, a redirect) put it back first in slot order, and
                # that read waited REFRESH_TIMEOUT (1 s) on it, holding every call routed
                # after it, the probes included (S27-cluster: a call blocked 1.17 s).
                with self._lock:
                    self._suspects.discard(address)
                return
            raise self._no_slot_map(errors)

    def _no_slot_map(self, errors: list[tuple[str, Exception]]) -> StoreUnavailable:
        # The advice first: the nodes' errors are cut at 400 characters.
        advice = "Check that the cluster runs and the URL names its nodes"
        if any(tls_failed(exc) for _, exc in errors):
            advice = TLS_ADVICE
        elif errors and all("cluster support disabled" in str(exc) for _, exc in errors):
            advice = "These servers are not in cluster mode: for one Redis use redis://host:port"
        details = "; ".join(f"{address}: {exc}" for address, exc in errors)[:400]
        return StoreUnavailable(
            f"{self.where}: no node told the slot map; nothing ran. {advice}. ({details})"
        )

    def _install(self, owners: list[str | None], replicas: dict[str, list[str]]) -> None:
        with self._lock:
            changed = owners != self._owners
            self._owners, self._replicas, self._stale = owners, replicas, False
            self.read_at = time.monotonic()
            for address in set(owners):
                if address is not None and address not in self._nodes:
                    host, _, port = address.rpartition(":")
                    self._nodes[address] = NodeTopology(self, self._template.at(host, int(port)))
            if changed:
                self._generation += 1
        if changed:
            self._notify()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener()
            except Exception:  # one listener's failure is its own
                logging.getLogger("syncmap").exception("syncmap: a topology listener failed")

    def __repr__(self) -> str:
        return f"<ClusterTopology {self.where}>"


# ---- opening --------------------------------------------------------------------------------

_registry: Interned[ClusterTopology] = Interned()


def _intern(topology: ClusterTopology) -> ClusterTopology:
    # One topology (one slot map, one set of listeners) per cluster and settings per process.
    return _registry.intern(topology, topology.key)


def invalidate_all() -> None:
    """Read the slot map again before the next routing, in every Cluster topology of this
    process: a node now announces another address (``testing.clusterproxy``), which a topology
    would otherwise learn from its first call to the old one failing."""
    for topology in _registry.all():
        topology.invalidate()


def is_cluster_client(client: object) -> bool:
    return isinstance(client, redis.cluster.RedisCluster)


def from_client(client: Any, timeout: float | None) -> ClusterTopology:
    """The topology of a user's ``redis.cluster.RedisCluster`` (public attributes only)."""
    nodes = client.get_nodes() or client.nodes_manager.startup_nodes.values()
    startup = []
    for node in nodes:
        endpoint = Endpoint.from_client(node.redis_connection)
        if endpoint.socket_timeout is None:
            endpoint = endpoint.with_timeout(timeout)
        startup.append(endpoint.at(node.host, node.port))
    return _intern(ClusterTopology(startup))


def from_url(url: str, timeout: float | None) -> ClusterTopology:
    """``redis+cluster://[user:pass@]h1:7000,h2:7001[?options]`` (module docstring)."""
    scheme, _, rest = url.partition("://")
    tls = scheme.lower() == "rediss+cluster"
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise bad_url(url, "a Redis Cluster has one database: drop the /db part")
    userinfo, at, hosts = netloc.rpartition("@")
    query = url_query(url, query_text, URL_OPTIONS)
    if not tls and any(k.startswith("ssl_") for k in query):
        raise bad_url(url, "ssl_* options need rediss+cluster:// (TLS)")
    user, has_password, password = userinfo.partition(":")
    template = Endpoint(
        username=(unquote(user) or None) if at else None,
        password=unquote(password) if at and has_password else None,
        tls=tls_from_query(url, query) if tls else None,
        socket_timeout=seconds_option(url, query, "socket_timeout", timeout),
        connect_timeout=seconds_option(url, query, "socket_connect_timeout", timeout),
    )
    startup = [template.at(*host_port(url, h, 6379, "node")) for h in hosts.split(",") if h.strip()]
    if not startup:
        raise bad_url(url, "name the cluster's nodes: redis+cluster://h1:7000,h2:7001")
    return _intern(ClusterTopology(startup))
