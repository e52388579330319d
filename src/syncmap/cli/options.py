"""What every ``syncmap`` command that talks to a Redis of yours agrees on: where the URL comes
from (``--url``, else ``$SYNCMAP_URL``, else :data:`DEFAULT_URL`; docs/cli.md) and how a map
that does not exist is told from one that does, without creating it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click
import redis

from ..errors import ConfigurationError, StoreUnavailable
from ..keys import Layout
from ..store.topology import open_topology

DEFAULT_URL = "redis://localhost:6379/0"
"""The URL used when neither ``--url`` nor ``$SYNCMAP_URL`` is given.  (``demo``, ``bench`` and
``torture`` start a Redis of their own instead: they write test data.)"""

URL_SOURCES = f"The URL comes from --url, else from $SYNCMAP_URL, else {DEFAULT_URL}."
LIST_MAPS_UP_TO = 10_000
"""Keys in the database up to which a missing map's message lists the maps that exist (a SCAN
of the whole keyspace, cheap only while it is small; ``KEYS`` is never used)."""

F = TypeVar("F", bound=Callable[..., Any])


def url_option(what: str) -> Callable[[F], F]:
    """``--url`` for a command: ``what`` says what the Redis holds ("the map", "the lock")."""
    return click.option(
        "--url", envvar="SYNCMAP_URL", default=DEFAULT_URL, show_default=True, metavar="URL",
        help=f"Redis holding {what} (or set SYNCMAP_URL).",
    )  # fmt: skip


def redis_client(url: str, timeout: float = 5.0, **overrides: Any) -> redis.Redis:
    """A ``redis.Redis`` on the node ``url`` names now (every URL form: ``redis://``,
    ``rediss://``, ``unix://``, ``redis+sentinel://``: the master the sentinels name), or for
    ``redis+cluster://`` a ``RedisCluster`` (the same commands, each routed by its slot).

    A bad URL raises ``ValueError`` and a master no sentinel names ``redis.ConnectionError``,
    as ``redis.Redis.from_url`` and its first command would: the commands handle those."""
    try:
        topology = open_topology(url, timeout=timeout)
    except ConfigurationError as exc:
        raise ValueError(str(exc)) from exc
    if topology.kind == "cluster":  # a RedisCluster: every command routed by its slot
        try:
            return topology.client(**overrides)  # type: ignore[attr-defined, no-any-return]
        except redis.RedisError as exc:
            raise redis.ConnectionError(str(exc)) from exc
    try:
        endpoint = topology.endpoint()
    except StoreUnavailable as exc:
        raise redis.ConnectionError(str(exc)) from exc
    return endpoint.client(**overrides)


def map_exists(client: redis.Redis, name: str, namespace: str = "sm") -> bool:
    """Whether map ``name`` exists: its meta key, or (the meta key evicted) one of the buckets
    ``SyncMap`` would re-create it from.  One ``EXISTS``; nothing is written."""
    layout = Layout(namespace, name, 16)
    return bool(client.exists(layout.meta, *(layout.data(b) for b in range(16))))


def maps_found(client: redis.Redis, namespace: str = "sm") -> list[str] | None:
    """The names of the maps in this database, or None when that is not cheap to know (more
    than :data:`LIST_MAPS_UP_TO` keys) or this user may not look (ACL)."""
    prefix, suffix = f"{namespace}:{{", "}:meta"
    try:
        if int(client.dbsize()) > LIST_MAPS_UP_TO:
            return None
        names = {
            key.decode(errors="replace")[len(prefix) : -len(suffix)]
            for key in client.scan_iter(match=f"{namespace}:{{*}}:meta", count=1000)
        }
    except redis.RedisError:
        return None
    return sorted(names)


def missing_map_message(name: str, where: str, found: list[str] | None) -> str:
    if found is None:
        listing = "(not listing the maps that exist: the database is large or not listable)"
    elif found:
        listing = "maps here: " + ", ".join(found[:20]) + (" ..." if len(found) > 20 else "")
    else:
        listing = "there are no maps here"
    return (
        f"no map {name!r} on {where}; {listing}. Check the name and --url "
        "('syncmap set' creates a map)"
    )
