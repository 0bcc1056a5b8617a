"""The lease-store contract, held by the in-memory, SQLite and DynamoDB (moto server) stores."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_daemon.errors import (
    AwsServiceError,
    LeaseLostError,
    LeaseTakenError,
    ResourceNotFoundError,
)
from cloud_daemon.leases import (
    DynamoLeaseStore,
    Lease,
    LeaseStore,
    MemoryLeaseStore,
    SqliteLeaseStore,
    create_lease_table,
)
from shared.errors import UsageError
from tests.adapters import kinesis_fixtures as kf

BIG = 2**127 + 12345  # Kinesis sequence numbers exceed 64 bits and DynamoDB's 38 digits


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with kf.moto_server() as url:
        yield url


@pytest.fixture
async def dynamodb(moto_url: str) -> AsyncIterator[Any]:
    async with kf.aws_client("dynamodb", moto_url) as client:
        yield client


@pytest.fixture(params=["memory", "sqlite", "dynamodb"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LeaseStore]:
    if request.param == "memory":
        yield MemoryLeaseStore()
    elif request.param == "sqlite":
        async with SqliteLeaseStore(tmp_path / "leases.sqlite3") as sqlite:
            yield sqlite
    else:
        url = request.getfixturevalue("moto_url")  # a sync fixture: safe to ask for here
        async with kf.aws_client("dynamodb", url) as client:
            table = kf.unique_name("leases")
            await create_lease_table(client, table)
            yield DynamoLeaseStore(client, table)


async def test_acquire_creates_a_row_once(store: LeaseStore) -> None:
    lease = await store.acquire("s0", owner="a", expected_counter=None)
    assert (lease.owner, lease.counter, lease.checkpoint, lease.finished) == ("a", 1, None, False)
    with pytest.raises(LeaseTakenError) as caught:
        await store.acquire("s0", owner="b", expected_counter=None)
    assert caught.value.shard_id == "s0"
    assert caught.value.owner == "b"
    assert (await store.list_leases())["s0"].owner == "a"


async def test_acquire_is_conditional_on_the_counter_seen(store: LeaseStore) -> None:
    first = await store.acquire("s0", owner="a", expected_counter=None)
    await store.checkpoint("s0", owner="a", sequence=BIG)
    with pytest.raises(LeaseTakenError):
        await store.acquire("s0", owner="b", expected_counter=first.counter - 1)
    taken = await store.acquire("s0", owner="b", expected_counter=first.counter)
    assert (taken.owner, taken.counter) == ("b", first.counter + 1)
    assert taken.checkpoint == BIG  # a takeover resumes from the last checkpoint


async def test_renew_bumps_the_counter_only_for_the_owner(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.checkpoint("s0", owner="a", sequence=3)
    renewed = await store.renew("s0", owner="a")
    assert (renewed.owner, renewed.counter, renewed.checkpoint) == ("a", 2, 3)
    # A checkpoint does not move the counter: only renewals prove the owner alive.
    await store.checkpoint("s0", owner="a", sequence=4)
    assert (await store.list_leases())["s0"].counter == 2
    with pytest.raises(LeaseLostError):
        await store.renew("s0", owner="b")
    with pytest.raises(LeaseLostError):
        await store.renew("missing", owner="a")


async def test_checkpoint_only_by_the_owner_and_as_an_integer(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    assert await store.get_checkpoint("s0") is None
    await store.checkpoint("s0", owner="a", sequence=9)
    await store.checkpoint("s0", owner="a", sequence=BIG)
    with pytest.raises(LeaseLostError):
        await store.checkpoint("s0", owner="b", sequence=BIG + 1)
    assert await store.get_checkpoint("s0") == BIG
    assert await store.get_checkpoint("missing") is None


async def test_release_frees_the_lease_for_another_worker(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.checkpoint("s0", owner="a", sequence=41)
    await store.release("s0", owner="a")
    row = (await store.list_leases())["s0"]
    assert row.owner is None
    assert row.free
    with pytest.raises(LeaseLostError):
        await store.release("s0", owner="a")
    taken = await store.acquire("s0", owner="b", expected_counter=row.counter)
    assert taken.checkpoint == 41


async def test_a_finished_shard_cannot_be_taken_again(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.checkpoint("s0", owner="a", sequence=7)
    await store.mark_finished("s0", owner="a")
    row = (await store.list_leases())["s0"]
    assert (row.finished, row.owner, row.checkpoint) == (True, None, 7)
    with pytest.raises(LeaseTakenError):
        await store.acquire("s0", owner="b", expected_counter=row.counter)
    with pytest.raises(LeaseLostError):
        await store.mark_finished("s0", owner="a")


async def test_of_many_racing_takers_exactly_one_wins(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    seen = (await store.list_leases())["s0"].counter

    async def take(worker: str) -> str | None:
        try:
            await store.acquire("s0", owner=worker, expected_counter=seen)
        except LeaseTakenError:
            return None
        return worker

    winners = [w for w in await asyncio.gather(*(take(f"w{i}") for i in range(8))) if w]
    assert len(winners) == 1
    assert (await store.list_leases())["s0"].owner == winners[0]


async def test_only_a_finished_row_is_deleted(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.checkpoint("s0", owner="a", sequence=BIG)
    assert await store.delete_finished("s0") is False  # owned, being read: kept
    await store.release("s0", owner="a")
    assert await store.delete_finished("s0") is False  # released but not finished: kept
    assert (await store.list_leases())["s0"].checkpoint == BIG
    row = await store.acquire("s0", owner="b", expected_counter=2)
    await store.mark_finished("s0", owner="b")
    assert row.checkpoint == BIG
    assert await store.delete_finished("s0") is True
    assert "s0" not in await store.list_leases()
    assert await store.get_checkpoint("s0") is None
    assert await store.delete_finished("s0") is False  # gone already: harmless
    assert await store.delete_finished("never") is False


async def test_of_many_racing_deleters_exactly_one_deletes(store: LeaseStore) -> None:
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.mark_finished("s0", owner="a")
    await store.acquire("s1", owner="a", expected_counter=None)
    outcomes = await asyncio.gather(*(store.delete_finished("s0") for _ in range(8)))
    assert sorted(outcomes) == [False] * 7 + [True]
    assert set(await store.list_leases()) == {"s1"}


async def test_a_delete_racing_a_take_never_deletes_a_live_row(store: LeaseStore) -> None:
    # A worker deciding from a stale table that a row is finished cannot delete it once it
    # is not: here the row was never finished, and is taken while the delete is under way.
    await store.acquire("s0", owner="a", expected_counter=None)
    await store.release("s0", owner="a")
    taken, deleted = await asyncio.gather(
        store.acquire("s0", owner="b", expected_counter=2), store.delete_finished("s0")
    )
    assert deleted is False
    assert (await store.list_leases())["s0"].owner == taken.owner == "b"


async def test_sqlite_store_drops_the_expiry_column_of_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "CREATE TABLE leases (shard_id TEXT PRIMARY KEY, owner TEXT, "
            "counter INTEGER NOT NULL, expires_at REAL NOT NULL, checkpoint TEXT, "
            "finished INTEGER NOT NULL DEFAULT 0)"
        )
        conn.execute("INSERT INTO leases VALUES ('s0', 'a', 4, 1800000000.0, ?, 0)", (str(BIG),))
    async with SqliteLeaseStore(path) as store:
        assert (await store.list_leases())["s0"] == Lease("s0", "a", 4, BIG)
        await store.acquire("s1", owner="b", expected_counter=None)  # refused before the drop
        assert (await store.renew("s0", owner="a")).counter == 5
    async with SqliteLeaseStore(path) as again:  # opening a migrated file changes nothing
        assert set(await again.list_leases()) == {"s0", "s1"}


async def test_dynamo_store_reads_rows_written_with_an_expiry(dynamodb: Any) -> None:
    table = kf.unique_name("old")
    await create_lease_table(dynamodb, table)
    await dynamodb.put_item(
        TableName=table,
        Item={
            "shard_id": {"S": "s0"},
            "owner": {"S": "a"},
            "counter": {"N": "4"},
            "expires_at": {"N": "1800000000.0"},
            "checkpoint": {"S": str(BIG)},
            "finished": {"BOOL": False},
        },
    )
    store = DynamoLeaseStore(dynamodb, table)
    assert (await store.list_leases())["s0"] == Lease("s0", "a", 4, BIG)
    assert (await store.renew("s0", owner="a")).counter == 5


async def test_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite3"
    async with SqliteLeaseStore(path) as first:
        await first.acquire("s0", owner="a", expected_counter=None)
        await first.checkpoint("s0", owner="a", sequence=BIG)
    async with SqliteLeaseStore(path) as second:
        assert await second.get_checkpoint("s0") == BIG


async def test_sqlite_store_refuses_use_outside_its_context(tmp_path: Path) -> None:
    store = SqliteLeaseStore(tmp_path / "x.sqlite3")
    with pytest.raises(UsageError):
        await store.list_leases()


async def test_dynamo_store_translates_a_missing_table(dynamodb: Any) -> None:
    store = DynamoLeaseStore(dynamodb, kf.unique_name("absent"))
    with pytest.raises(ResourceNotFoundError) as caught:
        await store.list_leases()
    assert caught.value.operation == "Scan"
    assert isinstance(caught.value.__cause__, Exception)


async def test_dynamo_table_creation_refuses_a_duplicate(dynamodb: Any) -> None:
    table = kf.unique_name("dup")
    await create_lease_table(dynamodb, table)
    with pytest.raises(AwsServiceError) as caught:
        await create_lease_table(dynamodb, table)
    assert caught.value.code == "ResourceInUseException"


async def test_dynamo_store_lists_many_leases(dynamodb: Any) -> None:
    table = kf.unique_name("many")
    await create_lease_table(dynamodb, table)
    store = DynamoLeaseStore(dynamodb, table)
    for i in range(30):
        await store.acquire(f"s{i:02}", owner="a", expected_counter=None)
    assert sorted(await store.list_leases()) == [f"s{i:02}" for i in range(30)]
