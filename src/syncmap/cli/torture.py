"""``syncmap torture``: every named scenario of TESTPLAN §8 in its long form, with a table.

The minutes are split across the selected scenarios as they run: each gets an equal share of
what is left (minus the ~2 s of start-up and quiet period a scenario adds), so one that overran
its share shortens the ones after it.  Scenarios with a minimum length (lock runs: 6 s a variant)
may make the whole run somewhat longer than asked.

Exit status: 0 if every scenario passed, 1 if one failed (or crashed), 2 if it could not start
(no redis-server binary, an unreachable ``--url``, an unknown scenario id).  Guard-off controls
(``--controls``) are shown but are not part of the verdict.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import urlsplit, urlunsplit

import click
import redis

from ..errors import RedisServerNotFound
from .options import redis_client

OVERHEAD_S = 2.0  # start-up and the quiet period of C3 a scenario adds to its ``seconds``
MIN_SECONDS = 1.0
COLUMNS = ("scenario", "seconds", "ops", "anomalies", "stale p50/p99/max ms", "acked lost",
           "fenced acc/rej", "unknown keys", "verdict")  # fmt: skip


# ---- helpers shared with ``syncmap verify`` ---------------------------------------------------


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def unreachable(url: str) -> str | None:
    """None if ``url`` answers PING; otherwise why not, in words."""
    try:
        client = redis_client(url, 5, socket_timeout=10)
    except ValueError as exc:
        return f"not a Redis URL ({exc})"
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def unreachable_message(command: str, url: str, why: str) -> str:
    return (
        f"syncmap {command}: cannot reach Redis at {redact(url)}: {why}\n"
        "  Check that the server is running and reachable from this machine, and the URL's "
        "host, port, password and database: redis://[[user]:password@]host:port/db "
        "(rediss:// for TLS)."
    )


def json_safe(value: Any) -> Any:
    """Figures as JSON can carry them (non-finite floats and odd types become strings)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def rich_console(stream: TextIO) -> Any:
    """A rich Console on ``stream`` if it is a terminal and rich is installed (the ``cli``
    extra), else None."""
    if not stream.isatty():
        return None
    try:
        from rich.console import Console  # noqa: PLC0415 - optional: the ``cli`` extra
    except ImportError:
        return None
    return Console(file=stream)


# ---- what is run --------------------------------------------------------------------------------


@dataclass(slots=True)
class Item:
    sid: str
    name: str
    run: Any  # the scenario function
    faults_server: bool
    control: bool = False  # a guard-off run: it must fail, and is not part of the verdict

    @property
    def label(self) -> str:
        return f"{self.sid} {self.name}" + (" [control]" if self.control else "")


@dataclass(slots=True)
class Outcome:
    item: Item
    result: Any  # ScenarioResult
    crashed: bool = False

    @property
    def verdict(self) -> str:
        passed = self.result.passed
        if self.item.control:
            return "caught (control)" if not passed else "NOT CAUGHT"
        if self.crashed:
            return "CRASHED"
        if passed and "control" in self.result.figures:
            return "PASS (control)"
        return "PASS" if passed else "FAIL"

    @property
    def counts(self) -> bool:
        """Part of torture's pass/fail."""
        return not self.item.control

    @property
    def ok(self) -> bool:
        return bool(self.result.passed) and not self.crashed


