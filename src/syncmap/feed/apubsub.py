"""One Redis pub/sub connection per event loop and Redis target, shared by every map and lock on
that loop: the asyncio twin of ``pubsub.py``, whose docstring states what it promises.  The same
holds here: the order on (re)connect SUBSCRIBE -> confirmation -> ``on_up``; ``on_down`` when the
connection drops; a PING after ``PING_AFTER`` s of silence and a drop when it stays unanswered as
long again; a handler that raises is logged and the others go on; never a silent reconnect.

What differs, and why:

* **Per loop.**  A ``redis.asyncio`` connection belongs to the loop that opened it, so the
  registry is keyed by (loop, topology key).  It never keeps a closed loop: the reader task's end
  removes its entry, whether the last ``detach`` stopped it or ``asyncio.run`` cancelled it while
  shutting the loop down; ``attach_to`` also drops entries of loops closed without ending their
  tasks (``loop.close()`` straight after ``run_until_complete``).
* **The reader is a task the subscriber owns**, started by the first ``attach_to`` and cancelled
  and awaited by the last ``detach``.  It reads with ``read_response(timeout=1 s)``, which
  returns ``None`` on silence and leaves the connection as it was (hiredis keeps a partial frame).
* **No silent reconnect.**  ``redis.asyncio`` reconnects a closed connection when it sends, so
  every send first checks that the connection is still the current one and still connected, with
  no ``await`` between that check and the send: a closed connection stays closed.
* **Sends from ``attach``** (a plain function) run as tasks the subscriber owns; one that fails
  drops the connection, and the reader rebuilds it and subscribes every attached channel.
  So no send or connect runs on a caller's task (``detach`` only stops tasks): a cancel that
  Python 3.11 loses in a send (below) is always one of ours, which ``stop_tasks`` repeats,
  never a caller's (``aiotasks``: the caller's cancels are checked where a caller sends).
* **Waking the reader.**  A Sentinel switch (told on the watcher thread; the listener hops onto
  the loop) or a failed send drops the connection at once: the reader's session runs inside an
  ``asyncio.timeout`` scope that is rescheduled to now, which ends whatever it awaits (connect,
  read) as a lost connection: ``on_down``, reconnect on the master named now, ``on_up``.  The
  reader also checks the connection is still current before every read, so even a wake that
  is lost (below) takes effect within ``READ_SLICE``.
* **Cancelling is repeated until the task ends** (``aiotasks.stop_task``): Python 3.11's
  ``asyncio.wait_for``, which ``redis.asyncio`` wraps around every send, swallows a cancellation
  that arrives just as the send completes (CPython gh-86296, fixed in 3.12); the task then runs
  on.  Seen here: a stream reader cancelled right after sending XREAD read on for ever.
* **Resolving a Sentinel master** talks to the sentinels with blocking sockets: it runs in a
  worker thread (:func:`resolve`), never on the loop.

* **PING leases** as ``pubsub.py``'s, with the same book (``leases.py``): CLIENT TRACKING and
  the notices' SUBSCRIBE before the channels', a ``PING <nonce>`` every Δ/4 sent by a task (its
  send time is taken before: a vouch never claims more than the PING proves), the PONG's vouches
  run in the reader task, after every message read before it.  A map attached with a prefix the
  connection does not track makes the reader reconnect ``RETRACK_AFTER`` s later.

Sharded pub/sub reuses this reader per master as ``pubsub.py`` does (``asharded.py``): the same
:class:`~syncmap.feed.pubsub.ReaderHooks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

import redis

from .. import forksafe
from ..aiotasks import stop_tasks
from ..store.endpoint import Endpoint
from ..store.topology import Topology
from .leases import INVALIDATE, RECHECK, LeaseBook, Target, track_command
from .pubsub import PING_AFTER, PLAIN, RETRACK_AFTER, Handler, ReaderHooks, Retrack

__all__ = ["PING_AFTER", "AsyncSubscriber", "Handler", "Wake", "resolve"]

log = logging.getLogger("syncmap.feed")
READ_SLICE = 1.0  # seconds one read waits before the reader checks PING and re-SUBSCRIBE
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
RegistryKey = tuple[asyncio.AbstractEventLoop, tuple[Any, ...]]
S = TypeVar("S")


class LoopRegistry(Generic[S]):
    """One object per (event loop, topology key).  Loops on several threads share it: its lock
    is held for a few dict operations, never across an await.  Emptied in a forked child (the
    parent's loops, sockets and tasks are not the child's)."""

    def __init__(self) -> None:
        self._after_fork_in_child()
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        self._entries: dict[RegistryKey, S] = {}
        self._lock = threading.Lock()

    def entry(self, key: RegistryKey, make: Callable[[], S]) -> S:
        """The entry of ``key``, made if new; entries of closed loops are dropped first (a loop
        closed straight after ``run_until_complete`` never ends its tasks)."""
        with self._lock:
            for stale in [k for k in self._entries if k[0].is_closed()]:
                del self._entries[stale]
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = make()
            return entry

    def remove(self, key: RegistryKey, entry: S) -> None:
        """Forget ``entry`` (if it is still the one of ``key``)."""
        with self._lock:
            if self._entries.get(key) is entry:
                del self._entries[key]

    def __iter__(self) -> Iterator[RegistryKey]:
        with self._lock:
            return iter(list(self._entries))


async def resolve(topology: Topology) -> Endpoint:
    """``topology.endpoint()`` without blocking the loop: resolving a Sentinel master does I/O.

    A cancel here is never lost: ``to_thread`` awaits an executor future, no ``wait_for``; the
    worker thread finishes the resolution, which only refreshes the topology's master."""
    if topology.kind == "standalone":
        return topology.endpoint()
    return await asyncio.to_thread(topology.endpoint)


