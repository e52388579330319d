"""The five map scripts of ``scripts.py`` (set, delete, mset, clear, probe), run in Python on a
:class:`~syncmap.store.memory.MemoryStore`.

Each function here follows its Lua counterpart line by line, in the same order (validate ->
mutate -> take the version -> publish last), with the same names, so a reader can hold the two
side by side; ``scripts.py`` documents KEYS, ARGV and the replies.  What Lua returns as
``false`` is ``None`` here (Redis turns it into a nil reply).  The store conformance suite
(``syncmap.testing.storeconformance``) runs the same checks on this and on a real Redis.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .memory import MemoryStore

_HEAD = struct.Struct(">2sBBBHQQB")
_VALUE = struct.Struct(">QQQ")
_U32 = struct.Struct(">I")
_VERSION_ARG = re.compile(rb"^(\d+):(\d+)$")
RESERVED = (b"#e", b"#s", b"#c", b"#h")


class Refusal(Exception):
    """An error reply (``redis.error_reply`` or a failing ``redis.call``): its text, as Redis
    would send it, e.g. ``STALEFENCE lock ...``."""


def lua_number(text: bytes | None) -> float | None:
    """Lua's ``tonumber`` of a stored string, for the decimal forms syncmap writes."""
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        return None


def sha1hex(data: bytes) -> bytes:
    return hashlib.sha1(data).hexdigest().encode()  # noqa: S324 (the scripts' redis.sha1hex)


class ScriptRun:
    """One EVALSHA of a map script: KEYS, ARGV (bytes, 0-based here: ``argv[0]`` is ARGV[1])
    and the script's locals that the Lua keeps at top level (``stamped``, ``out``)."""

    def __init__(self, db: MemoryStore, keys: list[bytes], argv: list[bytes]) -> None:
        self.db, self.keys, self.argv = db, keys, argv
        self.now = db.clock()
        self.stamped = False
        self.out: list[bytes] = []
        # Where the bucket's epoch and seq live ('m': layout 1's separate hash; tests only).
        self.bk = keys[0][:-1] + b"m" if self.off(b"m") else keys[0]

    def off(self, flag: bytes) -> bool:
        return flag in self.argv[7]

    def live(self, field: bytes) -> bytes | None:
        v = self.db.hget(self.keys[0], field)
        if v is None:
            return None
        dl = struct.unpack_from(">Q", v, 8)[0]
        if dl != 0 and dl <= self.now:
            return None
        return v

    def fence_refused(self) -> Refusal | None:
        lock, token = self.argv[4], self.argv[5]
        if lock == b"":
            return None
        cur = self.db.get(self.keys[2])
        if cur is None:
            if not self.off(b"f"):
                return Refusal(
                    f"STALEFENCE lock {lock.decode()}: its fence state was lost (evicted, flushed "
                    f"or lost in a restart), so token {token.decode()} cannot be checked"
                )
            cur = b"0"
        if (lua_number(token) or 0) < (lua_number(cur) or 0):
            return Refusal(
                f"STALEFENCE lock {lock.decode()} token {token.decode()} is older than token "
                f"{cur.decode()} issued since"
            )
        return None

    def settings_refused(self) -> Refusal | None:
        have = self.db.hget(self.keys[0], b"#c")
        self.stamped = have is not None
        if have is not None and have != self.argv[6] and not self.off(b"s"):
            return Refusal(
                f"SETTINGS bucket {self.argv[1].decode()} of this map was created with settings "
                f"{have.decode(errors='replace')} (buckets/codec), this server uses "
                f"{self.argv[6].decode()}"
            )
        return None

    def refused(self) -> Refusal | None:
        return self.settings_refused() or self.fence_refused()

    def next_seq(self, n: int) -> tuple[int, int]:
        ep = self.db.hget(self.bk, b"#e")
        if ep is None:
            ep = self.argv[2]
            self.db.hset(self.bk, b"#e", ep)
            self.db.hdel(self.bk, b"#h")  # a new epoch starts a new chain
        if not self.stamped:
            self.db.hset(self.keys[0], b"#c", self.argv[6])
            self.stamped = True
        return self.db.hincrby(self.bk, b"#s", n) - n + 1, int(lua_number(ep) or 0)

    def is_version(self, old: bytes | None, expected: bytes) -> bool:
        m = _VERSION_ARG.match(expected)
        if m is None:
            return False
        if old is None:
            return m.group(2) == b"0"
        have, _, ep = _VALUE.unpack_from(old)
        return have == int(m.group(2)) and (ep == int(m.group(1)) or self.off(b"v"))

    def chain(self, op: int, seq: int, tail: bytes) -> None:
        link = sha1hex(struct.pack(">BQ", op, seq) + tail)
        prev = self.db.hget(self.bk, b"#h") or b""
        self.db.hset(self.bk, b"#h", sha1hex(prev + link)[:16])

    def sign(self, msg: bytes) -> bytes:
        pads = self.argv[8]
        inner = hashlib.sha1(pads[:64] + msg).digest()  # noqa: S324 (HMAC-SHA1, see scripts.py)
        return msg + hashlib.sha1(pads[64:128] + inner).digest()  # noqa: S324

    def publish(self, op: int, seq: int, ep: int, fields: list[bytes]) -> None:
        tail = _U32.pack(len(fields)) + b"".join(_U32.pack(len(f)) + f for f in fields)
        self.chain(op, seq, tail)
        flags = 3 if self.argv[8] != b"" else 2
        origin = self.argv[3]
        head = _HEAD.pack(b"sm", 2, op, flags, int(self.argv[1]), seq, ep, len(origin))
        msg = head + origin + tail + struct.pack(">Q", self.now)
        if flags == 3:
            msg = self.sign(msg)
        target = self.argv[0]
        self.db.made(msg)
        if target == b"":
            self.out.append(msg)
        elif target.startswith(b"!"):
            raise Refusal(
                "ERR the memory store models neither Redis Streams nor a Cluster's sharded "
                f"channels (target {target[:3].decode(errors='replace')!r}): test those "
                "routes against a real Redis"
            )
        else:
            self.db.publish(target, msg)

    def store(self, field: bytes, seq: int, ep: int, payload: bytes, ttl: int) -> int:
        dl = 0
        if ttl > 0:
            dl = self.now + ttl
            self.db.zadd(self.keys[1], dl, field)
        else:
            self.db.zrem(self.keys[1], field)
        self.db.hset(self.keys[0], field, _VALUE.pack(seq, dl, ep) + payload)
        return dl

    def reserved_count(self) -> int:
        return sum(v is not None for v in self.db.hmget(self.keys[0], RESERVED))


