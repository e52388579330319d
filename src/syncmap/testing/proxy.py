"""A TCP proxy that injects network faults between a client and one Redis endpoint.

The proxy runs an asyncio loop in a daemon thread; test code controls it with plain synchronous
calls, each of which runs on the loop and returns once the change is in force.  Faults ("toxics")
apply to every open and future connection until :meth:`FaultProxy.heal`.

Directions: ``"upstream"`` is client to server (commands), ``"downstream"`` is server to client
(replies and pub/sub pushes).

Scopes: a toxic may strike only some connections (``only=``): ``"subscribers"``, the connections
that have sent a subscribe command (``SUBSCRIBE``, ``PSUBSCRIBE``, ``SSUBSCRIBE``), or
``"others"``, every other one (data paths, replication).  The proxy tells them apart by the
command that starts a chunk a client sends: a client sends its subscribe command after its
handshake's replies came back, so the command starts a fresh chunk, and a chunk that merely
carries the word inside a value does not count.  A connection turns into a subscriber at the
chunk holding its first subscribe command, before that chunk is forwarded: a subscriber stall
holds a new subscriber's very subscription (it connects, does its handshake, and hears nothing).
On a Redis Cluster whose master announces the proxy's port (``cluster-announce-port``) this
stalls one master's sharded subscriber connections alone, or slows its data path alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeAlias, TypeVar

Direction = Literal["upstream", "downstream"]
Which = Literal["upstream", "downstream", "both"]
Scope = Literal["all", "subscribers", "others"]
_DIRECTIONS: tuple[Direction, Direction] = ("upstream", "downstream")
_CHUNK = 64 * 1024
_CONTROL_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 2.0
_LINGER_RST = struct.pack("ii", 1, 0)
_T = TypeVar("_T")
# A RESP array whose first element names a subscribe command: "*<n>\r\n$<len>\r\n<name>".
_SUBSCRIBE = re.compile(rb"\*\d+\r\n\$\d+\r\n(?:P|S)?SUBSCRIBE\r\n", re.IGNORECASE)
# Chunks stamped with the loop time they may be delivered at; None marks end of stream.
_Queue: TypeAlias = "asyncio.Queue[tuple[float, bytes] | None]"


def _pick(which: Which) -> tuple[Direction, ...]:
    if which == "both":
        return _DIRECTIONS
    if which not in _DIRECTIONS:
        raise ValueError(f"direction must be upstream, downstream or both, not {which!r}")
    return (which,)


@dataclass
class _Toxics:
    """The faults in force for one direction, shared by the connections in ``scope``."""

    delay: float = 0.0
    blackhole: bool = False
    limit: int | None = None
    scope: Scope = "all"
    # Set while data may flow; cleared by stall().  Both pumps of a direction wait on it.
    flowing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.flowing.set()  # safe before the loop runs: an Event binds to a loop on first wait

    def strikes(self, conn: _Conn) -> bool:
        """Whether this direction's toxics apply to ``conn`` (as it is known now)."""
        if self.scope == "all":
            return True
        return conn.subscriber == (self.scope == "subscribers")

    async def flowing_for(self, conn: _Conn) -> None:
        """Return once data of ``conn`` may flow: at once for a connection out of scope."""
        while self.strikes(conn) and not self.flowing.is_set():
            await self.flowing.wait()


