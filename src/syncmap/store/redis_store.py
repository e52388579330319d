"""The authoritative store: thin calls to Redis with precise failure semantics.

redis-py retries every command, writes included, up to 10 times by default: a write whose reply was
lost could run twice.  So syncmap sends every request itself on one pooled connection and decides:

* no connection could be had (refused, DNS, auth)  -> ``StoreUnavailable`` (nothing was sent)
* it failed after the request was (partly) sent   -> ``WriteOutcomeUnknown`` for writes; reads
                                                     are idempotent and are retried once
* Redis answered NOSCRIPT                          -> the script did not run: load it, resend

Several requests go out as one pipeline (one round trip) when the caller passes several.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    NoScriptError,
    RedisError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from ..errors import (
    ConfigurationError,
    StaleFence,
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)
from ..keys import Layout
from . import scripts

Command = tuple[Any, ...]
_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_REAP_LIMIT = 500


def _sha(src: str) -> str:
    return hashlib.sha1(src.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


_SHAS = {name: _sha(src) for name, src in scripts.ALL.items()}


def describe(client: redis.Redis) -> str:
    """``host:port/db`` of a client, for error messages (never the password)."""
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis {where}/{kw.get('db', 0)}"


class RedisStore:
    """The Redis side of one map: scripts, reads, probes."""

    def __init__(self, client: redis.Redis, layout: Layout, origin: str) -> None:
        self.client = client
        self.layout = layout
        self.origin = origin
        self.where = describe(client)
        self._idle: list[Any] = []

    # ---- transport ---------------------------------------------------------------------------

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        """Send ``commands`` as one pipeline; replies in order (Redis errors mapped, see module).

        ``partial=True`` returns refusals (as SyncMapErrors) in place of their replies instead of
        raising the first: the other commands of the pipeline did run.
        """
        replies = self._roundtrip(commands, write=write)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # the script cache was flushed (restart, SCRIPT FLUSH): nothing ran
            self._roundtrip([("SCRIPT", "LOAD", src) for src in scripts.ALL.values()], write=False)
            again = self._roundtrip([commands[i] for i in missing], write=write)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                if not partial:
                    raise self._refused(reply)
                replies[i] = self._refused(reply)
        return replies

    def _roundtrip(self, commands: Sequence[Command], *, write: bool) -> list[Any]:
        attempts = 1 if write else 2
        for attempt in range(attempts):
            try:
                return self._once(commands, write=write)
            except WriteOutcomeUnknown:
                raise
            except StoreUnavailable:
                if attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable")

    def _once(self, commands: Sequence[Command], *, write: bool) -> list[Any]:
        payload = b"".join(hiredis.pack_command(c) for c in commands)  # before taking a conn
        conn = self._checkout()
        replies: list[Any] = []
        try:
            conn.send_packed_command([payload], check_health=False)
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except (*_NET_ERRORS, RedisError) as exc:  # RedisError: a garbled reply, say
            conn.disconnect()
            if write:
                raise WriteOutcomeUnknown(
                    f"connection to {self.where} failed after the write was sent ({exc}); "
                    "it may or may not have been applied. Read the key to find out"
                ) from exc
            raise StoreUnavailable(f"{self.where} failed during a read ({exc}); retry") from exc
        except BaseException:
            conn.disconnect()
            raise
        self._idle.append(conn)
        return replies

    def _checkout(self) -> Any:
        """An idle connection that is still alive, or a new one; nothing has been sent yet.

        Our own small free list instead of the client's pool: redis-py 8's pool bookkeeping costs
        about 10 us a call.  A connection that has anything to read while idle (EOF after a Redis
        restart) is replaced here, before sending, so its death is not mistaken for an unknown
        write outcome.
        """
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            try:
                if not conn.can_read(0):
                    return conn
            except (*_NET_ERRORS, RedisError):
                pass
            conn.disconnect()
        pool = self.client.connection_pool
        try:
            # Made directly, not by pool.make_connection(): this free list never gives
            # connections back to the pool, whose count would otherwise run out (100 by default).
            conn = pool.connection_class(**pool.connection_kwargs)
            conn.connect()
        except AuthenticationError as exc:
            raise ConfigurationError(f"{self.where} refused the credentials: {exc}") from exc
        except _NET_ERRORS as exc:
            raise StoreUnavailable(
                f"cannot reach {self.where} ({exc}); nothing was sent. Check that Redis runs "
                "and the URL is right, then retry"
            ) from exc
        except RedisError as exc:  # refused while connecting: DB out of range, ACL on SELECT
            raise ConfigurationError(f"{self.where} refused the connection: {exc}") from exc
        return conn

    def close(self) -> None:
        """Disconnect the idle connections this store opened."""
        while self._idle:
            self._idle.pop().disconnect()

    def _refused(self, exc: Exception) -> Exception:
        text = str(exc)
        if text.startswith("STALEFENCE"):
            return StaleFence(text.removeprefix("STALEFENCE ") + ": re-acquire the lock")
        if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't run this" in text:
            return ConfigurationError(
                f"{self.where} refused a command ({text}); the ACL user needs +@read +@write "
                "+@scripting +@pubsub on the map's keys and channel (see docs/protocol.md)"
            )
        if text.startswith(("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS")):
            return StoreUnavailable(f"{self.where} cannot serve this now: {text}; retry later")
        return StoreError(f"{self.where} answered an error: {text}")

    # ---- scripts -----------------------------------------------------------------------------

    def script(self, name: str, bucket: int, *args: Any, fence: tuple[str, int] | None = None
               ) -> Command:  # fmt: skip
        """The EVALSHA command of a write script for one bucket (see scripts.py for ARGV)."""
        m, d, x = self.layout.bucket_keys(bucket)
        lock, token = fence if fence is not None else ("", 0)
        if not isinstance(lock, str) or not isinstance(token, int) or isinstance(token, bool):
            raise TypeError(f"fence must be (lock name: str, token: int), not {fence!r}")
        epoch = random.getrandbits(52) or 1
        return ("EVALSHA", _SHAS[name], 3, m, d, x, self.layout.channel, bucket, epoch,
                self.origin, lock, token, *args)  # fmt: skip

    def load_scripts(self) -> None:
        self.call([("SCRIPT", "LOAD", src) for src in scripts.ALL.values()], write=False)

    # ---- reads -------------------------------------------------------------------------------

    def hget(self, bucket: int, field: bytes) -> bytes | None:
        reply: bytes | None = self.call([("HGET", self.layout.bucket_keys(bucket)[1], field)],
                                        write=False)[0]  # fmt: skip
        return reply

    def probe(self) -> tuple[list[tuple[int | None, int]], int, int]:
        """Reap due expiries and read every bucket's (epoch, seq): one round trip.

        Returns the states, Redis's clock in ms, and the number of live entries.
        """
        cmds = [self.script("probe", b, _REAP_LIMIT) for b in range(self.layout.buckets)]
        replies = self.call(cmds, write=True)
        states = [(int(r[0]) if r[0] else None, int(r[1])) for r in replies]
        return states, int(replies[-1][2]), sum(int(r[3]) for r in replies)

    def bucket_items(self, buckets: Sequence[int]) -> list[list[tuple[bytes, bytes]]]:
        """Every (field, stored value) of the given buckets, one round trip."""
        replies = self.call([("HGETALL", self.layout.bucket_keys(b)[1]) for b in buckets],
                            write=False)  # fmt: skip
        return [_pairs(r) for r in replies]

    def bucket_fields(self, buckets: Sequence[int]) -> list[list[bytes]]:
        replies = self.call([("HKEYS", self.layout.bucket_keys(b)[1]) for b in buckets],
                            write=False)  # fmt: skip
        return [list(r) for r in replies]

    def publish(self, payload: bytes) -> int:
        return int(self.call([("PUBLISH", self.layout.channel, payload)], write=False)[0])

    def ensure_meta(self, buckets: int, codec: str) -> tuple[int, str]:
        """Record the map's bucket count and codec once; return what the map really uses."""
        meta = self.layout.meta
        replies = self.call(
            [("HSETNX", meta, "buckets", buckets), ("HSETNX", meta, "codec", codec),
             ("HMGET", meta, "buckets", "codec")],
            write=True,
        )  # fmt: skip
        stored = replies[2]
        return int(stored[0]), stored[1].decode()


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """HGETALL under RESP3 is a map, under RESP2 a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    it = iter(reply)
    return list(zip(it, it, strict=True))
