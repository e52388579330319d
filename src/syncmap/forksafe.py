"""After ``fork()``: what the child inherits from syncmap starts over, as if opened there.

Pre-fork servers (gunicorn ``--preload``, uWSGI, Celery prefork, ``multiprocessing`` with the fork
start method) create maps and locks in a parent and fork workers.  A child inherits copies of
every socket (parent and child would read each other's replies: another key's value), none of
the background threads (no invalidations, no lease renewals), and any ``threading.Lock`` that a
thread of the parent held at the moment of the fork (held forever in the child).

So every object that owns sockets, threads, locks or per-process identity registers here, and
``os.register_at_fork(after_in_child=...)`` resets each one in the child *before* ``fork()``
returns there.  Order of events in the child:

1. ``fork()`` copies memory; only the forking thread exists in the child;
2. :func:`_in_child` bumps :func:`generation` and runs every hook: registries emptied, locks
   replaced by fresh ones (never acquired: a parent's thread may have held them), idle sockets
   forgotten without a shutdown (the parent still uses them), near caches emptied, holds marked
   not held.  A hook does no I/O and starts no thread;
3. ``fork()`` returns; the first use of a map or lock in the child opens what it needs (a
   subscriber connection, the map's probe and timer turns, the watchdog) exactly as a new one
   would.  The scheduler that runs those turns (``schedule.py``) resets itself with a hook of its
   own, outside :data:`enabled`.

The parent is untouched: nothing here runs in it.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("syncmap")


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_generation = 0
enabled = True
"""Test-only: False makes children inherit everything as-is (the guard-off control of the fork
tests, which must then fail).  Never switch it off in a service."""
# id -> weak reference (maps are unhashable, as every MutableMapping is, so no WeakSet)
_objects: dict[int, weakref.ref[ForkAware]] = {}
_functions: list[Callable[[], None]] = []
_lock = threading.Lock()


def generation() -> int:
    """How many forks this process descends from (0 in the process that imported syncmap)."""
    return _generation


def register(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while ``obj`` is alive."""
    key = id(obj)
    with _lock:
        _objects[key] = weakref.ref(obj, lambda _ref: _objects.pop(key, None))


def at_fork(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorator: run ``fn()`` in every forked child (module and class-level state)."""
    _functions.append(fn)
    return fn


def _in_child() -> None:
    global _generation, _lock
    if not enabled:
        return
    _generation += 1
    _lock = threading.Lock()  # a parent's thread may have held it at the fork
    for fn in _functions:  # registries first: the objects' hooks may rely on them being empty
        _run(fn)
    for ref in list(_objects.values()):
        obj = ref()
        if obj is not None:
            _run(obj._after_fork_in_child)


def _run(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # one object's trouble must not leave the others shared with the parent
        log.exception("syncmap: resetting %r after fork failed", hook)


os.register_at_fork(after_in_child=_in_child)
