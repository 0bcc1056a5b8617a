"""The issuance ledger: what makes certificate issuance idempotent.

Theory of operation
-------------------
AWS IoT's CreateCertificateFromCsr mints a new, distinct certificate on every call, even for the
same CSR. So before calling it, the issuer records its *intent* with a conditional write keyed
by ``(thing name, SHA-256 of the CSR's public key)``; after it, the *result*. A redelivered
request finds the entry and re-sends the stored certificate instead of minting another.

An entry moves through these states; every move is a conditional write, so of two workers
racing on one entry exactly one wins and the other gets
:class:`~cloud_daemon.errors.LedgerConflictError`:

==============  ==============================  ===========================================
state           entered by                      condition on the stored entry
==============  ==============================  ===========================================
``INTENT``      :meth:`~IssuanceLedger.begin`   no entry exists for the key
``INTENT``      :meth:`~IssuanceLedger.take_over`  ``INTENT`` with the ``attempt`` seen
``MINTED``      :meth:`~IssuanceLedger.record_minted`  ``INTENT`` with our ``attempt``
``ISSUED``      :meth:`~IssuanceLedger.advance`  ``MINTED`` or ``ISSUED``
``CONFIRMED``   :meth:`~IssuanceLedger.advance`  ``MINTED``, ``ISSUED`` or ``CONFIRMED``
==============  ==============================  ===========================================

``MINTED`` means the certificate exists and its id and PEM are stored, but it may not be
attached to the thing and policy yet (attaching is idempotent, so a replay just attaches
again). ``ISSUED`` means it is attached and may be delivered. ``CONFIRMED`` means the device
reported it installed.

An intent whose issuance failed before anything was minted (CreateThing failed, AWS refused the
CSR, throttling outlasted the retries) is withdrawn at once (:meth:`IssuanceLedger.release`), so
the consumer's retry starts afresh.

An ``INTENT`` that stays unresolved longer than the issuer's intent timeout belongs to a worker
that crashed between the two writes: another attempt takes it over (:meth:`take_over`, which
bumps ``attempt`` so the crashed worker, should it wake up, cannot record a result), looks for
certificates minted for the key, deactivates them, and mints afresh.

:class:`SqliteLedger` is the default for a single instance; :class:`DynamoLedger` is shared by
several (the same choice as the lease store); :class:`MemoryLedger` is the in-memory fake for
tests of code above the ledger. Times are wall-clock seconds passed in by the caller.
"""

from __future__ import annotations

import enum
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from cloud_daemon.errors import AwsServiceError, LedgerConflictError
from cloud_daemon.leases import aws_errors
from cloud_daemon.sqlite_store import SqliteStore
from shared.errors import DecodeError, UsageError

__all__ = [
    "ADVANCE_FROM",
    "DynamoLedger",
    "IssuanceLedger",
    "IssuanceState",
    "LedgerEntry",
    "MemoryLedger",
    "SqliteLedger",
    "create_ledger_table",
]

_KEY_RE: Final = re.compile(r"[0-9a-f]{64}")
_THING_RE: Final = re.compile(r"[A-Za-z0-9:_-]{1,128}")


class IssuanceState(enum.StrEnum):
    """Where an issuance stands (see the module doc)."""

    INTENT = "intent"
    MINTED = "minted"
    ISSUED = "issued"
    CONFIRMED = "confirmed"


