"""The placement rules of ``syncmap.feed.shards`` fed exact orders of events, with in-process
nodes that record what the core asks of them (the core is pure; the real readers and a real
Cluster are tests/integration/test_sharded_subscriber.py).  Each guard has its control."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from syncmap.feed import shards
from syncmap.feed.pubsub import Handler
from syncmap.feed.shards import Channel, ShardedCore
from syncmap.testing.handlerlog import HandlerLog

GUARDED = pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "control"])


class Node:
    """A node reader as the core sees it: it records attach and release."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.handlers: dict[str, list[Handler]] = {}
        self.unsubscribed: list[str] = []

    def attach(self, channel: str, handler: Handler) -> None:
        self.handlers.setdefault(channel, []).append(handler)

    def release(self, channel: str, handler: Handler, *, unsubscribe: bool = True) -> bool:
        self.handlers[channel].remove(handler)
        if unsubscribe:
            self.unsubscribed.append(channel)
        return not any(self.handlers.values())


class Core(ShardedCore[Node]):
    def __init__(self) -> None:
        super().__init__(None, threading.Lock())  # type: ignore[arg-type]  # no I/O here
        self.wakes = 0

    def _open_node(self, address: str) -> Node:
        return Node(address)

    def _wake(self) -> None:
        self.wakes += 1

    def place(self, name: str, address: str) -> Channel:
        """What the mover's round does for one channel, given its owner."""
        _idle, complete = self._rehome({self._channels[name].slot: address})
        assert complete
        return self._channels[name]

    def confirm(self, chan: Channel) -> Handler:
        """The node reader's part of a confirmation: mark its handler up, call its on_up."""
        inner = chan.inner
        assert inner is not None
        inner.up = True
        inner.on_up()
        return inner


