"""Throw-away TLS certificates for tests, made with the ``openssl`` command.

:func:`make_certs` writes a CA, a server certificate for ``127.0.0.1`` and ``localhost`` (as IP and
DNS subject names, so a client that checks hostnames accepts it at either), and a client
certificate, both signed by the CA, valid for a day.  Keys are EC P-256: making the three takes
~70 ms, where RSA 2048 took ~1.4 s.  A Redis Cluster's nodes use the server
certificate on both ends of the cluster bus and of replication (``tls-client-cert-file`` defaults
to ``tls-cert-file``), so it carries no extended key usage that would restrict it to one end.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertSet", "TlsFiles", "make_certs", "openssl_missing"]


@dataclass(frozen=True)
class TlsFiles:
    """One party's certificate and key, and the CA file it checks the other side against."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class CertSet:
    """What :func:`make_certs` wrote into ``dir``: ``ca.crt``, ``server.*``, ``client.*``."""

    dir: Path
    server: TlsFiles
    client: TlsFiles

    def client_query(self) -> str:
        """The ``ssl_*`` query of a ``rediss://`` URL with the CA and the client certificate."""
        c = self.client
        return f"ssl_ca_certs={c.ca}&ssl_certfile={c.cert}&ssl_keyfile={c.key}"


def openssl_missing() -> str | None:
    """None if the ``openssl`` command is there; else why certificates cannot be made."""
    return None if shutil.which("openssl") else "no openssl command to make test certificates"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_certs(d: Path) -> CertSet:
    """A CA, and a server and a client certificate signed by it, written into the dir ``d``."""
    _openssl("req", "-x509", *_NEW_KEY, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=syncmap-test-ca", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, extra in (("server", ["-extfile", "san.cnf"]), ("client", [])):
        _openssl("req", *_NEW_KEY, "-keyout", f"{who}.key", "-out", f"{who}.csr",
                 "-subj", f"/CN={who}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.crt", "-days", "1", *extra, cwd=d)  # fmt: skip
    ca = d / "ca.crt"
    return CertSet(
        dir=d,
        server=TlsFiles(d / "server.crt", d / "server.key", ca),
        client=TlsFiles(d / "client.crt", d / "client.key", ca),
    )
