"""Key encoding and the Redis key layout: the one module that builds every Redis name.

A user key becomes a hash *field* with a one-byte type tag, so ``"1"``, ``b"1"`` and ``1`` stay
three distinct keys (as they are in a dict) and never collide once stringified:

    str   -> b"s" + UTF-8        bytes -> b"b" + raw        int -> b"i" + decimal ASCII

A map ``users`` with B buckets owns, for every bucket ``b`` (hash tag ``{<ns>:users:b}`` so one Lua
script touches one Redis Cluster slot), in key layout 2 (docs/protocol.md):

    <ns>:{users:b}:d   hash    field -> header(version, deadline, epoch) + codec payload, and the
                               bucket's bookkeeping in reserved fields (:data:`RESERVED`):
                               ``#e`` epoch, ``#s`` last version, ``#c`` settings stamp
    <ns>:{users:b}:x   zset    field -> expiry deadline in Redis server milliseconds

plus ``<ns>:{users}:meta`` (bucket count, codec) and the change channel ``<ns>:{users}:ch``.
On a sharded topology (Redis Cluster: layout 2s, docs/protocol.md) each bucket has its own
change channel ``<ns>:{users:b}:ch`` in its slot, published with ``SPUBLISH``, and a lock made
by ``map.lock(key)`` lives under its key's bucket tag (``LockLayout.tag``), so a fenced write
reads its fence counter in the write's own slot.
The bookkeeping lives in the data hash so that it lives and dies with the data: a data hash
evicted by ``maxmemory`` takes its epoch with it, which every server's probe notices.  (Layout 1
kept epoch and seq in a separate hash ``:m``; evicting one without the other went unnoticed.)

A lock ``orders`` (any kind) owns keys under the hash tag ``{lock:orders}``: see :class:`LockLayout`
and docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, CorruptData, InvalidKey, KeyTypeError

Key = str | bytes | int
Entries = (
    Mapping[str, Any] | Mapping[bytes, Any] | Mapping[int, Any] | Mapping[Key, Any]
    | Iterable[tuple[Key, Any]]
)  # fmt: skip
"""What ``update()`` takes.  Mapping is invariant in its key type, so a ``dict[str, int]`` is not
a ``Mapping[Key, Any]``: each key type is named, so a typed caller's dict passes mypy --strict."""

RESERVED = frozenset({b"#e", b"#s", b"#c", b"#h"})
"""The bookkeeping fields of a bucket's data hash.  Key fields start with ``s``, ``b`` or ``i``,
so these never collide with a key; readers of a whole data hash skip every field starting with
``#`` (:func:`is_key_field`)."""


def is_key_field(field: bytes) -> bool:
    """Whether a data hash field is a key's (not bookkeeping)."""
    return field[:1] != b"#"


_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/]{1,200}$")


def encode_key(key: object, max_bytes: int) -> bytes:
    """The field bytes of ``key``; raises before anything is sent when it cannot be stored."""
    cls = key.__class__
    if isinstance(key, str):
        try:
            field = b"s" + key.encode()
        except UnicodeEncodeError as exc:
            raise InvalidKey(
                f"key {clip(key)} cannot be encoded as UTF-8 ({exc.reason}); use bytes for "
                "binary keys"
            ) from exc
    elif isinstance(key, bytes | bytearray | memoryview):
        field = b"b" + bytes(key)
    elif isinstance(key, int) and cls is not bool:
        field = b"i" + str(int(key)).encode()
    else:
        raise KeyTypeError(
            f"syncmap keys must be str, bytes or int, not {type(key).__name__} ({clip(key)}); "
            "convert the key first (bool is refused because True == 1 would alias key 1)"
        )
    if len(field) - 1 > max_bytes:
        raise InvalidKey(
            f"key of {len(field) - 1} bytes exceeds max_key_bytes={max_bytes}; "
            "shorten it or raise the limit in MapConfig"
        )
    return field


def decode_key(field: bytes) -> Key:
    """Inverse of :func:`encode_key`; bytes that no encoder made raise ``CorruptData``."""
    tag, body = field[:1], field[1:]
    try:
        if tag == b"s":
            return body.decode()
        if tag == b"b":
            return bytes(body)
        if tag == b"i":
            return int(body)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise CorruptData(f"field {field[:40]!r} does not decode: {exc}") from exc
    raise CorruptData(f"unknown key tag {tag!r} in field {field[:40]!r}")


