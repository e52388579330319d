"""An in-memory store that runs the map scripts' semantics, and an executor for it.

:class:`MemoryStore` keeps a Redis keyspace (hashes, strings, sorted sets, key TTLs) for exactly
the commands a map sends: EVALSHA of the five map scripts (``memscripts.py``), HGET, HGETALL,
HMGET, HSET, HSETNX, HDEL, PEXPIRE, SCRIPT LOAD/FLUSH, CONFIG GET (``noeviction``), PUBLISH,
WAIT (``replicas`` answer), and GET/SET/INCR/DEL/EXISTS for lock fence counters.  Time is the
injected ``clock`` (ms), so a model test controls it.  Published messages go to the callbacks
subscribed to their channel, synchronously, in order; ``monitor`` callbacks see every message a
script makes, whatever its target (the model test keeps its bookkeeping with it).

:class:`MemoryExecutor` implements the ``Executor`` contract (``store/executor.py``) on it,
errors mapped as the real executor maps them, and lets a test inject the faults a network
adds: an attempt fails before anything runs (``StoreUnavailable``) or its connection is cut
after the request was sent (``WriteOutcomeUnknown`` for a write; a read is retried once).  The
store's own faults are :meth:`MemoryStore.flushall` and :meth:`MemoryStore.restart` (data and
loaded scripts lost).  Not thread-safe: one caller at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import (
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)
from . import scripts
from .executor import refused
from .memscripts import Refusal, lua_number, run_script

Command = tuple[Any, ...]
Callback = Callable[[bytes], None]
_BY_SHA = {sha.encode(): name for name, sha in scripts.SHAS.items()}
_MAP_SCRIPTS = frozenset({"set", "delete", "mset", "clear", "probe"})
_WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"
_NOSCRIPT = "NOSCRIPT No matching script. Please use EVAL."


class Zset(dict[bytes, int]):
    """A sorted set: member -> score (ms deadlines here, so integers)."""


def _arg(value: Any) -> bytes:
    """A command argument as Redis receives it (hiredis.pack_command's conversions)."""
    cls = value.__class__
    if cls is bytes:
        return value  # type: ignore[no-any-return]
    if cls is str:
        return value.encode()  # type: ignore[no-any-return]
    if cls is int:
        return b"%d" % value
    if isinstance(value, float):
        return repr(value).encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | int):  # a subclass
        return _arg(str(value) if isinstance(value, str) else int(value))
    raise TypeError(f"cannot send {type(value).__name__} to Redis")


