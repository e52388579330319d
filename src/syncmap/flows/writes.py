"""Writes: one script per key (set, swap, setdefault, compare-and-X, delete, transform), and the
multi-bucket ones (update, clear), each bucket part atomic on its own."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ..codec import encode_limited
from ..core.nearcache import FillToken
from ..core.wire import unpack_value_epoch
from ..errors import ConflictError, WriteOutcomeUnknown
from ..keys import Key, bucket_of, clip, encode_key, normal_key
from ..store.commands import Command
from .effects import Apply, Flow, Pause, store_call
from .reads import MISSING, abort, current, install, settle_read
from .state import MapState

Fenced = tuple[str, str, int] | None
"""(lock name, fence counter key, token) for the write scripts, or None: not fenced."""


class Ref(NamedTuple):
    """Where a key lives: its stored field, its normal form (the cache's key) and its bucket."""

    field: bytes
    key: Key
    bucket: int


def ttl_ms(ttl: float | None) -> int:
    """``ttl=`` in seconds as the scripts take it: ms, at least 1; 0 = no TTL."""
    if ttl is None:
        return 0
    if not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, round(ttl * 1000))


def payload(s: MapState, value: Any) -> bytes:
    return encode_limited(s.codec, value, s.config.max_value_bytes)


def write_one(s: MapState, ref: Ref, cmd: Command) -> Flow[tuple[FillToken, Any]]:
    """Send one write script for ``ref``'s key, with a fill begun so the reply can be installed.

    A write that may have run (``WriteOutcomeUnknown``) drops the key here: this server must
    not keep believing a value the store may no longer hold (or never held)."""
    with s.guard:
        token = s.core.begin_fill(ref.key, ref.bucket)
    try:
        replies = yield from store_call((cmd,), write=True, relayed=s.cmds.relayed, wait=s.wait)
    except WriteOutcomeUnknown:
        with s.guard:
            s.core.abort_fill(token)
            s.core.drop(ref.key)
        raise
    except BaseException:
        abort(s, token)
        raise
    return token, replies[0]


def set_value(s: MapState, ref: Ref, data: bytes, *, ttl_ms: int, mode: str,
              expected: bytes | str = "", fence: Fenced = None, value: Any = MISSING
              ) -> Flow[tuple[int, bytes | None]]:  # fmt: skip
    """The set script (modes set, swap, nx, cas, ver: scripts.py); returns (version or 0 when
    refused, the old stored value).  A refusal tells the live value: it is installed as a read."""
    cmd = s.cmds.script("set", ref.bucket, ref.field, data, ttl_ms, mode, expected, fence=fence)
    token, reply = yield from write_one(s, ref, cmd)
    version, deadline_ms, old = reply[:3]
    if version:
        # What readers will decode.  The untyped msgpack codec gives back what was stored (same
        # types, equal values: docs/values.md), so the value itself serves; a mutable one is
        # cached as bytes by install anyway.
        plain = value is not MISSING and s.plain_codec
        stored = value if plain else s.codec.decode(data)
        install(s, token, version, deadline_ms, data, stored, int(reply[3]), own=True)
    else:
        settle_read(s, token, old)
    return int(version), old


def delete(s: MapState, ref: Ref, *, mode: str = "del", expected: bytes | str = "",
           fence: Fenced = None) -> Flow[tuple[int, bytes | None]]:  # fmt: skip
    """The delete script (modes del, cad, ver); returns (version or 0, the old stored value)."""
    cmd = s.cmds.script("delete", ref.bucket, ref.field, mode, expected, fence=fence)
    token, reply = yield from write_one(s, ref, cmd)
    version, old = reply[:2]
    if version:
        with s.guard:
            s.core.wrote(token, s.clock(), version, deleted=True, epoch=int(reply[2]))
    else:
        settle_read(s, token, old)
    return int(version), old


Attempt = Callable[[str, bytes | str], Flow[tuple[int, bytes | None]]]


