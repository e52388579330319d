"""The state one benchmark run shares: the Redis, a key namespace, the maps it opened; and the
record of the machine and versions that goes into every report."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import redis

from .. import MapConfig, SyncMap
from ..serverinfo import server_identity

PEERS = ("redis", "hiredis", "python-redis-lock", "pottery", "cashews", "matplotlib", "msgspec")


@dataclass(slots=True)
class Bench:
    """One run's Redis (``url``), its key namespace ``ns`` and the maps to close at the end.

    Every key the run creates has ``ns`` in its name (peers add their own prefixes), so
    :meth:`close` finds them all with SCAN (never KEYS) and deletes them.
    """

    url: str
    ns: str
    client: redis.Redis
    maps: list[SyncMap] = field(default_factory=list)

    def open(self, name: str, *, feed: str | None = None, **config: Any) -> SyncMap:
        m = SyncMap(name, url=self.url, feed=feed,
                    config=MapConfig(namespace=self.ns, **config))  # fmt: skip
        self.maps.append(m)
        return m

    def raw(self, name: str) -> str:
        """A key for the raw redis-py baselines, inside this run's namespace."""
        return f"{self.ns}:raw:{name}"

    def release(self, m: SyncMap) -> None:
        """Close ``m`` now (big maps hold much memory) and delete its keys."""
        m.close()
        # By identity: ``list.remove`` would compare maps with ``==``, which reads both in full.
        self.maps[:] = [x for x in self.maps if x is not m]
        delete_matching(self.client, f"{self.ns}:{{{m.name}[:}}]*")

    @property
    def server_version(self) -> str:
        """``Redis 7.0.15`` or ``Valkey 8.1.8`` (not Valkey's pinned redis_version)."""
        return server_identity(self.client.info("server")).label

    def close(self) -> None:
        for m in self.maps:
            with contextlib.suppress(Exception):
                m.close()
        self.maps.clear()
        delete_matching(self.client, f"*{self.ns}*")


def delete_matching(client: redis.Redis, pattern: str) -> None:
    batch: list[Any] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) == 1000:
            client.delete(*batch)
            batch.clear()
    if batch:
        client.delete(*batch)


def settle(m: SyncMap, quiet: float = 0.02, limit: float = 10.0) -> None:
    """Wait until this process has handled the change messages its own writes published.

    Each write's message also reaches the writer's own subscriber thread; waiting (untimed) after
    a syncmap block keeps that work out of the next contender's block.
    """
    deadline = time.monotonic() + limit
    last = m.statistics().messages
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = m.statistics().messages
        if now == last:
            return
        last = now


def version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def hiredis_parser(client: redis.Redis) -> bool:
    """Whether redis-py parses replies with hiredis (its public HIREDIS_AVAILABLE flag)."""
    from redis.utils import HIREDIS_AVAILABLE  # noqa: PLC0415 - read once per report

    return bool(HIREDIS_AVAILABLE)


def load_average() -> str:
    """Other processes' CPU use skews every figure (most of all the tails): worth recording."""
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def environment(b: Bench) -> dict[str, Any]:
    """The machine, Python, syncmap, redis-py, hiredis, the Redis server and every peer."""
    env: dict[str, Any] = {
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "syncmap": version("syncmap"),
    }
    env.update({dist: version(dist) for dist in PEERS})
    env.update({
        "hiredis parser in use": hiredis_parser(b.client),
        "redis server": f"{b.server_version} ({b.url.rsplit('@', maxsplit=1)[-1]})",
        "cpu model": cpu_model(),
        "cpus": os.cpu_count(),
        "cpus usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "load average at start": load_average(),
    })  # fmt: skip
    return env
