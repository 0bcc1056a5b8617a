"""The issuance-ledger contract, held by the in-memory, SQLite and DynamoDB (moto) ledgers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from aiobotocore.session import get_session

from cloud_daemon.errors import LedgerConflictError, ResourceNotFoundError
from cloud_daemon.ledger import (
    DynamoLedger,
    IssuanceLedger,
    IssuanceState,
    LedgerEntry,
    MemoryLedger,
    SqliteLedger,
    create_ledger_table,
)
from sandbox.aws import MotoSandbox
from shared.errors import UsageError
from tests.sandbox.aws_fixtures import aws_broker_pid_file, aws_pki, moto_sandbox

__all__ = ["aws_broker_pid_file", "aws_pki", "moto_sandbox"]  # fixtures used by name

pytestmark = pytest.mark.asyncio(loop_scope="module")

NOW = 1_800_000_000.0
THING = "ztp-SN0001"
KEY = "ab" * 32
KEY2 = "cd" * 32
CERT = {
    "certificate_id": "12" * 32,
    "certificate_arn": "arn:aws:iot:us-east-1:123456789012:cert/" + "12" * 32,
    "certificate_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
}


@pytest_asyncio.fixture(loop_scope="module", params=["memory", "sqlite", "dynamodb"])
async def ledger(
    request: pytest.FixtureRequest, tmp_path: Path, moto_sandbox: MotoSandbox
) -> AsyncIterator[IssuanceLedger]:
    if request.param == "memory":
        yield MemoryLedger()
    elif request.param == "sqlite":
        async with SqliteLedger(tmp_path / "ledger.sqlite3") as sqlite:
            yield sqlite
    else:
        async with get_session().create_client(
            "dynamodb", **moto_sandbox.client_kwargs()
        ) as client:
            table = f"ledger-{uuid.uuid4().hex[:8]}"
            await create_ledger_table(client, table)
            yield DynamoLedger(client, table)


async def test_begin_writes_the_intent_once(ledger: IssuanceLedger) -> None:
    entry, created = await ledger.begin(THING, KEY, request_id="r1", owner="w1", now=NOW)
    assert created
    assert (entry.state, entry.attempt, entry.owner, entry.request_id) == (
        IssuanceState.INTENT,
        1,
        "w1",
        "r1",
    )
    again, created_again = await ledger.begin(THING, KEY, request_id="r2", owner="w2", now=NOW + 1)
    assert not created_again
    assert again == entry
    assert await ledger.get(THING, KEY) == entry
    assert await ledger.get(THING, KEY2) is None


async def test_begin_races_have_one_winner(ledger: IssuanceLedger) -> None:
    results = await asyncio.gather(
        *(ledger.begin(THING, KEY, request_id=f"r{i}", owner=f"w{i}", now=NOW) for i in range(8))
    )
    assert sum(created for _, created in results) == 1
    winners = {entry.owner for entry, _ in results}
    assert len(winners) == 1


async def test_minted_then_issued_then_confirmed(ledger: IssuanceLedger) -> None:
    intent, _ = await ledger.begin(THING, KEY, request_id="r1", owner="w1", now=NOW)
    minted = await ledger.record_minted(intent, now=NOW + 1, **CERT)
    assert minted.state is IssuanceState.MINTED
    assert minted.certificate_pem == CERT["certificate_pem"]
    assert await ledger.get(THING, KEY) == minted
    issued = await ledger.advance(minted, IssuanceState.ISSUED, now=NOW + 2, operation_uid="op1")
    assert (issued.state, issued.operation_uid) == (IssuanceState.ISSUED, "op1")
    resent = await ledger.advance(
        issued, IssuanceState.ISSUED, now=NOW + 3, request_id="r9", operation_uid="op2"
    )
    assert (resent.request_id, resent.operation_uid) == ("r9", "op2")
    confirmed = await ledger.advance(resent, IssuanceState.CONFIRMED, now=NOW + 4)
    assert await ledger.get(THING, KEY) == confirmed
    assert confirmed.operation_uid == "op2"
    with pytest.raises(LedgerConflictError):
        await ledger.advance(confirmed, IssuanceState.ISSUED, now=NOW + 5)


async def test_an_intent_cannot_be_advanced(ledger: IssuanceLedger) -> None:
    intent, _ = await ledger.begin(THING, KEY, request_id="r1", owner="w1", now=NOW)
    fake_minted = LedgerEntry(THING, KEY, IssuanceState.MINTED, "r1", "w1", 1, NOW, **CERT)
    with pytest.raises(LedgerConflictError):
        await ledger.advance(fake_minted, IssuanceState.ISSUED, now=NOW)
    assert await ledger.get(THING, KEY) == intent
    with pytest.raises(UsageError):
        await ledger.advance(fake_minted, IssuanceState.MINTED, now=NOW)


async def test_take_over_fences_the_crashed_worker(ledger: IssuanceLedger) -> None:
    stale, _ = await ledger.begin(THING, KEY, request_id="r1", owner="dead", now=NOW)
    taken = await ledger.take_over(stale, request_id="r2", owner="w2", now=NOW + 60)
    assert (taken.attempt, taken.owner, taken.request_id) == (2, "w2", "r2")
    # The presumed-dead worker wakes up: its result must not land.
    with pytest.raises(LedgerConflictError):
        await ledger.record_minted(stale, now=NOW + 61, **CERT)
    # A second taker that read the same stale entry loses too.
    with pytest.raises(LedgerConflictError):
        await ledger.take_over(stale, request_id="r3", owner="w3", now=NOW + 62)
    minted = await ledger.record_minted(taken, now=NOW + 63, **CERT)
    assert minted.attempt == 2
    with pytest.raises(LedgerConflictError):
        await ledger.take_over(taken, request_id="r4", owner="w4", now=NOW + 64)


async def test_entries_for_thing(ledger: IssuanceLedger) -> None:
    await ledger.begin(THING, KEY2, request_id="r2", owner="w", now=NOW + 5)
    await ledger.begin(THING, KEY, request_id="r1", owner="w", now=NOW)
    await ledger.begin("ztp-other", KEY, request_id="r3", owner="w", now=NOW)
    entries = await ledger.entries_for_thing(THING)
    assert [e.key_sha256 for e in entries] == [KEY, KEY2]
    assert await ledger.entries_for_thing("ztp-none") == []


@pytest.mark.parametrize(
    ("thing", "key"), [("bad thing", KEY), ("", KEY), (THING, "AB" * 32), (THING, "ab")]
)
async def test_entries_validate(thing: str, key: str) -> None:
    with pytest.raises(UsageError):
        LedgerEntry(thing, key, IssuanceState.INTENT, "r", "w")


async def test_entry_certificate_fields_follow_the_state() -> None:
    with pytest.raises(UsageError):
        LedgerEntry(THING, KEY, IssuanceState.INTENT, "r", "w", **CERT)
    with pytest.raises(UsageError):
        LedgerEntry(THING, KEY, IssuanceState.ISSUED, "r", "w")
    entry = LedgerEntry(THING, KEY, IssuanceState.ISSUED, "r", "w", **CERT)
    assert "BEGIN" not in repr(entry)


async def test_sqlite_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    async with SqliteLedger(path) as first:
        intent, _ = await first.begin(THING, KEY, request_id="r1", owner="w1", now=NOW)
        minted = await first.record_minted(intent, now=NOW + 1, **CERT)
    async with SqliteLedger(path) as second:
        assert await second.get(THING, KEY) == minted


async def test_sqlite_outside_async_with_is_misuse(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        await SqliteLedger(tmp_path / "x.sqlite3").get(THING, KEY)


async def test_dynamo_missing_table_is_a_configuration_error(moto_sandbox: MotoSandbox) -> None:
    async with get_session().create_client("dynamodb", **moto_sandbox.client_kwargs()) as client:
        with pytest.raises(ResourceNotFoundError):
            await DynamoLedger(client, "no-such-table").get(THING, KEY)


async def test_release_withdraws_only_our_intent(ledger: IssuanceLedger) -> None:
    intent, _ = await ledger.begin(THING, KEY, request_id="r1", owner="w1", now=NOW)
    assert await ledger.release(intent)
    assert await ledger.get(THING, KEY) is None
    assert not await ledger.release(intent)  # already gone
    again, created = await ledger.begin(THING, KEY, request_id="r2", owner="w2", now=NOW + 1)
    assert created
    taken = await ledger.take_over(again, request_id="r3", owner="w3", now=NOW + 90)
    assert not await ledger.release(again)  # taken over meanwhile: not ours to withdraw
    minted = await ledger.record_minted(taken, now=NOW + 91, **CERT)
    assert not await ledger.release(taken)  # a minted certificate is never forgotten
    assert await ledger.get(THING, KEY) == minted
