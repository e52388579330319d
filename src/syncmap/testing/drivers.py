"""Driving a ``syncmap.aio`` map from sync code: an event loop on a thread of its own.

Two users: the behaviour table shared by both drivers (``tests/integration/test_drivers.py``),
and the async variant of S01 (``scenarios_async``), whose recorder threads drive an async server
exactly as they drive a sync one.  The async map lives entirely on the loop: every call is a
coroutine submitted with ``run_coroutine_threadsafe`` and waited for, so concurrent callers
become concurrent tasks on one loop (what a FastAPI worker does with its requests); no caller
thread ever touches the map's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from ..aio import SyncMap as AioMap
from ..aio import aclose_loop_resources
from ..config import MapConfig
from ..core.nearcache import COPY
from ..keys import Entries, Key, encode_key, normal_key
from ..map import SyncMap
from ..stats import Statistics
from .loopguard import SLOW_CALLBACK, SlowCallbackLog, guard, start_measuring, stop_measuring

T = TypeVar("T")
CALL_TIMEOUT = 60.0
"""Seconds a call may take before the caller gives up (a hung loop fails, it does not hang)."""
GIL_SWITCH_S = 0.0005


class LoopThread:
    """An event loop running on a daemon thread; :meth:`run` a coroutine on it and wait.

    ``debug=True``: asyncio's debug mode with ``threshold`` as its slow-callback duration, and
    :meth:`slow_callbacks` lists the warnings that name syncmap code and were *blocked* that
    long (wall time less CPU, run-queue and other threads' GC time: ``loopguard``'s measure;
    the tests fail on any).  While it runs, the interpreter's GIL switch interval is 0.5 ms
    instead of 5: the caller's thread (and a sync map's threads) hold the GIL between calls,
    and a loop step waiting 5 ms for it would be reported as a step that blocked the loop,
    which it did not do.  A step that really blocks (a sync socket read, a sleep) takes its
    time whatever the interval."""

    def __init__(self, name: str = "syncmap-loop-thread", *, debug: bool = False,
                 threshold: float = SLOW_CALLBACK) -> None:  # fmt: skip
        self.name = name
        self.threshold = threshold
        self.loop = asyncio.new_event_loop()
        self._log: SlowCallbackLog | None = None
        self._switch = sys.getswitchinterval()
        if debug:
            guard(self.loop, threshold)
            sys.setswitchinterval(GIL_SWITCH_S)
            self._log = SlowCallbackLog().install()
            start_measuring()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """The coroutine's result (or its exception), run as a task of the loop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.done():  # the coroutine's own TimeoutError (LockNotAcquired is one)
                raise
            future.cancel()
            raise TimeoutError(f"a call on {self.name} took more than {timeout} s") from None

    def slow_callbacks(self) -> list[str]:
        """asyncio's slow-callback warnings naming syncmap code, so far (debug mode only)."""
        return self._log.syncmap(self.threshold) if self._log is not None else []

    def close(self) -> list[str]:
        """Close the loop's shared lock resources, cancel what is still running, stop the
        loop; returns the names of the tasks that were still running (a leak when every map
        and lock was closed first)."""
        if self.loop.is_closed():
            return []
        leftover = self.run(_finish(aclose_loop_resources()))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        if self._log is not None:
            stop_measuring()
            self._log.remove()
            sys.setswitchinterval(self._switch)
        return leftover


async def _finish(closing: Coroutine[Any, Any, None]) -> list[str]:
    await closing
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()
    return [t.get_name() for t in tasks]


def cached_entry(m: AioMap, key: Key) -> tuple[Any, int] | None:
    """(value, version) in ``m``'s near cache, valid or not, as ``syncmap.SyncMap.peek``; call
    it on ``m``'s loop.  No I/O."""
    encode_key(key, m.config.max_key_bytes)  # refuses a bad key with KeyTypeError
    e = m._core.cached_entry(normal_key(key))
    if e is None:
        return None
    value = e.value if e.value is not COPY else m._codec.decode(e.raw)  # type: ignore[arg-type]
    return value, e.version


async def _on_loop(fn: Callable[[], T]) -> T:
    return fn()


