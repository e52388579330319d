"""syncmap for asyncio services: the same maps and locks, as coroutines (docs/asyncio.md).

Drivers only: every operation is the flow the thread driver runs (``syncmap.flows``), every
decision about change messages and probes is the thread engine's (``syncmap.changes``), and
every lock round trip is ``syncmap.lock.flows``'.
"""

from ..flows.reads import MISSING
from .lock import Fence, Lock, Redlock, RWLock, Semaphore, aclose_loop_resources
from .map import SyncMap
from .opening import open_map
from .replicated import ReplicatedMap

__all__ = [
    "MISSING",
    "Fence",
    "Lock",
    "RWLock",
    "Redlock",
    "ReplicatedMap",
    "Semaphore",
    "SyncMap",
    "aclose_loop_resources",
    "open_map",
]
