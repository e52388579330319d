"""The pure half of the Cluster stream route (``feed/bucketlog.py``, ``ChannelSet``'s hold):
when a bucket's log covers what a cut subscriber missed, and the order its messages are applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from syncmap.core.nearcache import NearCache
from syncmap.core.wire import OP_SET, ChangeMessage, decode_message, encode_message
from syncmap.errors import ConfigurationError
from syncmap.feed.base import FeedHandler
from syncmap.feed.bucketlog import MAX_REPLAY, PAGE, Scan, cluster_stream_maxlen, replay_flow
from syncmap.feed.redis_sharded import ChannelSet
from syncmap.flows.effects import Call
from syncmap.keys import Layout, encode_key

EPOCH = 77


def _msg(seq: int, keys: int = 1, epoch: int = EPOCH) -> bytes:
    fields = tuple(encode_key(f"k{seq}.{i}", 1024) for i in range(keys))
    return encode_message(ChangeMessage(OP_SET, 3, seq, epoch, "w", fields))


def _entries(*messages: bytes) -> list[Any]:
    """An ``XREVRANGE`` page: newest first."""
    return [[f"{i}-0".encode(), [b"m", m]] for i, m in reversed(list(enumerate(messages, 1)))]


def _verdict(cached: tuple[int | None, int], store: tuple[int | None, int], *log: bytes) -> Any:
    scan = Scan(cached, store)
    assert scan.add(_entries(*log)) is None  # a short page: the walk ends there
    return scan.verdict()


def test_entries_past_the_cached_sequence_are_replayed_oldest_first() -> None:
    v = _verdict((EPOCH, 2), (EPOCH, 5), _msg(1), _msg(2), _msg(3), _msg(4, keys=2))
    assert v.covered
    assert [decode_message(m).seq for m in v.messages] == [3, 4]


def test_a_log_trimmed_past_the_cached_sequence_does_not_cover() -> None:
    v = _verdict((EPOCH, 2), (EPOCH, 6), _msg(4), _msg(5), _msg(6))
    assert (v.covered, v.why) == (False, "trimmed")


def test_a_hole_another_epoch_or_a_short_log_does_not_cover() -> None:
    assert _verdict((EPOCH, 1), (EPOCH, 4), _msg(2), _msg(4)).why == "a hole"
    assert _verdict((EPOCH, 1), (EPOCH + 1, 2), _msg(1, epoch=EPOCH + 1)).why == "another epoch"
    assert _verdict((EPOCH, 1), (EPOCH, 4), _msg(2), _msg(3)).why.startswith("the log lacks")
    assert _verdict((EPOCH, 5), (EPOCH, 3), _msg(3)).why == "the store went backwards"
    assert not _verdict((EPOCH, 1), (EPOCH, 3)).covered  # an empty (or missing) log


def test_a_bucket_never_written_is_covered_from_its_first_write() -> None:
    assert _verdict((None, 0), (EPOCH, 2), _msg(1), _msg(2)).covered
    assert not _verdict((None, 0), (EPOCH, 3), _msg(2), _msg(3)).covered


def test_an_unreadable_entry_or_too_long_a_gap_does_not_cover() -> None:
    scan = Scan((EPOCH, 0), (EPOCH, 1))
    scan.add([[b"1-0", [b"x", b"y"]]])
    assert scan.verdict().why == "an unreadable entry"
    scan = Scan((EPOCH, 0), (EPOCH, MAX_REPLAY + 1))
    page = _entries(*(_msg(s) for s in range(1, MAX_REPLAY + 2)))
    assert scan.add(page) is None and scan.verdict().why == "too long"


def test_the_flow_reads_pages_until_the_cached_sequence() -> None:
    layout = Layout("sm", "m", 16)
    log = [_msg(s) for s in range(1, PAGE + 11)]  # more than a page
    flow = replay_flow(layout, 3, (EPOCH, 5))
    first = next(flow)
    assert isinstance(first, Call) and first.commands[0][0] == "HMGET"
    page1 = _entries(*log)[:PAGE]
    second = flow.send([[str(EPOCH).encode(), str(len(log)).encode()], page1])
    assert second.commands[0][:3] == (
        "XREVRANGE",
        layout.bucket_log(3),
        f"({page1[-1][0].decode()}",
    )
    with pytest.raises(StopIteration) as stop:
        flow.send([_entries(*log)[PAGE:]])
    verdict = stop.value.value
    assert verdict.covered and decode_message(verdict.messages[0]).seq == 6


def test_a_bucket_whose_store_state_is_the_cached_one_has_nothing_to_replay() -> None:
    flow = replay_flow(Layout("sm", "m", 16), 3, (EPOCH, 4))
    next(flow)
    with pytest.raises(StopIteration) as stop:
        flow.send([[str(EPOCH).encode(), b"4"], []])
    assert stop.value.value.covered and stop.value.value.messages == []


def test_the_near_cache_ignores_a_replayed_message_it_already_applied() -> None:
    core = NearCache(16)
    core.on_probe([(EPOCH, 0)] * 16, 0.0, 0.0)
    for seq in (1, 2):
        core.on_message(decode_message(_msg(seq)), 0.0)
    before = (core.buckets[3].seq, core.counters.gaps, core.counters.resyncs)
    for seq in (1, 2):  # replayed and live overlap
        core.on_message(decode_message(_msg(seq)), 0.0)
    assert (core.buckets[3].seq, core.counters.gaps, core.counters.resyncs) == before


def test_a_host_less_stream_url_names_the_stores_cluster() -> None:
    def nodes() -> list[str]:
        return ["10.0.0.1:7000", "10.0.0.2:7001"]

    assert cluster_stream_maxlen("redis+stream://?maxlen=50", nodes) == 50
    assert cluster_stream_maxlen("redis+stream://", nodes) == 100_000
    assert cluster_stream_maxlen("redis+stream://elsewhere:6379", nodes) is None  # relayed
    assert cluster_stream_maxlen("redis://", nodes) is None
    with pytest.raises(ConfigurationError, match="without a host"):
        cluster_stream_maxlen("redis+stream://10.0.0.2:7001", nodes)


# ---- ChannelSet: live messages held while a replay runs ----------------------------------------


class _Map:
    def __init__(self) -> None:
        self.applied: list[bytes] = []
        self.ups: list[list[int]] = []
        self.replays: list[tuple[int, Callable[[bool], None]]] = []
        self.handler = FeedHandler(
            lambda data, _pos: self.applied.append(data), on_buckets_up=self.ups.append,
            position_of=lambda bucket: (EPOCH, 0),
        )  # fmt: skip

    def replay(self, bucket: int, handler: FeedHandler, done: Callable[[bool], None]) -> None:
        self.replays.append((bucket, done))  # done later, as the asyncio driver's task does


def test_live_messages_wait_for_the_replay_then_follow_it_in_order() -> None:
    m = _Map()
    cs = ChannelSet(["c0", "c1"], m.handler, m.replay)
    (_, h0), (_, h1) = cs.handlers()
    h0.on_up()
    h1.on_up()  # the first subscription: replays asked, nothing known yet
    for _, done in m.replays:
        done(False)
    assert m.ups == [[0, 1]]
    m.replays.clear()
    h0.on_down()
    h0.on_up()  # back: its replay is in flight
    h0.on_message(b"live-2")
    h1.on_message(b"other")  # another channel is not held
    assert m.applied == [b"other"]
    assert m.replays[0][0] == 0
    done = m.replays[0][1]
    m.handler.on_message(b"log-1", None)  # the replay applies its entries, then says done
    done(True)
    assert m.applied == [b"other", b"log-1", b"live-2"]
    assert m.ups[-1] == []  # covered: no bucket left to flush


def test_a_replay_that_outlives_its_subscription_changes_nothing() -> None:
    m = _Map()
    cs = ChannelSet(["c0"], m.handler, m.replay)
    ((_, h0),) = cs.handlers()
    h0.on_up()
    m.replays.pop()[1](False)
    h0.on_down()
    h0.on_up()
    h0.on_message(b"live")
    stale_done = m.replays.pop()[1]
    h0.on_down()  # lost again: the held message is delivered, the replay is void
    assert m.applied == [b"live"]
    stale_done(True)
    h0.on_up()
    m.replays.pop()[1](False)
    assert m.ups[-1] == [0]  # still lost: flushed by the probe, as without a log
