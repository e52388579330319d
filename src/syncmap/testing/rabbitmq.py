"""RabbitMQ for tests: find the machine's broker, put a FaultProxy in front of it, clean up.

Unlike Redis, RabbitMQ is not started per test (it takes seconds and an Erlang node): tests use
the broker the machine runs, named by ``SYNCMAP_TEST_AMQP_URL``.  Faults go through
:class:`~syncmap.testing.proxy.FaultProxy`: a feed opened on :func:`through` ``(proxy, url)``
connects via the proxy, so the test can reset (a broker restart, as a client sees it), stall or
close its connections without touching the broker other tests share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions

from ..errors import ConfigurationError
from ..feed.base import redact
from .proxy import FaultProxy

ENV_VAR = "SYNCMAP_TEST_AMQP_URL"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


class BrokerNotFound(ConfigurationError):
    """No RabbitMQ answers at the test URL."""


def rabbitmq_url(timeout: float = 3.0) -> str:
    """The test broker's URL, once an AMQP handshake with it has succeeded.

    Raises :class:`BrokerNotFound` naming what to install or set; a test skips on it locally and
    fails on it in CI.
    """
    url = os.environ.get(ENV_VAR) or DEFAULT_URL
    try:
        with _admin(url, timeout):
            pass
    except (pika.exceptions.AMQPError, OSError, ValueError) as exc:
        raise BrokerNotFound(
            f"RabbitMQ not reachable at {redact(url)} ({exc!r}): install rabbitmq-server (and "
            f"start it: rabbitmq-server -detached) or set {ENV_VAR}"
        ) from exc
    return url


def through(proxy: FaultProxy, url: str) -> str:
    """``url`` with its host and port replaced by the proxy's (credentials, vhost, query kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@{proxy.host}:{proxy.port}" if userinfo else f"{proxy.host}:{proxy.port}"
    return parts._replace(netloc=netloc).geturl()


def proxy_for(url: str) -> FaultProxy:
    """A started FaultProxy forwarding to the broker of ``url``."""
    parts = urlsplit(url)
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return FaultProxy(parts.hostname or "127.0.0.1", parts.port or default_port).start()


def exchange_exists(url: str, name: str) -> bool:
    """Whether the broker has the exchange ``name`` (a passive declare)."""
    with _admin(url) as conn:
        channel = conn.channel()
        try:
            channel.exchange_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        return True


def delete_exchanges(url: str, names: Iterable[str]) -> None:
    """Delete the exchanges a test declared (deleting a missing one is not an error)."""
    with _admin(url) as conn:
        channel = conn.channel()
        for name in names:
            channel.exchange_delete(name)


@contextlib.contextmanager
def _admin(url: str, timeout: float = 5.0) -> Iterator[Any]:
    params = pika.URLParameters(url)
    params.socket_timeout = params.stack_timeout = timeout
    params.connection_attempts = 1
    conn = pika.BlockingConnection(params)
    try:
        yield conn
    finally:
        if conn.is_open:
            conn.close()


__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "BrokerNotFound",
    "delete_exchanges",
    "exchange_exists",
    "proxy_for",
    "rabbitmq_url",
    "through",
]