def control_options(fn: Any) -> dict[str, Any] | None:
    """The options of a scenario's negative control: ``guard=False`` (its protection off) or
    ``plant=True`` (a bug planted in the history); None if it has neither."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "guard" in params:
        return {"guard": False}
    if "plant" in params:
        return {"plant": True}
    return None


def plan(registry: dict[str, Any], only: Sequence[str] | None, controls: bool) -> list[Item]:
    from ..testing.scenarios import ordered  # noqa: PLC0415 - imports every scenario

    chosen = [r for r in ordered(registry) if only is None or r.id in only]
    items = [Item(r.id, r.name, r.run, r.faults_server) for r in chosen]
    if controls:
        items += [Item(r.id, r.name, r.run, r.faults_server, control=True)
                  for r in chosen if control_options(r.run) is not None]  # fmt: skip
    return items


def run_one(item: Item, env: Any, seconds: float) -> Outcome:
    from ..testing.scenario import ScenarioResult  # noqa: PLC0415

    started = time.monotonic()
    options = (control_options(item.run) or {}) if item.control else {}
    try:
        result = item.run(env, seconds, **options)
    except Exception as exc:
        traceback.print_exc()  # into the run's log (see _stray_output)
        result = ScenarioResult(item.sid, item.name, seconds=time.monotonic() - started)
        result.failures.append(f"crashed: {type(exc).__name__}: {exc}")
        return Outcome(item, result, crashed=True)
    return Outcome(item, result)


# ---- progress -----------------------------------------------------------------------------------


class Progress(Protocol):
    def start(self, index: int, total: int, item: Item, seconds: float) -> None: ...
    def done(self, outcome: Outcome) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """One line when a scenario starts and one when it ends, on stderr."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.prefix = ""

    def start(self, index: int, total: int, item: Item, seconds: float) -> None:
        self.prefix = f"[{index}/{total}] {item.label}"
        print(f"{self.prefix}: running ~{seconds:.0f} s ...", file=self.out, flush=True)

    def done(self, outcome: Outcome) -> None:
        r = outcome.result
        print(f"{self.prefix}: {outcome.verdict} in {r.seconds:.1f} s", file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichProgress:
    """A live bar per scenario (elapsed against its share) and an overall bar, on stderr."""

    def __init__(self, console: Any, total_seconds: float) -> None:
        from rich.markup import escape  # noqa: PLC0415
        from rich.progress import (  # noqa: PLC0415 - optional: the ``cli`` extra
            BarColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichBar  # noqa: PLC0415

        self.escape = escape

        self.console = console
        self.bar = RichBar(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                           TimeElapsedColumn(), console=console, transient=False)  # fmt: skip
        self.overall = self.bar.add_task("torture", total=total_seconds)
        self.task: Any = None
        self.begun = time.monotonic()
        self.task_begun = self.begun
        self.stop = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="torture-progress", daemon=True)
        self.bar.start()
        self.ticker.start()

    def _tick(self) -> None:
        while not self.stop.wait(0.25):
            now = time.monotonic()
            self.bar.update(self.overall, completed=now - self.begun)
            if self.task is not None:
                self.bar.update(self.task, completed=now - self.task_begun)

    def start(self, index: int, total: int, item: Item, seconds: float) -> None:
        self.task_begun = time.monotonic()
        desc = self.escape(f"[{index}/{total}] {item.label}")
        self.task = self.bar.add_task(desc, total=seconds + OVERHEAD_S)

    def done(self, outcome: Outcome) -> None:
        task, self.task = self.task, None
        if task is not None:
            colour = "green" if outcome.ok != outcome.item.control else "red"
            label, verdict = self.escape(outcome.item.label), self.escape(outcome.verdict)
            desc = f"{label}: [{colour}]{verdict}[/]"
            self.bar.update(task, description=desc, total=1, completed=1)

    def close(self) -> None:
        self.stop.set()
        self.ticker.join(2)
        self.bar.stop()


# ---- the table ----------------------------------------------------------------------------------


def _fig(figures: dict[str, Any], name: str) -> str:
    value = figures.get(name)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else f"{value:.0f}"
    return str(value)


def row(o: Outcome) -> list[str]:
    from ..testing import scenario as sc  # noqa: PLC0415

    f = o.result.figures
    stale = "/".join(_fig(f, n) for n in (sc.STALE_P50, sc.STALE_P99, sc.STALE_MAX))
    fenced = "/".join(_fig(f, n) for n in (sc.FENCED_ACCEPTED, sc.FENCED_REJECTED))
    return [
        o.item.label,
        f"{o.result.seconds:.1f}",
        _fig(f, sc.OPS),
        _fig(f, sc.ANOMALIES),
        "-" if stale == "-/-/-" else stale,
        _fig(f, sc.ACKED_LOST),
        "-" if fenced == "-/-" else fenced,
        _fig(f, sc.UNKNOWN_KEYS),
        o.verdict,
    ]


def plain_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [list(COLUMNS), *rows]) for i in range(len(COLUMNS))]
    right = {1, 2, 3, 5, 7}

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(COLUMNS), rule, *(line(r) for r in rows)])


