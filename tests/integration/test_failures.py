"""Failures are loud: unreachable store, unknown write outcomes, a restarted Redis, ACL refusals."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from syncmap import MapConfig, StoreUnavailable, SyncMap, WriteOutcomeUnknown
from syncmap.embedded import EmbeddedRedis, free_port
from syncmap.errors import ConfigurationError
from syncmap.testing.proxy import FaultProxy
from syncmap.testing.wait import wait_until

FAST = MapConfig(socket_timeout=0.5, self_check_timeout=2.0)


@pytest.fixture
def proxy(redis_server: EmbeddedRedis) -> Iterator[FaultProxy]:
    with FaultProxy(redis_server.host, redis_server.port) as p:
        yield p


def test_unreachable_server_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match=r"cannot reach redis 127\.0\.0\.1:\d+/0"):
        SyncMap("m", f"redis://127.0.0.1:{free_port()}/0", config=FAST)


def test_reads_and_writes_fail_loudly_when_redis_dies(redis_server: EmbeddedRedis) -> None:
    with SyncMap("m", redis_server.url, config=FAST) as m:
        m["cached"] = 1
        redis_server.kill()
        with pytest.raises(StoreUnavailable):
            m["x"] = 1
        with pytest.raises(StoreUnavailable):
            m.get("uncached")


def test_lost_reply_raises_write_outcome_unknown_and_drops_the_key(
    redis_server: EmbeddedRedis, proxy: FaultProxy
) -> None:
    with SyncMap("m", proxy.url, config=FAST, feed=redis_server.url) as m:
        m["k"] = "old"
        assert m.peek("k") is not None
        proxy.blackhole("downstream")  # the write reaches Redis; its reply never comes back
        with pytest.raises(WriteOutcomeUnknown, match="may or may not"):
            m["k"] = "new"
        assert m.peek("k") is None  # the next read must fetch the truth
        proxy.heal()
        proxy.close_all()
        assert m.get("k", consistent=True) == "new"  # it did apply


def test_map_survives_a_redis_restart(redis_server: EmbeddedRedis) -> None:
    """Restart without persistence: data gone, a new epoch; the near cache must not keep it."""
    with SyncMap("m", redis_server.url, config=FAST) as m:
        m["k"] = 1
        assert m.peek("k") is not None
        redis_server.kill()
        redis_server.restart()
        # Reconnect-and-repair (or at worst the lease) drops the entry within max_staleness.
        took = wait_until(lambda: m.peek("k") is None, 5, "dropping the pre-restart value")
        assert took <= FAST.max_staleness + 0.1
        assert m.get("k") is None
        m["k"] = 2  # writes work again after reconnecting
        assert m["k"] == 2


def test_acl_refusal_is_a_configuration_error(redis_server: EmbeddedRedis) -> None:
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+@connection")
    admin.close()
    url = f"redis://reader:pw@{redis_server.host}:{redis_server.port}/0"
    with pytest.raises(ConfigurationError, match=r"NOPERM|refused a command"):
        SyncMap("m", url, config=FAST)


def test_wrong_password_is_a_configuration_error(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary, password="secret") as server:
        url = f"redis://:wrong@{server.host}:{server.port}/0"
        with pytest.raises(ConfigurationError, match="credentials"):
            SyncMap("m", url, config=FAST)
        with SyncMap("m", server.url, config=FAST) as m:  # the right one works
            m["x"] = 1
            assert m.get("x", consistent=True) == 1


def test_decode_responses_client_is_refused(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    with pytest.raises(ConfigurationError, match="decode_responses"):
        SyncMap("m", redis=client)
    client.close()


def test_oom_refusal_is_store_unavailable_not_a_generic_error(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    """redis-py strips the OOM code from the text (found by the S02 helper): map it anyway."""
    with SyncMap("oom", redis_server.url) as m:
        admin.config_set("maxmemory", 1)
        try:
            with pytest.raises(StoreUnavailable, match="OOM"):
                m["k"] = "v"
        finally:
            admin.config_set("maxmemory", 0)
        assert "k" not in m  # nothing ran


@pytest.mark.filterwarnings("ignore:Call to .__init__. function with deprecated usage")
def test_a_loading_server_refusal_is_store_unavailable_not_an_unknown_outcome() -> None:
    """A -LOADING reply means Redis ran nothing; redis-py raises it as a ConnectionError, which
    must not be mistaken for a connection lost after the write was sent.  A minimal peer that
    answers every command with -LOADING stands in for a server loading a large data set."""
    import socket
    import threading

    from syncmap.store.topology import open_topology

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(65536):
                conn.sendall(b"-LOADING Redis is loading the dataset in memory\r\n")

    threading.Thread(target=serve, daemon=True).start()
    # No CLIENT SETINFO on connect: the peer would refuse it too, before our command.
    client = redis.Redis(port=port, protocol=2, lib_name=None, lib_version=None, socket_timeout=2)
    try:
        with pytest.raises(StoreUnavailable, match="loading its data set"):
            open_topology(client=client).executor(timeout=2.0).call([("SET", "k", "v")], write=True)
    finally:
        listener.close()
