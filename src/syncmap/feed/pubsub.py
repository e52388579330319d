"""One Redis pub/sub connection per process and Redis target, shared by every map.

Redisson opens a subscription per map and per lock and runs out of connections; we keep one.  The
subscriber thread reads messages and hands each to the map that owns the channel.  It tells maps
when the connection drops (``on_down``: messages may now be lost) and when a re-subscription is
confirmed (``on_up``: the map repairs by probing its sequences).  Order on (re)connect, which
matters for the start-up gap (A5): SUBSCRIBE -> confirmation -> ``on_up`` -> the map probes.

redis-py's own reconnect-and-retry is switched off on this connection so a drop is never hidden.
Works under RESP2 and RESP3 (redis-py parses both into the same message dicts).
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
        kwargs = dict(pool.connection_kwargs)
        kwargs.update(retry=Retry(NoBackoff(), 0), socket_timeout=None, decode_responses=False)
        self._client = redis.Redis(
            connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
        )
        self._key = key
        self._handlers: dict[bytes, list[Handler]] = {}
        self._lock = threading.Lock()
        self._pubsub: Any = None
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
            if self._pubsub is not None:  # Redis confirms again even if already subscribed
                with contextlib.suppress(redis.ConnectionError, OSError):
                    self._pubsub.subscribe(ch)

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
            if last_on_channel and not empty and self._pubsub is not None:
                with contextlib.suppress(redis.ConnectionError, OSError):
                    self._pubsub.unsubscribe(ch)
            if empty and self._registry.get(self._key) is self:
                del self._registry[self._key]
        if empty:
            self.stop()

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._client.close()

    # ---- the reader thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self._connect()
                backoff = 0.05
                self._read_until_error()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self._stop.is_set():
                    break
                log.warning("syncmap subscriber lost its connection (%s); reconnecting", exc)
                self._close_pubsub()
                for handler in self._snapshot():
                    handler.up = False
                    handler.on_down()
                self._stop.wait(backoff)  # reconnect back-off, not a wait for data
                backoff = min(backoff * 2, 1.0)
        self._close_pubsub()

    def _connect(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
        with self._lock:
            # The idle channel keeps get_message() blocking on the socket when no map is attached.
            pubsub.subscribe(b"syncmap:idle", *self._handlers)
            self._pubsub = pubsub

    def _read_until_error(self) -> None:
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=1.0)
            if msg is None:
                continue
            kind = msg["type"]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            with self._lock:
                handlers = list(self._handlers.get(msg["channel"], ()))
            if kind == "message":
                for handler in handlers:
                    handler.on_message(msg["data"])
            elif kind == "subscribe":
                for handler in handlers:
                    if not handler.up:
                        handler.up = True
                        handler.on_up()

    def _snapshot(self) -> list[Handler]:
        with self._lock:
            return [h for handlers in self._handlers.values() for h in handlers]

    def _close_pubsub(self) -> None:
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.ConnectionError, OSError):
                pubsub.close()
