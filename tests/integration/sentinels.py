"""A small Sentinel set for the topology tests: per service a master and one replica, and three
``redis-server --sentinel`` processes monitoring every service (down-after 1000 ms), all on free
ports.  (The full fixture with scenario S10 lives in syncmap.testing; this one stays in tests/.)"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from syncmap.embedded import EmbeddedRedis
from syncmap.serverproc import HOST

DOWN_AFTER_MS = 1000


class SentinelProcess(EmbeddedRedis):
    """``redis-server <conf> --sentinel``: the config is written into its own dir (Sentinel
    rewrites it as it learns the set)."""

    _dir_prefix = "syncmap-sentinel-"

    def __init__(self, masters: dict[str, int], binary: str | None = None) -> None:
        super().__init__(binary=binary)
        self._masters = masters

    def _command(self, binary: str) -> list[str]:
        lines = [f"port {self.port}", f"bind {HOST}", f"dir {self.dir}", "daemonize no",
                 f"logfile {self.log_path}"]  # fmt: skip
        for name, port in self._masters.items():
            lines += [
                f"sentinel monitor {name} {HOST} {port} 2",
                f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {name} 3000",
                f"sentinel parallel-syncs {name} 1",
            ]
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [binary, str(conf), "--sentinel"]

    def _ready(self) -> bool:
        with (
            redis.Redis(host=HOST, port=self.port, socket_timeout=1.0, retry=None) as probe,
            contextlib.suppress(redis.ConnectionError),
        ):
            return bool(probe.info("server").get("process_id") == self.pid)
        return False


def poll(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """``check()``'s first truthy result within ``timeout`` (errors count as not yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (redis.RedisError, OSError) as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(0.05)  # polling a condition, with a deadline
    raise AssertionError(f"{what} did not happen within {timeout} s (last error: {last})")


class SentinelSet:
    def __init__(self, binary: str, services: tuple[str, ...] = ("mymaster",)) -> None:
        self.binary = binary
        self.nodes: dict[str, list[EmbeddedRedis]] = {}
        for name in services:
            master = EmbeddedRedis(binary=binary).start()
            replica = EmbeddedRedis(binary=binary, extra_args=[
                "--replicaof", HOST, str(master.port)]).start()  # fmt: skip
            self.nodes[name] = [master, replica]
        masters = {name: nodes[0].port for name, nodes in self.nodes.items()}
        self.sentinels = [SentinelProcess(masters, binary).start() for _ in range(3)]
        for name in services:
            poll(f"the sentinels know a replica of {name}", lambda n=name: self._ready(n))

    def _ready(self, name: str) -> bool:
        for s in self.sentinels:
            with redis.Redis(host=HOST, port=s.port, socket_timeout=1.0) as c:
                replicas = c.sentinel_slaves(name)
                ok = [r for r in replicas if not r.get("is_sdown") and not r.get("is_odown")
                      and not r.get("is_disconnected")]  # fmt: skip
                peers = c.sentinel_sentinels(name)
                if not ok or len(peers) < 2:
                    return False
        return True

    def url(self, name: str = "mymaster", scheme: str = "redis+sentinel", query: str = "") -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"{scheme}://{hosts}/{name}/0" + (f"?{query}" if query else "")

    def master_port(self, name: str = "mymaster") -> int:
        with redis.Redis(host=HOST, port=self.sentinels[0].port, socket_timeout=1.0) as c:
            return int(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)[1])

    def node(self, port: int, name: str = "mymaster") -> EmbeddedRedis:
        return next(n for n in self.nodes[name] if n.port == port)

    def failover(self, name: str = "mymaster") -> tuple[int, int]:
        """``SENTINEL FAILOVER``; (old, new) master ports once the new one is master."""
        old = self.master_port(name)
        with redis.Redis(host=HOST, port=self.sentinels[0].port, socket_timeout=2.0) as c:
            c.execute_command("SENTINEL", "FAILOVER", name)
        new = poll("the failover", lambda: (p := self.master_port(name)) != old and p)
        poll("the new master to be master", lambda: self.node(new, name).client().execute_command(
            "ROLE")[0] == b"master")  # fmt: skip
        return old, int(new)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for nodes in self.nodes.values():
            for n in nodes:
                n.stop()


def sentinel_set(binary: str, *services: str) -> Iterator[SentinelSet]:
    s = SentinelSet(binary, services or ("mymaster",))
    try:
        yield s
    finally:
        s.stop()
