"""S18 codec-and-message-fuzz (TESTPLAN §8): every decoder that reads bytes from the store or the
feed, driven by Hypothesis with random and mutated inputs; registered for tests and ``syncmap
torture``.

Targets: the change-message decoder (``core.wire.decode_message``) with each decoded message then
applied to a near cache (ordered and unordered, so the core's handling of whatever decodes is
fuzzed too), the stored-value header (``unpack_value_epoch``), and the codecs through their public
``Codec.decode`` only: MessagePack, JSON, MessagePack with a value type, and signed pickle (whose
signature check must refuse every mutated input before ``pickle.loads``; the signed path is not
fuzzed, since a signed pickle is trusted by design).

The only exception allowed to escape is :class:`~syncmap.errors.SyncMapError` (in practice
``CorruptData``).  Inputs are random bytes, and valid encodings with bytes flipped, cut, inserted or
length fields set to extremes.  Atheris (coverage-guided) is not used: Hypothesis runs everywhere
the tests do.  The time is split evenly between the targets, in batches of 200 examples, at least
one batch each; no example database is written.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..codec import PickleCodec, make_codec
from ..core.nearcache import NearCache
from ..core.wire import (
    ChangeMessage,
    decode_message,
    encode_message,
    pack_value,
    unpack_value_epoch,
)
from ..errors import SyncMapError
from .scenario import ANOMALIES, OPS, Env, ScenarioResult, finish, scenario, timed

MISSING_HYPOTHESIS = "hypothesis is not installed: pip install hypothesis"
BATCH = 200
SLOW = 0.1  # seconds: an input that takes longer to decode is reported as slow
HANG = 1.0  # seconds: one that takes longer fails the scenario


class _Point(msgspec.Struct, frozen=True):
    x: int
    y: float
    tags: list[str] = []


@dataclass(slots=True)
class _Stats:
    examples: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    refused: int = 0
    slow: int = 0
    slowest: float = 0.0


def _message_target() -> Callable[[bytes], object]:
    cores = [NearCache(4, ordered=True), NearCache(4, ordered=False)]
    for core in cores:
        core.on_feed_up(0.0)
        core.on_probe([(7, 5)] * 4, 0.0, 0.0, core.tops())

    def apply(data: bytes) -> object:
        msg = decode_message(data)
        for core in cores:
            core.on_message(msg, 0.1, want_events=True)
        return msg

    return apply


def targets() -> dict[str, Callable[[bytes], object]]:
    """Name -> function of the bytes under test."""
    return {
        "message": _message_target(),
        "value_header": unpack_value_epoch,
        "msgpack": make_codec("msgpack").decode,
        "json": make_codec("json").decode,
        "msgpack_typed": make_codec("msgpack", _Point).decode,
        "pickle_hmac": PickleCodec(b"s18-fuzz-signing-key!").decode,
    }


def _seeds(st: Any) -> dict[str, Any]:
    """Valid encodings per target (to be mutated), as Hypothesis strategies."""
    keys = st.binary(max_size=12).map(lambda b: b"s" + b)
    message = st.builds(
        ChangeMessage,
        st.integers(1, 5), st.integers(0, 5), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1),
        st.text(max_size=8), st.lists(keys, max_size=6).map(tuple),
    ).map(encode_message)  # fmt: skip
    plain = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.text(max_size=10) | st.binary(max_size=10),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                      max_size=4),
        max_leaves=10,
    )  # fmt: skip
    msgpack, json = msgspec.msgpack.encode, msgspec.json.encode
    point = st.builds(_Point, st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False),
                      st.lists(st.text(max_size=4), max_size=3))  # fmt: skip
    u64 = st.integers(0, 2**64 - 1)
    return {
        "message": message,
        "value_header": st.builds(pack_value, u64, u64, st.binary(max_size=8), u64),
        "msgpack": plain.map(msgpack),
        "json": plain.map(lambda v: json(v) if _json_ok(v) else b"null"),
        "msgpack_typed": point.map(msgpack),
        "pickle_hmac": plain.map(PickleCodec(b"s18-fuzz-signing-key!").encode),
    }


def _json_ok(value: Any) -> bool:
    try:
        msgspec.json.encode(value)
    except Exception:
        return False
    return True


def _mutated(st: Any, seed: Any) -> Any:
    """``seed``'s bytes with one to three edits: flip, cut, insert, or an extreme u32."""
    edit = st.tuples(
        st.sampled_from("fcix"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=8)
    )

    def apply(args: tuple[bytes, list[tuple[str, int, bytes]]]) -> bytes:
        data, edits = bytearray(args[0]), args[1]
        for kind, at, junk in edits:
            i = at % (len(data) + 1)
            if kind == "f" and data:
                data[i % len(data)] ^= junk[0] or 1
            elif kind == "c":
                del data[i:]
            elif kind == "i":
                data[i:i] = junk
            else:
                data[i : i + 4] = struct.pack(">I", (0, 1, 0x7FFFFFFF, 0xFFFFFFFF)[junk[0] % 4])
        return bytes(data)

    return st.tuples(seed, st.lists(edit, min_size=1, max_size=3)).map(apply)


