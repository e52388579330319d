"""``syncmap check FILE``: is a recorded history linearizable?

Exit status: 0 linearizable, 1 not linearizable (the witness is printed), 2 unknown (a key ran out
of its budget: that proves nothing either way) or the file could not be read or parsed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..testing.formats import FORMATS, Format, load
from ..testing.linearizability import CheckResult, check

EXIT = {"linearizable": 0, "not linearizable": 1, "unknown": 2}


def _as_json(path: str, model: object, r: CheckResult) -> dict[str, Any]:
    return {
        "file": path,
        "model": getattr(model, "name", repr(model)),
        "verdict": r.verdict,
        "ops": r.ops,
        "keys": r.keys,
        "keys_failed": r.keys_failed,
        "keys_unknown": r.keys_unknown,
        "failed_keys": [repr(k) for k in r.failed_keys[:100]],
        "unknown_keys": [repr(k) for k in r.unknown_keys[:100]],
        "seconds": round(r.seconds, 6),
        "witness": r.witness,
    }


@click.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="History format (default: detected from the content).")  # fmt: skip
@click.option("--budget", default=10.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds of search per key before it is reported unknown.")  # fmt: skip
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Processes checking keys in parallel.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_command(file: str, fmt: Format | None, budget: float, workers: int,
                  as_json: bool) -> None:  # fmt: skip
    """Check a history FILE for linearizability, key by key (exit 0 / 1 not / 2 unknown or error).

    Formats: syncmap JSON lines, the Jepsen etcd register logs and Porcupine's kv histories.
    """
    try:
        ops, model = load(file, fmt)
        result = check(ops, model, budget_s=budget, workers=workers)
    except (OSError, ValueError, TypeError) as exc:  # HistoryFormatError is a ValueError
        message = f"syncmap check: cannot check {file}: {exc}"
        if as_json:
            click.echo(json.dumps({"file": file, "verdict": "error", "error": message}))
        click.echo(message, err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(_as_json(file, model, result)))
        sys.exit(EXIT[result.verdict])
    click.echo(result.verdict)
    if result.verdict == "not linearizable":
        click.echo(result.witness.rstrip())
    elif result.verdict == "unknown":
        shown = ", ".join(repr(k) for k in result.unknown_keys[:20])
        more = f" and {len(result.unknown_keys) - 20} more" if len(result.unknown_keys) > 20 else ""
        click.echo(
            f"ran out of the {budget:g} s budget on {result.keys_unknown} key(s): {shown}{more}"
        )
    click.echo(
        f"{result.ops} ops, {result.keys} keys ({result.keys_failed} not linearizable, "
        f"{result.keys_unknown} unknown), {result.seconds:.3f} s"
    )
    sys.exit(EXIT[result.verdict])
