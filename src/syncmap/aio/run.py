"""``run(flow)``: the asyncio driver of every flow, the same loop as ``syncmap.sync.run`` awaited.

One case is the driver's own: the calling task is **cancelled** while a call is in flight.  A
read's flow gets the cancellation thrown in (it aborts its fill, then re-raises it).  A write's
flow gets ``WriteOutcomeUnknown`` instead (the request may have been sent and applied: the flow
drops the key from the near cache, as for any write whose outcome is unknown), and the task then
sees its ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import WriteOutcomeUnknown
from ..flows.effects import Apply, Call, Flow, Publish
from ..store.executor import AsyncExecutor

T = TypeVar("T")
AsyncRelay = Callable[[list[bytes]], Awaitable[None]]


async def _no_relay(messages: list[bytes]) -> None:
    raise AssertionError("a flow asked to publish, but this map's feed is not relayed")


async def run(flow: Flow[T], executor: AsyncExecutor, relay: AsyncRelay = _no_relay) -> T:
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
                reply = await executor.call(effect.commands, write=effect.write,
                                            partial=effect.partial)  # fmt: skip
            elif isinstance(effect, Publish):
                await relay(effect.messages)
            elif isinstance(effect, Apply):  # transform's function: sync or async
                reply = effect.fn(effect.arg)
                if inspect.isawaitable(reply):
                    reply = await reply
            else:
                await asyncio.sleep(effect.seconds)  # Pause
        except asyncio.CancelledError as cancelled:
            if isinstance(effect, Call) and effect.write:
                _drop_as_unknown(flow)
            else:
                flow.close()  # GeneratorExit at the yield: the flow aborts what it began
            raise cancelled
        except BaseException as exc:  # back into the flow, which cleans up and re-raises
            error = exc


def _drop_as_unknown(flow: Flow[Any]) -> None:
    """Tell a write's flow its outcome is unknown (it drops the key), then end it."""
    try:
        flow.throw(WriteOutcomeUnknown("the call was cancelled after the write may have been sent"))
    except WriteOutcomeUnknown:
        return
    flow.close()
