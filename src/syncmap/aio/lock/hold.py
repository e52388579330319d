"""``AsyncHold``: one acquisition in force on an event loop, renewed by a task it owns.

The bookkeeping and every decision are ``syncmap.lock.lease.Lease``'s, shared with the thread
driver; this module only waits and does the round trips.  How a loss is found and told:

1. the renewal task sleeps until a third of the lease, renews (a flow on the loop's executor),
   and sleeps again; a network failure is retried soon, never past ``valid_until``;
2. a renewal that finds the hold gone, or finds ``valid_until`` passed, loses it;
3. a loop that was blocked (or a process paused) past ``valid_until`` sees ``valid`` false at
   once, and :meth:`AsyncHold.check` marks it lost and wakes the task;
4. the task then tells the loss once: counted and logged, the hold given back in Redis if it is
   still ours (so waiters need not wait for the lease), then ``on_lost`` is called (on the loop).

:meth:`AsyncHold.end` (release) marks the hold released *before* stopping the task, so a renewal
reply arriving in between is not read as a loss; a loss already found is still told first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from ...aiotasks import stop_task
from ...errors import LockLost, SyncMapError
from ...lock.lease import PAUSED, Lease

log = logging.getLogger("syncmap.lock")


class AsyncHold(Lease):
    """A hold whose lease a task of its own renews; made (and its task started) on the loop."""

    def __init__(
        self,
        what: str,
        lease: float,
        sent_at: float,
        renew: Callable[[], Awaitable[bool]],
        abandon: Callable[[], Awaitable[object]],
        on_lost: Callable[[LockLost], None] | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        renewing: bool = True,
    ) -> None:
        super().__init__(what, lease, sent_at, on_lost, clock)
        self._renew = renew
        self._abandon = abandon
        self._wake = asyncio.Event()
        self._told = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(sent_at + lease / 3 if renewing else float("inf")),
            name=f"syncmap-renew {what}",
        )

    def check(self) -> None:
        """Raise ``LockLost`` if this hold is lost or its lease has run out on our clock."""
        if self.overdue and self._lose(PAUSED.format(lease=self.lease)):
            self._wake.set()  # the renewal task tells the loss (it may do I/O; we may not)
        if self.lost is not None:
            raise self.lost

    async def end(self) -> None:
        """The holder gives it up: stop renewing, then ``LockLost`` if it had been lost."""
        lost = self.lost
        self.released = True  # from here on no renewal reply counts as a loss
        # Not lost: cancel the renewal (no renewal may follow the release).  Lost: let the task
        # finish telling the loss (it gives the lock back), cancelled only if that hangs.
        await stop_task(self._task, wake=None if lost is None else self._wake.set)
        if lost is not None:
            raise lost

    async def _run(self, due: float | None) -> None:
        while due is not None and self.lost is None and not self.released:
            await self._sleep_until(due)
            due = await self._tick()
        if self.lost is not None and not self._told:
            await self._tell()

    async def _sleep_until(self, due: float) -> None:
        self._wake.clear()
        delay = due - self._clock()
        if delay > 0 and self.lost is None:
            with contextlib.suppress(TimeoutError):
                # No deadline when not renewing (``due`` is inf): only a loss found by check().
                async with asyncio.timeout(None if delay == float("inf") else delay):
                    await self._wake.wait()

    async def _tick(self) -> float | None:
        go, _ = self.renew_due()
        if not go:
            return None
        sent = self._clock()
        try:
            ok = await self._renew()
        except SyncMapError as exc:  # unreachable or unknown: try again soon
            return self.failed(exc)
        except Exception:  # never a dead renewal task (python-redis-lock's trap)
            log.exception("syncmap: renewing %s failed; retrying", self.what)
            return min(self._clock() + 0.5, self.valid_until)
        return self.renewed(sent, ok)[0]

    async def _tell(self) -> None:
        self._told = True
        self.announce()
        try:
            await self._abandon()  # give it back now if it is still ours
        except SyncMapError as exc:
            log.warning("syncmap: could not give back %s after its loss: %s", self.what, exc)
        self.tell()
