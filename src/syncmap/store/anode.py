"""``AsyncNodeExecutor``: the asyncio twin of :class:`~syncmap.store.node.NodeExecutor`.

The same contract (``executor.py``), the same failure meanings and the same decisions, taken by
the same functions: only the waiting differs (``await`` on ``redis.asyncio`` connections made by
the topology's :class:`~syncmap.store.endpoint.Endpoint`).  One more case exists here:

* the call was **cancelled** (``asyncio.CancelledError``) after its request was sent: the
  connection is dropped (its replies would be read by the next caller) and the cancellation
  goes on; the asyncio driver then treats a write as outcome-unknown (``aio/run.py``).
* the cancel was **lost** by redis-py: on Python 3.11 it wraps every send (the handshake's
  too) in ``asyncio.wait_for``, which returns normally when the cancel arrives just as the
  send completes (CPython gh-86296; ``syncmap.aiotasks``).  The call then ran on, and a
  cancelled ``lock.acquire()`` returned a fence and kept the lock.  ``_exchange`` checks the
  task's cancel count after connecting and after sending, and raises the cancellation itself.

Connections belong to the event loop that made them: an executor serves one loop.  At most
``max_connections`` are open at once (``MAX_CONNECTIONS``): a thousand coroutines missing at once
queue for a connection instead of opening a thousand.

A view (:meth:`AsyncNodeExecutor.within`: a Cluster map's probes) shares the free list and that
bound, as ``NodeExecutor.within`` does (node.py says why).  Connections keep the executor's
socket timeout whoever makes them: a view's connect, handshake, send and reads each wait in an
``asyncio.timeout`` of what is left of its deadline, which changes no socket's timeout, and a
reply cut short closes the connection.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import hiredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    RedisError,
    ResponseError,
)

from ..aiotasks import cancel_lost, cancels_requested
from ..errors import ConfigurationError, StoreUnavailable, WriteOutcomeUnknown
from . import executor, scripts
from .executor import Command, noscript, settle
from .node import NET_ERRORS, deadline_name

if TYPE_CHECKING:
    from .topology import Topology

MAX_CONNECTIONS = 64


class AsyncNodeExecutor:
    """Pipelined calls on a small free list of asyncio connections to ``topology``'s node."""

    def __init__(
        self, topology: Topology, *, timeout: float | None = None, deadline: float | None = None,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:  # fmt: skip
        self.topology = topology
        self.where = topology.where
        self.timeout = timeout
        self.deadline = deadline
        self._pool_deadline = deadline  # what the connections are made for (node.py)
        self._base: AsyncNodeExecutor | None = None  # a view's executor
        self._short = False  # a view's calls end before its connections' timeout would
        self._idle: list[tuple[Any, int]] = []  # shared by the views
        self._slots = asyncio.Semaphore(max_connections)  # connections in use or idle, at most

    def within(self, deadline: float) -> AsyncNodeExecutor:
        """As :meth:`NodeExecutor.within`: the same connections and bound, each call bounded
        by ``deadline``; its ``aclose()`` closes nothing."""
        view = copy.copy(self)  # shares _idle and _slots
        view.deadline = deadline
        view._base = self._base or self
        view._short = self._pool_deadline is None or deadline < self._pool_deadline
        return view

    async def call(
        self, commands: Sequence[Command], *, write: bool, partial: bool = False
    ) -> list[Any]:
        """As :meth:`NodeExecutor.call`, awaited."""
        until = None if self.deadline is None else time.monotonic() + self.deadline
        replies = await self.raw(commands, write=write, until=until)
        not_master, first = settle(replies, self.where, partial=partial)
        if not_master:  # the node refused as a replica would: re-resolve the master
            self.topology.invalidate()
            await self._close_idle()
        if first is not None:
            raise first
        return replies

    async def raw(
        self, commands: Sequence[Command], *, write: bool, until: float | None
    ) -> list[Any]:
        """As :meth:`NodeExecutor.raw`, awaited."""
        replies = await self._roundtrip(commands, write=write, until=until)
        missing = noscript(replies)
        if missing:  # the script cache was flushed (restart, SCRIPT FLUSH): nothing ran
            load = [("SCRIPT", "LOAD", src) for src in scripts.ALL.values()]
            await self._roundtrip(load, write=False, until=until)
            again = await self._roundtrip([commands[i] for i in missing], write=write, until=until)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _roundtrip(
        self, commands: Sequence[Command], *, write: bool, until: float | None
    ) -> list[Any]:
        attempts = 1 if write else 2
        for attempt in range(attempts):
            try:
                return await self._once(commands, write=write, until=until)
            except WriteOutcomeUnknown:
                raise
            except StoreUnavailable:
                if attempt + 1 == attempts or (until is not None and time.monotonic() >= until):
                    raise
        raise AssertionError("unreachable")

    async def _once(
        self, commands: Sequence[Command], *, write: bool, until: float | None
    ) -> list[Any]:
        async with self._slots:
            return await self._exchange(commands, write=write, until=until)

    async def _exchange(
        self, commands: Sequence[Command], *, write: bool, until: float | None
    ) -> list[Any]:
        payload = b"".join(hiredis.pack_command(c) for c in commands)  # before taking a conn
        cancels = cancels_requested()
        conn, generation = await self._checkout(until)
        if cancel_lost(cancels):  # in a new connection's handshake: nothing of ours was sent
            self._idle.append((conn, generation))  # the handshake ran to its end: in step
            raise asyncio.CancelledError
        replies: list[Any] = []
        try:
            left = None if until is None else until - time.monotonic()
            if left is not None and left <= 0:
                raise StoreUnavailable(
                    f"the call deadline ({deadline_name(self.deadline, self._base is not None)})"
                    f" passed before anything was sent to {self.where}; nothing ran: retry later"
                )
            if left is not None and self._short:  # a view's: its deadline, not the socket's
                async with asyncio.timeout(left):
                    await conn.send_packed_command([payload], check_health=False)
            else:
                await conn.send_packed_command([payload], check_health=False)
            if cancel_lost(cancels):  # sent, maybe applied: a cancel mid-call (below)
                raise asyncio.CancelledError
            extra = executor.wait_allowance(commands) if until is None else 0.0
            for i in range(len(commands)):
                try:
                    last = i == len(commands) - 1
                    replies.append(await self._read(conn, until, extra if last else 0.0))
                except ResponseError as exc:
                    replies.append(exc)
        except StoreUnavailable:
            self._idle.append((conn, generation))  # nothing sent: in step, may serve the next
            raise
        except BusyLoadingError as exc:
            await conn.disconnect()
            raise StoreUnavailable(
                f"{self.where} is loading its data set ({exc}); nothing ran: retry in a moment"
            ) from exc
        except (*NET_ERRORS, RedisError) as exc:  # RedisError: a garbled reply, say
            await conn.disconnect()
            self.topology.invalidate()
            if write:
                raise WriteOutcomeUnknown(
                    f"connection to {self.where} failed after the write was sent ({exc}); "
                    "it may or may not have been applied. Read the key to find out"
                ) from exc
            raise StoreUnavailable(f"{self.where} failed during a read ({exc}); retry") from exc
        except BaseException:  # cancelled mid-call: the connection is out of step, drop it
            await asyncio.shield(conn.disconnect())
            raise
        self._idle.append((conn, generation))
        return replies

    @staticmethod
    async def _read(conn: Any, until: float | None, extra: float = 0.0) -> Any:
        """One reply, waited for until ``until`` at most (then ``TimeoutError``).

        The deadline is our own ``asyncio.timeout``, not ``read_response(timeout=...)``:
        redis-py returns None (which is also a reply) when a timeout given so expires, so the
        last reply of a pipeline cut short by the deadline read as None, as if it had come.
        Past the deadline a reply already here is still taken (a 0 s timeout fires only if
        the read has to wait), as NodeExecutor._read_until does (its docstring says why)."""
        if until is None and extra and conn.socket_timeout is not None:
            # A trailing WAIT (executor.py): the socket timeout plus WAIT's own, as our timeout
            # for the reason above; math.inf keeps redis-py's socket timeout out of it.
            async with asyncio.timeout(conn.socket_timeout + extra):
                return await conn.read_response(timeout=math.inf)
        if until is None:
            return await conn.read_response()
        async with asyncio.timeout(max(until - time.monotonic(), 0.0)):
            return await conn.read_response()

    async def _checkout(self, until: float | None) -> tuple[Any, int]:
        """An idle connection of the current generation that is still alive, or a new one."""
        generation = self.topology.generation
        while self._idle:
            conn, made = self._idle.pop()
            if made == generation and conn.is_connected:
                try:
                    if not await conn.can_read():
                        return conn, generation
                except (*NET_ERRORS, RedisError):
                    pass
            await conn.disconnect()
        return await self._connect(until), generation

    async def _connect(self, until: float | None) -> Any:
        if self.topology.kind == "standalone":
            endpoint = self.topology.endpoint()
        else:  # may ask the sentinels (blocking sockets, up to sentinel_timeout each): off the loop
            endpoint = await asyncio.to_thread(self.topology.endpoint)
        timeout = endpoint.socket_timeout if endpoint.socket_timeout is not None else self.timeout
        connect_timeout = None
        pool = self._pool_deadline  # not a view's: the connection serves every call after
        if pool is not None:
            timeout = pool if timeout is None else min(timeout, pool)
        if until is not None:
            connect_timeout = max(until - time.monotonic(), 0.001)
        conn = endpoint.async_connection(timeout=timeout, connect_timeout=connect_timeout)
        try:
            if until is None:
                await conn.connect()
            else:  # the handshake too within what is left (NodeExecutor._connect says why)
                try:
                    async with asyncio.timeout(max(until - time.monotonic(), 0.001)):
                        await conn.connect()
                except TimeoutError:
                    await conn.disconnect()
                    raise
        except AuthenticationError as exc:
            raise ConfigurationError(f"{self.where} refused the credentials: {exc}") from exc
        except BusyLoadingError as exc:
            raise StoreUnavailable(
                f"{self.where} is loading its data set ({exc}); nothing ran: retry in a moment"
            ) from exc
        except NET_ERRORS as exc:
            self.topology.invalidate()
            raise StoreUnavailable(
                f"cannot reach {self.where} ({exc}); nothing was sent. Check that Redis runs "
                "and the URL is right, then retry"
            ) from exc
        except RedisError as exc:
            raise ConfigurationError(f"{self.where} refused the connection: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        """Disconnect the idle connections this executor opened; a view's does nothing (the
        connections are its executor's)."""
        if self._base is None:
            await self._close_idle()

    async def _close_idle(self) -> None:
        while self._idle:
            conn, _ = self._idle.pop()
            await conn.disconnect()
