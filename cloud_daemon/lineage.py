"""Shard lineage and lease assignment: the pure core of the Kinesis consumer.

Theory of operation
-------------------

A Kinesis stream is a graph of shards. A split closes one parent and opens two children; a merge
closes two parents (``ParentShardId`` and ``AdjacentParentShardId``) and opens one child. Records
of one partition key go to the parent until the reshard, then to a child, so to keep them in
order a child may be read only after **every** parent was read to its end. A closed parent read
to its end returns no ``NextShardIterator``; the consumer then marks its lease *finished*.

This module decides, without any I/O and with the clock passed in:

- :class:`ShardGraph`: the shards of one ``ListShards`` listing and which of them are *ready*
  (not finished, every parent finished). A parent absent from the listing has aged out of the
  stream's retention: nothing is left to read in it, so it counts as finished.
- :class:`Lease`: one row of the lease table (owner, counter, checkpoint, finished). Sequence
  numbers are integers here, always: as strings ``"10" < "9"``. A row holds no expiry time.
- :class:`LeaseExpiry`: which leases of the table have lapsed, judged as Amazon's KCL does,
  without trusting anybody's wall clock: the owner bumps the counter on every renewal, and a
  lease has lapsed once this worker has seen its counter unchanged for a whole lease duration
  on its **own monotonic clock**. Workers whose wall clocks disagree by hours still agree on
  that; only the rates of their clocks matter, and those differ by parts per million. A
  released lease (no owner) is free at once.
- :func:`settled_shards`: the shards whose reading is over: a finished row, or no row at all
  while a descendant has one (the row was deleted by :func:`plan_cleanup` once the children
  had started: such a shard must never be read again from its start).
- :func:`plan_assignment`: which leases this worker should claim so that the ready shards spread
  evenly over the live workers: first free or lapsed leases up to its fair share, then at most
  one lease per round stolen from the most loaded worker, and only when that worker holds at
  least two more than this one (Amazon's KCL steals one lease per round too), so ownership
  converges to loads that differ by at most one, without thrashing.
- :func:`plan_cleanup`: which finished rows are no longer needed to order their children, and
  may be deleted: the shard is no longer listed (trimmed past retention), or every listed child
  has a row with a checkpoint (it started, so its parents' rows have done their job). The
  store deletes on condition that the row is finished, so two workers cleaning at once, or a
  stale table snapshot, do no harm.

Every claim carries the lease counter it saw; the lease store makes the write conditional on it,
so of two workers racing for one lease exactly one wins.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.errors import DecodeError, UsageError

__all__ = [
    "AssignmentPlan",
    "Claim",
    "Lease",
    "LeaseExpiry",
    "ShardGraph",
    "ShardInfo",
    "parse_sequence_number",
    "plan_assignment",
    "plan_cleanup",
    "settled_shards",
]


def parse_sequence_number(value: object, *, field_name: str = "SequenceNumber") -> int:
    """Read a Kinesis sequence number (a decimal string of up to 128 bits) as an integer.

    Args:
        value: the value from the AWS answer.
        field_name: where it came from, for the error.

    Returns:
        The sequence number as an ``int``.

    Raises:
        DecodeError: the value is not a string of decimal digits.
    """
    if not isinstance(value, str) or not value.isascii() or not value.isdigit():
        raise DecodeError(field_name, "a decimal sequence number", value)
    return int(value)


@dataclass(frozen=True, slots=True)
class ShardInfo:
    """One shard from ``ListShards``.

    Attributes:
        shard_id: the shard's id.
        parent_ids: ``ParentShardId`` and ``AdjacentParentShardId`` when present, in that order.
        starting_sequence: the first sequence number the shard can hold.
        ending_sequence: the last one, present only when the shard is closed.
    """

    shard_id: str
    parent_ids: tuple[str, ...] = ()
    starting_sequence: int = 0
    ending_sequence: int | None = None

    def __post_init__(self) -> None:
        if not self.shard_id:
            raise UsageError("shard_id must not be empty")
        if len(self.parent_ids) > 2 or self.shard_id in self.parent_ids:
            raise UsageError(f"shard {self.shard_id}: bad parents {self.parent_ids!r}")
        if self.ending_sequence is not None and self.ending_sequence < self.starting_sequence:
            raise UsageError(f"shard {self.shard_id}: ends before it starts")

    @property
    def closed(self) -> bool:
        """Whether the shard was closed by a reshard (it has an ending sequence number)."""
        return self.ending_sequence is not None

    @classmethod
    def from_aws(cls, data: Mapping[str, Any]) -> ShardInfo:
        """Build from one element of ``ListShards``' ``Shards``.

        Args:
            data: the shard as botocore returns it.

        Returns:
            The shard.

        Raises:
            DecodeError: a field is missing or has the wrong type.
        """
        shard_id = data.get("ShardId")
        if not isinstance(shard_id, str) or not shard_id:
            raise DecodeError("Shards[].ShardId", "a shard id", shard_id)
        parents: list[str] = []
        for key in ("ParentShardId", "AdjacentParentShardId"):
            parent = data.get(key)
            if parent is None:
                continue
            if not isinstance(parent, str) or not parent or parent == shard_id:
                raise DecodeError(f"Shards[].{key}", "another shard id", parent)
            parents.append(parent)
        ranges = data.get("SequenceNumberRange")
        if not isinstance(ranges, Mapping):
            raise DecodeError("Shards[].SequenceNumberRange", "an object", ranges)
        start = parse_sequence_number(
            ranges.get("StartingSequenceNumber"), field_name="StartingSequenceNumber"
        )
        end_raw = ranges.get("EndingSequenceNumber")
        end = (
            None
            if end_raw is None
            else parse_sequence_number(end_raw, field_name="EndingSequenceNumber")
        )
        try:
            return cls(shard_id, tuple(parents), start, end)
        except UsageError as exc:
            raise DecodeError("Shards[]", "a consistent shard", shard_id) from exc


@dataclass(frozen=True, slots=True)
class ShardGraph:
    """The shards of one stream listing, with their parent links.

    Attributes:
        shards: every listed shard by id.
    """

    shards: Mapping[str, ShardInfo] = field(default_factory=dict)

    @classmethod
    def of(cls, shards: Iterable[ShardInfo]) -> ShardGraph:
        """Build a graph from a listing.

        Raises:
            UsageError: a shard id appears twice.
        """
        table: dict[str, ShardInfo] = {}
        for shard in shards:
            if shard.shard_id in table:
                raise UsageError(f"shard {shard.shard_id} listed twice")
            table[shard.shard_id] = shard
        return cls(table)

    def parents(self, shard_id: str) -> tuple[str, ...]:
        """The parents of ``shard_id`` that are still listed (others have aged out)."""
        return tuple(p for p in self.shards[shard_id].parent_ids if p in self.shards)

    def children(self, shard_id: str) -> tuple[str, ...]:
        """The listed shards that name ``shard_id`` as a parent, sorted by id."""
        return tuple(sorted(s.shard_id for s in self.shards.values() if shard_id in s.parent_ids))

    def ready(self, finished: Iterable[str]) -> tuple[str, ...]:
        """The shards that may be read now: not finished, and every listed parent finished.

        Args:
            finished: ids of shards read to their end (ids not in the graph are ignored).

        Returns:
            The ready shard ids, sorted.
        """
        done = frozenset(finished)
        return tuple(
            sorted(
                sid
                for sid in self.shards
                if sid not in done and all(p in done for p in self.parents(sid))
            )
        )


@dataclass(frozen=True, slots=True)
class Lease:
    """One row of the lease table.

    Attributes:
        shard_id: the shard.
        owner: the worker holding it, or ``None`` when free.
        counter: bumped on every take, renewal and release; conditional writes compare it, and
            other workers watch it move to know the owner is alive (:class:`LeaseExpiry`).
        checkpoint: the sequence number of the last record handled, or ``None``.
        finished: the shard was read to its end; its children may start.
    """

    shard_id: str
    owner: str | None = None
    counter: int = 0
    checkpoint: int | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        if not self.shard_id:
            raise UsageError("lease shard_id must not be empty")
        if self.counter < 0:
            raise UsageError(f"lease {self.shard_id}: negative counter")
        if self.checkpoint is not None and self.checkpoint < 0:
            raise UsageError(f"lease {self.shard_id}: negative checkpoint")
        if self.owner == "":
            raise UsageError(f"lease {self.shard_id}: empty owner, use None for free")

    @property
    def free(self) -> bool:
        """Whether anyone may take this lease at once: released and not finished."""
        return self.owner is None and not self.finished


class LeaseExpiry:
    """Decides which owned leases have lapsed, from their counters and a monotonic clock.

    The state is this worker's memory of each owned lease: the counter last seen and when (on
    the monotonic clock passed to :meth:`observe`) it was first seen with that value. A lease
    whose counter has not moved for ``duration`` has lapsed: its owner stopped renewing. A
    worker that has just started knows nothing yet, so it waits a whole duration before it
    takes any lease that still has an owner (KCL does the same).
    """

    __slots__ = ("_duration", "_seen")

    def __init__(self, *, duration: float) -> None:
        """Args:
        duration: how long a counter must stand still before its lease lapses, in seconds.

        Raises:
            UsageError: ``duration`` is not positive.
        """
        if not duration > 0:
            raise UsageError("lease duration must be > 0")
        self._duration = duration
        self._seen: dict[str, tuple[int, float]] = {}

    def observe(self, leases: Mapping[str, Lease], now: float) -> frozenset[str]:
        """Take in one reading of the lease table; say which owned leases have lapsed.

        Args:
            leases: the whole lease table, by shard id (rows absent from it are forgotten).
            now: this worker's monotonic clock, in seconds (never a wall clock).

        Returns:
            The shards whose lease has an owner and a counter unchanged for ``duration``.
        """
        seen: dict[str, tuple[int, float]] = {}
        lapsed: list[str] = []
        for sid, lease in leases.items():
            if lease.owner is None or lease.finished:
                continue
            previous = self._seen.get(sid)
            if previous is None or previous[0] != lease.counter:
                previous = (lease.counter, now)
            seen[sid] = previous
            if now - previous[1] >= self._duration:
                lapsed.append(sid)
        self._seen = seen
        return frozenset(lapsed)


@dataclass(frozen=True, slots=True)
class Claim:
    """A lease this worker should try to take.

    Attributes:
        shard_id: the shard.
        expected_counter: the counter seen; ``None`` when no lease row exists yet.
        stolen_from: the live owner it is taken from, or ``None`` for a free or lapsed lease.
    """

    shard_id: str
    expected_counter: int | None
    stolen_from: str | None = None


@dataclass(frozen=True, slots=True)
class AssignmentPlan:
    """The outcome of :func:`plan_assignment`.

    Attributes:
        claims: leases to try to take, in order.
        ready: every shard ready to be read.
        workers: live workers counted, including this one.
        target: this worker's fair share, ``ceil(len(ready) / workers)``.
    """

    claims: tuple[Claim, ...]
    ready: tuple[str, ...]
    workers: int
    target: int


def _children_by_parent(graph: ShardGraph) -> dict[str, list[str]]:
    children: dict[str, list[str]] = {}
    for shard in graph.shards.values():
        for parent in shard.parent_ids:
            children.setdefault(parent, []).append(shard.shard_id)
    return children


def settled_shards(graph: ShardGraph, leases: Mapping[str, Lease]) -> frozenset[str]:
    """The shards whose reading is over, so their children may start.

    A shard is settled when its row is finished, or when it has no row while some descendant
    has one: its row was deleted after its children started (:func:`plan_cleanup`), and
    reading it again from its start would repeat every record, out of order.

    Args:
        graph: the current shard listing.
        leases: the lease table, by shard id.

    Returns:
        The settled shard ids (finished rows of shards no longer listed included).
    """
    children = _children_by_parent(graph)
    has_row: dict[str, bool] = {}

    def descendant_has_row(sid: str) -> bool:
        # Iterative, so a long reshard history cannot exhaust the recursion limit.
        stack, visited = list(children.get(sid, ())), set[str]()
        while stack:
            child = stack.pop()
            if child in visited:
                continue
            visited.add(child)
            if child in leases:
                return True
            stack.extend(children.get(child, ()))
        return False

    for sid in graph.shards:
        if sid not in leases:
            has_row[sid] = descendant_has_row(sid)
    finished = {sid for sid, lease in leases.items() if lease.finished}
    return frozenset(finished | {sid for sid, done in has_row.items() if done})


def plan_assignment(
    *,
    graph: ShardGraph,
    leases: Mapping[str, Lease],
    me: str,
    lapsed: Collection[str] = frozenset(),
    allow_steal: bool = True,
) -> AssignmentPlan:
    """Decide which leases ``me`` should claim for a balanced assignment.

    Args:
        graph: the current shard listing.
        leases: the lease table, by shard id (rows for shards no longer listed are ignored).
        me: this worker's id.
        lapsed: the owned leases whose owner stopped renewing, from
            :meth:`LeaseExpiry.observe`; they are taken like free ones.
        allow_steal: whether this worker may take one live lease per round from the most
            loaded worker, when that one holds two or more leases more (the victim notices
            on its next renewal and stops reading the shard).

    Returns:
        The plan: the claims, and the figures they were derived from.
    """
    ready = graph.ready(settled_shards(graph, leases))
    load: dict[str, list[str]] = {}
    free: list[Claim] = []
    for sid in ready:
        lease = leases.get(sid)
        if lease is None:
            free.append(Claim(sid, None))
        elif lease.owner is None or sid in lapsed:
            free.append(Claim(sid, lease.counter))
        else:
            load.setdefault(lease.owner, []).append(sid)
    workers = len(load.keys() | {me})
    target = math.ceil(len(ready) / workers) if ready else 0
    mine = len(load.get(me, ()))
    claims = free[: max(target - mine, 0)]
    mine += len(claims)
    if allow_steal:
        # Steal only from a worker holding at least two more than us: every steal then lowers
        # the sum of squared loads, so rounds converge to loads that differ by at most one.
        victims = [(len(sids), owner) for owner, sids in load.items() if owner != me]
        if victims:
            most, victim = max(victims)
            if most >= mine + 2:
                shard = max(load[victim])
                claims.append(Claim(shard, leases[shard].counter, stolen_from=victim))
    return AssignmentPlan(tuple(claims), ready, workers, target)


def plan_cleanup(*, graph: ShardGraph, leases: Mapping[str, Lease]) -> tuple[str, ...]:
    """The finished rows that no longer order anything, and may be deleted.

    A finished row is kept while a child may still need it to know its parent is done: it
    goes once the shard is no longer listed (trimmed past the stream's retention: a missing
    parent counts as finished), or once every listed child has a row with a checkpoint, or
    finished (the children started; :func:`settled_shards` then keeps the row-less parent
    settled). A
    listed finished shard without listed children is kept: nothing proves it is safe.

    Args:
        graph: the current shard listing.
        leases: the lease table, by shard id.

    Returns:
        The shard ids whose rows may be deleted, sorted.
    """
    children = _children_by_parent(graph)
    doomed: list[str] = []
    for sid, lease in leases.items():
        if not lease.finished:
            continue
        if sid not in graph.shards:
            doomed.append(sid)
            continue
        kids = children.get(sid, ())
        if kids and all(
            (row := leases.get(kid)) is not None and (row.checkpoint is not None or row.finished)
            for kid in kids
        ):
            doomed.append(sid)
    return tuple(sorted(doomed))
