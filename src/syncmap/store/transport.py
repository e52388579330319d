"""Precise round trips to Redis: what a failed call means, decided here and nowhere else.

redis-py retries every command, writes included, up to 10 times by default: a write whose reply was
lost could run twice.  So syncmap sends every request itself on one pooled connection and decides:

* no connection could be had (refused, DNS, auth)  -> ``StoreUnavailable`` (nothing was sent)
* it failed after the request was (partly) sent   -> ``WriteOutcomeUnknown`` for writes; reads
                                                     are idempotent and are retried once
* Redis answered NOSCRIPT                          -> the script did not run: load it, resend
* the call's deadline (``deadline=``, ``MapConfig.call_timeout``) passed
  before sending                                  -> ``StoreUnavailable`` (nothing was sent)
  after sending                                   -> as a failure after sending, above

Several requests go out as one pipeline (one round trip) when the caller passes several.  Maps and
locks share this transport; each owns its own small free list of connections.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
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

from .. import forksafe
from ..errors import (
    ConfigurationError,
    StaleFence,
    StoreError,
    StoreUnavailable,
    WriteOutcomeUnknown,
)
from . import scripts

Command = tuple[Any, ...]
_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# A refusal as Redis < 7 reports it from inside a script (see Transport._refused).
_SCRIPT_WRAPPED = re.compile(r"^Error running script .*?: -(OOM|READONLY|NOREPLICAS) ")


SHAS = scripts.SHAS


def describe(client: redis.Redis) -> str:
    """``host:port/db`` of a client, for error messages (never the password)."""
    kw = client.connection_pool.connection_kwargs
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis {where}/{kw.get('db', 0)}"


def make_client(url: str | None, client: redis.Redis | None, timeout: float) -> redis.Redis:
    """The client of ``redis=``, else of ``url``, else of ``$SYNCMAP_URL``, with a clear error."""
    if client is not None:
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ConfigurationError(
                "pass a redis.Redis created with decode_responses=False: syncmap stores bytes"
            )
        return client
    url = url or os.environ.get("SYNCMAP_URL")
    if not url:
        raise ConfigurationError(
            "no Redis given: pass url='redis://host:6379/0' or redis=<redis.Redis>, or set "
            "SYNCMAP_URL (syncmap.embedded.EmbeddedRedis starts a local one)"
        )
    try:
        return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError as exc:
        raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from exc


class Transport:
    """Pipelined calls on connections of ``client``'s pool, with the failure meanings above.

    ``timeout`` replaces a missing socket timeout of the client's: a call must never hang forever
    (a lock's renewal that hangs would hold every other renewal up).  ``deadline`` bounds a
    whole :meth:`call` (connecting, sending, every reply, a read's retry): each socket operation
    waits at most for what is left of it, so a hung Redis costs a call at most ``deadline``.
    """

    def __init__(
        self, client: redis.Redis, timeout: float | None = None, *, deadline: float | None = None
    ) -> None:
        self.client = client
        self.where = describe(client)
        self._idle: list[Any] = []
        self._kwargs = dict(client.connection_pool.connection_kwargs)
        if timeout is not None and self._kwargs.get("socket_timeout") is None:
            self._kwargs["socket_timeout"] = timeout
            self._kwargs.setdefault("socket_connect_timeout", timeout)
        self.deadline = deadline
        if deadline is not None:
            self._kwargs["socket_timeout"] = self._kwargs["socket_connect_timeout"] = deadline
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        # The idle connections are the parent's sockets too: forget them without a shutdown
        # (redis-py closes only this process's copy of a connection made by another pid).
        self._idle = []

    def evalsha(self, name: str, keys: Sequence[Any], *args: Any) -> Command:
        """The EVALSHA command of a script of scripts.py."""
        return ("EVALSHA", SHAS[name], len(keys), *keys, *args)

    # ---- transport ---------------------------------------------------------------------------

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        """Send ``commands`` as one pipeline; replies in order (Redis errors mapped, see module).

        ``partial=True`` returns refusals (as SyncMapErrors) in place of their replies instead of
        raising the first: the other commands of the pipeline did run.
        """
        until = None if self.deadline is None else time.monotonic() + self.deadline
        replies = self._roundtrip(commands, write=write, until=until)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # the script cache was flushed (restart, SCRIPT FLUSH): nothing ran
            load = [("SCRIPT", "LOAD", src) for src in scripts.ALL.values()]
            self._roundtrip(load, write=False, until=until)
            again = self._roundtrip([commands[i] for i in missing], write=write, until=until)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):
                if not partial:
                    raise self._refused(reply)
                replies[i] = self._refused(reply)
        return replies

    def _roundtrip(
        self, commands: Sequence[Command], *, write: bool, until: float | None = None
    ) -> list[Any]:
        attempts = 1 if write else 2
        for attempt in range(attempts):
            try:
                return self._once(commands, write=write, until=until)
            except WriteOutcomeUnknown:
                raise
            except StoreUnavailable:
                if attempt + 1 == attempts or (until is not None and time.monotonic() >= until):
                    raise
        raise AssertionError("unreachable")

    def _once(self, commands: Sequence[Command], *, write: bool, until: float | None) -> list[Any]:
        payload = b"".join(hiredis.pack_command(c) for c in commands)  # before taking a conn
        conn = self._checkout(until)
        if until is not None:
            self._limit(conn, until)
        replies: list[Any] = []
        try:
            conn.send_packed_command([payload], check_health=False)
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        except BusyLoadingError as exc:
            # A -LOADING reply (redis-py raises it as a ConnectionError and drops the socket):
            # Redis refused the command while loading its data set, so nothing ran.
            conn.disconnect()
            raise StoreUnavailable(
                f"{self.where} is loading its data set ({exc}); nothing ran: retry in a moment"
            ) from exc
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

    def _limit(self, conn: Any, until: float) -> None:
        """Let every socket operation of this call wait at most until ``until``; raise
        ``StoreUnavailable`` if it passed already (nothing has been sent: safe for writes)."""
        left = until - time.monotonic()
        if left <= 0:
            self._idle.append(conn)  # unused and in step: it may serve the next call
            raise StoreUnavailable(
                f"the call deadline ({self.deadline} s, MapConfig.call_timeout) passed before "
                f"anything was sent to {self.where}; nothing ran: retry later"
            )
        sock = getattr(conn, "_sock", None)  # redis-py's socket; read_response keeps its timeout
        if sock is not None:
            sock.settimeout(left)

    def _checkout(self, until: float | None = None) -> Any:
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
            kwargs = self._kwargs
            if until is not None:  # connect within what is left of the call's deadline
                left = max(until - time.monotonic(), 0.001)
                kwargs = {**kwargs, "socket_timeout": left, "socket_connect_timeout": left}
            conn = pool.connection_class(**kwargs)
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
        if text.startswith("SETTINGS"):
            return ConfigurationError(
                text.removeprefix("SETTINGS ") + ": every server of a map must use the same "
                "bucket count and codec (the map's meta key was lost; see docs/protocol.md)"
            )
        if text.startswith("SEMLIMIT"):
            return ConfigurationError(
                text.removeprefix("SEMLIMIT ") + ": every client of a semaphore must use the "
                "same number of permits (delete its ':n' key to change it)"
            )
        if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't run this" in text:
            return ConfigurationError(
                f"{self.where} refused a command ({text}); the ACL user needs +@read +@write "
                "+@scripting +@pubsub on the map's keys and channel (see docs/protocol.md)"
            )
        # redis-py strips the code of the errors it has a class for (OOM, READONLY, MASTERDOWN)
        # and keeps it in ``status_code``; the others keep it at the start of the text.
        code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
        if wrapped := _SCRIPT_WRAPPED.search(text):
            # Redis < 7 wraps a refusal inside a script: "Error running script (call to f_..):
            # @user_script:73: @user_script: 73: -OOM command not allowed ...".  It refuses
            # before the script's first write, so here too nothing ran.
            code, text = wrapped.group(1), text[wrapped.start(1) :]
        if code in ("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS"):
            return StoreUnavailable(
                f"{self.where} refused it ({code} {text.removeprefix(code).strip()}); nothing "
                "ran: retry later"
            )
        return StoreError(f"{self.where} answered an error: {text}")


def config_value(reply: object) -> str:
    """The value of a one-parameter CONFIG GET reply (a list in RESP2, a dict in RESP3)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    else:
        values = list(reply)[1::2] if isinstance(reply, list | tuple) else []
    value = values[0] if values else b""
    return value.decode() if isinstance(value, bytes) else str(value)
