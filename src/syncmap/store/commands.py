"""Every command a map sends, built here, and every reply of them, parsed here: pure, no I/O.

This is the only module that knows the scripts' ARGV layouts (``scripts.py`` heads each script
with them) and the shape of their replies.  A command is a plain tuple, ready for
``hiredis.pack_command``; its hash slot follows from its keys, which all carry the bucket's hash
tag (``keys.py``), so a sharded executor can route it without being told (:func:`slot_of`).

Flows (``syncmap.flows``) build batches with :class:`MapCommands`, yield them to a driver, and
parse what comes back with the functions below.  Nothing here sends anything.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import forksafe
from ..core.nearcache import ProbeState
from ..errors import (
    ConfigurationError,
    StoreError,
    StoreUnavailable,
    SyncMapError,
    WriteOutcomeUnknown,
)
from ..keys import Layout, is_key_field
from . import scripts

Command = tuple[Any, ...]
REAP_LIMIT = 500
"""Due expiries one probe reaps per bucket at most (core/wire.py MAX_FIELDS stays above it)."""
MAP_SCRIPTS = ("set", "delete", "mset", "clear", "probe")
_MAP_SHAS = frozenset(scripts.SHAS[n] for n in MAP_SCRIPTS)
_damaged_epochs = itertools.count(1)
# Epoch candidates come from a generator of their own: the global one is the caller's (a test
# seeds it, Hypothesis replays it), and a probe thread drawing from it at unpredictable moments
# made a caller's "random" choices differ between replays.  Reseeded in a forked child, as the
# global one is, so two processes never draw the same candidates.
_epochs = random.Random()


@forksafe.at_fork
def _reseed_epochs() -> None:
    _epochs.seed()


def settings_stamp(buckets: int, codec: str) -> str:
    """What every bucket of a map records of its settings (``#c``): ``<buckets>/<codec>``."""
    return f"{buckets}/{codec}"


def parse_stamp(stamp: bytes | str) -> tuple[int, str] | None:
    """(buckets, codec) of a settings stamp, or None when it is not one."""
    text = stamp.decode(errors="replace") if isinstance(stamp, bytes) else stamp
    count, sep, codec = text.partition("/")
    if not sep or not count.isdigit() or not codec:
        return None
    return int(count), codec


SHARDED_TARGET = "!s"
"""The ``target`` that makes the write scripts SPUBLISH on each bucket's own channel (layout 2s,
a Redis Cluster: ``Layout.bucket_channel``)."""


LOGGED_PREFIX = "!S:"
"""``!S:<maxlen>``: what :data:`SHARDED_TARGET` does, and in the same atomic step an ``XADD`` to
the bucket's own change log ``<tag>:log`` (``Layout.bucket_log``), trimmed to about ``maxlen``
entries (0 = never): a ``redis+stream://`` feed on the store's Redis Cluster.  The log lets a
server whose sharded subscriber was cut replay what it missed instead of flushing the bucket
(``feed/bucketlog.py``)."""


def logged_target(maxlen: int) -> str:
    """The ``target`` of the per-bucket stream route on a Redis Cluster (:data:`LOGGED_PREFIX`)."""
    if maxlen < 0:
        raise ValueError(f"maxlen must be >= 0, not {maxlen}")
    return f"{LOGGED_PREFIX}{int(maxlen)}"


def is_sharded_target(target: str | None) -> bool:
    """Whether ``target`` is one of layout 2s (a script reaching only its bucket's slot)."""
    return target == SHARDED_TARGET or (target or "").startswith(LOGGED_PREFIX)


def stream_target(stream: str, maxlen: int) -> str:
    """The ``target`` that makes the write scripts XADD to ``stream`` (trimmed to ~``maxlen``)."""
    return f"!x:{int(maxlen)}:{stream}"


@dataclass(slots=True)
class MapCommands:
    """The commands of one map.

    ``target`` says where the write scripts send change messages (scripts.py, ``publish``): a
    channel name (the default, the map's channel), ``stream_target(...)`` for a Redis Stream on
    the store's server, or ``""`` to *relay*: each write script then replies ``{reply,
    messages}``; :func:`unwrap_relayed` splits them and the flow publishes the messages.
    ``flags``, ``isolate_damage``: protections switched off, tests only (``Guards``).
    """

    layout: Layout
    origin: str
    target: str | None = None
    codec: str = "msgpack"
    flags: str = ""
    pads: bytes = b""
    isolate_damage: bool = True
    stamp: str = field(init=False)

    def __post_init__(self) -> None:
        if self.target is None:
            self.target = self.layout.channel
        self.stamp = settings_stamp(self.layout.buckets, self.codec)

    @property
    def relayed(self) -> bool:
        return self.target == ""

    def script(self, name: str, bucket: int, *args: Any,
               fence: tuple[str, str, int] | None = None) -> Command:  # fmt: skip
        """The EVALSHA of a map script for one bucket (scripts.py heads each with its ARGV).

        ``fence`` is (lock name, the lock's fence counter key, token): the counter is KEYS[3].
        The epoch candidate is random: used only by a bucket that has none (new or evicted).
        """
        keys: tuple[str, ...] = self.layout.bucket_keys(bucket)
        lock, token = "", 0
        if fence is not None:
            lock, counter, token = fence
            if is_sharded_target(self.target):
                check_fence_slot(self.layout, bucket, lock, counter)
            keys = (*keys, counter)
        epoch = _epochs.getrandbits(52) or 1
        return ("EVALSHA", scripts.SHAS[name], len(keys), *keys, self.target, bucket, epoch,
                self.origin, lock, token, self.stamp, self.flags, self.pads, *args)  # fmt: skip

    def hget(self, bucket: int, field: bytes) -> Command:
        return ("HGET", self.layout.data(bucket), field)

    def hgetall(self, buckets: Sequence[int]) -> list[Command]:
        return [("HGETALL", self.layout.data(b)) for b in buckets]

    def probe(self) -> list[Command]:
        """Every bucket's probe script, then the meta key written again if it was lost."""
        layout = self.layout
        cmds = [self.script("probe", b, REAP_LIMIT) for b in range(layout.buckets)]
        cmds += [("HSETNX", layout.meta, "buckets", layout.buckets),
                 ("HSETNX", layout.meta, "codec", self.codec)]  # fmt: skip
        return cmds

    def stamps(self, buckets: int) -> list[Command]:
        return [("HGET", self.layout.data(b), "#c") for b in range(buckets)]


def check_fence_slot(layout: Layout, bucket: int, lock: str, counter: str) -> None:
    """On a Cluster a script reads only its own slot: a fence whose counter is elsewhere cannot
    be checked, so the write is refused here, before anything is sent."""
    from .cluster import slot_for  # noqa: PLC0415 - redis.crc, only on sharded maps

    if slot_for(counter) != slot_for(layout.data(bucket)):
        raise ConfigurationError(
            f"lock {lock!r} cannot fence a write of map {layout.name!r} on a Redis Cluster: its "
            "fence lives in another hash slot than the key's bucket. Take the lock with "
            "map.lock(key) (placed in the key's slot) and pass its Fence, not Lock(name) or a "
            "(name, token) pair"
        )


def load_scripts() -> list[Command]:
    return [("SCRIPT", "LOAD", src) for src in scripts.ALL.values()]


def unwrap_relayed(commands: Sequence[Command], replies: list[Any]) -> list[bytes]:
    """Relay route: replace each map script's ``{reply, messages}`` by its reply, in place, and
    return the messages to publish (in order)."""
    out: list[bytes] = []
    for i, (cmd, reply) in enumerate(zip(commands, replies, strict=True)):
        if cmd[0] == "EVALSHA" and cmd[1] in _MAP_SHAS and isinstance(reply, list):
            replies[i] = reply[0]
            out.extend(reply[1])
    return out


def slot_of(command: Command) -> str | None:
    """The key that decides where ``command`` runs (its first key), or None for keyless ones.

    Every key of a bucket carries the bucket's hash tag, so the first key decides the slot."""
    name = str(command[0]).upper()
    if name in ("EVALSHA", "EVAL"):
        return str(command[3]) if int(command[2]) > 0 else None
    if name in ("SCRIPT", "CONFIG", "INFO", "TIME", "PING", "PUBLISH", "WAIT"):
        return None
    return str(command[1]) if len(command) > 1 else None


# ---- replies -----------------------------------------------------------------------------------


@dataclass(slots=True)
class ProbeResult:
    """A probe's replies, parsed: what the near cache needs and what to report."""

    states: list[ProbeState | None]  # None: that bucket's probe did not run (parse_probe)
    server_ms: int
    live: int
    damaged: list[tuple[int, str]]
    meta_recreated: bool


def parse_probe(layout: Layout, replies: list[Any]) -> ProbeResult:
    """Parse :meth:`MapCommands.probe`'s replies (sent with ``partial=True`` when damage is
    isolated).  A bucket whose probe was refused for its own keys' sake (wrong type, bookkeeping
    not numeric, another map's settings) gets an epoch no real bucket has (a new negative number
    each probe), so the near cache flushes just that bucket.  A bucket whose probe did not run
    (``StoreUnavailable`` in its place: on a Cluster, its master is unreachable or its slot is
    moving; ``WriteOutcomeUnknown``: its master hung or dropped the connection after the probe
    was sent) gets ``None``: no answer, so its lease runs out while the others are renewed.
    Redis-wide refusals raise, and so does a probe no bucket answered."""
    n = layout.buckets
    states: list[ProbeState | None] = []
    damaged: list[tuple[int, str]] = []
    unanswered: StoreUnavailable | WriteOutcomeUnknown | None = None
    server_ms, live = None, 0
    for bucket, reply in enumerate(replies[:n]):
        state: ProbeState | None
        try:
            if isinstance(reply, Exception):
                raise reply
            epoch = int(reply[0]) if reply[0] else None
            state = (epoch, int(reply[1]), _text(reply[4]))
            server_ms, live = int(reply[2]), live + int(reply[3])
        except (StoreUnavailable, WriteOutcomeUnknown) as exc:  # no answer for this bucket
            unanswered, state = unanswered or exc, None
        except SyncMapError as exc:
            if not bucket_damage(exc):
                raise  # OOM, the ACL refuses the probe: every bucket alike
            damaged.append((bucket, str(exc)))
            state = (-next(_damaged_epochs), 0, None)
        except (TypeError, ValueError, IndexError) as exc:
            damaged.append((bucket, f"unreadable probe reply {reply!r:.80} ({exc})"))
            state = (-next(_damaged_epochs), 0, None)
        states.append(state)
    if server_ms is None:
        if unanswered is not None:
            raise unanswered
        raise StoreError(f"map {layout.name!r}: every bucket is damaged (first: bucket "
                         f"{damaged[0][0]}, {damaged[0][1][:200]})")  # fmt: skip
    meta_recreated = any(r == 1 for r in replies[n:])
    return ProbeResult(states, server_ms, live, damaged, meta_recreated)


def bucket_damage(exc: SyncMapError) -> bool:
    """Whether a probe's refusal is about its bucket's keys (not about Redis or the client)."""
    if isinstance(exc, ConfigurationError):
        return "(buckets/codec)" in str(exc)  # SETTINGS, see executor's refusal mapping
    return type(exc) is StoreError  # WRONGTYPE, DAMAGED, a script error on odd data


def parse_items(replies: list[Any]) -> list[list[tuple[bytes, bytes]]]:
    """HGETALL replies -> (field, stored value) pairs per bucket, bookkeeping fields left out."""
    return [[p for p in pairs(r) if is_key_field(p[0])] for r in replies]


def parse_stamps(replies: list[Any]) -> set[tuple[int, str]]:
    """The settings stamps found among HGET ``#c`` replies (unstamped buckets left out)."""
    found = set()
    for reply in replies:
        if isinstance(reply, bytes) and (stamp := parse_stamp(reply)) is not None:
            found.add(stamp)
    return found


def pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """HGETALL under RESP3 is a map, under RESP2 a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    it = iter(reply)
    return list(zip(it, it, strict=True))


def config_value(reply: object) -> str:
    """The value of a one-parameter CONFIG GET reply (a list in RESP2, a dict in RESP3)."""
    if isinstance(reply, dict):
        values = list(reply.values())
    else:
        values = list(reply)[1::2] if isinstance(reply, list | tuple) else []
    value = values[0] if values else b""
    return value.decode() if isinstance(value, bytes) else str(value)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)
