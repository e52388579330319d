"""Every lock's round trips, written once as pure flows for both drivers.

A flow yields :class:`~syncmap.flows.effects.Call` effects and gets the replies back (or the
executor's error thrown in); ``syncmap.sync.run.run`` drives it on a thread, and
``syncmap.aio.run.run`` on an event loop.  What stays in the drivers is only what cannot be
shared: how to wait (a thread event or an asyncio one), how a hold is renewed (the watchdog
thread or a task) and the bookkeeping of the lock object.

The kinds (:class:`Mutex`, :class:`Reader`, :class:`Writer`) say which scripts a lock, and
RWLock's two sides, acquire, renew, release and leave the queue with; the flows are the same
for the three.  Semaphore's flows are further down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import LockLost, StoreUnavailable, WriteOutcomeUnknown
from ..flows.effects import Call, Flow
from ..keys import LockLayout
from ..store import scripts
from ..store.executor import Command, evalsha
from .lease import drift
from .waiting import Attempt

Clock = Callable[[], float]
LATE = "nobody (the reply came after the lease had run out)"


@dataclass(frozen=True, slots=True)
class Grant:
    """An acquisition Redis granted: its token, when the request was sent (None: re-entered
    without asking Redis), and how many replicas confirmed it (None: not asked)."""

    token: int
    sent: float | None
    acked: int | None = None


def lease_ms(lease: float) -> int:
    return max(1, round(lease * 1000))


def queue_lease(lease: float) -> float:
    """How long a waiter's place in a lock's queue lasts unless it tries again: the lock's
    lease, kept within 1-5 s.  A dead waiter at the head holds the queue up this long at most
    (as a dead holder does for its lease); every waiter refreshes its place at a third of it,
    so 200 waiters of a 30 s lock cost 120 calls a second whatever the rate of hand-offs."""
    return min(max(lease, 1.0), 5.0)


def refresh_ms(lease: float) -> int:
    """The longest a queued waiter waits between two tries (refreshing its place)."""
    return max(1, round(queue_lease(lease) * 1000 / 3))


def refusal(reply: Any, lease: float, *, turn: str, holder: str = "another owner"
            ) -> Attempt[Any]:  # fmt: skip
    """A refused queued acquire's reply ``{0, ms, who, place, turn[, lead]}`` (every lock kind's
    acquire script): how long to wait at most and who is in the way.

    Only a waiter in the next batch (``lead``; for Lock and Semaphore, the head of the queue)
    waits for the holder's lease (a crashed holder never publishes); every queued waiter tries
    again at least every ``refresh_ms``, which keeps its place and bounds what a lost release
    message costs.  The others expect a message naming them, not the end of the lease: when a
    holder dies, only the next batch tries again at the end of its lease, not all of them.
    ``turn`` is said when the waiter is held up by a queued waiter's turn (``{who}`` in it)."""
    wait, who = int(reply[1]), reply[2].decode(errors="replace") if reply[2] else ""
    place = int(reply[3]) if len(reply) > 3 else -1
    if len(reply) > 4 and int(reply[4]):
        why = turn.format(who=who) + f" (for {wait} ms more)"
    else:
        why = f"held by {who or holder} for up to {max(wait, 0)} ms more"
    if place > 0:
        why += f"; {place} waiting ahead of this one"
    lead = bool(int(reply[5])) if len(reply) > 5 else place == 0
    if place >= 0:
        wait = min(wait, refresh_ms(lease)) if lead else refresh_ms(lease)
    return Attempt(None, wait, who, why)


def _rw_queue(lay: LockLayout) -> tuple[str, str, str]:
    return lay.rw_queue, lay.rw_queue_leases, lay.rw_queue_writers


