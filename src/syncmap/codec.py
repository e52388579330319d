"""Value codecs: MessagePack (default), JSON, typed values, and signed pickle on request.

Every server decodes what any server wrote, so a codec is part of the map's contract (the map's
metadata records its name and refuses a mismatch).  Pickle is never a default: unpickling runs code,
so anyone able to write one key would own every server.  ``PickleCodec`` therefore requires a
signing key and checks an HMAC-SHA256 *before* ``pickle.loads``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import hashlib
import hmac
import pickle
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

from .errors import ConfigurationError, CorruptData, InvalidValue, ValueTooLarge

_ENCODE_ERRORS = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)
_IMMUTABLE_SCALARS = frozenset(
    {
        type(None), bool, int, float, complex, str, bytes, decimal.Decimal, uuid.UUID,
        _dt.datetime, _dt.date, _dt.time, _dt.timedelta,
    }
)  # fmt: skip


@runtime_checkable
class Codec(Protocol):
    """What a map needs from a codec.  ``name`` is recorded in the map's metadata."""

    name: str

    def encode(self, value: Any) -> bytes: ...

    def decode(self, data: bytes) -> Any: ...


def is_immutable(value: Any, depth: int = 0) -> bool:
    """True when ``value`` can be handed to several callers without copying (aliasing, A10)."""
    cls = value.__class__
    if cls in _IMMUTABLE_SCALARS:
        return True
    if depth > 8:
        return False
    if cls is tuple or cls is frozenset:
        return all(is_immutable(v, depth + 1) for v in value)
    if isinstance(value, msgspec.Struct):
        cfg = value.__struct_config__
        return cfg.frozen and all(
            is_immutable(getattr(value, f), depth + 1) for f in value.__struct_fields__
        )
    if dataclasses.is_dataclass(value) and getattr(cls, "__dataclass_params__").frozen:  # noqa: B009
        return all(
            is_immutable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)
        )
    return False


def _encode_failed(value: Any, exc: BaseException, hint: str) -> InvalidValue:
    return InvalidValue(f"cannot encode value of type {type(value).__name__}: {exc}. {hint}")


# ---- faithful values: what comes back is what was stored, or the write is refused ------------
#
# The untyped MessagePack and JSON codecs refuse at write time every value that would not come back
# with the same type and an equal value (docs/values.md has the table).  The check is a walk over
# the value; plain data (exact str/int/float/bool/None/bytes in exact dicts and lists) is encoded
# as is, anything else goes through the slow path, which converts it or names what is refused.

_LEAVES = frozenset({str, int, float, bool, type(None), bytes})
_JSON_LEAVES = frozenset({str, int, bool, type(None)})
_INF = float("inf")

# MessagePack extension types (docs/protocol.md §3): the payload of each is itself MessagePack.
EXT_DATETIME = 96  # [year, month, day, hour, minute, second, microsecond, fold, tz]
EXT_DATE = 97  # [year, month, day]
EXT_TIME = 98  # [hour, minute, second, microsecond, fold, tz]
EXT_TIMEDELTA = 99  # [days, seconds, microseconds]
EXT_UUID = 100  # the 16 bytes of the UUID (not MessagePack)
EXT_DECIMAL = 101  # str(decimal) as UTF-8 (not MessagePack)
EXT_TUPLE = 102  # array of the items
EXT_SET = 103  # array of the items
EXT_FROZENSET = 104  # array of the items
# tz: nil = naive; int = fixed offset in microseconds (datetime.timezone without a name);
# [int, str] = fixed offset with its name; str = IANA zone key (zoneinfo.ZoneInfo).


class _Refused(Exception):
    """A part of a value that cannot be stored faithfully; ``path`` grows on the way out."""

    def __init__(self, part: Any, why: str) -> None:
        super().__init__(why)
        self.part = part
        self.why = why
        self.path: list[str] = []


class _Ext:
    """A converted part for msgspec's ``enc_hook`` (hashable by identity: usable as a key)."""

    __slots__ = ("code", "data")

    def __init__(self, code: int, data: bytes) -> None:
        self.code = code
        self.data = data


