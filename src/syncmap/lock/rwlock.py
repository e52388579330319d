"""``RWLock``: many readers or one writer, and writers are not starved."""

from __future__ import annotations

from typing import Any

import redis

from ..errors import LockNotAcquired
from ..store.executor import evalsha
from ..store.topology import Topology
from .base import LockBase, OnLost
from .lease import Fence
from .mutex import Lock
from .waiting import Attempt


class _Writer(Lock):
    """RWLock's write side: a Lock whose acquire also waits for readers and claims its turn."""

    kind = "rwlock (write)"

    def _acquire_command(self) -> tuple[Any, ...]:
        lay = self.layout
        claim_ms = self._lease_ms() + 1000  # outlives every wait between two attempts
        return evalsha("rw_write", (lay.hold, lay.fence, lay.readers, lay.claims),
                                       self.owner, self._lease_ms(), claim_ms)  # fmt: skip

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> Fence:
        try:
            return super().acquire(blocking, timeout)
        except LockNotAcquired:
            # Give up the claim at once, or readers would wait for it to run out.
            self._executor.call([("ZREM", self.layout.claims, self.owner)], write=True)
            raise


class _Reader(Lock):
    """RWLock's read side.  Its fence is the writer's last token: a write fenced with it is
    refused once a writer has acquired since (readers are not meant to write)."""

    kind = "rwlock (read)"

    def _acquire_command(self) -> tuple[Any, ...]:
        lay = self.layout
        return evalsha("rw_read", (lay.hold, lay.fence, lay.readers, lay.claims),
                                       self.owner, self._lease_ms())  # fmt: skip

    def _attempt(self) -> Attempt[Fence]:
        if self._count:  # re-entered: Redis keeps one read hold per owner, no count
            with self._state:
                self._count += 1
            return Attempt(Fence(self._token, self.name, self.layout.fence))
        return super()._attempt()

    def _renew_command(self) -> tuple[Any, ...]:
        return evalsha("zset_renew", (self.layout.readers,), self.owner,
                                       self._lease_ms())  # fmt: skip

    def _release_command(self, *, every_level: bool, last: bool, token: int | None = None
                         ) -> tuple[Any, ...] | None:  # fmt: skip
        if not last:
            return None
        return evalsha("zset_release", (self.layout.readers,), self.owner,
                                       self.layout.channel)  # fmt: skip

    def _released(self, reply: Any) -> str | None:
        return None if int(reply) == 1 else ""

    def _still_ours(self) -> tuple[int, int] | None:
        score = self._executor.call([("ZSCORE", self.layout.readers, self.owner)],
                                     write=False)[0]  # fmt: skip
        return None if score is None else (self._token, 1)


class RWLock(LockBase):
    """Many readers or one writer.  ``with rw.read:`` / ``with rw.write as fence:``.

    A writer that is waiting goes before readers that arrive after it, so a steady stream of
    readers cannot starve writers.  Each side has its own lease, renewed by the watchdog, and
    its own ``valid``/``fence``; the write side issues fencing tokens like ``Lock``.  Both sides
    share this object's owner token: a writer may also read (downgrade), and the only reader may
    take the write side (upgrade).
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