def print_table(outcomes: list[Outcome], console: Any) -> None:
    rows = [row(o) for o in outcomes]
    if console is None:
        click.echo(plain_table(rows))
        return
    from rich import box  # noqa: PLC0415 - optional: the ``cli`` extra
    from rich.markup import escape  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    if console.width < len(plain_table(rows).splitlines()[0]) + 2 * len(COLUMNS):
        click.echo(plain_table(rows))  # too narrow for a boxed table: plain lines wrap legibly
        return
    table = Table(title="syncmap torture", box=box.SIMPLE_HEAD)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="right" if i in {1, 2, 3, 5, 7} else "left", no_wrap=True)
    for o, cells in zip(outcomes, rows, strict=True):
        style = "green" if (o.ok if o.counts else not o.result.passed) else "red"
        table.add_row(*map(escape, cells[:-1]), f"[{style}]{escape(cells[-1])}[/]")
    console.print(table)


def print_failures(outcomes: list[Outcome]) -> None:
    for o in outcomes:
        if o.counts and not o.ok:
            click.echo(f"\n{o.item.label}: {o.verdict}")
            for failure in o.result.failures[:10]:
                text = failure if len(failure) < 2000 else failure[:2000] + " ..."
                click.echo(f"  - {text}")
        elif not o.counts and o.result.passed:
            click.echo(f"\n{o.item.label}: the guard-off run passed: its oracle caught nothing "
                       "this time (a control's verdict is not part of torture's)")  # fmt: skip


# ---- the command --------------------------------------------------------------------------------


def _envs(url: str | None, binary: str | None, namespace: str) -> tuple[Any, Any]:
    from ..testing.scenario import Env  # noqa: PLC0415

    return Env(redis_binary=binary, url=url, namespace=namespace), Env(redis_binary=binary)


