"""Finding syncmap code that blocked an event loop, from asyncio's own debug-mode warnings.

In debug mode (``loop.set_debug(True)``) asyncio logs ``Executing <handle> took N seconds`` on the
``asyncio`` logger for every callback that ran longer than ``loop.slow_callback_duration``.  The
handle names its code: a task's repr carries its name and the file of its coroutine, a plain
callback its function and, in debug mode, where it was scheduled.  :func:`syncmap_slow_callbacks`
keeps the warnings that name syncmap's code (a file of the ``syncmap`` package outside
``syncmap.testing``, or a task named ``syncmap-...``), so a test's own slow step does not fail
it, while a syncmap reader task that blocks does.

Measured on the 2-core shared machine: at 5 ms, a step of a few hundred microseconds is now and
then preempted past the threshold (one test in several runs of the heavier checks; a test's own
trivial step was seen at 43 ms), so a 5 ms guard can fail without any blocking call.

Limit: a syncmap coroutine awaited *inside a test's task* shows as the test's task; only the
library's own tasks and callbacks (readers, subscribers, watchers, timers) are attributed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable

import syncmap

SLOW_CALLBACK = 0.005
"""Seconds: the threshold the asyncio feed tests run with (issue 15: "a few ms")."""
_PACKAGE = os.path.dirname(syncmap.__file__)
_TESTING = os.path.join(_PACKAGE, "testing")


def guard(loop: asyncio.AbstractEventLoop, threshold: float = SLOW_CALLBACK) -> None:
    """Debug mode on ``loop``, with ``threshold`` as its slow-callback duration."""
    loop.set_debug(True)
    loop.slow_callback_duration = threshold


def syncmap_slow_callbacks(records: Iterable[logging.LogRecord]) -> list[str]:
    """The slow-callback warnings among ``records`` that name syncmap code."""
    found = []
    for record in records:
        if record.name != "asyncio":
            continue
        text = record.getMessage()
        if text.startswith("Executing") and " took " in text and _names_syncmap(text):
            found.append(text)
    return found


def _names_syncmap(text: str) -> bool:
    """The library's code, not its test helpers (``syncmap/testing``, which tests run)."""
    library = text.replace(_TESTING, "")
    return _PACKAGE in library or "name='syncmap-" in text


class SlowCallbackLog(logging.Handler):
    """Keeps the ``asyncio`` logger's warnings while installed (:meth:`install`/:meth:`remove`).

    Its own handler rather than pytest's ``caplog``: in a fixture's teardown ``caplog.records``
    holds only the teardown phase's records, so a check there would never see the test's."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def install(self) -> SlowCallbackLog:
        logging.getLogger("asyncio").addHandler(self)
        return self

    def remove(self) -> None:
        logging.getLogger("asyncio").removeHandler(self)

    def syncmap(self) -> list[str]:
        """The warnings so far that name syncmap code."""
        return syncmap_slow_callbacks(self.records)
