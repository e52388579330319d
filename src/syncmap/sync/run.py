"""``run(flow)``: the thread driver of every flow (docs/design.md, "Flows").

It performs each effect a flow yields and sends the result back, or throws the failure into the
flow at the ``yield`` that asked for it, so the flow itself aborts what it began (a fill, a
write's cache entry) and re-raises.  That is all a driver does; an asyncio driver is the same
loop with ``await``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..flows.effects import Apply, Call, Flow, Publish
from ..store.executor import Executor

T = TypeVar("T")
Relay = Callable[[list[bytes]], None]


def _no_relay(messages: list[bytes]) -> None:
    raise AssertionError("a flow asked to publish, but this map's feed is not relayed")


def run(flow: Flow[T], executor: Executor, relay: Relay = _no_relay) -> T:
    """Drive ``flow`` to its end and return its value (or raise what it raises)."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = flow.send(reply) if error is None else flow.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        reply = error = None
        try:
            if isinstance(effect, Call):
                reply = executor.call(effect.commands, write=effect.write, partial=effect.partial)
            elif isinstance(effect, Publish):
                relay(effect.messages)
            elif isinstance(effect, Apply):
                reply = effect.fn(effect.arg)
            else:
                time.sleep(effect.seconds)  # Pause
        except BaseException as exc:  # back into the flow, which cleans up and re-raises
            error = exc
