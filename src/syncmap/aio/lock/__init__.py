"""Distributed locks for asyncio: ``Lock``, ``RWLock``, ``Semaphore``, ``Redlock``.

The same names, parameters, tokens and errors as ``syncmap.lock``'s; every round trip is the
same flow (``syncmap.lock.flows``) run by the asyncio driver.  ``async with Lock(name, url) as
fence:``; waiters are woken by the release message; each hold's lease is renewed by a task the
lock owns (cancelled on release and ``aclose()``).  :func:`aclose_loop_resources` disconnects
the running loop's shared lock connections and subscriptions (call it before the loop ends).
"""

from ...lock.lease import Fence
from .executors import aclose_shared
from .mutex import Lock
from .redlock import Redlock
from .rwlock import RWLock
from .semaphore import Semaphore
from .waiting import aclose_wakers


async def aclose_loop_resources() -> None:
    """Detach this loop's wakers from the subscriber and close its shared lock executors."""
    await aclose_wakers()
    await aclose_shared()


__all__ = ["Fence", "Lock", "RWLock", "Redlock", "Semaphore", "aclose_loop_resources"]