class MemoryStore:
    """The keyspace and the commands (see the module docstring)."""

    def __init__(self, clock: Callable[[], int], *, replicas: int = 0) -> None:
        self.clock = clock
        self.replicas = replicas
        """What ``WAIT`` answers: replicas that confirmed (at once; nothing is replicated)."""
        self.data: dict[bytes, Any] = {}  # dict (hash) | bytes (string) | Zset
        self.deadlines: dict[bytes, int] = {}  # PEXPIRE, ms
        self.loaded: set[bytes] = set()  # SHAs of loaded scripts
        self.subscribers: dict[bytes, list[Callback]] = {}
        self.monitors: list[Callback] = []
        self._handlers: dict[bytes, Callable[..., Any]] = {
            n.removeprefix("_cmd_").upper().encode(): getattr(self, n)
            for n in dir(self)
            if n.startswith("_cmd_")
        }

    # ---- faults ------------------------------------------------------------------------------

    def flushall(self) -> None:
        """FLUSHALL: every key gone, no message; scripts stay loaded, subscribers connected."""
        self.data.clear()
        self.deadlines.clear()

    def restart(self) -> None:
        """A restart without persistence: data and loaded scripts gone.  (Subscribers are the
        caller's to cut: a model test decides what its connections lose.)"""
        self.flushall()
        self.loaded.clear()

    # ---- pub/sub -----------------------------------------------------------------------------

    def subscribe(self, channel: str | bytes, callback: Callback) -> Callable[[], None]:
        """Deliver every message published on ``channel`` to ``callback``; returns the undo."""
        subs = self.subscribers.setdefault(_arg(channel), [])
        subs.append(callback)
        return lambda: subs.remove(callback)

    def publish(self, channel: bytes, message: bytes) -> int:
        subs = list(self.subscribers.get(channel, ()))
        for callback in subs:
            callback(message)
        return len(subs)

    def made(self, message: bytes) -> None:
        """A script made a change message (before it is published or relayed)."""
        for monitor in self.monitors:
            monitor(message)

    # ---- the keyspace ------------------------------------------------------------------------

    def _get(self, key: bytes, kind: type) -> Any:
        dl = self.deadlines.get(key)
        if dl is not None and dl <= self.clock():
            self.delete(key)
        value = self.data.get(key)
        if value is not None and type(value) is not kind:
            raise Refusal(_WRONGTYPE)
        return value

    def _make(self, key: bytes, kind: type) -> Any:
        value = self._get(key, kind)
        if value is None:
            value = self.data[key] = kind()
        return value

    def _tidy(self, key: bytes) -> None:
        """Redis deletes a hash or sorted set when its last member goes."""
        if not self.data.get(key, True):
            self.delete(key)

    def delete(self, *keys: bytes) -> int:
        n = 0
        for key in keys:
            self.deadlines.pop(key, None)
            n += self.data.pop(key, None) is not None
        return n

    def hget(self, key: bytes, field: bytes) -> bytes | None:
        h = self._get(key, dict)
        return None if h is None else h.get(field)

    def hmget(self, key: bytes, fields: Iterable[bytes]) -> list[bytes | None]:
        h = self._get(key, dict) or {}
        return [h.get(f) for f in fields]

    def hset(self, key: bytes, field: bytes, value: bytes) -> int:
        h = self._make(key, dict)
        new = field not in h
        h[field] = value
        return int(new)

    def hdel(self, key: bytes, *fields: bytes) -> int:
        h = self._get(key, dict)
        if h is None:
            return 0
        n = sum(h.pop(f, None) is not None for f in fields)
        self._tidy(key)
        return n

    def hlen(self, key: bytes) -> int:
        return len(self._get(key, dict) or ())

    def hincrby(self, key: bytes, field: bytes, n: int) -> int:
        h = self._make(key, dict)
        cur = h.get(field, b"0")
        if not cur.lstrip(b"-").isdigit():
            raise Refusal("ERR hash value is not an integer")
        h[field] = str(int(cur) + n).encode()
        return int(h[field])

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._get(key, bytes)
        return value

    def zadd(self, key: bytes, score: int, member: bytes) -> None:
        self._make(key, Zset)[member] = score

    def zrem(self, key: bytes, *members: bytes) -> None:
        z = self._get(key, Zset)
        if z is not None:
            for m in members:
                z.pop(m, None)
            self._tidy(key)

    def zrangebyscore(self, key: bytes, top: int, limit: int | None) -> list[bytes]:
        """Members scored -inf .. ``top``, by score then member (LIMIT 0 ``limit``)."""
        z = self._get(key, Zset) or {}
        due = sorted((s, m) for m, s in z.items() if s <= top)
        return [m for _, m in due[:limit]]

    # ---- commands ----------------------------------------------------------------------------

    def execute(self, command: Command) -> Any:
        """One command's reply, or the :class:`Refusal` Redis would answer (in place, as in a
        pipeline: the other commands still run)."""
        name, *args = [_arg(a) for a in command]
        handler = self._handlers.get(name.upper())
        if handler is None:
            return Refusal(f"ERR the memory store does not model {name.decode()}")
        try:
            return handler(*args)  # pipeline semantics: an error is this command's reply
        except Refusal as exc:
            return exc
        except (TypeError, ValueError) as exc:  # wrong arity or a non-number
            return Refusal(f"ERR {name.decode()}: {exc}")

    def _cmd_evalsha(self, sha: bytes, numkeys: bytes, *rest: bytes) -> Any:
        name = _BY_SHA.get(sha)
        if sha not in self.loaded:
            return Refusal(_NOSCRIPT)
        if name not in _MAP_SCRIPTS:
            return Refusal(f"ERR the memory store does not model the {name} script")
        n = int(numkeys)
        return run_script(self, name, list(rest[:n]), list(rest[n:]))

    def _cmd_script(self, sub: bytes, *args: bytes) -> Any:
        if sub.upper() == b"LOAD":
            sha = hashlib.sha1(args[0]).hexdigest().encode()  # noqa: S324
            self.loaded.add(sha)
            return sha
        if sub.upper() == b"FLUSH":
            self.loaded.clear()
            return b"OK"
        return Refusal(f"ERR the memory store does not model SCRIPT {sub.decode()}")

    def _cmd_hget(self, key: bytes, field: bytes) -> bytes | None:
        return self.hget(key, field)

    def _cmd_hgetall(self, key: bytes) -> dict[bytes, bytes]:
        # A map, as redis-py 8 asks for RESP3 (RESP2 would give a flat list; scripts' replies
        # are the same in both).
        return dict(self._get(key, dict) or {})

    def _cmd_hmget(self, key: bytes, *fields: bytes) -> list[bytes | None]:
        return self.hmget(key, fields)

    def _cmd_hset(self, key: bytes, *pairs: bytes) -> int:
        if not pairs or len(pairs) % 2:
            raise Refusal("ERR wrong number of arguments for 'hset' command")
        return sum(self.hset(key, pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2))

    def _cmd_hsetnx(self, key: bytes, field: bytes, value: bytes) -> int:
        if self.hget(key, field) is not None:
            return 0
        return self.hset(key, field, value)

    def _cmd_hdel(self, key: bytes, *fields: bytes) -> int:
        return self.hdel(key, *fields)

    def _cmd_pexpire(self, key: bytes, ms: bytes) -> int:
        if self.data.get(key) is None:
            return 0
        self.deadlines[key] = self.clock() + int(ms)
        return 1

    def _cmd_config(self, sub: bytes, parameter: bytes) -> dict[bytes, bytes]:
        known = {b"maxmemory-policy": b"noeviction", b"maxmemory": b"0"}
        return {parameter: known[parameter]} if parameter in known else {}

    def _cmd_publish(self, channel: bytes, message: bytes) -> int:
        return self.publish(channel, message)

    def _cmd_wait(self, replicas: bytes, timeout: bytes) -> int:
        return self.replicas

    def _cmd_get(self, key: bytes) -> bytes | None:
        return self.get(key)

    def _cmd_set(self, key: bytes, value: bytes) -> bytes:
        self._get(key, bytes)  # expire a due key first (SET replaces any type, as in Redis)
        self.delete(key)
        self.data[key] = value
        return b"OK"

    def _cmd_incr(self, key: bytes) -> int:
        cur = self.get(key) or b"0"
        if lua_number(cur) is None or not cur.lstrip(b"-").isdigit():
            raise Refusal("ERR value is not an integer or out of range")
        self.data[key] = str(int(cur) + 1).encode()
        return int(self.data[key])

    def _cmd_del(self, *keys: bytes) -> int:
        return self.delete(*keys)

    def _cmd_exists(self, *keys: bytes) -> int:
        n = 0
        for key in keys:
            dl = self.deadlines.get(key)
            n += key in self.data and (dl is None or dl > self.clock())
        return n


