"""The asyncio twin of the feed seam (``feed/base.py``): the same few methods, awaited.

A handler's callbacks (``FeedHandler``: ``on_message``, ``on_up``, ``on_down``) are plain
functions called on the event loop: they apply a message to the near cache under its guard and
return at once (no I/O, no await), exactly as the thread driver's feed threads call them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from .base import FeedHandler, redact, refuse_start


class AsyncSubscription(ABC):
    """What ``subscribe`` returns; ``aclose`` stops delivery to its handler."""

    @abstractmethod
    async def aclose(self) -> None: ...


class AsyncFeed(ABC):
    """One topic on one broker, on the running event loop."""

    scheme: ClassVar[str]
    durable: ClassVar[bool] = False
    compacted: ClassVar[bool] = False
    ordering: ClassVar[str] = "per-publisher"
    extra: ClassVar[str] = ""  # the pip extra of the client library (for error messages)

    @classmethod
    def topic_for(cls, namespace: str, name: str) -> str:
        """The topic of map ``name``: the same as the thread feed of the same scheme's."""
        return f"{namespace}.{name}"

    def __init__(self, url: str, topic: str, *, timeout: float = 5.0) -> None:
        self.url, self.topic, self.timeout = url, topic, timeout

    @abstractmethod
    async def publish(self, payload: bytes, key: bytes | None = None, *,
                      confirm: bool = True) -> None: ...  # fmt: skip

    @abstractmethod
    async def subscribe(self, handler: FeedHandler, start: str | None = None
                        ) -> AsyncSubscription: ...  # fmt: skip

    async def position(self) -> str | None:
        """The newest message's position (durable feeds); ``None`` for a feed that keeps nothing."""
        return None

    @abstractmethod
    async def aclose(self) -> None: ...

    def _no_start(self, start: str | None) -> None:
        refuse_start(self.scheme, self.durable, start)

    def describe(self) -> str:
        return redact(self.url)
