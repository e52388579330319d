"""The change-message and stored-value formats (pure; documented in docs/protocol.md).

Change message, version 2, all integers big-endian::

    "sm" | ver:u8=2 | op:u8 | flags:u8 | bucket:u16 | seq:u64 | epoch:u64 | origin_len:u8
         | origin | count:u32 | count x (len:u32 | field) [ | stamp_ms:u64 ] [ | mac:20 ]

``flags`` bit 0 set: the message ends with ``HMAC-SHA1(key, everything before the MAC)`` (the
map's signing key, :mod:`syncmap.signing`).  Bit 1 set: the fields are followed by ``stamp_ms``,
the Redis server time (``TIME``, ms) of the write, which a receiver subtracts from its estimate
of the server clock to measure how old the change is on arrival (``syncmap.otel``'s feed lag and
staleness).  No other bit is defined.  Version 1 (no ``flags``, no
MAC) is refused: a store-mode map of this version shares Redis only with servers of key layout 2,
which already writes version 2.

The keys of one message carry consecutive versions ``seq, seq+1, ...`` (a batch from ``update``).
A ``clear`` message has count 0 and one version.  A ``ping`` (start-up self-check) has seq 0 and
one field, the nonce.  Messages are built inside the Lua write scripts (``store/scripts.py``), so
the version in the message is the one the store assigned in the same atomic step.

Every message of a bucket also extends the bucket's *digest chain* (:func:`link`,
:func:`next_digest`), which the store keeps in the reserved field ``#h`` and a probe returns: a
reader that applied other messages than the store made sees a different digest at the same
sequence (docs/protocol.md §4.2).

Stored value: ``version:u64 | deadline_ms:u64 | epoch:u64 | payload`` where deadline 0 means no
expiry and is otherwise a Redis server ``TIME`` in milliseconds, and epoch is the bucket's epoch
when the value was written (so a reader can tell a new epoch's small version from an old epoch's
large one).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import CorruptData

OP_SET = 1
OP_DEL = 2
OP_CLEAR = 3
OP_EXPIRE = 4
OP_PING = 5
OP_NAMES = {
    OP_SET: "set",
    OP_DEL: "delete",
    OP_CLEAR: "clear",
    OP_EXPIRE: "expire",
    OP_PING: "ping",
}

VERSION = 2
SIGNED = 0x01
"""``flags`` bit: the message ends with a 20-byte HMAC-SHA1."""
STAMPED = 0x02
"""``flags`` bit: the fields are followed by the write's Redis server time, ms (u64)."""
MAC_SIZE = 20
_STAMP = struct.Struct(">Q")
_HEAD = struct.Struct(">2sBBBHQQB")
_LINK = struct.Struct(">BQ")
_U32 = struct.Struct(">I")
_VALUE_HEAD = VALUE_HEAD = struct.Struct(">QQQ")
"""The stored value's header: version, deadline ms, epoch (``VALUE_HEAD.unpack_from(stored)``)."""
VALUE_HEAD_SIZE = _VALUE_HEAD.size
MAX_FIELDS = 4096
"""The most keys a change message may name and still be applied key by key.

syncmap's own writers name at most 1,000 (one ``update()`` chunk, map.py) or 500 (the probe's
expiry reaping, ``REAP_LIMIT`` in store/commands.py); a writer must stay at or below this.  A
message naming more is decoded without its keys (:attr:`ChangeMessage.oversized`) and the near
cache treats its bucket as changed (flush and repair), so one message costs bounded work whatever
it claims (a 5 MB message naming a million keys used to stall every map of the process for
seconds)."""


@dataclass(frozen=True, slots=True)
class ChangeMessage:
    op: int
    bucket: int
    seq: int
    epoch: int
    origin: str
    fields: tuple[bytes, ...]
    oversized: bool = False
    """It named more than :data:`MAX_FIELDS` keys: ``fields`` is empty, its keys were skipped."""
    stamp_ms: int = 0
    """The write's Redis server time in ms (flags bit 1), or 0 when the message has none."""

    @property
    def last_seq(self) -> int:
        """The highest version this message accounts for."""
        return self.seq + max(len(self.fields), 1) - 1


def encode_message(msg: ChangeMessage, key: bytes | None = None) -> bytes:
    """Python-side encoder (the Lua scripts build the same bytes); used by tests and pings.
    ``key``: sign it (HMAC-SHA1, flags bit 0).  A ``stamp_ms`` is written (flags bit 1)."""
    origin = msg.origin.encode()
    flags = (SIGNED if key is not None else 0) | (STAMPED if msg.stamp_ms else 0)
    head = _HEAD.pack(b"sm", VERSION, msg.op, flags, msg.bucket, msg.seq, msg.epoch, len(origin))
    stamp = _STAMP.pack(msg.stamp_ms) if msg.stamp_ms else b""
    data = b"".join((head, origin, _fields(msg.fields), stamp))
    return data if key is None else data + mac(key, data)


