"""A map's commands sent straight to a Redis, without a map: for tests and scenarios that play a
writer the maps do not control (one that crashed before publishing, an attacker, an old server).

Scripts are built by :class:`~syncmap.store.commands.MapCommands` and sent by the same executor
a map uses; in the relay route the change messages the scripts hand back go to ``relay`` (by
default nowhere: the writer "died" before publishing them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

from ..core.nearcache import ProbeState
from ..keys import Layout
from ..store.commands import Command, MapCommands, load_scripts, parse_probe, unwrap_relayed
from ..store.topology import open_topology


class RawStore:
    def __init__(
        self, client: redis.Redis, layout: Layout, origin: str, target: str | None = None, *,
        codec: str = "msgpack", pads: bytes = b"", flags: str = "",
    ) -> None:  # fmt: skip
        self.cmds = MapCommands(layout, origin, target, codec=codec, pads=pads, flags=flags)
        self.executor = open_topology(client=client).executor()
        self.relay: Callable[[list[bytes]], None] = lambda _messages: None

    @property
    def layout(self) -> Layout:
        return self.cmds.layout

    def script(self, name: str, bucket: int, *args: Any,
               fence: tuple[str, str, int] | None = None) -> Command:  # fmt: skip
        return self.cmds.script(name, bucket, *args, fence=fence)

    def load_scripts(self) -> None:
        self.executor.call(load_scripts(), write=False)

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False
             ) -> list[Any]:  # fmt: skip
        replies = self.executor.call(commands, write=write, partial=partial)
        if self.cmds.relayed:
            messages = unwrap_relayed(commands, replies)
            if messages:
                self.relay(messages)
        return replies

    def probe(self) -> tuple[list[ProbeState | None], int, int]:
        result = parse_probe(self.layout, self.call(self.cmds.probe(), write=True, partial=True))
        return result.states, result.server_ms, result.live

    def restamp(self, codec: str, stamp: str) -> None:
        """Play a server that claims other settings (tests of the settings stamp)."""
        self.cmds.codec, self.cmds.stamp = codec, stamp

    def close(self) -> None:
        self.executor.close()
