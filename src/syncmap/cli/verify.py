"""``syncmap verify --url URL``: does this Redis give syncmap what it needs?

Runs the scenarios that inject no server fault against the user's Redis: S01 (the store is
linearizable with the cache bypassed; from ``syncmap.testing.scenarios_store``) and S04 (near
caches under load stay within their staleness bound).  Each uses a map of its own under a
private key prefix and deletes every key it made; a last sweep removes anything left under those
prefixes.

Exit status: 0 every check passed, 1 one failed, 2 the Redis could not be reached (or no
scenario could run).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import click
import redis

from .options import redis_client, url_option
from .torture import json_safe, redact, unreachable, unreachable_message

SCENARIOS = ("S01", "S04")


def _sweep(url: str, patterns: list[str]) -> int:
    """Delete what is left under the private prefixes; how many keys that was."""
    client = redis_client(url, 5, socket_timeout=10)
    try:
        keys = {k for p in patterns for k in client.scan_iter(match=p, count=1000)}
        return int(client.delete(*keys)) if keys else 0
    finally:
        client.close()


def _dbsize(url: str) -> int | None:
    client = redis_client(url, 5, socket_timeout=10)
    try:
        return int(client.dbsize())
    except redis.RedisError:
        return None
    finally:
        client.close()


def _run(reg: Any, env: Any, seconds: float, say: Callable[[str], None]) -> Any:
    """Run one registered scenario; a crash is a failure.  Prints the verdict and figures."""
    from ..testing.scenario import ScenarioResult  # noqa: PLC0415

    started = time.monotonic()
    try:
        result = reg.run(env, seconds)
    except Exception as exc:
        result = ScenarioResult(reg.id, reg.name, seconds=time.monotonic() - started)
        result.failures.append(f"crashed: {type(exc).__name__}: {exc}")
    say(f"\n{reg.id} {reg.name}: {'PASS' if result.passed else 'FAIL'} ({result.seconds:.1f} s)")
    say("  " + ", ".join(f"{k}={v}" for k, v in result.figures.items()))
    for failure in result.failures[:10]:
        say(f"  - {failure[:2000]}")
    return result


@click.command("verify")
@url_option("the maps to verify with (they are deleted afterwards)")
@click.option("--seconds", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="How long each scenario runs.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(url: str, seconds: float, as_json: bool) -> None:
    """Run S01 and S04 against a Redis of yours, leaving no key behind (exit 0 / 1 / 2)."""
    from ..testing.scenario import Env  # noqa: PLC0415
    from ..testing.scenarios import LOAD_ERRORS, load_all  # noqa: PLC0415

    shown = redact(url)
    why = unreachable(url)
    if why is not None:
        message = unreachable_message("verify", url, why)
        if as_json:
            click.echo(json.dumps({"url": shown, "passed": False, "error": message}))
        click.echo(message, err=True)
        sys.exit(2)
    registry = load_all()
    runnable = [sid for sid in SCENARIOS if sid in registry]
    if not runnable:
        click.echo(f"syncmap verify: no scenario available ({LOAD_ERRORS})", err=True)
        sys.exit(2)
    tag = uuid.uuid4().hex[:8]
    namespace = f"smverify-{tag}"
    env = Env(url=url, namespace=namespace)
    keys_before = _dbsize(url)
    say = (lambda _text: None) if as_json else click.echo
    say(f"syncmap verify: {shown} ({', '.join(runnable)}, {seconds:g} s each, "
        f"key prefix {namespace}:)")  # fmt: skip
    skipped = [sid for sid in SCENARIOS if sid not in registry]
    for sid in skipped:
        module_errors = "; ".join(f"{m}: {e}" for m, e in LOAD_ERRORS.items())
        say(f"  {sid} skipped: not available" + (f" ({module_errors})" if module_errors else ""))
    results = [_run(registry[sid], env, seconds, say) for sid in runnable]
    # S01 writes under ``namespace``; S04 maps named <namespace>-s04-<random> under "sm".
    try:
        leftover = _sweep(url, [f"{namespace}:*", f"sm:{{{namespace}-*"])
    except redis.RedisError as exc:
        leftover = -1
        say(f"\nwarning: could not check for leftover keys: {exc}")
    keys_after = _dbsize(url)
    passed = all(r.passed for r in results)
    if as_json:
        doc = {
            "url": shown,
            "passed": passed,
            "skipped": skipped,
            "keys_before": keys_before,
            "keys_after": keys_after,
            "leftover_keys_removed": leftover,
            "scenarios": [
                {"id": r.id, "name": r.name, "seconds": round(r.seconds, 2), "passed": r.passed,
                 "figures": json_safe(r.figures), "failures": list(r.failures)}
                for r in results
            ],
        }  # fmt: skip
        click.echo(json.dumps(doc, indent=2))
    else:
        if leftover > 0:
            say(f"\nremoved {leftover} keys the scenarios left under {namespace}:")
        say(f"\nkeys in the database: {keys_before} before, {keys_after} after")
        verdict = "PASS" if passed else "FAIL"
        good = sum(r.passed for r in results)
        say(f"{verdict}: {good} of {len(results)} checks passed on {shown}")
    sys.exit(0 if passed else 1)


__all__ = ["verify"]