class ThreadedAioMap:
    """A ``syncmap.aio.SyncMap`` opened on ``loop``, with ``syncmap.SyncMap``'s method names:
    each call runs the map's coroutine on the loop and waits for it."""

    def __init__(self, loop: LoopThread, name: str, url: str | None = None,
                 **options: Any) -> None:  # fmt: skip
        self._loop = loop
        self.map = loop.run(AioMap(name, url, **options).open())

    @property
    def node_id(self) -> str:
        return self.map.node_id

    def get(self, key: Key, default: Any = None, *, consistent: bool = False) -> Any:
        return self._loop.run(self.map.get(key, default, consistent=consistent))

    def get_with_meta(self, key: Key, *, consistent: bool = False) -> tuple[Any, int, str]:
        return self._loop.run(self.map.get_with_meta(key, consistent=consistent))

    def peek(self, key: Key) -> tuple[Any, int] | None:
        return self._loop.run(_on_loop(lambda: cached_entry(self.map, key)))

    def set(self, key: Key, value: Any, **kw: Any) -> int:
        return self._loop.run(self.map.set(key, value, **kw))

    def swap(self, key: Key, value: Any, default: Any = None, **kw: Any) -> Any:
        return self._loop.run(self.map.swap(key, value, default, **kw))

    def setdefault(self, key: Key, default: Any = None, **kw: Any) -> Any:
        return self._loop.run(self.map.setdefault(key, default, **kw))

    def compare_and_set(self, key: Key, expected: Any, new: Any, **kw: Any) -> bool:
        return self._loop.run(self.map.compare_and_set(key, expected, new, **kw))

    def compare_and_delete(self, key: Key, expected: Any, **kw: Any) -> bool:
        return self._loop.run(self.map.compare_and_delete(key, expected, **kw))

    def pop(self, key: Key, *default: Any, **kw: Any) -> Any:
        return self._loop.run(self.map.pop(key, *default, **kw))

    def delete(self, key: Key, **kw: Any) -> bool:
        return self._loop.run(self.map.delete(key, **kw))

    def transform(self, key: Key, fn: Callable[[Any], Any], *default: Any, **kw: Any) -> Any:
        return self._loop.run(self.map.transform(key, fn, *default, **kw))

    def update(self, other: Entries = (), /,
               **kw: Any) -> None:  # fmt: skip
        self._loop.run(self.map.update(other, **kw))

    def clear(self, **kw: Any) -> None:
        self._loop.run(self.map.clear(**kw))

    def items(self, **kw: Any) -> list[tuple[Key, Any]]:
        return self._loop.run(self.map.items(**kw))

    def __len__(self) -> int:
        return self._loop.run(self.map.len())

    def __contains__(self, key: Key) -> bool:
        return self._loop.run(self.map.contains(key))

    def statistics(self) -> Statistics:
        return self._loop.run(_on_loop(self.map.statistics))

    def close(self) -> None:
        self._loop.run(self.map.aclose())


AnyMap = SyncMap | ThreadedAioMap


@contextlib.contextmanager
def mixed_maps(url: str, name: str, count: int, config: MapConfig,
               drivers: Sequence[str] = ()) -> Iterator[list[AnyMap]]:  # fmt: skip
    """``count`` servers of map ``name`` (node ids ``<name>-n<i>``), server ``i`` of driver
    ``drivers[i % len(drivers)]`` (``"sync"`` or ``"async"``; empty: all sync).  The async ones
    share one loop thread; everything is closed on exit."""
    loop: LoopThread | None = None
    maps: list[AnyMap] = []
    try:
        for i in range(count):
            node = f"{name}-n{i}"
            if drivers and drivers[i % len(drivers)] == "async":
                loop = loop or LoopThread(f"syncmap-{name}-loop")
                maps.append(ThreadedAioMap(loop, name, url, config=config, node_id=node))
            else:
                maps.append(SyncMap(name, url, config=config, node_id=node))
        yield maps
    finally:
        for m in maps:
            m.close()
        if loop is not None:
            loop.close()


__all__ = ["CALL_TIMEOUT", "AnyMap", "LoopThread", "ThreadedAioMap", "cached_entry", "mixed_maps"]
