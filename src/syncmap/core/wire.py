"""The change-message and stored-value formats (pure; documented in docs/protocol.md).

Change message, version 1, all integers big-endian::

    "sm" | ver:u8=1 | op:u8 | bucket:u16 | seq:u64 | epoch:u64 | origin_len:u8 | origin
         | count:u32 | count x (len:u32 | field)

The keys of one message carry consecutive versions ``seq, seq+1, ...`` (a batch from ``update``).
A ``clear`` message has count 0 and one version.  A ``ping`` (start-up self-check) has seq 0 and
one field, the nonce.  Messages are built inside the Lua write scripts (``store/scripts.py``), so
the version in the message is the one the store assigned in the same atomic step.

Stored value: ``version:u64 | deadline_ms:u64 | epoch:u64 | payload`` where deadline 0 means no
expiry and is otherwise a Redis server ``TIME`` in milliseconds, and epoch is the bucket's epoch
when the value was written (so a reader can tell a new epoch's small version from an old epoch's
large one).
"""

from __future__ import annotations

import struct
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

_HEAD = struct.Struct(">2sBBHQQB")
_U32 = struct.Struct(">I")
_VALUE_HEAD = VALUE_HEAD = struct.Struct(">QQQ")
"""The stored value's header: version, deadline ms, epoch (``VALUE_HEAD.unpack_from(stored)``)."""
VALUE_HEAD_SIZE = _VALUE_HEAD.size
MAX_FIELDS = 4096
"""The most keys a change message may name and still be applied key by key.

syncmap's own writers name at most 1,000 (one ``update()`` chunk, map.py) or 500 (the probe's
expiry reaping, ``_REAP_LIMIT`` in store/redis_store.py); a writer must stay at or below this.  A
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

    @property
    def last_seq(self) -> int:
        """The highest version this message accounts for."""
        return self.seq + max(len(self.fields), 1) - 1


def encode_message(msg: ChangeMessage) -> bytes:
    """Python-side encoder (the Lua scripts build the same bytes); used by tests and pings."""
    origin = msg.origin.encode()
    parts = [_HEAD.pack(b"sm", 1, msg.op, msg.bucket, msg.seq, msg.epoch, len(origin)), origin]
    parts.append(_U32.pack(len(msg.fields)))
    for field in msg.fields:
        parts.append(_U32.pack(len(field)))
        parts.append(field)
    return b"".join(parts)


def decode_message(data: bytes) -> ChangeMessage:
    """Parse one change message; anything malformed raises :class:`CorruptData`."""
    try:
        magic, ver, op, bucket, seq, epoch, olen = _HEAD.unpack_from(data, 0)
        if magic != b"sm" or ver != 1 or op not in OP_NAMES:
            raise CorruptData(f"not a syncmap v1 change message: header {data[: _HEAD.size]!r}")
        pos = _HEAD.size
        origin = data[pos : pos + olen].decode()
        pos += olen
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if len(data) - pos < 4 * count:  # each key takes at least its length prefix
            raise CorruptData(f"change message claims {count} keys in {len(data) - pos} bytes")
        if count > MAX_FIELDS:  # skip the keys: see MAX_FIELDS
            return ChangeMessage(op, bucket, seq, epoch, origin, (), oversized=True)
        fields = []
        for _ in range(count):
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            if pos + n > len(data):
                raise CorruptData("change message truncated inside a key")
            fields.append(bytes(data[pos : pos + n]))
            pos += n
        if pos != len(data):
            raise CorruptData(f"change message has {len(data) - pos} trailing bytes")
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptData(f"malformed change message ({exc})") from exc
    return ChangeMessage(op, bucket, seq, epoch, origin, tuple(fields))


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
