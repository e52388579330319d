"""``open_map``: one call that picks the mode from what is configured, ``SYNCMAP_URL`` first."""

from __future__ import annotations

import os
from typing import Any

import redis as redis_lib

from .errors import ConfigurationError
from .map import SyncMap
from .replicated import ReplicatedMap


def open_map(
    name: str, url: str | None = None, *, feed: str | None = None,
    redis: redis_lib.Redis | None = None, **options: Any,
) -> SyncMap | ReplicatedMap:  # fmt: skip
    """Open map ``name`` in the mode its configuration names.

    * a store (``url``, ``redis=``, or else ``$SYNCMAP_URL``): store mode, a :class:`SyncMap`;
      ``feed`` then names its change feed (default: Redis pub/sub on the store);
    * no store, but a ``feed``: replicated mode, a :class:`ReplicatedMap` (the broker carries
      every change; no Redis);
    * neither: :class:`ConfigurationError`.

    ``SYNCMAP_URL`` is read *before* the choice, so adding ``feed=`` to a service that runs on
    ``SYNCMAP_URL`` keeps its store.  ``options`` are the chosen class's keywords.
    """
    url = url or (None if redis is not None else os.environ.get("SYNCMAP_URL") or None)
    if url is not None or redis is not None:
        return SyncMap(name, url, redis=redis, feed=feed, **options)
    if feed is not None:
        return ReplicatedMap(name, feed, **options)
    raise ConfigurationError(
        f"open_map({name!r}): no store and no feed. Pass url='redis://host:6379/0' (or set "
        "SYNCMAP_URL) for store mode, or feed='nats+jetstream://...' for replicated mode"
    )
