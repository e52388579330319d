"""Choosing a feed by URL: unknown schemes and missing client libraries give clear errors."""

from __future__ import annotations

import importlib
import sys

import pytest

from syncmap.errors import ConfigurationError
from syncmap.feed.aregistry import async_feed_class
from syncmap.feed.base import feed_class, redact


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown scheme 'mqtt'.*nats\+jetstream://"):
        feed_class("mqtt://127.0.0.1:1883")


def _without(monkeypatch: pytest.MonkeyPatch, library: str, *modules: str) -> None:
    """Make ``import <library>`` fail, and ``modules`` (syncmap's) be imported afresh.  Other
    syncmap feed modules stay imported on purpose: a feed must not rely on one of them failing
    to import first (syncmap.aio may have imported the asyncio NATS feed already)."""
    for module in modules:
        monkeypatch.delitem(sys.modules, module, raising=False)
    for name in [n for n in sys.modules if n == library or n.startswith(library + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, library, None)


def _import_every_feed() -> None:
    """What a process using syncmap.aio and the thread feeds may have imported already."""
    for module in ("anats", "ajetstream", "arabbitmq", "akafka", "nats", "jetstream", "kafka"):
        importlib.import_module(f"syncmap.feed.{module}")


@pytest.mark.parametrize("imported", [False, True], ids=["fresh", "others-imported"])
@pytest.mark.parametrize(
    ("url", "module", "library", "extra"),
    [
        ("kafka://127.0.0.1:9092", "syncmap.feed.kafka", "confluent_kafka", "kafka"),
        ("nats://127.0.0.1:4222", "syncmap.feed.nats", "nats", "nats"),
        ("nats+jetstream://127.0.0.1:4222", "syncmap.feed.jetstream", "nats", "nats"),
        ("amqp://guest:guest@127.0.0.1/", "syncmap.feed.rabbitmq", "pika", "amqp"),
    ],
)
def test_a_missing_client_library_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, library: str, extra: str,
    imported: bool,
) -> None:  # fmt: skip
    if imported:
        _import_every_feed()
    _without(monkeypatch, library, module)
    with pytest.raises(ConfigurationError, match=rf"pip install 'syncmap\[{extra}\]'"):
        feed_class(url)


@pytest.mark.parametrize("imported", [False, True], ids=["fresh", "others-imported"])
@pytest.mark.parametrize(
    ("url", "module", "library", "extra"),
    [
        ("kafka://127.0.0.1:9092", "syncmap.feed.akafka", "confluent_kafka", "kafka"),
        ("nats://127.0.0.1:4222", "syncmap.feed.anats", "nats", "nats"),
        ("nats+jetstream://127.0.0.1:4222", "syncmap.feed.ajetstream", "nats", "nats"),
        ("amqp://guest:guest@127.0.0.1/", "syncmap.feed.arabbitmq", "aio_pika", "amqp"),
    ],
)
def test_the_async_registry_names_the_extra_to_install_too(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, library: str, extra: str,
    imported: bool,
) -> None:  # fmt: skip
    if imported:
        _import_every_feed()
    # anats is imported by ajetstream: both go, so the import really reaches nats-py again.
    _without(monkeypatch, library, module, "syncmap.feed.anats")
    with pytest.raises(ConfigurationError, match=rf"pip install 'syncmap\[{extra}\]'"):
        async_feed_class(url)


def test_the_thread_rabbitmq_feed_needs_pika_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """aio-pika is for syncmap.aio: a service on threads runs without it."""
    _without(monkeypatch, "aio_pika", "syncmap.feed.rabbitmq", "syncmap.feed.arabbitmq")
    _without(monkeypatch, "aiormq")
    assert feed_class("amqp://guest:guest@127.0.0.1/").__name__ == "RabbitMQFeed"
    with pytest.raises(ConfigurationError, match=r"pip install 'syncmap\[amqp\]'"):
        async_feed_class("amqp://guest:guest@127.0.0.1/")


def test_passwords_are_redacted_in_messages() -> None:
    assert redact("amqp://guest:secret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert redact("nats://host:4222") == "nats://host:4222"
