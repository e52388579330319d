"""Server-side faults, injected through an admin connection to a real Redis.

These complement :class:`~syncmap.testing.proxy.FaultProxy`: the proxy breaks the network, these
make Redis itself drop clients, stop serving writes, or overflow a subscriber's output buffer.
"""

from __future__ import annotations

from typing import Literal

import redis


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


__all__ = ["client_kill", "client_pause", "flushall", "set_pubsub_output_limit"]
