"""One Redis pub/sub connection per process and Redis target, shared by every map.

Redisson opens a subscription per map and per lock and runs out of connections; we keep one.  The
subscriber thread reads messages and hands each to the maps that own the channel.  It tells maps
when the connection drops (``on_down``: messages may now be lost) and when a re-subscription is
confirmed (``on_up``: the map repairs by probing its sequences).  Order on (re)connect, which
matters for the start-up gap (A5): SUBSCRIBE -> confirmation -> ``on_up`` -> the map probes.

How it stays alive and honest:

* It reads a bare redis-py ``Connection`` made by the topology's endpoint (for AUTH, TLS and ACL
  users) rather than ``PubSub``: about 1 us of CPU per message instead of 5-8 us.  The connection
  speaks RESP2 (``Endpoint.connection``): messages are plain arrays everywhere.
* redis-py must never reconnect it behind our back (a fresh socket has no subscriptions, and no
  map would hear of the gap): the connection is made with ``once=True`` (a silent reconnect
  raises instead), and the reader and senders check ``is_connected`` and that the connection is
  still the current one before using it; a closed connection is a lost connection.
* It follows the topology: on ``on_change`` (Sentinel named a new master) it drops its connection
  and rebuilds it on the new master, telling the maps ``on_down`` then ``on_up`` as on any
  reconnect (the maps then probe: the new master may have lost acknowledged writes).
* A half-open connection is found by PING: after ``PING_AFTER`` seconds of silence the reader
  pings, and a connection that stays silent ``PING_AFTER`` more seconds is dropped and rebuilt.
* One map's failure stays its own: a handler that raises is logged and the others go on; an error
  reply (an ACL refusing one channel) is logged and the thread goes on; anything unexpected is
  handled as a lost connection, never as a dead thread.

Sharded pub/sub (Redis Cluster) reuses this reader, one per master (``sharded.py``): a subclass
sets :attr:`ReaderHooks.dialect` (SSUBSCRIBE, ``smessage``), does not follow the topology itself
(its owner moves channels between nodes instead), and overrides the three hooks of
:class:`ReaderHooks`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import redis

from .. import forksafe
from ..store.topology import Topology
from .leases import (
    INVALIDATE,
    RECHECK,
    Calls,
    Lease,
    LeaseBook,
    Target,
    channel_namespace,
    track_command,
    tracked_prefix,
)

__all__ = ["INVALIDATE", "PLAIN", "SHARDED", "Handler", "Lease", "ReaderHooks", "Subscriber"]

log = logging.getLogger("syncmap.feed")
PING_AFTER = 2.0
RETRACK_AFTER = 0.2  # a map attached with a prefix not tracked yet: reconnect this much later
_exiting = threading.Event()  # the interpreter is shutting down: a lost connection is expected
# Before every atexit handler (one of them may stop the Redis we are connected to, as
# EmbeddedRedis's does): threading runs these when the main thread ends, as concurrent.futures
# does for its workers.  The plain atexit hook is the fallback should that private API go.
getattr(threading, "_register_atexit", atexit.register)(_exiting.set)


@dataclass(frozen=True, slots=True)
class Dialect:
    """The commands and reply kinds of one flavour of pub/sub."""

    subscribe: str
    unsubscribe: str
    message: bytes  # [kind, channel, data]
    subscribed: bytes  # the confirmation: [kind, channel, count]


PLAIN = Dialect("SUBSCRIBE", "UNSUBSCRIBE", b"message", b"subscribe")
SHARDED = Dialect("SSUBSCRIBE", "SUNSUBSCRIBE", b"smessage", b"ssubscribe")  # Redis Cluster 7+


class Retrack(redis.ConnectionError):
    """Reconnect on purpose: CLIENT TRACKING must cover a map attached after the connection
    was made (a subscribed RESP2 connection cannot send it).  Maps see a reconnect."""


class ReaderHooks:
    """What a subclass of either reader (this one, ``apubsub.AsyncSubscriber``) may change.

    The plain subscribers keep these defaults; the sharded per-node ones (``shards.NodeHooks``)
    speak SSUBSCRIBE, leave following the topology to their owner and override the hooks."""

    dialect: ClassVar[Dialect] = PLAIN
    follows_topology: ClassVar[bool] = True  # reconnect when the topology names another master

    def _after_loss(self) -> None:
        """The connection was lost, or a reconnect failed (handlers were told ``on_down``)."""

    def _unexpected(self, kind: bytes, channel: bytes) -> None:
        """A reply that is neither a message nor a confirmation: an unsubscribe, a pong."""

    def _refused(self, exc: redis.ResponseError) -> None:
        """An error reply (e.g. NOPERM for one channel: that map's FeedError)."""
        log.error("syncmap subscriber: Redis refused a command: %s", exc)

    def _lease_targets(self, attached: dict[bytes, list[Handler]]) -> list[Target]:
        """What a vouch PING on this connection may renew, of the ``attached`` handlers (by
        channel): each confirmed handler's lease, for the bucket it carries (None: all)."""
        return [(h.lease, h.bucket) for hs in attached.values() for h in hs
                if h.up and h.lease is not None]  # fmt: skip

    def _lease_prefixes(self, attached: dict[bytes, list[Handler]]) -> set[bytes]:
        """The key prefixes to track on a new connection: each leased map's, and the
        namespace of every ``attached`` channel (:func:`~syncmap.feed.leases.channel_namespace`:
        so a leased map opened later is covered without a reconnect)."""
        prefixes = {tracked_prefix(h.lease.prefix)
                    for hs in attached.values() for h in hs if h.lease is not None}  # fmt: skip
        prefixes.update(ns for ch in attached if (ns := channel_namespace(ch)) is not None)
        return prefixes

    @staticmethod
    def _wants_leases(attached: dict[bytes, list[Handler]]) -> bool:
        """A map of ``attached`` asks for leases: until its lease is confirmed the reader looks
        again every ``RECHECK`` (a connection that tracks only for later maps need not)."""
        return any(h.lease is not None for hs in attached.values() for h in hs)

    def _deliver(self, calls: Calls) -> None:
        """Run a vouch's or a notice's calls, in order with the messages (the plain reader
        runs messages' callbacks on its own thread, so at once)."""
        for fn, args in calls:
            Subscriber._call(fn, *args)


@dataclass(slots=True, eq=False)
class Handler:
    """One map's callbacks.  Several maps (even of the same name) may share a channel."""

    on_message: Callable[[bytes], None]
    on_up: Callable[[], None]
    on_down: Callable[[], None]
    up: bool = False  # told on_up since the last (re)subscription
    lease: Lease | None = None  # PING leases for this map (in-script routes only)
    bucket: int | None = None  # the one bucket this channel carries (a Cluster's); None: all


class Subscriber(ReaderHooks):
    """The process's subscriber for one topology.  Get it with :meth:`attach_to`."""

    _registry: dict[tuple[Any, ...], Subscriber] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def attach_to(cls, topology: Topology, channel: str, handler: Handler) -> Subscriber:
        """Attach ``handler`` to the process's subscriber for ``topology`` (made if new).

        Under the registry lock, so a last ``detach`` elsewhere cannot stop it in between.
        """
        key = topology.key
        with cls._registry_lock:
            sub = cls._registry.get(key)
            if sub is None:
                sub = cls._registry[key] = cls(topology, key)
            sub.attach(channel, handler)
            return sub

    def __init__(self, topology: Topology, key: tuple[Any, ...]) -> None:
        self._topology = topology
        self._key = key
        self._handlers: dict[bytes, list[Handler]] = {}
        self._lock = threading.Lock()
        self._conn: Any = None
        self._dialing: Any = None  # a connection in its handshake (_connect), cut by _close_conn
        self._stop = threading.Event()
        # Set by the first attach (and by stop): the reader connects only then.  Why: the reader
        # starts before attach_to attaches the first channel; a handshake that ran first
        # found nothing to track, and the channel then made it reconnect to track its
        # namespace (Retrack), closing the connection under whatever came meanwhile (under
        # S26-cluster's forks the parent's node connections were remade).
        self._attached = threading.Event()
        self._leases = LeaseBook()  # prefixes tracked on this connection, vouch PINGs
        self._retrack_at = float("inf")  # reconnect then to track a newly attached map
        self._vouch_at = 0.0  # the next vouch PING (monotonic); vouch_soon() brings it forward
        # A reading thread's turn for this reader (:meth:`give_turn`): the socket's poll object,
        # replies dispatched so far, and whether a thread waits for the next one.
        self._poller: Any = None  # select.poll() on the connection's socket
        self._dispatched = 0
        self._wanted = False
        self._progress = threading.Event()
        if self.follows_topology:
            topology.on_change(self._master_changed)
        self._thread = threading.Thread(target=self._run, name="syncmap-subscriber", daemon=True)
        self._thread.start()

    def _master_changed(self) -> None:
        """The topology names another master: drop the connection; the reader rebuilds it
        there (on_down, reconnect, SUBSCRIBE, on_up)."""
        log.warning("syncmap subscriber: %s changed master; reconnecting", self._topology.where)
        self._close_conn()

    def attach(self, channel: str, handler: Handler) -> None:
        """Subscribe ``channel``; ``handler.on_up`` runs once the subscription is confirmed."""
        ch = channel.encode()
        with self._lock:
            self._handlers.setdefault(ch, []).append(handler)
            self._attached.set()
            if handler.lease is not None:  # its first read after an idle spell asks us to PING
                handler.lease.wakers.add(self.vouch_soon)
            self._send(self.dialect.subscribe, ch)  # Redis confirms again if already subscribed
            if self._leases.needs_retrack(handler.lease):
                # A subscribed RESP2 connection cannot send CLIENT TRACKING: reconnect (maps
                # repair by probing, as after any reconnect) once the maps a process opens
                # together are all attached.
                self._retrack_at = min(self._retrack_at, time.monotonic() + RETRACK_AFTER)

    def detach(self, channel: str, handler: Handler) -> None:
        with self._registry_lock:
            empty = self.release(channel, handler)
            if empty and self._registry.get(self._key) is self:
                del self._registry[self._key]
        if empty:
            self.stop()

    def release(self, channel: str, handler: Handler, *, unsubscribe: bool = True) -> bool:
        """Stop delivering ``channel`` to ``handler``, and UNSUBSCRIBE after its last handler
        (unless ``unsubscribe`` is false: Redis already dropped it).  True when no channel is
        left: the caller then stops this subscriber (:meth:`detach` does)."""
        ch = channel.encode()
        with self._lock:
            handlers = self._handlers.get(ch, [])
            if handler in handlers:
                handlers.remove(handler)
            lease = handler.lease
            if lease is not None and all(
                h.lease is not lease for hs in self._handlers.values() for h in hs
            ):
                lease.wakers.discard(self.vouch_soon)
            last_on_channel = not handlers
            if last_on_channel:
                self._handlers.pop(ch, None)
            empty = not self._handlers
            if last_on_channel and not empty and unsubscribe:
                self._send(self.dialect.unsubscribe, ch)
            return empty

    @staticmethod
    @forksafe.at_fork
    def _forget_all() -> None:
        """In a forked child: the parent's subscribers (their sockets, threads and locks) are
        not this process's; the next ``attach_to`` opens a subscriber of the child's own."""
        Subscriber._registry = {}
        Subscriber._registry_lock = threading.Lock()

    def stop(self, *, wait: bool = True) -> None:
        """Close the connection and end the reader (``wait``: until it has ended)."""
        self._stop.set()
        self._attached.set()  # a reader still waiting for its first channel ends at once
        if self.follows_topology:
            self._topology.remove_listener(self._master_changed)
        self._close_conn()  # wakes the reader at once
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _send(self, *command: Any) -> None:
        """Send on the live connection (caller holds the lock).  Never on a closed one, which
        would have none of our subscriptions; a failure drops the connection so the reader
        rebuilds it and subscribes every attached channel."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            return
        try:
            conn.send_command(*command, check_health=False)
        except (redis.RedisError, OSError):
            with contextlib.suppress(Exception):
                conn.disconnect()

    def give_turn(self, timeout: float) -> bool:
        """Let this reader handle what waits in its socket; called by a thread that holds the
        GIL (a map's slow path, every ``MapConfig.feed_turn``; docs/design.md, "CPU-bound
        readers").  False: data waited and nothing was dispatched within ``timeout``.

        Why: the reader sleeps in poll() with the GIL released; when a message arrives it needs
        the GIL back, and a thread spinning on cache hits keeps it for up to the switch interval
        (5 ms) before CPython makes it let go.  So a reading thread that finds this socket
        readable waits (GIL released) until the reader has dispatched a reply.  Nothing here
        reads the socket or applies a message: that stays this reader's job, in its order, so
        the PING leases' ordering (a PONG after the messages before it) is untouched.

        Order of events, and why no wake-up is lost: note ``seen`` -> ask (``_wanted``) ->
        clear the event -> if a dispatch happened since ``seen``, go on -> wait.  A dispatch
        before the clear is caught by the count; one after it finds ``_wanted`` and sets the
        event.  A reply that never completes costs ``timeout``; the caller then backs off."""
        poller = self._poller
        if poller is None or threading.get_ident() == self._thread.ident:
            return True  # no connection, or called from a callback on this very thread
        # poll(), not select() (which refuses fds past 1024).  One poll object per connection;
        # two threads polling it at once make CPython raise: the second then skips its turn.
        # Any event counts: a hang-up or a closed fd (the reader reconnects) costs one wait.
        try:
            if not poller.poll(0):
                return True
        except (RuntimeError, OSError):
            return True
        seen = self._dispatched
        self._wanted = True
        self._progress.clear()
        if self._dispatched != seen:
            return True
        return self._progress.wait(timeout)

    # ---- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        self._attached.wait()  # not a timed wait: attach or stop sets it
        while not self._stop.is_set():
            try:
                conn = self._connect()
                backoff = 0.05
                self._read_until_error(conn)
            except Exception as exc:  # every failure is a lost connection; the thread lives on
                if self._stop.is_set() or _exiting.is_set():
                    break
                if isinstance(exc, Retrack):
                    log.debug("syncmap subscriber: reconnecting to track a new map's keys")
                else:
                    log.warning("syncmap subscriber lost its connection (%s); reconnecting", exc)
                self._close_conn()
                for handler in self._snapshot():
                    handler.up = False
                    self._call(handler.on_down)
                if not isinstance(exc, Retrack):  # a retrack reconnects to the same server
                    self._after_loss()
                    self._stop.wait(backoff)  # reconnect back-off, not a wait for data
                    backoff = min(backoff * 2, 1.0)
        self._close_conn()

    def _connect(self) -> Any:
        # A finite timeout: the handshake in connect() and a frame cut mid-way must not hang the
        # reader (waiting for messages uses can_read's own timeout, see _read_until_error).
        endpoint = self._topology.endpoint()  # Sentinel: resolved here after a change
        conn = endpoint.connection(timeout=2.5 * PING_AFTER, once=True)
        # The handshake reads replies (CLIENT ID, CLIENT TRACKING), so it runs outside the lock
        # and can be cut by _close_conn.  Order it prevents: the master is SIGSTOPped, the
        # reader dials it again before Sentinel names the new one and waits in CLIENT ID; the
        # master change (_master_changed) must end that wait at once, and a map opening
        # meanwhile (attach) must not wait on the lock for the handshake's timeout.
        with self._lock:
            self._dialing = conn
        try:
            conn.connect()
            with self._lock:
                attached = {ch: list(hs) for ch, hs in self._handlers.items()}
            tracked = self._track(conn, sorted(self._lease_prefixes(attached)))
            with self._lock:
                if self._dialing is not conn:
                    raise redis.ConnectionError("the connection was dropped while connecting")
                self._dialing = None
                self._retrack_at = float("inf")
                self._leases.connected(tracked)
                if any(
                    self._leases.needs_retrack(h.lease)
                    for hs in self._handlers.values()
                    for h in hs
                ):  # a map attached during the handshake: track its keys too, soon
                    self._retrack_at = time.monotonic() + RETRACK_AFTER
                # One SUBSCRIBE per channel: an ACL that refuses one channel refuses only it.
                for ch in self._handlers:
                    conn.send_command(self.dialect.subscribe, ch)
                self._conn = conn
                poller = select.poll()
                poller.register(conn._sock.fileno(), select.POLLIN)
                self._poller = poller
        except BaseException:
            with self._lock:
                if self._dialing is conn:
                    self._dialing = None
            with contextlib.suppress(Exception):
                conn.disconnect()
            raise
        return conn

    def _track(self, conn: Any, prefixes: list[bytes]) -> frozenset[bytes] | None:
        """Before subscribing: CLIENT TRACKING in broadcast mode for the maps' data keys,
        redirected to this very connection (RESP2), then SUBSCRIBE to the notices' channel, so
        notices arrive in order with the messages.  None: nothing tracked (no map asked, or
        Redis refused: then no PING vouches, and the maps keep probing).  A Cluster node's
        connection does the same before its SSUBSCRIBEs (a plain SUBSCRIBE and SSUBSCRIBEs
        share a RESP2 connection on Redis 7.0); the node tracks the keys it holds."""
        if not prefixes:
            return frozenset()
        try:
            conn.send_command("CLIENT", "ID")
            client_id = conn.read_response()
            conn.send_command(*track_command(client_id, prefixes))
            conn.read_response()
        except redis.ResponseError as exc:
            log.warning("syncmap subscriber: CLIENT TRACKING refused (%s): maps on %s keep "
                        "probing instead of PING leases", exc, self._topology.where)  # fmt: skip
            return None
        conn.send_command(PLAIN.subscribe, INVALIDATE)
        return frozenset(prefixes)

    def _read_until_error(self, conn: Any) -> None:
        try:
            self._read(conn)
        finally:  # whatever ended the reading, this connection is done
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _read(self, conn: Any) -> None:
        heard = subscribed = self._vouch_at = time.monotonic()
        pinged = 0.0
        vouching = False  # a vouch PING is scheduled at _vouch_at
        while not self._stop.is_set():
            if self._conn is not conn or not conn.is_connected:
                raise redis.ConnectionError("the subscriber connection was closed")
            now = time.monotonic()
            if now >= self._retrack_at:
                raise Retrack("a map needs its keys tracked")
            if now >= self._vouch_at:  # the maps' wishes read only then, not per message
                if self._vouch_every(now):
                    self._send_vouch(now)
                targets = self._targets()
                with self._lock:  # attach() changes the dict on other threads
                    recheck = bool(self._leases.tracked) and self._wants_leases(self._handlers)
                    # The pace read under the lock vouch_soon() takes: a map read again since
                    # the PING above (its busy_until set before it calls vouch_soon) is seen
                    # here, or vouch_soon() brings _vouch_at forward after this.
                    every = self._leases.every(targets, now) if self._leases.tracked else 0.0
                    self._vouch_at = now + (every or (RECHECK if recheck else 1.0))
                    vouching = bool(every)
            if self._leases.overdue(now, PING_AFTER):
                raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
            wait = min(1.0, max(0.0, self._vouch_at - now))
            if not conn.can_read(wait):
                now = time.monotonic()
                if now - subscribed > PING_AFTER:
                    self._resubscribe_unconfirmed()  # a SUBSCRIBE lost on a stalled link
                    subscribed = now
                if now - heard < 1.0:
                    continue  # woke for the next vouch PING, not for silence
                if pinged and now - pinged > PING_AFTER:
                    raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
                # The next vouch PING (idle maps: every few seconds) finds a half-open
                # connection as this keep-alive would, and costs Redis one PING, not two.
                vouch_due = vouching and self._vouch_at - now <= PING_AFTER
                if not pinged and now - heard > PING_AFTER and not vouch_due:
                    with self._lock:
                        self._send("PING")
                    pinged = now
                continue
            try:
                reply = conn.read_response()
            except redis.ResponseError as exc:  # e.g. NOPERM for one channel
                self._refused(exc)
                continue
            heard, pinged = time.monotonic(), 0.0
            self._handle(reply)

    def _handle(self, reply: Any) -> None:
        """Dispatch one reply, then let a reading thread that gave us its turn go on."""
        self._dispatch(reply)
        self._dispatched += 1
        if self._wanted:  # a reading thread gave us its turn (give_turn): it may go on
            self._wanted = False
            self._progress.set()

    def _targets(self) -> list[Target]:
        """The lease targets (never under our lock: a sharded owner's hook takes its own)."""
        with self._lock:
            attached = {ch: list(hs) for ch, hs in self._handlers.items()}
        return self._lease_targets(attached)

    def _vouch_every(self, now: float) -> float:
        """How often to send a vouch PING: the shortest a tracked map asks; 0: none."""
        return self._leases.every(self._targets(), now) if self._leases.tracked else 0.0

    def _send_vouch(self, now: float) -> None:
        """PING with a nonce; its PONG (after every message published before the PING ran)
        renews the leases of what this connection carries (:meth:`_dispatch`).  The nonce is
        booked and sent under our lock, so nonces reach Redis in the order they are booked
        when :meth:`vouch_soon` sends one from another thread; ``now`` is taken before the
        send, the side the proof needs (a PING *sent at or after* ``now``)."""
        targets = self._targets()  # outside our lock (a sharded owner's hook takes its own)
        with self._lock:
            nonce, calls = self._leases.ping(now, targets)
            self._send("PING", nonce)
        self._deliver(calls)  # the control (Guards.pong off): vouched without the answer

    def vouch_soon(self) -> None:
        """A map that was idle is read again (``Lease.wakers``; on the reading thread): send a
        vouch PING now rather than at the idle pace, and look again at the busy pace.  Its
        PONG wakes this reader, which then sees the nearer ``_vouch_at``.  Until the answer
        arrives the map's reads go to Redis (its leases lapsed while idle): never stale."""
        if self._conn is None or not self._leases.tracked or self._stop.is_set():
            return
        now = time.monotonic()
        self._send_vouch(now)
        every = self._vouch_every(now)
        with self._lock:
            self._vouch_at = min(self._vouch_at, now + (every or 1.0))

    def _resubscribe_unconfirmed(self) -> None:
        """Send SUBSCRIBE again for channels whose confirmation never came (idempotent)."""
        with self._lock:
            for ch, handlers in self._handlers.items():
                if any(not h.up for h in handlers):
                    self._send(self.dialect.subscribe, ch)

    def _dispatch(self, reply: Any) -> None:
        kind, channel = reply[0], reply[1]
        if kind == b"pong":  # every message before it was dispatched (this thread, in order)
            targets = self._targets()
            with self._lock:  # vouch_soon() books nonces from other threads
                calls = self._leases.pong(channel, targets)
            self._deliver(calls)
            return
        if channel == INVALIDATE and kind == b"message":
            self._deliver(self._leases.notice(reply[2], self._targets()))
            return
        with self._lock:
            handlers = list(self._handlers.get(channel, ()))
        if kind == self.dialect.message:
            for handler in handlers:
                self._call(handler.on_message, reply[2])
        elif kind == self.dialect.subscribed:
            for handler in handlers:
                if not handler.up:
                    handler.up = True
                    self._call(handler.on_up)
                    if handler.lease is not None:
                        # Its first vouch now (this thread sends it next turn), not at the idle
                        # pace of the maps already here: until it comes, the map probes.
                        self._vouch_at = time.monotonic()
        else:
            self._unexpected(kind, channel)

    @staticmethod
    def _call(fn: Callable[..., None], *args: Any) -> None:
        """Run one map's callback; its failure must not silence the other maps."""
        try:
            fn(*args)
        except Exception:
            log.exception("syncmap subscriber: a map's handler failed")

    def _snapshot(self) -> list[Handler]:
        with self._lock:
            return [h for handlers in self._handlers.values() for h in handlers]

    def _close_conn(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            dialing, self._dialing = self._dialing, None
            self._poller = None
        for c in (conn, dialing):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.disconnect()