def _plain(value: Any, leaves: frozenset[Any] = _LEAVES) -> bool:
    """True when ``value`` is exact str/int/float/bool/None/bytes in exact dicts and lists: data the
    codec encodes as is and decodes to equal values of the same types.  (The write path's hot loop:
    keep it lean.  A cycle or very deep nesting raises RecursionError: the slow path refuses it.)"""
    cls = value.__class__
    if cls is dict:
        for k in value:
            if k.__class__ not in leaves:
                return False
        items: Any = value.values()
    elif cls is list:
        items = value
    else:
        return cls in leaves
    for x in items:  # noqa: SIM110 - a loop is faster than all() here (the write path)
        if x.__class__ not in leaves and not _plain(x, leaves):
            return False
    return True


def _json_plain(value: Any) -> bool:
    """:func:`_plain` for JSON: str keys only, no bytes, finite floats."""
    cls = value.__class__
    if cls is dict:
        for k in value:
            if k.__class__ is not str:
                return False
        items: Any = value.values()
    elif cls is list:
        items = value
    elif cls is float:
        return bool(-_INF < value < _INF)
    else:
        return cls in _JSON_LEAVES
    for x in items:
        c = x.__class__
        if c is float:
            if not -_INF < x < _INF:
                return False
        elif c not in _JSON_LEAVES and not _json_plain(x):
            return False
    return True


def _walk(value: Any, leaf: Any) -> Any:
    """Rebuild ``value`` with ``leaf(part)`` applied to every part that is not an exact dict or
    list; a refusal records where it happened."""
    cls = value.__class__
    if cls is dict:
        out = {}
        for k, x in value.items():
            try:
                wk = leaf(k, True)
            except _Refused as exc:
                exc.path.append(f" key {k!r}")
                raise
            try:
                out[wk] = _walk(x, leaf)
            except _Refused as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out
    if cls is list:
        items = []
        for i, x in enumerate(value):
            try:
                items.append(_walk(x, leaf))
            except _Refused as exc:
                exc.path.append(f"[{i}]")
                raise
        return items
    return leaf(value, False)


def _type_name(cls: type) -> str:
    mod = cls.__module__
    return cls.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{cls.__qualname__}"


def _why_not(value: Any, codec: str) -> str:
    """Why an unsupported part is refused, and what to do instead (both codecs)."""
    cls = value.__class__
    name = _type_name(cls)
    typed = "give the map value_type=<your type> for typed decoding"
    if isinstance(value, enum.Enum):
        return f"{name} is an Enum and would come back as its plain value: store .value, or {typed}"
    if (
        dataclasses.is_dataclass(value)
        or isinstance(value, msgspec.Struct)
        or hasattr(value, "model_dump")
    ):
        return f"{name} would come back as a dict: give the map value_type={cls.__name__}"
    if isinstance(value, bytearray | memoryview):
        return f"{name} would come back as bytes: convert it with bytes(...)"
    for base in (bool, int, float, str, bytes, list, dict, tuple, set, frozenset):
        if isinstance(value, base):
            return (
                f"{name} is a subclass of {base.__name__} and would come back as a plain "
                f"{base.__name__}: convert it with {base.__name__}(...), or {typed}"
            )
    pickle_hint = "or codec=PickleCodec(signing_key=...) if every server is trusted"
    return (
        f"codec {codec} cannot store {name}: store plain data (docs/values.md), {typed}, "
        f"{pickle_hint}"
    )


def _refusal(value: Any, exc: _Refused, codec: str) -> InvalidValue:
    where = "".join(reversed(exc.path))
    head = f"cannot store value of type {_type_name(type(value))}"
    if exc.part is value:
        return InvalidValue(f"{head}: {exc.why}")
    part = _type_name(type(exc.part))
    at = f" at value{where}" if where else " inside it"
    return InvalidValue(f"{head}: the {part}{at} would not come back as stored: {exc.why}")


