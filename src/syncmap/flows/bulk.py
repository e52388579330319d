"""Whole-map reads: a snapshot of every entry, keys to pop, and ``preload``."""

from __future__ import annotations

import contextlib
import gc
import random
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice, repeat
from operator import itemgetter
from typing import Any

from ..codec import fast_decoder, is_immutable
from ..core.nearcache import COPY, INF, BulkRead, BulkToken, Entry
from ..core.wire import VALUE_HEAD, unpack_value
from ..errors import CorruptData
from ..keys import Key, decode_key
from ..store.commands import parse_items
from .effects import Flow, store_call
from .state import MapState

_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
# The stored value's header (core/wire.py VALUE_HEAD, ">QQQ") in the parts _plain_bucket reads:
# the version, and (deadline, epoch) compared as bytes with those of a live value of the epoch.
_VERSION, _TAIL = struct.Struct(">Q"), struct.Struct(">QQ")
assert _VERSION.size + _TAIL.size == VALUE_HEAD.size
_first, _tail = itemgetter(0), itemgetter(slice(_VERSION.size, VALUE_HEAD.size))
_payload, _key_bytes = itemgetter(slice(VALUE_HEAD.size, None)), itemgetter(slice(1, None))
_S, _HASH = ord("s"), ord("#")  # the first byte of a str key's field, of a bookkeeping field
_BOOKKEEPING = 16  # more than the '#' fields a data hash holds (#e #s #c #h: docs/protocol.md)


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
    (``NearCache.install_bulk`` says why).  The order of events per bucket: its token is taken
    (under the lock) *before* the HGETALL is sent, the reply is decoded outside the lock, and
    installed under the lock only if the bucket's token is unchanged, so a value that a change
    message, a probe or this server's own write brought meanwhile is never overwritten."""
    todo, cached = list(range(s.cmds.layout.buckets)), 0
    for _ in range(retries + 1):
        again = []
        for i in range(0, len(todo), 8):
            chunk = todo[i : i + 8]
            with s.guard:
                tokens = [s.core.begin_bulk(b) for b in chunk]
            replies = yield from store_call(s.cmds.hgetall(chunk), write=False)
            with gc_paused():
                for bucket, token, reply in zip(chunk, tokens, replies, strict=True):
                    read, live = bulk_read(s, token, reply, cap - cached)
                    with s.guard:
                        n = s.core.install_bulk(token, s.clock(), read)
                    if n == 0 and live:
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


def bulk_read(s: MapState, token: BulkToken, reply: Any, room: int) -> tuple[BulkRead, int]:
    """A bucket's HGETALL reply decoded for ``NearCache.install_bulk``, and how many live
    entries it had (of any epoch).  At most ``room`` entries are kept.

    One Python loop over the raw reply (a flat list under RESP2, a dict from the in-memory
    store), making each entry's cache ``Entry`` here, outside the lock: no (field, value)
    tuples, no intermediate per-entry tuple, the msgspec decoder called directly (a failure is
    explained by ``codec.decode``), names bound locally.  At a million entries each of those
    was a measurable share of ``preload()``."""
    now, now_ms, bucket, want = s.clock(), s.server_now_ms(), token.bucket, token.epoch
    head, size, scalars = VALUE_HEAD.unpack_from, VALUE_HEAD.size, _SCALARS
    decode, local_deadline, new = fast_decoder(s.codec), s.local_deadline, Entry
    if (read := _plain_bucket(token, reply, decode, room)) is not None:
        return read, len(read)
    read = BulkRead()
    entries, expiring, others, top, live = read.entries, read.expiring, read.others, 0, 0
    for field, stored in _pairs(reply, room):
        try:  # free unless it raises (Python 3.11+)
            # a str key, the common case, decoded here; None: a bookkeeping field ('#')
            key = field[1:].decode() if field[:1] == b"s" else _other_key(field)
            if key is None:
                continue
            version, deadline_ms, epoch = head(stored)
            if deadline_ms and deadline_ms <= now_ms:
                continue
            data = stored[size:]
            value = decode(data)
        except Exception as exc:  # struct.error, UnicodeDecodeError, CorruptData, a codec's
            s.corrupt_entry(field, _explained(s, stored, exc), skip=True)
            continue
        live += 1
        deadline = local_deadline(deadline_ms, now) if deadline_ms else INF
        shared = value.__class__ in scalars or is_immutable(value)  # else copied on each hit
        e = new(value if shared else COPY, None if shared else data, version, bucket,
                key.__class__, deadline)  # fmt: skip
        if epoch != want:
            read.foreign.append((key, e))
            continue
        top = version if version > top else top
        if key.__class__ is str:
            entries[key] = e
            if deadline_ms:
                expiring.append(key)
        else:
            others.append((key, e))
    read.top = top
    if len(read) > room:  # only with a limit (else the map's capacity bounds the install)
        _truncate(read, max(room, 0))
    return read, live


