"""``Redlock``: a lease lock over N independent Redis masters, held by a majority.

What it gives: the lock survives the loss of a minority of nodes (2 of 5), without replication.
What it does not: it issues no safe fencing token by itself (per-node counters taken over
different majorities are not monotonic: A sees {100, 5, 5}, B later sees {6, 7, 8}), and a node
that restarts without persistence inside a holder's lease forgets the lock, so a second majority
can form.  Fence on the authority instead: pass ``authority=`` (the Redis that holds the data),
and ``fence`` is a token from that Redis's counter, checked by the map's writes.  See
docs/locks.md.

Acquisition follows the published algorithm: try every node in turn with a short timeout; the
lock is held when a majority said yes and the validity left (lease - time spent - clock drift) is
positive; otherwise release on every node and retry after a random delay (jitter keeps clients
from retrying in lockstep).  Waiting here is retrying: there is no one channel to listen on.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from .. import forksafe, instruments
from ..errors import (
    ConfigurationError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    StoreError,
)
from ..flows.effects import Flow
from ..keys import LockLayout, check_lock_name
from ..store.executor import Executor
from ..store.topology import Topology, open_topology
from ..sync.run import run
from . import flows
from .base import OnLost, check_count, check_seconds, check_timeout, lock_topology, new_owner
from .lease import Fence, Hold, ReleasedOnExit, Watchdog


def _nodes(urls: Sequence[str] | None, clients: Sequence[redis.Redis] | None,
           topologies: Sequence[Topology] | None, timeout: float) -> list[Topology]:  # fmt: skip
    """The nodes, from ``topologies``, else ``clients``, else ``urls``."""
    if topologies:
        return list(topologies)
    if clients:
        return [open_topology(client=c, timeout=timeout) for c in clients]
    return [open_topology(u, timeout=timeout) for u in urls or []]


class RedlockSettings:
    """Redlock's parameters, checked the same way for both drivers (no I/O)."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str] | None = None,
        *,
        clients: Sequence[redis.Redis] | None = None,
        topologies: Sequence[Topology] | None = None,
        lease: float = 10.0,
        retries: int = 3,
        retry_delay: float = 0.2,
        node_timeout: float = 0.05,
        authority: str | redis.Redis | None = None,
        auto_renew: bool = True,
        on_lost: OnLost | None = None,
        namespace: str = "sm",
    ) -> None:
        self.name = check_lock_name(name)
        self.lease = check_seconds("lease", lease, 0.05, 86_400)
        self.retries = check_count("retries", retries, 0)
        self.retry_delay = check_seconds("retry_delay", retry_delay, 0, 3600)
        self.node_timeout = check_seconds("node_timeout", node_timeout, 0, 3600, low_ok=False)
        self._topologies = _nodes(urls, clients, topologies, self.node_timeout)
        if len(self._topologies) < 3 or len(self._topologies) % 2 == 0:
            raise ConfigurationError(
                f"Redlock needs an odd number of independent masters, at least 3 (got "
                f"{len(self._topologies)}); 5 survives the loss of 2"
            )
        self.quorum = len(self._topologies) // 2 + 1
        self.owner = new_owner()
        self.on_lost = on_lost
        self.auto_renew = auto_renew
        self.layout = LockLayout(namespace, self.name)
        self.key = f"{namespace}:{{redlock:{self.name}}}"
        self._authority_topology: Topology | None = None
        if authority is not None:
            self._authority_topology = lock_topology(
                authority if isinstance(authority, str) else None,
                authority if not isinstance(authority, str) else None, 5.0,
            )  # fmt: skip
        self._token = 0
        self.last_acquired_nodes = 0
        self._setup()

    def _setup(self) -> None:
        """The driver's part: executors and hold state."""

    @property
    def what(self) -> str:
        return f"redlock {self.name!r} (owner {self.owner})"

    def _clock(self) -> float:
        return time.monotonic()

    def _too_few(self, tries: int) -> LockNotAcquired:
        return LockNotAcquired(
            f"{self.what} was not acquired after {tries} tries: fewer than {self.quorum} "
            f"of {len(self._topologies)} nodes granted it within its validity (held by "
            "another owner, or nodes down). Retry later, or check the nodes"
        )

    def _no_fence(self) -> ConfigurationError:
        return ConfigurationError(
            f"{self.what} has no fencing token: Redlock cannot make a safe one over "
            "independent nodes. Pass authority=<the Redis that holds your data>"
        )


