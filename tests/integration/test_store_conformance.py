"""The store conformance suite (``syncmap.testing.storeconformance``) on a real redis-server and on
the memory store: the same checks must pass on both, so the memory model that the model test
(tests/unit/test_core_model.py) runs the real flows against behaves as the Lua scripts do."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.errors import StoreUnavailable
from syncmap.store.memory import MemoryExecutor, MemoryStore
from syncmap.store.node import NodeExecutor
from syncmap.store.topology import open_topology
from syncmap.testing.storeconformance import CHECKS, Inbox, StoreKit

WAIT = 5.0


def _redis_kit(server: EmbeddedRedis, admin: redis.Redis) -> Iterator[StoreKit]:
    opened: list[NodeExecutor] = []
    subs: list[redis.client.PubSub] = []

    def executor() -> NodeExecutor:
        opened.append(open_topology(client=server.client()).executor())
        return opened[-1]

    def subscribe(channel: str) -> Inbox:
        pubsub = admin.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(channel)
        subs.append(pubsub)

        def take(n: int) -> list[bytes]:
            got: list[bytes] = []
            until = time.monotonic() + WAIT
            while len(got) < n and time.monotonic() < until:
                message = pubsub.get_message(timeout=0.1)
                if message is not None:
                    got.append(message["data"])
            assert len(got) == n, f"{n} messages published on {channel}, {len(got)} arrived"
            return got

        return take

    def advance(ms: int) -> None:
        # Wait until the server's own clock (the one TTL deadlines use) has moved on by ms.
        def server_ms() -> int:
            sec, usec = admin.time()
            return int(sec) * 1000 + int(usec) // 1000

        target = server_ms() + ms
        until = time.monotonic() + WAIT
        while server_ms() <= target:
            assert time.monotonic() < until, "the Redis clock did not advance"
            time.sleep(0.005)

    def up() -> None:
        server.restart()

    yield StoreKit("redis", executor, subscribe, advance, server.kill, up)
    for pubsub in subs:
        pubsub.close()
    for t in opened:
        t.close()


def _memory_kit() -> StoreKit:
    # The memory store's clock follows the wall clock (plus what ``advance`` adds), because the
    # flows convert TTL deadlines with time.time() and the offset the probe measures.
    offset = [0]
    store = MemoryStore(lambda: int(time.time() * 1000) + offset[0])
    executors: list[MemoryExecutor] = []
    down = [False]

    def executor() -> MemoryExecutor:
        ex = _DownableExecutor(store, down)
        executors.append(ex)
        return ex

    def subscribe(channel: str) -> Inbox:
        got: list[bytes] = []
        store.subscribe(channel, got.append)

        def take(n: int) -> list[bytes]:
            assert len(got) >= n, f"{n} messages published on {channel}, {len(got)} arrived"
            out = got[:n]
            del got[:n]
            return out

        return take

    def advance(ms: int) -> None:
        offset[0] += ms + 1

    def set_down(value: bool) -> Callable[[], None]:
        def switch() -> None:
            down[0] = value
            if not value:
                store.restart()  # as the real kit's up(): a restart without persistence

        return switch

    return StoreKit("memory", executor, subscribe, advance, set_down(True), set_down(False))


class _DownableExecutor(MemoryExecutor):
    """While the kit says the store is down, every call fails before sending (the executor's
    injected ``StoreUnavailable``, armed for each call)."""

    def __init__(self, store: MemoryStore, down: list[bool]) -> None:
        super().__init__(store)
        self._down = down

    def call(self, commands, *, write, partial=False):  # type: ignore[no-untyped-def]
        if self._down[0]:
            self.fail_next(StoreUnavailable)
        return super().call(commands, write=write, partial=partial)


@pytest.fixture(params=["redis", "memory"])
def kit(request: pytest.FixtureRequest) -> Iterator[StoreKit]:
    if request.param == "memory":
        yield _memory_kit()
        return
    server = request.getfixturevalue("redis_server")
    admin = request.getfixturevalue("admin")
    yield from _redis_kit(server, admin)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_store_conformance(kit: StoreKit, check: str) -> None:
    CHECKS[check](kit)
