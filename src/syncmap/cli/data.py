"""``syncmap get|set|del|ls|watch MAP ...``: read and write a map from the shell.

Values are JSON on the command line (``set MAP KEY '{"a": 1}'``; ``--raw`` stores the string
as-is) and JSON on output.  Keys are strings; ``--int-key`` makes KEY an int key instead (``1``
and ``"1"`` are different keys in a map).

Exit status: 0 done, 1 the key is not in the map (``get``, ``del``) or the map does not exist
(``get``, ``del``, ``ls``: they never create one; the message lists the maps that do exist when
that is cheap), 2 bad input or Redis could not be reached (the message names the URL and how to
fix it).  The URL: ``--url``, else ``$SYNCMAP_URL``, else ``redis://localhost:6379/0``.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import json
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

import click
import redis

from ..config import MapConfig
from ..errors import SyncMapError
from ..keys import Key
from ..map import SyncMap
from .options import (
    URL_SOURCES,
    map_exists,
    maps_found,
    missing_map_message,
    redis_client,
    url_option,
)
from .torture import redact, unreachable, unreachable_message

CODECS = ("msgpack", "json")
SELF_CHECK_S = 3.0

_url_option = url_option("the map")
_codec_option = click.option(
    "--codec", type=click.Choice(CODECS), default="msgpack", show_default=True,
    help="The codec the map was created with (every user of a map must use the same).",
)  # fmt: skip
_int_key_option = click.option(
    "--int-key", is_flag=True, help="KEY is an int key (1), not the string key ('1')."
)


def fail(command: str, message: str, code: int = 2) -> NoReturn:
    click.echo(f"syncmap {command}: {message}", err=True)
    sys.exit(code)


def to_json(value: Any) -> Any:
    """A value as JSON can carry it: bytes become ``{"$bytes": base64}``, tuples lists, and keys
    of dicts strings; anything else unknown becomes its ``repr``."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(to_json(k)): to_json(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def dumps(value: Any) -> str:
    return json.dumps(to_json(value), ensure_ascii=False)


def parse_key(command: str, key: str, int_key: bool) -> Key:
    if not int_key:
        return key
    try:
        return int(key)
    except ValueError:
        fail(command, f"--int-key: {key!r} is not an integer")


def key_text(key: Key | None) -> str:
    """A key for plain output: strings as they are, other keys as JSON (so 1 and "1" differ)."""
    return key if isinstance(key, str) else dumps(key)


@contextlib.contextmanager
def open_map(command: str, name: str, url: str, codec: str, *, must_exist: bool = False
             ) -> Iterator[SyncMap]:  # fmt: skip
    """The map, opened after a short self-check of the URL; closed on the way out.  Exit 2 (with
    a message naming the URL and the fix) if Redis cannot be reached or the map cannot be
    opened; exit 1 if ``must_exist`` and there is no such map (opening it would create it)."""
    if not url:
        fail(command, "no Redis given: pass --url redis://host:6379/0 or set SYNCMAP_URL")
    why = unreachable(url)
    if why is not None:
        click.echo(unreachable_message(command, url, why), err=True)
        click.echo(f"  {URL_SOURCES}", err=True)
        sys.exit(2)
    if must_exist:
        _require_map(command, name, url)
    config = MapConfig(self_check_timeout=SELF_CHECK_S, socket_timeout=SELF_CHECK_S)
    try:
        m = SyncMap(name, url, codec=codec, config=config)
    except SyncMapError as exc:
        fail(command, f"cannot open map {name!r} on {redact(url)}: {exc}")
    try:
        yield m
    except SyncMapError as exc:
        fail(command, f"map {name!r} on {redact(url)}: {type(exc).__name__}: {exc}")
    finally:
        m.close()


