"""Connection, naming and ownership shared by ``Lock``, ``RWLock`` and ``Semaphore``."""

from __future__ import annotations

import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable

import redis

from ..errors import ConfigurationError, LockLost
from ..keys import LockLayout, check_lock_name
from ..store.transport import Transport, make_client
from .waiting import Waker

OnLost = Callable[[LockLost], None]

_by_url: dict[tuple[str, float], redis.Redis] = {}
_by_client: weakref.WeakKeyDictionary[redis.Redis, Transport] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def shared_transport(url: str | None, client: redis.Redis | None, timeout: float) -> Transport:
    """One transport (and so one small pool of connections) per Redis client in this process.

    ``users.lock(key)`` makes a Lock per call; each must not open a connection of its own.
    """
    with _shared_lock:
        if client is None:
            url = url or os.environ.get("SYNCMAP_URL")
            key = (url or "", timeout)
            client = _by_url.get(key)
            if client is None:
                client = _by_url[key] = make_client(url, None, timeout)
        else:
            make_client(None, client, timeout)  # validates it
        transport = _by_client.get(client)
        if transport is None:
            transport = _by_client[client] = Transport(client, timeout)
        return transport


def new_owner() -> str:
    """An owner token: unique, and readable in ``LockNotAcquired`` messages and Redis."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LockBase:
    """A named lock on one Redis: its layout, transport and owner token."""

    kind = "lock"

    def __init__(
        self,
        name: str,
        url: str | None,
        *,
        redis: redis.Redis | None,
        lease: float,
        owner: str | None,
        on_lost: OnLost | None,
        namespace: str,
        socket_timeout: float,
        transport: Transport | None = None,
    ) -> None:
        self.name = check_lock_name(name)
        if not 0.05 <= lease <= 86_400:
            raise ConfigurationError(f"lease={lease!r}: use 0.05 .. 86400 seconds")
        self.lease = float(lease)
        self.owner = owner or new_owner()
        if not isinstance(self.owner, str) or not 1 <= len(self.owner.encode()) <= 512:
            raise ConfigurationError(f"owner={owner!r}: use a str of 1-512 bytes")
        self.on_lost = on_lost
        self.layout = LockLayout(namespace, self.name)
        self._transport = transport or shared_transport(url, redis, socket_timeout)
        self._state = threading.Lock()

    @property
    def what(self) -> str:
        return f"{self.kind} {self.name!r} (owner {self.owner})"

    def _waker(self) -> Waker:
        return Waker.for_client(self._transport.client)

    @property
    def where(self) -> str:
        return self._transport.where

    def _lease_ms(self) -> int:
        return max(1, round(self.lease * 1000))
