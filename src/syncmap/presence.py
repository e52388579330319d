"""One presence round trip per process and Redis, whatever the number of maps (issue 16).

Each map still has its own record in its own hash (``<ns>:presence:{<map>}``, field = the map's
node id: what ``syncmap top`` and the documented least-privilege ACL know), but the maps of one
process on one store no longer refresh them each on its own probe turn.  They join the
process's :class:`Board` for that store; whichever map's probe turn finds the board due first
writes every member's HSET + PEXPIRE as one pipeline, and the others see it done.  So Redis wakes
for one round trip per process per ``presence_interval`` (the smallest of its maps') instead of
one per map.

Order of events when two probe turns (on two probe threads) find the board due at once: both
take the board's lock in turn; the first moves ``due`` on and writes; the second finds it not due
and only learns the new ``due``.  The members' records are built outside the lock (a record
reads its map's statistics).  The registry is emptied in a forked child (``forksafe``): the
child's maps join fresh boards when they start there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import forksafe
from .store.executor import Command, Executor

log = logging.getLogger("syncmap")


@dataclass(slots=True)
class Member:
    """One map's presence: its hash, its field (node id), how to build its record, its period."""

    key: str
    field: str
    record: Callable[[], dict[str, Any]]
    every: float
    written: bool = False

    def commands(self) -> list[Command]:
        data = json.dumps(self.record(), separators=(",", ":"))
        ttl_ms = max(1, round(self.every * 3000))  # a dead server's record goes with the hash
        return [("HSET", self.key, self.field, data), ("PEXPIRE", self.key, ttl_ms)]


class Board:
    """The maps of one process on one store: their presence records written together."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # held while records are built and sent (see leave)
        self._members: dict[int, Member] = {}
        self.due = 0.0  # monotonic time of the next refresh

    def join(self, member: Member) -> None:
        """Add a map; it is written on the next refresh (due now: a new map shows at once)."""
        with self._lock:
            self._members[id(member)] = member
            self.due = 0.0

    def leave(self, member: Member) -> None:
        """Remove a map.  Waits for a refresh under way, so that once this returns no write of
        the member's record is in flight: the caller's HDEL is not undone by a late HSET."""
        with self._writing, self._lock:
            self._members.pop(id(member), None)

    def refresh(self, executor: Executor) -> float:
        """Write every member's record in one round trip if due; the next due time.

        A failure (Redis down, a record the ACL refuses) is only logged: presence is
        informational, and the next period tries again."""
        with self._lock:
            now = time.monotonic()
            if now < self.due or not self._members:
                return self.due if self._members else now + 3600.0
            members = list(self._members.values())
            self.due = now + min(m.every for m in members)
            due = self.due
        with self._writing:
            return self._write(executor, members, due)

    def _write(self, executor: Executor, members: list[Member], due: float) -> float:
        with self._lock:  # a member that left since: its record is not written again
            members = [m for m in members if id(m) in self._members]
        commands: list[Command] = []
        built: list[Member] = []
        for m in members:
            try:
                commands += m.commands()
                built.append(m)
            except Exception as exc:  # one map's record must not silence the others
                log.debug("syncmap could not build a presence record (%r)", exc)
        if not commands:
            return due
        try:
            replies = executor.call(commands, write=True, partial=True)
        except Exception as exc:
            log.debug("syncmap presence refresh failed (%r)", exc)
            return due
        for i, m in enumerate(built):
            if not isinstance(replies[2 * i], Exception):
                m.written = True
        return due


_boards: dict[tuple[Any, ...], Board] = {}
_lock = threading.Lock()


@forksafe.at_fork
def _forget_boards() -> None:
    global _boards, _lock
    _boards, _lock = {}, threading.Lock()  # a parent's thread may have held the lock


def board(store: tuple[Any, ...]) -> Board:
    """This process's board for the store whose topology key is ``store``."""
    with _lock:
        found = _boards.get(store)
        if found is None:
            found = _boards[store] = Board()
        return found
