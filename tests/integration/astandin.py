"""A small stand-in for ``syncmap.feed.apubsub.AsyncSubscriber`` (being written on branch
``aredis``), with its interface: ``attach_to(topology, channel, handler)`` (called on the loop),
``await detach(channel, handler)``, the handler's ``on_message(bytes)``, ``on_up()``,
``on_down()`` called on the loop.  One connection per loop and topology, read by one task; for
the async lock tests only (no reconnection: a lost connection tells ``on_down`` and stops)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from syncmap.store.topology import Topology


class StandInSubscriber:
    _registry: dict[tuple[Any, ...], StandInSubscriber] = {}

    @classmethod
    def attach_to(cls, topology: Topology, channel: str, handler: Any) -> StandInSubscriber:
        key = (id(asyncio.get_running_loop()), topology.key)
        sub = cls._registry.get(key)
        if sub is None:
            sub = cls._registry[key] = cls(topology, key)
        sub._handlers.setdefault(channel.encode(), []).append(handler)
        task = asyncio.get_running_loop().create_task(sub._send("SUBSCRIBE", channel))
        sub._sending.add(task)
        task.add_done_callback(sub._sending.discard)
        return sub

    def __init__(self, topology: Topology, key: tuple[Any, ...]) -> None:
        self._key = key
        self._handlers: dict[bytes, list[Any]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._conn = topology.endpoint().async_connection(timeout=3600)
        self._ready = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _send(self, *args: str) -> None:
        await self._ready.wait()
        await self._conn.send_command(*args)

    async def _read(self) -> None:
        await self._conn.connect()
        self._ready.set()
        try:
            while True:
                kind, channel, data = await self._conn.read_response()
                for handler in list(self._handlers.get(channel, ())):
                    if kind == b"message":
                        handler.on_message(data)
                    elif kind == b"subscribe":
                        handler.on_up()
        except (ConnectionError, OSError):
            for handlers in self._handlers.values():
                for handler in handlers:
                    handler.on_down()

    async def detach(self, channel: str, handler: Any) -> None:
        handlers = self._handlers.get(channel.encode(), [])
        if handler in handlers:
            handlers.remove(handler)
        if not handlers:
            self._handlers.pop(channel.encode(), None)
            await self._send("UNSUBSCRIBE", channel)
        if not self._handlers:
            await self.aclose()

    async def aclose(self) -> None:
        self._registry.pop(self._key, None)
        for task in (*self._sending, self._reader):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._conn.disconnect()
