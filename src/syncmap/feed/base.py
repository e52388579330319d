"""The feed interface: how change messages travel between servers, whatever the broker.

A *feed* carries opaque byte messages on one *topic* (one map).  It is small on purpose:

* ``publish(payload, key=None)`` sends one message.  With ``confirm=True`` (the default) it returns
  only once the broker has taken the message (RabbitMQ publisher confirm, JetStream/Kafka ack, the
  Redis reply); it raises :class:`FeedUnavailable` when the broker certainly did not take it, and
  :class:`PublishOutcomeUnknown` when it cannot tell (the connection dropped after sending).
  ``key`` is the map key the message is about: feeds that compact (Kafka, JetStream) keep the last
  message per key, which is what a replicated map's late joiner replays.
* ``subscribe(handler, start)`` delivers every message published after the subscription is
  confirmed (``start=None``), or, on a *durable* feed, every message after ``start`` (a position
  returned by ``position()`` or handed to ``on_message``; :data:`BEGINNING` = the oldest kept).
  Messages arrive on a thread the feed owns, one at a time, in the feed's order.
* ``position()`` is the position of the newest message the broker holds (``None``: nothing yet, or
  a feed that keeps nothing).  Take it *before* the first write you must see: a read "from now"
  that starts later misses what came in between (DESIGN §6, Redis Streams read from ``$``).
* ``close()`` stops every subscription and connection of this feed object.

What the handler is told, and what the map does with it:

* ``on_up(resumed)``: the subscription is confirmed.  ``resumed=True`` means the feed resumed after
  a drop from the last delivered position with nothing lost (durable feeds only); ``False`` means
  messages published while it was down may be lost: the map repairs (probes, or a snapshot).
* ``on_down()``: the connection dropped; messages may be lost until the next ``on_up``.
* ``on_message(payload, position)``: one message; ``position`` is its place in a durable feed's log
  (``None`` on a feed that keeps nothing).

What no feed promises, and so what the map never relies on: exactly-once delivery (duplicates are
harmless: every message carries a version), and order across publishers (two servers' messages
may arrive in either order; each feed states what order it does give in :attr:`Feed.ordering`).
"""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .. import forksafe
from ..errors import ConfigurationError, FeedError

BEGINNING = "^"
"""``subscribe(start=BEGINNING)``: every message the feed still holds, oldest first."""


@dataclass(slots=True, eq=False)
class FeedHandler:
    """One subscriber's callbacks; they run on the feed's thread and must not block for long."""

    on_message: Callable[[bytes, str | None], None]
    on_up: Callable[[bool], None] = lambda resumed: None
    on_down: Callable[[], None] = lambda: None
    on_buckets_up: Callable[[list[int]], None] | None = None
    """A feed with one channel per bucket (``redis_sharded.ChannelSet``) calls this instead of
    ``on_up(False)``, with the buckets whose channel was down since the last time: only their
    messages may have been lost."""
    position_of: Callable[[int], tuple[int | None, int] | None] | None = None
    """A feed that can replay a bucket's log (the stream route on a Redis Cluster,
    ``bucketlog.py``) asks where the subscriber stands in a bucket whose channel came back:
    (epoch, seq); None: nothing to replay to (the bucket is not tracked, or replay is off)."""
    on_replayed: Callable[[int, bool, int], None] | None = None
    """Then it tells (bucket, whether the log covered the gap, messages applied): a covered
    bucket is not among the ``on_buckets_up`` buckets, so it is not flushed."""
    lease: Any = None
    """PING leases (``pubsub.Lease``): set by a store-mode map on an in-script pub/sub route;
    a feed that cannot vouch ignores it (the map then keeps probing)."""


class Subscription(ABC):
    """A live subscription; ``close()`` stops deliveries (idempotent)."""

    turns: ClassVar[bool] = False
    """:meth:`give_turn` can help: a thread of this process reads the feed's sockets."""

    @abstractmethod
    def close(self) -> None: ...

    def give_turn(self, timeout: float) -> bool:
        """Called by a thread holding the GIL: if the feed's thread has data waiting, wait
        (GIL released) until it has handled some, at most ``timeout`` s (``pubsub.Subscriber``
        says why).  False: it waited in vain.  By default nothing to do."""
        return True


