"""One Redis pub/sub connection per process and Redis target, shared by every map.

Redisson opens a subscription per map and per lock and runs out of connections; we keep one.  The
subscriber thread reads messages and hands each to the map that owns the channel.  It tells maps
when the connection drops (``on_down``: messages may now be lost) and when a re-subscription is
confirmed (``on_up``: the map repairs by probing its sequences).  Order on (re)connect, which
matters for the start-up gap (A5): SUBSCRIBE -> confirmation -> ``on_up`` -> the map probes.

redis-py's own reconnect-and-retry is switched off on this connection so a drop is never hidden,
and the reader uses a bare redis-py ``Connection`` (for AUTH, TLS and ACL users) rather than
``PubSub``: about 1 us of CPU per message instead of 5-8 us.  The connection always speaks RESP2,
whatever the data connection speaks (redis-py 8 defaults to RESP3).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger("syncmap.feed")


@dataclass(slots=True, eq=False)
class Handler:
    """One map's callbacks.  Several maps (even of the same name) may share a channel."""

    on_message: Callable[[bytes], None]
    on_up: Callable[[], None]
    on_down: Callable[[], None]
    up: bool = False  # told on_up since the last (re)subscription


def _target(client: redis.Redis) -> tuple[Any, ...]:
    kw = client.connection_pool.connection_kwargs
    names = ("host", "port", "path", "db", "username", "password", "protocol", "ssl_ca_certs")
    return (*(kw.get(k) for k in names), client.connection_pool.connection_class)


class Subscriber:
    """The process's subscriber for one Redis target.  Get it with :meth:`for_client`."""

    _registry: dict[tuple[Any, ...], Subscriber] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def attach_to(cls, client: redis.Redis, channel: str, handler: Handler) -> Subscriber:
        """Attach ``handler`` to the process's subscriber for ``client``'s Redis (made if new).

        Under the registry lock, so a last ``detach`` elsewhere cannot stop it in between.
        """
        key = _target(client)
        with cls._registry_lock:
            sub = cls._registry.get(key)
            if sub is None:
                sub = cls._registry[key] = cls(client, key)
            sub.attach(channel, handler)
            return sub

    def __init__(self, client: redis.Redis, key: tuple[Any, ...]) -> None:
        pool = client.connection_pool
        # The pool's own bookkeeping (redis-py 8 maintenance-notification handlers, which need
        # RESP3, and saved originals) is left behind: only how to connect is copied.
        kwargs = {
            k: v
            for k, v in pool.connection_kwargs.items()
            if not k.startswith(("maint_notifications", "orig_", "himport"))
        }
        # RESP2 on this connection whatever the data connection speaks: pub/sub messages are then
        # plain arrays on every Redis version, and RESP3 push handling cannot swallow them.
        kwargs.update(
            retry=Retry(NoBackoff(), 0), socket_timeout=None, decode_responses=False, protocol=2
        )
        self._pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        self._key = key
        self._handlers: dict[bytes, list[Handler]] = {}
        self._lock = threading.Lock()
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="syncmap-subscriber", daemon=True)
        self._thread.start()

    def attach(self, channel: str, handler: Handler) -> None:
        """Subscribe ``channel``; ``handler.on_up`` runs once the subscription is confirmed."""
        ch = channel.encode()
        # SUBSCRIBE is sent under the lock so it never races the reader thread creating the
        # PubSub's connection (redis-py would open two and lose one).  If it fails, the reader
        # thread reconnects and subscribes every attached channel.
        with self._lock:
            self._handlers.setdefault(ch, []).append(handler)
            self._send("SUBSCRIBE", ch)  # Redis confirms again even if already subscribed

    def detach(self, channel: str, handler: Handler) -> None:
        ch = channel.encode()
        with self._registry_lock, self._lock:
            handlers = self._handlers.get(ch, [])
            if handler in handlers:
                handlers.remove(handler)
            last_on_channel = not handlers
            if last_on_channel:
                self._handlers.pop(ch, None)
            empty = not self._handlers
            if last_on_channel and not empty:
                self._send("UNSUBSCRIBE", ch)
            if empty and self._registry.get(self._key) is self:
                del self._registry[self._key]
        if empty:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._close_conn()  # wakes the reader at once
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._pool.disconnect()

    def _send(self, *command: Any) -> None:
        """Send on the live connection (caller holds the lock); on failure the reader reconnects
        and subscribes every attached channel anyway."""
        if self._conn is not None:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
                self._conn.send_command(*command)

    # ---- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                conn = self._connect()
                backoff = 0.05
                self._read_until_error(conn)
            except (redis.ConnectionError, redis.TimeoutError, OSError, AttributeError,
                    TypeError) as exc:  # fmt: skip
                # AttributeError, TypeError: what redis-py raises on a socket that another thread
                # (stop(), a failed send) has just disconnected.
                if self._stop.is_set():
                    break
                log.warning("syncmap subscriber lost its connection (%s); reconnecting", exc)
                self._close_conn()
                for handler in self._snapshot():
                    handler.up = False
                    handler.on_down()
                self._stop.wait(backoff)  # reconnect back-off, not a wait for data
                backoff = min(backoff * 2, 1.0)
        self._close_conn()

    def _connect(self) -> Any:
        conn = self._pool.make_connection()
        conn.connect()  # type: ignore[no-untyped-call]
        with self._lock:
            if self._handlers:
                conn.send_command("SUBSCRIBE", *self._handlers)  # type: ignore[no-untyped-call]
            self._conn = conn
        return conn

    def _read_until_error(self, conn: Any) -> None:
        while not self._stop.is_set():
            if not conn.can_read(timeout=1.0):
                continue
            reply = conn.read_response()
            kind, channel = reply[0], reply[1]
            with self._lock:
                handlers = list(self._handlers.get(channel, ()))
            if kind == b"message":
                for handler in handlers:
                    handler.on_message(reply[2])
            elif kind == b"subscribe":
                for handler in handlers:
                    if not handler.up:
                        handler.up = True
                        handler.on_up()

    def _snapshot(self) -> list[Handler]:
        with self._lock:
            return [h for handlers in self._handlers.values() for h in handlers]

    def _close_conn(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(redis.ConnectionError, OSError):
                conn.disconnect()
