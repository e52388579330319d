"""``syncmap.aio.open_map``: the asyncio twin of ``syncmap.open_map`` (``opening.py``).

The same choice, ``SYNCMAP_URL`` read first: a store makes a :class:`syncmap.aio.SyncMap`, a feed
alone a :class:`syncmap.aio.ReplicatedMap`.  Nothing connects here: the caller opens what it
gets (``m = await open_map(...)`` or ``async with open_map(...) as m``).
"""

from __future__ import annotations

import os
from typing import Any

import redis as redis_lib

from ..errors import ConfigurationError
from .map import SyncMap
from .replicated import ReplicatedMap


def open_map(
    name: str, url: str | None = None, *, feed: str | None = None,
    redis: redis_lib.Redis | None = None, **options: Any,
) -> SyncMap | ReplicatedMap:  # fmt: skip
    """Map ``name`` in the mode its configuration names, not opened yet.

    * a store (``url``, ``redis=``, or else ``$SYNCMAP_URL``): store mode, a :class:`SyncMap`;
      ``feed`` then names its change feed (default: Redis pub/sub on the store);
    * no store, but a ``feed``: replicated mode, a :class:`ReplicatedMap`;
    * neither: :class:`ConfigurationError`.

    ``options`` are the chosen class's keywords.
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
