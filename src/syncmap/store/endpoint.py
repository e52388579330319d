"""Where one Redis node is and how to connect to it: an explicit value, not copied client kwargs.

An :class:`Endpoint` is everything syncmap needs to open a connection of its own to one node:
address (TCP host and port, or a Unix socket path), database, credentials, TLS settings and
timeouts.  Every dedicated connection (the executors' free lists, the shared subscriber, the
stream readers, Sentinel's probes) is made by :meth:`Endpoint.connection`, so they all agree on
how to connect and none of them reads a redis-py private attribute:

* the connection is made unconnected, outside any redis-py pool (a pool's count would run out,
  and its bookkeeping costs about 10 us a call);
* it speaks RESP2 (plain arrays everywhere, whatever the user's client speaks);
* it never retries (``Retry(NoBackoff(), 0)``): a write whose reply was lost must not run twice,
  and a dropped subscription must reach its reader;
* it returns bytes (``decode_responses=False``).

Endpoints come from a URL (:meth:`Endpoint.from_url`: ``redis://``, ``rediss://``, ``unix://``)
or from a user's ``redis.Redis`` (:meth:`Endpoint.from_client`, which reads only the public
``connection_pool.connection_kwargs`` and ``connection_class``).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.asyncio import connection as aio_connection
from redis.asyncio import retry as aio_retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import ConfigurationError

CERT_REQS = ("none", "optional", "required")
# Options of a user's client that are passed on as given (credential providers, keep-alive,
# TLS details syncmap has no field for).  Everything else of the client's kwargs (its retry
# policy, decoding, protocol, redis-py's own bookkeeping) is syncmap's to decide.
PASSED_ON = frozenset({
    "client_name", "driver_info", "credential_provider", "socket_keepalive",
    "socket_keepalive_options",
    "ssl_ca_data", "ssl_ca_path", "ssl_password", "ssl_ciphers", "ssl_min_version",
    "ssl_include_verify_flags", "ssl_exclude_verify_flags", "ssl_validate_ocsp",
    "ssl_validate_ocsp_stapled",
})  # fmt: skip
# Those of PASSED_ON that redis.asyncio's connections take too.
ASYNC_PASSED_ON = frozenset({
    "client_name", "driver_info", "credential_provider", "ssl_ca_data", "ssl_ca_path",
    "ssl_password", "ssl_ciphers", "ssl_min_version", "ssl_include_verify_flags",
    "ssl_exclude_verify_flags",
})  # fmt: skip
URL_OPTIONS = (
    "socket_timeout", "socket_connect_timeout", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
    "ssl_cert_reqs", "ssl_check_hostname",
)  # fmt: skip
# redis-py's classes are untyped: called through Any.
_CLASSES: dict[str, Any] = {
    "tcp": redis.Connection, "tls": redis.SSLConnection, "unix": redis.UnixDomainSocketConnection,
}  # fmt: skip
_ASYNC_CLASSES: dict[str, Any] = {
    "tcp": aio_connection.Connection, "tls": aio_connection.SSLConnection,
    "unix": aio_connection.UnixDomainSocketConnection,
}  # fmt: skip
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# What to check when a TLS handshake failed.  The server's refusal of a missing client
# certificate is no clear error on TLS 1.3: the client's handshake is over before the server
# checks, so the client sees the alert, or only an EOF, on its first write or read.
TLS_ADVICE = (
    "A TLS handshake failed: check that ssl_ca_certs names the CA that signed the server's "
    "certificate, that ssl_certfile and ssl_keyfile give a client certificate where the server "
    "requires one (tls-auth-clients), and that the port is the server's tls-port"
)


@dataclass(frozen=True, slots=True)
class Tls:
    """TLS settings of an endpoint (``rediss://``); ``cert_reqs`` is none|optional|required."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: str = "required"
    check_hostname: bool = True

    def kwargs(self) -> dict[str, Any]:
        return {"ssl_ca_certs": self.ca_certs, "ssl_certfile": self.certfile,
                "ssl_keyfile": self.keyfile, "ssl_cert_reqs": self.cert_reqs,
                "ssl_check_hostname": self.check_hostname}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One Redis node: how to reach it, as whom, and how long to wait."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a Unix socket: host and port are then unused
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: Tls | None = None
    socket_timeout: float | None = None
    connect_timeout: float | None = None
    options: tuple[tuple[str, Any], ...] = ()  # PASSED_ON options of a user's client

    @property
    def address(self) -> str:
        """``host:port`` or the socket path (never the credentials)."""
        return self.path if self.path else f"{self.host}:{self.port}"

    @property
    def where(self) -> str:
        """For messages: ``redis 127.0.0.1:6379/0`` (never the password)."""
        return f"redis {self.address}/{self.db}"

    @property
    def key(self) -> tuple[Any, ...]:
        """Identity for per-process registries: the same node, database, user and TLS settings.

        Timeouts are excluded: two maps with different timeouts still share one subscriber."""
        options = tuple((k, _hashable(v)) for k, v in self.options)
        return (self.host, self.port, self.path, self.db, self.username, self.password,
                self.tls, options)  # fmt: skip

    def at(self, host: str, port: int) -> Endpoint:
        """The same credentials, TLS and timeouts at another TCP address."""
        return replace(self, host=host, port=int(port), path=None)

    def with_timeout(self, seconds: float | None) -> Endpoint:
        """This endpoint with ``seconds`` as its socket timeout (connect timeout kept if set)."""
        return replace(self, socket_timeout=seconds)

    def connection(
        self, *, timeout: float | None = None, connect_timeout: float | None = None,
        once: bool = False,
    ) -> Any:  # fmt: skip
        """A new, unconnected redis-py connection (see the module docstring for its settings).

        ``timeout`` replaces the socket timeout; ``connect_timeout`` the connect timeout, which
        defaults to the connect timeout set here, else the socket timeout.  ``once``: the
        connection connects only once; redis-py's silent reconnect (``send_command`` or
        ``can_read`` on a closed connection) then raises ``ConnectionError`` instead, which a
        subscriber needs: a fresh socket has none of its subscriptions."""
        kwargs = self._kwargs(timeout, connect_timeout, Retry(NoBackoff(), 0))
        kwargs.update(self.options)
        if once:
            kwargs["redis_connect_func"] = _connect_once()
        return self._made(_CLASSES, kwargs)

    def async_connection(
        self, *, timeout: float | None = None, connect_timeout: float | None = None
    ) -> Any:
        """A new, unconnected ``redis.asyncio`` connection with the same settings as
        :meth:`connection` (RESP2, no retries, bytes), for the asyncio driver."""
        kwargs = self._kwargs(timeout, connect_timeout, aio_retry.Retry(NoBackoff(), 0))
        kwargs.update((k, v) for k, v in self.options if k in ASYNC_PASSED_ON)
        return self._made(_ASYNC_CLASSES, kwargs)

    def _kwargs(self, timeout: float | None, connect_timeout: float | None,
                retry: Any) -> dict[str, Any]:  # fmt: skip
        """What every connection of this endpoint is made with, in either driver."""
        sock_timeout = self.socket_timeout if timeout is None else timeout
        if connect_timeout is None:
            connect_timeout = (
                self.connect_timeout if self.connect_timeout is not None else sock_timeout
            )
        return {
            "db": self.db, "username": self.username, "password": self.password,
            "socket_timeout": sock_timeout, "socket_connect_timeout": connect_timeout,
            "retry": retry, "decode_responses": False, "protocol": 2,
        }  # fmt: skip

    def _made(self, classes: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        if self.path:
            return classes["unix"](path=self.path, **kwargs)
        kwargs.update(host=self.host, port=self.port)
        kwargs.setdefault("socket_keepalive", True)  # redis-py's default for TCP; Unix takes none
        if self.tls is not None:
            return classes["tls"](**kwargs, **self.tls.kwargs())
        return classes["tcp"](**kwargs)

    def client(self, **overrides: Any) -> redis.Redis:
        """A ``redis.Redis`` for this node, for tools (the CLI, tests); not used by maps.

        No retries unless ``overrides`` asks for them: redis-py's default backs off three times
        (about 3.5 s) before telling a CLI user that nothing listens there."""
        kwargs: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 0),
            "db": self.db, "username": self.username, "password": self.password,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.connect_timeout or self.socket_timeout,
        }  # fmt: skip
        kwargs.update(self.options)
        if self.path:
            kwargs["unix_socket_path"] = self.path
        else:
            kwargs.update(host=self.host, port=self.port)
            if self.tls is not None:
                kwargs.update(ssl=True, **self.tls.kwargs())
        kwargs.update(overrides)
        return redis.Redis(**kwargs)

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, timeout: float | None = None) -> Endpoint:
        """``redis://[user:pass@]host[:port][/db]``, ``rediss://...`` or ``unix:///path?db=N``,
        with the query options of :data:`URL_OPTIONS`; ``timeout`` unless the URL sets one."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise bad_url(url, "use redis://, rediss://, unix://, redis+sentinel:// or "
                               "rediss+sentinel://")  # fmt: skip
        query = url_query(url, parts.query, URL_OPTIONS + (("db",) if scheme == "unix" else ()))
        base = cls(
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=tls_from_query(url, query) if scheme == "rediss" else None,
            socket_timeout=seconds_option(url, query, "socket_timeout", timeout),
            connect_timeout=seconds_option(url, query, "socket_connect_timeout", timeout),
        )
        if scheme != "rediss" and any(k.startswith("ssl_") for k in query):
            raise bad_url(url, "ssl_* options need rediss:// (TLS)")
        if scheme == "unix":
            if not parts.path:
                raise bad_url(url, "give the socket path: unix:///run/redis.sock?db=0")
            return replace(base, path=unquote(parts.path), db=db_number(url, query.get("db", "0")))
        try:
            port = parts.port or 6379
        except ValueError as exc:
            raise bad_url(url, f"the port is not a number ({exc})") from None
        return replace(base, host=unquote(parts.hostname or "127.0.0.1"), port=port,
                       db=db_number(url, parts.path.strip("/") or "0"))  # fmt: skip

    @classmethod
    def from_client(cls, client: redis.Redis) -> Endpoint:
        """The endpoint of a user's ``redis.Redis`` (public ``connection_pool`` fields only)."""
        pool = client.connection_pool
        kw: dict[str, Any] = dict(pool.connection_kwargs)
        if kw.get("decode_responses"):
            raise ConfigurationError(
                "pass a redis.Redis created with decode_responses=False: syncmap stores bytes"
            )
        tls = None
        if issubclass(pool.connection_class, redis.SSLConnection):
            reqs = kw.get("ssl_cert_reqs", "required")
            tls = Tls(kw.get("ssl_ca_certs"), kw.get("ssl_certfile"), kw.get("ssl_keyfile"),
                      cert_reqs_name(reqs), bool(kw.get("ssl_check_hostname", True)))  # fmt: skip
        path = kw.get("path") if issubclass(
            pool.connection_class, redis.UnixDomainSocketConnection
        ) else None  # fmt: skip
        options = tuple(sorted((k, v) for k, v in kw.items() if _passed_on(k, v)))
        return cls(
            host=str(kw.get("host") or "127.0.0.1"), port=int(kw.get("port") or 6379),
            path=path or None, db=int(kw.get("db") or 0), username=kw.get("username"),
            password=kw.get("password"), tls=tls, socket_timeout=kw.get("socket_timeout"),
            connect_timeout=kw.get("socket_connect_timeout"), options=options,
        )  # fmt: skip


