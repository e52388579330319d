"""The store seam: one method every way of reaching Redis implements.

Contract (every executor, checked by ``syncmap.testing.storeconformance``):

* ``call(commands, write=..., partial=...)`` sends the commands as one batch and returns their
  replies in order;
* ``StoreUnavailable``: nothing ran (no connection, refused before running: READONLY,
  MASTERDOWN, LOADING, OOM, NOREPLICAS, a deadline passed before sending);
* ``WriteOutcomeUnknown``: a write may have run (the connection failed after sending); a write
  that may have run is never retried; a read is retried once;
* NOSCRIPT is handled inside (load the scripts, resend what did not run);
* ``partial=True`` returns refusals (as ``SyncMapError``) in place of their replies instead of
  raising the first: the other commands did run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Command = tuple[Any, ...]


class Executor(Protocol):
    where: str

    def call(
        self, commands: Sequence[Command], *, write: bool, partial: bool = False
    ) -> list[Any]: ...

    def close(self) -> None: ...