def compare(s: MapState, key: Key, expected: Any, mode: str, attempt: Attempt) -> Flow[bool]:
    """The compare-and-X loop: one round trip when the bytes match, a retry when only the values
    do (equal dicts in another key order), ``ConflictError`` if it keeps losing."""
    arg: bytes | str = payload(s, expected)
    for _ in range(s.config.transform_retries):
        version, old = yield from attempt(mode, arg)
        if version:
            return True
        if old is None:
            return False
        old_version, _, old_epoch, old_payload = unpack_value_epoch(old)
        if s.codec.decode(old_payload) != expected:
            return False
        # Equal value, other bytes: pin to that write, by epoch and version (a version alone
        # may name another write once versions restarted under a new epoch).
        mode, arg = "ver", f"{old_epoch}:{old_version}"
    raise ConflictError(f"compare-and-{mode} of {clip(key)} kept losing races; retry later")


def transform(s: MapState, ref: Ref, key: Key, fn: Callable[[Any], Any], default: Any, *,
              ttl_ms: int, fence: Fenced) -> Flow[Any]:  # fmt: skip
    """Read, apply ``fn``, write only if the value read is still there (same epoch and
    version); retried with a jittered back-off when another writer came first."""
    for attempt in range(s.config.transform_retries):
        if attempt:  # lost a race: back off a little, jittered, so contenders spread out
            yield Pause(random.uniform(0, min(0.02, 0.0002 * 2**attempt)))
        raw = (yield from store_call((s.cmds.hget(ref.bucket, ref.field),), write=False))[0]
        value, version, epoch = current(s, raw)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            value = default
        new = yield Apply(fn, value)
        applied, _ = yield from set_value(s, ref, payload(s, new), ttl_ms=ttl_ms, mode="ver",
                                          expected=f"{epoch}:{version}", fence=fence)  # fmt: skip
        if applied:
            return new
    raise ConflictError(
        f"transform({clip(key)}) lost {s.config.transform_retries} optimistic retries to "
        "concurrent writers; retry later or protect the key with a lock"
    )


Item = tuple[bytes, Key, int, bytes]
"""One entry of a bulk write: (field, the cache's key, bucket, payload); plain tuples, since
``update()`` of 100k entries makes 100k of them."""


def items_of(pairs: Iterable[tuple[Key, Any]], s: MapState) -> list[Item]:
    """Check and encode every (key, value) of a bulk write before anything is sent."""
    max_key, buckets = s.config.max_key_bytes, s.cmds.layout.buckets
    out: list[Item] = []
    append = out.append
    for key, value in pairs:
        field = encode_key(key, max_key)
        append((field, normal_key(key), bucket_of(field, buckets), payload(s, value)))
    return out


def update(s: MapState, items: list[Item], *, ttl_ms: int, fence: Fenced) -> Flow[list[Any]]:
    """Store many entries: one mset script per bucket (and per 1,000 keys), one round trip.

    Replies come back per part (refusals in place, see :func:`raise_partial`).  A batch whose
    outcome is unknown drops every key of it from the cache; a part whose outcome is unknown (on
    a Cluster: its master hung, or dropped the connection, after the call was sent; the other
    masters' parts did run) drops that part's keys, the applied parts are accounted for, and
    then ``WriteOutcomeUnknown`` names the unknown parts (:func:`raise_unknown`)."""
    per_bucket: dict[int, list[tuple[Key, bytes, bytes]]] = {}
    for field, key, bucket, data in items:
        per_bucket.setdefault(bucket, []).append((key, field, data))
    cmds, plan = [], []
    for bucket, entries in per_bucket.items():
        for i in range(0, len(entries), 1000):  # keep each script short for Redis
            chunk = entries[i : i + 1000]
            args = [a for _, field, data in chunk for a in (field, data)]
            cmds.append(s.cmds.script("mset", bucket, ttl_ms, *args, fence=fence))
            plan.append((bucket, chunk))
    if not cmds:
        return []
    with s.guard:
        before = {b: s.core.epoch_snapshot(b) for b in per_bucket}
    try:
        replies = yield from store_call(cmds, write=True, partial=True, relayed=s.cmds.relayed,
                                        wait=s.wait)  # fmt: skip
    except WriteOutcomeUnknown:
        with s.guard:
            for _, chunk in plan:
                for key, _, _ in chunk:
                    s.core.drop(key)
        raise
    unknown = _account(s, replies, plan, before)
    if unknown:
        raise_unknown(replies, unknown, "update()")
    return replies


Plan = list[tuple[int, list[tuple[Key, bytes, bytes]]]]
"""``update``'s parts: (bucket, its (key, field, payload) entries) per script."""


