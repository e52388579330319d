"""``syncmap.aio.ReplicatedMap``: replicated mode (no store) for asyncio services — a driver only.

Every decision is :class:`~syncmap.replicalogic.ReplicaLogic`'s, shared with the thread map
(``syncmap.ReplicatedMap``): how a message is verified and merged, what a write, a ping, a sync
request or answer carries, where a starting map's past comes from.  This module waits and
publishes, on the loop: the asyncio feed (``feed/aregistry.py``) calls the logic's handlers on
the loop, a worker task sends the sync requests and answers, and start-up awaits what the thread
map blocks on.  As ``syncmap.aio.SyncMap``: no I/O in the constructor (``await
ReplicatedMap(...)``, ``async with``, or ``await m.open()``), coroutines for every operation, and
:meth:`get_cached` for a read without an ``await`` (every read here is from memory anyway).

Start-up, in this order (the thread map's, see ``replicated.py``): subscribe (from the oldest
message on a durable feed) -> the subscription confirmed -> a ping published comes back (on a log,
everything before it has been applied) -> the past from ``snapshot=`` when the feed could not
deliver it (``"peers"``, a mapping, or a function returning one, sync or async).

A write: the version is taken -> the message is published (confirmed by the broker) -> applied
here.  A write cancelled while publishing applies nothing here; if the broker had it after all,
it arrives from the feed like any peer's write.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Self

from ..codec import Codec
from ..config import MapConfig
from ..core.nearcache import Event
from ..core.replica import ReplicaMessage
from ..errors import FeedError, MapClosed
from ..feed.abase import AsyncFeed, AsyncSubscription
from ..feed.aregistry import async_feed_class
from ..feed.base import BEGINNING, FeedHandler, redact
from ..flows.reads import MISSING
from ..keys import Entries, Key
from ..replicafeed import SYNC_ATTEMPTS
from ..replicalogic import (
    Outgoing,
    Refusing,
    ReplicaLogic,
    Snapshot,
    Work,
    deadline_of,
    log,
)
from ..signing import SigningKey
from ..storeonly import AsyncStoreOnly, needs_store, no_fence
from .events import AsyncFanout, AsyncWatch

STOP_WAIT = 5.0
"""``aclose()`` waits this long for the worker's publish in flight, then cancels it."""

AsyncSnapshot = Snapshot | Callable[[], Awaitable[Mapping[Key, Any]]]


