"""The pure shard-lineage core: graph, readiness, balanced lease assignment."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.lineage import (
    Claim,
    Lease,
    ShardGraph,
    ShardInfo,
    parse_sequence_number,
    plan_assignment,
)
from shared.errors import DecodeError, UsageError

NOW = 1_000_000.0


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
    return Lease(sid, owner, counter, NOW + 10)


@pytest.mark.parametrize(
    ("leases", "claims", "target"),
    [
        # alone on a fresh stream: take everything, creating rows
        ({}, [Claim(f"s{i}", None) for i in range(4)], 4),
        # another live worker holds two: take the other two
        (
            {"s0": live("s0", "b"), "s1": live("s1", "b")},
            [Claim("s2", None), Claim("s3", None)],
            2,
        ),
        # another worker holds all four: steal one, from the highest shard
        ({f"s{i}": live(f"s{i}", "b", 3) for i in range(4)}, [Claim("s3", 3, "b")], 2),
        # a lapsed lease is free to take, with the counter seen
        (
            {f"s{i}": Lease(f"s{i}", "b", 7, NOW - 1) for i in range(4)},
            [Claim(f"s{i}", 7) for i in range(4)],
            4,
        ),
        # balanced already: nothing to do
        (
            {"s0": live("s0", "me"), "s1": live("s1", "me"), "s2": live("s2", "b")}
            | {"s3": live("s3", "b")},
            [],
            2,
        ),
    ],
)
def test_plan_assignment_table(leases: dict[str, Lease], claims: list[Claim], target: int) -> None:
    plan = plan_assignment(graph=FLAT, leases=leases, me="me", now=NOW)
    assert list(plan.claims) == claims
    assert plan.target == target


def test_plan_never_steals_when_told_not_to() -> None:
    leases = {f"s{i}": live(f"s{i}", "b") for i in range(4)}
    plan = plan_assignment(graph=FLAT, leases=leases, me="me", now=NOW, allow_steal=False)
    assert plan.claims == ()


def test_plan_skips_finished_and_blocked_shards() -> None:
    leases = {"s0": Lease("s0", finished=True, checkpoint=10)}
    plan = plan_assignment(graph=RESHARDED, leases=leases, me="me", now=NOW)
    assert [c.shard_id for c in plan.claims] == ["s1", "s2", "s4"]


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
            for claim in plan_assignment(graph=graph, leases=table, me=worker, now=NOW).claims:
                seen = table.get(claim.shard_id)
                # the lease store's conditional write: the counter must still be the one seen
                if (seen.counter if seen else None) != claim.expected_counter:
                    continue
                counter = seen.counter + 1 if seen else 1
                table[claim.shard_id] = Lease(claim.shard_id, worker, counter, NOW + 10)
                moved = True
        if not moved:
            break
    else:
        pytest.fail("assignment did not converge")
    assert set(table) == set(graph.shards)
    loads = [sum(1 for lease in table.values() if lease.owner == w) for w in names]
    assert max(loads) - min(loads) <= 1
    assert sum(loads) == shards
