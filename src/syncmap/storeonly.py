"""What replicated mode refuses: the operations that need one authority (a store).

``ReplicatedMap`` takes these methods from :class:`StoreOnly` with ``SyncMap``'s exact
signatures (``tests/integration/test_map_agreement.py`` compares them), so a call that store
mode honours never reaches replicated mode as a silent no-op or a ``TypeError``: it raises
:class:`~syncmap.UnsupportedInMode` naming store mode as the way to get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import UnsupportedInMode
from .flows.reads import MISSING
from .keys import Key

if TYPE_CHECKING:
    from .lock import Lock
    from .mapbase import FenceArg

_MISSING: Any = MISSING  # SyncMap's own sentinel, so the two signatures' defaults are one object
STORE_MODE = (
    "Open the map in store mode for it: SyncMap(name, url='redis://...', feed=...), or "
    "open_map(name, feed=...) with SYNCMAP_URL set"
)


def needs_store(what: str) -> UnsupportedInMode:
    return UnsupportedInMode(
        f"{what} needs one authority that decides atomically; a replicated map (feed only, "
        f"no store) has none. {STORE_MODE}"
    )


def no_fence(what: str) -> UnsupportedInMode:
    """``fence=`` given to a write a replicated map can do, but not fenced."""
    return UnsupportedInMode(
        f"{what}(fence=...): a fenced write is checked by the store against the lock's fencing "
        f"counter, and a replicated map has neither store nor locks. {STORE_MODE}"
    )


class StoreOnly:
    """``SyncMap``'s atomic operations, each refused the same way (module docstring)."""

    def swap(self, key: Key, value: Any, default: Any = None, *, ttl: float | None = None,
             fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Refused: a swap returns the value it replaced, which needs one authority."""
        raise needs_store("swap")

    def setdefault(self, key: Key, default: Any = None, *, ttl: float | None = None,
                   fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Refused: load-or-store needs one authority to say which value won."""
        raise needs_store("setdefault (load-or-store)")

    def compare_and_set(self, key: Key, expected: Any, new: Any, *, ttl: float | None = None,
                        fence: FenceArg | None = None) -> bool:  # fmt: skip
        """Refused: compare-and-set needs one authority."""
        raise needs_store("compare_and_set")

    def compare_and_delete(self, key: Key, expected: Any, *, fence: FenceArg | None = None) -> bool:
        """Refused: compare-and-delete needs one authority."""
        raise needs_store("compare_and_delete")

    def transform(self, key: Key, fn: Callable[[Any], Any], default: Any = _MISSING, *,
                  ttl: float | None = None, fence: FenceArg | None = None) -> Any:  # fmt: skip
        """Refused: an atomic read-modify-write needs one authority."""
        raise needs_store("transform")

    def lock(self, key: Key, *, lease: float = 30.0, **options: Any) -> Lock:
        """Refused: locks (and the fencing that makes them safe) live in the store."""
        raise needs_store("a lock")


class AsyncStoreOnly:
    """The same refusals for ``syncmap.aio.ReplicatedMap``, with ``syncmap.aio.SyncMap``'s
    signatures: coroutines, and ``lock()`` a plain method (it returns a lock to enter)."""

    async def swap(self, key: Key, value: Any, default: Any = None, *, ttl: float | None = None,
                   fence: Any = None) -> Any:  # fmt: skip
        """Refused: a swap returns the value it replaced, which needs one authority."""
        raise needs_store("swap")

    async def setdefault(self, key: Key, default: Any = None, *, ttl: float | None = None,
                         fence: Any = None) -> Any:  # fmt: skip
        """Refused: load-or-store needs one authority to say which value won."""
        raise needs_store("setdefault (load-or-store)")

    async def compare_and_set(self, key: Key, expected: Any, new: Any, *,
                              ttl: float | None = None, fence: Any = None) -> bool:  # fmt: skip
        """Refused: compare-and-set needs one authority."""
        raise needs_store("compare_and_set")

    async def compare_and_delete(self, key: Key, expected: Any, *, fence: Any = None) -> bool:
        """Refused: compare-and-delete needs one authority."""
        raise needs_store("compare_and_delete")

    async def transform(self, key: Key, fn: Callable[[Any], Any], default: Any = _MISSING, *,
                        ttl: float | None = None, fence: Any = None) -> Any:  # fmt: skip
        """Refused: an atomic read-modify-write needs one authority."""
        raise needs_store("transform")

    def lock(self, key: Key, *, lease: float = 30.0, **options: Any) -> Any:
        """Refused: locks (and the fencing that makes them safe) live in the store."""
        raise needs_store("a lock")
