"""What makes a shared map behave like a dict: views, ``|``, ``copy()``, ``popitem()``, equality.

``SharedMapping`` is the base of both :class:`~syncmap.SyncMap` and
:class:`~syncmap.ReplicatedMap`, so the two return the same things.  Each override of an
inherited ``Mapping`` method is here because the inherited one is either not atomic under
concurrent servers or silently reads the whole map; each says which.  docs/dict.md lists where
a shared map deliberately differs from a dict.

A subclass provides ``copy(skip_corrupt=)`` (a plain dict of every live entry: one round trip in
store mode) and ``_popitem_candidates()`` (some keys that were in the map a moment ago).
"""

from __future__ import annotations

import collections
import copy as copy_module
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

from .keys import Key

_MISSING: Any = object()


class SharedMapping(MutableMapping[Key, Any]):
    """A ``MutableMapping`` whose whole-map operations each read one snapshot."""

    def copy(self, *, skip_corrupt: bool = False) -> dict[Key, Any]:
        """A plain ``dict`` of every live entry (a snapshot); see the subclass."""
        raise NotImplementedError

    def _popitem_candidates(self) -> list[Key]:
        """Keys found in the map just now, in an order that spreads contenders; [] = empty."""
        raise NotImplementedError

    # ---- views: live, one snapshot per operation ---------------------------------------------

    def keys(self, *, skip_corrupt: bool = False) -> KeysView:
        return KeysView(self, skip_corrupt)

    def items(self, *, skip_corrupt: bool = False) -> ItemsView:
        return ItemsView(self, skip_corrupt)

    def values(self, *, skip_corrupt: bool = False) -> ValuesView:
        return ValuesView(self, skip_corrupt)

    # ---- PEP 584 -----------------------------------------------------------------------------

    def __or__(self, other: object) -> dict[Key, Any]:
        """``m | other``: a new plain dict (a snapshot of ``m`` updated with ``other``)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        out = self.copy()
        out.update(_plain(other))
        return out

    def __ror__(self, other: object) -> dict[Key, Any]:
        """``other | m``: a new plain dict (``other`` updated with a snapshot of ``m``)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        out = dict(_plain(other))
        out.update(self.copy())
        return out

    def __ior__(self, other: Any) -> SharedMapping:  # type: ignore[misc]  # dict's |= keeps dict
        """``m |= other``: ``m.update(other)`` (in store mode one round trip, each bucket's part
        atomic); like ``dict``, ``other`` may be a mapping or an iterable of pairs."""
        self.update(_plain(other) if isinstance(other, SharedMapping) else other)
        return self

    # ---- copies: plain dict snapshots, never a second handle on the same threads ------------

    def __copy__(self) -> dict[Key, Any]:
        """``copy.copy(m)`` is ``m.copy()``: a dict snapshot.  A second map object would share
        this one's connection and background threads (closing it closed the original)."""
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[Key, Any]:
        snapshot = self.copy()
        memo[id(self)] = snapshot
        return {copy_module.deepcopy(k, memo): copy_module.deepcopy(v, memo)
                for k, v in snapshot.items()}  # fmt: skip

    # ---- equality: identity ------------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        """Identity, not contents.  ``Mapping.__eq__`` would read the whole map (and the other's)
        on every ``==`` -- including the hidden ones of ``list.remove``, ``x in [maps]`` or a
        mock's call check -- and its answer would be out of date at once.  Compare contents
        explicitly: ``m.copy() == d`` (one snapshot) or ``m.keys() == {...}``."""
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    def __hash__(self) -> int:
        return object.__hash__(self)  # consistent with identity equality

    # ---- popitem: atomic per entry -----------------------------------------------------------

    def popitem(self) -> tuple[Key, Any]:
        """Remove and return some ``(key, value)``; ``KeyError`` only if the map is empty.

        Not ``MutableMapping.popitem``: it picks a key, reads it and deletes it in separate
        steps, so when another server takes that key in between it raises ``KeyError`` on a map
        that is not empty.  Here each candidate is taken by one ``pop`` (atomic in store mode:
        a delete that returns what it deleted, so every entry is popped by exactly one caller);
        a key someone else took first is skipped.  Candidates left over from one read serve the
        next calls; ``KeyError`` is raised only after a fresh read found the map empty.
        """
        hints: collections.deque[Key] = self.__dict__.setdefault(
            "_popitem_hints", collections.deque()
        )
        while True:
            while hints:
                try:
                    key = hints.popleft()
                except IndexError:  # another thread took the last one
                    break
                value = self.pop(key, _MISSING)
                if value is not _MISSING:
                    return key, value
            fresh = self._popitem_candidates()
            if not fresh:
                raise KeyError(f"popitem(): map {getattr(self, 'name', '')!r} is empty")
            hints.extend(fresh)


def _plain(other: Mapping[Any, Any]) -> Mapping[Any, Any]:
    """A shared map as one snapshot (``dict.update`` would read it key by key)."""
    return other.copy() if isinstance(other, SharedMapping) else other


class _View:
    """A view of a shared map: *live* like a dict's (each operation sees the map as it is then),
    and each operation reads one snapshot (``copy()``), so a set operation is one round trip
    in store mode, not one read per element as the ``collections.abc`` mixins would make."""

    def __init__(self, mapping: SharedMapping, skip_corrupt: bool = False) -> None:
        self._mapping = mapping
        self._skip = skip_corrupt

    def _now(self) -> dict[Key, Any]:
        return self._mapping.copy(skip_corrupt=self._skip)

    def __len__(self) -> int:
        # len(m) is a cheap count; with skip_corrupt only the snapshot says what is left out.
        return len(self._now()) if self._skip else len(self._mapping)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._mapping!r})"


class _SetView(_View):
    """Set operations and comparisons on one snapshot, answered as ``dict`` views answer them."""

    def _set(self) -> Any:  # the dict_keys / dict_items of one snapshot
        raise NotImplementedError

    def __and__(self, other: Iterable[Any]) -> Any:
        return self._set() & other

    def __or__(self, other: Iterable[Any]) -> Any:
        return self._set() | other

    def __sub__(self, other: Iterable[Any]) -> Any:
        return self._set() - other

    def __xor__(self, other: Iterable[Any]) -> Any:
        return self._set() ^ other

    def __rand__(self, other: Iterable[Any]) -> Any:
        return other & self._set()

    def __ror__(self, other: Iterable[Any]) -> Any:
        return other | self._set()

    def __rsub__(self, other: Iterable[Any]) -> Any:
        return set(other) - self._set()

    def __rxor__(self, other: Iterable[Any]) -> Any:
        return other ^ self._set()

    def __eq__(self, other: object) -> bool:
        return bool(self._set() == other)

    def __ne__(self, other: object) -> bool:
        return bool(self._set() != other)

    def __le__(self, other: Any) -> bool:
        return bool(self._set() <= other)

    def __lt__(self, other: Any) -> bool:
        return bool(self._set() < other)

    def __ge__(self, other: Any) -> bool:
        return bool(self._set() >= other)

    def __gt__(self, other: Any) -> bool:
        return bool(self._set() > other)

    def isdisjoint(self, other: Iterable[Any]) -> bool:
        return bool(self._set().isdisjoint(other))

    __hash__ = None  # type: ignore[assignment]


class KeysView(_SetView, collections.abc.KeysView[Key]):
    """``m.keys()``: iteration and set operations read one snapshot; ``k in view`` is
    ``k in m`` (a cached hit when it can be); ``len(view)`` is ``len(m)``."""

    def _set(self) -> Any:
        return self._now().keys()

    def __contains__(self, key: object) -> bool:
        return key in self._mapping

    def __iter__(self) -> Iterator[Key]:
        return iter(self._now())


class ItemsView(_SetView, collections.abc.ItemsView[Key, Any]):
    """``m.items()``: iteration and set operations read one snapshot; ``(k, v) in view`` reads
    ``k`` once."""

    def _set(self) -> Any:
        return self._now().items()

    def __contains__(self, item: object) -> bool:
        if not (isinstance(item, tuple) and len(item) == 2):
            return False
        value = self._mapping.get(item[0], _MISSING)
        return value is not _MISSING and (value is item[1] or bool(value == item[1]))

    def __iter__(self) -> Iterator[tuple[Key, Any]]:
        return iter(self._now().items())


class ValuesView(_View, collections.abc.ValuesView[Any]):
    """``m.values()``: iteration and ``in`` read one snapshot.  Like a dict's, it has no set
    operations and compares by identity."""

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self._now().values())

    def __iter__(self) -> Iterator[Any]:
        return iter(self._now().values())
