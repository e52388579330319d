"""The Sentinel topology: the master is whichever node the sentinels name now.

**Resolution** (:meth:`SentinelTopology.endpoint`, at the first connection and after every
``invalidate()``): ask each sentinel in turn ``SENTINEL GET-MASTER-ADDR-BY-NAME <service>`` (with
``SENTINEL MASTER <service>`` in the same round trip); the first that answers names the master.
Then the named node must say ``ROLE`` master: during a failover the sentinels may already name a
replica that is not promoted yet, and a write sent there would be refused anyway.  Until it is,
``StoreUnavailable`` (nothing ran).  No sentinel answering is ``StoreUnavailable`` naming them.

**Following a failover.**  Executors call ``invalidate()`` after a connection failure or a
``READONLY``/``MASTERDOWN`` refusal; that bumps :attr:`generation` (their idle connections are
dropped) and the next connection resolves again.  A watcher thread per topology (one per process
and topology key: topologies are interned) subscribes to ``+switch-master`` on one sentinel; on a
switch of our service, and whenever it (re)gains its sentinel connection (a switch may have
happened meanwhile) and the master it resolves differs, it bumps the generation and calls the
``on_change`` listeners: the shared subscriber and the stream readers reconnect to the new
master and tell their maps ``on_down``/``on_up`` (the maps then probe).

**Why the socket timeout is capped.**  The data connections' socket timeout is at most half the
service's ``down-after-milliseconds`` (read from ``SENTINEL MASTER``).  Measured before this
existed: with redis-py's 5 s socket timeout, a writer whose master was stopped for 4-5 s kept its
connection, the old master resumed and took writes for ~10 s until the sentinels demoted it, and
~1,000 acknowledged writes were lost with its data set.  With the cap, a stalled master fails
the writer's call (``WriteOutcomeUnknown``) before the sentinels even start a failover, the
executor re-resolves, and a write is acknowledged only by the master the sentinels name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import unquote

import redis
from redis.sentinel import SentinelConnectionPool

from .. import forksafe
from ..errors import StoreUnavailable
from .endpoint import (
    URL_OPTIONS,
    Endpoint,
    bad_url,
    db_number,
    host_port,
    seconds_option,
    tls_from_query,
    url_query,
)
from .topology import Interned, Listener, NodeExecutors

log = logging.getLogger("syncmap")
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password", "sentinel_timeout")
SENTINEL_TIMEOUT = 0.5
SWITCH = b"+switch-master"
PING_AFTER = 2.0
DEFAULT_TIMEOUT = 5.0


class SentinelTopology(NodeExecutors):
    """A master found through Sentinel; get one with :func:`from_url` or :func:`from_client`."""

    kind: Literal["sentinel"] = "sentinel"
    sharded = False

    def __init__(self, sentinels: Sequence[Endpoint], service: str, master: Endpoint) -> None:
        self.sentinels = list(sentinels)
        self.service = service
        self._template = master  # the master's db, credentials, TLS and timeouts; no address
        self.down_after: float | None = None  # seconds, once read from a sentinel
        self._reset()
        forksafe.register(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()  # guards the fields below
        self._resolving = threading.Lock()  # one resolution at a time (it does I/O)
        self._master: Endpoint | None = None
        self._stale = True
        self._generation = 0
        self._changes = 0  # masters installed after the first (each told to the listeners)
        self._listeners: list[Listener] = []
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    def _after_fork_in_child(self) -> None:
        """The watcher thread and the parent's listeners are not the child's."""
        self._reset()

    @property
    def where(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        return f"redis sentinel {self.service}/{self._template.db} via {hosts}"

    @property
    def key(self) -> tuple[Any, ...]:
        return ("sentinel", self.service, tuple(sorted(s.key for s in self.sentinels)),
                self._template.key)  # fmt: skip

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def master(self) -> Endpoint | None:
        """The master resolved last (None before the first resolution)."""
        return self._master

    def on_change(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)
        self._ensure_watcher()

    def remove_listener(self, listener: Listener) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def invalidate(self) -> None:
        """Resolve again at the next connection; executors drop their idle connections."""
        with self._lock:
            self._stale = True
            self._generation += 1

    # ---- resolution --------------------------------------------------------------------------

    def endpoint(self) -> Endpoint:
        """The master the sentinels name now (resolved if invalidated; see module docstring)."""
        master = self._master
        if master is not None and not self._stale:
            return master
        with self._resolving:
            if self._master is not None and not self._stale:
                return self._master
            self._stale = False  # an invalidate() during the resolution makes the next resolve
            try:
                master = self._resolve()
            except BaseException:
                self._stale = True
                raise
            self._install(master)
        self._ensure_watcher()
        return master

    def _install(self, master: Endpoint) -> None:
        with self._lock:
            old, self._master = self._master, master
            changed = old is not None and old.address != master.address
            if changed:
                self._generation += 1
                self._changes += 1
        if changed:
            log.warning("syncmap: %s: the master is now %s (was %s)", self.where,
                        master.address, old.address if old else "?")  # fmt: skip
            self._notify()

    def _resolve(self) -> Endpoint:
        address, down_after = self._ask_sentinels()
        self.down_after = down_after
        timeout = self._template.socket_timeout or DEFAULT_TIMEOUT
        if down_after:
            timeout = min(timeout, down_after / 2)
        master = replace(
            self._template.at(*address),
            socket_timeout=timeout,
            connect_timeout=min(self._template.connect_timeout or timeout, timeout),
        )
        role = _ask(master, ("ROLE",), what="the master")[0]
        if not role or role[0] != b"master":
            raise StoreUnavailable(
                f"{self.where}: the sentinels name {master.address} as master of "
                f"{self.service!r}, but it is still a {_text(role[0] if role else b'?')} (a "
                "failover in progress); nothing ran: retry in a moment"
            )
        return master

    def _ask_sentinels(self) -> tuple[tuple[str, int], float | None]:
        """(master address, down-after seconds) from the first sentinel that answers."""
        failures = []
        for sentinel in self.sentinels:
            try:
                addr, info = _ask(
                    sentinel,
                    ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service),
                    ("SENTINEL", "MASTER", self.service),
                    what="a sentinel",
                )
            except StoreUnavailable as exc:
                failures.append(f"{sentinel.address}: {exc}")
                continue
            if isinstance(addr, Exception) or not addr:
                failures.append(f"{sentinel.address}: does not know {self.service!r} ({addr})")
                continue
            return (_text(addr[0]), int(addr[1])), _down_after(info)
        raise StoreUnavailable(
            f"no sentinel named the master of {self.service!r} ({'; '.join(failures)}); "
            "nothing ran. Check the sentinels run and the service name is right, then retry"
        )

    # ---- the watcher -------------------------------------------------------------------------

    def _ensure_watcher(self) -> None:
        with self._lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name=f"syncmap-sentinel-{self.service}")  # fmt: skip
            self._watcher.start()

    def close(self) -> None:
        """Stop the watcher (tests; a process's topologies otherwise live as long as it)."""
        self._stop.set()
        _forget(self)

    def _watch(self) -> None:
        turn, backoff = 0, 0.05
        while not self._stop.is_set():
            sentinel = self.sentinels[turn % len(self.sentinels)]
            try:
                self._listen(sentinel, recheck=turn > 0)
                backoff = 0.05
            except Exception as exc:  # every failure: try the next sentinel
                log.info("syncmap: %s: watching %s failed (%s)", self.where, sentinel.address, exc)
            turn += 1
            self._stop.wait(backoff)  # reconnect back-off, not a wait for data
            backoff = min(backoff * 2, 1.0)

    def _listen(self, sentinel: Endpoint, recheck: bool) -> None:
        conn = sentinel.connection(timeout=2.5 * PING_AFTER)
        try:
            conn.connect()
            conn.send_command("SUBSCRIBE", SWITCH)
            conn.read_response()  # the confirmation: switches from now on reach us
            if recheck:  # regained: a switch may have happened while we were not listening
                self._recheck()
            pinged = False
            while not self._stop.is_set():
                if not conn.can_read(PING_AFTER):
                    if pinged:
                        raise redis.ConnectionError(f"no answer to PING in {PING_AFTER} s")
                    conn.send_command("PING")
                    pinged = True
                    continue
                reply, pinged = conn.read_response(), False
                if reply[0] == b"message":
                    self._on_switch(_text(reply[2]))
        finally:
            conn.disconnect()

    def _on_switch(self, message: str) -> None:
        """``<service> <old ip> <old port> <new ip> <new port>``: ours is resolved anew, and the
        listeners are told even if the new master cannot be verified yet (they reconnect and
        retry until it can)."""
        parts = message.split()
        if len(parts) != 5 or parts[0] != self.service:
            return
        before = self._changes
        self._recheck()
        if self._changes == before:
            self._notify()

    def _recheck(self) -> None:
        """Resolve now (if resolved before); :meth:`_install` tells the listeners if it moved."""
        if self._master is None:
            return
        self.invalidate()
        with contextlib.suppress(StoreUnavailable):
            self.endpoint()

    def _notify(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            _call(listener)

    def describe(self) -> dict[str, Any]:
        """For ``syncmap doctor``: the master, and the replicas and sentinels the first
        answering sentinel knows."""
        master = self.endpoint()
        for sentinel in self.sentinels:
            with contextlib.suppress(StoreUnavailable):
                replicas, peers = _ask(
                    sentinel,
                    ("SENTINEL", "REPLICAS", self.service),
                    ("SENTINEL", "SENTINELS", self.service),
                    what="a sentinel",
                )
                return {
                    "master": master.address,
                    "down_after": self.down_after,
                    "replicas": [_address(r) for r in replicas],
                    "sentinels": [sentinel.address, *(_address(p) for p in peers)],
                }
        return {"master": master.address, "down_after": self.down_after, "replicas": [],
                "sentinels": []}  # fmt: skip

    def __repr__(self) -> str:
        return f"<SentinelTopology {self.where}, master {self._master and self._master.address}>"


def _call(listener: Listener) -> None:
    try:
        listener()
    except Exception:
        log.exception("syncmap: a topology listener failed")


def _ask(endpoint: Endpoint, *commands: tuple[Any, ...], what: str) -> list[Any]:
    """Replies (error replies in place) of ``commands`` on a short-lived connection."""
    conn = endpoint.connection()
    try:
        conn.connect()
        for command in commands:
            conn.send_command(*command)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:
                replies.append(exc)
        return replies
    except (redis.RedisError, OSError) as exc:
        raise StoreUnavailable(f"{what} at {endpoint.address} did not answer ({exc})") from exc
    finally:
        conn.disconnect()


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _field(flat: object, name: str) -> str:
    """A field of a RESP2 flat key/value reply (``SENTINEL MASTER``, ``REPLICAS``)."""
    items = list(flat) if isinstance(flat, list | tuple) else []
    pairs = dict(zip(map(_text, items[::2]), items[1::2], strict=False))
    return _text(pairs.get(name, ""))


def _address(flat: object) -> str:
    return f"{_field(flat, 'ip')}:{_field(flat, 'port')}"


def _down_after(info: object) -> float | None:
    value = "" if isinstance(info, Exception) else _field(info, "down-after-milliseconds")
    return int(value) / 1000 if value.isdigit() else None


# ---- construction (interned: one topology, one watcher per key and process) -------------------

_registry: Interned[SentinelTopology] = Interned()


def _intern(topology: SentinelTopology) -> SentinelTopology:
    return _registry.intern(topology, topology.key)


def _forget(topology: SentinelTopology) -> None:
    _registry.forget(topology, topology.key)


def is_sentinel_client(client: redis.Redis) -> bool:
    return isinstance(client.connection_pool, SentinelConnectionPool)


def from_client(client: redis.Redis, timeout: float | None) -> SentinelTopology:
    """The topology of ``Sentinel(...).master_for(service)`` (public attributes only)."""
    pool: Any = client.connection_pool  # a SentinelConnectionPool (is_sentinel_client)
    sentinels = [Endpoint.from_client(s) for s in pool.sentinel_manager.sentinels]
    master = Endpoint.from_client(client)
    if master.socket_timeout is None:
        master = master.with_timeout(timeout)
    return _intern(SentinelTopology(sentinels, str(pool.service_name), master))


def from_url(url: str, timeout: float | None) -> SentinelTopology:
    """``redis+sentinel://[user:pass@]h1:26379,h2:26379/<service>[/<db>][?options]``."""
    scheme, _, rest = url.partition("://")
    tls = scheme.lower() == "rediss+sentinel"
    rest, _, query_text = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    query = url_query(url, query_text, URL_OPTIONS + SENTINEL_OPTIONS)
    if not tls and any(k.startswith("ssl_") for k in query):
        raise bad_url(url, "ssl_* options need rediss+sentinel:// (TLS)")
    user, has_password, password = userinfo.partition(":")
    segments = [unquote(s) for s in path.split("/") if s]
    if not segments or len(segments) > 2:
        raise bad_url(url, "give the service and optionally the db: "
                           "redis+sentinel://h1:26379,h2:26379/mymaster/0")  # fmt: skip
    tls_settings = tls_from_query(url, query) if tls else None
    master = Endpoint(
        username=(unquote(user) or None) if at else None,
        password=unquote(password) if at and has_password else None,
        db=db_number(url, segments[1] if len(segments) == 2 else "0"), tls=tls_settings,
        socket_timeout=seconds_option(url, query, "socket_timeout", timeout),
        connect_timeout=seconds_option(url, query, "socket_connect_timeout", timeout),
    )  # fmt: skip
    wait = seconds_option(url, query, "sentinel_timeout", SENTINEL_TIMEOUT)
    template = Endpoint(username=query.get("sentinel_username") or None,
                        password=query.get("sentinel_password") or None, tls=tls_settings,
                        socket_timeout=wait, connect_timeout=wait)  # fmt: skip
    sentinels = [template.at(*host_port(url, h, 26379, "sentinel")) for h in hosts.split(",")]
    return _intern(SentinelTopology(sentinels, segments[0], master))