@GUARDED
def test_a_late_confirmation_of_an_old_placement_says_nothing(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SSUBSCRIBE on A -> moved to B -> A's confirmation arrives: no on_up until B confirms.
    Control: without the placement check the map hears on_up for a subscription not made."""
    if not guarded:
        monkeypatch.setattr(ShardedCore, "_speaks", staticmethod(lambda c, i: True))
    core, e = Core(), HandlerLog()
    core._add("ch", e.handler)
    on_a = core.place("ch", "a:1")
    old = on_a.inner
    assert old is not None
    core.place("ch", "b:2")  # the owner changed before A answered
    old.up = True
    old.on_up()  # A's late confirmation
    if guarded:
        assert e.log == [] and not e.handler.up
        core.confirm(core._channels["ch"])
        assert e.log == ["up"]
    else:
        assert e.log == ["up"], "control: told up while B has not confirmed"


@GUARDED
def test_callbacks_reach_a_map_in_the_order_they_were_decided(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node B's reader decides on_up and runs it; before the map's on_up records anything, the
    mover moves the channel away and decides on_down.  The map must hear up, then down: the
    mover leaves its on_down to the thread that is running callbacks.  Control: with each
    thread running its own callbacks at once, the map hears down, then up, and stays "up"
    while the core has taken the channel down."""

    def no_queue(self: Core, batch: Any = None) -> None:
        with self._lock:
            mine, self._queue = (batch or []) + self._queue, []
        for fn, args in mine:
            fn(*args)

    if not guarded:
        monkeypatch.setattr(ShardedCore, "_drain", no_queue)
    core, e = Core(), HandlerLog()
    entered, release = threading.Event(), threading.Event()
    record_up = e.handler.on_up

    def slow_up() -> None:
        entered.set()
        release.wait(5)
        record_up()

    e.handler.on_up = slow_up
    core._add("ch", e.handler)
    chan = core.place("ch", "b:2")
    reader = threading.Thread(target=core.confirm, args=(chan,))
    reader.start()
    assert entered.wait(5)
    core.place("ch", "c:3")  # the mover: B no longer owns the slot
    release.set()
    reader.join(5)
    if guarded:
        assert e.log == ["up", "down"] and not e.handler.up
    else:
        assert e.log == ["down", "up"], "control: the map heard up last"


@GUARDED
def test_our_own_sunsubscribe_answer_is_not_taken_for_redis_dropping_the_channel(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A confirmed channel on A leaves and comes back to A (SUNSUBSCRIBE, then SSUBSCRIBE):
    the answer ``sunsubscribe`` arrives before the new confirmation and is ours, so nothing
    happens.  Once confirmed, a ``sunsubscribe`` is Redis's: on_down, off the node, a round
    asked for.  Control: taking every ``sunsubscribe`` for Redis's takes the channel down
    again on its own answer."""
    if not guarded:
        monkeypatch.setattr(
            ShardedCore, "_dropped_by_redis", staticmethod(lambda c, a: c.address == a)
        )
    core, e = Core(), HandlerLog()
    core._add("ch", e.handler)
    chan = core.place("ch", "a:1")
    core.confirm(chan)
    core._take_off(chan, unsubscribe=True)  # as a move does
    core._put_on(chan, "a:1")  # ... back on the same node
    node = core._nodes["a:1"]
    assert node.unsubscribed == ["ch"]
    wakes = core.wakes
    core.node_unsubscribed("a:1", b"ch")  # the answer to that SUNSUBSCRIBE
    if not guarded:
        assert chan.address is None, "control: taken off by its own answer"
        return
    assert chan.address == "a:1" and core.wakes == wakes
    core.confirm(chan)
    assert e.log == ["up", "down", "up"]
    core.node_unsubscribed("a:1", b"ch")  # now Redis's: the slot went elsewhere
    assert e.log == ["up", "down", "up", "down"] and chan.address is None
    assert core.wakes == wakes + 1 and core._pending.invalidate
    assert node.unsubscribed == ["ch"], "no SUNSUBSCRIBE for what Redis dropped"


@GUARDED
def test_a_slot_map_naming_the_node_that_dropped_a_channel_is_doubted(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLUSTER FAILOVER: the demoted master pushes ``sunsubscribe``, and the slot map read next
    (from a node that has not heard yet) still names it.  The channel waits for a map naming
    another owner (the round asks for a retry) and goes there.  Control: believing that map
    puts the channel back on the demoted node, a replica that accepts it, for good."""
    if not guarded:
        monkeypatch.setattr(shards, "MAX_DOUBTS", 0)
    core, e = Core(), HandlerLog()
    core._add("ch", e.handler)
    chan = core.place("ch", "a:1")
    core.confirm(chan)
    core.node_unsubscribed("a:1", b"ch")  # demoted: Redis's own push
    _idle, complete = core._rehome({chan.slot: "a:1"})  # an old slot map
    if not guarded:
        assert complete and chan.address == "a:1", "control: back on the demoted node"
        return
    assert not complete and chan.address is None
    core.place("ch", "b:2")  # a later round's map names the new master
    core.confirm(chan)
    assert e.log == ["up", "down", "up"] and chan.address == "b:2"
    core.confirm(chan)
    core.node_unsubscribed("b:2", b"ch")  # b drops it too, and every later map names b
    rounds = [core._rehome({chan.slot: "b:2"})[1] for _ in range(shards.MAX_DOUBTS + 1)]
    assert rounds == [False] * shards.MAX_DOUBTS + [True], "believed in the end: it may own it"
    assert chan.address == "b:2"


@GUARDED
def test_a_reader_runs_its_own_messages_instead_of_leaving_them_to_another_nodes_reader(
    guarded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A's reader is running a map's callback (its message, on the process's busy
    queue) when node B's reader hands the core a message.  B's reader must wait for its turn
    and run its message itself: left to A's reader, it is run there, and on a busy process A's
    reader goes on running B's and C's messages, batch after batch, without reading its own
    socket (S25-atomic: a node's messages late by 300-500 ms, its buckets restarted though
    nothing was lost).  Control: B's reader leaves its message to A's (the old ``_drain``)."""
    if not guarded:
        monkeypatch.setattr(ShardedCore, "_take_turn", lambda self: self._drain())
    core = Core()
    ran: list[tuple[bytes, str]] = []  # (message, the thread that ran its callback), in order
    entered, release = threading.Event(), threading.Event()

    def message(data: bytes) -> None:
        if data == b"a1":
            entered.set()
            release.wait(5)  # a map's callback that takes a while
        ran.append((data, threading.current_thread().name))

    def quiet() -> None:
        pass

    chans = {}
    for name, address in (("a", "a:1"), ("b", "b:2")):
        core._add(name, Handler(message, quiet, quiet))
        chans[name] = core.place(name, address)
        core.confirm(chans[name])
    a_inner, b_inner = chans["a"].inner, chans["b"].inner
    assert a_inner is not None and b_inner is not None
    reader_a = threading.Thread(target=a_inner.on_message, args=(b"a1",), name="reader-a")
    reader_b = threading.Thread(target=b_inner.on_message, args=(b"b1",), name="reader-b")
    reader_a.start()
    assert entered.wait(5)
    reader_b.start()
    if guarded:  # B's reader waits for A's batch (a condition with a deadline, no sleep)
        deadline = time.monotonic() + 5
        while core._waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert core._waiting == 1
    else:
        reader_b.join(5)
        assert not reader_b.is_alive(), "control: B's reader left its message and returned"
    release.set()
    reader_a.join(5)
    reader_b.join(5)
    assert not reader_a.is_alive() and not reader_b.is_alive()
    if guarded:
        assert ran == [(b"a1", "reader-a"), (b"b1", "reader-b")]
    else:
        assert ran == [(b"a1", "reader-a"), (b"b1", "reader-a")], "control: A's reader ran it"
    assert not core._draining and core._waiting == 0


def test_callbacks_queued_from_a_callback_run_after_it_on_the_same_thread() -> None:
    """A map that attaches from a callback queues an ``on_up`` while this thread is draining:
    it must not wait for itself (a deadlock), and the ``on_up`` runs right after."""
    core = Core()
    log: list[str] = []
    late = HandlerLog()

    def message(data: bytes) -> None:
        log.append("message")
        core._added(core._add("a", late.handler))  # "a" is confirmed: on_up at once, queued

    def quiet() -> None:
        pass

    core._add("a", Handler(message, quiet, quiet))
    chan = core.place("a", "a:1")
    core.confirm(chan)
    assert chan.inner is not None
    late.handler.on_up = lambda: log.append("up")
    core._queue.append((lambda: log.append("queued"), ()))  # another reader's, not yet run
    chan.inner.on_message(b"m")  # busy (a queue): this reader takes its turn, runs it all
    assert log == ["queued", "message", "up"]
    assert not core._draining and not core._queue
