"""docs/protocol.md names each map script by the SHA-1 of its source: keep the two in step."""

from __future__ import annotations

import re
from pathlib import Path

from syncmap.store.executor import SHAS

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def test_the_documented_script_shas_are_the_running_ones() -> None:
    rows = dict(re.findall(r"^\| (set|delete|mset|clear|probe) \| `([0-9a-f]{40})` \|$",
                           DOC.read_text(), re.MULTILINE))  # fmt: skip
    assert rows == {name: SHAS[name] for name in ("set", "delete", "mset", "clear", "probe")}
