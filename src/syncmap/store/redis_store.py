"""The authoritative store of one map: its scripts, reads and probes over a :class:`Transport`."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import redis

from ..keys import Layout
from . import scripts
from .transport import SHAS, Command, Transport

_REAP_LIMIT = 500
_MAP_SCRIPTS = frozenset(SHAS[n] for n in ("set", "delete", "mset", "clear", "probe"))


class RedisStore(Transport):
    """The Redis side of one map: scripts, reads, probes.

    ``target`` says where the write scripts send change messages (scripts.py, ``publish``): a
    channel name (the default, the map's channel), ``stream_target(...)`` for a Redis Stream on this
    server, or ``""`` to *relay*: each write script then replies ``{reply, messages}``, :meth:`call`
    unwraps the reply and hands the messages to ``relay`` (the engine publishes them on the
    map's feed) after the round trip, in the caller's thread.
    """

    def __init__(
        self, client: redis.Redis, layout: Layout, origin: str, target: str | None = None
    ) -> None:
        super().__init__(client)
        self.layout = layout
        self.origin = origin
        self.target = layout.channel if target is None else target
        self.relay: Callable[[list[bytes]], None] | None = None

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        replies = super().call(commands, write=write, partial=partial)
        if self.target != "":
            return replies
        out: list[bytes] = []
        for i, (cmd, reply) in enumerate(zip(commands, replies, strict=True)):
            if cmd[0] == "EVALSHA" and cmd[1] in _MAP_SCRIPTS and isinstance(reply, list):
                replies[i] = reply[0]
                out.extend(reply[1])
        if out and self.relay is not None:
            self.relay(out)
        return replies

    # ---- scripts -----------------------------------------------------------------------------

    def script(self, name: str, bucket: int, *args: Any,
               fence: tuple[str, str, int] | None = None) -> Command:  # fmt: skip
        """The EVALSHA command of a write script for one bucket (see scripts.py for ARGV).

        ``fence`` is (lock name, the lock's fence counter key, token): the counter becomes KEYS[4].
        """
        keys: tuple[str, ...] = self.layout.bucket_keys(bucket)
        lock, token = "", 0
        if fence is not None:
            lock, counter, token = fence
            keys = (*keys, counter)
        epoch = random.getrandbits(52) or 1
        return ("EVALSHA", SHAS[name], len(keys), *keys, self.target, bucket, epoch,
                self.origin, lock, token, *args)  # fmt: skip

    def load_scripts(self) -> None:
        self.call([("SCRIPT", "LOAD", src) for src in scripts.ALL.values()], write=False)

    # ---- reads -------------------------------------------------------------------------------

    def hget(self, bucket: int, field: bytes) -> bytes | None:
        reply: bytes | None = self.call([("HGET", self.layout.bucket_keys(bucket)[1], field)],
                                        write=False)[0]  # fmt: skip
        return reply

    def probe(self) -> tuple[list[tuple[int | None, int]], int, int]:
        """Reap due expiries and read every bucket's (epoch, seq): one round trip.

        Returns the states, Redis's clock in ms, and the number of live entries.
        """
        cmds = [self.script("probe", b, _REAP_LIMIT) for b in range(self.layout.buckets)]
        replies = self.call(cmds, write=True)
        states = [(int(r[0]) if r[0] else None, int(r[1])) for r in replies]
        return states, int(replies[-1][2]), sum(int(r[3]) for r in replies)

    def bucket_items(self, buckets: Sequence[int]) -> list[list[tuple[bytes, bytes]]]:
        """Every (field, stored value) of the given buckets, one round trip."""
        replies = self.call([("HGETALL", self.layout.bucket_keys(b)[1]) for b in buckets],
                            write=False)  # fmt: skip
        return [_pairs(r) for r in replies]

    def bucket_fields(self, buckets: Sequence[int]) -> list[list[bytes]]:
        replies = self.call([("HKEYS", self.layout.bucket_keys(b)[1]) for b in buckets],
                            write=False)  # fmt: skip
        return [list(r) for r in replies]

    def publish(self, payload: bytes) -> int:
        return int(self.call([("PUBLISH", self.layout.channel, payload)], write=False)[0])

    def ensure_meta(self, buckets: int, codec: str) -> tuple[int, str]:
        """Record the map's bucket count and codec once; return what the map really uses."""
        meta = self.layout.meta
        replies = self.call(
            [("HSETNX", meta, "buckets", buckets), ("HSETNX", meta, "codec", codec),
             ("HMGET", meta, "buckets", "codec")],
            write=True,
        )  # fmt: skip
        stored = replies[2]
        return int(stored[0]), stored[1].decode()


def stream_target(stream: str, maxlen: int) -> str:
    """The ``target`` that makes the write scripts XADD to ``stream`` (trimmed to ~``maxlen``)."""
    return f"!x:{int(maxlen)}:{stream}"


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """HGETALL under RESP3 is a map, under RESP2 a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    it = iter(reply)
    return list(zip(it, it, strict=True))
