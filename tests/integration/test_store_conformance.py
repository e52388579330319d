"""The store conformance suite (``syncmap.testing.storeconformance``) on a real redis-server and on
the memory store: the same checks must pass on both, so the memory model that the model test
(tests/unit/test_core_model.py) runs the real flows against behaves as the Lua scripts do."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.errors import StoreUnavailable, SyncMapError, WriteOutcomeUnknown
from syncmap.store.executor import Executor
from syncmap.store.memory import MemoryExecutor, MemoryStore
from syncmap.store.memscripts import Refusal
from syncmap.store.node import NodeExecutor
from syncmap.store.scripts import SHAS
from syncmap.store.topology import open_topology
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.storeconformance import CHECKS, Inbox, StoreKit

WAIT = 5.0


def _redis_kit(server: EmbeddedRedis, admin: redis.Redis) -> Iterator[StoreKit]:
    """A real redis-server, reached through a FaultProxy (``down``, ``cut``)."""
    opened: list[NodeExecutor] = []
    subs: list[redis.client.PubSub] = []
    proxy = FaultProxy(server.host, server.port).start()

    def executor() -> NodeExecutor:
        client = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=WAIT)
        opened.append(open_topology(client=client).executor())
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

    def cut(ex: Executor, every: bool) -> None:
        # The reply is cut at its first byte: Redis has run the request by then.
        proxy.limit_data(0, "downstream", future=every)

    yield StoreKit("redis", executor, subscribe, advance, proxy.refuse, proxy.heal, cut)
    for pubsub in subs:
        pubsub.close()
    for t in opened:
        t.close()
    proxy.close()


def _memory_kit(
    store_type: type[MemoryStore] = MemoryStore,
    executor_type: type[MemoryExecutor] = MemoryExecutor,
) -> StoreKit:
    # The memory store's clock follows the wall clock (plus what ``advance`` adds), because the
    # flows convert TTL deadlines with time.time() and the offset the probe measures.
    offset = [0]
    store = store_type(lambda: int(time.time() * 1000) + offset[0])
    link = _Link()

    def executor() -> MemoryExecutor:
        ex = _linked(executor_type)(store)
        ex.link = link
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

    def cut(ex: Executor, every: bool) -> None:
        assert isinstance(ex, MemoryExecutor)
        ex.fail_next(WriteOutcomeUnknown)
        link.cut = every

    def up() -> None:
        link.down = link.cut = False

    return StoreKit("memory", executor, subscribe, advance, link.go_down, up, cut)


class _Link:
    """The memory kit's network: down (nothing reaches the store) or cutting every reply."""

    down = False
    cut = False

    def go_down(self) -> None:
        self.down = True


def _linked(base: type[MemoryExecutor]) -> type[MemoryExecutor]:
    """``base`` with the kit's link in front: each call's attempts fail as the link says (two
    faults armed: a read is retried once)."""

    class Linked(base):  # type: ignore[valid-type,misc]
        link: _Link

        def call(self, commands, *, write, partial=False):  # type: ignore[no-untyped-def]
            fault = StoreUnavailable if self.link.down else WriteOutcomeUnknown
            armed = self.link.down or self.link.cut
            if armed:
                self.fail_next(fault, times=2)
            try:
                return super().call(commands, write=write, partial=partial)
            finally:
                if armed:  # a write meets one of the two: the other must not outlive the call
                    self.clear_faults()

    return Linked


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


# ---- guard-off controls: the suite must catch a broken memory model ---------------------------

_SCRIPT_OF = {sha.encode(): name for name, sha in SHAS.items()}


class _BrokenStore(MemoryStore):
    """The memory store with one planted bug (``bug``), each a way the model could drift from
    the Lua scripts."""

    bug = ""

    def _cmd_evalsha(self, sha: bytes, numkeys: bytes, *rest: bytes) -> Any:
        n, name = int(numkeys), _SCRIPT_OF.get(sha)
        if self.bug == "ver_ignores_epoch":  # as if ARGV[8] switched the epoch compare off
            rest = (*rest[: n + 7], rest[n + 7] + b"v", *rest[n + 8 :])
        reply = super()._cmd_evalsha(sha, numkeys, *rest)
        relayed = rest[n] == b"" and isinstance(reply, list)
        if self.bug == "relay_without_messages" and relayed:
            return [reply[0], []]
        if self.bug == "clear_drops_seq" and name == "clear" and not isinstance(reply, Refusal):
            self.hdel(rest[0], b"#s")
        return reply

    def zrangebyscore(self, key: bytes, top: int, limit: int | None) -> list[bytes]:
        if self.bug == "probe_does_not_reap" and limit is not None:  # the probe's reaping call
            return []
        return super().zrangebyscore(key, top, limit)


class _ResendsLostWrites(MemoryExecutor):
    def call(self, commands, *, write, partial=False):  # type: ignore[no-untyped-def]
        try:
            return super().call(commands, write=write, partial=partial)
        except WriteOutcomeUnknown:  # as redis-py's own retries would
            return super().call(commands, write=write, partial=partial)


class _NoReadRetry(MemoryExecutor):
    def call(self, commands, *, write, partial=False):  # type: ignore[no-untyped-def]
        if not write and self._faults:
            self._faults.pop(0)
            raise StoreUnavailable("a read failed (not retried)")
        return super().call(commands, write=write, partial=partial)


class _RunsThenUnavailable(MemoryExecutor):
    def call(self, commands, *, write, partial=False):  # type: ignore[no-untyped-def]
        if self._faults and self._faults[0] is StoreUnavailable:
            self._run(commands)  # "nothing ran", yet it did
        return super().call(commands, write=write, partial=partial)


def _broken(bug: str) -> type[MemoryStore]:
    return type(f"Store_{bug}", (_BrokenStore,), {"bug": bug})


BROKEN = {
    "ver_ignores_epoch": (_broken("ver_ignores_epoch"), MemoryExecutor),
    "relay_without_messages": (_broken("relay_without_messages"), MemoryExecutor),
    "clear_drops_seq": (_broken("clear_drops_seq"), MemoryExecutor),
    "probe_does_not_reap": (_broken("probe_does_not_reap"), MemoryExecutor),
    "resends_lost_writes": (MemoryStore, _ResendsLostWrites),
    "read_not_retried": (MemoryStore, _NoReadRetry),
    "unavailable_after_running": (MemoryStore, _RunsThenUnavailable),
}


@pytest.mark.parametrize("bug", sorted(BROKEN))
def test_suite_catches_a_broken_memory_model(bug: str) -> None:
    """Guard-off control: each planted bug makes at least one check fail (and the same checks
    pass on the unbroken model: test_store_conformance[memory-*])."""
    store_type, executor_type = BROKEN[bug]
    failed = {}
    for name, check in CHECKS.items():
        try:
            check(_memory_kit(store_type, executor_type))
        except (AssertionError, SyncMapError) as exc:
            failed[name] = exc
    assert failed, f"no conformance check noticed the planted bug {bug!r}"
