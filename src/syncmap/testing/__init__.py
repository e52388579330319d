"""Test helpers: a fault-injecting TCP proxy and server-side fault helpers for real Redis."""

from __future__ import annotations

from syncmap.testing.faults import client_kill, client_pause, flushall, set_pubsub_output_limit
from syncmap.testing.proxy import Direction, FaultProxy, Which

__all__ = [
    "Direction",
    "FaultProxy",
    "Which",
    "client_kill",
    "client_pause",
    "flushall",
    "set_pubsub_output_limit",
]
