"""Server-side faults, injected through an admin connection to a real Redis.

These complement :class:`~syncmap.testing.proxy.FaultProxy`: the proxy breaks the network, these
make Redis itself drop clients, stop serving writes, or overflow a subscriber's output buffer.
"""

from __future__ import annotations

from typing import Any, Literal

import redis

from ..store.topology import open_topology

SENTINEL_LINK = "sentinel-"
"""Prefix of the names a Sentinel gives its connections to a data node (``sentinel-<id>-cmd``,
``sentinel-<id>-pubsub``: the latter subscribes to ``__sentinel__:hello``)."""


def admin_client(url: str, timeout: float = 10.0, **kw: Any) -> redis.Redis:
    """A client of the node ``url`` names now, for setting up, faulting and cleaning up: any
    URL form a map takes (``redis+sentinel://``: the master the Sentinels name, found as a map
    finds it; ``redis.Redis.from_url`` refuses that scheme).  The caller closes it."""
    return open_topology(url, timeout=timeout).endpoint().client(**kw)


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
    "flushall",
    "kill_subscribers",
    "set_pubsub_output_limit",
    "subscribers",
]
