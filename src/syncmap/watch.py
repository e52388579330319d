"""``Watch``: iterate over a map's change events as they happen."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Protocol

from .core.nearcache import Event


class _Source(Protocol):
    """Where a watch's events come from: a store-mode map's engine, a replicated map's fanout."""

    def unwatch(self, q: queue.Queue[Event | None]) -> None: ...


class Watch:
    """An iterator over a map's change events; close it (or use ``with``) to stop."""

    def __init__(self, engine: _Source, q: queue.Queue[Event | None]) -> None:
        self._engine, self._q = engine, q

    def __iter__(self) -> Iterator[Event]:
        while (event := self._q.get()) is not None:
            yield event

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds (or when the map closed)."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop watching: a ``for e in watch`` loop (in any thread) ends after the events
        already queued."""
        self._engine.unwatch(self._q)

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
