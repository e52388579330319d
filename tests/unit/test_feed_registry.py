"""Choosing a feed by URL: unknown schemes and missing client libraries give clear errors."""

from __future__ import annotations

import sys

import pytest

from syncmap.errors import ConfigurationError
from syncmap.feed.base import feed_class, redact


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown scheme 'mqtt'.*nats\+jetstream://"):
        feed_class("mqtt://127.0.0.1:1883")


@pytest.mark.parametrize(
    ("url", "module", "library", "extra"),
    [
        ("kafka://127.0.0.1:9092", "syncmap.feed.kafka", "confluent_kafka", "kafka"),
        ("nats://127.0.0.1:4222", "syncmap.feed.nats", "nats", "nats"),
        ("amqp://guest:guest@127.0.0.1/", "syncmap.feed.rabbitmq", "pika", "amqp"),
    ],
)
def test_a_missing_client_library_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, library: str, extra: str
) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    for name in [n for n in sys.modules if n == library or n.startswith(library + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import <library>...` fail
    monkeypatch.setitem(sys.modules, library, None)
    with pytest.raises(ConfigurationError, match=rf"pip install 'syncmap\[{extra}\]'"):
        feed_class(url)


def test_passwords_are_redacted_in_messages() -> None:
    assert redact("amqp://guest:secret@host:5672/%2F") == "amqp://guest:***@host:5672/%2F"
    assert redact("nats://host:4222") == "nats://host:4222"
