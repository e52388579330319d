"""Which Redis node(s) a map talks to: ``Standalone``, ``Sentinel`` or ``Cluster``, from a URL or
a client.

A :class:`Topology` names the node to connect to now (:meth:`~Topology.endpoint`), makes
executors that follow it (:meth:`~Topology.executor`), and tells listeners when it changes
(:meth:`~Topology.on_change`: the shared subscriber and the stream readers reconnect).

URLs (:func:`open_topology`; ``SYNCMAP_URL`` when neither a URL nor a client is given)::

    redis://[user:password@]host[:port][/db][?options]        one node
    rediss://...                                              one node, TLS
    unix:///path/to/redis.sock[?db=N&options]                 one node, Unix socket
    redis+sentinel://[user:password@]h1:26379,h2:26379/<service>[/<db>][?options]
    rediss+sentinel://...                                     TLS to the master and sentinels
    redis+cluster://[user:password@]h1:7000,h2:7001[?options]  a Redis Cluster (cluster.py)
    rediss+cluster://...                                      TLS to every node

Options of every form: ``socket_timeout``, ``socket_connect_timeout`` (seconds, for the data
connections); TLS: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``
(none|optional|required), ``ssl_check_hostname`` (true|false).  Sentinel only (see
``sentinel.py`` and docs/deploying.md §Sentinel):

* ``user:password@`` authenticates to the **master** (the data node, as in ``redis://``);
* ``sentinel_username``, ``sentinel_password``: the **sentinels'** own credentials (sentinels
  usually run without any: ``requirepass`` in sentinel.conf);
* ``sentinel_timeout``: seconds for one sentinel to answer (default 0.5);
* with ``rediss+sentinel://`` the same TLS options apply to the sentinels as to the master.

A user's ``redis.Redis`` becomes ``Standalone``, unless its pool is redis-py's
``SentinelConnectionPool`` (``Sentinel(...).master_for(service)``): then a Sentinel topology
of that service, its sentinels and its credentials (public attributes only).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Generic, Literal, Protocol, TypeVar

import redis

from .. import forksafe
from ..errors import ConfigurationError
from .anode import AsyncNodeExecutor
from .endpoint import Endpoint, bad_url
from .executor import AsyncPooledExecutor, PooledExecutor
from .node import NodeExecutor

Listener = Callable[[], None]
T = TypeVar("T")


class Topology(Protocol):
    """Where a map's Redis is, now and after a failover."""

    @property
    def kind(self) -> Literal["standalone", "sentinel", "cluster"]: ...

    @property
    def sharded(self) -> bool: ...  # Cluster: per-bucket channels, SSUBSCRIBE per node

    @property
    def where(self) -> str: ...  # for messages (never a password)

    @property
    def key(self) -> tuple[Any, ...]: ...  # identity for per-process registries

    @property
    def generation(self) -> int: ...  # bumped whenever the named node (may have) changed

    def endpoint(self) -> Endpoint: ...

    def invalidate(self) -> None: ...

    def executor(self, *, timeout: float | None = None, deadline: float | None = None
                 ) -> PooledExecutor: ...  # fmt: skip

    def shared_executor(self, timeout: float | None = None, deadline: float | None = None
                        ) -> PooledExecutor: ...  # fmt: skip

    def async_executor(self, *, timeout: float | None = None, deadline: float | None = None
                       ) -> AsyncPooledExecutor: ...  # fmt: skip

    def on_change(self, listener: Listener) -> None: ...

    def remove_listener(self, listener: Listener) -> None: ...


class NodeExecutors:
    """The executors of a topology that names one node at a time (Standalone, Sentinel): they
    ask it for the node's endpoint when they connect."""

    def executor(self: Topology, *, timeout: float | None = None,
                 deadline: float | None = None) -> PooledExecutor:  # fmt: skip
        return NodeExecutor(self, timeout=timeout, deadline=deadline)

    def async_executor(self: Topology, *, timeout: float | None = None,
                       deadline: float | None = None) -> AsyncPooledExecutor:  # fmt: skip
        return AsyncNodeExecutor(self, timeout=timeout, deadline=deadline)

    def shared_executor(self: Topology, timeout: float | None = None,
                        deadline: float | None = None) -> PooledExecutor:  # fmt: skip
        return shared_executor(self, timeout, deadline)


class Standalone(NodeExecutors):
    """One node, always the same: nothing to resolve, nothing ever changes."""

    kind: Literal["standalone"] = "standalone"
    sharded = False
    generation = 0

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint

    @property
    def where(self) -> str:
        return self._endpoint.where

    @property
    def key(self) -> tuple[Any, ...]:
        return ("standalone", *self._endpoint.key)

    def endpoint(self) -> Endpoint:
        return self._endpoint

    def invalidate(self) -> None:
        """Nothing to re-resolve: the next connection goes to the same address."""

    def on_change(self, listener: Listener) -> None:
        """A standalone node never changes: the listener is never called."""

    def remove_listener(self, listener: Listener) -> None:
        pass

    def __repr__(self) -> str:
        return f"<Standalone {self.where}>"


