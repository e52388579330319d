"""The executors of a Redis Cluster: a batch split by owning master, redirects followed.

The contract is ``executor.py``'s, kept across nodes.  One call goes like this:

1. **Route** (:class:`Routing`, pure): each command goes to the master that owns its slot (its
   first key's, ``commands.slot_of``); a keyless command goes with the command before it (or to
   any master).  A trailing ``WAIT`` is not routed: it is sent afterwards to *every* master that
   ran a write of the call, and its reply is the smallest count (each write must be confirmed).
2. **Send** one pipeline per master (the per-node executors of ``node.py``/``anode.py``: their
   connections, NOSCRIPT handling and failure meanings).  The asyncio executor sends them
   concurrently; the thread executor writes every master's pipeline before it reads any reply
   (write all, then read all), so the masters work at the same time: a whole-map read of a
   3-master cluster then takes about as long as its largest part, not the sum of the three.
3. **Redirects**: ``MOVED`` (the slot has another owner) and ``ASK`` (a slot being migrated; the
   key is already on the target) mean that command did *not* run: the topology learns the owner
   (``MOVED``), and those commands alone are sent again (after ``ASKING`` for ``ASK``), at most
   :data:`MAX_REDIRECTS` rounds.  ``TRYAGAIN`` (a multi-key command during a migration: a
   bucket's script names its data hash and its expiry zset, and while a slot moves Redis answers
   it so until both are on one side) did not run either: sent again every
   :data:`TRY_AGAIN_PAUSE`, for at most :data:`TRY_AGAIN_ROUNDS` rounds (about a second, which
   outlasts the migration of one slot of a map) or the call's deadline.  A ``partial`` call
   (a probe, ``update``, ``clear``: one part per bucket) waits only
   :data:`PARTIAL_TRY_AGAIN_ROUNDS` rounds: its other parts must not wait for one moving slot
   (a probe that waited a second would let every bucket's lease lapse); the refused part gets
   ``StoreUnavailable`` in its place.  ``CLUSTERDOWN`` is
   ``StoreUnavailable``: nothing ran.
4. **Failures across nodes.** A master that cannot be reached (``StoreUnavailable``: nothing
   ran *there*) first makes the call read the slot map again, once, unless the call read it
   already: a master that came back on another address (a restarted pod announcing a new IP
   or port), or whose replica already took over, gets its commands sent where the map now says
   (they did not run, so sending them is no retry of a write that may have run; that address is
   not tried again in this call).
   Still unreachable: with ``partial=True`` its commands get that error in place (the other masters'
   parts did run, as a multi-bucket write's parts may); otherwise it is raised, as
   ``WriteOutcomeUnknown`` if a write of this call already ran on another master.  A
   master lost between its writes and its ``WAIT`` counts as confirmed by no replica.
5. **A master that may have run its part** (``WriteOutcomeUnknown``: its connection failed, or
   the deadline passed, after its pipeline was sent; a *hung* master ends so).  With
   ``partial=True`` its commands get that error in place and the other masters' replies are
   returned (the flows decide: a probe takes it as no answer for those buckets, so only their
   leases run out; ``update``/``clear`` drop those buckets' keys and raise it, naming them).
   Otherwise it is raised for the whole call, and the flows drop every key of the batch.  Its
   commands are never sent again (a write that may have run is never retried), nor is its
   ``WAIT`` asked.  One hung master must not cost the others' replies: the thread executor
   sends first to the masters it has an idle connection to (a new connection's connect and
   handshake would wait on a hung master before anything else is sent), and a reply that has
   already arrived is read even once the call's deadline has passed (``node._read_until``).

A view (``within(deadline)``, a Cluster map's probes) routes as its executor does, on its
per-master executors' connections: each of its masters' executors is a view of the executor's
own (``NodeExecutor.within``), so a process holds one data connection per master, not two.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import AskError, ClusterDownError, MovedError, TryAgainError

from ..errors import StoreUnavailable, WriteOutcomeUnknown
from .cluster import ClusterTopology, slot_for
from .commands import slot_of
from .executor import Command, settle
from .node import NodeExecutor, Sent

MAX_REDIRECTS = 5
TRY_AGAIN_PAUSE = 0.02
TRY_AGAIN_ROUNDS = 50
PARTIAL_TRY_AGAIN_ROUNDS = 1
UNCONFIRMED: list[Any] = [0]  # a WAIT's replies when it could not be asked: no replica


@dataclass(slots=True)
class Group:
    """The commands of one round for one master (``ASKING`` before each asked one)."""

    address: str
    indices: list[int]
    commands: list[Command]
    asking: bool = False


@dataclass(slots=True)
class Routing:
    """One call's routing state, round after round (pure: the executors do the I/O)."""

    topology: ClusterTopology
    commands: Sequence[Command]
    write: bool
    partial: bool
    replies: list[Any] = field(init=False)
    todo: list[int] = field(init=False)
    asked: dict[int, str] = field(default_factory=dict)  # index -> the ASK target
    wait: Command | None = field(init=False)
    ran_on: set[str] = field(default_factory=set)
    redirects: int = 0  # rounds that met a MOVED or ASK
    tries: int = 0  # rounds that met a TRYAGAIN
    retry_pause: float = 0.0
    _redirected: bool = False
    _retried: bool = False
    _reread: bool = False  # the slot map was read again for an unreachable master (once a call)
    began: float = field(default_factory=time.monotonic)
    dead: dict[str, StoreUnavailable] = field(default_factory=dict)  # unreachable this call

    def __post_init__(self) -> None:
        cmds = list(self.commands)
        self.wait = cmds.pop() if cmds and str(cmds[-1][0]).upper() == "WAIT" else None
        self.commands = cmds
        self.replies = [None] * len(cmds)
        self.todo = list(range(len(cmds)))

    def groups(self) -> list[Group]:
        """This round's pipelines, one per master (two where some commands were asked)."""
        self.redirects += self._redirected
        self.tries += self._retried
        self._redirected = self._retried = False
        tries = PARTIAL_TRY_AGAIN_ROUNDS if self.partial else TRY_AGAIN_ROUNDS
        if self.redirects > MAX_REDIRECTS or self.tries > tries:
            # Those commands did not run, but others of this call may have (an earlier round,
            # another master): fail them as an unreachable master's (a write part of which ran
            # is of unknown outcome; with ``partial`` the error goes in their places).
            pending, self.todo = self.todo, []
            self.asked.clear()
            self.failed(Group("", pending, []), StoreUnavailable(
                f"{self.topology.where}: still redirected after {self.redirects} rounds and "
                f"{self.tries} TRYAGAIN replies (slots are moving); the commands not yet answered "
                "did not run: retry later"
            ))  # fmt: skip
            return []
        plain: dict[str, Group] = {}
        asked: dict[str, Group] = {}
        last: str | None = None
        for i in self.todo:
            target = self.asked.pop(i, None)
            if target is not None:
                group = asked.setdefault(target, Group(target, [], [], asking=True))
                group.indices.append(i)
                group.commands += [("ASKING",), self.commands[i]]
                continue
            key = slot_of(self.commands[i])
            try:
                address = (self.topology.owner(slot_for(key)) if key is not None
                           else last or self.topology.any_master())  # fmt: skip
            except StoreUnavailable as exc:  # no master serves its slot now: nothing ran
                self.failed(Group("", [i], []), exc)
                continue
            last = address
            if address in self.dead:  # the map, read again, still names it: give up on those
                self.failed(Group("", [i], []), self.dead[address])
                continue
            group = plain.setdefault(address, Group(address, [], []))
            group.indices.append(i)
            group.commands.append(self.commands[i])
        self.todo = []
        return [*plain.values(), *asked.values()]

    def absorb(self, group: Group, replies: list[Any]) -> None:
        """A group's replies: answers kept, redirected commands queued for the next round."""
        if group.asking:
            replies = replies[1::2]  # drop the ASKING replies
        ran = False  # whether any of them ran there (a redirected one did not)
        for i, reply in zip(group.indices, replies, strict=True):
            if isinstance(reply, MovedError):
                self.topology.moved(reply.slot_id, f"{reply.host}:{reply.port}")
                self.todo.append(i)
                self._redirected = True
            elif isinstance(reply, AskError):
                self.asked[i] = f"{reply.host}:{reply.port}"
                self.todo.append(i)
                self._redirected = True
            elif isinstance(reply, TryAgainError):
                self.retry_pause = TRY_AGAIN_PAUSE
                self.todo.append(i)
                self._retried = True
                if group.asking:  # try the ASK target again (the source would only ASK again)
                    self.asked[i] = group.address
            elif isinstance(reply, ClusterDownError):
                self.replies[i] = StoreUnavailable(
                    f"{group.address} says the cluster is down ({reply}); nothing ran: retry later"
                )
            else:
                self.replies[i] = reply
                ran = True
        if ran:
            self.ran_on.add(group.address)
        self.todo.sort()  # a bucket's commands keep their order when sent again

    def unreachable(self, group: Group, exc: StoreUnavailable) -> None:
        """``group``'s master could not be reached, so nothing of it ran there: the first time
        in a call, its commands wait for the next round, routed by the slot map read again
        (module docstring, 4); else :meth:`failed`.  Order: the node executor that failed has
        already marked the map stale; the next :meth:`groups` reads it (the asyncio driver off
        its loop) before anything is sent.

        Not read again when it was read during this call already (the call began with a stale
        map, as every call after a failure does): a map read milliseconds ago names the same
        owner, and the next call reads it anyway.  Order this spares: one master hangs; each
        probe (every Δ/4) read the map before sending, waited out the hung master, then read
        it again before it could return, a blocking round trip *after* the deadline that
        delayed every other master's lease renewal by as much (S27-cluster)."""
        if self._reread or group.asking or self.topology.read_at >= self.began:
            self.failed(group, exc)
            return
        self._reread = True
        self.dead[group.address] = exc
        self.topology.invalidate()
        self.todo = sorted([*self.todo, *group.indices])
        self._redirected = True

    def unknown(self, group: Group, exc: WriteOutcomeUnknown) -> None:
        """``group``'s master failed after its pipeline was sent: its part may have run (module
        docstring, 5).  With ``partial`` the error goes in its commands' places, else it is
        raised for the call.  Called once every other group's replies are absorbed, so their
        redirects are already queued; these commands are not (never sent again)."""
        if not self.partial:
            raise exc
        for i in group.indices:
            self.replies[i] = exc

    def failed(self, group: Group, exc: StoreUnavailable) -> None:
        """A master could not be reached: nothing ran there (see the module docstring)."""
        if self.partial:
            for i in group.indices:
                self.replies[i] = exc
            return
        if self.write and self.ran_on:
            raise WriteOutcomeUnknown(
                f"{exc}; part of this call had already run on {', '.join(sorted(self.ran_on))}:"
                " its outcome is partly unknown. Read the keys to find out"
            ) from exc
        raise exc

    @property
    def done(self) -> bool:
        return not self.todo

    def wait_groups(self) -> list[Group]:
        """The trailing ``WAIT``, once per master that ran a write of this call."""
        if self.wait is None or not self.write:
            return []
        return [Group(a, [], [self.wait]) for a in sorted(self.ran_on)]

    def result(self, waited: list[Any], where: str) -> list[Any]:
        """The replies in order (the ``WAIT`` reply the smallest count), settled.  A master
        whose ``WAIT`` could not be asked (lost after its writes answered) counts 0: its writes
        ran, confirmed by no replica (the flows raise ``NotReplicated``), which is not
        "nothing ran" (``StoreUnavailable``)."""
        replies = list(self.replies)
        if self.wait is not None:
            counts = [r[0] for r in waited if isinstance(r[0], int)]
            replies.append(min(counts) if counts else 0)
        _, first = settle(replies, where, partial=self.partial)
        if first is not None:
            raise first
        return replies


