"""``RWLock``: many readers or one writer, and writers are not starved."""

from __future__ import annotations

from typing import Any

import redis

from ..store.topology import Topology
from . import flows
from .base import LockBase, OnLost
from .mutex import Lock


class _Writer(Lock):
    """RWLock's write side: a Lock whose acquire also waits for readers (its queue entry is
    ``w:<owner>`` in the RWLock's queue, readers' ``r:<owner>``)."""

    kind = "rwlock (write)"
    kind_of = flows.Writer


class _Reader(Lock):
    """RWLock's read side.  Its fence is the writer's last token: a write fenced with it is
    refused once a writer has acquired since (readers are not meant to write)."""

    kind = "rwlock (read)"
    kind_of = flows.Reader


class RWLock(LockBase):
    """Many readers or one writer.  ``with rw.read:`` / ``with rw.write as fence:``.

    Waiters take turns in order of arrival: the readers at the head of the queue enter together,
    a writer at the head waits for the readers to leave and no reader arriving after it goes
    first, so a steady stream of readers cannot starve writers.  A release names the next batch
    (every leading reader, or one writer); only those wake.  Each side has its own lease,
    renewed by the watchdog, and its own ``valid``/``fence``; the write side issues fencing
    tokens like ``Lock``.  Both sides share this object's owner token: a writer may also read
    (downgrade), and the only reader may take the write side (upgrade, without waiting for its
    turn: the writers queued ahead of it wait for its read hold anyway).
    """

    kind = "rwlock"

    def __init__(
        self,
        name: str,
        url: str | None = None,
        *,
        redis: redis.Redis | None = None,
        lease: float = 30.0,
        owner: str | None = None,
        on_lost: OnLost | None = None,
        namespace: str = "sm",
        socket_timeout: float = 5.0,
        topology: Topology | None = None,
    ) -> None:
        super().__init__(name, url, redis=redis, lease=lease, owner=owner, on_lost=on_lost,
                         namespace=namespace, socket_timeout=socket_timeout,
                         topology=topology)  # fmt: skip
        common: dict[str, Any] = dict(
            lease=lease, owner=self.owner, on_lost=on_lost, namespace=namespace,
            socket_timeout=socket_timeout, topology=self._topology,
        )  # fmt: skip
        self.read: Lock = _Reader(name, **common)
        self.write: Lock = _Writer(name, **common)

    def _forget_holds(self) -> None:
        # The sides were given this object's owner; after a fork they take its new one (each
        # side forgets its own holds in its own hook).
        self.read.owner = self.write.owner = self.owner

    def __repr__(self) -> str:
        return f"<RWLock {self.name!r} read={self.read.held} write={self.write.held}>"