@dataclass(eq=False)  # identity hashing: connections live in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    budget: dict[Direction, int | None]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    subscriber: bool = False  # it has sent a subscribe command (module docstring: Scopes)

    def note(self, chunk: bytes) -> None:
        """Look at a chunk the client sent: does it start with a subscribe command?"""
        if not self.subscriber and _SUBSCRIBE.match(chunk):
            self.subscriber = True

    def close(self, *, reset: bool = False) -> None:
        """FIN both sides (after flushing), or RST them when *reset*."""
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    # Linger 0 makes close() send RST instead of FIN.
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                writer.transport.abort()
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    async def wait_closed(self) -> None:
        """Wait until both sockets are really closed (so a FIN/RST has been sent)."""
        waits = [w.wait_closed() for w in (self.client, self.upstream)]
        try:
            await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), _CLOSE_TIMEOUT)
        except TimeoutError:
            # A FIN close waits to flush to a peer that may never read: give up and drop it.
            self.client.transport.abort()
            self.upstream.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:<port> to one upstream ``host:port`` with switchable faults."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._toxics = {d: _Toxics() for d in _DIRECTIONS}
        self._conns: set[_Conn] = set()
        self._bytes: dict[Direction, int] = dict.fromkeys(_DIRECTIONS, 0)
        self.total_connections = 0
        self._refusing = False

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._conns)

    @property
    def bytes_forwarded(self) -> dict[Direction, int]:
        """Bytes delivered so far, per direction."""
        return dict(self._bytes)

    def start(self) -> Self:
        if self._loop is not None:
            return self
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"FaultProxy-{self.upstream_port}", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._listen)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop listening, drop every connection and end the thread.  Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CONTROL_TIMEOUT)
            loop.close()
            self._loop = self._thread = None

    def latency(self, ms: float, direction: Which = "downstream", *, only: Scope = "all") -> None:
        """Delay each chunk by *ms*, keeping order (later data never overtakes earlier data).
        ``only``: the connections it strikes (module docstring: Scopes), for every toxic of
        ``direction`` until :meth:`heal`."""
        self._set(direction, lambda t: setattr(t, "delay", ms / 1000.0), only)

    def stall(self, direction: Which = "both", *, only: Scope = "all") -> None:
        """Stop reading: TCP back-pressure builds and the peer sees neither data nor FIN/RST.
        ``only``: as for :meth:`latency` (``"subscribers"``: a silent feed, a live data path)."""
        self._set(direction, lambda t: t.flowing.clear(), only)

    @property
    def subscribers(self) -> int:
        """Open connections that have sent a subscribe command."""
        return sum(1 for conn in self._conns if conn.subscriber)

    def blackhole(self, direction: Which = "both", *, only: Scope = "all") -> None:
        """Read and discard: the sender's writes succeed, nothing arrives.  ``only``: as for
        :meth:`latency`."""
        self._set(direction, lambda t: setattr(t, "blackhole", True), only)

    def limit_data(
        self, n_bytes: int, direction: Which = "downstream", *, future: bool = True
    ) -> None:
        """Close each connection after *n_bytes* more bytes, cutting a reply mid-frame.

        ``future=False``: only the connections open now; later ones are not limited (so a
        client's retry on a new connection gets through)."""
        directions = _pick(direction)
        self._on_loop(lambda: self._set_limit(directions, n_bytes, future=future))

    def refuse(self) -> None:
        """Close every open connection, and every new one at once: to a client the server is
        down, while the real one keeps running (and keeps its data).  ``heal`` undoes it."""
        self._on_loop(lambda: setattr(self, "_refusing", True))
        self.close_all()

    def heal(self) -> None:
        """Remove every toxic; stalled and delayed data then flows on."""
        self._on_loop(self._heal)

    def reset_all(self) -> None:
        """RST every open connection (both sides)."""
        self._call(lambda: self._close_conns(reset=True))

    def close_all(self) -> None:
        """FIN every open connection (both sides)."""
        self._call(lambda: self._close_conns(reset=False))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<FaultProxy {self.host}:{self._port} -> {self.upstream_host}:{self.upstream_port}"
            f" conns={len(self._conns)}>"
        )

    def _call(self, fn: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
        if self._loop is None:
            raise RuntimeError("proxy not started")
        if threading.current_thread() is self._thread:
            raise RuntimeError("FaultProxy control methods must not be called from its own loop")
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(_CONTROL_TIMEOUT)

    def _on_loop(self, fn: Callable[[], object]) -> None:
        async def run() -> None:
            fn()

        self._call(run)

    def _set(self, which: Which, change: Callable[[_Toxics], object], only: Scope = "all") -> None:
        directions = _pick(which)  # validate here, so the caller gets the ValueError
        if only not in ("all", "subscribers", "others"):
            raise ValueError(f"only must be all, subscribers or others, not {only!r}")

        def apply() -> None:
            for d in directions:
                self._toxics[d].scope = only
                change(self._toxics[d])

        self._on_loop(apply)

    def _set_limit(
        self, directions: tuple[Direction, ...], limit: int | None, *, future: bool = True
    ) -> None:
        for d in directions:
            if future:
                self._toxics[d].limit = limit
            for conn in self._conns:
                conn.budget[d] = limit

    def _heal(self) -> None:
        for toxics in self._toxics.values():
            toxics.delay, toxics.blackhole, toxics.scope = 0.0, False, "all"
            toxics.flowing.set()
        self._set_limit(_DIRECTIONS, None)
        self._refusing = False

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _close_conns(self, *, reset: bool) -> None:
        conns = list(self._conns)
        for conn in conns:
            conn.close(reset=reset)
        tasks = [t for c in conns for t in c.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.wait_closed() for c in conns))
        self._conns.difference_update(conns)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self._close_conns(reset=False)
        # Accept handlers still connecting upstream, and anything else left on the loop.
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)
        await asyncio.get_running_loop().shutdown_default_executor()

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            c_writer.close()
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
        except OSError:
            # Upstream down: the client sees the connection close, as with a dead server.
            c_writer.close()
            return
        except asyncio.CancelledError:
            c_writer.close()
            raise
        budget = {d: self._toxics[d].limit for d in _DIRECTIONS}
        conn = _Conn(client=c_writer, upstream=u_writer, budget=budget)
        self._conns.add(conn)
        self.total_connections += 1
        self._pump(conn, "upstream", c_reader)
        self._pump(conn, "downstream", u_reader)

    def _pump(self, conn: _Conn, direction: Direction, reader: asyncio.StreamReader) -> None:
        """A reader and a writer task per direction, so latency delays without reordering."""
        queue: _Queue = asyncio.Queue()
        task = self._read(conn, reader, self._toxics[direction], queue, direction == "upstream")
        conn.tasks.append(asyncio.create_task(task))
        conn.tasks.append(asyncio.create_task(self._write(conn, direction, queue)))

    @staticmethod
    async def _read(
        conn: _Conn, reader: asyncio.StreamReader, toxics: _Toxics, queue: _Queue, client: bool
    ) -> None:
        """Read one direction, stamping each chunk with the time it may be delivered.  A chunk
        from the client is looked at first: the one that makes its connection a subscriber is
        held by a subscriber stall (a second ``flowing_for``) rather than forwarded."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while True:
                await toxics.flowing_for(conn)
                if not (data := await reader.read(_CHUNK)):
                    break
                if client:
                    conn.note(data)
                    await toxics.flowing_for(conn)
                if not (toxics.blackhole and toxics.strikes(conn)):
                    delay = toxics.delay if toxics.strikes(conn) else 0.0
                    queue.put_nowait((loop.time() + delay, data))
        queue.put_nowait(None)  # end of stream: the writer flushes what is queued, then closes

    async def _write(self, conn: _Conn, direction: Direction, queue: _Queue) -> None:
        """Deliver queued chunks in order, each no earlier than its stamp."""
        toxics, budget = self._toxics[direction], conn.budget
        writer = conn.upstream if direction == "upstream" else conn.client
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await toxics.flowing_for(conn)
                if (left := budget[direction]) is not None:
                    data = data[:left]
                    budget[direction] = left - len(data)
                # Count before writing: the peer may act on the bytes before this thread resumes.
                self._bytes[direction] += len(data)
                writer.write(data)
                await writer.drain()
                if budget[direction] == 0:
                    break  # limit_data: cut the connection right here, mid-frame
        conn.close()
        self._conns.discard(conn)