class ReplicatedMap(AsyncStoreOnly, ReplicaLogic):
    """A map every server holds whole, kept in step by a message feed, on asyncio: the names of
    :class:`syncmap.aio.SyncMap` as coroutines; what needs a store raises ``UnsupportedInMode``."""

    _up: asyncio.Event
    _synced: asyncio.Event

    def __init__(
        self,
        name: str,
        feed: str,
        *,
        codec: str | Codec | None = None,
        value_type: Any = None,
        config: MapConfig | None = None,
        node_id: str | None = None,
        snapshot: AsyncSnapshot | None = None,
        load_timeout: float = 60.0,
        peers_timeout: float = 2.0,
        signing_key: SigningKey = None,
    ) -> None:
        # syncmap.ReplicatedMap's parameters; nothing connects until open().
        self._init_logic(name, config, node_id, codec, value_type, signing_key)
        self._url = feed
        self._start_with = (snapshot, load_timeout, peers_timeout)
        self._slots = Refusing(
            f"replicated map {self.name!r} is not open yet: `await m.open()` or `async with`"
        )
        self._fanout: AsyncFanout = AsyncFanout(f"{self.name}.replicated")
        self._up = asyncio.Event()
        self._synced = asyncio.Event()
        self._stopping = asyncio.Event()
        self._work: asyncio.Queue[Work] = asyncio.Queue()
        self._feed: AsyncFeed | None = None
        self._sub: AsyncSubscription | None = None
        self._worker: asyncio.Task[None] | None = None
        self._opened = self._closed = False

    # ---- opening and closing -----------------------------------------------------------------

    async def open(self) -> Self:
        """Subscribe, catch up and load the past (module docstring).  A failure closes the map
        (as the thread map's constructor does): open a new one to retry."""
        if self._opened:
            return self
        self._check_not_closed()
        cfg = self.config
        topic = async_feed_class(self._url).topic_for(cfg.namespace, f"{self.name}.replicated")
        self._feed = async_feed_class(self._url)(self._url, topic, timeout=cfg.socket_timeout)
        self._worker = asyncio.get_running_loop().create_task(
            self._work_loop(), name="syncmap-replica"
        )
        try:
            await self._start(self._feed, *self._start_with)
        except BaseException:
            await self.aclose()
            raise
        self._slots = self._replica.slots  # reads are served from here on
        self._opened = True
        return self

    async def _start(self, feed: AsyncFeed, snapshot: AsyncSnapshot | None, load_timeout: float,
                     peers: float) -> None:  # fmt: skip
        cfg, durable = self.config, type(feed).durable
        handler = FeedHandler(self._on_message, self._on_up, self._on_down)
        self._sub = await feed.subscribe(handler, BEGINNING if durable else None)
        if not await _wait(self._up, cfg.self_check_timeout):
            raise FeedError(
                f"could not subscribe to {feed.topic} on {feed.describe()} within "
                f"{cfg.self_check_timeout} s; check the broker and the permissions"
            )
        await self._wait_for_ping(feed, load_timeout if durable else cfg.self_check_timeout)
        source = self._past_source(snapshot, durable, feed.describe())
        if source == "peers":
            await self._request_sync()
            if not await _wait(self._synced, peers):
                log.info("syncmap %s: no peer answered within %s s; starting from what the feed "
                         "delivers", self.name, peers)  # fmt: skip
        elif source == "snapshot":
            data: Any = snapshot() if callable(snapshot) else snapshot
            self._load(await data if inspect.isawaitable(data) else data)

    async def _wait_for_ping(self, feed: AsyncFeed, timeout: float) -> None:
        """Publish a ping and wait for it: the feed works, and (on a log) we have caught up."""
        arrived = asyncio.Event()
        nonce, ping = self._ping(arrived.set)
        try:
            await self._send(ping)
            if not await _wait(arrived, timeout):
                raise FeedError(
                    f"a test message published on {feed.topic} ({feed.describe()}) did not "
                    f"come back within {timeout} s: this server would never see other writes"
                )
        finally:
            self._pings.pop(nonce, None)

    def __await__(self) -> Generator[Any, None, Self]:
        return self.open().__await__()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the worker, the subscription and the feed; reads then raise ``MapClosed``.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._slots = Refusing(f"replicated map {self.name!r} is closed; open a new one")
        # Order: stop the worker (by flag and wake-up: a cancel can be lost on Python 3.11, see
        # aio/engine.py; one still publishing after STOP_WAIT is cancelled) -> no more
        # messages -> the events' task -> the feed's connections.
        self._stopping.set()
        self._work.put_nowait(None)
        worker, self._worker = self._worker, None
        if worker is not None:
            _, busy = await asyncio.wait([worker], timeout=STOP_WAIT)
            for task in busy:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.aclose()
        await self._fanout.stop()
        if self._feed is not None:
            await self._feed.aclose()

    # ---- the worker: sync requests and answers -----------------------------------------------

    async def _work_loop(self) -> None:
        while (item := await self._work.get()) is not None:
            what, peer = item
            if what == "answer":
                self._answer_taken(peer)
            # A broker that just came back may still refuse: retry with back-off (on the stop
            # flag, not a sleep), or this server (or the peer) stays behind (replicafeed.py).
            for attempt in range(SYNC_ATTEMPTS):
                try:
                    if what == "request":
                        await self._request_sync()
                    else:
                        await self._answer_sync(peer)
                    break
                except Exception as exc:
                    log.warning("syncmap %s: sync %s failed (%s); attempt %d of %d", self.name,
                                what, exc, attempt + 1, SYNC_ATTEMPTS)  # fmt: skip
                    if await _wait(self._stopping, min(0.05 * 2**attempt, 1.0)):
                        return

    async def _request_sync(self) -> None:
        self._synced.clear()
        await self._send(self._sync_request())

    async def _answer_sync(self, peer: str) -> None:
        for outgoing in self._sync_answer(peer):
            if self._stopping.is_set():
                return
            await self._send(outgoing)

    async def _send(self, outgoing: Outgoing) -> None:
        assert self._feed is not None
        data, key, confirm = outgoing
        await self._feed.publish(data, key=key, confirm=confirm)

    # ---- reads: from this server's memory, never any I/O -------------------------------------

    def get_cached(self, key: Key, default: Any = MISSING) -> Any:
        """The value of ``key`` (no ``await``: the whole map is in memory), or ``default``
        (``syncmap.aio.MISSING`` unless given) when it is absent."""
        slot = self._find(key)
        return default if slot is None else self._value_of(slot)

    async def get(self, key: Key, default: Any = None, *, consistent: bool = False) -> Any:
        """The value of ``key`` or ``default``; ``consistent=True`` raises
        :class:`UnsupportedInMode` (there is nothing to read through to)."""
        if consistent:
            raise needs_store("get(consistent=True) (a linearizable read)")
        return self.get_cached(key, default)

    async def get_with_meta(self, key: Key, *, consistent: bool = False
                            ) -> tuple[Any, int, str]:  # fmt: skip
        """(value or None, version or 0, ``"local"``), as ``syncmap.ReplicatedMap``'s."""
        if consistent:
            raise needs_store("get_with_meta(consistent=True) (a linearizable read)")
        slot = self._find(key)
        return (None, 0, "local") if slot is None else (self._value_of(slot), slot.version[0],
                                                         "local")  # fmt: skip

    async def contains(self, key: Key) -> bool:
        return self._find(key) is not None

    async def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain dict of every live entry (``skip_corrupt`` accepted: none is held)."""
        self._check_open()
        return self._live_copy()

    async def items(self, *, skip_corrupt: bool = False) -> list[tuple[Key, Any]]:
        return list((await self.copy()).items())

    async def keys(self, *, skip_corrupt: bool = False) -> list[Key]:
        self._check_open()
        return self._live_keys()

    async def values(self, *, skip_corrupt: bool = False) -> list[Any]:
        return list((await self.copy()).values())

    async def len(self) -> int:
        self._check_open()
        return len(self._live_keys())

    async def preload(self, *, limit: int | None = None, retries: int = 3) -> int:
        """Nothing to load (every server holds the whole map): 0 entries newly cached."""
        self._check_open()
        return 0

    # ---- writes: version -> publish (confirmed) -> applied here ------------------------------

    async def set(self, key: Key, value: Any, *, ttl: float | None = None,
                  fence: Any = None) -> int:  # fmt: skip
        """Store ``value``; returns its version (the write's hybrid-clock time), as
        :meth:`syncmap.ReplicatedMap.set`."""
        if fence is not None:
            raise no_fence("set")
        self._check_open()
        return await self._write(*self._set_draft(key, value, deadline_of(ttl)))

    async def delete(self, key: Key, *, fence: Any = None) -> bool:
        """Delete ``key`` everywhere; returns whether this server held it."""
        if fence is not None:
            raise no_fence("delete")
        self._check_open()
        present = self._find(key) is not None
        await self._write(self._delete_draft(key))
        return present

    async def pop(self, key: Key, default: Any = MISSING, *, fence: Any = None) -> Any:
        """A read, then a delete (not atomic here: two servers may both return the entry)."""
        if fence is not None:
            raise no_fence("pop")
        value = self.get_cached(key)
        if value is MISSING:
            if default is MISSING:
                raise KeyError(key)
            return default
        await self.delete(key)
        return value

    async def update(
        self, other: Entries = (), /, *,
        ttl: float | None = None, fence: Any = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        """One message per entry; every key and value is checked before the first is sent."""
        if fence is not None:
            raise no_fence("update")
        drafts = self._update_drafts(other, kwargs, ttl)
        self._check_open()
        for draft, value in drafts:
            await self._write(draft, value)

    async def clear(self, *, fence: Any = None) -> None:
        """Remove every entry written before this call, on every server."""
        if fence is not None:
            raise no_fence("clear")
        self._check_open()
        await self._write(self._clear_draft())

    async def _write(self, draft: ReplicaMessage, value: Any = None) -> int:
        msg, outgoing = self._stamp(draft)
        await self._send(outgoing)
        return self._applied_own(msg, value)

    # ---- events, statistics ------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], Awaitable[None] | None], *,
                  inline: bool = False) -> Callable[[], None]:  # fmt: skip
        """Call ``callback(event)`` (a function or a coroutine function) for every change
        applied here, in a task of its own; ``inline=True``: a quick sync function, called the
        moment the change is applied.  Returns an unsubscriber."""
        self._check_open()
        return self._fanout.subscribe(callback, inline)

    def watch(self, maxsize: int = 10_000) -> AsyncWatch:
        """``async for event in m.watch(): ...``: the changes from now until the map closes."""
        self._check_open()
        return self._fanout.watch(maxsize)

    def __repr__(self) -> str:
        state = "open" if self._opened and not self._closed else (
            "closed" if self._closed else "not open")  # fmt: skip
        return (f"<syncmap.aio.ReplicatedMap {self.name!r} on {self._where()}, "
                f"{self.statistics().entries} entries, {state}>")  # fmt: skip

    def _where(self) -> str:
        return self._feed.describe() if self._feed is not None else redact(self._url)

    def _check_not_closed(self) -> None:
        if self._closed:
            raise MapClosed(f"replicated map {self.name!r} is closed; open a new one")

    def _check_open(self) -> None:
        self._check_not_closed()
        if not self._opened:
            raise MapClosed(
                f"replicated map {self.name!r} is not open yet: `await m.open()` or `async with`"
            )


async def _wait(flag: asyncio.Event, seconds: float) -> bool:
    """Whether ``flag`` was set within ``seconds``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(seconds, 0.0)):
            await flag.wait()
    return flag.is_set()
