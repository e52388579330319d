"""A value comes back as what was stored (same types, equal values) or is refused at write time.

Round-trip properties per codec: ``decode(encode(v))`` is ``v`` recursively (type by type, NaN equal
to NaN, -0.0 not equal to 0.0, tzinfo and fold kept), or ``encode`` raises ``InvalidValue``.
docs/values.md has the table these tests check.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import decimal
import enum
import math
import uuid
import zoneinfo
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncmap.codec import JsonCodec, MsgpackCodec
from syncmap.errors import InvalidValue
from syncmap.testing.values import same

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def roundtrip(codec: Any, value: Any) -> None:
    """The property: the same value back, or a clear refusal naming a type."""
    try:
        data = codec.encode(value)
    except InvalidValue as exc:
        assert "cannot" in str(exc)
        return
    back = codec.decode(data)
    assert same(value, back), (value, back)


# ---- strategies --------------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
fixed_tz = st.builds(
    dt.timezone, st.timedeltas(min_value=-dt.timedelta(hours=23, minutes=59),
                               max_value=dt.timedelta(hours=23, minutes=59)),
)  # fmt: skip
named_tz = st.builds(dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-12),
                                                max_value=dt.timedelta(hours=12)),
                     st.text(min_size=1, max_size=8))  # fmt: skip
any_tz = st.none() | fixed_tz | named_tz | st.sampled_from(ZONES).map(zoneinfo.ZoneInfo)

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)  # fmt: skip
msgpack_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text() | st.binary()
)  # fmt: skip
typed_scalars = (
    st.datetimes(timezones=any_tz).map(lambda d: d.replace(fold=0)) | st.datetimes(timezones=any_tz)
    | st.dates() | st.times(timezones=any_tz) | st.timedeltas() | st.uuids()
    | st.decimals(allow_nan=True, allow_infinity=True)
)  # fmt: skip
hashable = st.recursive(
    msgpack_scalars
    | typed_scalars.filter(lambda v: not (isinstance(v, decimal.Decimal) and v.is_snan())),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)


def values(scalars: st.SearchStrategy[Any], keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(keys, inner, max_size=4)
            | st.lists(inner, max_size=3).map(tuple)
            | st.sets(hashable, max_size=3)
            | st.frozensets(hashable, max_size=3)
        ),
        max_leaves=12,
    )


msgpack_values = values(msgpack_scalars | typed_scalars, hashable)
json_values = values(json_scalars, st.text())


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Label(str):
    pass


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Item(msgspec.Struct):
    name: str


UNSUPPORTED = [
    bytearray(b"x"), memoryview(b"x"), collections.OrderedDict(a=1), collections.defaultdict(int),
    collections.Counter("ab"), Color.RED, Level.HIGH, Label("x"), Point(1, 2), Item("x"),
    complex(1, 2), object(), msgspec.msgpack.Ext(1, b"x"),
]  # fmt: skip
anything = st.recursive(
    msgpack_scalars | typed_scalars | st.sampled_from(UNSUPPORTED),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
    | st.lists(inner, max_size=3).map(tuple),
    max_leaves=8,
)  # fmt: skip


# ---- MessagePack (the default) -----------------------------------------------------------------


@SETTINGS
@given(msgpack_values)
def test_msgpack_gives_back_every_supported_value(value: Any) -> None:
    codec = MsgpackCodec()
    back = codec.decode(codec.encode(value))  # never refused: all of these are supported
    assert same(value, back), (value, back)


@SETTINGS
@given(anything)
def test_msgpack_gives_back_or_refuses_anything(value: Any) -> None:
    roundtrip(MsgpackCodec(), value)


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 5, 17, 9, 30, 1, 250),  # naive: came back as a str
        dt.date(2024, 5, 17),
        dt.time(23, 59, 58, 7),
        dt.timedelta(days=-1, seconds=3, microseconds=9),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("-1.500"),
        decimal.Decimal("NaN"),
        dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),  # was UTC
        dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5), "EST")),
        dt.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
        dt.datetime(2024, 5, 17, tzinfo=dt.UTC),
        (1, "a", (2.5, None)),
        {1, 2},
        frozenset({(1, 2)}),
        {(1, 2): "tuple key", dt.date(2024, 1, 1): "date key", frozenset({1}): "frozenset key"},
        {1: "a", "1": "b", b"1": "c", 1.5: "d", None: "e", False: "f"},
        [float("nan"), -0.0, float("inf")],
        {"when": [dt.datetime(2024, 1, 1)], "ids": {uuid.UUID(int=1)}},
    ],
    ids=repr,
)
def test_msgpack_keeps_types_that_used_to_change(value: Any) -> None:
    codec = MsgpackCodec()
    assert same(value, codec.decode(codec.encode(value)))


@pytest.mark.parametrize("value", UNSUPPORTED, ids=lambda v: type(v).__name__)
def test_msgpack_refuses_what_would_change_type(value: Any) -> None:
    with pytest.raises(InvalidValue, match=type(value).__name__):
        MsgpackCodec().encode(value)
    with pytest.raises(InvalidValue, match=r"at value\['k'\]\[1\]"):
        MsgpackCodec().encode({"k": [1, value]})


def test_msgpack_refusals_say_what_to_do() -> None:
    def refusal(value: Any) -> str:
        with pytest.raises(InvalidValue) as info:
            MsgpackCodec().encode(value)
        return str(info.value)

    assert "bytes(" in refusal(bytearray(b"x"))
    assert "value_type=Point" in refusal(Point(1, 2))
    assert ".value" in refusal(Color.RED)
    assert "subclass of dict" in refusal(collections.OrderedDict(a=1))
    assert "PickleCodec" in refusal(object())

    class Custom(dt.tzinfo):  # a tzinfo of another class (pytz, dateutil, ...) is refused
        def utcoffset(self, d: Any) -> dt.timedelta:
            return dt.timedelta(0)

    assert "zoneinfo" in refusal(dt.datetime(2024, 1, 1, tzinfo=Custom()))
    assert "recursion" in refusal([cyclic()])


def cyclic() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


def not_nan(k: Any) -> bool:
    return not (isinstance(k, float) and math.isnan(k))


@SETTINGS
@given(
    st.recursive(
        msgpack_scalars,
        lambda i: st.lists(i, max_size=4) | st.dictionaries(msgpack_scalars.filter(not_nan), i),
    )
)
def test_msgpack_reads_what_the_old_version_wrote(value: Any) -> None:
    """Plain data is encoded byte for byte as before, so old values decode unchanged."""
    old = msgspec.msgpack.encode(value)
    assert MsgpackCodec().encode(value) == old
    assert same(msgspec.msgpack.decode(old), MsgpackCodec().decode(old))


def test_msgpack_reads_old_datetime_encodings_as_before() -> None:
    aware = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    naive = dt.datetime(2024, 5, 17, 9, 30)
    codec = MsgpackCodec()
    assert codec.decode(msgspec.msgpack.encode(aware)) == aware.astimezone(dt.UTC)  # timestamp ext
    assert codec.decode(msgspec.msgpack.encode(naive)) == "2024-05-17T09:30:00"
    assert codec.decode(msgspec.msgpack.encode(msgspec.msgpack.Ext(5, b"x"))) == (
        msgspec.msgpack.Ext(5, b"x")
    )


def test_msgpack_extension_bytes_are_the_documented_ones() -> None:
    """docs/protocol.md §3 and docs/values.md: the wire format is stable."""
    codec = MsgpackCodec()
    assert codec.encode(dt.date(2024, 5, 17)).hex() == "c7066193cd07e80511"
    assert codec.encode((1, 2)) == bytes.fromhex("c70366920102")
    assert codec.encode(uuid.UUID(int=1)) == bytes.fromhex("d864" + "00" * 15 + "01")
    assert codec.encode(decimal.Decimal("1.5")) == bytes.fromhex("c70365312e35")
    aware = dt.datetime(2024, 5, 17, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert msgspec.msgpack.decode(codec.encode(aware)[3:]) == [2024, 5, 17, 9, 30, 0, 0, 0,
                                                                7_200_000_000]  # fmt: skip


def test_msgpack_refuses_an_unknown_syncmap_extension() -> None:
    from syncmap.errors import CorruptData

    with pytest.raises(CorruptData, match="extension type 120"):
        MsgpackCodec().decode(msgspec.msgpack.encode(msgspec.msgpack.Ext(120, b"")))


# ---- JSON ----------------------------------------------------------------------------------------


@SETTINGS
@given(values(json_scalars, st.text()).filter(lambda v: not _has(v, (tuple, set, frozenset))))
def test_json_gives_back_every_supported_value(value: Any) -> None:
    codec = JsonCodec()
    assert same(value, codec.decode(codec.encode(value)))


@SETTINGS
@given(msgpack_values | anything)
def test_json_gives_back_or_refuses_anything(value: Any) -> None:
    roundtrip(JsonCodec(), value)


def _has(value: Any, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, kinds):
        return True
    if isinstance(value, dict):
        return any(_has(v, kinds) for v in value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_has(v, kinds) for v in value)
    return False


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({1: "a", "1": "b"}, "keys are strings"),  # came back as {'1': 'b'}
        (float("nan"), "come back as None"),
        ({"x": [float("-inf")]}, r"at value\['x'\]\[0\]"),
        (b"raw", "base64"),
        ((1, 2), "come back as a list"),
        ({1, 2}, "come back as a list"),
        (dt.datetime(2024, 5, 17), "isoformat"),
        (dt.date(2024, 5, 17), "msgpack"),
        (uuid.UUID(int=1), "str\\(x\\)"),
        (decimal.Decimal("1.5"), "value_type"),
        (dt.timedelta(1), "total_seconds"),
        (Point(1, 2), "value_type=Point"),
        (Label("x"), "subclass of str"),
    ],
    ids=repr,
)
def test_json_refuses_what_it_cannot_represent(value: Any, words: str) -> None:
    with pytest.raises(InvalidValue, match=words):
        JsonCodec().encode(value)


# ---- typed values keep decoding into their type --------------------------------------------------


@dataclasses.dataclass
class Record:
    name: str
    when: dt.datetime
    day: dt.date
    ident: uuid.UUID
    amount: decimal.Decimal
    tags: list[str]
    counts: dict[str, int]


class RecordStruct(msgspec.Struct):
    name: str
    when: dt.datetime
    ident: uuid.UUID
    tags: list[str]


def no_fold(d: dt.datetime) -> dt.datetime:
    """Typed fields follow msgspec, which does not keep ``fold`` (docs/values.md)."""
    return d.replace(fold=0)


records = st.builds(
    Record, name=st.text(), when=st.datetimes().map(no_fold), day=st.dates(), ident=st.uuids(),
    amount=st.decimals(allow_nan=False, allow_infinity=False), tags=st.lists(st.text(), max_size=3),
    counts=st.dictionaries(st.text(), st.integers(-(2**63), 2**63 - 1), max_size=3),
)  # fmt: skip
structs = st.builds(
    RecordStruct, name=st.text(), ident=st.uuids(), tags=st.lists(st.text(), max_size=3),
    when=st.datetimes(timezones=st.none() | st.just(dt.UTC)).map(no_fold),
)  # fmt: skip


@SETTINGS
@pytest.mark.parametrize("codec", [MsgpackCodec, JsonCodec])
@given(record=records, struct=structs)
def test_typed_values_decode_into_their_type(codec: Any, record: Record, struct: RecordStruct
                                             ) -> None:  # fmt: skip
    typed = codec(Record)
    back = typed.decode(typed.encode(record))
    assert type(back) is Record
    assert all(same(getattr(record, f.name), getattr(back, f.name))
               for f in dataclasses.fields(Record))  # fmt: skip
    typed_struct = codec(RecordStruct)
    back_struct = typed_struct.decode(typed_struct.encode(struct))
    assert type(back_struct) is RecordStruct
    assert all(same(getattr(struct, f), getattr(back_struct, f)) for f in struct.__struct_fields__)


def test_typed_values_refuse_other_types() -> None:
    with pytest.raises(InvalidValue, match="only stores Record"):
        MsgpackCodec(Record).encode({"name": "x"})


def test_pydantic_values_decode_into_their_type() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Plan(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        tier: str
        starts: dt.date
        ident: uuid.UUID

    plan = Plan(tier="pro", starts=dt.date(2024, 5, 17), ident=uuid.UUID(int=7))
    for codec in (MsgpackCodec(Plan), JsonCodec(Plan)):
        back = codec.decode(codec.encode(plan))
        assert type(back) is Plan and back == plan