#: For each state :meth:`IssuanceLedger.advance` may enter, the states it may come from.
ADVANCE_FROM: Final[Mapping[IssuanceState, frozenset[IssuanceState]]] = {
    IssuanceState.ISSUED: frozenset({IssuanceState.MINTED, IssuanceState.ISSUED}),
    IssuanceState.CONFIRMED: frozenset(
        {IssuanceState.MINTED, IssuanceState.ISSUED, IssuanceState.CONFIRMED}
    ),
}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One issuance.

    Attributes:
        thing_name: the thing the certificate is for.
        key_sha256: hex SHA-256 of the CSR's public key (DER SubjectPublicKeyInfo).
        state: where the issuance stands.
        request_id: the device request that started it (the latest one for a re-send).
        owner: the worker that wrote the intent (or took it over).
        attempt: 1, plus one per take-over of an abandoned intent.
        updated_at: wall-clock seconds of the last write.
        certificate_id: the certificate minted (``None`` in ``INTENT``).
        certificate_arn: its ARN.
        certificate_pem: its PEM (public; not a secret).
        operation_uid: the last AirVantage delivery operation, if any.

    Raises:
        UsageError: a field is malformed, or the certificate fields do not match the state.
    """

    thing_name: str
    key_sha256: str
    state: IssuanceState
    request_id: str
    owner: str
    attempt: int = 1
    updated_at: float = 0.0
    certificate_id: str | None = None
    certificate_arn: str | None = None
    certificate_pem: str | None = field(default=None, repr=False)
    operation_uid: str | None = None

    def __post_init__(self) -> None:
        _check_key(self.thing_name, self.key_sha256)
        if not isinstance(self.state, IssuanceState):
            raise UsageError(f"LedgerEntry.state must be an IssuanceState: {self.state!r}")
        if self.attempt < 1:
            raise UsageError("LedgerEntry.attempt must be >= 1")
        certificate = (self.certificate_id, self.certificate_arn, self.certificate_pem)
        if self.state is IssuanceState.INTENT:
            if any(value is not None for value in certificate):
                raise UsageError("an INTENT entry has no certificate yet")
        elif any(value is None for value in certificate):
            raise UsageError(f"a {self.state.value} entry needs certificate id, ARN and PEM")

    @property
    def has_certificate(self) -> bool:
        """Whether a certificate was minted for this entry."""
        return self.state is not IssuanceState.INTENT


def _check_key(thing_name: str, key_sha256: str) -> None:
    if not isinstance(thing_name, str) or not _THING_RE.fullmatch(thing_name):
        raise UsageError(f"thing name must be 1-128 characters of [A-Za-z0-9:_-]: {thing_name!r}")
    if not isinstance(key_sha256, str) or not _KEY_RE.fullmatch(key_sha256):
        raise UsageError("key_sha256 must be 64 lowercase hex digits")


class IssuanceLedger(ABC):
    """Where issuances are recorded. Every write is conditional (see the module doc)."""

    @abstractmethod
    async def get(self, thing_name: str, key_sha256: str) -> LedgerEntry | None:
        """The entry for a key, or ``None`` (strongly consistent)."""

    @abstractmethod
    async def entries_for_thing(self, thing_name: str) -> list[LedgerEntry]:
        """Every entry of a thing (all its keys), oldest write first."""

    @abstractmethod
    async def _insert(self, entry: LedgerEntry) -> bool:
        """Insert ``entry`` unless its key exists; whether it was inserted."""

    @abstractmethod
    async def _replace(
        self, entry: LedgerEntry, *, states: frozenset[IssuanceState], attempt: int | None
    ) -> bool:
        """Overwrite the stored entry if its state is in ``states`` (and its attempt matches)."""

    @abstractmethod
    async def _delete_intent(self, entry: LedgerEntry) -> bool:
        """Delete the entry if it is an ``INTENT`` at ``entry.attempt``; whether it was."""

    async def begin(
        self, thing_name: str, key_sha256: str, *, request_id: str, owner: str, now: float
    ) -> tuple[LedgerEntry, bool]:
        """Record the intent to mint, unless an entry for the key exists.

        Args:
            thing_name: the thing.
            key_sha256: the CSR's public-key digest.
            request_id: the device's request id.
            owner: this worker's id.
            now: wall-clock seconds.

        Returns:
            ``(entry, True)`` when the intent was written (go ahead and mint), or
            ``(existing entry, False)``.

        Raises:
            LedgerConflictError: the entry vanished between the failed insert and the read.
        """
        entry = LedgerEntry(thing_name, key_sha256, IssuanceState.INTENT, request_id, owner, 1, now)
        if await self._insert(entry):
            return entry, True
        existing = await self.get(thing_name, key_sha256)
        if existing is None:
            raise LedgerConflictError(thing_name, key_sha256, "an entry (insert refused)")
        return existing, False

    async def take_over(
        self, entry: LedgerEntry, *, request_id: str, owner: str, now: float
    ) -> LedgerEntry:
        """Take over an abandoned intent.

        Args:
            entry: the ``INTENT`` entry as read (its ``attempt`` is the condition).
            request_id: the request now being served.
            owner: this worker.
            now: wall-clock seconds.

        Returns:
            The entry now stored (``attempt`` one higher, ``owner`` us).

        Raises:
            LedgerConflictError: the entry moved since it was read.
        """
        taken = replace(
            entry, request_id=request_id, owner=owner, attempt=entry.attempt + 1, updated_at=now
        )
        if not await self._replace(
            taken, states=frozenset({IssuanceState.INTENT}), attempt=entry.attempt
        ):
            raise LedgerConflictError(
                entry.thing_name, entry.key_sha256, f"intent at attempt {entry.attempt}"
            )
        return taken

    async def release(self, entry: LedgerEntry) -> bool:
        """Withdraw our intent when we know no certificate was minted for it.

        Call it when issuance failed before CreateCertificateFromCsr was sent, or when AWS
        refused that call outright: the next attempt can then start at once instead of waiting
        for the intent to be presumed abandoned.

        Args:
            entry: our ``INTENT`` entry (its ``attempt`` is the condition).

        Returns:
            Whether the intent was removed (``False``: it was taken over meanwhile).
        """
        return await self._delete_intent(entry)

    async def record_minted(
        self,
        entry: LedgerEntry,
        *,
        certificate_id: str,
        certificate_arn: str,
        certificate_pem: str,
        now: float,
    ) -> LedgerEntry:
        """Record the certificate CreateCertificateFromCsr returned.

        Args:
            entry: our ``INTENT`` entry (its ``attempt`` is the condition).
            certificate_id: the new certificate's id.
            certificate_arn: its ARN.
            certificate_pem: its PEM.
            now: wall-clock seconds.

        Returns:
            The ``MINTED`` entry.

        Raises:
            LedgerConflictError: the intent was taken over (we were presumed dead).
        """
        minted = replace(
            entry,
            state=IssuanceState.MINTED,
            certificate_id=certificate_id,
            certificate_arn=certificate_arn,
            certificate_pem=certificate_pem,
            updated_at=now,
        )
        if not await self._replace(
            minted, states=frozenset({IssuanceState.INTENT}), attempt=entry.attempt
        ):
            raise LedgerConflictError(
                entry.thing_name, entry.key_sha256, f"our intent at attempt {entry.attempt}"
            )
        return minted

    async def advance(
        self,
        entry: LedgerEntry,
        to: IssuanceState,
        *,
        now: float,
        request_id: str | None = None,
        operation_uid: str | None = None,
    ) -> LedgerEntry:
        """Move an entry with a certificate to ``ISSUED`` or ``CONFIRMED``.

        Args:
            entry: the entry as read.
            to: ``ISSUED`` or ``CONFIRMED`` (see :data:`ADVANCE_FROM`).
            now: wall-clock seconds.
            request_id: the request now served, when it changed (a re-send).
            operation_uid: the delivery operation, when one was created.

        Returns:
            The entry now stored.

        Raises:
            UsageError: ``to`` is not a state :meth:`advance` enters.
            LedgerConflictError: the stored entry is in a state that may not move to ``to``.
        """
        sources = ADVANCE_FROM.get(to)
        if sources is None:
            raise UsageError(f"advance() cannot enter {to.value}")
        moved = replace(
            entry,
            state=to,
            updated_at=now,
            request_id=request_id or entry.request_id,
            operation_uid=operation_uid or entry.operation_uid,
        )
        if not await self._replace(moved, states=sources, attempt=None):
            expected = " or ".join(sorted(s.value for s in sources))
            raise LedgerConflictError(entry.thing_name, entry.key_sha256, expected)
        return moved


# --- in memory -----------------------------------------------------------------------------


class MemoryLedger(IssuanceLedger):
    """An in-memory ledger for tests of the code above it (one process only)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], LedgerEntry] = {}

    async def get(self, thing_name: str, key_sha256: str) -> LedgerEntry | None:
        return self.rows.get((thing_name, key_sha256))

    async def entries_for_thing(self, thing_name: str) -> list[LedgerEntry]:
        rows = [e for (thing, _), e in self.rows.items() if thing == thing_name]
        return sorted(rows, key=lambda e: e.updated_at)

    async def _insert(self, entry: LedgerEntry) -> bool:
        key = (entry.thing_name, entry.key_sha256)
        if key in self.rows:
            return False
        self.rows[key] = entry
        return True

    async def _replace(
        self, entry: LedgerEntry, *, states: frozenset[IssuanceState], attempt: int | None
    ) -> bool:
        key = (entry.thing_name, entry.key_sha256)
        stored = self.rows.get(key)
        if stored is None or stored.state not in states:
            return False
        if attempt is not None and stored.attempt != attempt:
            return False
        self.rows[key] = entry
        return True

    async def _delete_intent(self, entry: LedgerEntry) -> bool:
        key = (entry.thing_name, entry.key_sha256)
        stored = self.rows.get(key)
        if stored is None or stored.state is not IssuanceState.INTENT:
            return False
        if stored.attempt != entry.attempt:
            return False
        del self.rows[key]
        return True