class _MsgspecCodec:
    """Shared body of the MessagePack and JSON codecs (msgspec does the work)."""

    name = "?"
    _module: Any = None

    def __init__(self, value_type: Any = None) -> None:
        self.value_type = value_type
        self._pydantic = hasattr(value_type, "model_validate")
        decode_type = Any if value_type is None or self._pydantic else value_type
        self._encoder = self._module.Encoder()
        self._decoder = self._module.Decoder(type=decode_type)

    def encode(self, value: Any) -> bytes:
        try:
            if self._pydantic:
                if not isinstance(value, self.value_type):
                    raise TypeError(f"expected {self.value_type.__name__}")
                value = value.model_dump(mode="json")
            data: bytes = self._encoder.encode(value)
            if self.value_type is not None:
                self.decode(data)  # refuse now what no reader could decode later
        except (CorruptData, *_ENCODE_ERRORS) as exc:
            raise _encode_failed(value, exc, self._hint()) from exc
        return data

    def decode(self, data: bytes) -> Any:
        try:
            value = self._decoder.decode(data)
            if self._pydantic:
                value = self.value_type.model_validate(value)
        except Exception as exc:  # msgspec, pydantic and Python errors alike
            raise CorruptData(
                f"stored value does not decode with codec {self.name}: {exc}"
            ) from exc
        return value

    def _hint(self) -> str:
        if self.value_type is not None:
            return f"This map only stores {getattr(self.value_type, '__name__', self.value_type)}."
        return (
            "Store the types listed in docs/values.md, "
            "or give the map a value_type (dataclass, msgspec.Struct, pydantic model)."
        )


