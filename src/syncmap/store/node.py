"""``NodeExecutor``: precise round trips to the one node a topology names now.

redis-py retries every command, writes included, up to 10 times by default: a write whose reply
was lost could run twice.  So syncmap sends every request itself, on connections of its own made
by the topology's :class:`~syncmap.store.endpoint.Endpoint`, and keeps the contract of
``executor.py``:

* no connection could be had (refused, DNS, no master named)  -> ``StoreUnavailable``
* it failed after the request was (partly) sent              -> ``WriteOutcomeUnknown`` for
                                                                writes; a read is retried once
* Redis answered NOSCRIPT                                     -> load the scripts, resend
* the call's deadline (``deadline=``, ``MapConfig.call_timeout``) passed
  before sending                                             -> ``StoreUnavailable``
  after sending                                              -> as a failure after sending

Following the master.  A connection failure, or a ``READONLY``/``MASTERDOWN`` refusal (the node
is no longer the master: nothing ran), calls ``topology.invalidate()``: the next connection
re-resolves the master (Sentinel).  Every idle connection remembers the topology ``generation``
it was made in; one made for an older generation is dropped at checkout, so after a failover no
call goes to the old master over a connection kept from before.

Views (:meth:`NodeExecutor.within`).  A Cluster map's probes wait at most
``MapConfig.probe_deadline``, shorter than its data calls may (``MapConfig.probe_deadline``
says why), on the same connections (issue 16 goal 1: a second executor was a third connection
per process and master).  Connections are made for the executor's own calls: their socket
timeout is the executor's, whoever connects.  A view's call bounds what it waits for by what is
left of its deadline: the connect (its timeout), the handshake and the send (the socket's
timeout set to what is left, and put back before the connection serves anything else: a data
call after it must not time out at a probe's deadline), and every reply (``_read_until``: a
per-read timeout, which redis-py puts back itself).  A reply the deadline cut short closes the
connection (``_failed``), never returned to the free list with the reply still to come.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import hiredis
from redis.connection import Connection
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import forksafe
from ..errors import ConfigurationError, StoreUnavailable, WriteOutcomeUnknown
from . import executor, scripts
from .executor import Command, evalsha, noscript, settle

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .topology import Topology

NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
IDLE_TRIM = 5.0
"""Seconds an idle connection beyond the most recent one may sit unused before a call closes it
(:meth:`NodeExecutor._trim`): an idle process keeps one data connection per executor."""
RETIMEABLE = hasattr(Connection, "update_current_socket_timeout")
"""Whether redis-py can change a connected socket's timeout and put it back (the redis-py releases
with maintenance notifications; ``tests/integration/test_executor_views.py`` checks it does):
a view's handshake and send then wait only what is left of its deadline on a connection that
keeps the full timeout.  Older: a connection a view makes is used for that call alone."""
SINGLE_USE = -1
"""The generation of a connection that must not be kept (made by a view on an older redis-py,
its socket timeout the view's): closed after its call, never idle."""


@dataclass(slots=True)
class Sent:
    """A pipeline :meth:`NodeExecutor.send` sent, whose replies are still to be read."""

    commands: Sequence[Command]
    retries: int  # a read may be sent once more if it fails
    conn: Any = None
    generation: int = 0


class NodeExecutor:
    """Pipelined calls on a small free list of connections to ``topology``'s current node.

    ``timeout`` is the socket timeout when the endpoint has none: a call must never hang forever
    (a lock's renewal that hangs would hold every other renewal up).  ``deadline`` bounds a
    whole :meth:`call` (connecting, sending, every reply, a read's retry): each reply is waited
    for at most what is left of it, so a hung Redis costs a call at most ``deadline``.
    """

    def __init__(
        self, topology: Topology, *, timeout: float | None = None, deadline: float | None = None
    ) -> None:
        self.topology = topology
        self.where = topology.where
        self.timeout = timeout
        self.deadline = deadline
        # The deadline the connections are made for (it caps their socket timeout): this
        # executor's own, in its views too.  A view's calls end sooner (``_short``).
        self._pool_deadline = deadline
        self._base: NodeExecutor | None = None  # a view's executor (whose connections it uses)
        self._short = False
        # (connection, the generation it was made in, when it went idle), most recent last;
        # one list, shared by the views
        self._idle: list[tuple[Any, int, float]] = []
        forksafe.register(self)

    def _after_fork_in_child(self) -> None:
        # The idle connections are the parent's sockets too: forget them without a shutdown
        # (redis-py closes only this process's copy of a connection made by another pid).
        # Emptied in place: the views hold the same list.
        self._idle.clear()

    def within(self, deadline: float) -> NodeExecutor:
        """A view of this executor: the same connections (one free list, one pool), each call
        bounded by ``deadline`` (the module docstring says how).  Its ``close()`` closes
        nothing; closing this executor closes the connections."""
        view = copy.copy(self)  # shares _idle: the same list object
        view.deadline = deadline
        view._base = self._base or self
        view._short = self._pool_deadline is None or deadline < self._pool_deadline
        return view

    evalsha = staticmethod(evalsha)

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        """Send ``commands`` as one pipeline; replies in order (the contract of executor.py).

        ``partial=True`` returns refusals (as SyncMapErrors) in place of their replies instead of
        raising the first: the other commands of the pipeline did run.
        """
        until = None if self.deadline is None else time.monotonic() + self.deadline
        replies = self.raw(commands, write=write, until=until)
        not_master, first = settle(replies, self.where, partial=partial)
        if not_master:
            self._not_master()
        if first is not None:
            raise first
        return replies

    def raw(self, commands: Sequence[Command], *, write: bool, until: float | None) -> list[Any]:
        """The replies as Redis gave them (error replies in place, not yet mapped), NOSCRIPT
        handled: what :meth:`call` settles, and what a Cluster executor routes (``cluster.py``).
        """
        replies = self._roundtrip(commands, write=write, until=until)
        return self._scripts_loaded(commands, replies, write=write, until=until)

    def send(self, commands: Sequence[Command], *, write: bool, until: float | None) -> Sent:
        """The first half of :meth:`raw`: ``commands`` sent as one pipeline, no reply read yet,
        so a Cluster executor can send every master's pipeline before it waits for any.
        ``StoreUnavailable``: nothing was sent (a read tries twice, as :meth:`raw` does)."""
        sent = Sent(commands, retries=0 if write else 1)
        while True:
            try:
                sent.conn, sent.generation = self._send(commands, write=write, until=until)
                return sent
            except StoreUnavailable:
                if not sent.retries or (until is not None and time.monotonic() >= until):
                    raise
                sent.retries -= 1

    def finish(self, sent: Sent, *, write: bool, until: float | None) -> list[Any]:
        """The second half of :meth:`raw`: the replies of :meth:`send`'s pipeline, NOSCRIPT
        handled; a read that fails now is sent again if it has a try left."""
        try:
            replies = self._receive(sent.conn, sent.generation, sent.commands, write=write,
                                    until=until)  # fmt: skip
        except WriteOutcomeUnknown:
            raise
        except StoreUnavailable:
            if not sent.retries or (until is not None and time.monotonic() >= until):
                raise
            replies = self._once(sent.commands, write=write, until=until)
        return self._scripts_loaded(sent.commands, replies, write=write, until=until)

    @property
    def ready(self) -> bool:
        """Whether an idle connection of the current generation may be reused: sending then
        needs no connect and no handshake (either of which a hung node makes wait).  A node
        whose connection just failed has none: its generation moved on (``_checkout``)."""
        generation = self.topology.generation
        return any(made == generation for _, made, _ in self._idle)

    def _scripts_loaded(self, commands: Sequence[Command], replies: list[Any], *, write: bool,
                        until: float | None) -> list[Any]:  # fmt: skip
        missing = noscript(replies)
        if missing:  # the script cache was flushed (restart, SCRIPT FLUSH): nothing ran
            load = [("SCRIPT", "LOAD", src) for src in scripts.ALL.values()]
            self._roundtrip(load, write=False, until=until)
            again = self._roundtrip([commands[i] for i in missing], write=write, until=until)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    def _not_master(self) -> None:
        """The node refused as a replica would: drop our connections, re-resolve the master."""
        self.topology.invalidate()
        self._close_idle()

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
        conn, generation = self._send(commands, write=write, until=until)
        return self._receive(conn, generation, commands, write=write, until=until)

    def _send(self, commands: Sequence[Command], *, write: bool,
              until: float | None) -> tuple[Any, int]:  # fmt: skip
        """Check out a connection and send ``commands`` on it; (connection, generation)."""
        payload = b"".join(hiredis.pack_command(c) for c in commands)  # before taking a conn
        conn, generation = self._checkout(until)
        try:
            if until is None:
                conn.send_packed_command([payload], check_health=False)
            else:
                left = self._check_deadline(until)
                if self._short and RETIMEABLE:
                    self._send_within(conn, payload, left)
                else:
                    conn.send_packed_command([payload], check_health=False)
        except StoreUnavailable:
            self._release(conn, generation)  # nothing sent: in step
            raise
        except BaseException as exc:
            self._failed(conn, exc, write=write)
        return conn, generation

    @staticmethod
    def _send_within(conn: Any, payload: bytes, left: float) -> None:
        """A view's send: the socket waits at most ``left`` (not the connection's timeout) to
        take the pipeline, then its own timeout is put back, before any reply is read (reads
        pass their own timeout, and restore the socket's to the value redis-py keeps, which
        ``-1`` puts back too).  A send cut short closes the connection (``_failed``)."""
        full = conn.socket_timeout
        conn.update_current_socket_timeout(left if full is None else min(left, full))
        try:
            conn.send_packed_command([payload], check_health=False)
        finally:
            conn.update_current_socket_timeout(-1)  # -1: conn.socket_timeout

    def _receive(self, conn: Any, generation: int, commands: Sequence[Command], *, write: bool,
                 until: float | None) -> list[Any]:  # fmt: skip
        """Read the replies of ``commands`` (error replies in place); the connection goes back
        idle.  A trailing WAIT's reply is waited for its own timeout beyond the socket timeout
        (executor.py's contract); under a call deadline the deadline alone bounds every read."""
        replies: list[Any] = []
        count = len(commands)
        try:
            if until is None:
                extra = executor.wait_allowance(commands)
                for i in range(count):
                    try:
                        if extra and i == count - 1:
                            base = conn.socket_timeout
                            replies.append(conn.read_response(
                                timeout=None if base is None else base + extra))  # fmt: skip
                        else:
                            replies.append(conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            else:
                self._read_until(conn, count, until, replies)
        except BaseException as exc:
            self._failed(conn, exc, write=write)
        self._release(conn, generation)
        return replies

    def _release(self, conn: Any, generation: int) -> None:
        """A connection in step (every reply read, or nothing sent) goes back idle; one made
        for a single call (``SINGLE_USE``) is closed."""
        if generation == SINGLE_USE:
            conn.disconnect()
        else:
            self._idle.append((conn, generation, time.monotonic()))

    def _failed(self, conn: Any, exc: BaseException, *, write: bool) -> NoReturn:
        """A connection failed while sending or reading: what that means (module docstring)."""
        conn.disconnect()
        if isinstance(exc, BusyLoadingError):
            # A -LOADING reply (redis-py raises it as a ConnectionError and drops the socket):
            # Redis refused the command while loading its data set, so nothing ran.
            raise StoreUnavailable(
                f"{self.where} is loading its data set ({exc}); nothing ran: retry in a moment"
            ) from exc
        if isinstance(exc, (*NET_ERRORS, RedisError)):  # RedisError: a garbled reply, say
            self.topology.invalidate()
            if write:
                raise WriteOutcomeUnknown(
                    f"connection to {self.where} failed after the write was sent ({exc}); "
                    "it may or may not have been applied. Read the key to find out"
                ) from exc
            raise StoreUnavailable(f"{self.where} failed during a read ({exc}); retry") from exc
        raise exc

    @staticmethod
    def _read_until(conn: Any, count: int, until: float, replies: list[Any]) -> None:
        """Read ``count`` replies, each waited for at most until ``until``.

        Once ``until`` has passed, a reply that has already arrived is still taken (read with
        timeout 0: no wait; one not there yet fails as a timeout).  Why: a Cluster executor
        reads its masters' replies one master after another (``clusterexec.py``).  Order of
        events without this: every master's pipeline is sent; the first master read is hung and
        costs the whole deadline; the other masters' replies, in our socket buffers long since,
        were then refused as "the call deadline passed", so one hung master failed every part
        of every call (every probe: every bucket's lease lapsed)."""
        for _ in range(count):
            left = max(until - time.monotonic(), 0.0)
            try:
                replies.append(conn.read_response(timeout=left))
            except ResponseError as exc:
                replies.append(exc)

    def _check_deadline(self, until: float) -> float:
        """What is left until ``until``; ``StoreUnavailable`` if it passed already (nothing
        has been sent yet)."""
        left = until - time.monotonic()
        if left <= 0:
            raise StoreUnavailable(
                f"the call deadline ({deadline_name(self.deadline, self._base is not None)}) "
                f"passed before anything was sent to {self.where}; nothing ran: retry later"
            )
        return left

    def _checkout(self, until: float | None = None) -> tuple[Any, int]:
        """An idle connection of the current generation that is still alive, or a new one.

        Our own small free list instead of a pool (redis-py 8's pool bookkeeping costs about
        10 us a call).  A connection that has anything to read while idle (EOF after a Redis
        restart) is replaced here, before sending, so its death is not mistaken for an unknown
        write outcome.  ``is_connected`` is checked first: ``can_read`` would reconnect a closed
        connection silently.
        """
        generation = self.topology.generation
        while True:
            try:
                conn, made, _ = self._idle.pop()
            except IndexError:
                break
            if made == generation and conn.is_connected:
                try:
                    if not conn.can_read(0):
                        self._trim()
                        return conn, generation
                except (*NET_ERRORS, RedisError):
                    pass
            conn.disconnect()
        conn, keep = self._connect(until)
        return conn, generation if keep else SINGLE_USE

    def _trim(self) -> None:
        """Called with a connection in hand: close the least recently used idle one if it sat
        unused ``IDLE_TRIM`` s.

        The list grows with the calls in flight at once (a map opening while another probes),
        and nothing shrank it: the maps of an idle process sharing this executor held two or
        three connections where one serves them (issue 16 goal 1).  Connections go back on top
        and are taken from the top, so the bottom one is the least recently used; one is
        closed per call, and a busy executor keeps every connection it keeps using."""
        try:
            entry = self._idle[0]
        except IndexError:
            return
        if time.monotonic() - entry[2] >= IDLE_TRIM:
            try:
                self._idle.remove(entry)
            except ValueError:  # another call took it meanwhile
                return
            entry[0].disconnect()

    def _connect(self, until: float | None) -> tuple[Any, bool]:
        """A new connection to the node the topology names now (resolved here if need be), and
        whether it may be kept for later calls (its socket timeout the full one)."""
        endpoint = self.topology.endpoint()
        timeout = endpoint.socket_timeout if endpoint.socket_timeout is not None else self.timeout
        connect_timeout = None
        pool = self._pool_deadline  # not a view's: the connection serves every call after
        if pool is not None:
            timeout = pool if timeout is None else min(timeout, pool)
        handshake = timeout
        if until is not None:  # connect, and shake hands, within what is left of the deadline
            connect_timeout = max(until - time.monotonic(), 0.001)
            # Older redis-py cannot put the timeout back: as before for the executor's own
            # calls (a handshake waits up to the full timeout), and a view's connection,
            # shortened, serves its call alone (SINGLE_USE).
            if RETIMEABLE or self._short:
                handshake = connect_timeout if timeout is None else min(timeout, connect_timeout)
        conn = endpoint.connection(timeout=handshake, connect_timeout=connect_timeout)
        try:
            conn.connect()
            if handshake != timeout and RETIMEABLE:
                # The handshake (CLIENT SETINFO, AUTH, SELECT: replies read with the socket
                # timeout) waited at most what was left of the call's deadline; the connection
                # keeps the full timeout for its later calls.  Order this prevents: a Cluster
                # call sends to the masters it has connections to, then connects to a hung
                # one, whose handshake then waited a whole deadline from *there*: every probe
                # outlasted probe_deadline by what it had spent before (S27-cluster).
                conn.socket_timeout = timeout
                conn.update_current_socket_timeout(-1)  # -1: conn.socket_timeout
        except AuthenticationError as exc:
            raise ConfigurationError(f"{self.where} refused the credentials: {exc}") from exc
        except BusyLoadingError as exc:  # -LOADING to the handshake: nothing was sent
            raise StoreUnavailable(
                f"{self.where} is loading its data set ({exc}); nothing ran: retry in a moment"
            ) from exc
        except NET_ERRORS as exc:
            self.topology.invalidate()
            raise StoreUnavailable(
                f"cannot reach {self._at(endpoint)} ({exc}); nothing was sent. "
                "Check that Redis runs and the URL is right, then retry"
            ) from exc
        except RedisError as exc:  # refused while connecting: DB out of range, ACL on SELECT
            raise ConfigurationError(f"{self.where} refused the connection: {exc}") from exc
        return conn, handshake == timeout or RETIMEABLE

    def _at(self, endpoint: Endpoint) -> str:
        """Where, with the node's address when the topology's name does not tell it."""
        return self.where if endpoint.where == self.where else f"{self.where} ({endpoint.address})"

    def close(self) -> None:
        """Disconnect the idle connections this executor opened; a view's does nothing (the
        connections are its executor's, which other callers use)."""
        if self._base is None:
            self._close_idle()

    def _close_idle(self) -> None:
        while self._idle:
            try:
                conn, _, _ = self._idle.pop()
            except IndexError:
                return
            conn.disconnect()


def deadline_name(deadline: float | None, view: bool) -> str:
    """For messages: ``0.25 s, MapConfig.call_timeout``; a view's deadline is a probe's."""
    return f"{deadline} s, MapConfig.{'probe_deadline' if view else 'call_timeout'}"