class Redlock(ReleasedOnExit, RedlockSettings):
    """A lock held by a majority of ``len(urls)`` independent Redis masters."""

    def _setup(self) -> None:
        self._nodes = [t.executor(timeout=self.node_timeout) for t in self._topologies]
        self._authority: Executor | None = None
        if self._authority_topology is not None:
            self._authority = self._authority_topology.shared_executor(5.0)
        self._hold: Hold | None = None
        self._state = threading.Lock()
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        """A forked child holds nothing its parent held (see ``LockBase``)."""
        self._state = threading.Lock()
        self.owner = new_owner()
        self._hold, self._token = None, 0

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> float:
        """Acquire on a majority; returns the validity left, in seconds.  ``timeout`` bounds the
        retries (None or ``inf``: only ``retries`` does); NaN or negative raises ``ValueError``."""
        timeout = check_timeout(timeout)
        if self._hold is not None:
            raise LockError(f"{self.what} is already held by this object (not re-entrant)")
        started = time.monotonic()
        try:
            validity = self._acquire(blocking, timeout)
        except LockNotAcquired:
            instruments.lock_attempt(self.what, "timeout", time.monotonic() - started)
            raise
        except BaseException:
            instruments.lock_attempt(self.what, "error", time.monotonic() - started)
            raise
        instruments.lock_attempt(self.what, "acquired", time.monotonic() - started)
        return validity

    def _acquire(self, blocking: bool, timeout: float | None) -> float:
        deadline = None if timeout is None else time.monotonic() + timeout
        tries = 0
        while True:
            validity = self._try_once()
            if validity is not None:
                return validity
            tries += 1
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if not blocking or tries > self.retries or out_of_time:
                raise self._too_few(tries)
            time.sleep(random.uniform(0, self.retry_delay))  # jitter between retries (spec)

    def _try_once(self) -> float | None:
        # A new owner token per attempt: giving back a lost hold late can never remove a newer
        # hold of this same object.
        self.owner = new_owner()
        start = self._clock()
        granted = sum(self._each_node(flows.node_set, self.lease))
        validity = flows.redlock_validity(self.lease, start, granted, self.quorum, self._clock)
        self.last_acquired_nodes = granted
        if validity is None:
            self._release_all()
            return None
        if self._authority is not None:
            try:
                self._token = run(flows.next_fence(self.layout), self._authority)
            except StoreError:
                self._release_all()  # no token, no lock: do not leave it held until the lease
                raise
        hold = Hold(self.what, self.lease, start, self._extend, self._release_all,
                    self.on_lost)  # fmt: skip
        with self._state:
            self._hold = hold
        if self.auto_renew:
            Watchdog.get().watch(hold, start + self.lease / 3)
        return validity

    def _each_node(self, step: Callable[..., Flow[bool]], *args: Any) -> list[bool]:
        """Run one node step on every node in turn; a node that fails counts as a no."""
        said = []
        for node in self._nodes:
            try:
                said.append(run(step(self.key, self.owner, *args), node))
            except StoreError:
                said.append(False)
        return said

    def _extend(self) -> bool:
        start = self._clock()
        ok = sum(self._each_node(flows.node_extend, self.lease))
        return flows.redlock_validity(self.lease, start, ok, self.quorum, self._clock) is not None

    def _release_all(self) -> int:
        return sum(self._each_node(flows.node_release))

    @property
    def valid(self) -> bool:
        hold = self._hold
        return hold is not None and hold.valid

    @property
    def fence(self) -> Fence:
        """A token from the authority's counter (requires ``authority=``)."""
        if self._authority is None:
            raise self._no_fence()
        hold = self._hold
        if hold is None:
            raise LockNotOwned(f"{self.what} is not held: acquire it first")
        hold.check()
        return Fence(self._token, self.name, self.layout.fence)

    def release(self) -> None:
        with self._state:
            hold, self._hold = self._hold, None
        if hold is None:
            raise LockNotOwned(f"{self.what} cannot be released: it is not held")
        hold.end()
        freed = self._release_all()
        if freed < self.quorum and hold.valid_until <= time.monotonic():
            raise LockLost(f"{self.what} had run out before release ({freed} nodes still had it)")

    def __enter__(self) -> Redlock:
        self.acquire()
        return self

    def __repr__(self) -> str:
        state = "held" if self._hold else "free"
        return f"<Redlock {self.name!r} {state} on {len(self._nodes)} nodes, quorum {self.quorum}>"
