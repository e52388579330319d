"""The libraries users would otherwise pick, set up the way their docs say, or the reason why not.

Each peer is imported only here and only when used: the ``bench`` extra installs them, and a peer
that is missing or cannot run on this server becomes :class:`Unavailable` with a reason that goes
into the table in place of its figure.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import redis

_EXTRA = "pip install 'syncmap[bench]'"


class Unavailable(Exception):
    """A peer that cannot be measured here; ``str()`` is what the table shows."""


def optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Unavailable(f"not installed ({exc.name}): {_EXTRA}") from exc


class LockedDict:
    """A dict behind a ``threading.Lock``: what a thread-safe in-process cache costs at least."""

    __slots__ = ("_data", "_lock")

    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = data
        self._lock = threading.Lock()

    def __getitem__(self, key: Any) -> Any:
        with self._lock:
            return self._data[key]


# ---- redis-py's own client-side cache (RESP3, Redis >= 7.4) ---------------------------------


def redis_client_cache(url: str, server_version: str) -> redis.Redis:
    """A redis-py client with ``cache_config=CacheConfig()`` (RESP3 CLIENT TRACKING)."""
    cache = optional("redis.cache")
    try:
        client = redis.Redis.from_url(url, protocol=3, cache_config=cache.CacheConfig())
        client.ping()  # connects: redis-py checks the server's version here
    except (redis.RedisError, ValueError) as exc:
        if "7.4" in str(exc):
            # redis-py checks HELLO's server name too: Valkey (8.1 tracks keys) is refused.
            only = "" if server_version.startswith("Redis") else " (redis-py allows Redis only)"
            raise Unavailable(
                f"not supported by this server ({server_version}): needs ≥ 7.4{only}"
            ) from exc
        raise Unavailable(f"does not run here: {type(exc).__name__}: {exc}") from exc
    return client


# ---- cashews' client-side cache (asyncio; Redis CLIENT TRACKING in broadcast mode) ----------


class Cashews:
    """cashews ``Cache`` set up with ``client_side=True``, driven from one event loop.

    ``protocol`` is passed to its redis-py client: None keeps redis-py's default (RESP3 in
    redis-py 8), 2 asks for RESP2.
    """

    def __init__(self, url: str, prefix: str, protocol: int | None, loop: Any) -> None:
        cashews = optional("cashews")
        self.loop = loop
        self.cache = cashews.Cache()
        options: dict[str, Any] = {"client_side": True, "client_side_prefix": prefix}
        if protocol is not None:
            options["protocol"] = protocol
        try:
            self.cache.setup(url, **options)
            self.run(self.cache.init())
        except Exception as exc:
            raise Unavailable(f"does not run here: {type(exc).__name__}: {exc}") from exc

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def get_loop(self, keys: Sequence[str], reps: int) -> float:
        """ns per ``await cache.get(k)``, timed inside the event loop."""
        get = self.cache.get

        async def block() -> float:
            t0 = time.perf_counter_ns()
            for _ in range(reps):
                for k in keys:
                    await get(k)
            return (time.perf_counter_ns() - t0) / (reps * len(keys))

        result: float = self.run(block())
        return result

    def close(self) -> None:
        self.run(self.cache.close())


def cashews_invalidates(url: str, prefix: str, protocol: int | None, wait: float = 1.0) -> bool:
    """Does a cashews reader drop its cached value when another cashews client writes the key?"""
    loop = asyncio.new_event_loop()
    try:
        writer = Cashews(url, prefix, protocol, loop)
        reader = Cashews(url, prefix, protocol, loop)
        try:
            return bool(loop.run_until_complete(_sees_write(writer, reader, wait)))
        finally:
            reader.close()
            writer.close()
    finally:
        loop.close()


async def _sees_write(writer: Cashews, reader: Cashews, wait: float) -> bool:
    await writer.cache.set("invalidation-check", "old")
    await reader.cache.get("invalidation-check")  # now cached by the reader
    await writer.cache.set("invalidation-check", "new")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # lets the reader's listener task run
        if await reader.cache.get("invalidation-check") == "new":
            return True
    return False


# ---- pottery RedisDict ----------------------------------------------------------------------


def pottery_dict(client: redis.Redis, key: str, data: dict[str, Any]) -> Any:
    """A ``pottery.RedisDict`` holding ``data`` (every read and write is a Redis round trip)."""
    pottery = optional("pottery")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InefficientAccessWarning on bulk update: we know
        d = pottery.RedisDict(redis=client, key=key)
        d.update(data)
    return d


# ---- compare-and-set the redis-py way -------------------------------------------------------


def watch_cas(client: redis.Redis, key: str, expected: bytes, new: bytes) -> bool:
    """The optimistic WATCH / GET / MULTI SET EXEC loop redis-py's docs show: 3 round trips."""
    with client.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)  # type: ignore[no-untyped-call]
                if pipe.get(key) != expected:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.set(key, new)
                pipe.execute()
                return True
            except redis.WatchError:
                continue
