"""FaultProxy in front of a real redis-server: forwarding and each toxic."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.testing import FaultProxy


@pytest.fixture(scope="module")
def server(redis_binary: str) -> Iterator[EmbeddedRedis]:
    # No test here faults the server itself, so one process serves the whole module.
    with EmbeddedRedis(binary=redis_binary) as srv:
        yield srv


@pytest.fixture
def proxy(server: EmbeddedRedis) -> Iterator[FaultProxy]:
    with FaultProxy(server.host, server.port) as prx:
        yield prx


def _client(url: str, **kw: object) -> redis.Redis:
    # No retries: the tests want to see each failure, not redis-py's reconnect-and-retry.
    return redis.Redis.from_url(url, retry=None, **kw)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def test_forwards_traffic_and_counts(proxy: FaultProxy, server: EmbeddedRedis) -> None:
    client = _client(proxy.url)
    assert client.set("k", "v")
    assert client.get("k") == b"v"
    pipe = client.pipeline(transaction=False)
    for i in range(200):
        pipe.set(f"n{i}", i)
        pipe.get(f"n{i}")
    assert pipe.execute()[1::2] == [str(i).encode() for i in range(200)]
    assert proxy.connections == 1
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    counts = proxy.bytes_forwarded
    assert counts["upstream"] > 0
    assert counts["downstream"] > 0
    client.close()
    wait_for(lambda: proxy.connections == 0)


def test_latency_delays_replies_but_not_direct_pubsub(
    proxy: FaultProxy, server: EmbeddedRedis
) -> None:
    client = _client(proxy.url)
    client.set("k", "v")
    direct = server.client()
    sub = direct.pubsub()  # type: ignore[no-untyped-call]
    sub.subscribe("ch")
    assert sub.get_message(timeout=1.0) is not None  # the subscribe confirmation

    proxy.latency(200)
    start = time.monotonic()
    assert client.get("k") == b"v"
    assert time.monotonic() - start >= 0.2

    start = time.monotonic()
    direct.publish("ch", "hello")
    message = sub.get_message(timeout=1.0)
    assert message is not None
    assert message["data"] == b"hello"
    assert time.monotonic() - start < 0.2

    proxy.heal()
    start = time.monotonic()
    assert client.get("k") == b"v"
    assert time.monotonic() - start < 0.2
    sub.close()
    direct.close()
    client.close()


def test_latency_keeps_order_in_both_directions(proxy: FaultProxy) -> None:
    client = _client(proxy.url)
    client.ping()
    proxy.latency(50, "both")
    pipe = client.pipeline(transaction=False)
    for _ in range(100):
        pipe.incr("counter")
    start = time.monotonic()
    assert pipe.execute() == list(range(1, 101))
    assert time.monotonic() - start >= 0.1  # one trip each way
    client.close()


def test_stall_times_out_and_heal_lets_new_connections_work(proxy: FaultProxy) -> None:
    client = _client(proxy.url, socket_timeout=0.3)
    assert client.ping()
    proxy.stall()
    with pytest.raises(redis.TimeoutError):
        client.get("k")
    proxy.heal()
    fresh = _client(proxy.url, socket_timeout=1.0)
    assert fresh.ping()
    fresh.close()
    client.close()


def test_blackhole_swallows_commands(proxy: FaultProxy) -> None:
    client = _client(proxy.url, socket_timeout=0.3)
    assert client.ping()
    proxy.blackhole("upstream")
    with pytest.raises(redis.TimeoutError):
        client.ping()
    client.close()


def test_limit_data_cuts_a_reply_mid_frame(proxy: FaultProxy, server: EmbeddedRedis) -> None:
    direct = server.client()
    direct.set("big", b"x" * 100_000)
    client = _client(proxy.url)
    assert client.ping()
    before = proxy.bytes_forwarded["downstream"]
    proxy.limit_data(1000)
    with pytest.raises(redis.ConnectionError):
        client.get("big")
    assert proxy.bytes_forwarded["downstream"] - before == 1000
    proxy.heal()
    assert _client(proxy.url).get("big") == b"x" * 100_000
    direct.close()
    client.close()


def test_reset_all_breaks_the_next_command(proxy: FaultProxy) -> None:
    # One pinned connection: a pooled client would quietly swap a dead connection for a new one.
    client = _client(proxy.url, single_connection_client=True)
    assert client.ping()
    proxy.reset_all()
    assert proxy.connections == 0
    with pytest.raises(redis.ConnectionError):
        client.ping()
    assert client.ping()  # the next command reconnects through the healthy proxy
    client.close()


def test_close_all_sends_fin(proxy: FaultProxy) -> None:
    client = _client(proxy.url, single_connection_client=True)
    assert client.ping()
    proxy.close_all()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()


def test_upstream_down_closes_client_connections(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary) as srv, FaultProxy(srv.host, srv.port) as prx:
        srv.kill()
        with pytest.raises(redis.ConnectionError):
            _client(prx.url).ping()


def _subscribed(proxy: FaultProxy, command: str) -> redis.client.PubSub:
    sub = _client(proxy.url, socket_timeout=5).pubsub()
    getattr(sub, command)("chan")
    assert sub.get_message(timeout=5)["type"] == command  # confirmed: the proxy saw it
    return sub


@pytest.mark.parametrize("command", ["subscribe", "ssubscribe"])
def test_a_subscriber_stall_silences_subscribers_and_spares_the_data_path(
    proxy: FaultProxy, server: EmbeddedRedis, command: str
) -> None:
    sub = _subscribed(proxy, command)
    data = _client(proxy.url, socket_timeout=2)
    data.set("k", "v")  # a data connection open before the stall
    # A value holding the word does not make its connection a subscriber.
    data.set("trap", "*2\r\n$10\r\nSSUBSCRIBE\r\n")
    assert proxy.subscribers == 1 and proxy.connections == 2
    proxy.stall(only="subscribers")
    publish = server.client()
    publish.execute_command("SPUBLISH" if command == "ssubscribe" else "PUBLISH", "chan", "m1")
    assert data.get("k") == b"v"  # the data path still answers
    assert _client(proxy.url, socket_timeout=2).get("k") == b"v"  # and so does a new one
    assert sub.get_message(timeout=0.5) is None  # the subscriber hears nothing, no error
    late = _client(proxy.url, socket_timeout=5).pubsub()
    getattr(late, command)("chan")  # a new subscriber's subscription itself is held
    assert late.get_message(timeout=0.3) is None
    proxy.heal()
    assert sub.get_message(timeout=5)["data"] == b"m1"  # held, not lost
    assert late.get_message(timeout=5)["type"] == command
    for closable in (sub, late, data, publish):
        closable.close()


def test_latency_for_others_spares_subscribers(proxy: FaultProxy, server: EmbeddedRedis) -> None:
    sub = _subscribed(proxy, "subscribe")
    data = _client(proxy.url, socket_timeout=5)
    data.ping()
    proxy.latency(300, "downstream", only="others")
    publish = server.client()
    begun = time.monotonic()
    publish.publish("chan", "m1")
    assert sub.get_message(timeout=5)["data"] == b"m1"
    pushed = time.monotonic() - begun
    begun = time.monotonic()
    data.ping()
    replied = time.monotonic() - begun
    assert replied >= 0.3 > pushed, (replied, pushed)
    for closable in (sub, data, publish):
        closable.close()
