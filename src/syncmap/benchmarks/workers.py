"""Worker processes for the multi-process benchmarks (propagation, lock hand-off).

Started once with ``spawn`` (a clean interpreter, as a real server would be) and reused for every
segment: each waits for commands on its own queue and answers on a shared one.  Timings cross
processes on CLOCK_MONOTONIC (``time.monotonic_ns()``), which every process of a Linux host
shares.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from typing import Any

CTX = mp.get_context("spawn")
START_TIMEOUT = 120.0  # spawning 16 interpreters on 2 busy cores takes a while


def serve(wid: int, cmds: Queue[Any], out: Queue[Any], handle: Callable[[Any], Any]) -> None:
    """A worker's loop: report ready, then answer each command with ``handle(cmd)`` until None.

    Every answer is ``(status, wid, payload)``: ``("ok", wid, reply)`` or ``("error", wid, text)``.
    """
    out.put(("ok", wid, "ready"))
    while (cmd := cmds.get()) is not None:
        try:
            out.put(("ok", wid, handle(cmd)))
        except Exception as exc:
            out.put(("error", wid, f"{type(exc).__name__}: {exc}"))


@dataclass(slots=True)
class Pool:
    """``n`` worker processes, each running ``target(wid, cmds, out, *args)`` (which calls
    :func:`serve`)."""

    procs: list[BaseProcess]
    cmds: list[Queue[Any]]
    out: Queue[Any]

    @classmethod
    def start(cls, target: Callable[..., None], n: int, args: Sequence[Any] = ()) -> Pool:
        cmds: list[Queue[Any]] = [CTX.Queue() for _ in range(n)]
        out: Queue[Any] = CTX.Queue()
        procs: list[BaseProcess] = [
            CTX.Process(target=target, args=(i, cmds[i], out, *args), daemon=True) for i in range(n)
        ]
        pool = cls(procs, cmds, out)
        try:
            for p in procs:
                p.start()
            pool.gather(range(n), START_TIMEOUT)
        except BaseException:
            pool.stop()
            raise
        return pool

    def ask(self, wids: Sequence[int], cmd: Any, timeout: float) -> dict[int, Any]:
        """Send ``cmd`` to the workers ``wids``; their replies, by worker id."""
        for wid in wids:
            self.cmds[wid].put(cmd)
        return self.gather(wids, timeout)

    def gather(self, wids: Sequence[int], timeout: float) -> dict[int, Any]:
        replies: dict[int, Any] = {}
        errors = []
        for _ in wids:
            status, wid, payload = self.out.get(timeout=timeout)
            if status == "error":
                errors.append(f"process {wid}: {payload}")
            else:
                replies[wid] = payload
        if errors:
            raise WorkerError("; ".join(errors))
        return replies

    def stop(self) -> None:
        for q in self.cmds:
            q.put(None)
        for p in self.procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


class WorkerError(RuntimeError):
    """A worker process reported an exception; the message names the process and the error."""
