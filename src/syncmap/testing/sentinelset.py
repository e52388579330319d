"""A Redis Sentinel deployment on loopback ports: a master, one replica and three Sentinels.

For tests, scenario S10 and ``syncmap demo --sentinel``.  Every process is a real ``redis-server``
(or ``valkey-server``; a Sentinel is the same binary run as ``<binary> <conf> --sentinel``) on a
free port, in a temp dir of its own (a Sentinel rewrites its config file, so it must be writable),
and is stopped by pid in :meth:`SentinelSet.close`, also when starting fails half-way.

Readiness is polled, never slept for: the replica's link is up, and every Sentinel knows the
replica and the other Sentinels (learnt from their hello messages, every 2 s), so that a failover
can be voted on from the start.

Failover as Sentinel does it (Redis 7): a Sentinel that has not heard from the master for
``down-after-milliseconds`` marks it subjectively down; once ``quorum`` Sentinels agree it is
objectively down, they elect a leader (a majority of all Sentinels must vote), which promotes the
replica (``REPLICAOF NO ONE``) and announces the new master.  A failed master that comes back is
turned into a replica of the new one, but only some seconds later (Sentinel waits for its next
INFO round): until then it answers as a master to whoever is still connected to it.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections import Counter
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import redis
from redis.sentinel import Sentinel

from ..embedded import EmbeddedRedis, find_redis_server
from ..errors import ConfigurationError, RedisServerNotFound
from ..serverproc import HOST, ServerProcess

SERVICE = "syncmap"
Addr = tuple[str, int]
_PROBE: dict[str, Any] = {
    "socket_timeout": 0.5,
    "socket_connect_timeout": 0.5,
}  # one question to one node


class SentinelModeUnavailable(RedisServerNotFound):
    """The server binary cannot run as a Sentinel (``--sentinel``): use one that can."""


class SentinelProcess(ServerProcess):
    """One Sentinel: ``<binary> <dir>/sentinel.conf --sentinel`` on a free loopback port.

    ``monitor=None`` starts a Sentinel that watches nothing (to find out if the binary can run as
    one at all, :func:`sentinel_mode_available`)."""

    name = "redis-sentinel"
    _dir_prefix = "syncmap-sentinel-"
    _log_name = "sentinel.log"
    _clash = "Address already in use"

    def __init__(self, monitor: list[str] | None = None, *, binary: str | None = None) -> None:
        super().__init__(binary=binary)
        self._monitor = monitor or []

    @property
    def addr(self) -> Addr:
        return (HOST, self.port)

    @property
    def conf_path(self) -> Path:
        return self.dir / "sentinel.conf"

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, **(_PROBE | kw))

    def _find_binary(self) -> str:
        return find_redis_server(self._binary)

    def _command(self, binary: str) -> list[str]:
        # Written once: on a restart the file holds what this Sentinel learnt (it rewrites it).
        # The port is on the command line, so a retry on another port needs no new file.
        if not self.conf_path.exists():
            self.conf_path.write_text("\n".join(self._monitor) + "\n")
        return [
            binary,
            str(self.conf_path),
            "--sentinel",
            *("--port", str(self.port), "--bind", HOST, "--dir", str(self.dir)),
            *("--daemonize", "no", "--logfile", str(self.log_path)),
        ]

    def _ready(self) -> bool:
        with self.client(retry=None) as probe, contextlib.suppress(redis.ConnectionError):
            info = probe.info("server")
            # Our process (another one may own the port), and really in Sentinel mode.
            return bool(info.get("process_id") == self.pid and info.get("redis_mode") == "sentinel")
        return False


@functools.cache
def sentinel_mode_available(binary: str) -> str | None:
    """None if ``binary`` runs as a Sentinel; else why not (the failed start's message)."""
    try:
        with SentinelProcess(binary=binary):
            return None
    except ConfigurationError as exc:
        return str(exc)


class SentinelSet:
    """A master, a replica and three Sentinels (quorum 2) watching service ``service``.

    ``down_after_ms``: how long a master may be silent before a Sentinel calls it down.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        service: str = SERVICE,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        ready_timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.binary = find_redis_server(binary)
        self.nodes: list[EmbeddedRedis] = []
        self.sentinels: list[SentinelProcess] = []
        self._clients: list[Any] = []
        try:
            if (why := sentinel_mode_available(self.binary)) is not None:
                raise SentinelModeUnavailable(f"{self.binary} cannot run as a Sentinel: {why}")
            self._start(ready_timeout)
        except BaseException:
            self.close()
            raise

    # ---- starting -------------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        master = self._node(())
        self._node(("--replicaof", HOST, str(master.port)))
        _poll(lambda: self._link_up(self.nodes[1]), deadline, "the replica's link to the master")
        for _ in range(3):
            sentinel = SentinelProcess(self._monitor_lines(master.port), binary=self.binary)
            self.sentinels.append(sentinel)
            sentinel.start()
        _poll(self._sentinels_ready, deadline, "every Sentinel knowing the replica and the others")

    def _node(self, args: tuple[str, ...]) -> EmbeddedRedis:
        # A full sync (the replica's first, a demoted master's) waits 5 s by default for more
        # replicas to share one diskless transfer: there are no others here.
        args = ("--repl-diskless-sync-delay", "0", *args)
        node = EmbeddedRedis(binary=self.binary, extra_args=args)
        self.nodes.append(node)
        node.start()
        return node

    def _monitor_lines(self, master_port: int) -> list[str]:
        s = self.service
        return [
            f"sentinel monitor {s} {HOST} {master_port} 2",
            f"sentinel down-after-milliseconds {s} {self.down_after_ms}",
            f"sentinel failover-timeout {s} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {s} 1",
        ]

    @staticmethod
    def _link_up(node: EmbeddedRedis) -> bool:
        with node.client(**_PROBE) as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as c:
                master = c.execute_command("SENTINEL", "MASTER", self.service)
                view = _pairs(master)
                replicas = [
                    _pairs(r) for r in c.execute_command("SENTINEL", "REPLICAS", self.service)
                ]
            if int(view.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
            if not any(r.get("flags") == "slave" for r in replicas):
                return False
        return True

    # ---- what it is ---------------------------------------------------------------------------

    @property
    def sentinel_addrs(self) -> list[Addr]:
        return [s.addr for s in self.sentinels]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3/<service>/0``."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addrs)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def node_at(self, addr: Addr) -> EmbeddedRedis:
        """The data node listening at ``addr``."""
        for node in self.nodes:
            if (node.host, node.port) == tuple(addr):
                return node
        raise LookupError(f"no data node at {addr[0]}:{addr[1]} in {self!r}")

    def named_masters(self) -> Counter[Addr]:
        """How many Sentinels name each address as the master (unreachable ones are left out)."""
        seen: Counter[Addr] = Counter()
        for sentinel in self.sentinels:
            with sentinel.client() as c, contextlib.suppress(redis.RedisError):
                reply = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                if reply:
                    seen[(_text(reply[0]), int(reply[1]))] += 1
        return seen

    def master_addr(self) -> Addr:
        """The master's address as the Sentinels name it (the one most of them name)."""
        named = self.named_masters()
        if not named:
            raise ConnectionError(f"no Sentinel of {self!r} names a master for {self.service!r}")
        return named.most_common(1)[0][0]

    def role(self, addr: Addr) -> str:
        """What the node at ``addr`` says it is (``ROLE``): "master", "slave", or "down"."""
        try:
            with redis.Redis(host=addr[0], port=addr[1], **_PROBE) as c:
                return _text(c.execute_command("ROLE")[0])
        except redis.RedisError:
            return "down"

    def client(self, **kw: Any) -> redis.Redis:
        """A client of the node the Sentinels name as master now, as ``EmbeddedRedis.client``
        (so a scenario can fault either the same way); it stays on that node after a failover,
        unlike :meth:`master_client`.  The caller closes it."""
        return self.node_at(self.master_addr()).client(**kw)

    def master_client(self, **kw: Any) -> redis.Redis:
        """A client that finds the master through the Sentinels on every new connection
        (redis-py's ``Sentinel.master_for``); closed by :meth:`close`.  ``kw``: its options,
        e.g. ``socket_timeout`` (redis-py's default is none: a paused master hangs it)."""
        sentinel = Sentinel(self.sentinel_addrs, sentinel_kwargs=dict(_PROBE))
        client: redis.Redis = sentinel.master_for(self.service, **kw)
        self._clients.append(client)
        return client

    # ---- faults --------------------------------------------------------------------------------

    def pause_master(self) -> EmbeddedRedis:
        """SIGSTOP the current master; the node, for :meth:`resume`."""
        node = self.node_at(self.master_addr())
        node.pause()
        return node

    def resume(self, node: EmbeddedRedis) -> None:
        node.resume()

    def kill_master(self) -> EmbeddedRedis:
        """SIGKILL the current master (its temp dir stays: ``node.restart()`` brings it back)."""
        node = self.node_at(self.master_addr())
        node.kill()
        return node

    def new_master(self, old: Addr) -> Addr | None:
        """One look: the master a majority of the Sentinels name, if that is not ``old`` and it
        answers ``ROLE`` as a master; else None."""
        for addr, n in self.named_masters().items():
            if addr != old and 2 * n > len(self.sentinels) and self.role(addr) == "master":
                return addr
        return None

    def wait_failover(self, old: Addr, timeout: float = 30.0) -> tuple[Addr, float]:
        """Poll :meth:`new_master` until there is one; its address and the seconds it took."""
        start = time.monotonic()
        found: list[Addr] = []

        def moved() -> bool:
            new = self.new_master(old)
            found[:] = [new] if new is not None else []
            return new is not None

        _poll(moved, start + timeout, f"a failover away from {old[0]}:{old[1]}")
        return found[0], time.monotonic() - start

    def failover(self, timeout: float = 30.0) -> tuple[Addr, Addr]:
        """``SENTINEL FAILOVER``: promote the replica now, no failure and no down-after wait;
        (old, new) master addresses once the Sentinels name the new one and it is a master."""
        old = self.master_addr()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", self.service)
        new, _ = self.wait_failover(old, timeout)
        return old, new

    def set_min_replicas(self, n: int, max_lag: int = 10) -> None:
        """``min-replicas-to-write n`` and ``min-replicas-max-lag`` on every data node, so a
        master without ``n`` replicas in touch refuses writes (NOREPLICAS)."""
        for node in self.nodes:
            with node.client(socket_timeout=5.0) as c:
                c.config_set("min-replicas-to-write", n)
                c.config_set("min-replicas-max-lag", max_lag)

    def topology(self) -> str:
        """One line: master, replicas and Sentinels, for messages and the demo."""
        master = self.master_addr()
        replicas = [f"{n.host}:{n.port}" for n in self.nodes if (n.host, n.port) != master]
        sentinels = [f"{h}:{p}" for h, p in self.sentinel_addrs]
        return (
            f"Sentinel service {self.service!r}: master {master[0]}:{master[1]}, replicas "
            f"{', '.join(replicas)}, Sentinels {', '.join(sentinels)}"
        )

    # ---- stopping ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process by pid (Sentinels first, so they see no failure) and remove the
        temp dirs.  Idempotent."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients = []
        for proc in [*self.sentinels, *self.nodes]:
            with contextlib.suppress(Exception):
                proc.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        nodes = ",".join(str(n.port) for n in self.nodes)
        return f"<SentinelSet {self.service!r} nodes={nodes} sentinels={self.sentinel_addrs}>"


def parse_sentinel_url(url: str) -> tuple[list[Addr], str, int]:
    """``redis+sentinel://h1:p1,h2:p2/<service>/<db>`` -> (Sentinel addresses, service, db).

    Only until ``syncmap.store.topology`` parses these URLs itself (issue 13 §3)."""
    parts = urlsplit(url)
    if parts.scheme != "redis+sentinel":
        raise ConfigurationError(f"{url!r} is not a redis+sentinel:// URL")
    addrs = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":")
        addrs.append((host or item, int(port) if host else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigurationError(f"{url!r} names no service: redis+sentinel://hosts/<service>/<db>")
    return addrs, path[0], int(path[1]) if len(path) > 1 else 0


def sentinel_master_client(url: str, socket_timeout: float) -> redis.Redis:
    """A ``Sentinel.master_for`` client for a ``redis+sentinel://`` URL (see above)."""
    addrs, service, db = parse_sentinel_url(url)
    sentinel = Sentinel(addrs, sentinel_kwargs=dict(_PROBE))
    client: redis.Redis = sentinel.master_for(
        service, db=db, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
    )
    return client


def _pairs(reply: Any) -> dict[str, str]:
    """A Sentinel reply as a dict: a flat [k, v, k, v] list (RESP2) or a map (RESP3)."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    items = list(reply)
    return {_text(k): _text(v) for k, v in zip(items[::2], items[1::2], strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _poll(condition: Any, deadline: float, what: str) -> None:
    """Until ``condition()`` holds (a node that does not answer yet counts as "not yet")."""
    delay = 0.005
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise ConfigurationError(f"Sentinel set: {what} did not happen in time")
        time.sleep(delay)  # back-off between probes, not a wait for an event
        delay = min(delay * 2, 0.1)
