"""Endpoints, the executor contract and the Sentinel topology, on real servers.

The Sentinel tests use the small set of ``sentinels.py`` (a master and a replica per service,
three ``redis-server --sentinel``, down-after 1000 ms)."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.sentinel
from sentinels import SentinelSet, poll, sentinel_set

from syncmap import Lock, SyncMap
from syncmap.cli.doctor import run_checks
from syncmap.embedded import EmbeddedRedis
from syncmap.errors import StoreUnavailable
from syncmap.feed.base import FeedHandler
from syncmap.feed.redis_pubsub import RedisPubSubFeed
from syncmap.serverproc import HOST, free_port
from syncmap.store.endpoint import Endpoint, Tls
from syncmap.store.executor import evalsha
from syncmap.store.sentinel import SentinelTopology
from syncmap.store.topology import Standalone, open_topology
from syncmap.testing.certs import make_certs

# ---- endpoints ---------------------------------------------------------------------------------


def _round_trip(client: redis.Redis, expected: Endpoint) -> None:
    endpoint = Endpoint.from_client(client)
    assert endpoint == expected
    executor = Standalone(endpoint).executor()
    try:
        assert executor.call([("SET", "rt", "1"), ("GET", "rt")], write=True) == [b"OK", b"1"]
    finally:
        executor.close()


def test_from_client_tcp_round_trip(redis_server: EmbeddedRedis) -> None:
    client = redis.Redis(host=HOST, port=redis_server.port, db=2, socket_timeout=1.5)
    _round_trip(
        client, Endpoint(HOST, redis_server.port, db=2, socket_timeout=1.5, connect_timeout=5)
    )


def test_from_client_unix_round_trip(redis_binary: str, tmp_path: Path) -> None:
    sock = str(tmp_path / "r.sock")
    with EmbeddedRedis(binary=redis_binary, extra_args=["--unixsocket", sock]) as server:
        assert server.running
        client = redis.Redis(unix_socket_path=sock, db=1)
        # redis-py's Unix connections have no connect timeout of their own.
        _round_trip(client, Endpoint(path=sock, db=1, socket_timeout=5))
        url = open_topology(f"unix://{sock}?db=1", timeout=2.0).executor()
        assert url.call([("GET", "rt")], write=False) == [b"1"]


def test_from_client_tls_round_trip(redis_binary: str, tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates")
    make_certs(tmp_path)
    port = free_port()
    certs = {k: str(tmp_path / f) for k, f in
             (("ca", "ca.crt"), ("cert", "client.crt"), ("key", "client.key"))}  # fmt: skip
    server = EmbeddedRedis(binary=redis_binary, extra_args=[
        "--tls-port", str(port), "--tls-cert-file", str(tmp_path / "server.crt"),
        "--tls-key-file", str(tmp_path / "server.key"), "--tls-ca-cert-file", certs["ca"],
        "--tls-auth-clients", "yes"])  # fmt: skip
    try:
        server.start()
    except Exception as exc:
        pytest.skip(f"this redis-server has no TLS: {exc}")
    try:
        client = redis.Redis(host=HOST, port=port, ssl=True, ssl_ca_certs=certs["ca"],
                             ssl_certfile=certs["cert"], ssl_keyfile=certs["key"])  # fmt: skip
        tls = Tls(certs["ca"], certs["cert"], certs["key"])
        _round_trip(client, Endpoint(HOST, port, tls=tls, socket_timeout=5, connect_timeout=5))
        # Control: without the client certificate the same server refuses us.
        bare = Endpoint(HOST, port, tls=Tls(certs["ca"]), socket_timeout=2)
        with pytest.raises(StoreUnavailable):
            Standalone(bare).executor().call([("PING",)], write=False)
    finally:
        server.stop()


def test_from_client_refuses_decoded_responses(redis_server: EmbeddedRedis) -> None:
    from syncmap.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="decode_responses=False"):
        Endpoint.from_client(redis_server.client(decode_responses=True))


# ---- the executor contract -----------------------------------------------------------------


def test_replies_come_in_order(redis_server: EmbeddedRedis) -> None:
    executor = open_topology(redis_server.url, timeout=2.0).executor()
    commands = [("DEL", "o"), *[("RPUSH", "o", str(i)) for i in range(50)], ("LRANGE", "o", 0, -1)]
    replies = executor.call(commands, write=True)
    assert replies[1:51] == list(range(1, 51))
    assert replies[-1] == [str(i).encode() for i in range(50)]


def test_a_killed_server_is_store_unavailable_before_sending(redis_binary: str) -> None:
    server = EmbeddedRedis(binary=redis_binary).start()
    executor = open_topology(server.url, timeout=1.0).executor()
    assert executor.call([("SET", "k", "1")], write=True) == [b"OK"]  # an idle connection now
    server.kill()
    # The idle connection reads EOF at checkout: replaced before sending, so a write is
    # "nothing ran", not "may have run".
    with pytest.raises(StoreUnavailable, match="nothing was sent"):
        executor.call([("SET", "k", "2")], write=True)


def test_noscript_after_script_flush_is_handled(redis_server: EmbeddedRedis) -> None:
    executor = open_topology(redis_server.url, timeout=2.0).executor()
    admin = redis_server.client()
    admin.delete("nf")
    command = evalsha("fence_next", ("nf",))
    assert executor.call([("SCRIPT", "FLUSH")], write=False) == [b"OK"]
    first = executor.call([command], write=True)[0]
    admin.script_flush()
    # Control: the script really is gone for a client that does not handle NOSCRIPT.
    with pytest.raises(redis.exceptions.NoScriptError):
        admin.evalsha(command[1], 1, "nf")
    assert executor.call([command], write=True) == [first + 1]


def test_readonly_from_a_replica_is_store_unavailable(redis_binary: str) -> None:
    with EmbeddedRedis(binary=redis_binary) as master, EmbeddedRedis(
        binary=redis_binary, extra_args=["--replicaof", HOST, str(master.port)]
    ) as replica:  # fmt: skip
        executor = open_topology(replica.url, timeout=2.0).executor()
        with pytest.raises(StoreUnavailable, match=r"READONLY.*nothing ran"):
            executor.call([evalsha("fence_next", ("ro",))], write=True)
        # Control: the same refusal through redis-py is a plain error, not "nothing ran".
        with pytest.raises(redis.exceptions.ReadOnlyError):
            replica.client().set("ro", "1")


# ---- Sentinel ------------------------------------------------------------------------------


@pytest.fixture
def sentinels(redis_binary: str) -> Iterator[SentinelSet]:
    yield from sentinel_set(redis_binary)


def test_resolution_names_the_master_and_caps_the_timeout(sentinels: SentinelSet) -> None:
    topology = open_topology(sentinels.url(), timeout=5.0)
    try:
        assert isinstance(topology, SentinelTopology)
        master = topology.endpoint()
        assert master.port == sentinels.master_port()
        # down-after 1000 ms: no data connection waits longer than half of it.
        assert (topology.down_after, master.socket_timeout) == (1.0, 0.5)
        assert topology.executor().call([("SET", "a", "1")], write=True) == [b"OK"]
        assert sentinels.node(master.port).client().get("a") == b"1"
        # A user's redis-py Sentinel client names the same service: a Sentinel topology too.
        sentinel = redis.sentinel.Sentinel([(HOST, s.port) for s in sentinels.sentinels])
        theirs = open_topology(client=sentinel.master_for("mymaster"), timeout=5.0)
        assert isinstance(theirs, SentinelTopology) and theirs.endpoint().port == master.port
        checks, reached = run_checks(sentinels.url())
        line = next(c for c in checks if c.name == "topology")
        replica = next(n.port for n in sentinels.nodes["mymaster"] if n.port != master.port)
        assert reached and line.status == "OK", checks
        assert f"master {HOST}:{master.port}, replicas {HOST}:{replica}" in line.detail
        assert all(str(s.port) in line.detail for s in sentinels.sentinels), line.detail
        # Asynchronous replication by default: doctor says what a failover may lose, and the fix.
        durable = next(c for c in checks if c.name == "durability")
        assert durable.status == "WARN" and "min-replicas-to-write 1" in durable.hint, durable
        master_node = sentinels.node(master.port).client()
        master_node.config_set("min-replicas-to-write", 1)
        try:
            durable = next(c for c in run_checks(sentinels.url())[0] if c.name == "durability")
            assert durable.status == "OK" and "refuses writes" in durable.detail, durable
        finally:
            master_node.config_set("min-replicas-to-write", 0)
    finally:
        topology.close()


def test_no_sentinel_answering_is_store_unavailable_naming_them() -> None:
    ports = [free_port(), free_port()]
    url = f"redis+sentinel://{HOST}:{ports[0]},{HOST}:{ports[1]}/nowhere"
    topology = open_topology(url, timeout=1.0)
    with pytest.raises(StoreUnavailable, match=f"no sentinel named.*{ports[0]}.*{ports[1]}"):
        topology.executor().call([("PING",)], write=False)
    topology.close()


def test_an_unknown_service_is_store_unavailable(sentinels: SentinelSet) -> None:
    topology = open_topology(sentinels.url("nosuch"), timeout=1.0)
    with pytest.raises(StoreUnavailable, match="does not know 'nosuch'"):
        topology.endpoint()
    topology.close()


class Recorder(FeedHandler):
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.events: list[str] = []
        self.lock = threading.Lock()

    def on_message(self, payload: bytes, position: str | None) -> None:
        with self.lock:
            self.messages.append(payload)

    def on_up(self, resumed: bool) -> None:
        self.events.append("up")

    def on_down(self) -> None:
        self.events.append("down")


def test_a_failover_is_followed_by_executor_subscriber_and_lock(sentinels: SentinelSet) -> None:
    topology = open_topology(sentinels.url(), timeout=5.0)
    assert isinstance(topology, SentinelTopology)
    executor = topology.executor()
    feed = RedisPubSubFeed("redis (sentinel)", "fo:ch", timeout=2.0, topology=topology)
    handler = Recorder()
    sub = feed.subscribe(handler)
    try:
        poll("the first subscription", lambda: handler.events == ["up"])
        executor.call([("SET", "before", "1")], write=True)
        _old, new = sentinels.failover()
        # The watcher hears +switch-master and installs the new master.
        poll("the topology to follow", lambda: topology.master and topology.master.port == new)
        poll("the subscriber to reconnect", lambda: handler.events[-2:] == ["down", "up"])
        poll("a write to reach the new master",
             lambda: executor.call([("SET", "after", "2")], write=True))  # fmt: skip
        assert sentinels.node(new).client().get("after") == b"2"
        sentinels.node(new).client().publish("fo:ch", b"hello from the new master")
        poll("the message from the new master", lambda: handler.messages)
        lock = Lock("fo-lock", topology=topology, lease=5.0)
        lock.acquire(timeout=5)
        assert sentinels.node(new).client().exists(lock.layout.hold)
        lock.release()
    finally:
        sub.close()
        feed.close()
        topology.close()


def test_a_demoted_master_refusing_is_store_unavailable_then_the_new_one_serves(
    sentinels: SentinelSet,
) -> None:
    topology = open_topology(sentinels.url(), timeout=5.0)
    executor = topology.executor()
    executor.call([("SET", "x", "1")], write=True)
    old, new = sentinels.failover()
    # An executor pinned to the old master once it is a replica: READONLY, nothing ran.
    pinned = Standalone(Endpoint(HOST, old, socket_timeout=2.0)).executor()
    poll("the old master to be demoted",
         lambda: sentinels.node(old).client().execute_command("ROLE")[0] == b"slave")  # fmt: skip
    with pytest.raises(StoreUnavailable, match="READONLY"):
        pinned.call([("SET", "x", "stale")], write=True)
    poll("the sentinel topology's write",
         lambda: executor.call([("SET", "x", "2")], write=True) == [b"OK"])  # fmt: skip
    assert sentinels.node(new).client().get("x") == b"2"
    topology.close()


@pytest.fixture
def two_services(redis_binary: str) -> Iterator[SentinelSet]:
    yield from sentinel_set(redis_binary, "alpha", "beta")


def test_two_sentinel_services_in_one_process(two_services: SentinelSet) -> None:
    a_url, b_url = two_services.url("alpha"), two_services.url("beta")
    with SyncMap("m", a_url) as a1, SyncMap("m", a_url) as a2, SyncMap("m", b_url) as b1:
        a1["k"] = "alpha"
        b1["k"] = "beta"
        poll("alpha's write at its other map", lambda: a2.get("k") == "alpha")
        assert b1["k"] == "beta"
        assert two_services.node(two_services.master_port("beta"), "beta").client().exists(
            "sm:{m}:meta"
        )  # fmt: skip
