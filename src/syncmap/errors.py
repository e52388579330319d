"""One error tree, split by what the caller can do about it.

Every exception syncmap raises on purpose is a :class:`SyncMapError`.  Where Python's own contracts
expect a built-in type (``KeyError`` for a missing key, ``TypeError`` for a key of the wrong type,
``ValueError`` for a value that cannot be stored), the syncmap class derives from both, so
``except TypeError`` keeps working.  Third-party exceptions (redis-py's) are wrapped at the boundary
with ``raise ... from exc``: callers never need to import redis to handle a failure.

    SyncMapError
    ├── ConfigurationError         fix the settings (bad URL, no redis-server binary, ACL refused)
    │   └── RedisServerNotFound
    ├── InvalidKey (ValueError)    the key cannot be stored (unencodable, too long)
    │   └── KeyTypeError (TypeError)
    ├── InvalidValue (ValueError)  the value cannot be stored (unencodable)
    │   └── ValueTooLarge
    ├── CorruptData                bytes in the store or on the feed that do not decode
    ├── StoreError                 the store did not do what was asked
    │   ├── StoreUnavailable       nothing happened; retry later
    │   ├── WriteOutcomeUnknown    the write may or may not have happened
    │   │   └── NotReplicated      applied on the master, too few replicas confirmed it
    │   └── StaleFence             a newer fencing token was already used: this holder lost the lock
    ├── LockError                  a distributed lock could not do what was asked
    │   ├── LockNotAcquired (TimeoutError)  not acquired within the timeout
    │   ├── LockNotOwned (RuntimeError)     released by someone who does not hold it
    │   └── LockLost                   the lease ran out or renewal failed while held
    ├── ConflictError              transform() lost every optimistic retry
    ├── FeedError                  the change feed does not deliver (start-up self-check)
    └── MapClosed                  the map was closed
"""

from __future__ import annotations


class SyncMapError(Exception):
    """Root of every error syncmap raises on purpose."""


class ConfigurationError(SyncMapError):
    """The settings are wrong: fix them, retrying will not help."""


class RedisServerNotFound(ConfigurationError):
    """No ``redis-server`` binary could be found for the embedded Redis."""


class InvalidKey(SyncMapError, ValueError):
    """The key cannot be stored (for example a ``str`` with lone surrogates, or too long)."""


class KeyTypeError(InvalidKey, TypeError):
    """The key is not a ``str``, ``bytes`` or ``int``."""


class InvalidValue(SyncMapError, ValueError):
    """The value cannot be encoded by the map's codec.  Nothing was sent."""


class ValueTooLarge(InvalidValue):
    """The encoded value is larger than the map's ``max_value_bytes``.  Nothing was sent."""


class CorruptData(SyncMapError):
    """Bytes read from the store or the feed do not decode with this map's codec or format."""


class StoreError(SyncMapError):
    """The store did not carry out a request."""


class StoreUnavailable(StoreError):
    """The store could not be reached; the request was not carried out.  Safe to retry."""


class WriteOutcomeUnknown(StoreError):
    """The connection failed after a write was sent: it may or may not have been applied.

    The key has been dropped from this server's near cache, so the next read fetches the truth.
    """


class NotReplicated(WriteOutcomeUnknown):
    """The write was applied on the master, but fewer replicas than ``MapConfig.wait_replicas``
    confirmed it within ``wait_timeout``: a failover now may lose it.  Read the key to find out
    what survived; the key has been dropped from this server's near cache."""


class StaleFence(StoreError):
    """The write carried a fencing token older than one the store already accepted.

    Nothing was written.  Another holder took the lock after this one's lease ran out: stop working
    on the protected resource and re-acquire the lock.
    """


class LockError(SyncMapError):
    """A distributed lock could not do what was asked."""


class LockNotAcquired(LockError, TimeoutError):
    """The lock was not acquired within the timeout (or at once, for a non-blocking try)."""


class LockNotOwned(LockError, RuntimeError):
    """``release()`` by an owner that does not hold the lock.  Nothing was changed."""


class LockLost(LockError):
    """The lock's lease ran out, or its renewal failed, while it was held.

    Another holder may have entered the critical section since: writes fenced with this hold's
    token are refused by the map (``StaleFence``).  Stop, release, and acquire again.
    """


class ConflictError(SyncMapError):
    """An optimistic read-modify-write (``transform``) lost the race on every retry."""


class FeedError(SyncMapError):
    """The change feed does not deliver messages (the start-up self-check failed)."""


class NoSnapshotSource(ConfigurationError):
    """A replicated map on a feed that keeps no history was given no ``snapshot=`` to start from."""


class UnsupportedInMode(SyncMapError, NotImplementedError):
    """The operation needs a store (one authority), and this map is in replicated mode."""


class MapClosed(SyncMapError):
    """The map was closed; open a new one."""


__all__ = [
    "ConfigurationError",
    "ConflictError",
    "CorruptData",
    "FeedError",
    "InvalidKey",
    "InvalidValue",
    "KeyTypeError",
    "LockError",
    "LockLost",
    "LockNotAcquired",
    "LockNotOwned",
    "MapClosed",
    "NoSnapshotSource",
    "NotReplicated",
    "RedisServerNotFound",
    "StaleFence",
    "StoreError",
    "StoreUnavailable",
    "SyncMapError",
    "UnsupportedInMode",
    "ValueTooLarge",
    "WriteOutcomeUnknown",
]
