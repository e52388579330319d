"""Distributed locks: ``Lock``, ``RWLock``, ``Semaphore``, ``Redlock``; fencing with ``Fence``.

See docs/locks.md for which to use when, and what fencing protects.
"""

from .lease import Fence
from .mutex import Lock
from .redlock import Redlock
from .rwlock import RWLock
from .semaphore import Semaphore

__all__ = ["Fence", "Lock", "RWLock", "Redlock", "Semaphore"]
