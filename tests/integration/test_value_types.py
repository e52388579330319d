"""Values come back as stored through real maps on a real redis-server, or are refused unsent.

Written by one map instance, read by a second one opened afterwards (empty near cache), so every
value goes through Redis and the codec; the writer's own cached copy is checked too.
"""

from __future__ import annotations

import collections
import datetime as dt
import decimal
import uuid
import zoneinfo
from typing import Any

import pytest

from syncmap import InvalidValue, SyncMap
from syncmap.testing.values import same

PARIS = zoneinfo.ZoneInfo("Europe/Paris")
MSGPACK_VALUES: dict[str, Any] = {
    "naive": dt.datetime(2024, 5, 17, 9, 30, 1, 250),
    "aware": dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    "zoned": dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),
    "date": dt.date(2024, 5, 17),
    "time": dt.time(8, 0, tzinfo=dt.UTC),
    "delta": dt.timedelta(days=2, microseconds=5),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": decimal.Decimal("19.990"),
    "tuple": (1, ("a", b"b")),
    "set": {1, 2, 3},
    "frozenset": frozenset({"x"}),
    "mixed keys": {1: "a", "1": "b", (1, 2): "c"},
    "nested": {"when": [dt.date(2024, 1, 1)], "ids": {uuid.UUID(int=1)}, "nan": float("nan")},
    "plain": {"name": "ann", "age": 42, "tags": ["a", "b"], "score": 1.5, "raw": b"\x00"},
}
JSON_VALUES: dict[str, Any] = {
    "plain": {"name": "ann", "age": 42, "tags": ["a", "b"], "score": 1.5, "big": 2**80},
    "text": "héllo",
    "none": None,
}
REFUSED: dict[str, list[Any]] = {
    "msgpack": [bytearray(b"x"), collections.OrderedDict(a=1), {"k": [object()]}],
    "json": [
        {1: "a", "1": "b"},
        float("nan"),
        b"raw",
        dt.datetime(2024, 5, 17),
        uuid.UUID(int=1),
        decimal.Decimal("1"),
        (1, 2),
        {"k": {1, 2}},
    ],
}


@pytest.mark.parametrize(("codec", "stored"), [("msgpack", MSGPACK_VALUES), ("json", JSON_VALUES)])
def test_a_second_server_reads_what_the_first_stored(shared_redis_url: str, codec: str,
                                                     stored: dict[str, Any]) -> None:  # fmt: skip
    with SyncMap("typed-values", shared_redis_url, codec=codec) as writer:
        for key, value in stored.items():
            writer[key] = value
        for key, value in stored.items():
            assert same(value, writer[key]), key  # the writer's own near cache
        for bad in REFUSED[codec]:
            with pytest.raises(InvalidValue, match="cannot"):
                writer["bad"] = bad
        with SyncMap("typed-values", shared_redis_url, codec=codec) as reader:
            assert reader.statistics().hits == 0
            for key, value in stored.items():
                got = reader[key]
                assert same(value, got), (key, value, got)
                assert same(value, reader[key]), key  # a hit: from the near cache
            assert "bad" not in reader  # nothing was sent for a refused value
            assert sorted(reader.keys(), key=str) == sorted(stored, key=str)
            for key, value in reader.items():  # the bulk path decodes the same way
                assert same(stored[key], value), key
