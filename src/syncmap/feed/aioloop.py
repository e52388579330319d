"""One asyncio event loop per process, in a daemon thread, to drive asyncio-only clients (nats-py)
from syncmap's synchronous code.

Why one loop for the whole process, started on first use:

* nats-py ties a connection (its reader, flusher and ping tasks, its futures) to the loop that
  connected it, and every later call on that connection must run on that same loop.  So
  ``asyncio.run()`` per call is impossible, and some loop must outlive the calls.
* One loop serves every connection of every map: it only waits on sockets, which costs nothing
  per connection, where a loop per feed would cost a thread per map.  Nothing slow runs on it: the
  maps' handlers run on :class:`Dispatcher` threads, so a slow handler cannot stall the pings and
  reconnects of the other maps' connections.
* Started lazily, so importing syncmap starts no thread; a daemon, so it never keeps the process
  alive; restarted in a child process after ``fork()`` (the thread does not survive a fork).

The two directions:

* sync -> loop: :func:`run` runs a coroutine on the loop and waits for its result, with a timeout;
  :func:`spawn` starts one without waiting; :func:`call_soon` schedules a plain callback.
* loop -> sync: :class:`Dispatcher` runs one subscriber's callbacks in order on its own thread.

Calling :func:`run` on the loop's own thread would wait for itself forever, so it raises instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from .. import forksafe

T = TypeVar("T")
log = logging.getLogger("syncmap.feed")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid = 0


@forksafe.at_fork
def _forget_loop() -> None:
    """In a forked child the loop's thread does not exist: the next ``get_loop`` starts one."""
    global _lock, _loop, _thread
    _lock, _loop, _thread = threading.Lock(), None, None


def get_loop() -> asyncio.AbstractEventLoop:
    """The process's loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            thread = threading.Thread(target=serve, name="syncmap-asyncio", daemon=True)
            thread.start()
            started.wait()
            _loop, _thread, _pid = loop, thread, os.getpid()
        return _loop


def in_loop_thread() -> bool:
    """True on the loop's own thread (where :func:`run` must not be called)."""
    return _thread is not None and threading.current_thread() is _thread


def run(coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on the loop and return its result; raise what it raised.

    After ``timeout`` seconds the coroutine is cancelled and :class:`TimeoutError` is raised (the
    coroutine's own clean-up runs on the loop afterwards; the caller does not wait for it).
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError("aioloop.run() called on the event loop's own thread: it would deadlock")
    name = getattr(coro, "__qualname__", repr(coro))
    future = asyncio.run_coroutine_threadsafe(coro, get_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        # Either the wait ran out or the coroutine itself raised TimeoutError (the same class
        # since 3.11): a finished future tells which, and result() gives its own outcome.
        if future.done():
            return future.result()
        future.cancel()
        raise TimeoutError(f"{name} did not finish within {timeout} s") from None


def spawn(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Start ``coro`` on the loop and return at once (a future to cancel or inspect it)."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def call_soon(fn: Callable[..., object], *args: object) -> None:
    """Schedule ``fn(*args)`` on the loop thread (thread-safe; ``fn`` must not block)."""
    get_loop().call_soon_threadsafe(fn, *args)


_Item = tuple[Callable[..., object], tuple[object, ...], "asyncio.Future[None] | None"]


class Dispatcher:
    """Runs one subscriber's callbacks in order, one at a time, on a thread of its own.

    Why not on the loop thread: a handler may block (the map takes its lock, probes Redis) or
    publish on a feed (which waits on the loop: a deadlock if it ran there).

    The bound on what waits here: messages go through :meth:`call`, which the subscription's
    message task awaits, so at most one message per subscription is queued at a time, plus the
    connection events (:meth:`submit`, a handful per reconnect).  The backlog stays in nats-py's
    per-subscription queue, which has its own limit (``pending_msgs_limit``).

    After :meth:`close`, nothing more is called: a callback already running finishes, the queued
    ones are dropped (their awaiting message tasks are released).
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[..., object], *args: object) -> None:
        """Queue ``fn(*args)`` (any thread); it runs after everything queued before it."""
        if not self._closed:
            self._queue.put((fn, args, None))

    async def call(self, fn: Callable[..., object], *args: object) -> None:
        """Queue ``fn(*args)`` and wait (on the loop) until it has run: backpressure."""
        if self._closed:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, args, done))
        await done

    def close(self) -> None:
        """Stop (idempotent, from any thread, including a callback on this dispatcher)."""
        self._closed = True
        self._queue.put(None)

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            fn, args, done = item
            if not self._closed:
                try:
                    fn(*args)
                except Exception:  # one handler's bug must not end the subscription
                    log.exception("syncmap feed: a subscriber's callback failed")
            if done is not None:
                _release(done)
        # Closed: release every message task still waiting on a queued call.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2] is not None:
                _release(item[2])


def _release(done: asyncio.Future[None]) -> None:
    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    # A loop closed at interpreter exit raises RuntimeError: nobody waits any more.
    with contextlib.suppress(RuntimeError):
        done.get_loop().call_soon_threadsafe(resolve)
