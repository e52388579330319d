"""Which master's connection carries each sharded channel, and what a change of owner does to it:
the logic the thread and the asyncio sharded subscribers share (``sharded.py``, ``asharded.py``).

A Redis Cluster delivers an ``SPUBLISH`` only to ``SSUBSCRIBE`` connections of the shard that
owns the channel's hash slot.  So a process keeps one connection per master that owns a
subscribed channel's slot (a per-node reader of ``pubsub.py``/``apubsub.py`` speaking
SSUBSCRIBE, :class:`NodeHooks`), shared by every map and lock of the process, and moves a
channel when its slot's owner changes.  A channel is *placed* on one node: an **inner** handler,
fresh for each placement, is attached to that node's reader, and only the current placement's
callbacks reach the maps' handlers (a late confirmation of an old placement must not say
``on_up`` for a new one that is not confirmed yet).

The **mover** (a thread, or a task on the loop) places channels: it reads the slot map (blocking
I/O: never on the loop, never on a caller's thread), then, under the lock, takes each channel
whose slot has another owner off its node and puts it on the owner's.  Order of events:

* **Attach** a new channel: unplaced; the mover reads its slot's owner and places it there
  (SSUBSCRIBE); the confirmation says ``on_up``.  A handler added to a channel whose placement
  is confirmed is told ``on_up`` at once: the subscription is live.
* **The owner changes** (a), learnt in one of three ways: the topology's ``on_change`` (a
  refresh after a failover, an executor's MOVED); a MOVED answer to our SSUBSCRIBE (its target
  is used for that slot in the next round, over a slot map that may come from a node that has
  not heard yet); Redis's own ``sunsubscribe`` push (Redis 7 drops a node's sharded subscribers
  of a slot it gives away, and of every slot when it becomes a replica).  Then: the handlers are
  told ``on_down`` (messages may be lost from now on) -> the mover reads the slot map -> the
  channel leaves the old node (SUNSUBSCRIBE, unless Redis dropped it already) -> SSUBSCRIBE on
  the owner's node -> ``on_up`` once that is confirmed.  A slot map that still names the node
  which dropped the channel is older than that node's word: the mover reads again
  (``ShardedCore._doubted``).
* **A node's connection is lost** (b): that node's reader tells *its* channels ``on_down``
  (other nodes' channels are untouched), then asks the mover to read the slot map again.  If a
  replica took over, the channels move to it; otherwise the reader reconnects to the same node,
  subscribes again and says ``on_up``.  Each failed reconnect asks again, so a promotion is
  seen within the reader's back-off (at most 1 s) of the slot map naming it.
* **A node left without channels** (c): its connection is closed at the end of the round (or of
  the detach) that took its last channel.

Telling the maps: every ``on_up``, ``on_down`` and message is decided under the lock (is this
placement still current? was the handler up?), queued in that order, and run outside the lock
by one thread at a time (:meth:`ShardedCore._drain`).  Without the queue, two threads could tell
a handler in the wrong order: node A's reader decides ``on_up`` for a placement the mover is
replacing, the mover says ``on_down``, A's ``on_up`` runs last, and the map believes in a
subscription that is not confirmed.  No callback runs under the lock, so a map may attach or
detach from a callback, and a map that holds its own lock while it detaches cannot deadlock
against a callback waiting for ours.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import redis
from redis.exceptions import ClusterDownError, MovedError, TryAgainError

from ..errors import StoreUnavailable
from ..ratelog import RateLimitedLog
from ..store.cluster import ClusterTopology, slot_for
from .leases import Target
from .pubsub import SHARDED, Handler, ReaderHooks, Subscriber

log = logging.getLogger("syncmap.feed")
_no_slot_map = RateLimitedLog(log, every=10.0)  # the mover retries each second while it lasts
MAX_DOUBTS = 8  # rounds (about 4.5 s of back-off) a slot map naming the node that dropped a
# channel is taken for an old one; then it is believed (the node may own the slot again)
Calls = list[tuple[Callable[..., None], tuple[Any, ...]]]  # callbacks to run, in order
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # the mover's retries while a slot has no known owner
LOCK = type(threading.Lock())  # a thread driver's lock (the asyncio driver has none)


class NodeLink(Protocol):
    """A per-node reader as the core uses it (``NodeSubscriber``, ``AsyncNodeSubscriber``)."""

    def attach(self, channel: str, handler: Handler) -> None: ...

    def release(self, channel: str, handler: Handler, *, unsubscribe: bool = True) -> bool: ...


N = TypeVar("N", bound=NodeLink)


@dataclass(slots=True, eq=False)
class Channel:
    name: str
    slot: int
    handlers: list[Handler] = field(default_factory=list)
    address: str | None = None  # the master whose connection carries it; None: not placed
    inner: Handler | None = None  # attached there; a fresh one for each placement
    dropped_by: str | None = None  # the node that last pushed ``sunsubscribe`` for it
    doubts: int = 0  # rounds whose slot map still named that node


@dataclass(slots=True)
class Pending:
    """What the mover's next round starts from."""

    invalidate: bool = False  # read the slot map again, not the one known
    suspects: set[str] = field(default_factory=set)  # nodes lost meanwhile: asked last
    hints: dict[int, str] = field(default_factory=dict)  # slot -> owner a MOVED named


