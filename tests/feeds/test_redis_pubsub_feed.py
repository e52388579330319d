"""The conformance suite (``syncmap.testing.feedconformance``) against Redis pub/sub."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from syncmap.embedded import EmbeddedRedis
from syncmap.feed.base import Feed
from syncmap.feed.redis_pubsub import RedisPubSubFeed
from syncmap.testing.feedconformance import CHECKS, FeedKit


@pytest.fixture
def kit(redis_server: EmbeddedRedis) -> Iterator[FeedKit]:
    opened: list[Feed] = []

    def open_(topic: str) -> Feed:
        feed = RedisPubSubFeed(redis_server.url, RedisPubSubFeed.topic_for("sm", topic))
        opened.append(feed)
        return feed

    yield FeedKit("redis pub/sub", open_, restart=redis_server.restart)
    for feed in opened:
        feed.close()


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(kit: FeedKit, check: str) -> None:
    CHECKS[check](kit)
