"""The authoritative store of one map: its scripts, reads and probes over a :class:`Transport`."""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from ..core.nearcache import ProbeState
from ..errors import ConfigurationError, StoreError, SyncMapError
from ..keys import Layout, is_key_field
from ..ratelog import RateLimitedLog
from . import scripts
from .executor import SHAS, Command, config_value
from .node import NodeExecutor as Transport
from .topology import Topology

log = logging.getLogger("syncmap")

_REAP_LIMIT = 500
_MAP_SCRIPTS = frozenset(SHAS[n] for n in ("set", "delete", "mset", "clear", "probe"))
_damaged_epochs = itertools.count(1)


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


class RedisStore(Transport):
    """The Redis side of one map: scripts, reads, probes.

    ``target`` says where the write scripts send change messages (scripts.py, ``publish``): a
    channel name (the default, the map's channel), ``stream_target(...)`` for a Redis Stream on this
    server, or ``""`` to *relay*: each write script then replies ``{reply, messages}``, :meth:`call`
    unwraps the reply and hands the messages to ``relay`` (the engine publishes them on the
    map's feed) after the round trip, in the caller's thread.
    """

    def __init__(
        self, topology: Topology, layout: Layout, origin: str, target: str | None = None,
        *, codec: str = "msgpack", flags: str = "", isolate_damage: bool = True,
        pads: bytes = b"", deadline: float | None = None,
    ) -> None:  # fmt: skip
        super().__init__(topology, deadline=deadline)
        self.layout = layout
        self.origin = origin
        self.target = layout.channel if target is None else target
        self.relay: Callable[[list[bytes]], None] | None = None
        self.codec = codec
        self.stamp = settings_stamp(layout.buckets, codec)
        self.flags = flags  # protections switched off, tests only (Guards.script_flags)
        self.isolate_damage = isolate_damage  # False: tests only (Guards.damage_isolated)
        self.pads = pads  # HMAC pads of the signing key (signing.pads), or b"": unsigned
        self.damaged_buckets = 0  # probes that found a bucket damaged (counter)
        self.meta_recreated = 0  # probes that found the meta key missing and wrote it again
        self._damage_log = RateLimitedLog(log)
        self._meta_log = RateLimitedLog(log)

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

        ``fence`` is (lock name, the lock's fence counter key, token): the counter becomes KEYS[3].
        """
        keys: tuple[str, ...] = self.layout.bucket_keys(bucket)
        lock, token = "", 0
        if fence is not None:
            lock, counter, token = fence
            keys = (*keys, counter)
        epoch = random.getrandbits(52) or 1
        return ("EVALSHA", SHAS[name], len(keys), *keys, self.target, bucket, epoch,
                self.origin, lock, token, self.stamp, self.flags, self.pads, *args)  # fmt: skip

    def load_scripts(self) -> None:
        self.call([("SCRIPT", "LOAD", src) for src in scripts.ALL.values()], write=False)

    # ---- reads -------------------------------------------------------------------------------

    def hget(self, bucket: int, field: bytes) -> bytes | None:
        reply: bytes | None = self.call([("HGET", self.layout.data(bucket), field)],
                                        write=False)[0]  # fmt: skip
        return reply

    def probe(self) -> tuple[list[ProbeState], int, int]:
        """Reap due expiries and read every bucket's (epoch, seq, digest): one round trip.

        Returns the states, Redis's clock in ms, and the number of live entries.  The digest is
        the bucket's digest chain (scripts.py ``chain``), ``""`` before its epoch's first message.

        Damage stays in its bucket: a bucket whose keys are of the wrong type, whose bookkeeping
        is not numeric or that is stamped with another map's settings is reported with an epoch
        no real bucket has (a new negative number each probe), so the near cache flushes that
        bucket and nothing of it is served beyond one probe period; it is counted
        (``damaged_buckets``) and logged at WARNING at most once a minute per map.  The other
        buckets are unaffected.  The meta key is written again when it is missing (evicted).
        """
        layout = self.layout
        cmds = [self.script("probe", b, _REAP_LIMIT) for b in range(layout.buckets)]
        cmds += [("HSETNX", layout.meta, "buckets", layout.buckets),
                 ("HSETNX", layout.meta, "codec", self.codec)]  # fmt: skip
        replies = self.call(cmds, write=True, partial=self.isolate_damage)
        meta = replies[layout.buckets :]
        if any(r == 1 for r in meta):
            self.meta_recreated += 1
            self._meta_log("syncmap map %r: its meta key %s was missing (evicted or deleted) and "
                           "was written again (%d buckets, codec %s; %d times so far)",
                           layout.name, layout.meta, layout.buckets, self.codec,
                           self.meta_recreated)  # fmt: skip
        states: list[ProbeState] = []
        damaged: list[tuple[int, str]] = []
        server_ms, live = None, 0
        for bucket, reply in enumerate(replies[: layout.buckets]):
            try:
                if isinstance(reply, Exception):
                    raise reply
                epoch = int(reply[0]) if reply[0] else None
                state: ProbeState = (epoch, int(reply[1]), _text(reply[4]))
                server_ms, live = int(reply[2]), live + int(reply[3])
            except SyncMapError as exc:
                if not _bucket_damage(exc):
                    raise  # unreachable, OOM, the ACL refuses the probe: every bucket alike
                damaged.append((bucket, str(exc)))
                state = (-next(_damaged_epochs), 0, None)
            except (TypeError, ValueError, IndexError) as exc:
                damaged.append((bucket, f"unreadable probe reply {reply!r:.80} ({exc})"))
                state = (-next(_damaged_epochs), 0, None)
            states.append(state)
        if damaged:
            self._report_damage(damaged)
        if server_ms is None:
            raise damaged_error(layout, damaged)
        return states, server_ms, live

    def _report_damage(self, damaged: list[tuple[int, str]]) -> None:
        self.damaged_buckets += len(damaged)
        bucket, why = damaged[0]
        self._damage_log(
            "syncmap map %r: %d bucket(s) damaged (first: bucket %d, %s); their near cache is "
            "dropped and writes to them fail until the keys are repaired or deleted; the other "
            "buckets are unaffected (%d damaged bucket probes so far)",
            self.layout.name, len(damaged), bucket, why[:300], self.damaged_buckets,
        )  # fmt: skip

    def bucket_items(self, buckets: Sequence[int]) -> list[list[tuple[bytes, bytes]]]:
        """Every (field, stored value) of the given buckets, one round trip (bookkeeping fields
        left out)."""
        replies = self.call([("HGETALL", self.layout.data(b)) for b in buckets], write=False)
        return [[p for p in _pairs(r) if is_key_field(p[0])] for r in replies]

    def bucket_fields(self, buckets: Sequence[int]) -> list[list[bytes]]:
        """Every key field of the given buckets, one round trip."""
        replies = self.call([("HKEYS", self.layout.data(b)) for b in buckets], write=False)
        return [[f for f in r if is_key_field(f)] for r in replies]

    def stamps(self, buckets: int) -> list[tuple[int, str]]:
        """The settings stamps found on buckets 0 .. ``buckets``-1 (unstamped ones left out)."""
        replies = self.call([("HGET", self.layout.data(b), "#c") for b in range(buckets)],
                            write=False, partial=True)  # fmt: skip
        found = []
        for reply in replies:
            if isinstance(reply, bytes) and (stamp := parse_stamp(reply)) is not None:
                found.append(stamp)
        return found

    def publish(self, payload: bytes) -> int:
        return int(self.call([("PUBLISH", self.layout.channel, payload)], write=False)[0])

    def ensure_meta(self, buckets: int, codec: str, *, stamps: bool = True) -> tuple[int, str]:
        """Record the map's bucket count and codec once; return what the map really uses.

        A meta key that is missing although the map has data (evicted or deleted) is written
        again from the settings stamped on the map's buckets, not from this server's: a server
        opened with another bucket count or codec must not split or corrupt the map.  Buckets
        0 .. max(``buckets``, 16)-1 are read; a map all of whose buckets there are empty has
        nothing to protect.  (``stamps=False``: ignore them, as layout 1 did; tests only.)
        """
        meta = self.layout.meta
        stored = self.call([("HMGET", meta, "buckets", "codec")], write=False)[0]
        if not (stored[0] and stored[1]):
            found = set(self.stamps(max(buckets, 16))) if stamps else set()
            if len(found) > 1:
                raise ConfigurationError(
                    f"map {self.layout.name!r} has no meta key and its buckets disagree about its "
                    f"settings ({sorted(found)}): repair it by hand (see docs/protocol.md)"
                )
            if found:
                buckets, codec = found.pop()
                log.warning("syncmap map %r: its meta key %s was missing (evicted or deleted); "
                            "re-created from the settings its buckets record: %d buckets, codec "
                            "%s", self.layout.name, meta, buckets, codec)  # fmt: skip
            replies = self.call(
                [("HSETNX", meta, "buckets", buckets), ("HSETNX", meta, "codec", codec),
                 ("HMGET", meta, "buckets", "codec")],
                write=True,
            )  # fmt: skip
            stored = replies[2]
        try:
            return int(stored[0]), stored[1].decode()
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(
                f"map {self.layout.name!r}: its meta key {meta} is damaged ({stored!r:.80}); "
                "delete it to have it re-created from the buckets' settings stamps"
            ) from exc


_policy_warned: set[str] = set()

EVICTION_NOTE = {
    "allkeys": (
        "Redis may evict any of syncmap's keys. What still holds: a fenced write whose lock's "
        "fence counter was evicted is refused (StaleFence: re-acquire); transform and "
        "compare-and-set compare epoch and version, so no write is lost to a restarted "
        "version; an entry whose data was evicted is dropped from every near cache within "
        "max_staleness; a lost meta key is re-created from the buckets' settings stamps. "
        "What does not: evicted entries are gone (acknowledged writes lost to eviction itself), "
        "an evicted lock hold lets a second holder in (fencing keeps map writes safe). Use "
        "noeviction (or a volatile-* policy) for syncmap's Redis"
    ),
    "volatile": (
        "Redis evicts only keys with a TTL: a lock's hold or a semaphore permit may be evicted "
        "and the lock given to a second holder (writes fenced with fence= stay safe); map data, "
        "bookkeeping and fence counters have no TTL and are never evicted"
    ),
}


def eviction_note(policy: str, maxmemory: str) -> str | None:
    """What ``maxmemory-policy`` means for syncmap, or None when Redis never evicts."""
    if maxmemory in ("", "0") or policy in ("", "noeviction"):
        return None
    return EVICTION_NOTE["allkeys" if policy.startswith("allkeys") else "volatile"]


def warn_if_evicting(store: Transport) -> str | None:
    """Once per Redis and process, at map open: a one-line WARNING when ``maxmemory-policy`` is
    ``allkeys-*`` (what is and is not guaranteed then).  ``volatile-*`` evicts no map key (they
    have no TTL): nothing is logged for maps.  A refused CONFIG (least privilege) is no answer.
    Returns the policy read, or None."""
    cmds = [("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "GET", "maxmemory")]
    try:
        policy, limit = (config_value(r) for r in store.call(cmds, write=False))
    except SyncMapError:
        return None
    if policy.startswith("allkeys") and store.where not in _policy_warned:
        note = eviction_note(policy, limit)
        if note is not None:
            _policy_warned.add(store.where)
            log.warning("syncmap: %s has maxmemory %s with maxmemory-policy %s. %s",
                        store.where, limit, policy, note)  # fmt: skip
    return policy


def _bucket_damage(exc: SyncMapError) -> bool:
    """Whether a probe's refusal is about its bucket's keys (not about Redis or the client)."""
    if isinstance(exc, ConfigurationError):
        return "(buckets/codec)" in str(exc)  # SETTINGS, see Transport._refused
    return type(exc) is StoreError  # WRONGTYPE, DAMAGED, a script error on odd data


def damaged_error(layout: Layout, damaged: list[tuple[int, str]]) -> SyncMapError:
    """Every bucket of a probe failed: the map cannot be probed at all."""
    return StoreError(f"map {layout.name!r}: every bucket is damaged (first: bucket "
                      f"{damaged[0][0]}, {damaged[0][1][:200]})")  # fmt: skip


def stream_target(stream: str, maxlen: int) -> str:
    """The ``target`` that makes the write scripts XADD to ``stream`` (trimmed to ~``maxlen``)."""
    return f"!x:{int(maxlen)}:{stream}"


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def _pairs(reply: Any) -> list[tuple[bytes, bytes]]:
    """HGETALL under RESP3 is a map, under RESP2 a flat list."""
    if isinstance(reply, dict):
        return list(reply.items())
    it = iter(reply)
    return list(zip(it, it, strict=True))