def _fields(fields: Sequence[bytes]) -> bytes:
    """``count | count x (len | field)``: the tail of a message, and of its chain link."""
    parts = [_U32.pack(len(fields))]
    for field in fields:
        parts.append(_U32.pack(len(field)))
        parts.append(field)
    return b"".join(parts)


def mac(key: bytes, data: bytes) -> bytes:
    """The MAC of a change message (what the scripts compute in Lua from ipad/opad)."""
    return hmac.digest(key, data, hashlib.sha1)


def verify(data: bytes, keys: Sequence[bytes]) -> bool:
    """Whether ``data`` is a signed message whose MAC one of ``keys`` made (constant time each)."""
    if len(data) < _HEAD.size + MAC_SIZE or data[2] != VERSION or not data[4] & SIGNED:
        return False
    body, tag = bytes(data[:-MAC_SIZE]), bytes(data[-MAC_SIZE:])
    return any(hmac.compare_digest(tag, mac(k, body)) for k in keys)


def link(msg: ChangeMessage) -> str:
    """What one message adds to its bucket's digest chain: the SHA-1 (hex) of ``op:u8 | seq:u64 |
    count | fields`` (the scripts: ``redis.sha1hex`` of the same bytes)."""
    # SHA-1 because Lua has only redis.sha1hex; a forger needs a second preimage, not a collision.
    return hashlib.sha1(_LINK.pack(msg.op, msg.seq) + _fields(msg.fields)).hexdigest()  # noqa: S324


def next_digest(prev: str, link_hex: str) -> str:
    """The bucket's digest after a message: the first 16 hex digits of SHA-1(prev | link).  A new
    epoch starts from ``""``."""
    return hashlib.sha1((prev + link_hex).encode()).hexdigest()[:16]  # noqa: S324 (see link)


def decode_message(data: bytes) -> ChangeMessage:
    """Parse one change message; anything malformed raises :class:`CorruptData`.

    A MAC, when flagged, is skipped here, not checked: :func:`verify` is the reader's gate."""
    try:
        magic, ver, op, flags, bucket, seq, epoch, olen = _HEAD.unpack_from(data, 0)
        if magic != b"sm" or ver != VERSION or op not in OP_NAMES or flags & ~(SIGNED | STAMPED):
            raise CorruptData(f"not a syncmap v2 change message: header {data[: _HEAD.size]!r}")
        end = len(data) - (MAC_SIZE if flags & SIGNED else 0)
        stamp_ms = 0
        if flags & STAMPED:
            end -= _STAMP.size
            if end < _HEAD.size:
                raise CorruptData("change message too short for its stamp")
            (stamp_ms,) = _STAMP.unpack_from(data, end)
        pos = _HEAD.size
        if pos + olen > end:
            raise CorruptData("change message truncated inside its origin")
        origin = bytes(data[pos : pos + olen]).decode()
        pos += olen
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if end - pos < 4 * count:  # each key takes at least its length prefix
            raise CorruptData(f"change message claims {count} keys in {end - pos} bytes")
        if count > MAX_FIELDS:  # skip the keys: see MAX_FIELDS
            return ChangeMessage(op, bucket, seq, epoch, origin, (), True, stamp_ms)
        fields = []
        for _ in range(count):
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + n > end:
                raise CorruptData("change message truncated inside a key")
            fields.append(bytes(data[pos : pos + n]))
            pos += n
        if pos != end:
            raise CorruptData(f"change message has {end - pos} trailing bytes")
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptData(f"malformed change message ({exc})") from exc
    return ChangeMessage(op, bucket, seq, epoch, origin, tuple(fields), False, stamp_ms)


def pack_value(version: int, deadline_ms: int, payload: bytes, epoch: int = 0) -> bytes:
    return _VALUE_HEAD.pack(version, deadline_ms, epoch) + payload


def unpack_value(data: bytes) -> tuple[int, int, bytes]:
    """(version, deadline_ms, payload) of a stored value."""
    version, deadline, _, payload = unpack_value_epoch(data)
    return version, deadline, payload


def unpack_value_epoch(data: bytes) -> tuple[int, int, int, bytes]:
    """(version, deadline_ms, epoch, payload) of a stored value."""
    if len(data) < VALUE_HEAD_SIZE:
        raise CorruptData(f"stored value of {len(data)} bytes is shorter than its header")
    version, deadline, epoch = _VALUE_HEAD.unpack_from(data, 0)
    return version, deadline, epoch, data[VALUE_HEAD_SIZE:]