def normal_key(key: object) -> Key:
    """The key as the near cache stores it: plain str/bytes/int (subclasses normalised)."""
    if key.__class__ in (str, bytes, int):
        return key
    if isinstance(key, str):
        return str(key)
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    return int(key)  # type: ignore[call-overload, no-any-return]


def bucket_of(field: bytes, buckets: int) -> int:
    """Stable bucket of a field: every server must agree, so no Python ``hash()``."""
    return zlib.crc32(field) % buckets


def check_node_id(node_id: str | None) -> str:
    """This server's id in change messages: the one given, or ``host:pid:random``."""
    node_id = node_id or f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    if len(node_id.encode()) > 255:
        raise ConfigurationError(f"node_id {node_id[:40]!r}... is over 255 bytes")
    return node_id


def check_map_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigurationError(
            f"map name {name!r} is not allowed: use 1-200 characters from A-Z a-z 0-9 _ . - / "
            "(braces would break Redis Cluster hash tags)"
        )
    return name


@dataclass(frozen=True, slots=True)
class Layout:
    """Every Redis key and channel name of one map."""

    namespace: str
    name: str
    buckets: int

    @property
    def meta(self) -> str:
        return f"{self.namespace}:{{{self.name}}}:meta"

    @property
    def channel(self) -> str:
        return f"{self.namespace}:{{{self.name}}}:ch"

    def bucket_channel(self, bucket: int) -> str:
        """Layout 2s (sharded topologies): the change channel of one bucket, in its slot, so
        the bucket's write scripts ``SPUBLISH`` it on the master that owns the bucket."""
        return f"{self.namespace}:{{{self.name}:{bucket}}}:ch"

    def bucket_channels(self) -> list[str]:
        return [self.bucket_channel(b) for b in range(self.buckets)]

    def bucket_log(self, bucket: int) -> str:
        """Layout 2s with a ``redis+stream://`` feed (target ``!S``): the change log of one
        bucket, a Redis Stream in its slot, XADDed by its write scripts next to the SPUBLISH."""
        return f"{self.namespace}:{{{self.name}:{bucket}}}:log"

    def bucket_tag(self, bucket: int) -> str:
        """The hash tag (without braces) every key of ``bucket`` carries."""
        return f"{self.name}:{bucket}"

    @property
    def stream(self) -> str:
        """The change log of the ``redis+stream://`` feed (a Redis Stream)."""
        return f"{self.namespace}:{{{self.name}}}:log"

    @property
    def presence(self) -> str:
        """Hash node id -> JSON presence record of each server that has the map open."""
        return f"{self.namespace}:presence:{{{self.name}}}"

    def bucket_keys(self, bucket: int) -> tuple[str, str]:
        """(data hash, expiry zset) of one bucket, both in one cluster slot."""
        tag = f"{self.namespace}:{{{self.name}:{bucket}}}"
        return f"{tag}:d", f"{tag}:x"

    @property
    def data_prefix(self) -> str:
        """What every bucket's data key (:meth:`data`) starts with (CLIENT TRACKING's prefix)."""
        return f"{self.namespace}:{{{self.name}:"

    def data(self, bucket: int) -> str:
        """The data hash of one bucket (its entries and its bookkeeping fields)."""
        return f"{self.namespace}:{{{self.name}:{bucket}}}:d"


def check_lock_name(name: str) -> str:
    """Lock names are free text without braces (hash tags) or control characters."""
    if (
        not isinstance(name, str)
        or not 1 <= len(name.encode()) <= 512
        or any(c in "{}" or not c.isprintable() for c in name)
    ):
        size = f" ({len(name.encode(errors='replace'))} bytes)" if isinstance(name, str) else ""
        raise ConfigurationError(
            f"lock name {clip(name)}{size} is not allowed: use 1-512 bytes of printable text "
            "without braces (they would break Redis Cluster hash tags)"
        )
    return name


