"""The flows' one rule, checked over their source: never yield while holding the guard.

A flow that yielded inside ``with s.guard:`` would hold the map's lock across a round trip to
Redis (every other thread's miss, the feed thread's invalidations and the timer would wait on
the network), and an asyncio driver would deadlock the loop on it.  The checker is tested on a
planted violation too, so a green run means something."""

from __future__ import annotations

import ast
from pathlib import Path

import syncmap.flows

FLOWS = Path(syncmap.flows.__file__).parent


def violations(source: str, filename: str = "<flow>") -> list[str]:
    """``file:line`` of every yield, ``yield from`` or ``await`` inside a ``with <x>.guard``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.With | ast.AsyncWith):
            continue
        guarded = any(
            isinstance(item.context_expr, ast.Attribute) and item.context_expr.attr == "guard"
            for item in node.items
        )
        if not guarded:
            continue
        for inner in (n for stmt in node.body for n in ast.walk(stmt)):
            if isinstance(inner, ast.Yield | ast.YieldFrom | ast.Await):
                found.append(f"{filename}:{inner.lineno}")
    return found


def test_no_flow_yields_while_holding_the_guard() -> None:
    files = sorted(FLOWS.glob("*.py"))
    assert len(files) >= 5, "the flows moved: point this test at them"
    found = [v for f in files for v in violations(f.read_text(), f.name)]
    assert found == [], f"yield inside `with s.guard:` at {found}"


def test_every_flow_module_takes_the_guard_somewhere() -> None:
    """The check above must look at code that really uses the guard (not a renamed one)."""
    uses = [f.name for f in FLOWS.glob("*.py") if "with s.guard:" in f.read_text()]
    assert {"reads.py", "writes.py", "bulk.py", "admin.py"} <= set(uses)


def test_the_checker_catches_a_planted_yield_inside_the_guard() -> None:
    planted = (
        "def flow(s):\n"
        "    with s.guard:\n"
        "        token = s.core.begin_fill(1, 0)\n"
        "        reply = yield Call((), False)\n"
        "    return reply\n"
        "def nested(s):\n"
        "    with s.guard:\n"
        "        if True:\n"
        "            yield from other(s)\n"
    )
    assert violations(planted) == ["<flow>:4", "<flow>:9"]
