"""What a flow asks its driver to do, and how a flow talks to the store."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import NotReplicated
from ..store.commands import Command, unwrap_relayed

T = TypeVar("T")


class Call:
    """Send ``commands`` as one batch; the driver sends back the replies, in order, or throws
    the executor's error into the flow (``StoreUnavailable``: nothing ran;
    ``WriteOutcomeUnknown``: a write may have run).  ``partial``: refusals come back in place
    of their replies instead of being raised (the other commands did run).

    A plain class with slots, not a frozen dataclass: every miss and write makes one, and a
    frozen dataclass's ``__init__`` costs three times as much.  Treat it as immutable."""

    __slots__ = ("commands", "partial", "write")

    def __init__(self, commands: Sequence[Command], write: bool, partial: bool = False) -> None:
        self.commands, self.write, self.partial = commands, write, partial

    def __repr__(self) -> str:
        return f"Call({len(self.commands)} commands, write={self.write}, partial={self.partial})"


@dataclass(frozen=True, slots=True)
class Publish:
    """Relay route: publish these change messages on the map's feed (after their write)."""

    messages: list[bytes]


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait this long (a jittered back-off before a retry)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Apply:
    """Call the user's ``fn(arg)`` and send back what it returns (``transform``'s function).

    Its own effect so that a flow never runs user code that may block or be a coroutine
    function: the thread driver calls it, the asyncio driver awaits what it returns when that
    is awaitable."""

    fn: Callable[[Any], Any]
    arg: Any


Effect = Call | Publish | Pause | Apply
Flow = Generator[Effect, Any, T]


def store_call(
    commands: Sequence[Command], *, write: bool, partial: bool = False, relayed: bool = False,
    wait: tuple[int, int] | None = None,
) -> Flow[list[Any]]:  # fmt: skip
    """One batch to the store, as a sub-flow (``yield from``).

    ``relayed``: the map's feed is relayed (``MapCommands.relayed``): the write scripts' change
    messages come back with their replies and are published here, right after the write.
    ``wait``: (replicas, timeout ms): a ``WAIT`` ends the batch (``MapConfig.wait_replicas``);
    fewer replicas than asked raises :class:`NotReplicated` *after* the messages went out (the
    write did happen on the master, so the other servers must hear of it).
    """
    if wait is not None:
        commands = [*commands, ("WAIT", *wait)]
    replies: list[Any] = yield Call(commands, write, partial)
    if relayed:
        messages = unwrap_relayed(commands, replies)
        if messages:
            yield Publish(messages)
    if wait is not None:
        acked = replies.pop()
        if not isinstance(acked, int) or acked < wait[0]:
            raise NotReplicated(
                f"the write was applied, but {acked} of the {wait[0]} replicas asked for "
                f"confirmed it within {wait[1]} ms (MapConfig.wait_replicas): a failover now may "
                "lose it. Read the key to find out what survived"
            )
    return replies