# ---- the bodies --------------------------------------------------------------------------------


def set_(r: ScriptRun) -> Any:
    field, payload, ttl, mode, expected = r.argv[9:14]
    old = None
    if mode != b"set":
        old = r.live(field)
    if mode == b"nx" and old is not None:
        return [0, 0, old]
    if mode == b"cas" and (old is None or old[24:] != expected):
        return [0, 0, old]
    if mode == b"ver" and not r.is_version(old, expected):
        return [0, 0, old]
    seq, ep = r.next_seq(1)
    dl = r.store(field, seq, ep, payload, int(ttl))
    r.publish(1, seq, ep, [field])
    return [seq, dl, old, ep]


def delete(r: ScriptRun) -> Any:
    field, mode, expected = r.argv[9:12]
    old = r.live(field)
    if old is None:
        if r.db.hdel(r.keys[0], field) == 1:
            # An expired leftover the probe has not reaped yet: its expiry is a change.
            r.db.zrem(r.keys[1], field)
            seq, ep = r.next_seq(1)
            r.publish(4, seq, ep, [field])
        return [0, None]
    if mode == b"cad" and old[24:] != expected:
        return [0, old]
    if mode == b"ver" and not r.is_version(old, expected):
        return [0, old]
    r.db.hdel(r.keys[0], field)
    r.db.zrem(r.keys[1], field)
    seq, ep = r.next_seq(1)
    r.publish(2, seq, ep, [field])
    return [seq, old, ep]


def mset(r: ScriptRun) -> Any:
    n = (len(r.argv) - 10) // 2
    seq, ep = r.next_seq(n)
    ttl = int(r.argv[9])
    fields = []
    for i in range(n):
        field = r.argv[10 + 2 * i]
        r.store(field, seq + i, ep, r.argv[11 + 2 * i], ttl)
        fields.append(field)
    r.publish(1, seq, ep, fields)
    return [seq, ep]


def clear(r: ScriptRun) -> Any:
    if r.db.hlen(r.keys[0]) <= r.reserved_count():
        return [0, 0]
    keep = r.db.hmget(r.keys[0], RESERVED)
    r.db.delete(r.keys[0], r.keys[1])
    for name, value in zip(RESERVED, keep, strict=True):
        if value is not None:
            r.db.hset(r.keys[0], name, value)
    seq, ep = r.next_seq(1)
    r.publish(3, seq, ep, [])
    return [seq, ep]


def probe(r: ScriptRun) -> Any:
    refusal = r.settings_refused()
    if refusal:
        return refusal
    m = r.db.hmget(r.bk, (b"#e", b"#s"))
    if any(v is not None and lua_number(v) is None for v in m):
        return Refusal(f"DAMAGED bucket {r.argv[1].decode()} has a non-numeric epoch or sequence")
    due = r.db.zrangebyscore(r.keys[1], r.now, int(r.argv[9]))
    if due:
        for field in due:
            r.db.hdel(r.keys[0], field)
        r.db.zrem(r.keys[1], *due)
        seq, ep = r.next_seq(len(due))
        r.publish(4, seq, ep, due)
        m = r.db.hmget(r.bk, (b"#e", b"#s"))
    n = r.db.hlen(r.keys[0]) - r.reserved_count()
    live = n - len(r.db.zrangebyscore(r.keys[1], r.now, None))
    return [m[0], int(lua_number(m[1] or b"0") or 0), r.now, live, r.db.hget(r.bk, b"#h") or b""]


def _refusing(body: Callable[[ScriptRun], Any]) -> Callable[[ScriptRun], Any]:
    """The write scripts' common start: every refusal before the first write."""

    def run(r: ScriptRun) -> Any:
        return r.refused() or body(r)

    return run


BODIES: dict[str, Callable[[ScriptRun], Any]] = {
    "set": _refusing(set_), "delete": _refusing(delete), "mset": _refusing(mset),
    "clear": _refusing(clear), "probe": probe,
}  # fmt: skip


def run_script(db: MemoryStore, name: str, keys: list[bytes], argv: list[bytes]) -> Any:
    """A map script's reply, or the :class:`Refusal` it returns (an error reply).  A failing
    ``redis.call`` raises ``Refusal`` from inside, leaving what it wrote (Redis does not roll a
    script back).  Relay mode (ARGV[1] == ''): the reply is ``[reply, messages]``."""
    r = ScriptRun(db, keys, argv)
    reply = BODIES[name](r)
    if isinstance(reply, Refusal):
        return reply
    return [reply, r.out] if argv[0] == b"" else reply