# --- SQLite ---------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issuance (
    thing_name TEXT NOT NULL,
    key_sha256 TEXT NOT NULL,
    state TEXT NOT NULL,
    request_id TEXT NOT NULL,
    owner TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    certificate_id TEXT,
    certificate_arn TEXT,
    certificate_pem TEXT,
    operation_uid TEXT,
    PRIMARY KEY (thing_name, key_sha256)
)
"""
_COLUMNS: Final = (
    "thing_name",
    "key_sha256",
    "state",
    "request_id",
    "owner",
    "attempt",
    "updated_at",
    "certificate_id",
    "certificate_arn",
    "certificate_pem",
    "operation_uid",
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM issuance"  # noqa: S608 - constant columns


def _row_to_entry(row: tuple[Any, ...]) -> LedgerEntry:
    values = dict(zip(_COLUMNS, row, strict=True))
    try:
        values["state"] = IssuanceState(values["state"])
        values["attempt"] = int(values["attempt"])
        values["updated_at"] = float(values["updated_at"])
        return LedgerEntry(**values)
    except (ValueError, TypeError, UsageError) as exc:
        raise DecodeError("ledger row", "an issuance entry", values.get("thing_name")) from exc


def _entry_values(entry: LedgerEntry) -> tuple[Any, ...]:
    return tuple(
        entry.state.value if name == "state" else getattr(entry, name) for name in _COLUMNS
    )


class SqliteLedger(IssuanceLedger, SqliteStore):
    """Issuances in a local SQLite file: the default for a single instance.

    Each call is one short transaction on the ledger's own database thread
    (:class:`~cloud_daemon.sqlite_store.SqliteStore`): a slow commit never stalls the event loop.

    Use as an async context manager: ``async with SqliteLedger(path) as ledger: ...``.
    """

    def __init__(self, path: Path) -> None:
        """Args:
        path: the database file (created with its table when missing).
        """
        # FULL: a minted certificate recorded must survive a power cut, or the next delivery
        # mints a duplicate.
        super().__init__(path, schema=_SCHEMA, synchronous="FULL", thread_name="ztp-ledger")

    async def get(self, thing_name: str, key_sha256: str) -> LedgerEntry | None:
        row = await self._call(
            lambda c: c.execute(
                f"{_SELECT} WHERE thing_name = ? AND key_sha256 = ?", (thing_name, key_sha256)
            ).fetchone()
        )
        return None if row is None else _row_to_entry(row)

    async def entries_for_thing(self, thing_name: str) -> list[LedgerEntry]:
        rows = await self._call(
            lambda c: c.execute(
                f"{_SELECT} WHERE thing_name = ? ORDER BY updated_at", (thing_name,)
            ).fetchall()
        )
        return [_row_to_entry(row) for row in rows]

    async def _insert(self, entry: LedgerEntry) -> bool:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        sql = (
            f"INSERT INTO issuance ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "  # noqa: S608
            "ON CONFLICT (thing_name, key_sha256) DO NOTHING"
        )

        def run(conn: sqlite3.Connection) -> bool:
            with conn:
                return conn.execute(sql, _entry_values(entry)).rowcount == 1

        return await self._call(run)

    async def _replace(
        self, entry: LedgerEntry, *, states: frozenset[IssuanceState], attempt: int | None
    ) -> bool:
        assignments = ", ".join(f"{name} = ?" for name in _COLUMNS[2:])
        state_marks = ", ".join("?" for _ in states)
        sql = (
            f"UPDATE issuance SET {assignments} "  # noqa: S608 - constant columns
            f"WHERE thing_name = ? AND key_sha256 = ? AND state IN ({state_marks})"
        )
        args: list[Any] = [*_entry_values(entry)[2:], entry.thing_name, entry.key_sha256]
        args += sorted(s.value for s in states)
        if attempt is not None:
            sql += " AND attempt = ?"
            args.append(attempt)

        def run(conn: sqlite3.Connection) -> bool:
            with conn:
                return conn.execute(sql, args).rowcount == 1

        return await self._call(run)

    async def _delete_intent(self, entry: LedgerEntry) -> bool:
        args = (entry.thing_name, entry.key_sha256, IssuanceState.INTENT.value, entry.attempt)

        def run(conn: sqlite3.Connection) -> bool:
            with conn:
                cur = conn.execute(
                    "DELETE FROM issuance WHERE thing_name = ? AND key_sha256 = ? "
                    "AND state = ? AND attempt = ?",
                    args,
                )
                return cur.rowcount == 1

        return await self._call(run)


# --- DynamoDB -------------------------------------------------------------------------------


def _to_item(entry: LedgerEntry) -> dict[str, Any]:
    item: dict[str, Any] = {
        "thing_name": {"S": entry.thing_name},
        "key_sha256": {"S": entry.key_sha256},
        "state": {"S": entry.state.value},
        "request_id": {"S": entry.request_id},
        "owner": {"S": entry.owner},
        "attempt": {"N": str(entry.attempt)},
        "updated_at": {"N": repr(entry.updated_at)},
    }
    for name in ("certificate_id", "certificate_arn", "certificate_pem", "operation_uid"):
        value = getattr(entry, name)
        if value is not None:
            item[name] = {"S": value}
    return item


def _from_item(item: Mapping[str, Any]) -> LedgerEntry:
    try:
        optional = {
            name: item[name]["S"] if name in item else None
            for name in ("certificate_id", "certificate_arn", "certificate_pem", "operation_uid")
        }
        return LedgerEntry(
            thing_name=item["thing_name"]["S"],
            key_sha256=item["key_sha256"]["S"],
            state=IssuanceState(item["state"]["S"]),
            request_id=item["request_id"]["S"],
            owner=item["owner"]["S"],
            attempt=int(item["attempt"]["N"]),
            updated_at=float(item["updated_at"]["N"]),
            **optional,
        )
    except (KeyError, TypeError, ValueError, UsageError) as exc:
        raise DecodeError("ledger item", "an issuance entry", sorted(item)) from exc


async def create_ledger_table(client: Any, table_name: str) -> None:
    """Create a ledger table (on-demand capacity) and wait until it is active.

    Args:
        client: an aiobotocore DynamoDB client.
        table_name: the table to create (hash key ``thing_name``, range key ``key_sha256``).

    Raises:
        AwsServiceError: DynamoDB refused (for example, the table exists).
        AwsTransportError: DynamoDB could not be reached.
    """
    async with aws_errors("CreateTable", resource=table_name):
        await client.create_table(
            TableName=table_name,
            AttributeDefinitions=[
                {"AttributeName": "thing_name", "AttributeType": "S"},
                {"AttributeName": "key_sha256", "AttributeType": "S"},
            ],
            KeySchema=[
                {"AttributeName": "thing_name", "KeyType": "HASH"},
                {"AttributeName": "key_sha256", "KeyType": "RANGE"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        waiter = client.get_waiter("table_exists")
        await waiter.wait(TableName=table_name, WaiterConfig={"Delay": 1, "MaxAttempts": 60})


class DynamoLedger(IssuanceLedger):
    """Issuances in a DynamoDB table shared by several instances (conditional writes).

    Args:
        client: an aiobotocore DynamoDB client (owned by the caller).
        table_name: the table (see :func:`create_ledger_table`).
    """

    def __init__(self, client: Any, table_name: str) -> None:
        self._client = client
        self._table = table_name

    async def get(self, thing_name: str, key_sha256: str) -> LedgerEntry | None:
        async with aws_errors("GetItem", resource=self._table):
            response = await self._client.get_item(
                TableName=self._table,
                Key={"thing_name": {"S": thing_name}, "key_sha256": {"S": key_sha256}},
                ConsistentRead=True,
            )
        item = response.get("Item")
        return None if item is None else _from_item(item)

    async def entries_for_thing(self, thing_name: str) -> list[LedgerEntry]:
        entries: list[LedgerEntry] = []
        start: dict[str, Any] | None = None
        while True:
            extra = {"ExclusiveStartKey": start} if start else {}
            async with aws_errors("Query", resource=self._table):
                page = await self._client.query(
                    TableName=self._table,
                    KeyConditionExpression="thing_name = :t",
                    ExpressionAttributeValues={":t": {"S": thing_name}},
                    ConsistentRead=True,
                    **extra,
                )
            entries.extend(_from_item(item) for item in page.get("Items", []))
            start = page.get("LastEvaluatedKey")
            if not start:
                return sorted(entries, key=lambda e: e.updated_at)

    async def _conditional(self, call: str, **kwargs: Any) -> bool:
        try:
            async with aws_errors(call, resource=self._table):
                await getattr(self._client, call)(TableName=self._table, **kwargs)
        except AwsServiceError as exc:
            if exc.code == "ConditionalCheckFailedException":
                return False
            raise
        return True

    async def _insert(self, entry: LedgerEntry) -> bool:
        return await self._conditional(
            "put_item",
            Item=_to_item(entry),
            ConditionExpression="attribute_not_exists(thing_name)",
        )

    async def _replace(
        self, entry: LedgerEntry, *, states: frozenset[IssuanceState], attempt: int | None
    ) -> bool:
        # "state" and "owner" are DynamoDB reserved words: placeholders throughout.
        values: dict[str, Any] = {
            f":s{i}": {"S": state.value} for i, state in enumerate(sorted(states))
        }
        condition = f"#state IN ({', '.join(values)})"
        names = {"#state": "state"}
        if attempt is not None:
            condition += " AND #attempt = :attempt"
            names["#attempt"] = "attempt"
            values[":attempt"] = {"N": str(attempt)}
        return await self._conditional(
            "put_item",
            Item=_to_item(entry),
            ConditionExpression=condition,
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    async def _delete_intent(self, entry: LedgerEntry) -> bool:
        return await self._conditional(
            "delete_item",
            Key={"thing_name": {"S": entry.thing_name}, "key_sha256": {"S": entry.key_sha256}},
            ConditionExpression="#state = :intent AND #attempt = :attempt",
            ExpressionAttributeNames={"#state": "state", "#attempt": "attempt"},
            ExpressionAttributeValues={
                ":intent": {"S": IssuanceState.INTENT.value},
                ":attempt": {"N": str(entry.attempt)},
            },
        )