def read_owners(
    topology: ClusterTopology, pending: Pending, slots: Iterable[int]
) -> dict[int, str | None]:
    """The owner of each slot, None where none is known now.  Blocking I/O: the mover only."""
    if pending.invalidate:
        topology.invalidate()
    for address in pending.suspects:
        topology.invalidate(suspect=address)
    try:
        if topology.stale:
            topology.refresh()  # once here, rather than once per slot below
    except StoreUnavailable as exc:
        _no_slot_map("syncmap sharded subscriber: %s", exc)
        return dict.fromkeys(slots)
    owners: dict[int, str | None] = {}
    for slot in slots:
        try:
            owners[slot] = pending.hints.get(slot) or topology.owner(slot)
        except StoreUnavailable:  # no master serves it (a failover under way): retried
            owners[slot] = None
    return owners


class NodeHooks(ReaderHooks):
    """What sharded mode adds to a per-node reader: SSUBSCRIBE, no following of the topology
    (the core moves channels instead), and the hooks, forwarded to the core that owns it."""

    dialect = SHARDED
    follows_topology = False
    shards: ShardedCore[Any]
    address: str

    def _after_loss(self) -> None:
        self.shards.node_lost(self.address)

    def _unexpected(self, kind: bytes, channel: bytes) -> None:
        if kind == b"sunsubscribe":
            self.shards.node_unsubscribed(self.address, channel)

    def _refused(self, exc: redis.ResponseError) -> None:
        self.shards.node_refused(self.address, exc)

    def _lease_targets(self, attached: dict[bytes, list[Handler]]) -> list[Target]:
        return self.shards.lease_targets(attached)

    def _deliver(self, calls: Calls) -> None:
        self.shards.deliver(calls)


