"""Sharded pub/sub on a Redis Cluster for asyncio: the twin of ``sharded.py``, with the rules of
``shards.py`` (which master carries which channel; the order of events when an owner changes, a
node is lost or a node is left idle) and the per-node reader of ``apubsub.py``.

What differs, and why:

* **Per loop**, as ``AsyncSubscriber``: the registry is keyed by (loop, cluster); entries of
  closed loops are dropped by ``attach_to``, and the mover task's end removes its own.
* **The mover is a task** the subscriber owns; it reads the slot map in a worker thread
  (``asyncio.to_thread``: a refresh talks to the nodes with blocking sockets) and moves channels
  on the loop.  Everything else (placing, the callback queue, the node readers' hooks) runs on
  the loop, so the core's lock is a no-op here.
* **The topology tells** ``on_change`` on whichever thread refreshed the slot map (an executor's
  worker, the loop itself): the listener only hops onto the loop to wake the mover.
* **Detach is awaited**: a node left idle is stopped (its reader task ended, its connection
  closed) before ``detach`` returns; the last detach stops the mover as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import ClassVar

from ..aiotasks import stop_tasks
from ..store.cluster import ClusterTopology, NodeTopology
from .apubsub import AsyncSubscriber, LoopRegistry, RegistryKey
from .pubsub import Handler
from .shards import BACKOFF_MAX, BACKOFF_MIN, NodeHooks, ShardedCore, read_owners

__all__ = ["AsyncNodeSubscriber", "AsyncShardedSubscriber", "Handler"]

log = logging.getLogger("syncmap.feed")


class AsyncNodeSubscriber(NodeHooks, AsyncSubscriber):
    """The SSUBSCRIBE connection to one master, owned by an :class:`AsyncShardedSubscriber`."""

    def __init__(self, node: NodeTopology, shards: AsyncShardedSubscriber,
                 loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        self.shards, self.address = shards, node.endpoint().address  # before the reader starts
        super().__init__(node, (loop, node.key))


class AsyncShardedSubscriber(ShardedCore[AsyncNodeSubscriber]):
    """The sharded subscriber of one event loop for one cluster.  Get it with
    :meth:`attach_to`."""

    _registry: ClassVar[LoopRegistry[AsyncShardedSubscriber]] = LoopRegistry()

    @classmethod
    def attach_to(
        cls, topology: ClusterTopology, channel: str, handler: Handler
    ) -> AsyncShardedSubscriber:
        """Attach ``handler`` to the running loop's sharded subscriber for ``topology`` (made
        if new); ``handler.on_up`` runs once the SSUBSCRIBE is confirmed."""
        key = (asyncio.get_running_loop(), topology.key)
        sub = cls._registry.entry(key, lambda: cls(topology, key))
        sub._added(sub._add(channel, handler))
        return sub

    def __init__(self, topology: ClusterTopology, key: RegistryKey) -> None:
        super().__init__(topology, contextlib.nullcontext())
        self._key = key
        self._loop = key[0]
        self._wakeup = asyncio.Event()
        topology.on_change(self._changed)
        self._task = self._loop.create_task(self._run(), name="syncmap-async-sharded")

    @property
    def running(self) -> bool:
        """The mover task is alive (tests)."""
        return not self._task.done()

    async def detach(self, channel: str, handler: Handler) -> None:
        """Stop delivering to ``handler``; a node left without channels is stopped, and the
        last detach stops the mover too."""
        idle, empty = self._remove(channel, handler)
        if empty:
            self._unregister()  # no await before it: an attach_to from now on makes a new one
        await self._close(idle)
        if empty:
            await self.stop()

    async def stop(self) -> None:
        """Cancel the mover and stop every node reader (their connections closed)."""
        self._unregister()
        self._topology.remove_listener(self._changed)
        nodes = self._close_all()
        await stop_tasks([self._task])
        await self._close(nodes)

    def _unregister(self) -> None:
        self._registry.remove(self._key, self)

    def _open_node(self, address: str) -> AsyncNodeSubscriber:
        return AsyncNodeSubscriber(self._topology.node(address), self, self._loop)

    def _wake(self) -> None:
        self._wakeup.set()  # on the loop: attach and the node readers' hooks run there

    def _changed(self) -> None:
        """The topology's listener, on whichever thread refreshed the slot map."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to move
            self._loop.call_soon_threadsafe(self._wakeup.set)

    @staticmethod
    async def _close(nodes: list[AsyncNodeSubscriber]) -> None:
        await asyncio.gather(*(node.stop() for node in nodes))

    # ---- the mover task ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()  # before the round: a wake during it makes another round
                if await self._round():
                    backoff = BACKOFF_MIN
                    continue
                self._retry_later()
                await asyncio.sleep(backoff)  # a retry's back-off, not a wait for data
                backoff = min(backoff * 2, BACKOFF_MAX)
                self._wakeup.set()
        finally:  # stopped, or cancelled by the loop shutting down
            self._topology.remove_listener(self._changed)
            self._unregister()

    async def _round(self) -> bool:
        pending, slots = self._take_pending()
        try:
            owners = await asyncio.to_thread(read_owners, self._topology, pending, slots)
            idle, complete = self._rehome(owners)
        except Exception:  # the mover must live on: the next round tries again
            log.exception("syncmap sharded subscriber: moving channels failed")
            return False
        await self._close(idle)
        return complete

    def __repr__(self) -> str:
        return f"<AsyncShardedSubscriber {self._topology.where} {self.nodes}>"
