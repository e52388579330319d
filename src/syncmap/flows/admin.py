"""The map's own upkeep: opening (scripts, settings), sequence probes, the eviction check."""

from __future__ import annotations

import logging
import time

from ..errors import ConfigurationError, SyncMapError
from ..keys import Layout
from ..store.commands import (
    MapCommands,
    ProbeResult,
    config_value,
    load_scripts,
    parse_probe,
    parse_stamps,
)
from .effects import Flow, store_call
from .state import MapState

log = logging.getLogger("syncmap")


def probe(s: MapState) -> Flow[ProbeResult]:
    """Reap due expiries and read every bucket's (epoch, seq, digest): one round trip.

    Order: ``tops()`` (what this server had applied) and the send time are taken *before* the
    probe goes out, so a message that arrives while it is in flight is never mistaken for one
    the probe accounted for (``NearCache.on_probe``).  The probe also measures Redis's clock
    (TTL deadlines are Redis's) and counts the live entries (``len()``).
    """
    with s.guard:
        tops = s.core.tops()
    sent = s.clock()
    wall = time.time() * 1000
    cmds = s.cmds.probe()
    replies = yield from store_call(cmds, write=True, partial=s.cmds.isolate_damage,
                                    relayed=s.cmds.relayed)  # fmt: skip
    result = parse_probe(s.cmds.layout, replies)
    s.server_offset_ms = result.server_ms - (wall + time.time() * 1000) / 2
    s.live_entries = result.live
    with s.guard:
        s.core.on_probe(result.states, sent, s.clock(), tops)
    s.wake_timer()
    return result


def open_map(layout: Layout, codec: str, *, stamps: bool = True) -> Flow[tuple[int, str]]:
    """Load the scripts and record the map's bucket count and codec once; return what the map
    really uses (the first server's choice wins).

    A meta key that is missing although the map has data (evicted or deleted) is written again
    from the settings stamped on the map's buckets, not from this server's: a server opened with
    another bucket count or codec must not split or corrupt the map.  Buckets 0 ..
    max(``buckets``, 16)-1 are read; a map all of whose buckets there are empty has nothing to
    protect.  (``stamps=False``: ignore them, as layout 1 did; tests only.)
    """
    yield from store_call(load_scripts(), write=False)
    meta, buckets = layout.meta, layout.buckets
    stored = (yield from store_call([("HMGET", meta, "buckets", "codec")], write=False))[0]
    if not (stored[0] and stored[1]):
        probe_cmds = MapCommands(Layout(layout.namespace, layout.name, max(buckets, 16)), "")
        found: set[tuple[int, str]] = set()
        if stamps:
            replies = yield from store_call(probe_cmds.stamps(max(buckets, 16)), write=False,
                                            partial=True)  # fmt: skip
            found = parse_stamps(replies)
        if len(found) > 1:
            raise ConfigurationError(
                f"map {layout.name!r} has no meta key and its buckets disagree about its "
                f"settings ({sorted(found)}): repair it by hand (see docs/protocol.md)"
            )
        if found:
            buckets, codec = found.pop()
            log.warning("syncmap map %r: its meta key %s was missing (evicted or deleted); "
                        "re-created from the settings its buckets record: %d buckets, codec %s",
                        layout.name, meta, buckets, codec)  # fmt: skip
        cmds = [("HSETNX", meta, "buckets", buckets), ("HSETNX", meta, "codec", codec),
                ("HMGET", meta, "buckets", "codec")]  # fmt: skip
        stored = (yield from store_call(cmds, write=True))[2]
    try:
        return int(stored[0]), stored[1].decode()
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigurationError(
            f"map {layout.name!r}: its meta key {meta} is damaged ({stored!r:.80}); "
            "delete it to have it re-created from the buckets' settings stamps"
        ) from exc


def eviction_policy() -> Flow[tuple[str, str] | None]:
    """(maxmemory-policy, maxmemory) of the store, or None when CONFIG is refused (least
    privilege) or fails: no answer is not an error."""
    cmds = [("CONFIG", "GET", "maxmemory-policy"), ("CONFIG", "GET", "maxmemory")]
    try:
        replies = yield from store_call(cmds, write=False)
    except SyncMapError:
        return None
    policy, limit = (config_value(r) for r in replies)
    return policy, limit
