"""Reads that missed the hit path, and how any reply becomes a cache entry."""

from __future__ import annotations

from typing import Any

from ..codec import is_immutable
from ..core.nearcache import COPY, INF, FillToken, is_absent
from ..core.wire import unpack_value_epoch
from ..keys import Key
from .effects import Call, Flow
from .state import MapState

MISSING: Any = object()
"""A read's value when the key is absent (``None`` is a value)."""


def read(s: MapState, field: bytes, nkey: Key, bucket: int, *, consistent: bool
         ) -> Flow[tuple[Any, int, str]]:  # fmt: skip
    """(value or MISSING, version, provenance) of a read that missed the hit path.

    Order: under the guard, begin a fill (the core records which changes of this key it hears
    of from now on) -> HGET -> under the guard, install the reply only if nothing newer was
    heard meanwhile (``complete_fill``).  A failure aborts the fill.
    """
    now = s.clock()
    hit = None
    with s.guard:
        core = s.core
        if now >= core.fresh_until:
            core.tick(now)  # do not wait for the timer thread (we may have been paused)
        if now >= core.fresh_until and not consistent:
            # While a bucket is stale (serve_stale) or held (lapsed, waiting for a probe to
            # revalidate it), fresh_until is in the past and every read comes here: serve what
            # its own bucket's lease (or the outage policy) allows, without a round trip.
            hit = core.cached(nkey, now)
            if hit is not None and (hit[0].bucket != bucket or hit[0].kc is not nkey.__class__):
                hit = None  # an equal key of another type (1 and True), in another bucket
        if hit is None:
            token = core.begin_fill(nkey, bucket)
            if not consistent:
                core.counters.misses += 1
    if hit is not None:
        e, stale = hit
        e.hits += 1
        if is_absent(e):  # the key was absent, and still is as far as its lease tells
            return MISSING, 0, "stale" if stale else "local"
        v = e.value if e.value is not COPY else s.codec.decode(e.raw)  # type: ignore[arg-type]
        return v, e.version, "stale" if stale else "local"
    try:
        raw = (yield Call((s.cmds.hget(bucket, field),), False))[0]
    except BaseException:
        abort(s, token)
        raise
    value, version = settle_read(s, token, raw)
    return value, version, "redis"


def settle_read(s: MapState, token: FillToken, raw: bytes | None) -> tuple[Any, int]:
    """Install what a read (or a refused write) returned, if nothing newer was seen meanwhile,
    and return it as (value or MISSING, version).  Decoding failures abort the fill."""
    if raw is not None:
        try:
            version, deadline_ms, epoch, payload = unpack_value_epoch(raw)
            live = not deadline_ms or deadline_ms > s.server_now_ms()
            value = s.codec.decode(payload) if live else None
        except BaseException:
            abort(s, token)
            raise
        if live:
            install(s, token, version, deadline_ms, payload, value, epoch, own=False)
            return value, version
    # Cached as an absent marker (same gate as a value: NearCache.fill_absent), so the next
    # read of this key is answered without a round trip.
    now = s.clock()
    with s.guard:
        s.core.fill_absent(token, now)
    return MISSING, 0


def install(s: MapState, token: FillToken, version: int, deadline_ms: int, payload: bytes,
            value: Any, epoch: int, *, own: bool) -> None:  # fmt: skip
    """Offer a read's (or this server's own write's) value to the cache."""
    now = s.clock()
    deadline = s.local_deadline(deadline_ms, now) if deadline_ms else INF
    cached, raw = (value, None) if is_immutable(value) else (COPY, payload)
    with s.guard:
        if own:
            s.core.wrote(token, now, version, cached, raw, deadline, epoch=epoch)
        else:
            s.core.complete_fill(token, now, version, cached, raw, deadline, epoch)
    if deadline != INF or s.core.sweeping:  # a TTL to watch, or a new epoch's flush to free
        s.wake_timer()


def abort(s: MapState, token: FillToken) -> None:
    with s.guard:
        s.core.abort_fill(token)


def current(s: MapState, raw: bytes | None) -> tuple[Any, int, int]:
    """(value or MISSING, version, epoch) of a stored value read without caching it."""
    if raw is None:
        return MISSING, 0, 0
    version, deadline_ms, epoch, payload = unpack_value_epoch(raw)
    if deadline_ms and deadline_ms <= s.server_now_ms():
        return MISSING, 0, 0
    return s.codec.decode(payload), version, epoch
