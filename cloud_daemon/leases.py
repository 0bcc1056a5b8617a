"""Shard leases and checkpoints: one interface, a local SQLite store and a DynamoDB lease table.

A lease says which worker reads a shard and how far it got. Every store makes the same
promises, so the consumer does not care which one it has:

- **acquire** is conditional on the lease counter the caller saw (or on the row not existing
  yet): of two workers racing for one lease, exactly one wins, the other gets
  :class:`~cloud_daemon.errors.LeaseTakenError`.
- **renew**, **checkpoint**, **release** and **mark_finished** are conditional on the caller
  still being the owner: a worker whose lease was taken over gets
  :class:`~cloud_daemon.errors.LeaseLostError` and can never move the new owner's checkpoint.
- **acquire**, **renew**, **release** and **mark_finished** bump the counter; **checkpoint**
  does not (a renewal proves the owner alive, a checkpoint need not).
- **delete_finished** deletes a row only if it is finished: a race with another worker cleaning
  the same row, or with a stale view of the table, does no harm.
- Sequence numbers are stored as decimal strings (they exceed 64 bits, and DynamoDB numbers
  have 38 digits) and handed out as integers.
- Rows hold no expiry time: whether a lease lapsed is decided by each worker from the counter
  and its own monotonic clock (:class:`~cloud_daemon.lineage.LeaseExpiry`), never from a wall
  clock written by another machine. The stores read no clock at all.

:class:`SqliteLeaseStore` is the default for a single instance; :class:`DynamoLeaseStore`
shares leases between instances; :class:`MemoryLeaseStore` is the in-memory fake for tests of
the consumer's core.

Botocore exceptions are translated here, once, by :func:`aws_errors` (the Kinesis adapter in
``consumer.py`` uses it too).
"""

from __future__ import annotations

import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

import botocore.exceptions

from cloud_daemon.errors import (
    AwsServiceError,
    AwsTransportError,
    IteratorExpiredError,
    LeaseLostError,
    LeaseTakenError,
    ResourceNotFoundError,
    ThrottledError,
)
from cloud_daemon.lineage import Lease
from cloud_daemon.sqlite_store import SqliteStore
from shared.errors import DecodeError

__all__ = [
    "DynamoLeaseStore",
    "Lease",
    "LeaseStore",
    "MemoryLeaseStore",
    "SqliteLeaseStore",
    "aws_errors",
    "create_lease_table",
]

_THROTTLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "LimitExceededException",
    }
)


@asynccontextmanager
async def aws_errors(
    operation: str, *, resource: str = "", shard_id: str = ""
) -> AsyncIterator[None]:
    """Translate botocore and connection exceptions raised inside into our hierarchy.

    Args:
        operation: the AWS operation called inside (for the error's attributes).
        resource: the stream or table name, for :class:`ResourceNotFoundError`.
        shard_id: the shard the call is about, for :class:`IteratorExpiredError`.

    Raises:
        ThrottledError: a throughput or rate limit was hit.
        IteratorExpiredError: a shard iterator expired.
        ResourceNotFoundError: the stream or table does not exist.
        AwsServiceError: any other refusal, with its code.
        AwsTransportError: the connection failed or timed out.
    """
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        if code in _THROTTLE_CODES:
            raise ThrottledError(
                operation, code, limit_name=f"{operation} rate", retry_after=None
            ) from exc
        if code == "ExpiredIteratorException":
            raise IteratorExpiredError(operation, code, shard_id=shard_id) from exc
        if code == "ResourceNotFoundException":
            raise ResourceNotFoundError(operation, resource) from exc
        raise AwsServiceError(operation, code) from exc
    except (botocore.exceptions.BotoCoreError, OSError, TimeoutError) as exc:
        # Connection failures surface as BotoCoreError subclasses (EndpointConnectionError,
        # ReadTimeoutError), or as OSError from the socket layer.
        raise AwsTransportError(operation, type(exc).__name__) from exc


