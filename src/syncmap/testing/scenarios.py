"""Every registered scenario (TESTPLAN §8), for ``syncmap torture`` and ``syncmap verify``.

:func:`load_all` imports each ``syncmap.testing.scenarios_*`` module that exists (importing one
registers its scenarios) and returns the registry.  A module that fails to import is skipped and
its error kept in :data:`LOAD_ERRORS`, so one broken module does not hide all the others; the
commands print those errors.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

from .scenario import REGISTRY, Registered

PREFIX = "scenarios_"
#: Module name -> why it could not be imported (filled by :func:`load_all`).
LOAD_ERRORS: dict[str, str] = {}


def modules() -> list[str]:
    """Names of the ``scenarios_*`` modules of this package, sorted."""
    here = str(Path(__file__).parent)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith(PREFIX))


def load_all() -> dict[str, Registered]:
    """Import every ``scenarios_*`` module that imports cleanly; the registry, by scenario id."""
    for name in modules():
        try:
            importlib.import_module(f"{__package__}.{name}")
        except Exception as exc:  # a module being written, or a missing optional dependency
            LOAD_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        else:
            LOAD_ERRORS.pop(name, None)
    return REGISTRY


def sort_key(sid: str) -> tuple[int, str]:
    """S2 before S10: by the number in the id, then the id."""
    m = re.search(r"\d+", sid)
    return (int(m.group()) if m else 1 << 30, sid)


def ordered(registry: dict[str, Registered] | None = None) -> list[Registered]:
    """The registered scenarios in TESTPLAN order (S01, S02, ..., S23)."""
    reg = REGISTRY if registry is None else registry
    return [reg[k] for k in sorted(reg, key=sort_key)]


__all__ = ["LOAD_ERRORS", "load_all", "modules", "ordered", "sort_key"]