def _other_key(field: bytes) -> Key | None:
    """The key of a field that is not a str key's, or None for a bookkeeping field."""
    return decode_key(field) if field[:1] != b"#" else None


def _pairs(reply: Any, room: int) -> Iterable[tuple[bytes, bytes]]:
    """(field, stored value) of an HGETALL reply: a flat list under RESP2 (paired by ``zip``,
    which reuses its tuple), a dict from the in-memory store; with a limit, not many more
    fields than ``room``."""
    if isinstance(reply, dict):
        return reply.items()
    if len(reply) > 2 * (room + _BOOKKEEPING):
        reply = reply[: 2 * (room + _BOOKKEEPING)]
    it = iter(reply)
    return zip(it, it, strict=True)


def _truncate(read: BulkRead, keep: int) -> None:
    read.entries = dict(islice(read.entries.items(), keep))
    read.others = read.others[: max(keep - len(read.entries), 0)]
    read.expiring = [k for k in read.expiring if k in read.entries]


def _plain_bucket(
    token: BulkToken, reply: Any, decode: Callable[[bytes], Any], room: int
) -> BulkRead | None:
    """The common bucket in a few C-level passes over the whole reply, no Python step per entry
    but the ``Entry`` constructor: every key a str, every value live (no TTL) and of the
    token's epoch, no more than ``room``.  None for any other bucket, or one with a value that
    does not decode (all checked before any value is decoded, but for that last one), which
    :func:`bulk_read`'s loop then reads entry by entry and reports.

    CPU time per entry of 100k str -> int entries on the loaded 2-core dev machine (the best
    of 9 passes over the same replies): the loop ~1.0 µs, this ~0.83 µs; an ``Entry`` is
    ~0.3 µs of either."""
    try:
        if isinstance(reply, dict):
            keys, stored = list(reply), list(reply.values())
        else:
            keys, stored = reply[0::2], reply[1::2]
        first = list(map(_first, keys))
        for _ in range(first.count(_HASH)):  # the bookkeeping fields (#e, #s, ...): no entries
            i = first.index(_HASH)
            del first[i], keys[i], stored[i]
        n = len(keys)
        if not n or n > room or n != len(stored) or first.count(_S) != n:
            return None  # nothing, a limit, or not every key a str
        if set(map(_tail, stored)) != {_TAIL.pack(0, token.epoch)}:  # a TTL, another epoch
            return None
        payloads = list(map(_payload, stored))
        values = list(map(decode, payloads))
        versions = list(map(_first, map(_VERSION.unpack_from, stored)))
        names = map(bytes.decode, map(_key_bytes, keys))
    except Exception:  # struct.error, a decoder's, IndexError (an empty field): the loop says
        return None
    raws: Iterable[bytes | None] = repeat(None)
    if not set(map(type, values)) <= _SCALARS:  # some may be mutable: copied on each hit
        shared = [v.__class__ in _SCALARS or is_immutable(v) for v in values]
        values = [v if ok else COPY for v, ok in zip(values, shared, strict=True)]
        raws = [None if ok else data for data, ok in zip(payloads, shared, strict=True)]
    bucket = token.bucket
    made = map(Entry, values, raws, versions, repeat(bucket), repeat(str), repeat(INF))
    try:
        entries: dict[Key, Entry] = dict(zip(names, made, strict=True))
    except UnicodeDecodeError:  # names decode lazily, while the entries are made
        return None
    return BulkRead(entries=entries, top=max(versions))


def _explained(s: MapState, stored: bytes, exc: Exception) -> Exception:
    """The codec's own error for a value the bare decoder refused (``CorruptData`` naming the
    codec), else ``exc`` (a bad header or key)."""
    if len(stored) < VALUE_HEAD.size:
        return exc
    try:
        s.codec.decode(stored[VALUE_HEAD.size :])
    except Exception as explained:  # a user's codec may raise anything
        return explained
    return exc
