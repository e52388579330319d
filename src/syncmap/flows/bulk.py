"""Whole-map reads: a snapshot of every entry, keys to pop, and ``preload``."""

from __future__ import annotations

import contextlib
import gc
import random
from collections.abc import Iterator, Sequence
from typing import Any

from ..codec import is_immutable
from ..core.nearcache import COPY, INF
from ..core.wire import VALUE_HEAD, unpack_value
from ..errors import CorruptData
from ..keys import Key, decode_key
from ..store.commands import parse_items
from .effects import Flow, store_call
from .state import MapState

_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
BulkEntry = tuple[Key, int, int, Any, bytes | None, float]


def bucket_items(s: MapState, buckets: Sequence[int]) -> Flow[list[list[tuple[bytes, bytes]]]]:
    """Every (field, stored value) of the given buckets, one round trip."""
    replies = yield from store_call(s.cmds.hgetall(buckets), write=False)
    return parse_items(replies)


def snapshot(s: MapState, *, skip_corrupt: bool) -> Flow[dict[Key, Any]]:
    """A plain dict of every live entry, read in one round trip (not one atomic moment)."""
    now_ms = s.server_now_ms()
    out = {}
    for pairs in (yield from bucket_items(s, range(s.cmds.layout.buckets))):
        for field, raw in pairs:
            try:
                _, deadline_ms, data = unpack_value(raw)
                if not deadline_ms or deadline_ms > now_ms:
                    out[decode_key(field)] = s.codec.decode(data)
            except Exception as exc:  # a user's codec may raise anything
                s.corrupt_entry(field, exc, skip=skip_corrupt)
    return out


def pop_candidates(s: MapState) -> Flow[list[Key]]:
    """Keys of the first non-empty group of 8 buckets from a random one on (so contenders
    spread out): a round trip per group; [] when every bucket read was empty.  HGETALL, not
    HKEYS: the least-privilege ACL of docs/protocol.md §9 grants the one, not the other."""
    n = s.cmds.layout.buckets
    start = random.randrange(n)
    order = [(start + i) % n for i in range(n)]
    for i in range(0, n, 8):
        keys = []
        for pairs in (yield from bucket_items(s, order[i : i + 8])):
            for field, _ in pairs:
                try:
                    keys.append(decode_key(field))
                except CorruptData:  # no key to pop it by; items() reports it
                    continue
        if keys:
            random.shuffle(keys)
            return keys
    return []


def preload(s: MapState, cap: int, retries: int) -> Flow[int]:
    """Fill the near cache with up to ``cap`` entries, 8 buckets per round trip.

    Each bucket is installed whole or not at all: a bucket that changed while it was being read
    is read again, up to ``retries`` times, and otherwise left to fill on demand
    (``NearCache.complete_bulk`` says why)."""
    todo, cached = list(range(s.cmds.layout.buckets)), 0
    for _ in range(retries + 1):
        again = []
        for i in range(0, len(todo), 8):
            chunk = todo[i : i + 8]
            with s.guard:
                tokens = [s.core.begin_bulk(b) for b in chunk]
            replies = yield from bucket_items(s, chunk)
            with gc_paused():
                for bucket, token, pairs in zip(chunk, tokens, replies, strict=True):
                    entries = bulk_entries(s, pairs, cap - cached)
                    with s.guard:
                        n = s.core.complete_bulk(token, s.clock(), entries)
                    if n == 0 and entries:
                        again.append(bucket)
                    cached += n
                    if cached >= cap:
                        break
            if cached >= cap:
                s.wake_timer()
                return cached
        if not again:
            break
        todo = again
    s.wake_timer()
    return cached


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a chunk of buckets is decoded and installed.

    Why: each cached entry is a new object the collector tracks, and CPython 3.11 runs a full
    collection whenever the tracked objects that survived grew by a quarter, so installing a
    million entries ran 8-10 full passes over the whole heap: 2.3-2.7 s of a 6.1-6.8 s
    ``preload()`` of 1M entries on the loaded 2-core dev machine, 0.6-1.2 s (1-2 passes) with
    the pause (timed with ``gc.callbacks``; ``syncmap bench`` has the preload row).
    Nothing of this work makes reference cycles, so pausing loses nothing; the collector is
    back on between chunks (a chunk is ~8 buckets' worth of entries), and is left off if it
    was off when the chunk began (a caller's choice)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def bulk_entries(s: MapState, pairs: list[tuple[bytes, bytes]], room: int) -> list[BulkEntry]:
    """Decode a bucket's (field, stored value) pairs for ``complete_bulk``.  The per-entry work
    is inlined (names bound locally, the common str key decoded here): at a million entries
    every call counts."""
    now, now_ms = s.clock(), s.server_now_ms()
    head, size, decode, scalars = VALUE_HEAD.unpack_from, VALUE_HEAD.size, s.codec.decode, _SCALARS
    local_deadline = s.local_deadline
    out: list[BulkEntry] = []
    append = out.append
    for field, stored in pairs[: max(room, 0)]:
        try:  # free unless it raises (Python 3.11+)
            version, deadline_ms, epoch = head(stored)
            if deadline_ms and deadline_ms <= now_ms:
                continue
            data = stored[size:]
            value = decode(data)
            key = field[1:].decode() if field[:1] == b"s" else decode_key(field)
        except Exception as exc:  # struct.error, UnicodeDecodeError, CorruptData, a codec's
            s.corrupt_entry(field, exc, skip=True)
            continue
        deadline = local_deadline(deadline_ms, now) if deadline_ms else INF
        if value.__class__ in scalars or is_immutable(value):
            append((key, version, epoch, value, None, deadline))
        else:
            append((key, version, epoch, COPY, data, deadline))
    return out
