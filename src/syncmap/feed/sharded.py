"""Sharded pub/sub on a Redis Cluster: one SSUBSCRIBE connection per master and process, shared
by every map and lock of the process (the thread driver; ``asharded.py`` is the asyncio twin).

``ShardedSubscriber.attach_to(topology, channel, handler)`` is ``Subscriber.attach_to`` for a
Cluster, with the same :class:`~syncmap.feed.pubsub.Handler` promises: ``on_up`` once the
SSUBSCRIBE is confirmed, ``on_down`` when messages may be lost.  Each master's connection is a
``pubsub.Subscriber`` (its reader thread, PING, no silent reconnect) speaking SSUBSCRIBE
(:class:`NodeSubscriber`); which master carries which channel, and the order of events when an
owner changes, a node is lost or a node is left idle, are ``shards.py``'s.

Threads: one reader per master in use, and the **mover**, which reads the slot map (blocking)
and moves channels.  The mover wakes on an attach, on the topology's ``on_change``, and on what
a node reader tells (a lost connection, Redis's ``sunsubscribe``, a MOVED); it retries every
``BACKOFF_MIN``..``BACKOFF_MAX`` s while a slot has no known owner.  Node readers are stopped
without waiting for their threads: one may be waiting to run a callback that the stopping
thread's caller holds up; its connection is closed before ``stop`` returns all the same.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from .. import forksafe
from ..store.cluster import ClusterTopology, NodeTopology
from .pubsub import Handler, Subscriber
from .shards import BACKOFF_MAX, BACKOFF_MIN, NodeHooks, ShardedCore, read_owners

__all__ = ["Handler", "NodeSubscriber", "ShardedSubscriber"]

log = logging.getLogger("syncmap.feed")


class NodeSubscriber(NodeHooks, Subscriber):
    """The SSUBSCRIBE connection to one master, owned by a :class:`ShardedSubscriber` (never
    in the registry of plain subscribers)."""

    def __init__(self, node: NodeTopology, shards: ShardedSubscriber) -> None:
        self.shards, self.address = shards, node.endpoint().address  # before the reader starts
        super().__init__(node, node.key)


class ShardedSubscriber(ShardedCore[NodeSubscriber]):
    """The process's sharded subscriber for one cluster.  Get it with :meth:`attach_to`."""

    _registry: ClassVar[dict[tuple[Any, ...], ShardedSubscriber]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def attach_to(
        cls, topology: ClusterTopology, channel: str, handler: Handler
    ) -> ShardedSubscriber:
        """Attach ``handler`` to the process's sharded subscriber for ``topology`` (made if
        new).  Under the registry lock, so a last ``detach`` elsewhere cannot stop it between."""
        with cls._registry_lock:
            sub = cls._registry.get(topology.key)
            if sub is None:
                sub = cls._registry[topology.key] = cls(topology)
            new = sub._add(channel, handler)
        sub._added(new)
        return sub

    def __init__(self, topology: ClusterTopology) -> None:
        super().__init__(topology, threading.Lock())
        self._stopped = threading.Event()
        self._wakeup = threading.Event()
        topology.on_change(self._wake)
        self._thread = threading.Thread(target=self._run, name="syncmap-sharded", daemon=True)
        self._thread.start()

    def detach(self, channel: str, handler: Handler) -> None:
        """Stop delivering to ``handler``; a node left without channels is closed, and the last
        detach stops the mover too."""
        with self._registry_lock:
            idle, empty = self._remove(channel, handler)
            if empty and self._registry.get(self._topology.key) is self:
                del self._registry[self._topology.key]
        self._close(idle)
        if empty:
            self.stop()

    def stop(self) -> None:
        self._stopped.set()
        self._wakeup.set()
        self._topology.remove_listener(self._wake)
        self._close(self._close_all())
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    @staticmethod
    @forksafe.at_fork
    def _forget_all() -> None:
        """In a forked child the parent's subscribers (sockets, threads, locks) are not the
        child's: the next ``attach_to`` opens the child's own."""
        ShardedSubscriber._registry = {}
        ShardedSubscriber._registry_lock = threading.Lock()

    def give_turn(self, timeout: float) -> bool:
        """``Subscriber.give_turn`` for each master's reader (one poll() each)."""
        with self._lock:
            nodes = list(self._nodes.values())
        if any(threading.get_ident() == node._thread.ident for node in nodes):
            return True  # from a callback on a reader: it may be what another one waits for
        ok = True
        for node in nodes:
            ok = node.give_turn(timeout) and ok
        return ok

    def _open_node(self, address: str) -> NodeSubscriber:
        return NodeSubscriber(self._topology.node(address), self)

    def _wake(self) -> None:
        self._wakeup.set()

    @staticmethod
    def _close(nodes: list[NodeSubscriber]) -> None:
        for node in nodes:
            node.stop(wait=False)  # see the module docstring

    # ---- the mover thread --------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_MIN
        while not self._stopped.is_set():
            self._wakeup.wait()
            self._wakeup.clear()  # before the round: a wake during it makes another round
            if self._stopped.is_set():
                break
            complete = self._round()
            if complete:
                backoff = BACKOFF_MIN
                continue
            self._retry_later()
            self._stopped.wait(backoff)  # a retry's back-off, not a wait for data
            backoff = min(backoff * 2, BACKOFF_MAX)
            self._wakeup.set()

    def _round(self) -> bool:
        pending, slots = self._take_pending()
        try:
            owners = read_owners(self._topology, pending, slots)
            idle, complete = self._rehome(owners)
        except Exception:  # the mover must live on: the next round tries again
            log.exception("syncmap sharded subscriber: moving channels failed")
            return False
        self._close(idle)
        return complete

    def __repr__(self) -> str:
        return f"<ShardedSubscriber {self._topology.where} {self.nodes}>"