class LeaseStore(ABC):
    """Where leases and checkpoints live. Every write is conditional (see the module doc)."""

    @abstractmethod
    async def list_leases(self) -> dict[str, Lease]:
        """Every lease row, by shard id (strongly consistent)."""

    @abstractmethod
    async def acquire(
        self,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int | None,
    ) -> Lease:
        """Take a lease, creating its row when ``expected_counter`` is ``None``.

        Args:
            shard_id: the shard.
            owner: this worker.
            expected_counter: the counter seen in :meth:`list_leases`, or ``None`` for no row.

        Returns:
            The lease as now stored (checkpoint and counter included).

        Raises:
            LeaseTakenError: the row changed since it was seen, or is finished.
        """

    @abstractmethod
    async def renew(self, shard_id: str, *, owner: str) -> Lease:
        """Renew a lease we hold: bump its counter, so other workers see us alive.

        Returns:
            The lease as now stored.

        Raises:
            LeaseLostError: another worker owns it now, or it was released.
        """

    @abstractmethod
    async def checkpoint(self, shard_id: str, *, owner: str, sequence: int) -> None:
        """Record that every record up to ``sequence`` was handled.

        Raises:
            LeaseLostError: we no longer own the lease; the checkpoint was not written.
        """

    @abstractmethod
    async def get_checkpoint(self, shard_id: str) -> int | None:
        """The last checkpoint of ``shard_id``, or ``None`` (no row, or no checkpoint yet)."""

    @abstractmethod
    async def mark_finished(self, shard_id: str, *, owner: str) -> None:
        """Mark a shard read to its end, and release it, so its children may start.

        Raises:
            LeaseLostError: we no longer own the lease.
        """

    @abstractmethod
    async def release(self, shard_id: str, *, owner: str) -> None:
        """Give a lease up (graceful hand-off): another worker may take it at once.

        Raises:
            LeaseLostError: we no longer own the lease.
        """

    @abstractmethod
    async def delete_finished(self, shard_id: str) -> bool:
        """Delete a finished shard's row (it no longer orders its children).

        Args:
            shard_id: the shard.

        Returns:
            Whether this call deleted it; ``False`` when the row is absent (another worker
            deleted it first) or not finished, and then nothing changed.
        """


# --- in memory -----------------------------------------------------------------------------