def _check(name: str, fn: Callable[[bytes], object], stats: _Stats) -> Callable[[bytes], None]:
    def check(data: bytes) -> None:
        stats.examples[name] = stats.examples.get(name, 0) + 1
        started = time.perf_counter()
        try:
            fn(data)
            stats.accepted += 1
        except SyncMapError:
            stats.refused += 1
        took = time.perf_counter() - started
        stats.slowest = max(stats.slowest, took)
        stats.slow += took > SLOW
        assert took < HANG, f"{name} took {took:.2f} s on {len(data)} bytes"

    return check


@scenario("S18", "codec-and-message-fuzz", faults_server=False)
def s18(env: Env, seconds: float = 0.0, *,
        only: dict[str, Callable[[bytes], object]] | None = None) -> ScenarioResult:  # fmt: skip
    """Fuzz every target for ``seconds`` in all (at least one batch each); ``only`` replaces the
    targets (tests plant a decoder that leaks a raw error, to prove the scenario catches it)."""
    result, started = timed("S18", "codec-and-message-fuzz")
    try:
        from hypothesis import HealthCheck, given, settings  # noqa: PLC0415 - lazy: optional
        from hypothesis import strategies as st  # noqa: PLC0415
    except ImportError:
        result.require(False, MISSING_HYPOTHESIS)
        return finish(result, started)
    stats, chosen = _Stats(), only if only is not None else targets()
    seeds = _seeds(st)
    config = settings(max_examples=BATCH, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))  # fmt: skip
    budget = seconds / max(len(chosen), 1)
    for name, fn in chosen.items():
        seed = seeds.get(name, st.binary(max_size=64))
        inputs = st.one_of(st.binary(max_size=256), seed, _mutated(st, seed))
        run = config(given(inputs)(_check(name, fn, stats)))
        end = time.monotonic() + budget
        while True:
            try:
                run()
            except Exception as exc:  # Hypothesis re-raises the shrunk failure
                notes = "".join(f"\n  {n}" for n in getattr(exc, "__notes__", [])[:5])
                result.require(False, f"{name}: {type(exc).__name__}: {exc}"[:2000] + notes)
                break
            if time.monotonic() >= end:
                break
    f = result.figures
    f[OPS] = sum(stats.examples.values())
    f[ANOMALIES] = len(result.failures)
    f["examples"] = f[OPS]
    f["crashes"] = len(result.failures)
    f["accepted"], f["refused"] = stats.accepted, stats.refused
    f["slow_inputs"] = stats.slow
    f["slowest_ms"] = round(stats.slowest * 1000, 1)
    f["per_target"] = ",".join(f"{k}:{v}" for k, v in stats.examples.items())
    return finish(result, started)


__all__ = ["MISSING_HYPOTHESIS", "s18", "targets"]