Result = list[Any] | StoreUnavailable | WriteOutcomeUnknown
"""One master's part of a round: its replies, or how it failed (module docstring, 4 and 5)."""


def _route(routing: Routing, groups: Sequence[Group], results: Sequence[Result]) -> None:
    """One round's results into ``routing``, the same for both executors.  Order: every answer
    is absorbed first; then the masters that may have run their part (:meth:`Routing.unknown`,
    which raises without ``partial``); then the unreachable ones, since a write that ran on
    another master makes an unreachable one's failure an unknown outcome (Routing.failed),
    wherever it was in the batch."""
    failed: list[tuple[Group, StoreUnavailable]] = []
    unknown: list[tuple[Group, WriteOutcomeUnknown]] = []
    for group, result in zip(groups, results, strict=True):
        if isinstance(result, StoreUnavailable):
            failed.append((group, result))
        elif isinstance(result, WriteOutcomeUnknown):
            unknown.append((group, result))
        else:
            routing.absorb(group, result)
    for group, maybe in unknown:
        routing.unknown(group, maybe)
    for group, lost in failed:
        routing.unreachable(group, lost)


class ClusterExecutor:
    """The thread driver's executor for a Redis Cluster (module docstring)."""

    def __init__(self, topology: ClusterTopology, *, timeout: float | None = None,
                 deadline: float | None = None) -> None:  # fmt: skip
        self.topology = topology
        self.where = topology.where
        self.timeout = timeout
        self.deadline = deadline
        self._base: ClusterExecutor | None = None  # a view's executor
        self._nodes: dict[str, NodeExecutor] = {}

    def within(self, deadline: float) -> ClusterExecutor:
        """A view: this executor's connections, each call bounded by ``deadline`` (module
        docstring).  Its ``close()`` closes nothing."""
        view = copy.copy(self)
        view.deadline = deadline
        view._base = self._base or self
        view._nodes = {}  # views of the executor's own, made as needed (_node)
        return view

    def _node(self, address: str) -> NodeExecutor:
        node = self._nodes.get(address)
        if node is None:
            if self._base is not None:
                assert self.deadline is not None  # within() takes a float
                node = self._base._node(address).within(self.deadline)
            else:
                node = NodeExecutor(
                    self.topology.node(address), timeout=self.timeout, deadline=self.deadline
                )
            self._nodes[address] = node
        return node

    def call(self, commands: Sequence[Command], *, write: bool, partial: bool = False) -> list[Any]:
        until = None if self.deadline is None else time.monotonic() + self.deadline
        routing = Routing(self.topology, commands, write, partial)
        while not routing.done:
            if routing.retry_pause:
                time.sleep(routing.retry_pause)  # TRYAGAIN: a migration step is under way
                routing.retry_pause = 0.0
            groups = routing.groups()
            results = self._exchange(groups, write, until)
            _route(routing, groups, results)
        # A WAIT cut short (its master lost or hung since its writes answered): those writes
        # ran there, confirmed by no replica (see Routing.result).
        waited = self._exchange(routing.wait_groups(), True, until)
        return routing.result(
            [UNCONFIRMED if isinstance(r, Exception) else r for r in waited], self.where
        )

    def _exchange(self, groups: Sequence[Group], write: bool,
                  until: float | None) -> list[Result]:  # fmt: skip
        """Every group's pipeline written before any reply is read; then each group's replies
        (in ``groups``' order), or the ``StoreUnavailable`` (nothing ran there) or
        ``WriteOutcomeUnknown`` (it may have run) its master gave, for :func:`_route`.

        Sent first: the masters with an idle connection; those that need a new one (connect
        and handshake, both of which a hung master makes wait up to the deadline) after, the
        suspected ones (a connection to them failed: ``ClusterTopology.suspected``) last.
        Order this prevents: a hung master's connection fails a call and is dropped; every
        later call connects to it first, waits out the deadline in its handshake, and then
        finds the deadline passed before it could send anything to the healthy masters.  The
        healthy masters may need a new connection too: a probe (a view sharing this
        executor's connections) holds theirs, sent on and not yet read, while it waits out the
        hung master's handshake; a write then connected to the hung master first, found the
        deadline passed, and applied none of its parts.

        Any other failure (``ConfigurationError``) is raised, but only once every pipeline
        already sent has been read: no connection is left with replies in flight, and nothing
        more is sent after it (as when the pipelines went one by one)."""
        nodes = [self._node(group.address) for group in groups]

        def first(i: int) -> int:
            if nodes[i].ready:
                return 0
            return 2 if self.topology.suspected(groups[i].address) else 1

        order = sorted(range(len(groups)), key=first)  # stable
        sent: dict[int, Sent | StoreUnavailable] = {}
        error: Exception | None = None
        for i in order:
            try:
                sent[i] = nodes[i].send(groups[i].commands, write=write, until=until)
            except StoreUnavailable as exc:
                sent[i] = exc
            except Exception as exc:
                error = exc
                break
        out: dict[int, Result] = {}
        for i, item in sent.items():  # in the order sent
            if isinstance(item, StoreUnavailable):
                out[i] = item
                continue
            try:
                out[i] = nodes[i].finish(item, write=write, until=until)
            except (StoreUnavailable, WriteOutcomeUnknown) as exc:
                out[i] = exc
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return [out[i] for i in range(len(groups))]

    def close(self) -> None:
        """Close the idle connections; a view's does nothing (they are its executor's)."""
        if self._base is None:
            for node in list(self._nodes.values()):
                node.close()