@dataclass(frozen=True, slots=True)
class Mutex:
    """``Lock``'s scripts: a hash {owner, re-entries, token} with the lease as its TTL."""

    layout: LockLayout
    owner: str
    lease: float
    what: str
    #: Re-entry is counted here, not in Redis (RWLock's read side: one read hold per owner).
    local_reentry: ClassVar[bool] = False
    #: Waiters queue, and a release wakes only the next one (or batch).
    queued: ClassVar[bool] = True
    #: Why a waiter is refused when it is a queued waiter's turn (``{who}``: that waiter).
    turn: ClassVar[str] = "it is free, but it is the turn of {who}, the first waiter"

    @property
    def member(self) -> str:
        """This owner's entry in the queue (and the name its turn's message carries)."""
        return self.owner

    @property
    def ms(self) -> int:
        return lease_ms(self.lease)

    def acquire(self, queue: bool = False) -> Command:
        """``queue``: when refused, join the queue (or keep this owner's place in it)."""
        lay = self.layout
        entry_ms = lease_ms(queue_lease(self.lease)) if queue else 0
        return evalsha("lock_acquire", (lay.hold, lay.fence, lay.queue, lay.queue_leases),
                       self.owner, self.ms, entry_ms, lay.notify)  # fmt: skip

    def renew(self) -> Command:
        return evalsha("lock_renew", (self.layout.hold,), self.owner, self.ms)

    def release(self, *, every_level: bool, last: bool, token: int | None = None
                ) -> Command | None:  # fmt: skip
        """None: nothing to tell Redis at this level (it keeps no re-entry count).  ``token``
        releases only that hold (a lost one given back late), not a newer one of this owner."""
        lay = self.layout
        return evalsha("lock_release", (lay.hold, lay.queue, lay.queue_leases), self.owner,
                       lay.notify, "1" if every_level else "0",
                       "" if token is None else token)  # fmt: skip

    def leave(self) -> Command | None:
        """Leave the queue (a waiter that gives up); None: this kind does not queue."""
        if not self.queued:
            return None
        lay = self.layout
        return evalsha("lock_leave", (lay.hold, lay.queue, lay.queue_leases), self.owner,
                       lay.notify)  # fmt: skip

    def refused(self, reply: Any) -> Attempt[Grant]:
        """A refused acquire's reply: how long to wait at most and who is in the way."""
        return refusal(reply, self.lease, turn=self.turn)

    def released(self, reply: Any) -> str | None:
        """None if the release reply says it was ours; else who holds it now ('' = nobody)."""
        if int(reply[0]) == 1:
            return None
        return reply[1].decode(errors="replace") if reply[1] else ""

    def still_ours(self) -> Command:
        return ("HMGET", self.layout.hold, "o", "n", "t")

    def ours(self, reply: Any, token: int) -> tuple[int, int] | None:
        """From ``still_ours``'s reply: (token, re-entries) if Redis says this owner holds it."""
        owner, count, held_token = reply
        if owner is None or owner.decode() != self.owner:
            return None
        return int(held_token), int(count)


@dataclass(frozen=True, slots=True)
class Writer(Mutex):
    """RWLock's write side: waits for readers too, and queues with them (``w:<owner>``)."""

    turn: ClassVar[str] = "{who} is queued ahead of it"

    @property
    def member(self) -> str:
        return f"w:{self.owner}"

    def acquire(self, queue: bool = False) -> Command:
        lay = self.layout
        entry_ms = lease_ms(queue_lease(self.lease)) if queue else 0
        return evalsha("rw_write", (lay.hold, lay.fence, lay.readers, lay.claims,
                                    *_rw_queue(lay)),
                       self.owner, self.ms, entry_ms, lay.notify)  # fmt: skip

    def release(self, *, every_level: bool, last: bool, token: int | None = None
                ) -> Command | None:  # fmt: skip
        lay = self.layout
        return evalsha("rw_write_release", (lay.hold, lay.readers, *_rw_queue(lay)),
                       self.owner, lay.notify, "1" if every_level else "0",
                       "" if token is None else token)  # fmt: skip

    def leave(self) -> Command | None:
        lay = self.layout
        return evalsha("rw_leave", (lay.readers, lay.hold, *_rw_queue(lay)), self.member,
                       lay.notify)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Reader(Writer):
    """RWLock's read side: a zset owner -> lease deadline; its fence is the writer's last;
    queued as ``r:<owner>``."""

    local_reentry: ClassVar[bool] = True
    turn: ClassVar[str] = "a writer queued ahead of it goes first: {who}"

    @property
    def member(self) -> str:
        return f"r:{self.owner}"

    def acquire(self, queue: bool = False) -> Command:
        lay = self.layout
        entry_ms = lease_ms(queue_lease(self.lease)) if queue else 0
        return evalsha("rw_read", (lay.hold, lay.fence, lay.readers, lay.claims,
                                   *_rw_queue(lay)),
                       self.owner, self.ms, entry_ms, lay.notify)  # fmt: skip

    def renew(self) -> Command:
        return evalsha("zset_renew", (self.layout.readers,), self.owner, self.ms)

    def release(self, *, every_level: bool, last: bool, token: int | None = None
                ) -> Command | None:  # fmt: skip
        if not last:
            return None
        lay = self.layout
        return evalsha("rw_read_release", (lay.readers, lay.hold, *_rw_queue(lay)),
                       self.owner, lay.notify)  # fmt: skip

    def released(self, reply: Any) -> str | None:
        return None if int(reply) == 1 else ""

    def still_ours(self) -> Command:
        return ("ZSCORE", self.layout.readers, self.owner)

    def ours(self, reply: Any, token: int) -> tuple[int, int] | None:
        return None if reply is None else (token, 1)


