"""The one seam to Redis: ``Executor.call(commands)``, and what its failures mean.

Everything syncmap sends to Redis (map scripts, reads, probes, locks, feeds' commands) goes
through an executor.  The contract, written here once and kept by every executor
(:class:`~syncmap.store.node.NodeExecutor` on one node, whichever the topology names):

* **order kept**: ``call(commands)`` sends the commands as one pipeline and returns their replies
  in the same order;
* ``StoreUnavailable`` means **nothing ran**: no connection could be had, the call's deadline
  passed before sending, or Redis refused the command before running it (``READONLY`` from a
  demoted master, ``MASTERDOWN``, ``LOADING``, ``OOM``, ``NOREPLICAS``, ``BUSY``);
* ``WriteOutcomeUnknown`` means **it may have run**: a write's connection failed after the request
  was (partly) sent.  Read the key to find out;
* a write that may have run is **never retried**; a read (idempotent) is retried once on a new
  connection;
* a trailing ``WAIT`` is **waited for as long as it blocks**: its reply is read with the socket
  timeout *plus* WAIT's own timeout (:func:`wait_allowance`), so "fewer replicas confirmed"
  arrives as ``NotReplicated`` and is never cut short into ``WriteOutcomeUnknown`` by a socket
  timeout no longer than the WAIT (Sentinel caps the socket timeout at half of down-after);
* ``NOSCRIPT`` is handled inside: the script did not run, so the executor loads the scripts and
  sends those commands again (safe for writes too);
* any other error reply becomes a ``StoreError`` (``StaleFence``, ``ConfigurationError`` for the
  script refusals and ACLs, see :func:`refused`); with ``partial=True`` each refusal is returned
  in place of its reply instead of raising the first (the pipeline's other commands did run).

Commands are plain tuples (``Command``), built by pure builders (``commands.py``) and
:func:`evalsha` here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import ClusterCrossSlotError, NoPermissionError, NoScriptError

from ..errors import (
    ConfigurationError,
    StaleFence,
    StoreError,
    StoreUnavailable,
    SyncMapError,
)
from . import scripts

Command = tuple[Any, ...]
# Refusals after which the node we talk to is no (longer the) master: re-resolve (Sentinel).
NOT_MASTER = frozenset({"READONLY", "MASTERDOWN"})
# A refusal as Redis < 7 reports it from inside a script (see refused).
_SCRIPT_WRAPPED = re.compile(r"^Error running script .*?: -(OOM|READONLY|NOREPLICAS) ")
_NOTHING_RAN = ("OOM", "READONLY", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS")


class Executor(Protocol):
    """Round trips to Redis with the failure meanings of the module docstring."""

    where: str

    def call(
        self, commands: Sequence[Command], *, write: bool, partial: bool = False
    ) -> list[Any]: ...

    def close(self) -> None: ...


class PooledExecutor(Executor, Protocol):
    """An executor with connections of its own (the executors of node.py and clusterexec.py).

    ``within(deadline)`` is a *view* of it: the same connections, each call of the view bounded
    by ``deadline`` instead (a Cluster map's probes: ``MapConfig.probe_deadline``).  A view
    keeps this contract, and leaves every connection as a call of the executor would: at its
    full socket timeout (a shorter one set for a view's handshake or send is put back), or
    closed (a reply the deadline cut short is never left to the next call).  Its ``close()``
    closes nothing: the connections are the executor's."""

    def within(self, deadline: float) -> Executor: ...


class AsyncExecutor(Protocol):
    """The asyncio twin of :class:`Executor`: the same contract, awaited."""

    where: str

    async def call(
        self, commands: Sequence[Command], *, write: bool, partial: bool = False
    ) -> list[Any]: ...

    async def aclose(self) -> None: ...


class AsyncPooledExecutor(AsyncExecutor, Protocol):
    """The asyncio twin of :class:`PooledExecutor`."""

    def within(self, deadline: float) -> AsyncExecutor: ...


SHAS = scripts.SHAS


def wait_allowance(commands: Sequence[Command]) -> float:
    """Seconds the last reply of ``commands`` may take beyond the socket timeout: WAIT's own
    timeout when the batch ends with ``WAIT n ms`` (Redis answers only when that has passed or
    the replicas confirmed), else 0."""
    last = commands[-1] if commands else None
    if last is None or len(last) < 3 or str(last[0]).upper() != "WAIT":
        return 0.0
    return max(int(last[2]), 0) / 1000


def evalsha(name: str, keys: Sequence[Any], *args: Any) -> Command:
    """The EVALSHA command of a script of scripts.py."""
    return ("EVALSHA", SHAS[name], len(keys), *keys, *args)


def error_code(exc: Exception) -> tuple[str, str]:
    """(code, text) of an error reply: ``("READONLY", "READONLY You can't write ...")``.

    redis-py strips the code of the errors it has a class for (OOM, READONLY, MASTERDOWN) and
    keeps it in ``status_code``; the others keep it at the start of the text."""
    text = str(exc)
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    if wrapped := _SCRIPT_WRAPPED.search(text):
        # Redis < 7 wraps a refusal inside a script: "Error running script (call to f_..):
        # @user_script:73: @user_script: 73: -OOM command not allowed ...".  It refuses
        # before the script's first write, so here too nothing ran.
        code, text = wrapped.group(1), text[wrapped.start(1) :]
    return str(code), text


def refused(exc: Exception, where: str) -> Exception:
    """The SyncMapError an error reply of ``where`` stands for."""
    text = str(exc)
    if text.startswith("STALEFENCE"):
        return StaleFence(text.removeprefix("STALEFENCE ") + ": re-acquire the lock")
    if text.startswith("SETTINGS"):
        return ConfigurationError(
            text.removeprefix("SETTINGS ") + ": every server of a map must use the same "
            "bucket count and codec (the map's meta key was lost; see docs/protocol.md)"
        )
    if text.startswith("SEMLIMIT"):
        return ConfigurationError(
            text.removeprefix("SEMLIMIT ") + ": every client of a semaphore must use the "
            "same number of permits (delete its ':n' key to change it)"
        )
    if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't run this" in text:
        return ConfigurationError(
            f"{where} refused a command ({text}); the ACL user needs +@read +@write "
            "+@scripting +@pubsub on the map's keys and channel (see docs/protocol.md)"
        )
    code, text = error_code(exc)
    if isinstance(exc, ClusterCrossSlotError):  # redis-py strips the code: say it
        text = f"CROSSSLOT {text} (a command's keys must share one hash slot); nothing ran"
    if code in _NOTHING_RAN:
        return StoreUnavailable(
            f"{where} refused it ({code} {text.removeprefix(code).strip()}); nothing "
            "ran: retry later"
        )
    return StoreError(f"{where} answered an error: {text}")


def noscript(replies: list[Any]) -> list[int]:
    """Where Redis answered NOSCRIPT (the script cache was flushed): those did not run."""
    return [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]


def settle(replies: list[Any], where: str, *, partial: bool) -> tuple[bool, Exception | None]:
    """Map every error reply to its SyncMapError (:func:`refused`), in place when ``partial``.

    Returns (whether a refusal said the node is not the master, the first refusal to raise or
    None).  Both executors take the same decisions here; only how they react differs."""
    not_master, first = False, None
    for i, reply in enumerate(replies):
        if isinstance(reply, SyncMapError):  # settled already (a Cluster master unreachable)
            mapped: Exception = reply
        elif isinstance(reply, Exception):
            not_master = not_master or error_code(reply)[0] in NOT_MASTER
            mapped = refused(reply, where)
        else:
            continue
        if partial:
            replies[i] = mapped
        elif first is None:
            first = mapped
    return not_master, first
