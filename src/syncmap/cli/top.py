"""``syncmap top MAP``: every server that has MAP open, from the presence records they refresh.

Each ``SyncMap`` (unless ``MapConfig(presence=False)``) writes a small JSON record into the hash
``<ns>:presence:{<map>}`` every ``presence_interval`` seconds; this command reads that hash (one
HGETALL plus TIME) and ignores a record older than three of its refresh periods (a dead server).
The per-second rates are computed by each server over its last refresh period.

Exit status: 0 shown, 2 the Redis could not be reached or refused (its ACL).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import redis

from ..keys import Layout, check_map_name
from .options import redis_client, url_option
from .torture import redact, rich_console, unreachable_message

COLUMNS = ("node", "host:pid", "age", "cached", "hit ratio", "reads/s", "inval/s", "resyncs",
           "lost")  # fmt: skip


def read_presence(client: redis.Redis, layout: Layout) -> tuple[list[dict[str, Any]], int]:
    """The live records (oldest server first) and Redis's clock in ms."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(layout.presence)
    pipe.time()
    raw, (secs, micros) = pipe.execute()
    now_ms = int(secs) * 1000 + int(micros) // 1000
    records = []
    for node, data in raw.items():
        try:
            record = json.loads(data)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        every = float(record.get("every", 2.0))
        age_ms = now_ms - int(record.get("updated", 0))
        if age_ms > every * 3000:
            continue  # a server that stopped refreshing: gone
        record.setdefault("node", node.decode(errors="replace"))
        record["age"] = round(max(age_ms, 0) / 1000, 3)
        records.append(record)
    records.sort(key=lambda r: (r.get("started", 0), str(r.get("node"))))
    return records, now_ms


def _row(r: dict[str, Any]) -> list[str]:
    return [
        str(r.get("node", "?")), f"{r.get('host', '?')}:{r.get('pid', '?')}",
        f"{r.get('age', 0):.1f}s", str(r.get("entries", 0)),
        f"{100 * float(r.get('hit_ratio', 0.0)):.1f}%", f"{float(r.get('reads_per_s', 0)):.1f}",
        f"{float(r.get('invalidations_per_s', 0)):.1f}", str(r.get("resyncs", 0)),
        str(r.get("lost_detected", 0)),
    ]  # fmt: skip


def plain_table(name: str, records: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS), *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [f"map {name}: {len(records)} server(s)"]
    for row in rows:
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _rich_table(name: str, records: list[dict[str, Any]]) -> Any:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title=f"map {name}: {len(records)} server(s)")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for r in records:
        table.add_row(*_row(r))
    return table


@click.command("top")
@click.argument("name", metavar="MAP")
@url_option("the map")
@click.option("--namespace", default="sm", show_default=True, help="The maps' MapConfig.namespace.")
@click.option("--once", is_flag=True, help="Print one table and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON (one line each "
              "refresh; with --once a single JSON document).")  # fmt: skip
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between refreshes of the view.")  # fmt: skip
def top(name: str, url: str, namespace: str, once: bool, as_json: bool, interval: float) -> None:
    """A live view of every server that has MAP open (their presence records)."""
    try:
        check_map_name(name)
    except Exception as exc:
        raise click.BadParameter(str(exc), param_hint="MAP") from exc
    layout = Layout(namespace, name, 1)
    try:
        client = redis_client(url, 5, socket_timeout=10)
    except ValueError as exc:
        click.echo(f"syncmap top: {redact(url)} is not a Redis URL ({exc})", err=True)
        sys.exit(2)

    def snapshot() -> list[dict[str, Any]]:
        try:
            return read_presence(client, layout)[0]
        except redis.exceptions.NoPermissionError as exc:
            click.echo(
                f"syncmap top: Redis at {redact(url)} refused to show map {name!r}: {exc}\n"
                f"  This user needs the presence key ~{layout.presence} with +hgetall and +time "
                "(the servers need +hset +pexpire +hdel on it): see docs/protocol.md §9.",
                err=True,
            )
            sys.exit(2)
        except redis.RedisError as exc:
            click.echo(unreachable_message("top", url, f"{type(exc).__name__}: {exc}"), err=True)
            sys.exit(2)

    try:
        if once:
            _show_once(name, snapshot(), as_json)
        else:
            _show_live(name, snapshot, as_json, interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def _show_once(name: str, records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"map": name, "servers": records}))
        return
    console = rich_console(sys.stdout)
    if console is not None:
        console.print(_rich_table(name, records))
    else:
        click.echo(plain_table(name, records))


def _show_live(
    name: str, snapshot: Callable[[], list[dict[str, Any]]], as_json: bool, interval: float
) -> None:
    console = None if as_json else rich_console(sys.stdout)
    if console is not None:
        from rich.live import Live  # noqa: PLC0415

        with Live(_rich_table(name, snapshot()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_rich_table(name, snapshot()), refresh=True)
    while True:
        records = snapshot()
        if as_json:
            click.echo(json.dumps({"map": name, "servers": records}))
        else:
            click.echo(plain_table(name, records) + "\n")
        sys.stdout.flush()
        time.sleep(interval)
