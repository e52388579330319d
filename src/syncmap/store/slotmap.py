"""Reading a Redis Cluster's slot map from one node: ``CLUSTER SHARDS`` (Redis 7+, Valkey), or
``CLUSTER SLOTS`` where a server has no SHARDS.  Pure parsing plus one short-lived connection;
``cluster.py`` decides whom to ask and what to do with the answer.

The result is ``(owners, replicas)``: ``owners[slot]`` is the ``host:port`` of the master that
serves it (None: no healthy master does), ``replicas[master]`` its replicas' addresses.  With
TLS, each node's ``tls-port`` is used (Redis reports it when ``tls-cluster yes``).
"""

from __future__ import annotations

from typing import Any

import redis

from .endpoint import Endpoint

SLOTS = 16384
REFRESH_TIMEOUT = 1.0  # seconds one node may take to tell the slot map
SlotMap = tuple[list[str | None], dict[str, list[str]]]


def read_slot_map(endpoint: Endpoint) -> SlotMap:
    # A short timeout: a paused node must not hold the refresh (and every call routed after it)
    # for the data connections' socket timeout while another node could answer.
    client = endpoint.client(socket_timeout=REFRESH_TIMEOUT, socket_connect_timeout=REFRESH_TIMEOUT)
    try:
        try:
            shards = client.execute_command("CLUSTER", "SHARDS")  # type: ignore[no-untyped-call]
        except redis.ResponseError:  # Redis < 7: no SHARDS
            slots = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            return _from_slots(slots, endpoint)
        return _from_shards(shards, endpoint)
    finally:
        client.close()


def _fields(value: Any) -> dict[str, Any]:
    """A RESP3 map or a RESP2 flat list of name, value pairs, with str names."""
    if isinstance(value, dict):
        items = list(value.items())
    else:
        it = iter(value)
        items = list(zip(it, it, strict=True))
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in items}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _host(node: dict[str, Any], endpoint: Endpoint) -> str:
    # "endpoint" is what clients should use (it may be a hostname); "?" or "" means unknown:
    # then the address we reached the cluster by is the best guess (a one-node test cluster).
    for name in ("endpoint", "ip", "hostname"):
        text = _text(node.get(name, b""))
        if text and text != "?":
            return text
    return endpoint.host


def _from_shards(shards: Any, endpoint: Endpoint) -> SlotMap:
    owners: list[str | None] = [None] * SLOTS
    replicas: dict[str, list[str]] = {}
    for raw in shards:
        shard = _fields(raw)
        master, others = None, []
        for raw_node in shard.get("nodes", []):
            node = _fields(raw_node)
            if _text(node.get("health", b"online")) != "online":
                continue
            port = node.get("tls-port") if endpoint.tls is not None else None
            port = port or node.get("port") or 0
            address = f"{_host(node, endpoint)}:{int(port)}"
            if _text(node.get("role", b"")) == "master":
                master = address
            else:
                others.append(address)
        if master is None:
            continue
        replicas[master] = others
        bounds = [int(x) for x in shard.get("slots", [])]
        for start, end in zip(bounds[::2], bounds[1::2], strict=True):
            for slot in range(start, end + 1):
                owners[slot] = master
    return owners, replicas


def _from_slots(ranges: Any, endpoint: Endpoint) -> SlotMap:
    owners: list[str | None] = [None] * SLOTS
    replicas: dict[str, list[str]] = {}
    for entry in ranges:
        start, end, master_info, *others = entry
        host = _text(master_info[0]) or endpoint.host
        master = f"{host}:{int(master_info[1])}"
        replicas[master] = [f"{_text(o[0]) or endpoint.host}:{int(o[1])}" for o in others]
        for slot in range(int(start), int(end) + 1):
            owners[slot] = master
    return owners, replicas