class Wake:
    """Ends, from any callback on the loop, whatever a reader task awaits inside :meth:`scope`.

    The awaited call sees a cancellation (``redis.asyncio`` then closes the connection it was
    using) and the scope raises ``TimeoutError``: the reader handles it as a lost connection.
    A cancellation of the task itself still ends the task (``asyncio.timeout`` tells them apart).
    """

    def __init__(self) -> None:
        self._scope: asyncio.Timeout | None = None

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        async with asyncio.timeout(None) as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None

    def now(self) -> None:
        scope = self._scope
        if scope is not None and not scope.expired():
            scope.reschedule(asyncio.get_running_loop().time())


class AsyncSubscriber(ReaderHooks):
    """The subscriber of one event loop for one topology.  Get it with :meth:`attach_to`."""

    _registry: ClassVar[LoopRegistry[AsyncSubscriber]] = LoopRegistry()

    @classmethod
    def attach_to(cls, topology: Topology, channel: str, handler: Handler) -> AsyncSubscriber:
        """Attach ``handler`` to the running loop's subscriber for ``topology`` (made if new);
        ``handler.on_up`` runs once the subscription is confirmed."""
        key = (asyncio.get_running_loop(), topology.key)
        sub = cls._registry.entry(key, lambda: cls(topology, key))
        sub.attach(channel, handler)
        return sub

    def __init__(self, topology: Topology, key: RegistryKey) -> None:
        self._topology = topology
        self._key = key
        self._loop = key[0]
        self._handlers: dict[bytes, list[Handler]] = {}
        self._conn: Any = None  # the connection the reader reads; None while it (re)connects
        self._wake = Wake()
        self._sends: set[asyncio.Task[None]] = set()
        self._stopped = False
        self._leases = LeaseBook()  # prefixes tracked on this connection, vouch PINGs
        self._retrack_at = float("inf")  # reconnect then to track a newly attached map
        self._vouch_at = 0.0  # the next vouch PING (loop time); vouch_soon() brings it forward
        self._vouching = False  # a vouch PING is scheduled at _vouch_at
        if self.follows_topology:
            topology.on_change(self._master_changed)
        self._task = self._loop.create_task(self._run(), name="syncmap-async-subscriber")

    @property
    def running(self) -> bool:
        """The reader task is alive (tests)."""
        return not self._task.done()

    def attach(self, channel: str, handler: Handler) -> None:
        """Subscribe ``channel`` (use :meth:`attach_to`, which makes the subscriber)."""
        if self._stopped:
            raise RuntimeError("this subscriber was stopped; attach with AsyncSubscriber.attach_to")
        ch = channel.encode()
        handler.up = False  # told on_up by this subscription's confirmation, not an older one
        self._handlers.setdefault(ch, []).append(handler)
        if handler.lease is not None:  # its first read after an idle spell asks us to PING
            handler.lease.wakers.add(self.vouch_soon)
        self._send_soon(self.dialect.subscribe, ch)  # Redis confirms again if already subscribed
        if self._conn is not None and self._leases.needs_retrack(handler.lease):
            self._retrack_soon()

    def _retrack_soon(self) -> None:
        """Reconnect a little later (the maps opened together share it) to track a new map's
        data keys: a subscribed RESP2 connection cannot send CLIENT TRACKING."""
        self._retrack_at = min(self._retrack_at, self._loop.time() + RETRACK_AFTER)

    async def detach(self, channel: str, handler: Handler) -> None:
        """Stop delivering to ``handler``; the last detach stops the reader and its connection."""
        if self.release(channel, handler):
            await self.stop()

    def release(self, channel: str, handler: Handler, *, unsubscribe: bool = True) -> bool:
        """Stop delivering ``channel`` to ``handler``, and UNSUBSCRIBE after its last handler
        (unless ``unsubscribe`` is false: Redis already dropped it).  True when no channel is
        left: the caller then stops this subscriber (:meth:`detach` does)."""
        ch = channel.encode()
        handlers = self._handlers.get(ch, [])
        if handler in handlers:
            handlers.remove(handler)
        lease = handler.lease
        if lease is not None and all(h.lease is not lease for h in self._all()):
            lease.wakers.discard(self.vouch_soon)
        if not handlers:
            self._handlers.pop(ch, None)
            if self._handlers and unsubscribe:
                self._send_soon(self.dialect.unsubscribe, ch)
        return not self._handlers

    async def stop(self) -> None:
        """Cancel the reader and the sends, and wait for them (the connection is closed).

        Out of the registry first: an ``attach_to`` from now on makes a new subscriber."""
        self._unregister()
        self._stopped = True
        self._forget_topology()
        await stop_tasks([*self._sends, self._task])

    # ---- the connection, from callbacks on the loop ----------------------------------------

    def _master_changed(self) -> None:
        """On the Sentinel watcher's thread: the topology names another master."""
        log.warning("syncmap subscriber: %s changed master; reconnecting", self._topology.where)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is left to move
            self._loop.call_soon_threadsafe(self._drop)

    def _drop(self) -> None:
        """Give up the current connection now; the reader closes it and builds another."""
        self._conn = None
        self._wake.now()

    def _send_soon(self, *command: Any) -> None:
        conn = self._conn
        if conn is None:
            return  # the reader subscribes every attached channel once it is connected
        task = self._loop.create_task(self._send(conn, command))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, conn: Any, command: tuple[Any, ...]) -> None:
        # No await between this check and send_command's own is_connected check: a connection
        # closed meanwhile is never reopened (it would have none of our subscriptions).
        if conn is not self._conn or not conn.is_connected:
            return
        try:
            await conn.send_command(*command, check_health=False)
        except (redis.RedisError, OSError) as exc:
            log.warning("syncmap subscriber: sending %s failed (%s)", command[0], exc)
            if conn is self._conn:
                self._drop()

    # ---- the reader task ---------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        try:
            while True:
                served = False
                try:
                    async with self._wake.scope():
                        conn = await self._connect()
                        served = True
                        backoff = BACKOFF_MIN
                        await self._read_until_error(conn)
                except Exception as exc:  # every failure is a lost connection; the task lives on
                    self._lost(exc, served)
                    await asyncio.sleep(backoff)  # reconnect back-off, not a wait for data
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:  # stopped, or cancelled by the loop shutting down
            self._conn = None
            self._forget_topology()
            self._unregister()

    def _forget_topology(self) -> None:
        if self.follows_topology:
            self._topology.remove_listener(self._master_changed)

    def _unregister(self) -> None:
        self._registry.remove(self._key, self)

    async def _connect(self) -> Any:
        generation = self._topology.generation
        endpoint = await resolve(self._topology)  # Sentinel: the master named now
        conn = endpoint.async_connection(timeout=2.5 * PING_AFTER)
        try:
            await conn.connect()
            if self._topology.generation != generation:
                raise redis.ConnectionError("the master changed while connecting")
            self._retrack_at = float("inf")
            self._leases.connected(await self._track(conn, self._lease_prefixes(self._handlers)))
            if any(self._leases.needs_retrack(h.lease) for h in self._all()):
                self._retrack_soon()  # attached while CLIENT TRACKING was on its way
            # Order: the channels are read and the connection published with no await between,
            # so a channel attached after this point is sent by its own attach().  One SUBSCRIBE
            # per channel: an ACL that refuses one channel refuses only that one.
            packed = conn.pack_commands([(self.dialect.subscribe, ch) for ch in self._handlers])
            self._conn = conn
            if packed:
                await conn.send_packed_command(packed, check_health=False)
        except BaseException:
            await conn.disconnect(nowait=True)  # nowait: never suspends, so never cut short
            raise
        return conn

    def _all(self) -> list[Handler]:
        return [h for handlers in self._handlers.values() for h in handlers]

    async def _track(self, conn: Any, prefixes: set[bytes]) -> frozenset[bytes] | None:
        """``pubsub.Subscriber._track``'s twin: tracking redirected to this connection, then the
        notices' SUBSCRIBE, before any channel's.  None: Redis refused (the maps probe)."""
        if not prefixes:
            return frozenset()
        try:
            await conn.send_command("CLIENT", "ID", check_health=False)
            client_id = await conn.read_response()
            await conn.send_command(*track_command(client_id, sorted(prefixes)),
                                    check_health=False)  # fmt: skip
            await conn.read_response()
        except redis.ResponseError as exc:
            log.warning("syncmap subscriber: CLIENT TRACKING refused (%s): maps on %s keep "
                        "probing instead of PING leases", exc, self._topology.where)  # fmt: skip
            return None
        await conn.send_command(PLAIN.subscribe, INVALIDATE, check_health=False)
        return frozenset(prefixes)

    async def _read_until_error(self, conn: Any) -> None:
        try:
            await self._read(conn)
        finally:  # whatever ended the reading, this connection is done
            if self._conn is conn:
                self._conn = None
            await conn.disconnect(nowait=True)  # nowait: never suspends, so never cut short

    async def _read(self, conn: Any) -> None:
        clock = self._loop.time
        heard = subscribed = self._vouch_at = clock()
        pinged = 0.0
        while True:
            if self._conn is not conn or not conn.is_connected:
                raise redis.ConnectionError("the subscriber connection was closed")
            now = clock()
            if now >= self._retrack_at:
                raise Retrack("a map needs its keys tracked")
            if now >= self._vouch_at:  # the maps' wishes read only then, not per message
                self._vouch_at = now + self._send_vouch(now)
            if self._leases.overdue(now, PING_AFTER):
                raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
            wait = max(0.0, min(READ_SLICE, self._vouch_at - now, self._retrack_at - now))
            try:
                reply = await conn.read_response(timeout=wait)  # None: nothing came
            except redis.ResponseError as exc:  # e.g. NOPERM for one channel
                self._refused(exc)
                continue
            now = clock()
            if reply is not None:
                heard, pinged = now, 0.0
                self._dispatch(reply)
                continue
            if now - subscribed > PING_AFTER:
                self._resubscribe_unconfirmed()  # a SUBSCRIBE lost on a stalled link
                subscribed = now
            if now - heard < READ_SLICE:
                continue  # woke for the next vouch PING or a retrack, not for silence
            if pinged and now - pinged > PING_AFTER:
                raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
            # The next vouch PING (idle maps: every few seconds) finds a half-open connection
            # as this keep-alive would, and costs Redis one PING, not two.
            vouch_due = self._vouching and self._vouch_at - now <= PING_AFTER
            if not pinged and now - heard > PING_AFTER and not vouch_due:
                self._send_soon("PING")
                pinged = now

    def _targets(self) -> list[Target]:
        return self._lease_targets(self._handlers)

    def _send_vouch(self, now: float) -> float:
        """A vouch PING if a tracked map wants one (``pubsub.Subscriber._send_vouch``); returns
        when to look again."""
        every = self._leases.every(self._targets(), now) if self._leases.tracked else 0.0
        if every:
            nonce, calls = self._leases.ping(now, self._targets())
            self._send_soon("PING", nonce)
            self._deliver(calls)  # the control (Guards.pong off): vouched without the answer
        self._vouching = bool(every)
        recheck = bool(self._leases.tracked) and self._wants_leases(self._handlers)
        return every or (RECHECK if recheck else READ_SLICE)

    def vouch_soon(self) -> None:
        """A map that was idle is read again (``Lease.wakers``, on the loop): a vouch PING now
        rather than at the idle pace (``pubsub.Subscriber.vouch_soon``); its PONG wakes the
        reader, which then sees the nearer ``_vouch_at``.  From another thread (a sync
        ``get_cached`` off the loop), it is handed to the loop."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to PING for
                self._loop.call_soon_threadsafe(self.vouch_soon)
            return
        if self._conn is None or not self._leases.tracked or self._stopped:
            return
        now = self._loop.time()
        every = self._send_vouch(now)
        self._vouch_at = min(self._vouch_at, now + every)

    def _resubscribe_unconfirmed(self) -> None:
        """Send SUBSCRIBE again for channels whose confirmation never came (idempotent)."""
        for ch, handlers in self._handlers.items():
            if any(not h.up for h in handlers):
                self._send_soon(self.dialect.subscribe, ch)

    def _dispatch(self, reply: Any) -> None:
        kind, channel = reply[0], reply[1]
        if kind == b"pong":  # every message before it was dispatched (this task, in order)
            self._deliver(self._leases.pong(channel, self._targets()))
            return
        if channel == INVALIDATE and kind == b"message":
            self._deliver(self._leases.notice(reply[2], self._targets()))
            return
        handlers = list(self._handlers.get(channel, ()))  # a callback may detach
        if kind == self.dialect.message:
            for handler in handlers:
                self._call(handler.on_message, reply[2])
        elif kind == self.dialect.subscribed:
            for handler in handlers:
                if not handler.up:
                    handler.up = True
                    self._call(handler.on_up)
                    if handler.lease is not None:  # its first vouch now, not at the idle pace
                        self._vouch_at = self._loop.time()
        else:
            self._unexpected(kind, channel)

    def _lost(self, exc: Exception, served: bool) -> None:
        """``on_down`` to every handler that was told ``on_up``: once per drop, not once per
        failed reconnect (a handler never confirmed has nothing to take back)."""
        self._conn = None
        if isinstance(exc, Retrack):
            log.debug("syncmap subscriber: reconnecting to track a new map's keys")
        elif served:
            log.warning("syncmap subscriber lost its connection (%s); reconnecting", exc)
        else:
            log.debug("syncmap subscriber: reconnect failed (%s)", exc)
        for handler in [h for handlers in self._handlers.values() for h in handlers]:
            if handler.up:
                handler.up = False
                self._call(handler.on_down)
        self._after_loss()

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """Run one map's callback; its failure must not silence the other maps."""
        try:
            fn(*args)
        except Exception:
            log.exception("syncmap subscriber: a map's handler failed")