def _tz_wire(tz: _dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if tz.__class__ is _dt.timezone:
        offset = tz.utcoffset(None)
        us = offset // _dt.timedelta(microseconds=1)
        name = tz.tzname(None)
        return us if name == _dt.timezone(offset).tzname(None) else [us, name]
    if tz.__class__ is zoneinfo.ZoneInfo and tz.key is not None:
        return tz.key
    raise _Refused(
        tz,
        f"tzinfo of type {_type_name(type(tz))} cannot be stored faithfully: use "
        "datetime.timezone or zoneinfo.ZoneInfo(key)",
    )


def _tz_value(wire: Any) -> _dt.tzinfo | None:
    if wire is None:
        return None
    if wire.__class__ is int:
        return _dt.timezone(_dt.timedelta(microseconds=wire))
    if wire.__class__ is str:
        return zoneinfo.ZoneInfo(wire)
    us, name = wire
    return _dt.timezone(_dt.timedelta(microseconds=us), name)


def fast_decoder(codec: Codec) -> Callable[[bytes], Any]:
    """``codec.decode``, or for the msgspec codecs the bare msgspec decoder it wraps: the same
    value, without a Python-level call per value (``preload()`` decodes a million).  It raises
    msgspec's own errors, not :class:`CorruptData`: callers that report one ask ``decode``."""
    if (
        isinstance(codec, _MsgspecCodec)
        and type(codec).decode is _MsgspecCodec.decode
        and not codec._pydantic
    ):
        return codec._decoder.decode  # type: ignore[no-any-return]
    return codec.decode


class MsgpackCodec(_MsgspecCodec):
    """MessagePack through msgspec: compact and fast.

    Untyped, a value comes back as what was stored (same types, equal values) or is refused with
    :class:`InvalidValue`: datetime, date, time, timedelta, UUID, Decimal, tuple, set and frozenset
    travel as MessagePack extension types (docs/protocol.md §3, docs/values.md).
    """

    name = "msgpack"
    _module = msgspec.msgpack

    def __init__(self, value_type: Any = None) -> None:
        super().__init__(value_type)
        if value_type is None:
            self._encoder = msgspec.msgpack.Encoder(enc_hook=_ext_of)
            self._decoder = msgspec.msgpack.Decoder(ext_hook=self._ext_hook)
            self.encode = self._encode_any  # type: ignore[method-assign]

    def _encode_any(self, value: Any) -> bytes:
        try:
            if value.__class__ in _LEAVES or _plain(value):
                return self._encoder.encode(value)  # type: ignore[no-any-return]
        except RecursionError:
            pass  # the slow path refuses it with a clear error
        except _ENCODE_ERRORS as exc:
            raise _encode_failed(value, exc, self._hint()) from exc
        try:
            return self._encoder.encode(_walk(value, self._wire))  # type: ignore[no-any-return]
        except _Refused as exc:
            raise _refusal(value, exc, self.name) from None
        except _ENCODE_ERRORS as exc:
            raise _encode_failed(value, exc, self._hint()) from exc

    def _wire(self, part: Any, key: bool) -> Any:  # noqa: PLR0911
        cls = part.__class__
        if cls in _LEAVES:
            return part
        enc = self._encoder.encode
        if cls is tuple:
            return _Ext(EXT_TUPLE, enc([_walk(x, self._wire) for x in part]))
        if cls is frozenset:
            return _Ext(EXT_FROZENSET, enc([_walk(x, self._wire) for x in part]))
        if cls is set:
            return _Ext(EXT_SET, enc([_walk(x, self._wire) for x in part]))
        if cls is _dt.datetime:
            d = part
            return _Ext(
                EXT_DATETIME,
                enc([d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.fold,
                     _tz_wire(d.tzinfo)]),
            )  # fmt: skip
        if cls is _dt.date:
            return _Ext(EXT_DATE, enc([part.year, part.month, part.day]))
        if cls is _dt.time:
            t = part
            return _Ext(
                EXT_TIME,
                enc([t.hour, t.minute, t.second, t.microsecond, t.fold, _tz_wire(t.tzinfo)]),
            )
        if cls is _dt.timedelta:
            return _Ext(EXT_TIMEDELTA, enc([part.days, part.seconds, part.microseconds]))
        if cls is uuid.UUID:
            return _Ext(EXT_UUID, part.bytes)
        if cls is decimal.Decimal:
            return _Ext(EXT_DECIMAL, str(part).encode())
        raise _Refused(part, _why_not(part, self.name))

    def _ext_hook(self, code: int, data: memoryview) -> Any:  # noqa: PLR0911
        dec = self._decoder.decode
        if code == EXT_TUPLE:
            return tuple(dec(data))
        if code == EXT_SET:
            return set(dec(data))
        if code == EXT_FROZENSET:
            return frozenset(dec(data))
        if code == EXT_DATETIME:
            y, mo, d, h, mi, s, us, fold, tz = dec(data)
            return _dt.datetime(y, mo, d, h, mi, s, us, _tz_value(tz), fold=fold)
        if code == EXT_DATE:
            return _dt.date(*dec(data))
        if code == EXT_TIME:
            h, mi, s, us, fold, tz = dec(data)
            return _dt.time(h, mi, s, us, _tz_value(tz), fold=fold)
        if code == EXT_TIMEDELTA:
            days, seconds, us = dec(data)
            return _dt.timedelta(days, seconds, us)
        if code == EXT_UUID:
            return uuid.UUID(bytes=bytes(data))
        if code == EXT_DECIMAL:
            return decimal.Decimal(bytes(data).decode())
        if EXT_DATETIME <= code <= 127:
            raise ValueError(f"unknown syncmap extension type {code} (written by a newer syncmap?)")
        return msgspec.msgpack.Ext(code, bytes(data))  # as before: someone else's extension


def _ext_of(obj: Any) -> msgspec.msgpack.Ext:
    if obj.__class__ is _Ext:
        return msgspec.msgpack.Ext(obj.code, obj.data)
    raise TypeError(f"unsupported type {type(obj).__name__}")  # unreachable: _wire refuses first


_JSON_NAMES = {
    _dt.datetime: "x.isoformat()",
    _dt.date: "x.isoformat()",
    _dt.time: "x.isoformat()",
    _dt.timedelta: "x.total_seconds()",
    uuid.UUID: "str(x)",
    decimal.Decimal: "str(x)",
}


class JsonCodec(_MsgspecCodec):
    """JSON through msgspec: readable in redis-cli.

    Untyped, only what JSON represents faithfully is stored: None, bool, int, finite float, str,
    list, and dict with str keys.  Anything else is refused with :class:`InvalidValue`.
    """

    name = "json"
    _module = msgspec.json

    def __init__(self, value_type: Any = None) -> None:
        super().__init__(value_type)
        if value_type is None:
            self.encode = self._encode_any  # type: ignore[method-assign]

    def _encode_any(self, value: Any) -> bytes:
        try:
            plain = _json_plain(value)
        except RecursionError:
            plain = False
        if not plain:
            try:
                _walk(value, self._check)
            except _Refused as exc:
                raise _refusal(value, exc, self.name) from None
            except _ENCODE_ERRORS as exc:
                raise _encode_failed(value, exc, self._hint()) from exc
        try:
            return self._encoder.encode(value)  # type: ignore[no-any-return]
        except _ENCODE_ERRORS as exc:
            raise _encode_failed(value, exc, self._hint()) from exc

    @staticmethod
    def _check(part: Any, key: bool) -> Any:
        cls = part.__class__
        also = "use the default msgpack codec, which keeps it, or a value_type for typed decoding"
        if key and cls is not str:
            raise _Refused(
                part,
                f"JSON object keys are strings, so the key {part!r} would come back as a str: "
                f"use str keys, or {also}",
            )
        if cls in _JSON_LEAVES:
            return part
        if cls is float:
            if -_INF < part < _INF:
                return part
            raise _Refused(part, f"JSON has no {part!r} (it would come back as None): {also}")
        if cls is bytes:
            raise _Refused(
                part, f"JSON has no bytes (they would come back as a base64 str): {also}"
            )
        if cls in (tuple, set, frozenset):
            raise _Refused(
                part, f"JSON has only arrays ({cls.__name__} would come back as a list): "
                f"store a list, or {also}",
            )  # fmt: skip
        if cls in _JSON_NAMES:
            raise _Refused(
                part,
                f"JSON has no {cls.__name__} (it would come back as a str): convert it with "
                f"{_JSON_NAMES[cls]}, or {also}",
            )
        raise _Refused(part, _why_not(part, "json"))


class PickleCodec:
    """Pickle with an HMAC-SHA256 signature checked before loading.

    Only for trusted deployments: whoever holds the signing key can run code on every server.
    """

    name = "pickle-hmac"
    _MAC = 32

    def __init__(self, signing_key: bytes) -> None:
        if not isinstance(signing_key, bytes) or len(signing_key) < 16:
            raise ConfigurationError(
                "PickleCodec needs signing_key=bytes of at least 16 random bytes "
                "(for example os.urandom(32)), shared by every server of the map"
            )
        self._key = signing_key

    def encode(self, value: Any) -> bytes:
        try:
            body = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, *_ENCODE_ERRORS, AttributeError) as exc:
            raise _encode_failed(value, exc, "The value must be picklable.") from exc
        return hmac.digest(self._key, body, hashlib.sha256) + body

    def decode(self, data: bytes) -> Any:
        mac, body = data[: self._MAC], data[self._MAC :]
        if not hmac.compare_digest(mac, hmac.digest(self._key, body, hashlib.sha256)):
            raise CorruptData("pickled value has a bad signature: refused without unpickling it")
        try:
            return pickle.loads(body)  # noqa: S301 - signature verified above
        except Exception as exc:
            raise CorruptData(f"signed pickle does not load: {exc}") from exc


def make_codec(codec: str | Codec | None, value_type: Any = None) -> Codec:
    """Resolve the ``codec=`` argument of a map."""
    if codec is None or codec == "msgpack":
        return MsgpackCodec(value_type)
    if codec == "json":
        return JsonCodec(value_type)
    if codec == "pickle":
        raise ConfigurationError(
            "pickle runs code when it loads, so it is never chosen by name: pass "
            "codec=PickleCodec(signing_key=...) to opt in with a signing key"
        )
    if isinstance(codec, Codec):
        return codec
    raise ConfigurationError(f"unknown codec {codec!r}: use 'msgpack', 'json' or a Codec object")


def encode_limited(codec: Codec, value: Any, limit: int, hint: str = "") -> bytes:
    """``codec.encode(value)``, refused with :class:`ValueTooLarge` over ``limit`` bytes, before
    anything is sent (the map is unchanged everywhere)."""
    data = codec.encode(value)
    if len(data) > limit:
        raise ValueTooLarge(
            f"value of type {type(value).__name__} encodes to {len(data)} bytes, over "
            f"max_value_bytes={limit}; store it elsewhere or raise the limit in MapConfig{hint}"
        )
    return data
