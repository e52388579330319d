"""Recording what a subscriber tells a :class:`~syncmap.feed.pubsub.Handler`, for the subscriber
tests: ``log`` holds ``"up"`` and ``"down"`` in order, ``messages`` the payloads; ``wait`` blocks
until a predicate over the record holds, woken by each callback (no polling), and fails with the
log at its deadline.  :class:`HandlerLog` for the thread subscribers (callbacks on their
threads), :class:`AsyncHandlerLog` for the loop's (make it on the loop that calls it back)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Self

from ..feed.pubsub import Handler

WAIT = 10.0


class _Record:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.messages: list[bytes] = []
        self.handler = Handler(self._message, lambda: self._note("up"), lambda: self._note("down"))

    def _message(self, data: bytes) -> None:
        self.messages.append(data)
        self._changed()

    def _note(self, what: str) -> None:
        self.log.append(what)
        self._changed()

    def _changed(self) -> None:
        raise NotImplementedError

    def _failed(self, what: str, timeout: float) -> AssertionError:
        return AssertionError(f"{what} within {timeout} s: {self.log}")


class HandlerLog(_Record):
    """Called back on subscriber threads; :meth:`wait` on any other thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        super().__init__()

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, predicate: Callable[[Self], bool], what: str, timeout: float = WAIT) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise self._failed(what, timeout)


class AsyncHandlerLog(_Record):
    """Called back on the loop it was made on; :meth:`wait` awaited there."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        super().__init__()

    def _changed(self) -> None:
        self._event.set()

    async def wait(self, predicate: Callable[[Self], bool], what: str,
                   timeout: float = WAIT) -> None:  # fmt: skip
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self):
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            raise self._failed(what, timeout) from None
