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
import hashlib
import hmac
import pickle
import uuid
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
            "Store plain data (dict, list, str, int, float, bytes, None, datetime), "
            "or give the map a value_type (dataclass, msgspec.Struct, pydantic model)."
        )


class MsgpackCodec(_MsgspecCodec):
    """MessagePack through msgspec: compact and fast.  Tuples and sets come back as lists."""

    name = "msgpack"
    _module = msgspec.msgpack


class JsonCodec(_MsgspecCodec):
    """JSON through msgspec: readable in redis-cli.  Dict keys must be strings."""

    name = "json"
    _module = msgspec.json


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
