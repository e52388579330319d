"""Reading and writing histories for the linearizability checker.

Three formats:

* **syncmap** (ours): JSON lines, one *completed* operation a line::

      {"process": 3, "key": "k1", "f": "cas", "input": ["a", "b"], "output": true,
       "call_ns": 120, "ret_ns": 180, "type": "ok", "version": 7, "source": "redis"}

  ``type`` is ``ok`` (output known), ``info`` (indeterminate: timeout or broken connection after
  sending; ``ret_ns`` null, output ignored) or ``fail`` (certainly no effect; dropped by the
  checker).  A missing value (the map's "absent") is written ``{"$absent": true}``.  ``version``
  and ``source`` are for the versioned sweep (TESTPLAN §2.6) and ignored here.  The model is
  :data:`~syncmap.testing.linearizability.MAP_MODEL`.
* **jepsen-register**: the etcd logs of Porcupine's test data (``INFO  jepsen.util - P  :type
  :f  value``), one event a line; see ``tests/data/README.md``.
* **jepsen-kv**: Porcupine's kv histories, one EDN map a line.

Times of the two Jepsen formats are line numbers: only their order matters, and the logs are
written in real-time order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .linearizability import (
    ABSENT,
    FAILED,
    KV_MODEL,
    MAP_MODEL,
    REGISTER_MODEL,
    UNKNOWN,
    Model,
    Operation,
)

__all__ = [
    "Format",
    "HistoryFormatError",
    "Keyword",
    "detect_format",
    "load",
    "parse_edn",
    "parse_jepsen_kv",
    "parse_jepsen_register",
    "parse_syncmap",
    "read_history",
    "write_history",
]

Format = Literal["syncmap", "jepsen-register", "jepsen-kv"]
FORMATS: tuple[Format, ...] = ("syncmap", "jepsen-register", "jepsen-kv")


class HistoryFormatError(ValueError):
    """The text is not a history in the expected (or any known) format."""


# ---- a tiny EDN reader --------------------------------------------------------------------------
# Hand-written rather than a dependency: the Jepsen lines we read are flat maps of keywords,
# strings, integers, nil and small vectors, and the PyPI EDN readers are lightly maintained.


@dataclass(frozen=True, slots=True)
class Keyword:
    """An EDN keyword (``:ok``), kept apart from strings."""

    name: str

    def __repr__(self) -> str:
        return ":" + self.name


_TOKEN = re.compile(
    r"""\s*(?:
      (?P<open>[\[({]|\#\{)
    | (?P<close>[\])}])
    | "(?P<string>(?:[^"\\]|\\.)*)"
    | (?P<atom>[^\s,\[\](){}"]+)
    )""",
    re.VERBOSE | re.DOTALL,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "b": "\b", "f": "\f"}
_INT = re.compile(r"[+-]?\d+N?")
_FLOAT = re.compile(r"[+-]?\d+(\.\d*)?([eE][+-]?\d+)?M?")


def _unescape(body: str) -> str:
    def one(m: re.Match[str]) -> str:
        c = m.group(1)
        if c.startswith("u"):
            return chr(int(c[1:], 16))
        return _ESCAPES.get(c, c)

    return re.sub(r"\\(u[0-9a-fA-F]{4}|.)", one, body)


def _atom(text: str) -> Any:
    if text == "nil":
        return None
    if text in ("true", "false"):
        return text == "true"
    if text.startswith(":"):
        return Keyword(text[1:])
    if _INT.fullmatch(text):
        return int(text.rstrip("N"))
    if _FLOAT.fullmatch(text):
        return float(text.rstrip("M"))
    return text  # a symbol: keep its name


def parse_edn(text: str) -> Any:
    """One EDN value: maps, vectors, lists, sets, strings, keywords, numbers, nil, booleans."""
    tokens = [
        (m.lastgroup, m.group(m.lastgroup or 0)) for m in _TOKEN.finditer(text.replace(",", " "))
    ]
    pos = 0

    def value() -> Any:
        nonlocal pos
        if pos >= len(tokens):
            raise HistoryFormatError(f"unexpected end of EDN: {text!r}")
        kind, tok = tokens[pos]
        pos += 1
        if kind == "string":
            return _unescape(tok)
        if kind == "atom":
            return _atom(tok)
        if kind == "close":
            raise HistoryFormatError(f"unexpected {tok!r} in EDN: {text!r}")
        items = []
        closer = {"[": "]", "(": ")", "{": "}", "#{": "}"}[tok]
        while True:
            if pos >= len(tokens):
                raise HistoryFormatError(f"unclosed {tok!r} in EDN: {text!r}")
            if tokens[pos] == ("close", closer):
                pos += 1
                break
            items.append(value())
        if tok == "{":
            if len(items) % 2:
                raise HistoryFormatError(f"odd number of forms in an EDN map: {text!r}")
            return dict(zip(items[::2], items[1::2], strict=True))
        return frozenset(items) if tok == "#{" else items

    if not text.strip() or _TOKEN.sub("", text.replace(",", " ")).strip():
        raise HistoryFormatError(f"not EDN: {text!r}")
    result = value()
    if pos != len(tokens):
        raise HistoryFormatError(f"trailing forms in EDN: {text!r}")
    return result


# ---- Jepsen histories ---------------------------------------------------------------------------

_JEPSEN_LINE = re.compile(
    r"^INFO\s+jepsen\.util\s+-\s+(?P<process>\d+)\s+:(?P<type>invoke|ok|fail|info)"
    r"\s+:(?P<f>[\w-]+)\s*(?P<value>.*?)\s*$"
)


@dataclass(slots=True)
class _Pending:
    f: str
    input: Any
    call: int


def _value(v: Any) -> Any:
    """EDN vectors as tuples (hashable, and what the models unpack)."""
    return tuple(_value(x) for x in v) if isinstance(v, list) else v


def _complete(ops: list[Operation], process: Any, key: Any, p: _Pending, output: Any,
              ret: int | None) -> None:  # fmt: skip
    ops.append(Operation(process, key, p.f, p.input, output, p.call, ret))


def parse_jepsen_register(text: str) -> tuple[list[Operation], Model]:
    """Porcupine's etcd logs, read as its ``parseJepsenLog`` does.

    ``:info`` (either op) and ``:fail :read :timed-out`` are indeterminate: output
    :data:`UNKNOWN`, never returned.  A ``:fail`` cas is a definite ``False`` (it did not take
    effect, and it saw a value other than the expected one).  Any other ``:fail`` certainly had no
    effect (:data:`FAILED`).  An invocation without completion is indeterminate.
    """
    ops: list[Operation] = []
    pending: dict[int, _Pending] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _JEPSEN_LINE.match(line)
        if m is None:
            raise HistoryFormatError(f"line {lineno}: not a Jepsen register event: {line!r}")
        process, kind, f = int(m["process"]), m["type"], m["f"]
        value = _value(parse_edn(m["value"])) if m["value"] else None
        if kind == "invoke":
            if process in pending:
                raise HistoryFormatError(f"line {lineno}: process {process} invoked twice")
            pending[process] = _Pending(f, None if f == "read" else value, lineno)
            continue
        p = pending.pop(process, None)
        if p is None or p.f != f:
            raise HistoryFormatError(f"line {lineno}: {kind} without a matching invoke")
        if kind == "ok":
            output: Any = value if f == "read" else True if f == "cas" else None
            _complete(ops, process, None, p, output, lineno)
        elif kind == "info" or (f == "read" and value == Keyword("timed-out")):
            _complete(ops, process, None, p, UNKNOWN, None)
        elif f == "cas":
            _complete(ops, process, None, p, False, lineno)
        else:
            _complete(ops, process, None, p, FAILED, lineno)
    for process, p in pending.items():
        _complete(ops, process, None, p, UNKNOWN, None)
    return ops, REGISTER_MODEL


def _kv_event(line: str, lineno: int) -> tuple[Any, str, str, Any, Any]:
    """(process, type, f, key, value) of one kv line."""
    event = parse_edn(line)
    if not isinstance(event, dict):
        raise HistoryFormatError(f"line {lineno}: not an EDN map: {line!r}")
    try:
        process, kind, f = (event[Keyword(k)] for k in ("process", "type", "f"))
    except KeyError as exc:
        raise HistoryFormatError(f"line {lineno}: no {exc.args[0]!r}: {line!r}") from None
    if not isinstance(kind, Keyword) or not isinstance(f, Keyword):
        raise HistoryFormatError(f"line {lineno}: :type and :f must be keywords: {line!r}")
    if kind.name not in ("invoke", "ok", "info", "fail"):
        raise HistoryFormatError(f"line {lineno}: unknown :type {kind!r}")
    return (
        process,
        kind.name,
        f.name,
        event.get(Keyword("key")),
        _value(event.get(Keyword("value"))),
    )


def parse_jepsen_kv(text: str) -> tuple[list[Operation], Model]:
    """Porcupine's kv histories: ``{:process P, :type :invoke|:ok|:fail|:info, :f :get|:put|:append,
    :key "K", :value V}`` a line.  A get's value is on its ``:ok``; ``:info`` is indeterminate,
    ``:fail`` certainly had no effect."""
    ops: list[Operation] = []
    pending: dict[Any, tuple[Any, _Pending]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        process, kind, f, key, value = _kv_event(line, lineno)
        if kind == "invoke":
            if process in pending:
                raise HistoryFormatError(f"line {lineno}: process {process} invoked twice")
            pending[process] = (key, _Pending(f, None if f == "get" else value, lineno))
            continue
        entry = pending.pop(process, None)
        if entry is None or entry[1].f != f:
            raise HistoryFormatError(f"line {lineno}: {kind} without a matching invoke")
        key, p = entry
        if kind == "ok":
            _complete(ops, process, key, p, value if f == "get" else None, lineno)
        elif kind == "info":
            _complete(ops, process, key, p, UNKNOWN, None)
        else:
            _complete(ops, process, key, p, FAILED, lineno)
    for process, (key, p) in pending.items():
        _complete(ops, process, key, p, UNKNOWN, None)
    return ops, KV_MODEL


# ---- syncmap's JSON lines -----------------------------------------------------------------------

_ABSENT_JSON = {"$absent": True}


def _to_json(value: Any) -> Any:
    if value is ABSENT:
        return _ABSENT_JSON
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if value == _ABSENT_JSON:
            return ABSENT
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _record(op: Operation) -> dict[str, Any]:
    if op.output is FAILED:
        kind, output, ret = "fail", None, op.ret_ns
    elif op.output is UNKNOWN or op.ret_ns is None:
        kind, output, ret = "info", None, None
    else:
        kind, output, ret = "ok", _to_json(op.output), op.ret_ns
    return {
        "process": op.process,
        "key": _to_json(op.key),
        "f": op.f,
        "input": _to_json(op.input),
        "output": output,
        "call_ns": op.call_ns,
        "ret_ns": ret,
        "type": kind,
    }


def write_history(ops: Iterable[Operation], path: str | Path) -> int:
    """Write ``ops`` as syncmap JSON lines; returns how many.  Values must be JSON-able."""
    n = 0
    with open(path, "w", encoding="utf-8") as out:
        for op in ops:
            out.write(json.dumps(_record(op), separators=(",", ":")) + "\n")
            n += 1
    return n


def parse_syncmap(text: str) -> tuple[list[Operation], Model]:
    ops: list[Operation] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec.get("type", "ok")
            call, ret = int(rec["call_ns"]), rec.get("ret_ns")
            if kind == "ok":
                output = _from_json(rec.get("output"))
                if ret is None:
                    raise HistoryFormatError("an ok operation needs ret_ns")
            elif kind == "info":
                output = UNKNOWN
            elif kind == "fail":
                output = FAILED
            else:
                raise HistoryFormatError(f"unknown type {kind!r}")
            ops.append(
                Operation(
                    process=rec.get("process"),
                    key=_from_json(rec.get("key")),
                    f=str(rec["f"]),
                    input=_from_json(rec.get("input")),
                    output=output,
                    call_ns=call,
                    ret_ns=None if ret is None or kind == "info" else int(ret),
                )
            )
        except HistoryFormatError as exc:
            raise HistoryFormatError(f"line {lineno}: {exc}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HistoryFormatError(
                f"line {lineno}: not a syncmap history record ({exc!r})"
            ) from None
    return ops, MAP_MODEL


def read_history(path: str | Path) -> list[Operation]:
    """The operations of a syncmap JSON-lines history file."""
    return parse_syncmap(Path(path).read_text(encoding="utf-8"))[0]


# ---- detection ----------------------------------------------------------------------------------


def detect_format(text: str) -> Format:
    """Which format ``text`` is in, from its first non-blank line."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        raise HistoryFormatError("empty history")
    if _JEPSEN_LINE.match(line):
        return "jepsen-register"
    if line.startswith("{"):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and "f" in rec and "call_ns" in rec:
            return "syncmap"
        if ":process" in line and ":type" in line:
            return "jepsen-kv"
    raise HistoryFormatError(
        f"not a history in a known format ({', '.join(FORMATS)}): {line[:80]!r}"
    )


_PARSERS = {"syncmap": parse_syncmap, "jepsen-register": parse_jepsen_register,
            "jepsen-kv": parse_jepsen_kv}  # fmt: skip


def load(path: str | Path, fmt: Format | None = None) -> tuple[list[Operation], Model]:
    """Read a history file in ``fmt`` (detected from the content when None) and its model.

    Raises OSError when the file cannot be read, :class:`HistoryFormatError` when it is not a
    history in that format.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HistoryFormatError(f"{path}: not a text file ({exc.reason})") from None
    fmt = fmt or detect_format(text)
    if fmt not in _PARSERS:
        raise HistoryFormatError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    return _PARSERS[fmt](text)
