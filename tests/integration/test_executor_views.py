"""A view of an executor (``within(deadline)``, a Cluster map's probes: issue 16 goal 1): the
executor's connections, each of the view's calls bounded by the view's shorter deadline, and
every connection left as the executor's own calls need it.

The executor here has no call deadline (a map's default): its calls wait up to the socket
timeout (5 s) for each reply.  ``BLPOP`` on a list nobody pushes to is a reply that comes
``BLOCK`` s later, after a view's deadline (``SHORT``) and well within the socket timeout.  A
connection a view made or sent on must still wait that long for the executor's next call; one
a view's deadline cut short must be closed, not kept with the reply still to come.  The
controls make connections for the view's deadline (as a probe executor of its own did), leave
the socket's timeout at a view's (never put back), or keep the connection a view made on an
older redis-py, and the executor's next call must then fail."""

from __future__ import annotations

import time
from typing import Any

import pytest
from redis.connection import Connection

from syncmap.errors import WriteOutcomeUnknown
from syncmap.store import node
from syncmap.store.anode import AsyncNodeExecutor
from syncmap.store.node import NodeExecutor
from syncmap.store.topology import open_topology

SOCKET, SHORT, BLOCK = 5.0, 0.2, 0.5
PING = [("PING",)]
LONG_REPLY = [("BLPOP", "views:nobody-pushes", BLOCK)]  # nil, BLOCK s later
CUT_SHORT = [("BLPOP", "views:nobody-pushes", 1)]  # nil, after a view's deadline


def _executor(url: str) -> NodeExecutor:
    return NodeExecutor(open_topology(url, timeout=SOCKET), timeout=SOCKET)


def _async_executor(url: str) -> AsyncNodeExecutor:
    return AsyncNodeExecutor(open_topology(url, timeout=SOCKET), timeout=SOCKET)


def _timeout_never_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: a shorter socket timeout, once set, stays (``-1`` puts nothing back)."""
    original = Connection.update_current_socket_timeout

    def set_only(self: Connection, relaxed: float | None = None) -> None:
        if relaxed != -1:
            original(self, relaxed)

    monkeypatch.setattr(Connection, "update_current_socket_timeout", set_only)


@pytest.mark.parametrize("first", ["view", "executor"])
def test_after_a_views_call_the_executors_call_waits_its_full_timeout(
    shared_redis_url: str, first: str
) -> None:
    """``view``: the view makes the connection (its handshake within the view's deadline);
    ``executor``: the executor made it and the view sends on it (within its deadline)."""
    ex = _executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        (ex if first == "executor" else view).call(PING, write=False)
        assert view.call(PING, write=False) == [b"PONG"]
        assert len(ex._idle) == 1  # one connection, the executor's and the view's
        assert ex.call(LONG_REPLY, write=True) == [None]
        assert len(ex._idle) == 1
    finally:
        ex.close()


@pytest.mark.parametrize("first", ["view", "executor"])
def test_control_a_timeout_never_put_back_fails_the_executors_next_call(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    _timeout_never_put_back(monkeypatch)
    ex = _executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        (ex if first == "executor" else view).call(PING, write=False)
        view.call(PING, write=False)
        with pytest.raises(WriteOutcomeUnknown):
            ex.call(LONG_REPLY, write=True)
    finally:
        ex.close()


def test_control_connections_made_for_the_views_deadline_fail_the_executors_next_call(
    shared_redis_url: str,
) -> None:
    ex = _executor(shared_redis_url)
    view = ex.within(SHORT)
    view._pool_deadline = SHORT  # as a probe executor of its own made them
    try:
        view.call(PING, write=False)
        with pytest.raises(WriteOutcomeUnknown):
            ex.call(LONG_REPLY, write=True)
    finally:
        ex.close()


def test_a_view_cut_short_by_its_deadline_closes_the_connection(shared_redis_url: str) -> None:
    ex = _executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        ex.call(PING, write=False)
        begun = time.monotonic()
        with pytest.raises(WriteOutcomeUnknown):
            view.call(CUT_SHORT, write=True)
        took = time.monotonic() - begun
        assert took < SHORT + 0.2, f"the view waited {took:.3f} s (deadline {SHORT} s)"
        assert ex._idle == []  # closed: its BLPOP reply is still to come
        assert ex.call(PING, write=False) == [b"PONG"]  # a new connection, not BLPOP's nil
    finally:
        ex.close()


def test_a_views_close_leaves_the_executors_connections(shared_redis_url: str) -> None:
    ex = _executor(shared_redis_url)
    try:
        ex.within(SHORT).call(PING, write=False)
        ex.within(SHORT).close()
        assert len(ex._idle) == 1
    finally:
        ex.close()
    assert ex._idle == []


def test_older_redis_py_a_views_new_connection_serves_its_call_alone(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``update_current_socket_timeout`` the view's shortened handshake timeout would
    stay the connection's: it is closed after the view's call."""
    monkeypatch.setattr(node, "RETIMEABLE", False)
    ex = _executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        assert view.call(PING, write=False) == [b"PONG"]
        assert ex._idle == []
        assert ex.call(LONG_REPLY, write=True) == [None]  # its own connection, full timeout
        assert view.call(PING, write=False) == [b"PONG"]  # and the view may use that one
        assert len(ex._idle) == 1
    finally:
        ex.close()


def test_control_older_redis_py_keeping_the_views_connection_fails_the_next_call(
    shared_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node, "RETIMEABLE", False)

    def keep(self: NodeExecutor, conn: Any, generation: int) -> None:
        self._idle.append((conn, self.topology.generation, time.monotonic()))

    monkeypatch.setattr(NodeExecutor, "_release", keep)
    ex = _executor(shared_redis_url)
    try:
        ex.within(SHORT).call(PING, write=False)
        with pytest.raises(WriteOutcomeUnknown):
            ex.call(LONG_REPLY, write=True)
    finally:
        ex.close()


# ---- the asyncio executor: the same, its waits bounded by asyncio.timeout -------------------


@pytest.mark.parametrize("first", ["view", "executor"])
async def test_async_after_a_views_call_the_executors_call_waits_its_full_timeout(
    shared_redis_url: str, first: str
) -> None:
    ex = _async_executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        await (ex if first == "executor" else view).call(PING, write=False)
        assert await view.call(PING, write=False) == [b"PONG"]
        assert len(ex._idle) == 1
        assert await ex.call(LONG_REPLY, write=True) == [None]
    finally:
        await ex.aclose()


async def test_async_control_connections_made_for_the_views_deadline_fail_the_next_call(
    shared_redis_url: str,
) -> None:
    ex = _async_executor(shared_redis_url)
    view = ex.within(SHORT)
    view._pool_deadline = SHORT
    try:
        await view.call(PING, write=False)
        with pytest.raises(WriteOutcomeUnknown):
            await ex.call(LONG_REPLY, write=True)
    finally:
        await ex.aclose()


async def test_async_a_view_cut_short_by_its_deadline_closes_the_connection(
    shared_redis_url: str,
) -> None:
    ex = _async_executor(shared_redis_url)
    view = ex.within(SHORT)
    try:
        await ex.call(PING, write=False)
        begun = time.monotonic()
        with pytest.raises(WriteOutcomeUnknown):
            await view.call(CUT_SHORT, write=True)
        assert time.monotonic() - begun < SHORT + 0.2
        assert ex._idle == []
        assert await ex.call(PING, write=False) == [b"PONG"]
        await view.aclose()
        assert len(ex._idle) == 1  # a view's aclose leaves the executor's connections
    finally:
        await ex.aclose()
