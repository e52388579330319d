"""Connection, naming and ownership shared by ``Lock``, ``RWLock`` and ``Semaphore``."""

from __future__ import annotations

import logging
import math
import numbers
import os
import socket
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import redis

from .. import forksafe
from ..errors import ConfigurationError, LockLost, SyncMapError
from ..keys import LockLayout, check_lock_name
from ..store.commands import config_value
from ..store.executor import Executor
from ..store.topology import Topology, open_topology
from ..sync.run import run
from . import flows
from .waiting import Waker

OnLost = Callable[[LockLost], None]
log = logging.getLogger("syncmap.lock")
_policy_checked: weakref.WeakSet[Executor] = weakref.WeakSet()


def lock_topology(url: str | None, client: redis.Redis | None, timeout: float) -> Topology:
    """The topology of a lock's ``redis=`` client, else its ``url``, else ``$SYNCMAP_URL``."""
    return open_topology(url, client, timeout=timeout)


def shared_executor(url: str | None, client: redis.Redis | None, timeout: float) -> Executor:
    """The topology's shared executor: one small pool of connections per Redis and process.

    ``users.lock(key)`` makes a Lock per call; each must not open a connection of its own.
    """
    return lock_topology(url, client, timeout).shared_executor(timeout)


def check_timeout(timeout: float | None) -> float | None:
    """An acquire's ``timeout``: None or ``inf`` waits forever, 0 tries once.

    NaN is refused: it compares False with everything, so a deadline of NaN never passes and the
    wait would spin on Redis forever.  A negative timeout is refused too (it is a bug, not a
    request to try once)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout={timeout!r}: use a number of seconds, or None to wait forever")
    seconds = float(timeout)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(
            f"timeout={timeout!r}: use seconds >= 0 (0 tries once), or None to wait forever"
        )
    return None if math.isinf(seconds) else seconds


def check_seconds(name: str, value: object, low: float, high: float, *, low_ok: bool = True
                  ) -> float:  # fmt: skip
    """A duration setting: a finite number of seconds in ``[low, high]`` (``(low, high]``
    without ``low_ok``); ``ConfigurationError`` naming the parameter otherwise."""
    seconds = (
        float(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
        else math.nan
    )
    above = seconds >= low if low_ok else seconds > low
    if not (above and seconds <= high):  # NaN fails both comparisons
        bound = "" if math.isinf(high) else f" and <= {high:g}"
        raise ConfigurationError(
            f"{name}={value!r}: use a finite number of seconds {'>=' if low_ok else '>'} "
            f"{low:g}{bound}"
        )
    return seconds


def check_count(name: str, value: object, low: int) -> int:
    """An int setting ``>= low``; ``ConfigurationError`` naming the parameter otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"{name}={value!r}: use an int >= {low}")
    return value


def new_owner() -> str:
    """An owner token: unique, and readable in ``LockNotAcquired`` messages and Redis."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LockIdentity:
    """What both drivers' lock kinds share and check the same way: the name and its Redis
    layout, the lease, the owner token, ``on_lost`` and the topology.  No I/O."""

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
        topology: Topology | None = None,
        hash_tag: str | None = None,
    ) -> None:
        self.name = check_lock_name(name)
        self.lease = check_seconds("lease", lease, 0.05, 86_400)
        self.socket_timeout = check_seconds("socket_timeout", socket_timeout, 0, 86_400,
                                            low_ok=False)  # fmt: skip
        self._auto_owner = owner is None
        self.owner = owner or new_owner()
        if not isinstance(self.owner, str) or not 1 <= len(self.owner.encode()) <= 512:
            raise ConfigurationError(f"owner={owner!r}: use a str of 1-512 bytes")
        self.on_lost = on_lost
        self._topology = topology or lock_topology(url, redis, socket_timeout)
        self.layout = LockLayout(namespace, self.name, hash_tag, self._topology.sharded)

    @property
    def what(self) -> str:
        return f"{self.kind} {self.name!r} (owner {self.owner})"

    def _lease_ms(self) -> int:
        return flows.lease_ms(self.lease)


class LockBase(LockIdentity):
    """A named lock on one Redis for the thread driver: its shared executor and waker."""

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
        topology: Topology | None = None,
        hash_tag: str | None = None,
    ) -> None:
        super().__init__(name, url, redis=redis, lease=lease, owner=owner, on_lost=on_lost,
                         namespace=namespace, socket_timeout=socket_timeout,
                         topology=topology, hash_tag=hash_tag)  # fmt: skip
        self._executor = self._topology.shared_executor(socket_timeout)
        self._state = threading.Lock()
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        """A forked child holds nothing its parent held, under an owner token of its own
        (an explicit ``owner=`` is kept: the caller chose to share that identity).  Nothing is
        released in Redis: the parent still holds what it held."""
        self._state = threading.Lock()
        if self._auto_owner:
            self.owner = new_owner()
        self._forget_holds()

    def _forget_holds(self) -> None:
        """Drop this object's record of its holds (each lock kind keeps its own)."""

    def _waker(self) -> Waker:
        return Waker.for_topology(self._topology)

    @property
    def where(self) -> str:
        return self._executor.where

    def _warn_if_evicting(self) -> None:
        """Once per Redis and process: holds have a TTL, so a ``volatile-*`` (or ``allkeys-*``)
        policy under memory pressure evicts them and hands the lock to a second holder (S16).
        Fencing still protects map writes; the warning says so.  A refused CONFIG is no answer."""
        executor = self._executor
        if executor in _policy_checked:
            return
        _policy_checked.add(executor)
        try:
            replies = run(flows.eviction_check(), executor)
        except SyncMapError:
            return
        warn_if_evicting(executor.where, *replies)


def warn_if_evicting(where: str, policy_reply: Any, limit_reply: Any) -> None:
    """Warn when the server's eviction policy can evict holds (both drivers call this)."""
    policy, limit = config_value(policy_reply), config_value(limit_reply)
    if policy != "noeviction" and limit not in ("", "0"):
        log.warning(
            "syncmap: %s evicts keys under memory pressure (maxmemory %s, maxmemory-policy "
            "%s): a lock's hold can be evicted and the lock given to a second holder. Set "
            "maxmemory-policy noeviction for lock keys; writes fenced with fence= stay safe",
            where, limit, policy,
        )  # fmt: skip
