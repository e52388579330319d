"""``RWLock`` for asyncio: many readers or one writer, writers not starved (the thread driver's
scripts and flows; see ``syncmap.lock.rwlock``)."""

from __future__ import annotations

from typing import Any

import redis

from ...lock import flows
from ...lock.base import LockIdentity, OnLost
from ...store.topology import Topology
from .mutex import Lock


class _Writer(Lock):
    """The write side: a Lock whose acquire also waits for readers."""

    kind = "rwlock (write)"
    kind_of = flows.Writer


class _Reader(Lock):
    """The read side; its fence is the writer's last token."""

    kind = "rwlock (read)"
    kind_of = flows.Reader


class RWLock(LockIdentity):
    """Many readers or one writer: ``async with rw.read:`` / ``async with rw.write as fence:``.

    Both sides share this object's owner token (a writer may also read; the only reader may
    take the write side), as ``syncmap.RWLock``'s do."""

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

    async def aclose(self) -> None:
        await self.write.aclose()
        await self.read.aclose()

    def __repr__(self) -> str:
        return f"<aio.RWLock {self.name!r} read={self.read.held} write={self.write.held}>"