class ShardedCore(Generic[N]):
    """The channels, their placements and the callback queue (module docstring).  A driver
    supplies the lock (none on a loop), :meth:`_open_node`, :meth:`_wake` and the mover."""

    def __init__(self, topology: ClusterTopology, lock: AbstractContextManager[Any]) -> None:
        self._topology = topology
        self._lock = lock
        self._channels: dict[str, Channel] = {}
        self._nodes: dict[str, N] = {}
        self._pending = Pending()
        self._queue: Calls = []
        self._draining = False
        self._drainer: int | None = None  # the thread running callbacks (``_draining``)
        self._taken = 0  # callbacks ever taken off the queue to run (a position in it)
        self._waiting = 0  # node readers waiting for their turn (:meth:`_take_turn`)
        # A thread driver's lock is a real one: readers then take turns; on a loop there is
        # one thread, so a call made while draining is always made from a callback.
        self._turn = threading.Condition(lock) if isinstance(lock, LOCK) else None
        self._closed = False  # stopped: no node is opened any more

    def _open_node(self, address: str) -> N:
        raise NotImplementedError

    def _wake(self) -> None:
        """Ask the mover for a round (callable from any thread of the driver's)."""
        raise NotImplementedError

    @property
    def nodes(self) -> dict[str, list[str]]:
        """Each node's address and the channels placed on it (tests, ``repr``)."""
        with self._lock:
            placed: dict[str, list[str]] = {}
            for chan in self._channels.values():
                if chan.address is not None:
                    placed.setdefault(chan.address, []).append(chan.name)
            return placed

    # ---- attach and detach -------------------------------------------------------------------

    def _add(self, name: str, handler: Handler) -> bool:
        """Put ``handler`` on ``name``; True if the channel is new.  The caller then calls
        :meth:`_added` outside its own locks (an ``on_up`` may run there, and it may attach)."""
        with self._lock:
            chan = self._channels.get(name)
            new = chan is None
            if chan is None:
                chan = self._channels[name] = Channel(name, slot_for(name))
            handler.up = False
            chan.handlers.append(handler)
            if chan.inner is not None and chan.inner.up:  # confirmed and not lost since
                handler.up = True
                self._queue.append((handler.on_up, ()))
        return new

    def _added(self, new: bool) -> None:
        self._drain()
        if new:
            self._wake()

    def _remove(self, name: str, handler: Handler) -> tuple[list[N], bool]:
        """Take ``handler`` off ``name``: the nodes left idle (the caller closes them outside
        the lock) and whether no channel is left at all."""
        with self._lock:
            chan = self._channels.get(name)
            if chan is not None and handler in chan.handlers:
                chan.handlers.remove(handler)
                if not chan.handlers:
                    del self._channels[name]
                    self._take_off(chan, unsubscribe=True)
            return self._idle_nodes(), not self._channels

    # ---- placing (the lock held) -------------------------------------------------------------

    def _take_off(self, chan: Channel, *, unsubscribe: bool) -> None:
        """Off its node; its handlers that were up are told ``on_down``."""
        node = self._nodes.get(chan.address) if chan.address is not None else None
        if node is not None and chan.inner is not None:
            node.release(chan.name, chan.inner, unsubscribe=unsubscribe)
        chan.address = chan.inner = None
        for handler in chan.handlers:
            if handler.up:
                handler.up = False
                self._queue.append((handler.on_down, ()))

    def _put_on(self, chan: Channel, address: str) -> None:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = self._open_node(address)
        chan.address, chan.inner = address, self._inner(chan)
        chan.dropped_by, chan.doubts = None, 0
        node.attach(chan.name, chan.inner)  # SSUBSCRIBE now, or when the reader connects

    def _idle_nodes(self) -> list[N]:
        """Out of the table, so nothing is placed on them again: the caller closes them."""
        used = {chan.address for chan in self._channels.values()}
        return [self._nodes.pop(a) for a in [a for a in self._nodes if a not in used]]

    def _inner(self, chan: Channel) -> Handler:
        """The handler of one placement: it speaks for ``chan`` while it is the current one."""

        def on_message(data: bytes) -> None:  # the hot path: through the queue only if busy
            with self._lock:
                if not self._speaks(chan, inner):
                    return
                batch = [(h.on_message, (data,)) for h in chan.handlers]
                busy = self._submit(batch)
            self._submitted(busy, batch)

        def on_up() -> None:
            with self._lock:
                if self._speaks(chan, inner):
                    for handler in chan.handlers:
                        if not handler.up:
                            handler.up = True
                            self._queue.append((handler.on_up, ()))
            self._drain()

        def on_down() -> None:  # (b): only this node's channels
            with self._lock:
                if self._speaks(chan, inner):
                    for handler in chan.handlers:
                        if handler.up:
                            handler.up = False
                            self._queue.append((handler.on_down, ()))
            self._drain()

        inner = Handler(on_message, on_up, on_down)
        # For the node's CLIENT TRACKING prefix only (every map on one channel has the same
        # data-key prefix); what a vouch renews is :meth:`lease_targets`'s, per map and bucket.
        inner.lease = next((h.lease for h in chan.handlers if h.lease is not None), None)
        return inner

    def _submit(self, batch: Calls) -> bool:
        """Queue ``batch`` if another thread drains (True), else claim the draining (the
        lock held); then :meth:`_submitted`, outside the lock."""
        busy = self._draining or bool(self._queue)
        if busy:
            self._queue += batch  # after what is queued, as the others wait
        else:
            self._draining = True  # claimed: run at once, no queue round trip
            self._drainer = threading.get_ident()
        return busy

    def _submitted(self, busy: bool, batch: Calls) -> None:
        if busy:
            self._take_turn()
        else:
            self._drain(batch)

    # ---- PING leases (a node reader's hooks, docs/design.md "PING leases") -------------------

    def lease_targets(self, attached: dict[bytes, list[Handler]]) -> list[Target]:
        """What a vouch PING on one node's connection renews, of the placements ``attached``
        there: for each channel whose current placement is that one and confirmed, the bucket
        it carries, for each map's handler that is up.  A channel moved away (or not yet
        confirmed here) is not vouched by this node: its messages may come elsewhere."""
        targets: list[Target] = []
        with self._lock:
            for name, inners in attached.items():
                chan = self._channels.get(name.decode(errors="replace"))
                if chan is None or chan.inner is None or not chan.inner.up:
                    continue
                if any(inner is chan.inner for inner in inners):
                    targets += [(h.lease, h.bucket) for h in chan.handlers
                                if h.up and h.lease is not None]  # fmt: skip
        return targets

    def deliver(self, calls: Calls) -> None:
        """A node reader's vouches and notices, through the callback queue: they run after the
        messages that node's reader queued before them (the PONG's proof needs them applied)."""
        with self._lock:
            busy = self._submit(calls)
        self._submitted(busy, calls)

    @staticmethod
    def _speaks(chan: Channel, inner: Handler) -> bool:
        """``inner`` is ``chan``'s current placement (the lock held).  Order this prevents:
        SSUBSCRIBE on A -> the mover moves the channel to B -> A's confirmation arrives; told
        on_up then, a map would believe in B's subscription before B confirmed it."""
        return chan.inner is inner

    def _drain(
        self, batch: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None
    ) -> None:
        """Run the queued callbacks in their order, one thread at a time: a thread that finds
        another one draining leaves its callbacks to it (module docstring).  ``batch``: the
        caller has claimed the draining already and runs these first."""
        if batch is None:
            with self._lock:
                if self._draining or not self._queue:
                    return
                batch = self._claim()
        self._run_batches(batch)

    def _take_turn(self) -> None:
        """A node reader's :meth:`_drain` for what it has just queued: it waits until another
        thread has taken its callbacks (then they run in their order, and it goes back to its
        socket) or no thread is draining (then it runs them itself).

        Why a reader waits instead of leaving them to the thread draining: that thread, often
        another node's reader, would run them, and everything else queued meanwhile, for as
        long as the other readers keep queueing, without reading its own socket.  Order of
        events this prevents, on a busy process: node A's reader claims the draining -> the
        readers of B and C queue their messages and go back to read more -> A's reader runs
        them, batch after batch, for hundreds of milliseconds -> A's messages wait in its
        socket the while, so a probe reads A's buckets at sequences their messages reach only
        after ``grace`` -> those buckets are restarted, though nothing was lost.  Now a reader
        that finds the core draining waits for at most the batch being run, and the thread
        draining hands over to the waiting readers after each batch.

        Only node readers wait: they hold no other lock when they call.  Other callers (an
        attach, the mover) may hold a map's lock that a callback needs, so they never wait."""
        with self._lock:
            mine = self._taken + len(self._queue)  # our callbacks are before this position
            while self._taken < mine and self._draining:
                if self._turn is None or self._drainer == threading.get_ident():
                    return  # from a callback: the loop running it runs ours after it
                self._waiting += 1
                try:
                    self._turn.wait()
                finally:
                    self._waiting -= 1
            if self._taken >= mine:
                return  # taken by another thread: they run in their order
            batch = self._claim()
        self._run_batches(batch)

    def _claim(self) -> Calls:
        """Become the thread draining and take the queue (the lock held)."""
        self._draining, self._drainer = True, threading.get_ident()
        batch, self._queue = self._queue, []
        self._taken += len(batch)
        return batch

    def _run_batches(self, batch: Calls) -> None:
        """Run ``batch``, then what was queued meanwhile, until the queue is empty or a node
        reader waits for its turn (:meth:`_take_turn`): the waiting reader takes the rest."""
        try:
            while True:
                for fn, args in batch:
                    Subscriber._call(fn, *args)  # logs a failing callback; the others go on
                with self._lock:
                    if not self._queue or self._waiting:
                        self._release()
                        return
                    batch = self._claim()
        except BaseException:
            with self._lock:
                self._release()
            raise

    def _release(self) -> None:
        """Stop draining (the lock held); a waiting reader takes its turn."""
        self._draining, self._drainer = False, None
        if self._turn is not None:
            self._turn.notify_all()

    # ---- the mover's round -------------------------------------------------------------------

    def _take_pending(self) -> tuple[Pending, list[int]]:
        with self._lock:
            pending, self._pending = self._pending, Pending()
            return pending, sorted({chan.slot for chan in self._channels.values()})

    def _rehome(self, owners: dict[int, str | None]) -> tuple[list[N], bool]:
        """Place every channel on its slot's owner (a), in order: ``on_down``, off the old
        node, onto the owner's.  The nodes left idle (to close), and whether every slot read
        had an owner (else the driver retries: ``_retry_later``)."""
        complete = True
        with self._lock:
            if self._closed:
                return [], True
            for chan in self._channels.values():
                if chan.slot not in owners:
                    continue  # attached during the read: its attach asked for another round
                owner = owners[chan.slot]
                if owner is None or self._doubted(chan, owner):
                    complete = False  # kept where it is: its node may come back
                elif chan.address != owner:
                    self._take_off(chan, unsubscribe=True)
                    self._put_on(chan, owner)
            idle = self._idle_nodes()
        self._drain()
        return idle, complete

    def _close_all(self) -> list[N]:
        """Stopping: every node, for the caller to close; none is opened from now on."""
        with self._lock:
            self._closed = True
            nodes, self._nodes = list(self._nodes.values()), {}
            return nodes

    @staticmethod
    def _doubted(chan: Channel, owner: str) -> bool:
        """The slot map names the node that has just dropped ``chan``: it comes from a node
        that has not heard of the change yet.  Order this prevents: CLUSTER FAILOVER -> the old
        master, now a replica, pushes ``sunsubscribe`` -> the slot map, read from a third node,
        still names it -> SSUBSCRIBE there is accepted (a replica serves its shard's channels)
        -> on_up, and no event ever moves the channel to the new master."""
        if owner != chan.dropped_by or chan.doubts >= MAX_DOUBTS:
            return False
        chan.doubts += 1
        return True

    def _retry_later(self) -> None:
        with self._lock:
            self._pending.invalidate = True

    # ---- what the node readers tell (their hooks) ----------------------------------------

    def node_lost(self, address: str) -> None:
        """(b) ``address``'s connection was lost (its channels were told ``on_down``), or a
        reconnect to it failed: its slots may have another owner now.  The slot map is read
        asking it last (a hung node would hold the read for its timeout)."""
        with self._lock:
            self._pending.invalidate = True
            self._pending.suspects.add(address)
        self._wake()

    def node_unsubscribed(self, address: str, channel: bytes) -> None:
        """A ``sunsubscribe`` on ``address``.  Redis dropped the channel (a) when its placement
        there is current and confirmed; otherwise it answers our own SUNSUBSCRIBE, sent when a
        placement ended (its replacement on the same node is confirmed only after this)."""
        with self._lock:
            chan = self._channels.get(channel.decode(errors="replace"))
            if chan is None or not self._dropped_by_redis(chan, address):
                return
            log.info("syncmap sharded subscriber: %s dropped %r; moving it", address, chan.name)
            self._take_off(chan, unsubscribe=False)  # Redis has dropped it already
            chan.dropped_by = address
            self._pending.invalidate = True
        self._drain()
        self._wake()

    @staticmethod
    def _dropped_by_redis(chan: Channel, address: str) -> bool:
        """A ``sunsubscribe`` on ``address`` is Redis's own, not the answer to ours (the lock
        held).  We send SUNSUBSCRIBE only when a placement ends; if the channel is then placed
        on the same node again, the order on that connection is: SUNSUBSCRIBE, SSUBSCRIBE ->
        the answer ``sunsubscribe`` -> the confirmation.  So while the current placement there
        is unconfirmed a ``sunsubscribe`` is our answer; once it is confirmed, it is Redis's."""
        return chan.address == address and chan.inner is not None and chan.inner.up

    def node_refused(self, address: str, exc: redis.ResponseError) -> None:
        """An error reply on ``address``: MOVED (an SSUBSCRIBE of a slot it no longer owns),
        a cluster that is down or busy (read the slot map again), or another (logged)."""
        if isinstance(exc, MovedError):
            log.info("syncmap sharded subscriber: %s: MOVED %s %s:%s", address, exc.slot_id,
                     exc.host, exc.port)  # fmt: skip
            with self._lock:
                self._pending.hints[exc.slot_id] = f"{exc.host}:{exc.port}"
        elif isinstance(exc, ClusterDownError | TryAgainError):
            log.warning("syncmap sharded subscriber: %s: %s", address, exc)
            with self._lock:
                self._pending.invalidate = True
        else:
            log.error("syncmap subscriber: Redis refused a command on %s: %s", address, exc)
            return
        self._wake()