def _require_map(command: str, name: str, url: str) -> None:
    """Exit 1 naming the maps that do exist if map ``name`` does not: a mistyped name must not
    be created by a command that only reads."""
    try:
        client = redis_client(url, SELF_CHECK_S)
        try:
            if map_exists(client, name):
                return
            found = maps_found(client)
        finally:
            client.close()
    except (SyncMapError, redis.RedisError) as exc:
        fail(command, f"cannot look for map {name!r} on {redact(url)}: {exc}")
    fail(command, missing_map_message(name, redact(url), found), 1)


def _note_if_new(name: str, url: str) -> None:
    """``watch`` of a map that does not exist yet is allowed (it prints the first writes), but a
    mistyped name would wait forever in silence: say so on stderr."""
    with contextlib.suppress(SyncMapError, redis.RedisError):
        client = redis_client(url, SELF_CHECK_S)
        try:
            if not map_exists(client, name):
                note = missing_map_message(name, redact(url), maps_found(client))
                click.echo(f"syncmap watch: {note}; waiting for its first write", err=True)
        finally:
            client.close()


@click.command("get")
@click.argument("map_name", metavar="MAP")
@click.argument("key")
@_url_option
@_codec_option
@_int_key_option
@click.option("--raw", is_flag=True, help="Print a string value as-is, not as JSON.")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"map", "key", "value", "version"} as one JSON object.')  # fmt: skip
def get_command(map_name: str, key: str, url: str, codec: str, int_key: bool,
                raw: bool, as_json: bool) -> None:  # fmt: skip
    """Print the value of KEY in MAP as JSON (read from Redis, not a cache).

    Exit 1 with a message on stderr if the key or the map does not exist.
    """
    k = parse_key("get", key, int_key)
    with open_map("get", map_name, url, codec, must_exist=True) as m:
        value, version, _ = m.get_with_meta(k, consistent=True)
    if version == 0:
        fail("get", f"key {key_text(k)!r} is not in map {map_name!r}", 1)
    if as_json:
        click.echo(dumps({"map": map_name, "key": k, "value": value, "version": version}))
    elif raw and isinstance(value, str):
        click.echo(value)
    else:
        click.echo(dumps(value))


@click.command("set")
@click.argument("map_name", metavar="MAP")
@click.argument("key")
@click.argument("value")
@_url_option
@_codec_option
@_int_key_option
@click.option("--raw", is_flag=True, help="Store VALUE as a string, without parsing it as JSON.")
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), default=None, metavar="S",
              help="Expire the key after S seconds (default: never).")  # fmt: skip
def set_command(map_name: str, key: str, value: str, url: str, codec: str,
                int_key: bool, raw: bool, ttl: float | None) -> None:  # fmt: skip
    """Set KEY in MAP to VALUE, parsed as JSON: 42, 3.5, true, null, '"text"', '[1, 2]', '{"a": 1}'.

    A VALUE that is not JSON is refused (exit 2): quote it as a JSON string or pass --raw.
    """
    k = parse_key("set", key, int_key)
    if raw:
        parsed: Any = value
    else:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            fail("set", f"VALUE {value!r} is not JSON ({exc}); to store it as a string, quote it "
                        f"('\"{value}\"') or pass --raw")  # fmt: skip
    with open_map("set", map_name, url, codec) as m:
        m.set(k, parsed, ttl=ttl)


@click.command("del")
@click.argument("map_name", metavar="MAP")
@click.argument("key")
@_url_option
@_codec_option
@_int_key_option
@click.option("--json", "as_json", is_flag=True,
              help='Print {"map", "key", "deleted"} as one JSON object.')  # fmt: skip
def del_command(map_name: str, key: str, url: str, codec: str, int_key: bool,
                as_json: bool) -> None:  # fmt: skip
    """Delete KEY from MAP.  Exit 1 (with a message on stderr) if it or the map was not there."""
    k = parse_key("del", key, int_key)
    with open_map("del", map_name, url, codec, must_exist=True) as m:
        deleted = m.delete(k)
    if as_json:
        click.echo(dumps({"map": map_name, "key": k, "deleted": deleted}))
    if not deleted:
        fail("del", f"key {key_text(k)!r} is not in map {map_name!r}", 1)