class MemoryExecutor:
    """The ``Executor`` of a :class:`MemoryStore` (contract: ``store/executor.py``).

    Faults, one per *attempt*, as the real executor meets them on its connections (a write gets
    one attempt, a read two: the real one retries a read once, on a new connection):

    * ``fail_next(StoreUnavailable)``: the attempt fails before anything ran;
    * ``fail_next(WriteOutcomeUnknown)``: the connection is cut after the request was sent: a
      write runs and raises it (never resent); a read's attempt fails (``StoreUnavailable`` if
      it was the second).

    ``times`` arms that many attempts in a row (``times=2`` makes a read fail too).
    """

    def __init__(self, store: MemoryStore, where: str = "memory store") -> None:
        self.store = store
        self.where = where
        self._faults: list[type[StoreError]] = []
        self.calls = 0

    def fail_next(self, fault: type[StoreError], times: int = 1) -> None:
        if fault not in (StoreUnavailable, WriteOutcomeUnknown):
            raise ValueError("fail_next takes StoreUnavailable or WriteOutcomeUnknown")
        self._faults.extend([fault] * times)

    def clear_faults(self) -> None:
        """Disarm the faults no attempt has met yet."""
        self._faults.clear()

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        self.calls += 1
        for attempt in range(1 if write else 2):
            fault = self._faults.pop(0) if self._faults else None
            if fault is None or (fault is WriteOutcomeUnknown and write):
                break
            if attempt == (0 if write else 1):
                raise StoreUnavailable(
                    f"cannot reach {self.where} (injected {fault.__name__}); nothing ran: retry"
                )
        replies = self._run(commands)
        if fault is WriteOutcomeUnknown:
            raise WriteOutcomeUnknown(
                f"connection to {self.where} failed after the write was sent (injected); it "
                "may or may not have been applied. Read the key to find out"
            )
        for i, reply in enumerate(replies):
            if isinstance(reply, Refusal):
                if not partial:
                    raise self.refused(reply)
                replies[i] = self.refused(reply)
        return replies

    def _run(self, commands: Sequence[Command]) -> list[Any]:
        """Every command's reply, in order; a NOSCRIPT (the script cache was flushed: nothing
        ran) loads the scripts and resends those commands, in order."""
        replies = [self.store.execute(c) for c in commands]
        missing = [i for i, r in enumerate(replies) if isinstance(r, Refusal) and _noscript(r)]
        if missing:
            for src in scripts.ALL.values():
                self.store.execute(("SCRIPT", "LOAD", src))
            for i in missing:
                replies[i] = self.store.execute(commands[i])
        return replies

    def refused(self, exc: Refusal) -> Exception:
        """The error the real executor raises for this error reply: the same mapping."""
        return refused(exc, self.where)

    def close(self) -> None:
        return None


def _noscript(reply: Refusal) -> bool:
    return str(reply).startswith("NOSCRIPT")