class MemoryLeaseStore(LeaseStore):
    """An in-memory lease store for tests of the consumer's core (one process only)."""

    def __init__(self) -> None:
        self.rows: dict[str, Lease] = {}

    async def list_leases(self) -> dict[str, Lease]:
        return dict(self.rows)

    async def acquire(
        self,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int | None,
    ) -> Lease:
        row = self.rows.get(shard_id)
        seen = None if row is None else row.counter
        if seen != expected_counter or (row is not None and row.finished):
            raise LeaseTakenError(shard_id, owner, f"counter {seen}, expected {expected_counter}")
        base = row or Lease(shard_id)
        lease = Lease(shard_id, owner, base.counter + 1, base.checkpoint)
        self.rows[shard_id] = lease
        return lease

    def _owned(self, shard_id: str, owner: str) -> Lease:
        row = self.rows.get(shard_id)
        if row is None or row.owner != owner:
            raise LeaseLostError(shard_id, owner, "owned by another worker or released")
        return row

    async def renew(self, shard_id: str, *, owner: str) -> Lease:
        row = self._owned(shard_id, owner)
        lease = Lease(shard_id, owner, row.counter + 1, row.checkpoint)
        self.rows[shard_id] = lease
        return lease

    async def checkpoint(self, shard_id: str, *, owner: str, sequence: int) -> None:
        row = self._owned(shard_id, owner)
        self.rows[shard_id] = Lease(shard_id, owner, row.counter, sequence)

    async def get_checkpoint(self, shard_id: str) -> int | None:
        row = self.rows.get(shard_id)
        return None if row is None else row.checkpoint

    async def mark_finished(self, shard_id: str, *, owner: str) -> None:
        row = self._owned(shard_id, owner)
        self.rows[shard_id] = Lease(shard_id, None, row.counter + 1, row.checkpoint, finished=True)

    async def release(self, shard_id: str, *, owner: str) -> None:
        row = self._owned(shard_id, owner)
        self.rows[shard_id] = Lease(shard_id, None, row.counter + 1, row.checkpoint)

    async def delete_finished(self, shard_id: str) -> bool:
        row = self.rows.get(shard_id)
        if row is None or not row.finished:
            return False
        del self.rows[shard_id]
        return True


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    shard_id TEXT PRIMARY KEY,
    owner TEXT,
    counter INTEGER NOT NULL,
    checkpoint TEXT,
    finished INTEGER NOT NULL DEFAULT 0
)
"""
# Files written before expiry moved to the counter have an ``expires_at REAL NOT NULL`` column,
# which would refuse every new row: it is dropped when such a file is opened.
_OBSOLETE_COLUMN = "expires_at"
_COLUMNS = "shard_id, owner, counter, checkpoint, finished"
# The column list is a constant of this module and every value is a bound parameter, so the
# query built from it (S608) carries no outside input.
_SELECT = f"SELECT {_COLUMNS} FROM leases"  # noqa: S608 - constant columns, see above


def _row_to_lease(row: tuple[Any, ...]) -> Lease:
    shard_id, owner, counter, checkpoint, finished = row
    return Lease(
        shard_id,
        owner,
        int(counter),
        None if checkpoint is None else int(checkpoint),
        bool(finished),
    )


class SqliteLeaseStore(LeaseStore, SqliteStore):
    """Leases and checkpoints in a local SQLite file: the default for a single instance.

    Every call is one short statement in its own transaction, on the store's own database
    thread (:class:`~cloud_daemon.sqlite_store.SqliteStore`): a slow commit never stalls the
    event loop.

    Use as an async context manager: ``async with SqliteLeaseStore(path) as store: ...``.
    """

    def __init__(self, path: Path) -> None:
        """Args:
        path: the database file (created with its table when missing).
        """
        super().__init__(path, schema=_SCHEMA, synchronous="NORMAL", thread_name="ztp-leases")

    async def __aenter__(self) -> Self:
        await super().__aenter__()

        def migrate(conn: sqlite3.Connection) -> None:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(leases)")}
            if _OBSOLETE_COLUMN in columns:
                with conn:
                    conn.execute(f"ALTER TABLE leases DROP COLUMN {_OBSOLETE_COLUMN}")

        await self._call(migrate)
        return self

    async def list_leases(self) -> dict[str, Lease]:
        rows = await self._call(lambda c: c.execute(_SELECT).fetchall())
        return {row[0]: _row_to_lease(row) for row in rows}

    @staticmethod
    def _fetch(conn: sqlite3.Connection, shard_id: str) -> Lease:
        row = conn.execute(
            _SELECT + " WHERE shard_id = ?",
            (shard_id,),
        ).fetchone()
        return _row_to_lease(row)

    async def acquire(
        self,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int | None,
    ) -> Lease:
        def run(conn: sqlite3.Connection) -> Lease | None:
            with conn:
                if expected_counter is None:
                    cur = conn.execute(
                        "INSERT INTO leases (shard_id, owner, counter) "
                        "VALUES (?, ?, 1) ON CONFLICT (shard_id) DO NOTHING",
                        (shard_id, owner),
                    )
                else:
                    cur = conn.execute(
                        "UPDATE leases SET owner = ?, counter = counter + 1 "
                        "WHERE shard_id = ? AND counter = ? AND finished = 0",
                        (owner, shard_id, expected_counter),
                    )
                return self._fetch(conn, shard_id) if cur.rowcount == 1 else None

        lease = await self._call(run)
        if lease is None:
            raise LeaseTakenError(shard_id, owner, f"counter moved from {expected_counter}")
        return lease

    async def _owned_update(
        self, shard_id: str, owner: str, sql: str, args: tuple[Any, ...]
    ) -> None:
        def run(conn: sqlite3.Connection) -> int:
            with conn:
                return conn.execute(sql, (*args, shard_id, owner)).rowcount

        if await self._call(run) != 1:
            raise LeaseLostError(shard_id, owner, "owned by another worker or released")

    async def renew(self, shard_id: str, *, owner: str) -> Lease:
        def run(conn: sqlite3.Connection) -> Lease | None:
            with conn:
                cur = conn.execute(
                    "UPDATE leases SET counter = counter + 1 WHERE shard_id = ? AND owner = ?",
                    (shard_id, owner),
                )
                return self._fetch(conn, shard_id) if cur.rowcount == 1 else None

        lease = await self._call(run)
        if lease is None:
            raise LeaseLostError(shard_id, owner, "owned by another worker or released")
        return lease

    async def checkpoint(self, shard_id: str, *, owner: str, sequence: int) -> None:
        await self._owned_update(
            shard_id,
            owner,
            "UPDATE leases SET checkpoint = ? WHERE shard_id = ? AND owner = ?",
            (str(sequence),),
        )

    async def get_checkpoint(self, shard_id: str) -> int | None:
        row = await self._call(
            lambda c: c.execute(
                "SELECT checkpoint FROM leases WHERE shard_id = ?", (shard_id,)
            ).fetchone()
        )
        return None if row is None or row[0] is None else int(row[0])

    async def mark_finished(self, shard_id: str, *, owner: str) -> None:
        await self._owned_update(
            shard_id,
            owner,
            "UPDATE leases SET finished = 1, owner = NULL, counter = counter + 1 "
            "WHERE shard_id = ? AND owner = ?",
            (),
        )

    async def release(self, shard_id: str, *, owner: str) -> None:
        await self._owned_update(
            shard_id,
            owner,
            "UPDATE leases SET owner = NULL, counter = counter + 1 "
            "WHERE shard_id = ? AND owner = ?",
            (),
        )

    async def delete_finished(self, shard_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> int:
            with conn:
                return conn.execute(
                    "DELETE FROM leases WHERE shard_id = ? AND finished = 1", (shard_id,)
                ).rowcount

        return await self._call(run) == 1


# --- DynamoDB -------------------------------------------------------------------------------

# Every attribute goes through a placeholder: "owner" and "counter" may collide with DynamoDB's
# long list of reserved words.
_NAMES = {
    "#s": "shard_id",
    "#o": "owner",
    "#c": "counter",
    "#k": "checkpoint",
    "#f": "finished",
}


def _item_to_lease(item: Mapping[str, Any]) -> Lease:
    try:
        return Lease(
            item["shard_id"]["S"],
            item["owner"]["S"] if "owner" in item else None,
            int(item["counter"]["N"]),
            int(item["checkpoint"]["S"]) if "checkpoint" in item else None,
            bool(item.get("finished", {}).get("BOOL", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DecodeError("lease item", "a lease row", sorted(item)) from exc


async def create_lease_table(client: Any, table_name: str) -> None:
    """Create a lease table (on-demand capacity) and wait until it is active.

    Args:
        client: an aiobotocore DynamoDB client.
        table_name: the table to create.

    Raises:
        AwsServiceError: DynamoDB refused (for example, the table exists).
        AwsTransportError: DynamoDB could not be reached.
    """
    async with aws_errors("CreateTable", resource=table_name):
        await client.create_table(
            TableName=table_name,
            AttributeDefinitions=[{"AttributeName": "shard_id", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "shard_id", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST",
        )
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})


class DynamoLeaseStore(LeaseStore):
    """Leases in a DynamoDB table shared by several consumer instances.

    Conditional writes make the promises of the module doc hold across processes: acquire is
    conditional on the counter (or on the row not existing), the other writes on the owner.
    Reads are strongly consistent.
    """

    def __init__(self, client: Any, table_name: str) -> None:
        """Args:
        client: an aiobotocore DynamoDB client (owned by the caller).
        table_name: the lease table, with string hash key ``shard_id``.
        """
        self._client = client
        self._table = table_name

    async def _update(self, shard_id: str, **kwargs: Any) -> Mapping[str, Any] | None:
        """UpdateItem; ``None`` when the condition failed."""
        try:
            async with aws_errors("UpdateItem", resource=self._table):
                response = await self._client.update_item(
                    TableName=self._table,
                    Key={"shard_id": {"S": shard_id}},
                    ReturnValues="ALL_NEW",
                    **kwargs,
                )
        except AwsServiceError as exc:
            if exc.code == "ConditionalCheckFailedException":
                return None
            raise
        attributes: Mapping[str, Any] = response["Attributes"]
        return attributes

    async def list_leases(self) -> dict[str, Lease]:
        leases: dict[str, Lease] = {}
        start: dict[str, Any] | None = None
        while True:
            extra = {"ExclusiveStartKey": start} if start else {}
            async with aws_errors("Scan", resource=self._table):
                page = await self._client.scan(TableName=self._table, ConsistentRead=True, **extra)
            for item in page.get("Items", []):
                lease = _item_to_lease(item)
                leases[lease.shard_id] = lease
            start = page.get("LastEvaluatedKey")
            if not start:
                return leases

    async def acquire(
        self,
        shard_id: str,
        *,
        owner: str,
        expected_counter: int | None,
    ) -> Lease:
        if expected_counter is None:
            item = {
                "shard_id": {"S": shard_id},
                "owner": {"S": owner},
                "counter": {"N": "1"},
                "finished": {"BOOL": False},
            }
            try:
                async with aws_errors("PutItem", resource=self._table):
                    await self._client.put_item(
                        TableName=self._table,
                        Item=item,
                        ConditionExpression="attribute_not_exists(#s)",
                        ExpressionAttributeNames={"#s": "shard_id"},
                    )
            except AwsServiceError as exc:
                if exc.code == "ConditionalCheckFailedException":
                    raise LeaseTakenError(shard_id, owner, "row created by another") from exc
                raise
            return _item_to_lease(item)
        attributes = await self._update(
            shard_id,
            UpdateExpression="SET #o = :o, #c = #c + :one",
            ConditionExpression="#c = :seen AND #f = :false",
            ExpressionAttributeNames={k: _NAMES[k] for k in ("#o", "#c", "#f")},
            ExpressionAttributeValues={
                ":o": {"S": owner},
                ":one": {"N": "1"},
                ":seen": {"N": str(expected_counter)},
                ":false": {"BOOL": False},
            },
        )
        if attributes is None:
            raise LeaseTakenError(shard_id, owner, f"counter moved from {expected_counter}")
        return _item_to_lease(attributes)

    async def _owned(
        self, shard_id: str, owner: str, expression: str, values: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        names = {k: v for k, v in _NAMES.items() if k in expression or k == "#o"}
        attributes = await self._update(
            shard_id,
            UpdateExpression=expression,
            ConditionExpression="#o = :me",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={":me": {"S": owner}, **values},
        )
        if attributes is None:
            raise LeaseLostError(shard_id, owner, "owned by another worker or released")
        return attributes

    async def renew(self, shard_id: str, *, owner: str) -> Lease:
        attributes = await self._owned(shard_id, owner, "SET #c = #c + :one", {":one": {"N": "1"}})
        return _item_to_lease(attributes)

    async def checkpoint(self, shard_id: str, *, owner: str, sequence: int) -> None:
        await self._owned(shard_id, owner, "SET #k = :k", {":k": {"S": str(sequence)}})

    async def get_checkpoint(self, shard_id: str) -> int | None:
        async with aws_errors("GetItem", resource=self._table):
            response = await self._client.get_item(
                TableName=self._table, Key={"shard_id": {"S": shard_id}}, ConsistentRead=True
            )
        item = response.get("Item")
        return None if item is None else _item_to_lease(item).checkpoint

    async def mark_finished(self, shard_id: str, *, owner: str) -> None:
        await self._owned(
            shard_id,
            owner,
            "SET #f = :true, #c = #c + :one REMOVE #o",
            {":true": {"BOOL": True}, ":one": {"N": "1"}},
        )

    async def release(self, shard_id: str, *, owner: str) -> None:
        await self._owned(shard_id, owner, "SET #c = #c + :one REMOVE #o", {":one": {"N": "1"}})

    async def delete_finished(self, shard_id: str) -> bool:
        try:
            async with aws_errors("DeleteItem", resource=self._table):
                await self._client.delete_item(
                    TableName=self._table,
                    Key={"shard_id": {"S": shard_id}},
                    # An absent row fails the condition too: someone else deleted it first.
                    ConditionExpression="#f = :true",
                    ExpressionAttributeNames={"#f": "finished"},
                    ExpressionAttributeValues={":true": {"BOOL": True}},
                )
        except AwsServiceError as exc:
            if exc.code == "ConditionalCheckFailedException":
                return False
            raise
        return True
