"""The shared subscriber survives what would otherwise silence every map in a process."""

from __future__ import annotations

import pytest
import redis

from syncmap import FeedError, MapConfig, SyncMap
from syncmap.core.wire import OP_SET, ChangeMessage, encode_message
from syncmap.embedded import EmbeddedRedis
from syncmap.feed.pubsub import PING_AFTER
from syncmap.testing.faults import client_kill
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.wait import wait_until

FAST = MapConfig(self_check_timeout=2.0, socket_timeout=1.0)


def event_arrives(m: SyncMap, writer: SyncMap, key: str, timeout: float = 5.0) -> bool:
    with m.watch() as events:
        version = writer.set(key, "x")
        while (event := events.get(timeout=timeout)) is not None:
            if event.key == key and event.version == version:
                return True
    return False


def test_a_malformed_message_is_counted_and_repaired_not_fatal(redis_server: EmbeddedRedis) -> None:
    with SyncMap("m", redis_server.url) as m, SyncMap("m", redis_server.url) as writer:
        bad = encode_message(ChangeMessage(OP_SET, 0, 99, 1, "attacker", (b"zzz",)))
        admin = redis_server.client()
        admin.publish("sm:{m}:ch", bad)
        admin.close()
        wait_until(lambda: m.statistics().corrupt_messages == 1, 5, "the bad message counted")
        assert event_arrives(m, writer, "after"), "the subscriber must keep delivering"
        with SyncMap("m", redis_server.url) as late:  # and new maps can still subscribe
            assert late.get("after", consistent=True) == "x"


def test_an_acl_refusing_one_channel_refuses_only_that_map(redis_server: EmbeddedRedis) -> None:
    admin = redis_server.client()
    admin.execute_command(
        "ACL", "SETUSER", "app", "on", ">pw", "~*", "resetchannels", "&sm:{ok}:ch", "+@all"
    )  # fmt: skip
    admin.close()
    url = f"redis://app:pw@{redis_server.host}:{redis_server.port}/0"
    with SyncMap("ok", url, config=FAST) as ok, SyncMap("ok", url, config=FAST) as writer:
        with pytest.raises(FeedError, match="could not subscribe"):
            SyncMap("denied", url, config=FAST)
        assert event_arrives(ok, writer, "k")


def test_more_than_a_pool_of_connection_replacements(redis_server: EmbeddedRedis) -> None:
    """redis-py's pool allows 100 connections; replacing dead ones must not count against it."""
    with SyncMap("m", redis_server.url) as m:
        admin = redis_server.client()
        for i in range(110):
            client_kill(admin, "normal")  # every idle data connection of the map dies
            m[f"k{i}"] = i
        client_kill(admin, "pubsub")
        admin.close()
        assert m.get("k109", consistent=True) == 109
        with SyncMap("m", redis_server.url) as writer:
            wait_until(lambda: event_arrives(m, writer, "again", 1.0), 10, "the feed recovering")


def test_a_half_open_feed_is_detected_by_ping(redis_server: EmbeddedRedis) -> None:
    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        with SyncMap("m", redis_server.url, feed=proxy.url) as m:
            before = proxy.total_connections
            proxy.blackhole("both")  # no FIN, no RST: the socket just goes quiet
            took = wait_until(lambda: proxy.total_connections > before, 3 * PING_AFTER + 2,
                              "a reconnect after unanswered PINGs")  # fmt: skip
            assert took >= PING_AFTER
            proxy.heal()
            with SyncMap("m", redis_server.url) as writer:
                wait_until(lambda: event_arrives(m, writer, "k", 1.0), 10, "events again")


def test_connect_refusals_are_configuration_errors(redis_server: EmbeddedRedis) -> None:
    from syncmap import ConfigurationError

    with pytest.raises(ConfigurationError, match="DB index is out of range"):
        SyncMap("m", f"redis://{redis_server.host}:{redis_server.port}/99", config=FAST)
    assert isinstance(redis.Redis, type)
