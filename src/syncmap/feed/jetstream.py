"""``nats+jetstream://`` for the thread driver: the asyncio feed of ``ajetstream.py`` (where the
stream layout and what ``on_up(resumed)`` means are described), run on the process's private
event loop exactly as ``nats.py`` runs core NATS."""

from __future__ import annotations

import nats  # noqa: F401  (first; see nats.py: a missing nats-py names its extra)
from nats.js.manager import JetStreamManager

from ..errors import ConfigurationError
from .ajetstream import AsyncJetStreamFeed, StreamSubscription, stream_error
from .base import Subscription
from .nats import _NatsFeedBase, _NatsSubscription


class JetStreamFeed(_NatsFeedBase):
    """``nats+jetstream://host:port[?max_msgs=N]``: a stream per map."""

    scheme = "nats+jetstream"
    durable = True
    compacted = True
    ordering = "total"  # one stream, one sequence
    _core_class = AsyncJetStreamFeed
    _core: AsyncJetStreamFeed

    @property
    def stream(self) -> str:
        return self._core.stream

    @property
    def max_msgs(self) -> int:
        return self._core.max_msgs

    @property
    def _jsm(self) -> JetStreamManager:
        return self._core._jsm

    def position(self) -> str | None:
        try:
            return self._run(self._core.position())
        except ConfigurationError:
            raise
        except TimeoutError as exc:  # the backstop ran out
            raise stream_error(exc, self._core) from exc

    def _wrap(self, live: object) -> Subscription:
        assert isinstance(live, StreamSubscription)
        return _StreamSubscription(self, live)


class _StreamSubscription(_NatsSubscription):
    _live: StreamSubscription

    @property
    def stalls(self) -> int:
        """Heartbeats that found the consumer stalled on flow control (should stay 0)."""
        return self._live.stalls