def _sort_key(key: Key) -> tuple[int, str]:
    return ({str: 0, int: 1}.get(type(key), 2), key_text(key))


@click.command("ls")
@click.argument("map_name", metavar="MAP")
@_url_option
@_codec_option
@click.option("--pattern", default="*", show_default=True, metavar="GLOB",
              help="Only keys matching this glob (*, ?, [abc]); case-sensitive.")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=0), default=None, metavar="N",
              help="Print at most N entries (default: all).")  # fmt: skip
@click.option("--keys-only", is_flag=True, help="Print the keys only.")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object: {"map", "count", "matched", "truncated", "items": '
                   '[{"key", "value"}...]}.')  # fmt: skip
def ls_command(map_name: str, url: str, codec: str, pattern: str, limit: int | None,
               keys_only: bool, as_json: bool) -> None:  # fmt: skip
    """List the entries of MAP, sorted by key: one ``KEY<TAB>VALUE-as-JSON`` line each.

    A snapshot read in one round trip (not one atomic moment).  Non-string keys are shown as
    JSON and matched against the pattern in that form.  Exit 1 if there is no such map.
    """
    with open_map("ls", map_name, url, codec, must_exist=True) as m:
        items = m.copy().items()
    matched = sorted(
        ((k, v) for k, v in items if fnmatch.fnmatchcase(key_text(k), pattern)),
        key=lambda kv: _sort_key(kv[0]),
    )
    shown = matched if limit is None else matched[:limit]
    if as_json:
        click.echo(dumps({
            "map": map_name, "count": len(shown), "matched": len(matched),
            "truncated": len(shown) < len(matched),
            "items": [{"key": k} if keys_only else {"key": k, "value": v} for k, v in shown],
        }))  # fmt: skip
        return
    for k, v in shown:
        click.echo(key_text(k) if keys_only else f"{key_text(k)}\t{dumps(v)}")
    if len(shown) < len(matched):
        click.echo(f"syncmap ls: showing {len(shown)} of {len(matched)} matching keys "
                   "(raise --limit to see more)", err=True)  # fmt: skip


@click.command("watch")
@click.argument("map_name", metavar="MAP")
@_url_option
@_codec_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per change: {"key", "op", "version", "origin"}.',
)
def watch_command(map_name: str, url: str, codec: str, as_json: bool) -> None:
    """Print every change to MAP as it happens, until Ctrl-C or SIGTERM (exit 0).

    Plain lines are ``OP KEY version=V origin=NODE``.  A "watching ..." line goes to stderr once
    the subscription is live: changes made after it are printed.  Each line is flushed at once.
    MAP need not exist yet (its first writes are printed), so watching creates it.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    out = sys.stdout
    _note_if_new(map_name, url)
    try:
        with open_map("watch", map_name, url, codec) as m, m.watch() as events:
            click.echo(f"syncmap watch: watching map {map_name!r} on {redact(url or '')} "
                       "(Ctrl-C to stop)", err=True)  # fmt: skip
            while not stop.is_set():
                event = events.get(timeout=0.2)
                if event is None:
                    continue
                if as_json:
                    line = dumps({"key": event.key, "op": event.op, "version": event.version,
                                  "origin": event.origin})  # fmt: skip
                else:
                    line = (
                        f"{event.op} {key_text(event.key) if event.key is not None else '-'}"
                        f" version={event.version} origin={event.origin}"
                    )
                out.write(line + "\n")
                out.flush()
    except BrokenPipeError:  # `syncmap watch M | head -3`
        with contextlib.suppress(OSError):
            sys.stdout.close()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


COMMANDS: tuple[click.Command, ...] = (
    get_command, set_command, del_command, ls_command, watch_command,
)  # fmt: skip
