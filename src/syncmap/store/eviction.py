"""What Redis's eviction policy means for syncmap, said once per Redis and process."""

from __future__ import annotations

import logging

log = logging.getLogger("syncmap")
_warned: set[str] = set()

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


def warn_if_evicting(where: str, policy: str, maxmemory: str) -> None:
    """Once per Redis and process, at map open: a one-line WARNING when ``maxmemory-policy`` is
    ``allkeys-*`` (what is and is not guaranteed then).  ``volatile-*`` evicts no map key (they
    have no TTL): nothing is logged for maps."""
    if not policy.startswith("allkeys") or where in _warned:
        return
    note = eviction_note(policy, maxmemory)
    if note is not None:
        _warned.add(where)
        log.warning("syncmap: %s has maxmemory %s with maxmemory-policy %s. %s",
                    where, maxmemory, policy, note)  # fmt: skip
