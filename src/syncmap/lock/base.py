"""Connection, naming and ownership shared by ``Lock``, ``RWLock`` and ``Semaphore``."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable

import redis

from ..errors import ConfigurationError, LockLost, SyncMapError
from ..keys import LockLayout, check_lock_name
from ..store.transport import Transport, make_client
from .waiting import Waker

OnLost = Callable[[LockLost], None]
log = logging.getLogger("syncmap.lock")
_policy_checked: weakref.WeakSet[Transport] = weakref.WeakSet()

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

    def _warn_if_evicting(self) -> None:
        """Once per Redis and process: holds have a TTL, so a ``volatile-*`` (or ``allkeys-*``)
        policy under memory pressure evicts them and hands the lock to a second holder (S16).
        Fencing still protects map writes; the warning says so.  A refused CONFIG is no answer."""
        transport = self._transport
        if transport in _policy_checked:
            return
        _policy_checked.add(transport)
        try:
            policy, limit = (
                _config_value(r)
                for r in transport.call(
                    [("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "GET", "maxmemory")],
                    write=False,
                )
            )
        except SyncMapError:
            return
        if policy != "noeviction" and limit not in ("", "0"):
            log.warning(
                "syncmap: %s evicts keys under memory pressure (maxmemory %s, maxmemory-policy "
                "%s): a lock's hold can be evicted and the lock given to a second holder. Set "
                "maxmemory-policy noeviction for lock keys; writes fenced with fence= stay safe",
                transport.where, limit, policy,
            )  # fmt: skip

    def _lease_ms(self) -> int:
        return max(1, round(self.lease * 1000))


def _config_value(reply: object) -> str:
    """The value of a one-parameter CONFIG GET reply (a list in RESP2, a dict in RESP3)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    else:
        values = list(reply)[1::2] if isinstance(reply, list | tuple) else []
    value = values[0] if values else b""
    return value.decode() if isinstance(value, bytes) else str(value)
