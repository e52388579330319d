"""Replicated mode's core: every server holds the whole map and applies every change message.

Pure: no I/O, no threads, no clock of its own (the driver passes wall-clock milliseconds).

Convergence (DESIGN §3, replicated mode): every write carries a **version** ``(hlc, origin)``: a
hybrid logical clock value and the writing server's id.  A server applies a message only when its
version is newer than what it holds for that key (deletes are kept as *tombstones* so an older
write arriving later cannot bring a deleted key back), and ``clear`` sets a watermark below which
every write is void.  Applying is then idempotent and order-free: whatever order and however many
times the messages arrive, every server that received the same set holds the same map.  That is
"last writer wins" by hybrid time, with the server id breaking ties.

The hybrid clock: ``hlc = max(last + 1, wall_ms << 16)``, and every version seen raises ``last``.
So a server's own writes are ordered, and a write made after seeing another one is newer than it
even if this server's wall clock is behind (causality survives clock skew; only concurrent
writes are decided by the clocks).  16 bits of logical counter per millisecond.

Message format (version 1, integers big-endian; docs/protocol.md)::

    "sr" | ver:u8=1 | op:u8 | hlc:u64 | deadline_ms:u64 | origin_len:u8 | origin
         | key_len:u32 | key field | payload (the rest)

``op``: 1 set, 2 delete, 3 clear (no key, no payload), 5 ping (key = nonce), 6 sync request (a
server asks its peers to re-send what they hold), 7 sync done (key = the requester's id).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptData
from ..keys import Key, decode_key

R_SET, R_DEL, R_CLEAR, R_PING, R_SYNC, R_SYNCED = 1, 2, 3, 5, 6, 7
_OPS = {R_SET, R_DEL, R_CLEAR, R_PING, R_SYNC, R_SYNCED}
_HEAD = struct.Struct(">2sBBQQB")
_U32 = struct.Struct(">I")
Version = tuple[int, str]
ZERO: Version = (0, "")


@dataclass(frozen=True, slots=True)
class ReplicaMessage:
    op: int
    hlc: int
    origin: str
    field: bytes = b""
    payload: bytes = b""
    deadline_ms: int = 0

    @property
    def version(self) -> Version:
        return (self.hlc, self.origin)


def encode(msg: ReplicaMessage) -> bytes:
    origin = msg.origin.encode()
    return b"".join((
        _HEAD.pack(b"sr", 1, msg.op, msg.hlc, msg.deadline_ms, len(origin)), origin,
        _U32.pack(len(msg.field)), msg.field, msg.payload,
    ))  # fmt: skip


def decode(data: bytes) -> ReplicaMessage:
    """Parse one replicated-mode message; anything malformed raises :class:`CorruptData`."""
    try:
        magic, ver, op, hlc, deadline, olen = _HEAD.unpack_from(data, 0)
        if magic != b"sr" or ver != 1 or op not in _OPS:
            raise CorruptData(f"not a syncmap replicated-mode message: {data[: _HEAD.size]!r}")
        pos = _HEAD.size
        origin = data[pos : pos + olen].decode()
        pos += olen
        (klen,) = _U32.unpack_from(data, pos)
        pos += 4
        if pos + klen > len(data):
            raise CorruptData("replicated-mode message truncated inside its key")
        field = bytes(data[pos : pos + klen])
        payload = bytes(data[pos + klen :])
    except (struct.error, UnicodeDecodeError) as exc:
        raise CorruptData(f"malformed replicated-mode message ({exc})") from exc
    return ReplicaMessage(op, hlc, origin, field, payload, deadline)


class HybridClock:
    """Versions that increase on this server and exceed every version it has seen."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = 0

    def tick(self, wall_ms: int) -> int:
        self.last = max(self.last + 1, wall_ms << 16)
        return self.last

    def observe(self, hlc: int) -> None:
        self.last = max(self.last, hlc)


class Slot:
    """What a server holds for one key: a value, or a tombstone (``payload is None``).

    ``kc`` is the key's class (``str``, ``bytes`` or ``int``): a read serves the slot only to a
    key of that class, so ``True`` or ``1.0`` (equal to ``1``, and hashed alike) never reads
    key ``1``, as in store mode (``Entry.kc``)."""

    __slots__ = ("deadline_ms", "kc", "payload", "value", "version")

    def __init__(self, version: Version, payload: bytes | None, value: Any, deadline_ms: int,
                 kc: type = object) -> None:  # fmt: skip
        self.version = version
        self.payload = payload
        self.value = value
        self.deadline_ms = deadline_ms
        self.kc = kc

    def live(self, wall_ms: int) -> bool:
        return self.payload is not None and not (0 < self.deadline_ms <= wall_ms)


@dataclass(frozen=True, slots=True)
class Change:
    """What applying a message changed, for events: ``key`` None for a clear."""

    key: Key | None
    op: str
    version: Version


class Replica:
    """The whole map on one server, and the merge rule.  ``decode_value`` turns a payload into
    the value readers get (called once per applied write; the driver passes the codec)."""

    def __init__(self) -> None:
        self.slots: dict[Key, Slot] = {}
        self.cleared: Version = ZERO
        self.clock = HybridClock()
        self.applied = 0
        self.ignored = 0

    def apply(self, msg: ReplicaMessage, value: Any = None) -> Change | None:
        """Merge one set/delete/clear; returns the change, or None when it changed nothing
        (a duplicate, an older version, or a write below the clear watermark)."""
        v = msg.version
        self.clock.observe(msg.hlc)
        if msg.op == R_CLEAR:
            if v <= self.cleared:
                self.ignored += 1
                return None
            self.cleared = v
            for k in [k for k, s in self.slots.items() if s.version < v]:
                del self.slots[k]
            self.applied += 1
            return Change(None, "clear", v)
        key = decode_key(msg.field)
        held = self.slots.get(key)
        if v <= self.cleared or (held is not None and held.version >= v):
            self.ignored += 1
            return None
        if msg.op == R_SET:
            self.slots[key] = Slot(v, msg.payload, value, msg.deadline_ms, key.__class__)
        else:
            self.slots[key] = Slot(v, None, None, 0, key.__class__)
        self.applied += 1
        return Change(key, "set" if msg.op == R_SET else "delete", v)

    def would_apply(self, msg: ReplicaMessage) -> bool:
        """Whether :meth:`apply` would change anything (so the driver decodes only then)."""
        if msg.version <= self.cleared:
            return False
        if msg.op == R_CLEAR:
            return True
        held = self.slots.get(decode_key(msg.field))
        return held is None or held.version < msg.version

    def load(self, key: Key, field: bytes, payload: bytes, value: Any) -> None:
        """A snapshot entry: version ZERO, so every real write, older or newer, beats it."""
        if key not in self.slots and self.cleared == ZERO:
            self.slots[key] = Slot(ZERO, payload, value, 0, key.__class__)

    def state(self) -> Iterator[tuple[Key, Slot]]:
        """Everything held, tombstones included (what a sync re-sends)."""
        return iter(list(self.slots.items()))
