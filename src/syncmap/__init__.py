"""syncmap: a Python dict shared by many servers.

Reads hit a near cache (nanoseconds); Redis is the source of truth; every write is one atomic round
trip that also tells every other server.  See README.md and docs/.
"""

from .codec import Codec, JsonCodec, MsgpackCodec, PickleCodec
from .config import MapConfig
from .core.nearcache import Event
from .errors import (
    ConfigurationError,
    ConflictError,
    CorruptData,
    FeedError,
    InvalidKey,
    InvalidValue,
    KeyTypeError,
    LockError,
    LockLost,
    LockNotAcquired,
    LockNotOwned,
    MapClosed,
    NoSnapshotSource,
    NotReplicated,
    RedisServerNotFound,
    StaleFence,
    StoreError,
    StoreUnavailable,
    SyncMapError,
    UnsupportedInMode,
    ValueTooLarge,
    WriteOutcomeUnknown,
)
from .lock import Fence, Lock, Redlock, RWLock, Semaphore
from .map import Statistics, SyncMap, Watch
from .opening import open_map
from .replicated import ReplicaStatistics, ReplicatedMap

__version__ = "0.1.0"

__all__ = [
    "Codec",
    "ConfigurationError",
    "ConflictError",
    "CorruptData",
    "Event",
    "FeedError",
    "Fence",
    "InvalidKey",
    "InvalidValue",
    "JsonCodec",
    "KeyTypeError",
    "Lock",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "MapClosed",
    "MapConfig",
    "MsgpackCodec",
    "NoSnapshotSource",
    "NotReplicated",
    "PickleCodec",
    "RWLock",
    "RedisServerNotFound",
    "Redlock",
    "ReplicaStatistics",
    "ReplicatedMap",
    "Semaphore",
    "StaleFence",
    "Statistics",
    "StoreError",
    "StoreUnavailable",
    "SyncMap",
    "SyncMapError",
    "UnsupportedInMode",
    "ValueTooLarge",
    "Watch",
    "WriteOutcomeUnknown",
    "open_map",
]
