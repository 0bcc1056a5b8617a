"""The pure shard-lineage core: graph, readiness, lease expiry by counter, balanced lease
assignment, cleanup of finished rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.lineage import (
    Claim,
    Lease,
    LeaseExpiry,
    ShardGraph,
    ShardInfo,
    parse_sequence_number,
    plan_assignment,
    plan_cleanup,
    settled_shards,
)
from shared.errors import DecodeError, UsageError


def shard(sid: str, *parents: str, end: int | None = None) -> ShardInfo:
    return ShardInfo(sid, tuple(parents), 0, end)


# s0 split into s1 + s2, then s1 and s2 merged into s3; s4 independent.
RESHARDED = ShardGraph.of(
    [
        shard("s0", end=10),
        shard("s1", "s0", end=20),
        shard("s2", "s0", end=30),
        shard("s3", "s1", "s2"),
        shard("s4"),
    ]
)


@pytest.mark.parametrize(
    ("finished", "ready"),
    [
        ((), ("s0", "s4")),
        (("s0",), ("s1", "s2", "s4")),
        (("s0", "s1"), ("s2", "s4")),  # a merge child waits for both parents
        (("s0", "s1", "s2"), ("s3", "s4")),
        (("s0", "s1", "s2", "s3", "s4"), ()),
        (("gone",), ("s0", "s4")),  # unknown ids are ignored
    ],
)
def test_ready_waits_for_every_parent(finished: tuple[str, ...], ready: tuple[str, ...]) -> None:
    assert RESHARDED.ready(finished) == ready


def test_parent_aged_out_of_retention_counts_as_finished() -> None:
    graph = ShardGraph.of([shard("s1", "s0"), shard("s2", "s0")])
    assert graph.ready(()) == ("s1", "s2")
    assert graph.parents("s1") == ()


def test_children_of_a_split_and_a_merge() -> None:
    assert RESHARDED.children("s0") == ("s1", "s2")
    assert RESHARDED.children("s1") == ("s3",)
    assert RESHARDED.children("s3") == ()


START = "49590338271490256608559692538361571095921575989136588898"
END = "49590338271490256608559692540925702759324208523137515618"


def test_from_aws_reads_parents_and_integer_sequence_numbers() -> None:
    info = ShardInfo.from_aws(
        {
            "ShardId": "shardId-000000000003",
            "ParentShardId": "shardId-000000000001",
            "AdjacentParentShardId": "shardId-000000000002",
            "HashKeyRange": {"StartingHashKey": "0", "EndingHashKey": "1"},
            "SequenceNumberRange": {
                "StartingSequenceNumber": START,
                "EndingSequenceNumber": END,
            },
        }
    )
    assert info.parent_ids == ("shardId-000000000001", "shardId-000000000002")
    assert info.closed
    assert info.ending_sequence == int(END)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "Shards[].ShardId"),
        ({"ShardId": "a"}, "Shards[].SequenceNumberRange"),
        ({"ShardId": "a", "SequenceNumberRange": {}}, "StartingSequenceNumber"),
        (
            {"ShardId": "a", "SequenceNumberRange": {"StartingSequenceNumber": "-1"}},
            "StartingSequenceNumber",
        ),
        (
            {"ShardId": "a", "ParentShardId": "a", "SequenceNumberRange": {}},
            "Shards[].ParentShardId",
        ),
        (
            {
                "ShardId": "a",
                "SequenceNumberRange": {
                    "StartingSequenceNumber": "5",
                    "EndingSequenceNumber": "4",
                },
            },
            "Shards[]",
        ),
    ],
)
def test_from_aws_refuses_malformed_shards(data: dict[str, Any], field: str) -> None:
    with pytest.raises(DecodeError) as caught:
        ShardInfo.from_aws(data)
    assert caught.value.field == field


def test_sequence_numbers_compare_as_integers() -> None:
    assert parse_sequence_number("10") > parse_sequence_number("9")
    with pytest.raises(DecodeError):
        parse_sequence_number("\uff11\uff12")  # full-width digits pass str.isdigit()


def test_graph_refuses_a_duplicate_shard() -> None:
    with pytest.raises(UsageError):
        ShardGraph.of([shard("a"), shard("a")])


@pytest.mark.parametrize(
    "kwargs",
    [{"shard_id": ""}, {"shard_id": "a", "counter": -1}, {"shard_id": "a", "owner": ""}],
)
def test_lease_validates_when_built(kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        Lease(**kwargs)


FLAT = ShardGraph.of([shard(f"s{i}") for i in range(4)])


def live(sid: str, owner: str, counter: int = 1) -> Lease:
    return Lease(sid, owner, counter)


@pytest.mark.parametrize(
    ("leases", "lapsed", "claims", "target"),
    [
        # alone on a fresh stream: take everything, creating rows
        ({}, (), [Claim(f"s{i}", None) for i in range(4)], 4),
        # another live worker holds two: take the other two
        (
            {"s0": live("s0", "b"), "s1": live("s1", "b")},
            (),
            [Claim("s2", None), Claim("s3", None)],
            2,
        ),
        # another worker holds all four: steal one, from the highest shard
        ({f"s{i}": live(f"s{i}", "b", 3) for i in range(4)}, (), [Claim("s3", 3, "b")], 2),
        # lapsed leases are free to take, with the counter seen
        (
            {f"s{i}": live(f"s{i}", "b", 7) for i in range(4)},
            {f"s{i}" for i in range(4)},
            [Claim(f"s{i}", 7) for i in range(4)],
            4,
        ),
        # one of the owner's two leases lapsed: take it, leave the live one
        (
            {"s0": live("s0", "b", 2), "s1": live("s1", "b", 5)},
            {"s1"},
            [Claim("s1", 5), Claim("s2", None)],
            2,
        ),
        # a released lease is free at once, lapsed or not
        (
            {"s0": Lease("s0", None, 4)} | {f"s{i}": live(f"s{i}", "me") for i in (1, 2, 3)},
            (),
            [Claim("s0", 4)],
            4,
        ),
        # balanced already: nothing to do
        (
            {"s0": live("s0", "me"), "s1": live("s1", "me"), "s2": live("s2", "b")}
            | {"s3": live("s3", "b")},
            (),
            [],
            2,
        ),
    ],
)
def test_plan_assignment_table(
    leases: dict[str, Lease], lapsed: set[str], claims: list[Claim], target: int
) -> None:
    plan = plan_assignment(graph=FLAT, leases=leases, me="me", lapsed=lapsed)
    assert list(plan.claims) == claims
    assert plan.target == target


def test_plan_never_steals_when_told_not_to() -> None:
    leases = {f"s{i}": live(f"s{i}", "b") for i in range(4)}
    plan = plan_assignment(graph=FLAT, leases=leases, me="me", allow_steal=False)
    assert plan.claims == ()


def test_plan_skips_finished_and_blocked_shards() -> None:
    leases = {"s0": Lease("s0", finished=True, checkpoint=10)}
    plan = plan_assignment(graph=RESHARDED, leases=leases, me="me")
    assert [c.shard_id for c in plan.claims] == ["s1", "s2", "s4"]


# --- lease expiry by counter, on this worker's monotonic clock --------------------------------


def test_a_lease_lapses_only_after_its_counter_stood_still_a_whole_duration() -> None:
    expiry = LeaseExpiry(duration=10.0)
    table = {"s0": live("s0", "b", 1), "s1": live("s1", "c", 1)}
    # A worker that just started knows nothing: it waits a whole duration, whatever the row.
    assert expiry.observe(table, 100.0) == frozenset()
    assert expiry.observe(table, 109.9) == frozenset()
    # "b" renews (its counter moves); "c" does not.
    table["s0"] = live("s0", "b", 2)
    assert expiry.observe(table, 110.0) == {"s1"}
    assert expiry.observe(table, 119.9) == {"s1"}
    assert expiry.observe(table, 120.0) == {"s0", "s1"}
    # Taken over (the counter moved again): live anew for another duration.
    table["s1"] = live("s1", "me", 2)
    assert expiry.observe(table, 121.0) == {"s0"}


def test_expiry_ignores_released_and_finished_rows_and_forgets_deleted_ones() -> None:
    expiry = LeaseExpiry(duration=1.0)
    table = {
        "free": Lease("free", None, 3),
        "done": Lease("done", None, 9, 5, finished=True),
        "held": live("held", "b", 4),
    }
    assert expiry.observe(table, 0.0) == frozenset()
    assert expiry.observe(table, 5.0) == {"held"}
    # The row went away and came back with the same counter: seen for the first time again.
    assert expiry.observe({}, 6.0) == frozenset()
    assert expiry.observe({"held": live("held", "b", 4)}, 6.5) == frozenset()
    assert expiry.observe({"held": live("held", "b", 4)}, 7.5) == {"held"}


def test_expiry_refuses_a_duration_that_is_not_positive() -> None:
    with pytest.raises(UsageError):
        LeaseExpiry(duration=0)


@given(
    renewals=st.lists(st.floats(0.01, 9.99), min_size=1, max_size=30),
    looks=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30),
)
def test_a_lease_renewed_more_often_than_its_duration_never_lapses(
    renewals: list[float], looks: list[float]
) -> None:
    # The owner renews at gaps below the duration; the watcher looks at arbitrary moments.
    expiry = LeaseExpiry(duration=10.0)
    times, t = [], 0.0
    for gap in renewals:
        t += gap
        times.append(t)
    end = times[-1]
    for fraction in sorted(looks):
        now = fraction * end
        counter = 1 + sum(1 for r in times if r <= now)
        assert expiry.observe({"s0": live("s0", "b", counter)}, now) == frozenset()


# --- cleanup of finished rows, and readiness once they are gone --------------------------------


def started(sid: str, checkpoint: int | None = 1, owner: str | None = "b") -> Lease:
    return Lease(sid, owner, 2, checkpoint)


def done(sid: str, checkpoint: int | None = 5) -> Lease:
    return Lease(sid, None, 3, checkpoint, finished=True)


@pytest.mark.parametrize(
    ("graph", "leases", "deleted"),
    [
        # a split parent: kept until both children have a checkpoint
        (RESHARDED, {"s0": done("s0")}, ()),
        (RESHARDED, {"s0": done("s0"), "s1": started("s1")}, ()),
        (RESHARDED, {"s0": done("s0"), "s1": started("s1"), "s2": started("s2", None)}, ()),
        (RESHARDED, {"s0": done("s0"), "s1": started("s1"), "s2": started("s2")}, ("s0",)),
        # a child read to its end counts as started, checkpoint or not
        (RESHARDED, {"s0": done("s0"), "s1": done("s1", None), "s2": started("s2")}, ("s0",)),
        # merge parents: both go once the merged child has a checkpoint
        (
            RESHARDED,
            {"s1": done("s1"), "s2": done("s2"), "s3": started("s3", None)},
            (),
        ),
        (
            RESHARDED,
            {"s1": done("s1"), "s2": done("s2"), "s3": started("s3")},
            ("s1", "s2"),
        ),
        # no longer listed (trimmed past retention): goes at once
        (ShardGraph.of([shard("s1", "s0")]), {"s0": done("s0")}, ("s0",)),
        # a row not finished is never deleted, listed or not
        (ShardGraph.of([shard("s1", "s0")]), {"s0": started("s0"), "s1": started("s1")}, ()),
        (ShardGraph.of([shard("s1")]), {"gone": started("gone")}, ()),
        # finished and listed without children: nothing proves it safe
        (ShardGraph.of([shard("s0", end=4)]), {"s0": done("s0")}, ()),
    ],
)
def test_plan_cleanup_table(
    graph: ShardGraph, leases: dict[str, Lease], deleted: tuple[str, ...]
) -> None:
    assert plan_cleanup(graph=graph, leases=leases) == deleted


def test_a_parent_not_listed_and_without_a_row_counts_as_finished() -> None:
    graph = ShardGraph.of([shard("s1", "s0"), shard("s2", "s0")])
    assert [c.shard_id for c in plan_assignment(graph=graph, leases={}, me="me").claims] == [
        "s1",
        "s2",
    ]


def test_a_deleted_parent_whose_children_started_is_never_read_again() -> None:
    # s0's row was deleted after s1 and s2 started; s0 is still listed (within retention).
    leases = {"s1": started("s1"), "s2": started("s2", owner=None)}
    assert "s0" in settled_shards(RESHARDED, leases)
    plan = plan_assignment(graph=RESHARDED, leases=leases, me="me")
    assert [c.shard_id for c in plan.claims] == ["s2", "s4"]
    assert "s0" not in plan.ready


def test_a_deleted_grandparent_stays_settled_after_its_child_row_went_too() -> None:
    # s0 -> s1, s2 -> s3 (merge): rows of s0, s1 and s2 deleted, only s3's is left.
    leases = {"s3": started("s3")}
    assert {"s0", "s1", "s2"} <= settled_shards(RESHARDED, leases)
    plan = plan_assignment(graph=RESHARDED, leases=leases, me="me")
    assert plan.ready == ("s3", "s4")


def test_a_fresh_stream_settles_nothing() -> None:
    assert settled_shards(RESHARDED, {}) == frozenset()


# --- properties -------------------------------------------------------------------------------


@st.composite
def reshard_histories(draw: st.DrawFn) -> ShardGraph:
    """A random sequence of splits and merges over a few initial shards."""
    count = draw(st.integers(1, 3))
    open_shards = [f"s{i}" for i in range(count)]
    shards = {sid: shard(sid) for sid in open_shards}
    next_id = count
    for _ in range(draw(st.integers(0, 8))):
        if len(open_shards) >= 2 and draw(st.booleans()):
            i = draw(st.integers(0, len(open_shards) - 2))
            a, b = open_shards[i], open_shards[i + 1]  # merges take adjacent ranges
            child = f"s{next_id}"
            next_id += 1
            shards[child] = shard(child, a, b)
            open_shards[i : i + 2] = [child]
        else:
            i = draw(st.integers(0, len(open_shards) - 1))
            parent = open_shards[i]
            kids = [f"s{next_id}", f"s{next_id + 1}"]
            next_id += 2
            for kid in kids:
                shards[kid] = shard(kid, parent)
            open_shards[i : i + 1] = kids
    return ShardGraph.of(shards.values())


@given(reshard_histories(), st.randoms(use_true_random=False))
def test_every_shard_is_read_after_all_its_parents(graph: ShardGraph, rnd: Any) -> None:
    finished: list[str] = []
    while ready := graph.ready(finished):
        pick = rnd.choice(ready)
        assert all(p in finished for p in graph.parents(pick))
        finished.append(pick)
    assert sorted(finished) == sorted(graph.shards)


@settings(max_examples=80)
@given(
    shards=st.integers(0, 12),
    workers=st.integers(1, 5),
    order=st.randoms(use_true_random=False),
)
def test_assignment_converges_to_exclusive_balanced_ownership(
    shards: int, workers: int, order: Any
) -> None:
    graph = ShardGraph.of([shard(f"s{i:02}") for i in range(shards)])
    names = [f"w{i}" for i in range(workers)]
    table: dict[str, Lease] = {}
    for _ in range(10 * (shards + 1) * workers):
        moved = False
        for worker in order.sample(names, len(names)):
            for claim in plan_assignment(graph=graph, leases=table, me=worker).claims:
                seen = table.get(claim.shard_id)
                # the lease store's conditional write: the counter must still be the one seen
                if (seen.counter if seen else None) != claim.expected_counter:
                    continue
                counter = seen.counter + 1 if seen else 1
                table[claim.shard_id] = Lease(claim.shard_id, worker, counter)
                moved = True
        if not moved:
            break
    else:
        pytest.fail("assignment did not converge")
    assert set(table) == set(graph.shards)
    loads = [sum(1 for lease in table.values() if lease.owner == w) for w in names]
    assert max(loads) - min(loads) <= 1
    assert sum(loads) == shards


@dataclass
class Workers:
    """The lease table as workers running in turns leave it: rows started, checkpointed,
    finished and deleted, checked against the ordering rules at every start."""

    graph: ShardGraph
    table: dict[str, Lease] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    starts: list[str] = field(default_factory=list)

    def startable(self) -> list[str]:
        ready = plan_assignment(graph=self.graph, leases=self.table, me="w").ready
        return [sid for sid in ready if sid not in self.table]

    def start(self, sid: str) -> None:
        assert sid not in self.starts, f"{sid} started twice"
        assert all(p in self.finished for p in self.graph.parents(sid)), sid
        self.starts.append(sid)
        self.table[sid] = Lease(sid, "w", 1)

    def open_rows(self) -> list[str]:
        return [sid for sid, row in self.table.items() if not row.finished]

    def finish(self, sid: str) -> None:
        self.table[sid] = Lease(sid, None, 2, self.table[sid].checkpoint, finished=True)
        self.finished.add(sid)

    def clean(self, seen: Mapping[str, Lease]) -> None:
        for sid in plan_cleanup(graph=self.graph, leases=seen):
            # the store's condition: only a finished row goes
            if sid in self.table and self.table[sid].finished:
                del self.table[sid]


@settings(max_examples=150)
@given(reshard_histories(), st.randoms(use_true_random=False))
def test_with_cleanup_every_shard_is_read_once_and_after_its_parents(
    graph: ShardGraph, rnd: Any
) -> None:
    # Workers start ready shards, checkpoint, finish and delete rows in a random interleaving;
    # rows are deleted as plan_cleanup says (some rounds from a stale table). No shard may be
    # started twice, nor before all its parents finished.
    workers = Workers(graph)
    stale: dict[str, Lease] = {}
    for _ in range(20 * len(graph.shards) + 20):
        match rnd.choice(["start", "checkpoint", "finish", "clean", "clean_stale"]):
            case "start" if free := workers.startable():
                workers.start(rnd.choice(free))
            case "checkpoint" if rows := workers.open_rows():
                sid = rnd.choice(rows)
                workers.table[sid] = Lease(sid, "w", 1, 7)
            case "finish" if rows := workers.open_rows():
                workers.finish(rnd.choice(rows))
            case "clean":
                workers.clean(workers.table)
            case "clean_stale":
                workers.clean(stale)
            case _:
                pass
        stale = dict(workers.table) if rnd.random() < 0.5 else stale
    # Finish what is open, then keep going until nothing is left to start.
    for sid in workers.open_rows():
        workers.finish(sid)
    while free := workers.startable():
        workers.start(free[0])
        workers.finish(free[0])
        workers.clean(workers.table)
    assert sorted(workers.starts) == sorted(graph.shards)