@contextlib.contextmanager
def _stray_output(path: Path) -> Iterator[TextIO]:
    """Send file descriptor 2 (this process's and every child's stderr: the reconnect warnings
    of server processes whose connections a scenario cuts) to ``path``; yields a stream on the
    original stderr for the progress display."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield terminal
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


@contextlib.contextmanager
def _progress(total: float, stream: TextIO) -> Iterator[Progress]:
    console = rich_console(stream)
    shown: Progress = RichProgress(console, total) if console is not None else PlainProgress(stream)
    try:
        yield shown
    finally:
        shown.close()


def run_all(items: list[Item], total_s: float, user_env: Any, private_env: Any,
            progress: Progress) -> tuple[list[Outcome], bool]:  # fmt: skip
    """Run ``items`` one after another in ``total_s``; (outcomes, interrupted)."""
    outcomes: list[Outcome] = []
    begun = time.monotonic()
    for i, item in enumerate(items):
        left = total_s - (time.monotonic() - begun)
        seconds = max(MIN_SECONDS, left / (len(items) - i) - OVERHEAD_S)
        env = user_env if user_env.url and not item.faults_server else private_env
        progress.start(i + 1, len(items), item, seconds)
        try:
            outcome = run_one(item, env, seconds)
        except KeyboardInterrupt:
            return outcomes, True
        outcomes.append(outcome)
        progress.done(outcome)
    return outcomes, False


@click.command("torture")
@click.option("--minutes", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Total time, split across the scenarios.")  # fmt: skip
@click.option("--only", metavar="IDS", help="Comma-separated scenario ids, e.g. S04,S07.")
@click.option("--url", help="Run the scenarios that inject no server fault (S01, S04) on this "
              "Redis, with maps of their own they delete afterwards; the others always start "
              "private redis-server processes.")  # fmt: skip
@click.option("--controls", is_flag=True, help="Also run each scenario with its protection "
              "switched off: it must fail (shown, not part of the verdict).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--list", "list_only", is_flag=True, help="List the scenarios and exit.")
@click.option("--log", type=click.Path(dir_okay=False),
              help="Where the stderr of the scenarios' processes goes "
              "(default: a temporary file, named at the end if not empty).")  # fmt: skip
def torture(minutes: float, only: str | None, url: str | None, controls: bool, as_json: bool,
            list_only: bool, log: str | None) -> None:  # fmt: skip
    """Run the TESTPLAN scenarios in their long form; exit 0 if every one passed, 1 if not."""
    from ..embedded import find_redis_server  # noqa: PLC0415
    from ..testing.scenarios import LOAD_ERRORS, load_all, ordered  # noqa: PLC0415

    registry = load_all()
    for module, error in sorted(LOAD_ERRORS.items()):
        click.echo(f"syncmap torture: warning: {module} not loaded: {error}", err=True)
    if list_only:
        for r in ordered(registry):
            where = "private server" if r.faults_server else "private server or --url"
            opts = control_options(r.run)
            guard = f", control: {opts}" if opts else ""
            click.echo(f"{r.id}  {r.name}  ({where}{guard})")
        return
    ids = {sid.upper(): sid for sid in registry}  # s04 -> S04, s04a -> S04a
    wanted = (
        [ids.get(s.strip().upper(), s.strip()) for s in only.split(",") if s.strip()]
        if only
        else None
    )
    unknown = [s for s in wanted or [] if s not in registry]
    if unknown:
        known = ", ".join(r.id for r in ordered(registry))
        click.echo(f"syncmap torture: unknown scenario {', '.join(unknown)} (known: {known})",
                   err=True)  # fmt: skip
        sys.exit(2)
    items = plan(registry, wanted, controls)
    if not items:
        click.echo("syncmap torture: no scenario selected", err=True)
        sys.exit(2)
    if url is not None and (why := unreachable(url)) is not None:
        click.echo(unreachable_message("torture", url, why), err=True)
        sys.exit(2)
    binary: str | None = None
    if any(url is None or i.faults_server for i in items):
        try:
            binary = find_redis_server()
        except RedisServerNotFound as exc:
            click.echo(f"syncmap torture: {exc}", err=True)
            sys.exit(2)
    user_env, private_env = _envs(url, binary, "smtorture")
    total = minutes * 60
    log_path = (
        Path(log) if log else Path(tempfile.gettempdir()) / f"syncmap-torture-{os.getpid()}.log"
    )
    begun = time.monotonic()
    with _stray_output(log_path) as terminal, _progress(total, terminal) as progress:
        outcomes, interrupted = run_all(items, total, user_env, private_env, progress)
    elapsed = time.monotonic() - begun
    passed = report(outcomes, interrupted, elapsed, minutes, as_json)
    if log_path.exists() and log_path.stat().st_size > 0:
        click.echo(f"(stderr of the scenarios' processes: {log_path})", err=True)
    elif not log:
        log_path.unlink(missing_ok=True)
    sys.exit(0 if passed else 1)


def report(outcomes: list[Outcome], interrupted: bool, elapsed: float, minutes: float,
           as_json: bool) -> bool:  # fmt: skip
    """Print the table (or JSON); the verdict: every scenario that counts passed."""
    from ..testing.scenarios import LOAD_ERRORS  # noqa: PLC0415

    counted = [o for o in outcomes if o.counts]
    passed = not interrupted and all(o.ok for o in counted) and len(counted) > 0
    if as_json:
        doc = {
            "passed": passed,
            "interrupted": interrupted,
            "minutes": minutes,
            "elapsed_s": round(elapsed, 1),
            "load_errors": dict(LOAD_ERRORS),
            "scenarios": [
                {"id": o.item.sid, "name": o.item.name, "control": o.item.control,
                 "seconds": round(o.result.seconds, 2), "passed": o.ok, "verdict": o.verdict,
                 "figures": json_safe(o.result.figures), "failures": list(o.result.failures)}
                for o in outcomes
            ],
        }  # fmt: skip
        click.echo(json.dumps(doc, indent=2))
        return passed
    print_table(outcomes, rich_console(sys.stdout))
    print_failures(outcomes)
    good = sum(o.ok for o in counted)
    note = " (interrupted)" if interrupted else ""
    click.echo(f"\n{'PASS' if passed else 'FAIL'}: {good} of {len(counted)} scenarios passed "
               f"in {elapsed / 60:.1f} min{note}")  # fmt: skip
    return passed


__all__ = ["json_safe", "redact", "torture", "unreachable", "unreachable_message"]
