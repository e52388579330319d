"""``syncmap doctor``: is this Redis fit for syncmap?  One line per check: OK, WARN or FAIL.

Checks: connection, the topology (one node, or a Sentinel service: master, replicas, sentinels),
server version and mode, RESP3 (HELLO 3), ``maxmemory`` and the eviction policy, persistence,
durability across a failover (replicas, ``min-replicas-to-write``), round-trip time, and a test
invalidation through a real ``SyncMap`` on a private map (its keys are deleted afterwards).

Exit status: 0 no FAIL (WARNs allowed), 1 some check failed, 2 the Redis could not be reached.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import click
import redis

from ..serverinfo import server_identity
from .options import redis_client
from .torture import redact

DEFAULT_URL = "redis://localhost:6379/0"
NAMESPACE = "syncmap-doctor"  # of the private test map
DOCTOR_GRANT = (
    f"under a least-privilege user, doctor also needs its test map and INFO: ACL SETUSER <user> "
    f"~{NAMESPACE}:* &{NAMESPACE}:* +info (docs/protocol.md §9)"
)


@dataclass
class Check:
    name: str
    status: str  # OK / WARN / FAIL
    detail: str
    hint: str = ""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _config(client: redis.Redis, name: str) -> str | None:
    """CONFIG GET ``name``, or None when the server (or its ACL) refuses CONFIG."""
    try:
        reply = client.config_get(name)
    except redis.ResponseError:
        return None
    for key, value in reply.items():
        if _text(key) == name:
            return _text(value)
    return ""


def _server(client: redis.Redis, *, cluster_url: bool = False) -> list[Check]:
    try:
        info = client.info("server")
    except redis.exceptions.NoPermissionError:
        return [Check("server", "WARN", "unknown (INFO refused by the ACL)",
                      f"grant +info to see the version and mode; {DOCTOR_GRANT}")]  # fmt: skip
    server = server_identity(info)
    version = server.redis_version  # Valkey's too: it is what feature checks go by
    # Valkey 8 says server_mode where Redis says redis_mode.
    mode = _text(info.get("redis_mode", info.get("server_mode", "standalone")))
    checks = []
    status, hint = "OK", ""
    if mode == "sentinel":
        status = "FAIL"
        hint = (
            "this is a Sentinel, not a data server: ask it for the master "
            "(SENTINEL get-master-addr-by-name) and point syncmap there"
        )
    elif mode == "cluster" and not cluster_url:
        status = "FAIL"
        hint = (
            "this node is part of a Redis Cluster: name the cluster's nodes with "
            "redis+cluster://host:port,host:port so every bucket goes to the master that owns it"
        )
    major = version.split(".")[0]
    if status == "OK" and major.isdigit() and int(major) < 6:
        status, hint = "WARN", "syncmap is tested on Redis 6.2 and later: upgrade if you can"
    checks.append(Check("server", status, f"{server.detail}, mode {mode}", hint))
    return checks


def _topology(url: str) -> Check:
    """What the URL names: one node, a Sentinel service (its master, replicas, sentinels), or a
    Cluster (its masters, their slots and replicas, and how a 16-bucket map spreads)."""
    from ..errors import SyncMapError  # noqa: PLC0415 - keep the CLI light
    from ..store.cluster import ClusterTopology  # noqa: PLC0415
    from ..store.sentinel import SentinelTopology  # noqa: PLC0415
    from ..store.topology import open_topology  # noqa: PLC0415

    try:
        topology = open_topology(url, timeout=5.0)
        if isinstance(topology, ClusterTopology):
            return _cluster_topology(topology)
        if not isinstance(topology, SentinelTopology):
            return Check("topology", "OK", f"standalone {topology.where}")
        seen = topology.describe()
    except SyncMapError as exc:
        return Check("topology", "FAIL", str(exc))
    return Check("topology", "OK", (
        f"sentinel service {topology.service!r}: master {seen['master']}, replicas "
        f"{', '.join(seen['replicas']) or 'none'}, sentinels {', '.join(seen['sentinels'])}; "
        f"down-after {seen['down_after']} s (data socket timeout capped at half of it)"
    ))  # fmt: skip


def _cluster_topology(topology: Any) -> Check:
    """Masters with their slot ranges and replicas, and the buckets of a 16-bucket map each."""
    from ..keys import Layout  # noqa: PLC0415
    from ..store.cluster import slot_for  # noqa: PLC0415

    seen = topology.describe()
    layout = Layout(NAMESPACE, "any", 16)
    spread: dict[str, int] = {}
    for bucket in range(16):
        owner = topology.owner(slot_for(layout.data(bucket)))
        spread[owner] = spread.get(owner, 0) + 1
    parts = []
    for address, info in seen.items():
        ranges = ",".join(f"{a}-{b}" for a, b in info["slots"])
        replicas = ", ".join(info["replicas"]) or "no replica"
        parts.append(f"{address} (slots {ranges}; {replicas}; {spread.get(address, 0)} of 16 "
                     "buckets)")  # fmt: skip
    status, hint = "OK", ""
    if any(not info["replicas"] for info in seen.values()):
        status = "WARN"
        hint = "a master without a replica loses its buckets when it fails: add replicas"
    return Check("topology", status, f"cluster of {len(seen)} masters: " + "; ".join(parts), hint)


def _resp3(url: str, node: Any = None) -> Check:
    try:
        client: redis.Redis = node.client() if node is not None else redis_client(url, 5)
        try:
            client.execute_command("HELLO", 3)  # type: ignore[no-untyped-call]
        finally:
            client.close()
    except redis.ResponseError as exc:
        return Check(
            "resp3",
            "WARN",
            f"HELLO 3 refused ({exc})",
            "RESP2 works too; RESP3 needs Redis 6 or later",
        )
    except redis.RedisError as exc:
        return Check("resp3", "WARN", f"could not test ({type(exc).__name__}: {exc})")
    return Check("resp3", "OK", "HELLO 3 accepted (RESP3 available; syncmap also works on RESP2)")


def _memory(client: redis.Redis) -> Check:
    maxmemory = _config(client, "maxmemory")
    policy = _config(client, "maxmemory-policy")
    if maxmemory is None or policy is None:
        return Check(
            "memory",
            "WARN",
            "unknown (CONFIG refused)",
            "check maxmemory-policy yourself: noeviction is the safe choice",
        )
    limit = int(maxmemory or 0)
    if limit == 0:
        return Check("memory", "OK", f"maxmemory 0 (no limit), policy {policy}")
    detail = f"maxmemory {limit} bytes ({limit / 2**20:.0f} MiB), policy {policy}"
    if policy != "noeviction":
        # What is and is not guaranteed under this policy: the same text a map logs at open.
        from ..store.eviction import eviction_note  # noqa: PLC0415 - keep the CLI light

        return Check(
            "memory",
            "WARN",
            detail + " evicts keys",
            f"{eviction_note(policy, str(limit))}. Use maxmemory-policy noeviction, or give "
            "syncmap a Redis of its own",
        )
    return Check("memory", "OK", detail + " (writes fail with OOM when full; nothing is evicted)")


def _persistence(client: redis.Redis) -> Check:
    aof = _config(client, "appendonly")
    fsync = _config(client, "appendfsync")
    save = _config(client, "save")
    if aof is None or save is None:
        return Check(
            "persistence",
            "WARN",
            "unknown (CONFIG refused)",
            "check appendonly / save yourself: without them a restart loses the data",
        )
    detail = f"appendonly {aof}" + (f" (appendfsync {fsync})" if aof == "yes" else "")
    detail += f", save {save.strip()!r}" if save.strip() else ", save (none)"
    if aof != "yes" and not save.strip():
        return Check(
            "persistence",
            "WARN",
            detail,
            "a restart loses every map's data and every fencing counter; syncmap notices (epochs) "
            "and drops its caches, but the values are gone. Enable appendonly yes if they matter",
        )
    if aof != "yes":
        return Check(
            "persistence",
            "WARN",
            detail,
            "snapshots only: a restart loses the writes since the last snapshot",
        )
    if fsync == "no":
        return Check(
            "persistence",
            "WARN",
            detail,
            "appendfsync no: a machine crash may lose the last seconds of writes",
        )
    return Check("persistence", "OK", detail)


def _durability(client: redis.Redis) -> Check:
    """What a failover may lose: with replicas and ``min-replicas-to-write 0`` (the default),
    writes acknowledged just before a failover may be gone on the promoted replica."""
    try:
        replicas = int(client.info("replication").get("connected_slaves", 0))
    except (redis.RedisError, ValueError):
        return Check("durability", "WARN", "unknown (INFO replication refused)")
    if replicas == 0:
        return Check("durability", "OK", "no replicas: durability is this node's persistence")
    need = _config(client, "min-replicas-to-write")
    lag = _config(client, "min-replicas-max-lag")
    detail = f"{replicas} replica(s), min-replicas-to-write {need or '?'}"
    if need in (None, "0"):
        return Check("durability", "WARN", detail + " (asynchronous replication)", (
            "a failover may lose writes acknowledged just before it: set min-replicas-to-write 1 "
            "and min-replicas-max-lag 10 on the master, or MapConfig(wait_replicas=1) "
            "(docs/deploying.md, Sentinel)"
        ))  # fmt: skip
    return Check("durability", "OK", f"{detail}, min-replicas-max-lag {lag}: the master refuses "
                 "writes without enough replicas")  # fmt: skip


def _rtt(client: redis.Redis, count: int = 7) -> Check:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    detail = f"median {median:.2f} ms over {count} PINGs (max {max(times):.2f} ms)"
    if median > 50:
        return Check(
            "rtt", "WARN", detail, "every miss and write pays this; put syncmap close to its Redis"
        )
    return Check("rtt", "OK", detail)


def _invalidation(url: str, timeout: float = 2.0) -> Check:
    from .. import MapConfig, SyncMap  # noqa: PLC0415

    name = f"doctor-{uuid.uuid4().hex[:12]}"
    namespace = NAMESPACE
    cfg = MapConfig(namespace=namespace, buckets=1, presence=False)
    try:
        m = SyncMap(name, url, config=cfg, node_id=f"doctor-{uuid.uuid4().hex[:6]}")
    except Exception as exc:
        return Check(
            "invalidation",
            "FAIL",
            f"could not open a map: {exc}",
            f"syncmap needs +@read +@write +@scripting +@pubsub on a map's keys; {DOCTOR_GRANT}",
        )
    try:
        with m.watch() as events:
            started = time.monotonic()
            m.set("probe", 1)
            event = events.get(timeout)
            took = (time.monotonic() - started) * 1000
        if event is None:
            return Check(
                "invalidation",
                "FAIL",
                f"the change message did not arrive within {timeout:g} s",
                "invalidations would never reach other servers: check pub/sub permissions and "
                "proxies between here and Redis",
            )
        return Check("invalidation", "OK", f"change message arrived in {took:.1f} ms")
    except Exception as exc:
        return Check("invalidation", "FAIL", f"{type(exc).__name__}: {exc}")
    finally:
        m.close()
        _cleanup(url, namespace, name)


def _cleanup(url: str, namespace: str, name: str) -> None:
    from ..keys import Layout  # noqa: PLC0415 - keep the CLI light

    layout = Layout(namespace, name, 1)  # the test map has one bucket
    known = [layout.meta, layout.presence, layout.stream, *layout.bucket_keys(0)]
    client = redis_client(url, 5)
    try:
        client.delete(*known)  # by name, not by SCAN: a least-privilege user may not SCAN
    except redis.RedisError:
        pass
    finally:
        client.close()


def run_checks(url: str) -> tuple[list[Check], bool]:
    """Every check, and whether Redis could be reached at all."""
    try:
        client = redis_client(url, 5, socket_timeout=10)
    except ValueError as exc:
        return [
            Check(
                "connect",
                "FAIL",
                f"{redact(url)} is not a Redis URL ({exc})",
                "use redis://[[user]:password@]host:port/db (rediss:// for TLS)",
            )
        ], False
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            return [
                Check(
                    "connect",
                    "FAIL",
                    f"cannot reach {redact(url)}: {type(exc).__name__}: {exc}",
                    "check that the server runs and is reachable from here, and the URL's host, "
                    "port, password and database: redis://[[user]:password@]host:port/db",
                )
            ], False
        checks = [Check("connect", "OK", f"connected to {redact(url)}"), _topology(url)]
        for where, node, node_client in _data_nodes(url, client):
            try:
                checks.extend(_node_checks(url, where, node, node_client))
            finally:
                if node_client is not client:
                    node_client.close()
        checks.append(_invalidation(url))
        return checks, True
    finally:
        client.close()


def _node_checks(url: str, where: str, node: Any, client: Any) -> list[Check]:
    """The checks of one data node (``node``: its endpoint on a Cluster, else None)."""
    checks: list[Check] = []
    steps: list[Callable[[Any], list[Check]]] = [
        lambda c: _server(c, cluster_url=node is not None),
        lambda c: [_resp3(url, node)],
        lambda c: [_memory(c)],
        lambda c: [_persistence(c)],
        lambda c: [_durability(c)],
        lambda c: [_rtt(c)],
    ]
    for step in steps:
        try:
            checks.extend(_at(where, step(client)))
        except redis.RedisError as exc:
            checks.append(Check("error", "FAIL", f"{where}{type(exc).__name__}: {exc}"))
    return checks


def _data_nodes(url: str, client: Any) -> list[tuple[str, Any, Any]]:
    """(label, endpoint or None, client) of each data node to examine: the one node, or on a
    Cluster every master (each has its own memory, persistence and eviction settings)."""
    from ..store.cluster import ClusterTopology  # noqa: PLC0415
    from ..store.topology import open_topology  # noqa: PLC0415

    topology = open_topology(url, timeout=5.0)
    if not isinstance(topology, ClusterTopology):
        return [("", None, client)]
    nodes = []
    for address in topology.masters():
        endpoint = topology.node(address).endpoint()
        nodes.append((f"{address}: ", endpoint, endpoint.client(socket_timeout=10)))
    return nodes


def _at(where: str, checks: list[Check]) -> list[Check]:
    """The checks of one Cluster master, their details prefixed with its address."""
    if not where:
        return checks
    return [replace(c, detail=where + c.detail) for c in checks]


@click.command("doctor")
@click.option(
    "--url",
    envvar="SYNCMAP_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="Redis to examine (or $SYNCMAP_URL).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(url: str, as_json: bool) -> None:
    """Check that a Redis suits syncmap: exit 0 OK (warnings allowed), 1 a check failed, 2 down."""
    checks, reached = run_checks(url)
    failed = any(c.status == "FAIL" for c in checks)
    code = 2 if not reached else (1 if failed else 0)
    if as_json:
        doc = {"url": redact(url), "ok": not failed, "checks": [asdict(c) for c in checks]}
        click.echo(json.dumps(doc))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status:<4} {c.name:<{width}}  {c.detail}")
            if c.hint and c.status != "OK":
                click.echo(f"     {'':<{width}}  hint: {c.hint}")
        warns = sum(c.status == "WARN" for c in checks)
        fails = sum(c.status == "FAIL" for c in checks)
        click.echo(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    if not reached:
        click.echo(f"syncmap doctor: cannot reach Redis at {redact(url)}", err=True)
    sys.exit(code)
