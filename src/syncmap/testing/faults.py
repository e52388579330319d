"""Server-side faults, injected through an admin connection to a real Redis.

These complement :class:`~syncmap.testing.proxy.FaultProxy`: the proxy breaks the network, these
make Redis itself drop clients, stop serving writes, or overflow a subscriber's output buffer.

On a Redis Cluster there is no one node to fault: :func:`master_clients` gives every master
(each holds some buckets of every map, and the subscribers of those buckets' channels), and
:func:`admin_client` the master of one key's slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import redis

from ..errors import ConfigurationError
from ..store.cluster import ClusterTopology, slot_for
from ..store.topology import open_topology

SENTINEL_LINK = "sentinel-"
"""Prefix of the names a Sentinel gives its connections to a data node (``sentinel-<id>-cmd``,
``sentinel-<id>-pubsub``: the latter subscribes to ``__sentinel__:hello``)."""


def admin_client(url: str, timeout: float = 10.0, *, key: str | None = None,
                 **kw: Any) -> redis.Redis:  # fmt: skip
    """A client of the node ``url`` names now, for setting up, faulting and cleaning up: any
    URL form a map takes (``redis+sentinel://``: the master the Sentinels name, found as a map
    finds it; ``redis.Redis.from_url`` refuses that scheme).  On a Redis Cluster, the master
    that owns ``key``'s slot now (required there: any other node answers MOVED).  The caller
    closes it."""
    topology = open_topology(url, timeout=timeout)
    if not isinstance(topology, ClusterTopology):
        return topology.endpoint().client(**kw)
    if key is None:
        raise ConfigurationError(
            f"{topology.where} has no one node to administer: pass key= (its slot's master) "
            "or use master_clients(url) (every master)"
        )
    topology.invalidate()  # the owner now, not as this process last saw it
    return topology.node(topology.owner(slot_for(key))).endpoint().client(**kw)


def master_clients(url: str, timeout: float = 10.0, **kw: Any) -> list[redis.Redis]:
    """A client of every master that takes writes now: the one node of a standalone or
    Sentinel URL, every master that owns slots on a Redis Cluster.  The caller closes them."""
    topology = open_topology(url, timeout=timeout)
    if not isinstance(topology, ClusterTopology):
        return [topology.endpoint().client(**kw)]
    topology.invalidate()
    return [topology.node(a).endpoint().client(**kw) for a in topology.masters()]


def delete_matching(url: str, patterns: Iterable[str]) -> int:
    """Delete every key that matches one of ``patterns`` (SCAN on every master); returns how
    many.  One ``DEL`` per key, pipelined: a Cluster refuses a ``DEL`` of keys in two slots
    (``CROSSSLOT``), even on the master that holds both."""
    deleted = 0
    for client in master_clients(url):
        try:
            keys = {k for p in patterns for k in client.scan_iter(match=p, count=1000)}
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.delete(k)
            deleted += sum(int(n) for n in pipe.execute())
        finally:
            client.close()
    return deleted


def subscribers(admin: redis.Redis) -> list[dict[str, Any]]:
    """The pub/sub clients of ``admin``'s node (``CLIENT LIST``), but a Sentinel's own hello
    link: it is not a map's feed, and a scenario counting or cutting feeds must leave it out."""
    return [
        c
        for c in admin.client_list()
        if "P" in c.get("flags", "") and not str(c.get("name", "")).startswith(SENTINEL_LINK)
    ]


def kill_subscribers(admin: redis.Redis) -> int:
    """Disconnect every pub/sub client of :func:`subscribers` (on a standalone server: every
    one, as ``client_kill(admin, "pubsub")``); returns how many were killed."""
    return sum(int(admin.client_kill_filter(_id=c["id"])) for c in subscribers(admin))


def client_kill(admin: redis.Redis, type: Literal["normal", "pubsub"], skip_me: bool = True) -> int:
    """Disconnect every client of *type*; returns how many were killed.

    ``skip_me`` spares *admin*'s own connection, so the caller can keep using it.
    """
    return int(admin.client_kill_filter(_type=type, skipme=skip_me))


def client_pause(admin: redis.Redis, ms: int, mode: Literal["WRITE", "ALL"] = "WRITE") -> None:
    """Hold clients' commands for *ms* milliseconds (only writes with ``WRITE``; Redis >= 6.2)."""
    admin.client_pause(ms, all=mode == "ALL")


def set_pubsub_output_limit(admin: redis.Redis, hard: int, soft: int, seconds: int) -> None:
    """Make Redis drop subscribers whose unread output exceeds the limits.

    *hard* bytes disconnects at once; *soft* bytes held for *seconds* disconnects too.
    """
    admin.config_set("client-output-buffer-limit", f"pubsub {hard} {soft} {seconds}")


def flushall(admin: redis.Redis) -> None:
    """Delete every key in every database."""
    admin.flushall()


__all__ = [
    "SENTINEL_LINK",
    "admin_client",
    "client_kill",
    "client_pause",
    "delete_matching",
    "flushall",
    "kill_subscribers",
    "master_clients",
    "set_pubsub_output_limit",
    "subscribers",
]