def _account(s: MapState, replies: list[Any], plan: Plan,
             before: dict[int, Any]) -> list[tuple[int, list[Key]]]:  # fmt: skip
    """``update``'s applied parts noted in the near cache; the parts of unknown outcome's keys
    dropped from it, returned as (bucket, keys)."""
    unknown: list[tuple[int, list[Key]]] = []
    with s.guard:
        now = s.clock()
        for reply, (bucket, chunk) in zip(replies, plan, strict=True):
            if isinstance(reply, WriteOutcomeUnknown):
                # This part's master may or may not hold these values: forget them here, as a
                # whole batch of unknown outcome does (a fill in flight for one is refused too).
                for key, _, _ in chunk:
                    s.core.drop(key)
                unknown.append((bucket, [key for key, _, _ in chunk]))
            if isinstance(reply, Exception):
                continue
            first, epoch = int(reply[0]), int(reply[1])
            s.core.learn_epoch_if(bucket, epoch, first, now, before[bucket])
            for i, (key, _, _) in enumerate(chunk):
                s.core.note_write(key, first + i)
    if s.core.sweeping:  # a new epoch flushed a large bucket: the timer frees its entries
        s.wake_timer()
    return unknown


def clear(s: MapState, *, fence: Fenced) -> Flow[list[Any]]:
    """Remove every entry: each bucket atomically, all in one round trip.

    A bucket whose part's outcome is unknown (its master hung, say) may or may not have been
    emptied: what this server caches of it is forgotten (``NearCache.forget_bucket``) and, once
    the applied parts are accounted for, ``WriteOutcomeUnknown`` names those buckets."""
    n = s.cmds.layout.buckets
    cmds = [s.cmds.script("clear", b, fence=fence) for b in range(n)]
    with s.guard:
        before = [s.core.epoch_snapshot(b) for b in range(n)]
    replies = yield from store_call(cmds, write=True, partial=True, relayed=s.cmds.relayed,
                                    wait=s.wait)  # fmt: skip
    unknown: list[tuple[int, list[Key]]] = []
    with s.guard:
        now = s.clock()
        for bucket, reply in enumerate(replies):
            if isinstance(reply, WriteOutcomeUnknown):
                unknown.append((bucket, []))
                s.core.forget_bucket(bucket)
            elif not isinstance(reply, Exception) and reply[0]:
                s.core.learn_epoch_if(bucket, int(reply[1]), int(reply[0]), now, before[bucket])
                s.core.cleared(bucket, int(reply[0]))
    if s.core.sweeping:  # a doubt or a new epoch flushed a large bucket: the timer frees it
        s.wake_timer()
    if unknown:
        raise_unknown(replies, unknown, "clear()")
    return replies


def raise_unknown(replies: list[Any], unknown: list[tuple[int, list[Key]]], what: str) -> None:
    """Raise ``WriteOutcomeUnknown`` for a multi-bucket write some of whose parts may or may not
    have run (``unknown``: (bucket, its keys) of each), saying what became of the others.  It
    wins over the other parts' refusals: the caller must learn first that the store may hold
    what it does not expect."""
    first = next(r for r in replies if isinstance(r, WriteOutcomeUnknown))
    refused = sum(1 for r in replies if isinstance(r, Exception)) - len(unknown)
    buckets = sorted({b for b, _ in unknown})
    keys = [k for _, ks in unknown for k in ks]
    named = f" (keys {', '.join(clip(k) for k in keys[:5])}{', ...' if len(keys) > 5 else ''})"
    raise WriteOutcomeUnknown(
        f"{what}: the parts of bucket(s) {', '.join(map(str, buckets))}{named if keys else ''} "
        f"may or may not have been applied ({first}); of {len(replies)} bucket parts "
        f"{len(replies) - refused - len(unknown)} were applied, {refused} refused (each part is "
        "atomic on its own). Their keys were dropped from this server's near cache: read them "
        "to find out"
    ) from first


def raise_partial(replies: list[Any], what: str) -> None:
    """Raise the first refusal of a multi-bucket write, saying how much of it was applied."""
    failed = [r for r in replies if isinstance(r, Exception)]
    if failed:
        first = failed[0]
        done = len(replies) - len(failed)
        first.args = (f"{first.args[0] if first.args else first}; {what} applied {done} of "
                      f"{len(replies)} bucket parts (each part is atomic on its own)",)  # fmt: skip
        raise first
