"""What the two ``redis+stream://`` drivers share: the pure decisions, no I/O.

The thread feed (``redis_stream.py``, whose docstring states the behaviour: the entry layout, the
URL, what ``on_up(resumed)`` says and why) and the asyncio feed (``aredis_stream.py``) differ only
in how they wait for Redis.  Everything that decides something lives here, so the two cannot
drift: the URL and ``maxlen``, the resume decision after a drop (:func:`resume_point`), how a
reply of ``XINFO STREAM``, ``INFO server`` or ``XREVRANGE`` is read, and which error a failed
``subscribe()`` becomes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from ..errors import ConfigurationError
from ..ratelog import RateLimitedLog
from .base import BEGINNING, FeedUnavailable, redact

log = logging.getLogger("syncmap.feed")
no_m_log = RateLimitedLog(log)  # anyone who can XADD could write a line per entry otherwise

DEFAULT_MAXLEN = 100_000
ZERO = "0-0"
BLOCK_MS = 1000  # how long one XREAD waits: the bound on noticing close() (thread feed)
READ_TIMEOUT = BLOCK_MS / 1000 + 1.5  # socket timeout: an XREAD that outlives it is stalled
COUNT = 512
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0
_ID = re.compile(r"\d+-\d+")

StreamId = tuple[int, int]


def parse_id(entry_id: str) -> StreamId:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What ``XINFO STREAM`` tells about a stream; ``None`` fields: an older Redis omits them."""

    length: int
    last_generated: StreamId
    first_entry: StreamId | None
    entries_added: int | None = None
    max_deleted: StreamId | None = None


def resume_point(
    last: str, kept: bool, info: StreamInfo | None, same_server: bool
) -> tuple[str, bool]:
    """Where a reader goes on after ``last``, and whether it lost nothing (``redis_stream.py``).

    ``kept``: the entry ``last`` is still in the stream; ``info``: the stream (``None``: no such
    key); ``same_server``: Redis's ``run_id`` did not change since the previous connection.
    """
    if last == ZERO:
        return ZERO, same_server and _never_lost_an_entry(info)
    if kept:
        return last, True
    return _read_on_from(last, info), False


def _never_lost_an_entry(info: StreamInfo | None) -> bool:
    if info is None:
        return True
    if info.entries_added is None:  # Redis < 7.0: only an untouched empty stream is sure
        return info.length == 0 and info.last_generated == (0, 0)
    return info.entries_added == info.length


def _read_on_from(last: str, info: StreamInfo | None) -> str:
    """Where to read after a gap behind ``last``, whose entry is no longer in the stream."""
    ours = parse_id(last)
    if info is None or info.last_generated < ours:
        return ZERO  # gone, or made anew: IDs went backwards
    if info.first_entry is None or info.first_entry > ours:
        return last  # trimmed past us: everything left is newer than ``last``
    if info.max_deleted is not None and info.max_deleted >= ours:
        return last  # our entry was deleted (XDEL) from this same stream
    return ZERO  # cannot tell the stream is the one we read: read all of it again


# ---- commands and replies --------------------------------------------------------------------


def xadd(stream: str, maxlen: int, payload: bytes) -> tuple[Any, ...]:
    """The ``XADD`` of one message, as the write scripts send it (``redis_stream.py``)."""
    trim = ("MAXLEN", "~", maxlen) if maxlen else ()
    return ("XADD", stream, *trim, "*", "m", payload)


def newest_command(stream: str) -> tuple[Any, ...]:
    return ("XREVRANGE", stream, "+", "-", "COUNT", 1)


def xread_command(stream: str, last: str) -> tuple[Any, ...]:
    return ("XREAD", "COUNT", COUNT, "BLOCK", BLOCK_MS, "STREAMS", stream, last)


def newest(reply: Any) -> str | None:
    """The ID of an ``XREVRANGE + - COUNT 1`` reply's entry (``None``: an empty stream)."""
    return reply[0][0].decode() if reply else None


def field_m(fields: list[bytes]) -> bytes | None:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"m":
            return fields[i + 1]
    return None


def is_no_such_key(exc: redis.ResponseError) -> bool:
    """``XINFO STREAM`` of a missing key: the stream is gone, not an error."""
    return "no such key" in str(exc).lower()


def stream_info(reply: Any) -> StreamInfo:
    """A RESP2 ``XINFO STREAM`` reply, read."""
    fields = dict(zip(reply[::2], reply[1::2], strict=True))
    first = fields.get(b"first-entry")
    added, deleted = fields.get(b"entries-added"), fields.get(b"max-deleted-entry-id")
    return StreamInfo(
        length=int(fields[b"length"]),
        last_generated=parse_id(fields[b"last-generated-id"].decode()),
        first_entry=parse_id(first[0].decode()) if first else None,
        entries_added=None if added is None else int(added),
        max_deleted=None if deleted is None else parse_id(deleted.decode()),
    )


def run_id_of(info: bytes) -> str | None:
    """The ``run_id`` line of an ``INFO server`` reply."""
    for line in info.splitlines():
        if line.startswith(b"run_id:"):
            return line.removeprefix(b"run_id:").decode()
    return None


def check_start(start: str | None) -> None:
    if start is not None and start != BEGINNING and not _ID.fullmatch(start):
        raise ValueError(f"{start!r} is not a redis+stream:// position (an entry ID, 'ms-seq')")


def raise_subscribe_error(where: str, stream: str, exc: Exception) -> NoReturn:
    """Raise ``exc`` of a failed ``subscribe()`` in the feed's terms: fix the settings, or retry
    later (anything else is raised as it is)."""
    if isinstance(exc, redis.AuthenticationError | redis.ResponseError):
        raise ConfigurationError(
            f"{where} refused to subscribe to {stream!r} ({exc}): check the credentials, that "
            "the ACL user may XREAD, XRANGE and XINFO the key, and that the key is a stream"
        ) from exc
    if isinstance(exc, redis.RedisError | OSError):
        raise FeedUnavailable(
            f"cannot subscribe on {where} ({exc}); nothing is subscribed: retry later"
        ) from exc
    raise exc


# ---- the URL ------------------------------------------------------------------------------------


def split_url(url: str) -> tuple[str, int]:
    """(the Redis URL for redis-py, maxlen) of a ``redis+stream://`` URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower().removesuffix("+stream")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "maxlen"]
    redis_url = parts._replace(scheme=scheme, query=urlencode(query)).geturl()
    return redis_url, maxlen_of(url)


def maxlen_of(url: str) -> int:
    values = [v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True) if k == "maxlen"]
    if not values:
        return DEFAULT_MAXLEN
    if len(values) > 1 or not values[0].isdigit():
        raise ConfigurationError(
            f"feed URL {redact(url)!r}: maxlen must be one whole number >= 0 "
            f"(0 = never trim), not {values!r}"
        )
    return int(values[0])