class AsyncClusterExecutor:
    """The asyncio twin of :class:`ClusterExecutor`: the masters' pipelines sent concurrently."""

    def __init__(self, topology: ClusterTopology, *, timeout: float | None = None,
                 deadline: float | None = None) -> None:  # fmt: skip
        from .anode import AsyncNodeExecutor  # noqa: PLC0415

        self._make = AsyncNodeExecutor
        self.topology = topology
        self.where = topology.where
        self.timeout = timeout
        self.deadline = deadline
        self._base: AsyncClusterExecutor | None = None  # a view's executor
        self._nodes: dict[str, Any] = {}

    def within(self, deadline: float) -> AsyncClusterExecutor:
        """As :meth:`ClusterExecutor.within`."""
        view = copy.copy(self)
        view.deadline = deadline
        view._base = self._base or self
        view._nodes = {}
        return view

    def _node(self, address: str) -> Any:
        node = self._nodes.get(address)
        if node is None:
            if self._base is not None:
                node = self._base._node(address).within(self.deadline)
            else:
                node = self._make(
                    self.topology.node(address), timeout=self.timeout, deadline=self.deadline
                )
            self._nodes[address] = node
        return node

    async def _groups(self, routing: Routing) -> list[Group]:
        if not self.topology.stale:
            return routing.groups()
        # Reading the slot map is blocking I/O (a short-lived connection): off the loop.
        return await asyncio.to_thread(routing.groups)

    async def call(
        self, commands: Sequence[Command], *, write: bool, partial: bool = False
    ) -> list[Any]:
        until = None if self.deadline is None else time.monotonic() + self.deadline
        routing = Routing(self.topology, commands, write, partial)
        while not routing.done:
            if routing.retry_pause:
                await asyncio.sleep(routing.retry_pause)
                routing.retry_pause = 0.0
            groups = await self._groups(routing)
            # A cancel of the caller reaches each node's call as a cancel of its gather child;
            # one that Python 3.11's wait_for loses in a send is found by that child's own
            # AsyncNodeExecutor._exchange (its task's count), and gather raises the caller's
            # cancel anyway once all are done (3.11 does so even with return_exceptions).
            results = await asyncio.gather(
                *(self._node(g.address).raw(g.commands, write=write, until=until)
                  for g in groups),
                return_exceptions=True,
            )  # fmt: skip
            for result in results:  # a cancellation, a ConfigurationError: the call's
                if isinstance(result, BaseException) and not isinstance(
                    result, StoreUnavailable | WriteOutcomeUnknown
                ):
                    raise result
            _route(routing, groups, results)  # type: ignore[arg-type]  # checked just above
        waited = await asyncio.gather(
            *(self._node(g.address).raw(g.commands, write=True, until=until)
              for g in routing.wait_groups()),
            return_exceptions=True,
        )  # fmt: skip
        for reply in waited:
            if isinstance(reply, BaseException) and not isinstance(
                reply, StoreUnavailable | WriteOutcomeUnknown
            ):
                raise reply
        return routing.result(
            [UNCONFIRMED if isinstance(r, BaseException) else r for r in waited], self.where
        )

    async def aclose(self) -> None:
        """As :meth:`ClusterExecutor.close`."""
        if self._base is None:
            for node in list(self._nodes.values()):
                await node.aclose()