Kind = Mutex


# ---- Lock, RWLock's sides --------------------------------------------------------------------


def attempt(k: Kind, *, count: int, token: int, wait: tuple[int, int] | None,
            queue: bool = False,
            clock: Clock = time.monotonic) -> Flow[Attempt[Grant]]:  # fmt: skip
    """One try to acquire (or re-enter: ``count`` levels are held now, under ``token``).

    ``wait``: (replicas, timeout ms) to ``WAIT`` for after the acquire (``replicas=``).
    ``queue``: when refused, join the lock's queue (a waiter; a single try does not)."""
    if k.local_reentry and count:
        return Attempt(Grant(token, None))
    cmds: list[Command] = [k.acquire(queue)]
    if wait is not None:
        cmds.append(("WAIT", *wait))
    sent = clock()
    try:
        replies = yield Call(cmds, write=True)
    except WriteOutcomeUnknown:
        return (yield from _after_unknown(k, count, token, sent))
    reply = replies[0]
    if not reply[0]:
        return k.refused(reply)
    granted = int(reply[1])
    if count == 0 and clock() >= sent + k.lease - drift(k.lease):
        # The reply came after the lease had run out (Redis or this process stalled): the
        # hold may already be another's.  Give it back and try again; never return a fence
        # whose lease is over before the caller sees it.
        yield from abandon(k, granted)
        return Attempt(None, 0, LATE)
    return Attempt(Grant(granted, sent, None if wait is None else int(replies[1])))


def _after_unknown(k: Kind, count: int, token: int, sent: float) -> Flow[Attempt[Grant]]:
    """The acquire was sent but its reply lost: read whether it took effect."""
    ours = k.ours((yield Call([k.still_ours()], write=False))[0], token)
    if ours is None:
        return Attempt(None, 1)  # it did not: try again
    if ours[1] == count + 1:
        return Attempt(Grant(ours[0], sent))
    raise StoreUnavailable(
        f"{k.what}: the acquire's reply was lost and its effect is ambiguous; "
        "release() and acquire again"
    )


def renew(k: Kind) -> Flow[bool]:
    """Extend the hold by a lease; False when it is no longer this owner's."""
    return bool((yield Call([k.renew()], write=True))[0])


def abandon(k: Kind, token: int | None) -> Flow[None]:
    """Give back every level of the hold issued as ``token`` (a lost or late one); ``None``:
    whichever hold this owner has (an acquire cancelled in flight, whose token is unknown)."""
    cmd = k.release(every_level=True, last=True, token=token)
    if cmd is not None:
        yield Call([cmd], write=True)


def release(k: Kind, *, last: bool, token: int) -> Flow[None]:
    """Release one level; ``LockLost`` if Redis says it was no longer ours."""
    cmd = k.release(every_level=False, last=last)
    if cmd is None:
        return
    now_held_by = k.released((yield Call([cmd], write=True))[0])
    if now_held_by is not None:
        holder = f"; {now_held_by} holds it now" if now_held_by else ""
        raise LockLost(
            f"{k.what} was lost before release: its lease of {k.lease:g} s had run "
            f"out{holder}. Another holder may have entered; writes fenced with token "
            f"{token} are refused"
        )


def leave(k: Kind) -> Flow[None]:
    """A waiter that gives up (timed out, cancelled, failed) leaves the queue at once, passing
    its turn on if it had come: the next waiter need not wait for this entry's lease."""
    cmd = k.leave()
    if cmd is not None:
        yield Call([cmd], write=True)


def locked(layout: LockLayout) -> Flow[bool]:
    return bool((yield Call([("EXISTS", layout.hold)], write=False))[0])


