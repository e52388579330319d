"""Server-side fault helpers against a real redis-server."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.testing import client_kill, client_pause, flushall, set_pubsub_output_limit


def _pubsub_clients(admin: redis.Redis) -> int:
    return len(admin.client_list(_type="pubsub"))


def test_client_kill_pubsub_disconnects_subscribers(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    subscriber = redis_server.client(retry=None)
    normal = redis_server.client(retry=None)
    assert normal.ping()
    sub = subscriber.pubsub()  # type: ignore[no-untyped-call]
    sub.subscribe("ch")
    assert sub.get_message(timeout=1.0) is not None
    assert _pubsub_clients(admin) == 1

    assert client_kill(admin, "pubsub") == 1
    assert _pubsub_clients(admin) == 0
    with pytest.raises(redis.ConnectionError):
        sub.get_message(timeout=1.0)
    assert normal.ping()  # only subscribers were killed
    sub.close()
    subscriber.close()
    normal.close()


def test_client_kill_normal_skips_me(redis_server: EmbeddedRedis, admin: redis.Redis) -> None:
    # One pinned connection: a pooled client would quietly swap a dead connection for a new one.
    other = redis_server.client(retry=None, single_connection_client=True)
    assert other.ping()
    assert client_kill(admin, "normal") == 1
    assert admin.ping()
    with pytest.raises(redis.ConnectionError):
        other.ping()
    other.close()


def test_client_pause_write_blocks_set_but_not_get(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    reader = redis_server.client(retry=None)
    writer = redis_server.client(retry=None)
    reader.set("k", "v")
    assert writer.ping()
    set_done = threading.Event()

    def do_set() -> None:
        writer.set("k", "w")
        set_done.set()

    client_pause(admin, 400, "WRITE")
    start = time.monotonic()
    thread = threading.Thread(target=do_set)
    thread.start()
    assert reader.get("k") == b"v"  # reads are served during a WRITE pause
    assert not set_done.is_set()
    thread.join(5)
    assert set_done.is_set()
    assert time.monotonic() - start >= 0.35
    assert reader.get("k") == b"w"
    reader.close()
    writer.close()


def test_client_pause_all_blocks_reads_too(redis_server: EmbeddedRedis, admin: redis.Redis) -> None:
    reader = redis_server.client(retry=None)
    assert reader.ping()
    client_pause(admin, 300, "ALL")
    start = time.monotonic()
    reader.get("k")
    assert time.monotonic() - start >= 0.25
    reader.close()


def test_pubsub_output_limit_drops_slow_subscriber(
    redis_server: EmbeddedRedis, admin: redis.Redis
) -> None:
    set_pubsub_output_limit(admin, 1024 * 1024, 512 * 1024, 60)
    limits = str(admin.config_get("client-output-buffer-limit")["client-output-buffer-limit"])
    assert "pubsub 1048576 524288 60" in limits
    # A raw subscriber with a tiny receive buffer that never reads: Redis must buffer the rest.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((redis_server.host, redis_server.port))
        sock.sendall(b"SUBSCRIBE ch\r\n")
        assert b"subscribe" in sock.recv(100)
        payload = b"x" * 1024 * 1024
        for _ in range(100):
            admin.publish("ch", payload)
            if _pubsub_clients(admin) == 0:
                break
        assert _pubsub_clients(admin) == 0


def test_flushall_empties_every_database(redis_server: EmbeddedRedis, admin: redis.Redis) -> None:
    db1 = redis_server.client(db=1)
    admin.set("a", 1)
    db1.set("b", 1)
    flushall(admin)
    assert admin.dbsize() == 0
    assert db1.dbsize() == 0
    db1.close()
