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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import redis

from .. import forksafe
from ..store.topology import Topology

log = logging.getLogger("syncmap.feed")
PING_AFTER = 2.0
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


@dataclass(slots=True, eq=False)
class Handler:
    """One map's callbacks.  Several maps (even of the same name) may share a channel."""

    on_message: Callable[[bytes], None]
    on_up: Callable[[], None]
    on_down: Callable[[], None]
    up: bool = False  # told on_up since the last (re)subscription


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
        self._stop = threading.Event()
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
            self._send(self.dialect.subscribe, ch)  # Redis confirms again if already subscribed

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

    # ---- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                conn = self._connect()
                backoff = 0.05
                self._read_until_error(conn)
            except Exception as exc:  # every failure is a lost connection; the thread lives on
                if self._stop.is_set() or _exiting.is_set():
                    break
                log.warning("syncmap subscriber lost its connection (%s); reconnecting", exc)
                self._close_conn()
                for handler in self._snapshot():
                    handler.up = False
                    self._call(handler.on_down)
                self._after_loss()
                self._stop.wait(backoff)  # reconnect back-off, not a wait for data
                backoff = min(backoff * 2, 1.0)
        self._close_conn()

    def _connect(self) -> Any:
        # A finite timeout: the handshake in connect() and a frame cut mid-way must not hang the
        # reader (waiting for messages uses can_read's own timeout, see _read_until_error).
        endpoint = self._topology.endpoint()  # Sentinel: resolved here after a change
        conn = endpoint.connection(timeout=2.5 * PING_AFTER, once=True)
        conn.connect()
        with self._lock:
            # One SUBSCRIBE per channel: an ACL that refuses one channel refuses only that one.
            for ch in self._handlers:
                conn.send_command(self.dialect.subscribe, ch)
            self._conn = conn
        return conn

    def _read_until_error(self, conn: Any) -> None:
        try:
            self._read(conn)
        finally:  # whatever ended the reading, this connection is done
            with contextlib.suppress(Exception):
                conn.disconnect()

    def _read(self, conn: Any) -> None:
        heard = subscribed = time.monotonic()
        pinged = 0.0
        while not self._stop.is_set():
            if self._conn is not conn or not conn.is_connected:
                raise redis.ConnectionError("the subscriber connection was closed")
            if not conn.can_read(1.0):
                now = time.monotonic()
                if pinged and now - pinged > PING_AFTER:
                    raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
                if not pinged and now - heard > PING_AFTER:
                    with self._lock:
                        self._send("PING")
                    pinged = now
                if now - subscribed > PING_AFTER:
                    self._resubscribe_unconfirmed()  # a SUBSCRIBE lost on a stalled link
                    subscribed = now
                continue
            try:
                reply = conn.read_response()
            except redis.ResponseError as exc:  # e.g. NOPERM for one channel
                self._refused(exc)
                continue
            heard, pinged = time.monotonic(), 0.0
            self._dispatch(reply)

    def _resubscribe_unconfirmed(self) -> None:
        """Send SUBSCRIBE again for channels whose confirmation never came (idempotent)."""
        with self._lock:
            for ch, handlers in self._handlers.items():
                if any(not h.up for h in handlers):
                    self._send(self.dialect.subscribe, ch)

    def _dispatch(self, reply: Any) -> None:
        kind, channel = reply[0], reply[1]
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
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