def replicas_message(what: str, acked: int, wanted: int, timeout: float) -> str | None:
    """None when ``acked`` replicas are enough; else what a failover could do now."""
    if acked >= wanted:
        return None
    return (
        f"{what}: only {acked} of {wanted} replicas confirmed the acquisition within "
        f"{timeout:g} s; a failover now could give the lock to a second holder"
    )


def eviction_check() -> Flow[tuple[Any, Any]]:
    """The server's (maxmemory-policy, maxmemory) replies (``LockBase._warn_if_evicting``)."""
    policy, limit = yield Call(
        [("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "GET", "maxmemory")], write=False
    )
    return policy, limit


# ---- Semaphore -------------------------------------------------------------------------------


def _sem_keys(layout: LockLayout) -> tuple[str, str, str, str]:
    return layout.permits, layout.limit, layout.sem_queue, layout.sem_queue_leases


def sem_attempt(layout: LockLayout, permit: str, lease: float, permits: int,
                queue: bool = False, clock: Clock = time.monotonic
                ) -> Flow[Attempt[float]]:  # fmt: skip
    """Take ``permit``; the value is when the request was sent (the hold's lease start).
    ``queue``: when refused, join the semaphore's queue under the permit id (or keep its
    place)."""
    entry_ms = lease_ms(queue_lease(lease)) if queue else 0
    sent = clock()
    reply = (yield Call([evalsha("sem_acquire", _sem_keys(layout), permit, lease_ms(lease),
                                 permits, entry_ms, layout.notify)], write=True))[0]  # fmt: skip
    if not reply[0]:
        return refusal(reply, lease, holder=f"{permits} other permit holders",
                       turn="a permit is free, but it is the turn of {who}, a waiter queued "
                       "ahead")  # fmt: skip
    if clock() >= sent + lease - drift(lease):
        yield from sem_give_back(layout, permit)  # granted after its lease ran out: not usable
        return Attempt(None, 0, LATE)
    return Attempt(sent)


def sem_renew(layout: LockLayout, permit: str, lease: float) -> Flow[bool]:
    cmd = evalsha("zset_renew", (layout.permits,), permit, lease_ms(lease),
                  scripts.PERMITS_OUTLIVE_MS)  # fmt: skip
    return bool((yield Call([cmd], write=True))[0])


def sem_give_back(layout: LockLayout, permit: str) -> Flow[bool]:
    """Give ``permit`` back; the release names the waiters whose turn it makes."""
    cmd = evalsha("sem_release", _sem_keys(layout), permit, layout.notify)
    return bool((yield Call([cmd], write=True))[0])


def sem_leave(layout: LockLayout, permit: str) -> Flow[None]:
    """A waiter for ``permit`` gives up: it leaves the queue, passing its turn on."""
    yield Call([evalsha("sem_leave", _sem_keys(layout), permit, layout.notify)], write=True)


def sem_release(what: str, layout: LockLayout, permit: str, lease: float) -> Flow[None]:
    """Give back ``permit``; ``LockLost`` if it had run out before."""
    if not (yield from sem_give_back(layout, permit)):
        raise LockLost(
            f"{what} permit {permit} had run out ({lease:g} s lease) "
            "before release: more holders than permits may have overlapped"
        )


# ---- Redlock: one node's steps (the driver asks each node in turn) ----------------------------


def node_set(key: str, owner: str, lease: float) -> Flow[bool]:
    return bool((yield Call([("SET", key, owner, "NX", "PX", lease_ms(lease))], write=True))[0])


def node_extend(key: str, owner: str, lease: float) -> Flow[bool]:
    cmd = evalsha("redlock_extend", (key,), owner, lease_ms(lease))
    return bool(int((yield Call([cmd], write=True))[0]))


def node_release(key: str, owner: str) -> Flow[bool]:
    return bool(int((yield Call([evalsha("redlock_release", (key,), owner)], write=True))[0]))


def next_fence(layout: LockLayout) -> Flow[int]:
    """A fencing token from the authority's counter."""
    return int((yield Call([evalsha("fence_next", (layout.fence,))], write=True))[0])


def redlock_validity(lease: float, started: float, granted: int, quorum: int,
                     clock: Clock = time.monotonic) -> float | None:  # fmt: skip
    """The validity left after asking every node, or None: not held (give it back)."""
    validity = lease - (clock() - started) - drift(lease)
    return validity if granted >= quorum and validity > 0 else None