# ---- shared executors ------------------------------------------------------------------------

_shared: dict[tuple[Any, ...], PooledExecutor] = {}
_shared_lock = threading.Lock()


@forksafe.at_fork
def _fresh_shared_lock() -> None:
    global _shared_lock
    _shared_lock = threading.Lock()  # a parent's thread may have held it at the fork


_users: dict[tuple[Any, ...], int] = {}


def shared_executor(topology: Topology, timeout: float | None = None,
                    deadline: float | None = None) -> PooledExecutor:  # fmt: skip
    """One executor (one small pool of connections) per topology, timeout and call deadline in
    this process.

    ``users.lock(key)`` makes a Lock per call; each must not open a connection of its own.  The
    maps of a process use it too (:func:`use_executor`): ten idle maps held ten connections of
    their own besides the subscriber's (issue 16 goal 1: at most two per process and node)."""
    return _shared_executor(topology, timeout, deadline, users=0)


def use_executor(topology: Topology, timeout: float | None, deadline: float | None
                 ) -> PooledExecutor:  # fmt: skip
    """:func:`shared_executor`, counted: a map takes it at open and gives it back at close
    (:func:`done_with_executor`), and the last map to give it back closes its idle connections,
    as a map's own executor was closed with it.  Its pool grows only with the calls in flight at
    once (an executor takes an idle connection or makes one per call), so maps that share it
    idle on one connection."""
    return _shared_executor(topology, timeout, deadline, users=1)


def _shared_executor(topology: Topology, timeout: float | None, deadline: float | None, *,
                     users: int) -> PooledExecutor:  # fmt: skip
    key = (topology.key, timeout, deadline)
    with _shared_lock:
        executor = _shared.get(key)
        if executor is None:
            executor = _shared[key] = topology.executor(timeout=timeout, deadline=deadline)
        if users:
            _users[key] = _users.get(key, 0) + users
        return executor


def done_with_executor(topology: Topology, timeout: float | None, deadline: float | None) -> None:
    """A map closed: when no map of this process uses the executor any more, its idle
    connections are closed (it stays registered: a lock or a feed may hold it, and a call
    simply connects again)."""
    key = (topology.key, timeout, deadline)
    with _shared_lock:
        left = _users.get(key, 0) - 1
        if left > 0:
            _users[key] = left
            return
        _users.pop(key, None)
        executor = _shared.get(key)
    if executor is not None:
        executor.close()


# ---- one topology per key and process ---------------------------------------------------------


class Interned(Generic[T]):
    """A per-process registry of topologies by ``key`` (Sentinel, Cluster): one slot map or one
    watcher, one set of listeners, whoever opens it.  Emptied in a forked child."""

    def __init__(self) -> None:
        self._items: dict[tuple[Any, ...], T] = {}
        self._lock = threading.Lock()
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        self._items = {}
        self._lock = threading.Lock()  # a parent's thread may have held it at the fork

    def intern(self, topology: T, key: tuple[Any, ...]) -> T:
        with self._lock:
            return self._items.setdefault(key, topology)

    def all(self) -> list[T]:
        with self._lock:
            return list(self._items.values())

    def forget(self, topology: T, key: tuple[Any, ...]) -> None:
        with self._lock:
            if self._items.get(key) is topology:
                del self._items[key]


# ---- opening ---------------------------------------------------------------------------------


def open_topology(
    url: str | None = None, client: redis.Redis | Any | None = None, *, timeout: float | None = 5.0
) -> Topology:
    """The topology of ``client``, else of ``url``, else of ``$SYNCMAP_URL`` (module docstring).

    ``timeout`` is the data connections' socket timeout when the URL or client sets none."""
    from . import cluster, sentinel  # noqa: PLC0415 - they import this module

    if client is not None:
        if cluster.is_cluster_client(client):
            return cluster.from_client(client, timeout)
        if sentinel.is_sentinel_client(client):
            return sentinel.from_client(client, timeout)
        endpoint = Endpoint.from_client(client)
        if endpoint.socket_timeout is None:
            endpoint = endpoint.with_timeout(timeout)
        return Standalone(endpoint)
    url = url or os.environ.get("SYNCMAP_URL")
    if not url:
        raise ConfigurationError(
            "no Redis given: pass url='redis://host:6379/0' or redis=<redis.Redis>, or set "
            "SYNCMAP_URL (syncmap.embedded.EmbeddedRedis starts a local one)"
        )
    if not isinstance(url, str):
        raise ConfigurationError(f"url={url!r}: pass the Redis URL as a str")
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis+sentinel", "rediss+sentinel"):
        return sentinel.from_url(url, timeout)
    if scheme in ("redis+cluster", "rediss+cluster"):
        return cluster.from_url(url, timeout)
    if "://" not in url:
        raise bad_url(url, "use redis://host:6379/0 (or rediss://, unix://, redis+sentinel://, "
                           "redis+cluster://)")  # fmt: skip
    return Standalone(Endpoint.from_url(url, timeout))
