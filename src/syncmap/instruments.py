"""What an optional metrics exporter (:mod:`syncmap.otel`) reads and listens to: no dependency.

Two kinds of figures, so the hit path pays nothing:

* **read at collection time**: every open map's counters (its engine's near cache, found through
  :data:`engines`) and the process's lock counters (:data:`locks`).  An exporter reads them when
  it is scraped; nothing is added to a read or a write.
* **recorded as they happen**, only while an exporter listens (the hooks below are ``None``
  otherwise, and each caller tests that first): the age of each change message on arrival (on
  the feed thread) and the wait of each lock acquisition (after its round trips).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import forksafe

if TYPE_CHECKING:
    from .changes import FeedLogic as Engine

engines: weakref.WeakSet[Engine] = weakref.WeakSet()
"""Every map engine of this process (store-mode ``SyncMap``); closed ones are skipped by readers."""

ChangeAge = Callable[["Engine", float, bool], None]
change_age: ChangeAge | None = None
"""Called on the feed thread with (engine, age of the change in seconds, whether it dropped an
entry this server had cached) for every stamped change message (docs/protocol.md §4.3)."""

LockWait = Callable[[str, str, float], None]
lock_wait: LockWait | None = None
"""Called with (lock kind, result: ``acquired`` | ``timeout`` | ``error``, seconds waited) after
every acquisition attempt that ``acquire()`` made (blocking or not)."""


@dataclass
class LockCounters:
    """Per lock kind (``lock``, ``rwlock_read``, ``rwlock_write``, ``semaphore``, ``redlock``),
    since this process started: acquisitions by result, and holds lost."""

    acquired: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    mutex: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, table: dict[str, int], kind: str) -> None:
        with self.mutex:
            table[kind] = table.get(kind, 0) + 1


locks = LockCounters()


@forksafe.at_fork
def _fresh_mutex() -> None:
    locks.mutex = threading.Lock()  # a parent's thread may have held it at the fork


def lock_kind(what: str) -> str:
    """The kind of a lock from its ``what`` ("rwlock (read) 'orders' (owner ...)"): a small,
    fixed set of values fit for a metric attribute (never the lock's name: names carry keys)."""
    kind = what.partition(" '")[0]
    return kind.replace(" (", "_").rstrip(")") or "lock"


def lock_attempt(what: str, result: str, seconds: float) -> None:
    """Count one acquisition (``acquired`` | ``timeout`` | ``error``) and report its wait."""
    kind = lock_kind(what)
    table = {"acquired": locks.acquired, "timeout": locks.timeouts}.get(result, locks.errors)
    locks.count(table, kind)
    hook = lock_wait
    if hook is not None:
        hook(kind, result, seconds)


def lock_lost(what: str) -> None:
    locks.count(locks.lost, lock_kind(what))
