"""Hostile and corrupt input, end to end (issue 12 §3): whoever can PUBLISH on a map's channel, or
corrupt one entry in Redis, costs the servers bounded work and disables nothing beyond the bucket
or entry concerned.  Garbage is published with a raw client on a private test server."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from syncmap import MapConfig, SyncMap
from syncmap import events as events_module
from syncmap.core.nearcache import MAX_AHEAD, Event
from syncmap.core.wire import OP_SET, ChangeMessage, encode_message, pack_value
from syncmap.embedded import EmbeddedRedis
from syncmap.errors import CorruptData
from syncmap.keys import bucket_of, encode_key
from syncmap.testing.wait import wait_until

CHANNEL = "sm:{m}:ch"


def evalsha_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))


def flood(client: redis.Redis, channel: str, messages: list[bytes]) -> None:
    pipe = client.pipeline(transaction=False)
    for data in messages:
        pipe.publish(channel, data)
    pipe.execute()


def test_a_garbage_flood_costs_few_probes_and_few_log_lines(
    redis_server: EmbeddedRedis, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = MapConfig(buckets=4, max_staleness=4.0, presence=False)  # a probe every second
    n = 2000
    with SyncMap("m", redis_server.url, config=cfg) as m, caplog.at_level(logging.WARNING):
        before, started = evalsha_calls(raw), time.monotonic()
        flood(raw, CHANNEL, [b"garbage %d" % i for i in range(n)])
        wait_until(lambda: m.statistics().corrupt_messages == n, 20, "every message counted")
        wait_until(lambda: all(b.repair_from is None for b in m._core.buckets), 5,
                   "a probe repairing after them")  # fmt: skip
        elapsed = time.monotonic() - started
        probes = (evalsha_calls(raw) - before) / cfg.buckets
    # At most one repair probe per half probe interval, and the regular ones.
    allowed = 2 + 3 * elapsed / cfg.probe_interval
    print(f"\n{n} garbage messages in {elapsed:.2f} s: {probes:.0f} probes (allowed {allowed:.1f})")
    assert probes <= allowed
    lines = [r for r in caplog.records if "change message" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


def test_a_message_naming_many_keys_flushes_one_bucket_without_per_key_work(
    redis_server: EmbeddedRedis, raw: redis.Redis
) -> None:
    with SyncMap("m", redis_server.url) as m:
        m["k"], m["other"] = 1, 2
        wait_until(lambda: m.statistics().messages == 2, 5, "our own two messages back")
        bucket = bucket_of(encode_key("k", 100), 16)
        assert bucket_of(encode_key("other", 100), 16) != bucket
        seen: list[Event] = []
        m.subscribe(seen.append, inline=True)
        fields = tuple(b"s%d" % i for i in range(200_000))
        forged = encode_message(ChangeMessage(OP_SET, bucket, 10**6, 1, "attacker", fields))
        started = time.monotonic()
        raw.publish(CHANNEL, forged)
        wait_until(lambda: m.statistics().corrupt_messages == 1, 20, "the message counted")
        took = time.monotonic() - started
        print(f"\none {len(forged) / 1e6:.1f} MB message naming {len(fields)} keys: {took:.3f} s")
        assert seen == []
        assert m.peek("k") is None, "its bucket is flushed"
        assert m.peek("other") is not None, "other buckets keep their entries"
        assert m["k"] == 1


def test_the_subscribe_queue_is_bounded_and_counts_what_it_drops(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "EVENT_QUEUE_LIMIT", 50)
    with SyncMap("m", redis_server.url) as m, SyncMap("m", redis_server.url) as writer:
        release, got = threading.Event(), []

        def slow(event: Event) -> None:
            release.wait()
            got.append(event)

        m.subscribe(slow)
        writer.update({f"k{i}": i for i in range(500)})
        wait_until(lambda: m.statistics().events_dropped >= 449, 10, "the overflow counted")
        queued = m._engine.events._events
        assert queued is not None and queued.qsize() <= 50
        release.set()
        wait_until(lambda: len(got) + m.statistics().events_dropped == 500, 10, "the rest ran")


def test_a_slow_watch_drops_and_counts(redis_server: EmbeddedRedis) -> None:
    with SyncMap("m", redis_server.url) as m, SyncMap("m", redis_server.url) as writer:
        with m.watch(maxsize=10) as events:
            writer.update({f"k{i}": i for i in range(100)})
            wait_until(lambda: m.statistics().events_dropped == 90, 10, "the overflow counted")
            assert sum(1 for _ in iter(lambda: events.get(timeout=0), None)) == 10


def test_forged_far_ahead_sequences_on_a_relayed_feed_keep_bounded_state(
    redis_server: EmbeddedRedis, redis_binary: str
) -> None:
    feed_server = EmbeddedRedis(binary=redis_binary)  # another server: messages are relayed
    feed_server.start()
    try:
        with SyncMap("m", redis_server.url, feed=feed_server.url) as m:
            assert not m._core.ordered
            m["k"] = 1
            bucket = bucket_of(encode_key("k", 100), 16)
            epoch = m._core.buckets[bucket].epoch or 0
            forged = [
                encode_message(ChangeMessage(OP_SET, bucket, 10**12 + i, epoch, "x", (b"sz",)))
                for i in range(3 * MAX_AHEAD)
            ]
            client = feed_server.client()
            flood(client, m._engine.feed.topic, forged)
            client.close()
            wait_until(lambda: m.statistics().messages >= 3 * MAX_AHEAD, 20, "all applied")
            assert len(m._core.buckets[bucket].ahead) <= MAX_AHEAD
            assert m.statistics().gap_overflows >= 2
            assert m["k"] == 1
    finally:
        feed_server.stop()


def corrupt_map(url: str, raw: redis.Redis) -> SyncMap:
    """A map of 20 entries, 3 of them corrupt in Redis (short, undecodable, unknown key tag)."""
    m = SyncMap("m", url)
    m.update({f"k{i}": i for i in range(20)})

    def data(key: str) -> str:
        return f"sm:{{m:{bucket_of(encode_key(key, 100), 16)}}}:d"

    raw.hset(data("k3"), encode_key("k3", 100), b"\x00\x01")  # shorter than a header
    bad = pack_value(99, 0, b"\xc1", 1)  # 0xc1 is never valid MessagePack
    raw.hset(data("k4"), encode_key("k4", 100), bad)
    raw.hset("sm:{m:0}:d", b"?what", pack_value(99, 0, b"\x01", 1))  # no key starts with "?"
    return m


def test_items_names_a_corrupt_entry_or_skips_it_on_request(
    redis_server: EmbeddedRedis, raw: redis.Redis
) -> None:
    with corrupt_map(redis_server.url, raw) as m:
        with pytest.raises(CorruptData, match="skip_corrupt=True"):
            list(m.items())  # a view reads when used
        with pytest.raises(CorruptData):
            list(m)
        expected = {f"k{i}": i for i in range(20) if i not in (3, 4)}
        assert dict(m.items(skip_corrupt=True)) == expected
        assert len(m.keys(skip_corrupt=True)) == len(m.values(skip_corrupt=True)) == 18
        assert m.statistics().corrupt_entries == 9


def test_preload_skips_and_counts_corrupt_entries(
    redis_server: EmbeddedRedis, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with corrupt_map(redis_server.url, raw), SyncMap("m", redis_server.url) as fresh:
        with caplog.at_level(logging.WARNING):
            assert fresh.preload() == 18
            assert fresh.statistics().corrupt_entries == 3
            fresh.preload()  # counted again, not logged again
        assert len([r for r in caplog.records if "corrupt" in r.getMessage()]) == 1
        with pytest.raises(CorruptData):
            fresh["k4"]


def test_close_does_not_block_on_a_full_watch_queue(redis_server: EmbeddedRedis) -> None:
    m, writer = SyncMap("m", redis_server.url), SyncMap("m", redis_server.url)
    try:
        events = m.watch(maxsize=5)
        writer.update({f"k{i}": i for i in range(50)})
        wait_until(lambda: m.statistics().events_dropped == 45, 10, "the queue full")
        closer = threading.Thread(target=m.close, daemon=True)
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() blocked putting the end marker"
        assert sum(1 for _ in events) == 5  # then the end marker ends the iteration
    finally:
        m.close()
        writer.close()