def clip(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: a key may be
    64 KiB, and a message that quotes it whole buries what it says."""
    text = repr(value[: limit + 1] if isinstance(value, str | bytes) else value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def key_lock(layout: Layout, field: bytes, bucket: int, sharded: bool) -> tuple[str, str | None]:
    """(lock name, hash tag) of ``map.lock(key)``: on a sharded topology the lock lives in the
    key's bucket's slot, so a write fenced by it checks the fence in its own slot."""
    return key_lock_name(layout.name, field), layout.bucket_tag(bucket) if sharded else None


def key_lock_name(map_name: str, field: bytes) -> str:
    """The lock name of ``SyncMap.lock(key)``: readable for plain text keys, hex otherwise, and
    ``<map>:h:<SHA-256 of the field>`` when that would be over the 512 bytes a lock name may
    have.  Every server derives the same name from the same key."""
    body = field[1:]
    name = f"{map_name}:x:{body.hex()}"
    if field[:1] in (b"s", b"i"):
        text = body.decode()
        if text.isprintable() and "{" not in text and "}" not in text:
            name = f"{map_name}:{field[:1].decode()}:{text}"
    if len(name.encode()) > 512:
        name = f"{map_name}:h:{hashlib.sha256(field).hexdigest()}"
    return name


@dataclass(frozen=True, slots=True)
class LockLayout:
    """Every Redis name of one lock, all under the hash tag ``{lock:<name>}``, or under ``tag``
    when one is given (``{<tag>}:lock:<name>``: a map's bucket on a Cluster, so that a write
    of that bucket can check the lock's fence in its own slot)."""

    namespace: str
    name: str
    tag: str | None = None
    sharded: bool = False  # on a Redis Cluster: release messages on a sharded channel

    @property
    def _tag(self) -> str:
        if self.tag is not None:
            return f"{self.namespace}:{{{self.tag}}}:lock:{self.name}"
        return f"{self.namespace}:{{lock:{self.name}}}"

    @property
    def hold(self) -> str:
        """Hash {o: owner, n: re-entries, t: token}, TTL = the lease (Lock, RWLock's writer)."""
        return self._tag

    @property
    def fence(self) -> str:
        """The last fencing token issued (no TTL)."""
        return f"{self._tag}:fence"

    @property
    def channel(self) -> str:
        """Release messages wake waiters here."""
        return f"{self._tag}:ch"

    @property
    def notify(self) -> str:
        """What the release scripts get as their channel: the channel, or on a Cluster
        ``!s:<channel>`` (``SPUBLISH``: one node in the lock's own slot, not a broadcast)."""
        return f"!s:{self.channel}" if self.sharded else self.channel

    @property
    def queue(self) -> str:
        """Lock: zset of waiters, owner -> arrival (server µs); the head's turn is next."""
        return f"{self._tag}:q"

    @property
    def queue_leases(self) -> str:
        """Lock: zset owner -> deadline (server ms) of each waiter's place in ``queue``."""
        return f"{self._tag}:qd"

    @property
    def readers(self) -> str:
        """RWLock: zset owner -> read lease deadline (server ms)."""
        return f"{self._tag}:r"

    @property
    def claims(self) -> str:
        """RWLock: zset of blocked writers -> claim deadline; readers let them go first."""
        return f"{self._tag}:w"

    @property
    def rw_queue(self) -> str:
        """RWLock: zset of waiters ``r:<owner>`` / ``w:<owner>`` -> arrival (server µs)."""
        return f"{self._tag}:rq"

    @property
    def rw_queue_leases(self) -> str:
        """RWLock: zset waiter entry -> deadline (server ms) of its place in ``rw_queue``."""
        return f"{self._tag}:rqd"

    @property
    def rw_queue_writers(self) -> str:
        """RWLock: the writers' entries of ``rw_queue`` alone (entry -> arrival)."""
        return f"{self._tag}:rqw"

    @property
    def sem_queue(self) -> str:
        """Semaphore: zset of waiting permit ids -> arrival (server µs)."""
        return f"{self._tag}:sq"

    @property
    def sem_queue_leases(self) -> str:
        """Semaphore: zset waiting permit id -> deadline (server ms) of its place."""
        return f"{self._tag}:sqd"

    @property
    def permits(self) -> str:
        """Semaphore: zset permit id -> lease deadline (server ms)."""
        return f"{self._tag}:p"

    @property
    def limit(self) -> str:
        """Semaphore: the number of permits every client must agree on."""
        return f"{self._tag}:n"