class Feed(ABC):
    """One topic on one broker.  Subclasses set the class attributes and implement the methods."""

    scheme: ClassVar[str]
    durable: ClassVar[bool] = False
    """Keeps messages: ``subscribe(start=position)`` resumes with no gap, ``position()`` works."""
    compacted: ClassVar[bool] = False
    """Keeps at least the newest message of every ``key`` for as long as the topic exists, so a
    replay from :data:`BEGINNING` rebuilds a replicated map however long it has run."""
    ordering: ClassVar[str] = "per-publisher"
    """``"total"``: every subscriber sees one order (a log); ``"per-publisher"``: each publisher's
    messages arrive in the order it sent them, but two publishers' may interleave differently."""
    extra: ClassVar[str] = ""
    """The pip extra that installs this feed's client library (for error messages)."""

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        """The topic (channel, subject, exchange, stream, Kafka topic) of map ``name``."""
        return f"{namespace}.{name}"

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        self.url = url
        self.topic = topic
        self.timeout = timeout

    @abstractmethod
    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        """Send one message (see the module docstring for what ``confirm`` promises)."""

    @abstractmethod
    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        """Start delivering to ``handler``; ``start`` needs a durable feed."""

    def position(self) -> str | None:
        """The newest message's position (durable feeds); ``None`` for a feed that keeps nothing."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Close every subscription and connection (idempotent)."""

    def describe(self) -> str:
        """The URL without its password, for messages and logs."""
        return redact(self.url)

    def _no_start(self, start: str | None) -> None:
        refuse_start(self.scheme, self.durable, start)


def refuse_start(scheme: str, durable: bool, start: str | None) -> None:
    """A ``start`` position given to a feed that keeps nothing is a configuration error (shared by
    the thread and asyncio feeds)."""
    if start is not None and not durable:
        raise ConfigurationError(
            f"{scheme}:// keeps no messages, so it cannot deliver from a position "
            f"({start!r}); use a durable feed (redis+stream://, nats+jetstream://, kafka://)"
        )


class FeedUnavailable(FeedError):
    """The broker did not take the message (unreachable, refused, or no confirm): nothing sent."""


class PublishOutcomeUnknown(FeedError):
    """The message was sent but the broker's confirm never came: it may or may not be delivered."""


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


# ---- the registry: a scheme names a module, imported only when used -------------------------

_MODULES = {
    "redis": ("redis_pubsub", "RedisPubSubFeed", ""),
    "rediss": ("redis_pubsub", "RedisPubSubFeed", ""),
    "unix": ("redis_pubsub", "RedisPubSubFeed", ""),
    "redis+stream": ("redis_stream", "RedisStreamFeed", ""),
    "rediss+stream": ("redis_stream", "RedisStreamFeed", ""),
    "amqp": ("rabbitmq", "RabbitMQFeed", "amqp"),
    "amqps": ("rabbitmq", "RabbitMQFeed", "amqp"),
    "nats": ("nats", "NatsFeed", "nats"),
    "tls": ("nats", "NatsFeed", "nats"),
    "nats+jetstream": ("jetstream", "JetStreamFeed", "nats"),
    "kafka": ("kafka", "KafkaFeed", "kafka"),
}
_import_lock = threading.Lock()


@forksafe.at_fork
def _fresh_import_lock() -> None:
    global _import_lock
    _import_lock = threading.Lock()  # a parent's thread may have held it at the fork


def feed_class(url: str) -> type[Feed]:
    """The feed class for ``url``'s scheme, with a clear error for an unknown scheme or a missing
    client library."""
    cls: type[Feed] = load_class(url, _MODULES)
    return cls


def load_class(url: str, modules: dict[str, tuple[str, str, str]]) -> Any:
    """The class ``modules`` names for ``url``'s scheme (``scheme: (module of syncmap.feed,
    class, pip extra)``), imported now, with a clear error for an unknown scheme or a missing
    client library.  Shared by the thread feeds' registry and the asyncio one (``aregistry.py``).
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in modules:
        raise ConfigurationError(
            f"feed URL {redact(url)!r}: unknown scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in modules)
        )
    module, name, extra = modules[scheme]
    with _import_lock:
        try:
            mod = importlib.import_module(f"syncmap.feed.{module}")
        except ImportError as exc:
            if (exc.name or "").startswith("syncmap"):
                raise  # our own module is broken: not a missing extra
            raise ConfigurationError(
                f"the {scheme}:// feed needs a library that is not installed ({exc.name}): "
                f"pip install 'syncmap[{extra or 'dev'}]'"
            ) from exc
    return getattr(mod, name)


def open_feed(url: str, topic: str, *, timeout: float = 5.0) -> Feed:
    """Open the feed ``url`` names for ``topic`` (one map)."""
    return feed_class(url)(url, topic, timeout=timeout)