def tls_failed(exc: BaseException) -> bool:
    """Whether ``exc`` was raised from a TLS error (redis-py wraps ``ssl.SSLError`` in its
    ``ConnectionError``): a certificate refused by either side, or a handshake cut short."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ssl.SSLError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _connect_once() -> Callable[[Any], None]:
    connected = False

    def on_connect(conn: Any) -> None:
        nonlocal connected
        if connected:
            raise redis.ConnectionError("this connection was closed (it is never reconnected)")
        connected = True
        conn.on_connect()

    return on_connect


def _hashable(value: object) -> object:
    """``value``, or its identity when it cannot be a key (a dict of keep-alive options)."""
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _passed_on(name: str, value: object) -> bool:
    """Whether a user's client option is passed on (not a default syncmap sets anyway)."""
    if name == "socket_keepalive":
        return value is False
    if name == "driver_info":  # None: the user turned CLIENT SETINFO off; else redis-py's own
        return value is None
    if name == "socket_keepalive_options":
        return isinstance(value, dict) and bool(value)
    return name in PASSED_ON and value is not None and value is not False


# ---- URL helpers, shared with the Sentinel URLs (topology.py) ------------------------------


def redact_url(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{netloc[2]}").geturl()


def bad_url(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"bad Redis URL {redact_url(url)!r}: {why}")


def url_query(url: str, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query options of ``url``: each at most once, each one of ``allowed``."""
    pairs = parse_qsl(query, keep_blank_values=True)
    found: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise bad_url(url, f"unknown option {name!r} (known: {', '.join(allowed)})")
        if name in found:
            raise bad_url(url, f"option {name!r} given twice")
        found[name] = value
    return found


def seconds_option(
    url: str, query: dict[str, str], name: str, default: float | None
) -> float | None:
    if name not in query:
        return default
    try:
        value = float(query[name])
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise bad_url(url, f"{name} must be a number of seconds > 0, not {query[name]!r}")
    return value


def host_port(url: str, text: str, default_port: int, what: str) -> tuple[str, int]:
    """One address of a multi-node URL: ``host``, ``host:port`` or ``[v6]:port``."""
    text = unquote(text.strip())
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise bad_url(url, f"a {what} address is empty ({text!r}): list them as "
                           f"h1:{default_port},h2")  # fmt: skip
    if port and not port.isdigit():
        raise bad_url(url, f"the port of {what} {text!r} is not a number")
    return host, int(port or default_port)


def db_number(url: str, text: str) -> int:
    if not text.isdigit():
        raise bad_url(url, f"the database must be a number >= 0, not {text!r}")
    return int(text)


def flag(url: str, query: dict[str, str], name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise bad_url(url, f"{name} must be true or false, not {value!r}")


def tls_from_query(url: str, query: dict[str, str], prefix: str = "ssl_") -> Tls:
    """TLS settings from ``<prefix>ca_certs``, ``certfile``, ``keyfile``, ``cert_reqs``,
    ``check_hostname`` query options."""
    reqs = query.get(prefix + "cert_reqs", "required").lower()
    if reqs not in CERT_REQS:
        raise bad_url(url, f"{prefix}cert_reqs must be none, optional or required, not {reqs!r}")
    return Tls(query.get(prefix + "ca_certs"), query.get(prefix + "certfile"),
               query.get(prefix + "keyfile"), reqs,
               flag(url, query, prefix + "check_hostname", reqs != "none"))  # fmt: skip


def cert_reqs_name(value: object) -> str:
    """``none|optional|required`` of a redis-py ``ssl_cert_reqs`` (a str, None or VerifyMode)."""
    if value is None:
        return "none"
    if isinstance(value, str):
        return value.lower()
    names: dict[object, str] = {
        ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional", ssl.CERT_REQUIRED: "required",
    }  # fmt: skip
    return names.get(value, "required")
