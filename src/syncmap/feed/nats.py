"""``nats://`` (core NATS; ``tls://`` too) for the thread driver: the asyncio feed of
``anats.py``, run on the process's private event loop (``aioloop.py``).

There is one implementation of each NATS feed, the asyncio one (``anats.py``, ``ajetstream.py``;
the promises are spelled out there).  nats-py ties a connection to the loop that made it, so the
thread driver keeps one loop per process in a daemon thread and runs the same feed objects on it:
each synchronous method here runs the feed's coroutine there and waits (:func:`aioloop.run`).
What differs is only where the handler's callbacks run: on one :class:`~.aioloop.Dispatcher`
thread per subscription (a sync handler may block, or publish, which waits on the loop), where the
asyncio driver calls them on its loop.

The loop side bounds every operation by ``timeout`` plus a margin (``natsbase.MARGIN``); the wait
here adds one more margin as a backstop, so a loop-side timeout comes back with its own meaning
(``FeedUnavailable`` or ``PublishOutcomeUnknown``) rather than as a bare wait that ran out.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

# The client library itself, first: the asyncio modules below may be imported already (by
# syncmap.aio), so only this import tells a missing nats-py apart, and base.load_class turns its
# ImportError into "pip install 'syncmap[nats]'".
import nats  # noqa: F401

from ..errors import ConfigurationError
from . import aioloop, natsbase
from .anats import AsyncNatsFeed, AsyncNatsFeedBase, LiveSubscription
from .base import Feed, FeedHandler, FeedUnavailable, Subscription
from .natsbase import MARGIN, log, publish_error

T = TypeVar("T")
_BACKSTOP = 2 * MARGIN  # beyond the loop side's own bound (timeout + MARGIN)


class _NatsFeedBase(Feed):
    """A NATS feed object of ``anats.py``/``ajetstream.py``, driven from threads."""

    extra = "nats"
    _core_class: ClassVar[type[AsyncNatsFeedBase]]

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        return natsbase.topic_for(namespace, name)

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        super().__init__(url, topic, timeout=timeout)
        self._core = self._core_class(url, topic, timeout=timeout, dispatch=aioloop.Dispatcher)
        self.subject = self._core.subject
        try:
            aioloop.run(self._core.connect(), timeout + _BACKSTOP)
        except TimeoutError as exc:
            raise FeedUnavailable(
                f"cannot connect to NATS at {self.describe()} within {timeout} s; check that "
                "nats-server runs there and the URL's host, port and credentials"
            ) from exc

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._core.closing:
            coro.close()
            raise FeedUnavailable(f"the feed {self.describe()} ({self.topic}) is closed")
        return aioloop.run(coro, self.timeout + _BACKSTOP)

    def publish(self, payload: bytes, key: bytes | None = None, *, confirm: bool = True) -> None:
        try:
            self._run(self._core.publish(payload, key, confirm=confirm))
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:  # the backstop ran out: the message may be in the buffer
            raise publish_error(exc, self) from exc

    def subscribe(self, handler: FeedHandler, start: str | None = None) -> Subscription:
        try:
            live = self._run(self._core.subscribe(handler, start))
        except (FeedUnavailable, ConfigurationError):
            raise
        except Exception as exc:
            raise FeedUnavailable(
                f"subscribe to {self.topic} at {self.describe()}: {exc!r}"
            ) from exc
        return self._wrap(live)

    def _wrap(self, live: LiveSubscription) -> Subscription:
        return _NatsSubscription(self, live)

    def close(self) -> None:
        if self._core.closing:
            return
        try:
            aioloop.run(self._core.aclose(), self.timeout + _BACKSTOP)
        except Exception as exc:  # best effort: the server drops the socket's interest anyway
            log.debug("syncmap: closing the NATS connection to %s: %r", self.describe(), exc)


class _NatsSubscription(Subscription):
    """A subscription of the loop-side feed; ``close()`` waits until it is closed there."""

    def __init__(self, feed: _NatsFeedBase, live: LiveSubscription) -> None:
        self._feed, self._live = feed, live

    def close(self) -> None:
        # First, from this thread: nothing more reaches the handler once close() returns (a
        # callback already running on the dispatcher thread finishes).
        self._live.stop()
        if self._feed._core.closed:
            return
        try:
            aioloop.run(self._live.aclose(), self._feed.timeout + _BACKSTOP)
        except Exception as exc:
            log.debug("syncmap: closing a NATS subscription to %s: %r", self._feed.topic, exc)


class NatsFeed(_NatsFeedBase):
    """``nats://host:port`` or ``tls://host:port`` (``user:password@`` as usual): core NATS."""

    scheme = "nats"
    durable = False
    ordering = "per-publisher"  # one connection keeps its order; the server interleaves several
    _core_class = AsyncNatsFeed
