"""The durable outbox: messages waiting for a PUBACK, in SQLite (WAL) in the state directory.

Theory of operation
===================

A message is *accepted* only once its row is committed; it is published at QoS 1 and its row is
deleted only after the PUBACK. A crash (SIGKILL, power loss) therefore loses no accepted message:
a message in flight when the process died is still on disk and is sent again (QoS 1 duplicates
are allowed; the stable :attr:`StoredMessage.message_id` lets a consumer drop them).

Two layers, as everywhere in the daemon:

- :class:`OutboxCore` *(pure)* decides: sequence numbers, admission against the count and byte
  bounds, the overflow policy (refuse, or drop the oldest queued), which message goes next, the
  in-flight bound (100: AWS IoT's limit of unacknowledged QoS 1 messages). Each entry moves
  through a small table (:data:`TRANSITIONS`)::

      ACCEPTED --Committed--> QUEUED --Taken--> IN_FLIGHT --Acked--> (gone)
      IN_FLIGHT --Released--> QUEUED          (the connection dropped before the PUBACK)
      ACCEPTED/QUEUED --Dropped--> (gone)     (overflow policy DROP_OLDEST)

- :class:`Outbox` does the I/O. Every SQLite call runs on one dedicated thread that owns the
  connection, so commits (and their fsync) never block the event loop. The loop side gathers the
  inserts and deletes of one loop turn into one request; the thread takes every request that has
  arrived while it was busy and commits them in *one* transaction (group commit), then wakes the
  callers of that transaction. Rows go in multi-row statements, so the thread re-takes the GIL
  once per statement rather than once per row. Deletes after PUBACKs are not urgent (a lost
  one only means a duplicate after a crash): they wait up to 100 ms for the next transaction
  instead of waking the thread on every loop turn, and PUBACKs come nearly in order, so runs
  of consecutive seqs are deleted as ranges (``BETWEEN``), the rest by an ``IN`` list.

The publisher's hot path (:meth:`Outbox.take_nowait`, :meth:`Outbox.ack`) costs a few
microseconds per message: one check of the head (:meth:`OutboxCore.take_head_if`), the
:class:`StoredMessage` built when it is taken, and the moves of the hot path read once from
:data:`TRANSITIONS` rather than looked up per message. Producers' batches are staged without
Python code per message (C-level ``zip``/``chain``/``dict.update``). Senders waiting in
:meth:`Outbox.next_message` are woken one per message that may go (and a sender that takes one
wakes the next if more may go), never all at once: a trickle of messages to 100 idle senders
costs one wake-up per message, not two hundred.

Nothing is kept per held message but ints, enum members, payloads and topics in plain
dictionaries (no object, tuple or dataclass per message): an outbox holding tens of thousands of
messages gives the garbage collector nothing to traverse, and filling it triggers no collections
(a container allocated and kept alive per message made a deep outbox cost 1 to 3 µs per message
in collections alone).

Payloads stay in memory up to ``resident_bytes`` (the hot path never reads SQLite back); past that
budget, and after a restart, they are read back from SQLite in batches just before sending.

Durability: ``synchronous=FULL`` (the default) makes each commit durable before its callers are
told "accepted"; WAL keeps the file consistent through power loss either way. ``NORMAL`` trades
the last few commits before a power cut (never corruption) for fewer fsyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import structlog

from shared.errors import DecodeError, LimitExceededError, UsageError
from ztp_daemon.errors import DeviceError, StorageError

__all__ = [
    "AWS_MAX_IN_FLIGHT",
    "AWS_MAX_PAYLOAD_BYTES",
    "TRANSITIONS",
    "Admission",
    "BatchAdmission",
    "Durability",
    "EntryState",
    "Outbox",
    "OutboxClosedError",
    "OutboxCore",
    "OutboxError",
    "OutboxFullError",
    "OutboxLimits",
    "OutboxStats",
    "OverflowPolicy",
    "PayloadTooLargeError",
    "StoredMessage",
    "TopicError",
    "check_topic",
]

AWS_MAX_PAYLOAD_BYTES: Final = 128 * 1024
AWS_MAX_IN_FLIGHT: Final = 100
_AWS_MAX_TOPIC_BYTES: Final = 256
_AWS_MAX_TOPIC_SLASHES: Final = 7
_INSERT_CHUNK: Final = 150  # rows per INSERT statement (5 parameters each)
_DELETE_CHUNK: Final = 500
_FETCH_BATCH: Final = 256
_TOPIC_CACHE: Final = 1024
_DELETE_DELAY: Final = 0.1  # seconds an acked row may wait for its DELETE

_log = structlog.get_logger()

T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------------


class OutboxError(DeviceError):
    """Base of the outbox's errors."""


class OutboxFullError(OutboxError, LimitExceededError):
    """The outbox is at its count or byte bound and the policy refuses new messages.

    Back-pressure: the producer should retry later. ``limit_name`` is ``outbox_max_messages`` or
    ``outbox_max_bytes``.
    """


class PayloadTooLargeError(OutboxError, LimitExceededError):
    """A payload exceeds ``max_payload_bytes`` (AWS IoT: 128 KB)."""


class TopicError(OutboxError, DecodeError):
    """A topic is not one we may publish to (syntax, AWS limits, or outside the allowed prefix)."""


class OutboxClosedError(OutboxError, UsageError):
    """The outbox is not open (used before ``__aenter__`` or after ``__aexit__``)."""


# -- values ------------------------------------------------------------------------------------


class OverflowPolicy(enum.Enum):
    """What a full outbox does with a new message."""

    REFUSE = "refuse"
    """Refuse it with :class:`OutboxFullError` (back-pressure); nothing already held is lost."""

    DROP_OLDEST = "drop_oldest"
    """Accept it and drop the oldest queued messages (not those in flight) to make room."""


class Durability(enum.Enum):
    """SQLite's ``synchronous`` setting for the outbox (WAL mode either way)."""

    FULL = "FULL"
    NORMAL = "NORMAL"


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The outbox's bounds.

    Attributes:
        max_messages: most messages held (queued and in flight).
        max_bytes: most payload bytes held.
        max_payload_bytes: largest payload accepted (AWS IoT: 128 KB).
        max_in_flight: most messages published and not yet acked (AWS IoT: 100).
        policy: what happens to a new message when the outbox is full.
        resident_bytes: payload bytes kept in memory; the rest are read back from SQLite.
    """

    max_messages: int = 100_000
    max_bytes: int = 64 * 1024 * 1024
    max_payload_bytes: int = AWS_MAX_PAYLOAD_BYTES
    max_in_flight: int = AWS_MAX_IN_FLIGHT
    policy: OverflowPolicy = OverflowPolicy.REFUSE
    resident_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_messages < 1:
            raise UsageError(f"max_messages must be >= 1, got {self.max_messages}")
        if not 1 <= self.max_payload_bytes <= AWS_MAX_PAYLOAD_BYTES:
            raise UsageError(
                f"max_payload_bytes must be in 1..{AWS_MAX_PAYLOAD_BYTES}, "
                f"got {self.max_payload_bytes}"
            )
        if self.max_bytes < self.max_payload_bytes:
            raise UsageError(
                f"max_bytes ({self.max_bytes}) must hold at least one largest payload "
                f"({self.max_payload_bytes})"
            )
        if not 1 <= self.max_in_flight <= AWS_MAX_IN_FLIGHT:
            raise UsageError(
                f"max_in_flight must be in 1..{AWS_MAX_IN_FLIGHT}, got {self.max_in_flight}"
            )
        if self.resident_bytes < 0:
            raise UsageError(f"resident_bytes must be >= 0, got {self.resident_bytes}")


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message taken from the outbox to be published.

    Attributes:
        seq: its sequence number in this outbox (what :meth:`Outbox.ack` takes).
        message_id: a stable id, ``<outbox uid>-<seq>``, the same on every resend and across
            restarts; consumers use it to drop QoS 1 duplicates.
        topic: the MQTT topic.
        payload: the payload bytes.
        qos: always 1 today.
    """

    seq: int
    message_id: str
    topic: str
    payload: bytes
    qos: int


# StoredMessage built without its frozen __init__ (Outbox.take_nowait, once per message sent):
# the generated __init__ of a frozen dataclass sets each field through object.__setattr__, ~1 µs
# per message; setting the slots through their descriptors is the same assignment at half the
# cost. The class has no validation to skip: the outbox checked everything at admission.
_new_object = object.__new__
_SET_SEQ = StoredMessage.__dict__["seq"].__set__
_SET_MESSAGE_ID = StoredMessage.__dict__["message_id"].__set__
_SET_TOPIC = StoredMessage.__dict__["topic"].__set__
_SET_PAYLOAD = StoredMessage.__dict__["payload"].__set__
_SET_QOS = StoredMessage.__dict__["qos"].__set__


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """A snapshot of the outbox for health reports and metrics.

    Attributes:
        depth: messages held (queued, in flight, or being committed).
        bytes: payload bytes held.
        in_flight: messages published and waiting for their PUBACK.
        dropped: messages dropped by the overflow policy since start.
        refused: messages refused by a full outbox since start.
        accepted: messages accepted since start.
        acked: messages acknowledged (and deleted) since start.
    """

    depth: int
    bytes: int
    in_flight: int
    dropped: int
    refused: int
    accepted: int
    acked: int


def check_topic(topic: str) -> None:
    """Check that ``topic`` is a topic AWS IoT accepts for a publish.

    Args:
        topic: the topic name.

    Raises:
        TopicError: empty, wildcards, NUL, not UTF-8, more than 256 UTF-8 bytes or more than 7
            slashes.
    """
    if not topic:
        raise TopicError("topic", "a non-empty topic", topic)
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicError("topic", "no wildcards (+, #) and no NUL", topic)
    try:
        encoded = topic.encode()
    except UnicodeEncodeError:
        raise TopicError("topic", "valid UTF-8 (no lone surrogates)", topic) from None
    if len(encoded) > _AWS_MAX_TOPIC_BYTES:
        raise TopicError("topic", f"at most {_AWS_MAX_TOPIC_BYTES} UTF-8 bytes", topic)
    if topic.count("/") > _AWS_MAX_TOPIC_SLASHES:
        raise TopicError("topic", f"at most {_AWS_MAX_TOPIC_SLASHES} '/' separators", topic)


# -- the pure core -----------------------------------------------------------------------------


class EntryState(enum.StrEnum):
    """Where one message is in its life (a StrEnum: hashed in C on the hot path)."""

    ACCEPTED = "accepted"  # admitted, its row not yet committed
    QUEUED = "queued"  # committed, waiting to be sent
    IN_FLIGHT = "in_flight"  # published, waiting for the PUBACK
    GONE = "gone"  # acked or dropped


class _Event(enum.StrEnum):
    COMMITTED = "committed"
    TAKEN = "taken"
    ACKED = "acked"
    RELEASED = "released"
    DROPPED = "dropped"


#: Legal moves of one entry: state → event → next state. Anything else is a bug in the driver.
TRANSITIONS: Final[dict[EntryState, dict[_Event, EntryState]]] = {
    EntryState.ACCEPTED: {_Event.COMMITTED: EntryState.QUEUED, _Event.DROPPED: EntryState.GONE},
    EntryState.QUEUED: {_Event.TAKEN: EntryState.IN_FLIGHT, _Event.DROPPED: EntryState.GONE},
    EntryState.IN_FLIGHT: {_Event.ACKED: EntryState.GONE, _Event.RELEASED: EntryState.QUEUED},
    EntryState.GONE: {},
}

# The moves the hot path makes, read once from the table: a message is committed and taken once
# each, and these skip the two dictionary look-ups of _move per step. (An ack ends in GONE, which
# the hot path makes by deleting the entry.)
_COMMITTED_TO: Final = TRANSITIONS[EntryState.ACCEPTED][_Event.COMMITTED]
_TAKEN_TO: Final = TRANSITIONS[EntryState.QUEUED][_Event.TAKEN]


@dataclass(frozen=True, slots=True)
class Admission:
    """What :meth:`OutboxCore.admit` decided.

    Attributes:
        seq: the new message's sequence number.
        dropped: sequence numbers dropped to make room (oldest first), with their sizes.
    """

    seq: int
    dropped: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class BatchAdmission:
    """What :meth:`OutboxCore.admit_many` decided.

    Attributes:
        seqs: the new messages' sequence numbers, in order.
        dropped: sequence numbers dropped to make room (oldest first), with their sizes.
    """

    seqs: tuple[int, ...]
    dropped: tuple[tuple[int, int], ...] = ()


@dataclass(slots=True)
class _Counters:
    dropped: int = 0
    refused: int = 0
    accepted: int = 0
    acked: int = 0


class OutboxCore:
    """The outbox's decisions, without I/O.

    Args:
        limits: the bounds and the overflow policy.
        next_seq: the first sequence number to hand out (one past the largest stored).
    """

    def __init__(self, limits: OutboxLimits, *, next_seq: int = 1) -> None:
        self._limits = limits
        self._next_seq = next_seq
        # Each held message's state and payload size, in two plain dictionaries rather than an
        # object per message: an outbox holding tens of thousands of messages then gives the
        # garbage collector nothing to traverse (ints and enum members are not tracked).
        self._states: dict[int, EntryState] = {}
        self._sizes: dict[int, int] = {}
        # Seqs not in flight (ACCEPTED or QUEUED), oldest first. Commits happen in seq order, so
        # if the head is not committed yet, nothing behind it is either.
        self._order: deque[int] = deque()
        self._bytes = 0
        self._in_flight = 0
        self._in_flight_bytes = 0
        self._counters = _Counters()

    @property
    def limits(self) -> OutboxLimits:
        """The bounds in force."""
        return self._limits

    @property
    def depth(self) -> int:
        """Messages held, in every state but GONE."""
        return len(self._states)

    @property
    def bytes(self) -> int:
        """Payload bytes held."""
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Messages taken and not yet acked or released."""
        return self._in_flight

    def stats(self) -> OutboxStats:
        """A snapshot of the counts."""
        c = self._counters
        return OutboxStats(
            depth=len(self._states),
            bytes=self._bytes,
            in_flight=self._in_flight,
            dropped=c.dropped,
            refused=c.refused,
            accepted=c.accepted,
            acked=c.acked,
        )

    def state(self, seq: int) -> EntryState:
        """The state of ``seq`` (GONE if unknown)."""
        return self._states.get(seq, EntryState.GONE)

    def _move(self, seq: int, event: _Event) -> int:
        """Make one move of the table; return the entry's payload size.

        Raises:
            UsageError: the table has no such move from the entry's state (nothing changes).
        """
        state = self._states.get(seq, EntryState.GONE)
        target = TRANSITIONS[state].get(event)
        if target is None:
            raise UsageError(f"outbox entry {seq}: {event.value} is illegal in state {state.value}")
        size = self._sizes[seq]
        if target is EntryState.GONE:
            del self._states[seq]
            del self._sizes[seq]
            self._bytes -= size
        else:
            self._states[seq] = target
        return size

    def restore(self, seq: int, size: int) -> None:
        """Register a message found on disk at start-up (committed, queued).

        Restored messages are kept even beyond the bounds (they were accepted once); the bounds
        then refuse or drop as new messages arrive.
        """
        self._states[seq] = EntryState.QUEUED
        self._sizes[seq] = size
        self._order.append(seq)
        self._bytes += size
        self._next_seq = max(self._next_seq, seq + 1)

    def admit(self, size: int) -> Admission:
        """Decide whether a new message of ``size`` payload bytes is accepted.

        Returns:
            Its sequence number and what was dropped to make room (policy DROP_OLDEST).

        Raises:
            PayloadTooLargeError: ``size`` exceeds ``max_payload_bytes``.
            OutboxFullError: the outbox is full and the policy is REFUSE, or even dropping every
                queued message would not make room (what is in flight cannot be dropped).
                Nothing changes then.
        """
        limits = self._limits
        if size > limits.max_payload_bytes:
            raise PayloadTooLargeError("max_payload_bytes", limits.max_payload_bytes, size)
        dropped: tuple[tuple[int, int], ...] = ()
        if len(self._states) + 1 > limits.max_messages or self._bytes + size > limits.max_bytes:
            dropped = self._make_room(1, size)
        seq = self._next_seq
        self._next_seq += 1
        self._states[seq] = EntryState.ACCEPTED
        self._sizes[seq] = size
        self._order.append(seq)
        self._bytes += size
        self._counters.accepted += 1
        return Admission(seq, dropped)

    def admit_many(self, sizes: Sequence[int]) -> BatchAdmission:
        """Admit several messages, all or none.

        Returns:
            Their sequence numbers (in order) and what was dropped to make room.

        Raises:
            PayloadTooLargeError: one size exceeds ``max_payload_bytes`` (none is admitted).
            OutboxFullError: they do not all fit (none is admitted, nothing is dropped).
        """
        limits = self._limits
        count, total = len(sizes), sum(sizes)
        if count and max(sizes) > limits.max_payload_bytes:
            raise PayloadTooLargeError("max_payload_bytes", limits.max_payload_bytes, max(sizes))
        dropped: tuple[tuple[int, int], ...] = ()
        if (
            len(self._states) + count > limits.max_messages
            or self._bytes + total > limits.max_bytes
        ):
            dropped = self._make_room(count, total)
        first = self._next_seq
        seqs = range(first, first + count)
        # Whole-batch updates in C (dict.fromkeys, zip, deque.extend): this runs once per batch
        # a producer hands over, not once per message.
        self._states.update(dict.fromkeys(seqs, EntryState.ACCEPTED))
        self._sizes.update(zip(seqs, sizes, strict=True))
        self._order.extend(seqs)
        self._next_seq = first + count
        self._bytes += total
        self._counters.accepted += count
        return BatchAdmission(tuple(seqs), dropped)

    def _make_room(self, count: int, total: int) -> tuple[tuple[int, int], ...]:
        """Apply the overflow policy for ``count`` new messages of ``total`` bytes."""
        limits = self._limits
        if limits.policy is OverflowPolicy.REFUSE or (
            self._in_flight + count > limits.max_messages
            or self._in_flight_bytes + total > limits.max_bytes
        ):
            self._counters.refused += count
            raise self._full_error(count, total)
        # Everything not in flight is in _order, so this ends with room to spare (checked above).
        dropped = []
        while (
            len(self._states) + count > limits.max_messages
            or self._bytes + total > limits.max_bytes
        ):
            victim = self._order.popleft()
            dropped.append((victim, self._move(victim, _Event.DROPPED)))
        self._counters.dropped += len(dropped)
        return tuple(dropped)

    def _full_error(self, count: int, total: int) -> OutboxFullError:
        limits = self._limits
        if len(self._states) + count > limits.max_messages:
            return OutboxFullError(
                "outbox_max_messages", limits.max_messages, len(self._states) + count
            )
        return OutboxFullError("outbox_max_bytes", limits.max_bytes, self._bytes + total)

    def abandon(self, seq: int) -> None:
        """Forget a message whose row could not be committed (it was never accepted)."""
        if self.state(seq) is EntryState.ACCEPTED:
            self._move(seq, _Event.DROPPED)
            self._order.remove(seq)
            self._counters.accepted -= 1

    def committed(self, seqs: Iterable[int]) -> None:
        """Mark rows as durable: they become sendable. Seqs dropped meanwhile are skipped."""
        states = self._states
        get = states.get
        accepted = EntryState.ACCEPTED
        for seq in seqs:
            if get(seq) is accepted:
                states[seq] = _COMMITTED_TO

    def head(self) -> int | None:
        """The seq :meth:`take` would return now, without taking it."""
        if self._in_flight >= self._limits.max_in_flight or not self._order:
            return None
        seq = self._order[0]
        if self._states[seq] is not EntryState.QUEUED:
            return None  # the head is still being committed
        return seq

    def take(self) -> int | None:
        """The next message to publish, marked in flight; None if none may go now."""
        seq = self.head()
        if seq is not None:
            self.take_head()
        return seq

    def take_head_if(self, ready: Container[int]) -> int | None:
        """Take the head if it is sendable and in ``ready``: :meth:`head` and
        :meth:`take_head` in one step (the publisher's hot path).

        Args:
            ready: the seqs that may go now (the outbox: those with their payload in memory).

        Returns:
            The seq taken (now in flight), or None when the head may not go now.
        """
        order = self._order
        if self._in_flight >= self._limits.max_in_flight or not order:
            return None
        seq = order[0]
        if self._states[seq] is not EntryState.QUEUED or seq not in ready:
            return None
        order.popleft()
        self._states[seq] = _TAKEN_TO
        self._in_flight += 1
        self._in_flight_bytes += self._sizes[seq]
        return seq

    def take_head(self) -> int:
        """Take the seq :meth:`head` just returned (the caller checked it is not None).

        Raises:
            UsageError: the head is not sendable (nothing changes then).
        """
        if self.head() is None:
            raise UsageError("outbox: take_head() without a sendable head")
        seq = self._order.popleft()
        size = self._move(seq, _Event.TAKEN)
        self._in_flight += 1
        self._in_flight_bytes += size
        return seq

    def peek_queued(self, limit: int) -> list[int]:
        """Up to ``limit`` queued seqs that :meth:`take` would return next, oldest first."""
        out: list[int] = []
        states, queued = self._states, EntryState.QUEUED
        for seq in self._order:
            if len(out) >= limit or states[seq] is not queued:
                break
            out.append(seq)
        return out

    def ack(self, seq: int) -> int:
        """The PUBACK for ``seq`` arrived: forget it.

        Returns:
            Its payload size.

        Raises:
            UsageError: ``seq`` is not in flight.
        """
        states = self._states
        if states.get(seq) is not EntryState.IN_FLIGHT:
            self._move(seq, _Event.ACKED)  # raises: the table has no such move
            raise AssertionError  # pragma: no cover - _move raised
        # The table's IN_FLIGHT --Acked--> GONE, without _move's look-ups.
        del states[seq]
        size = self._sizes.pop(seq)
        self._bytes -= size
        self._in_flight -= 1
        self._in_flight_bytes -= size
        self._counters.acked += 1
        return size

    def release(self, seqs: Sequence[int]) -> None:
        """Put in-flight messages back at the head of the queue (no PUBACK will come).

        Raises:
            UsageError: one of ``seqs`` is not in flight (none is moved then).
        """
        for seq in seqs:
            if self.state(seq) is not EntryState.IN_FLIGHT:
                raise UsageError(f"outbox entry {seq}: released but not in flight")
        for seq in sorted(seqs, reverse=True):
            size = self._move(seq, _Event.RELEASED)
            self._order.appendleft(seq)
            self._in_flight -= 1
            self._in_flight_bytes -= size


# -- the SQLite thread -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
"""

_ROW_PARAMS: Final = 5  # seq, topic, payload, qos, created_ms


_Fetched = dict[int, tuple[str, bytes, int]]


@dataclass(slots=True)
class _Request:
    """One loop turn's worth of work for the SQLite thread."""

    seqs: list[int] = field(default_factory=list)  # the seq of each row to insert
    # The rows' parameters, flat (_ROW_PARAMS per row, in seqs' order): no tuple per message,
    # and the SQLite thread binds slices of it as they are.
    params: list[object] = field(default_factory=list)
    # Who waits for which inserts: (future, first index, end index, one id or a list of ids).
    waiters: list[tuple[asyncio.Future[Any], int, int, bool]] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    fetch: list[int] = field(default_factory=list)
    fetch_future: asyncio.Future[_Fetched] | None = None
    fetched: _Fetched | StorageError | None = None


_OnDone = Callable[[list[_Request], StorageError | None], None]


@dataclass(slots=True)
class _Opened:
    uid: str
    rows: list[tuple[int, int]]  # (seq, size), oldest first


class _SqliteThread:
    """Owns the SQLite connection; runs requests in group-committed transactions."""

    def __init__(
        self,
        path: Path,
        durability: Durability,
        on_done: _OnDone,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._path = path
        self._durability = durability
        self._on_done = on_done
        self._loop = loop
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="outbox-sqlite", daemon=True)
        self._opened: asyncio.Future[_Opened] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self.transactions = 0

    def start(self) -> asyncio.Future[_Opened]:
        self._thread.start()
        return self._opened

    def submit(self, request: _Request) -> None:
        self._requests.put(request)

    def stop(self) -> asyncio.Future[None]:
        self._requests.put(None)
        return self._closed

    def _deliver(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self._loop.call_soon_threadsafe(callback)

    def _run(self) -> None:
        try:
            db = self._open()
        except (sqlite3.Error, OSError) as exc:
            error = StorageError(str(self._path), "open", f"{type(exc).__name__}: {exc}")
            self._deliver(lambda: _settle_exc(self._opened, error))
            self._deliver(lambda: _settle(self._closed, None))
            return
        try:
            self._serve(db)
        finally:
            db.close()
            self._deliver(lambda: _settle(self._closed, None))

    def _open(self) -> sqlite3.Connection:
        if not self._path.exists():
            # Created 0600 first: SQLite gives its -wal and -shm files the database's mode.
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        db = sqlite3.connect(self._path, isolation_level=None)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            _check_wal(mode)
            db.execute(f"PRAGMA synchronous={self._durability.value}")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'uid'").fetchone()
            if row is None:
                uid = secrets.token_hex(8)
                db.execute("INSERT INTO meta (key, value) VALUES ('uid', ?)", (uid,))
            else:
                uid = str(row[0])
            rows = db.execute("SELECT seq, length(payload) FROM messages ORDER BY seq").fetchall()
        except BaseException:
            db.close()
            raise
        opened = _Opened(uid, [(int(s), int(n)) for s, n in rows])
        self._deliver(lambda: _settle(self._opened, opened))
        return db

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            first = self._requests.get()
            if first is None:
                return
            batch = [first]
            stop = False
            # Everything that arrived while the last transaction committed goes in this one.
            while True:
                try:
                    nxt = self._requests.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._transaction(db, batch)
            if stop:
                return

    def _transaction(self, db: sqlite3.Connection, batch: list[_Request]) -> None:
        params = (
            batch[0].params
            if len(batch) == 1
            else list(chain.from_iterable(request.params for request in batch))
        )
        deletes = list(chain.from_iterable(request.deletes for request in batch))
        error: StorageError | None = None
        if params or deletes:
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    step = _INSERT_CHUNK * _ROW_PARAMS
                    for start in range(0, len(params), step):
                        chunk = params[start : start + step]
                        db.execute(_insert_sql(len(chunk) // _ROW_PARAMS), chunk)
                    singles, ranges = _delete_runs(deletes)
                    if ranges:
                        db.executemany(_DELETE_RANGE_SQL, ranges)
                    for start in range(0, len(singles), _DELETE_CHUNK):
                        chunk_d = singles[start : start + _DELETE_CHUNK]
                        db.execute(_delete_sql(len(chunk_d)), chunk_d)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                error = StorageError(str(self._path), "commit", f"{type(exc).__name__}: {exc}")
            self.transactions += 1
        for request in batch:
            if request.fetch_future is not None:
                request.fetched = self._fetch(db, request.fetch)
        self._deliver(lambda: self._on_done(batch, error))

    def _fetch(self, db: sqlite3.Connection, seqs: list[int]) -> _Fetched | StorageError:
        try:
            found = db.execute(
                f"SELECT seq, topic, payload, qos FROM messages WHERE seq IN ({_marks(len(seqs))})",  # noqa: S608 - only placeholders are interpolated
                seqs,
            ).fetchall()
        except sqlite3.Error as exc:
            return StorageError(str(self._path), "read", f"{type(exc).__name__}: {exc}")
        return {int(s): (str(t), bytes(p), int(q)) for s, t, p, q in found}


def _check_wal(mode: object) -> None:
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")


def _marks(count: int) -> str:
    return ",".join("?" * count)


_insert_cache: dict[int, str] = {}


def _insert_sql(count: int) -> str:
    sql = _insert_cache.get(count)
    if sql is None:
        values = ",".join(["(?,?,?,?,?)"] * count)
        sql = f"INSERT INTO messages (seq, topic, payload, qos, created_ms) VALUES {values}"  # noqa: S608 - only placeholders are interpolated
        _insert_cache[count] = sql
    return sql


_DELETE_RANGE_SQL: Final = "DELETE FROM messages WHERE seq BETWEEN ? AND ?"
_MIN_RUN: Final = 8  # shorter runs of consecutive seqs go in the IN list


def _delete_runs(seqs: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Split seqs into lone ones and runs of consecutive ones (``(first, last)``).

    PUBACKs arrive nearly in order, so a transaction's deletes are mostly a few long runs; one
    range scan per run costs SQLite far less than binding and looking up every seq.
    """
    ordered = sorted(set(seqs))  # a seq deleted twice is deleted once
    singles: list[int] = []
    ranges: list[tuple[int, int]] = []
    if not ordered:
        return singles, ranges
    # Where runs end, found by bisection: a stretch of distinct sorted ints is one run exactly
    # when its ends are as far apart as its length says, so in-order PUBACKs cost one check for
    # the whole transaction rather than a Python step per seq (this runs holding the GIL).
    ends: list[int] = []

    def find_ends(lo: int, hi: int) -> None:
        if ordered[hi] - ordered[lo] == hi - lo:
            return
        if hi - lo == 1:
            ends.append(lo)
            return
        mid = (lo + hi) // 2
        find_ends(lo, mid)
        find_ends(mid, hi)

    last = len(ordered) - 1
    find_ends(0, last)
    ends.append(last)
    start = 0
    for end in ends:
        if end - start + 1 >= _MIN_RUN:
            ranges.append((ordered[start], ordered[end]))
        else:
            singles.extend(ordered[start : end + 1])
        start = end + 1
    return singles, ranges


def _delete_sql(count: int) -> str:
    return f"DELETE FROM messages WHERE seq IN ({_marks(count)})"  # noqa: S608 - placeholders only


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _settle_exc(future: asyncio.Future[T], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


# -- the async outbox --------------------------------------------------------------------------


class Outbox:
    """The durable outbox, an async context manager around :class:`OutboxCore` and SQLite.

    Args:
        path: the SQLite database file (its directory must exist; the file is made 0600).
        limits: bounds, in-flight limit and overflow policy.
        durability: SQLite ``synchronous`` (FULL: an accepted message survives power loss).
        clock: wall clock in seconds, for the rows' creation time.

    Producers call :meth:`put` (or :meth:`submit`); the publisher calls :meth:`take_nowait` /
    :meth:`next_message`, then :meth:`ack` on PUBACK or :meth:`release` when the connection
    dropped first.
    """

    def __init__(
        self,
        path: Path,
        *,
        limits: OutboxLimits | None = None,
        durability: Durability = Durability.FULL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._limits = limits or OutboxLimits()
        self._durability = durability
        self._clock = clock
        self._core = OutboxCore(self._limits)
        self._uid = ""
        self._db: _SqliteThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._request = _Request()
        self._flush_scheduled = False
        # Deletes are not urgent (a lost one only means a resend): they wait for a timer, so an
        # idle SQLite thread is not woken for every loop turn that saw a PUBACK.
        self._delete_timer: asyncio.TimerHandle | None = None
        # seq → payload and seq → topic of the messages whose payload is in memory. Two plain
        # dictionaries, not an object per message: a deep outbox then holds nothing the garbage
        # collector must traverse, and staging a message allocates no container (each one
        # allocated and kept alive counts towards the next collection).
        self._payloads: dict[int, bytes] = {}
        self._topics: dict[int, str] = {}
        # Topics already checked (producers reuse a handful; bounded all the same).
        self._checked_topics: set[str] = set()
        self._resident_bytes = 0
        self._fetching: dict[int, asyncio.Future[dict[int, tuple[str, bytes, int]]]] = {}
        # Senders waiting in next_message(), oldest first. Each event that lets messages go
        # wakes as many as can take one (and a sender that takes one wakes the next if more can
        # go), never all of them: with 100 senders idle, waking every one for each commit and
        # each PUBACK cost ~200 task switches, ~1 ms of CPU, per message sent.
        self._senders: deque[asyncio.Future[None]] = deque()
        self._idle = asyncio.Event()
        self._idle.set()

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open (or create) the database and restore what it holds.

        Raises:
            UsageError: entered a second time (an Outbox is opened once).
            StorageError: the database cannot be opened or read.
        """
        if self._db is not None:
            raise UsageError("an Outbox is opened once; make a new one to reopen the file")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._db = _SqliteThread(self._path, self._durability, self._on_done, loop)
        opened = await self._db.start()
        self._uid = opened.uid
        for seq, size in opened.rows:
            self._core.restore(seq, size)
        self._open = True
        _log.info(
            "outbox.opened",
            path=str(self._path),
            restored=len(opened.rows),
            restored_bytes=self._core.bytes,
            policy=self._limits.policy.value,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit what is pending, then stop the SQLite thread (shielded from cancellation)."""
        if not self._open:
            return
        self._open = False
        self._wake_senders(len(self._senders))  # they raise OutboxClosedError
        self._flush()
        if self._db is not None:
            await asyncio.shield(self._db.stop())
        _log.info("outbox.closed", **_stats_fields(self._core.stats()))

    # -- introspection -------------------------------------------------------------------------

    @property
    def uid(self) -> str:
        """This outbox's random id (stored in the database, first part of every message id)."""
        return self._uid

    @property
    def limits(self) -> OutboxLimits:
        """The bounds in force."""
        return self._limits

    @property
    def transactions(self) -> int:
        """SQLite transactions committed since open (for benchmarks and tests)."""
        return self._db.transactions if self._db is not None else 0

    def stats(self) -> OutboxStats:
        """A snapshot: depth, bytes, in flight, dropped, refused, accepted, acked."""
        return self._core.stats()

    def message_id(self, seq: int) -> str:
        """The stable message id of ``seq``."""
        return f"{self._uid}-{seq}"

    # -- producers -----------------------------------------------------------------------------

    def submit(self, topic: str, payload: bytes, *, qos: int = 1) -> asyncio.Future[str]:
        """Admit a message and return a future that resolves to its id once it is committed.

        Validation and the overflow policy act at once (they raise here); only durability is
        awaited. Use it to pipeline many messages; :meth:`put` awaits one.

        Args:
            topic: the MQTT topic (see :func:`check_topic`).
            payload: the payload bytes.
            qos: the QoS level; only 1 is supported.

        Returns:
            A future resolving to the message id, or failing with :class:`StorageError`.

        Raises:
            OutboxClosedError: the outbox is not open.
            TopicError: the topic is not publishable.
            PayloadTooLargeError: the payload exceeds ``max_payload_bytes``.
            OutboxFullError: full, and the policy is REFUSE.
        """
        loop = self._check_submit(topic, qos)
        try:
            admission = self._core.admit(len(payload))
        except OutboxFullError as exc:
            self._refused(topic, exc)
            raise
        if admission.dropped:
            self._dropped(admission.dropped)
        future: asyncio.Future[str] = loop.create_future()
        request = self._request
        index = len(request.seqs)
        seq = admission.seq
        request.seqs.append(seq)
        request.params += (seq, topic, payload, 1, int(self._clock() * 1000))
        self._keep_resident(seq, topic, payload)
        request.waiters.append((future, index, index + 1, True))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def submit_many(self, topic: str, payloads: Sequence[bytes]) -> asyncio.Future[list[str]]:
        """Admit several messages to one topic, all or none; one future for all their ids.

        The batch form of :meth:`submit` for producers with many messages at hand: one topic
        check, one admission decision, one wake-up when they are committed.

        Args:
            topic: the MQTT topic of every message.
            payloads: the payloads, in order.

        Returns:
            A future resolving to the message ids in order, or failing with
            :class:`StorageError`.

        Raises:
            OutboxClosedError: the outbox is not open.
            TopicError: the topic is not publishable.
            PayloadTooLargeError: a payload exceeds ``max_payload_bytes`` (none is admitted).
            OutboxFullError: they do not all fit and the policy is REFUSE, or even dropping
                every queued message would not make room (none is admitted).
        """
        loop = self._check_submit(topic, 1)
        sizes = list(map(len, payloads))
        try:
            admission = self._core.admit_many(sizes)
        except OutboxFullError as exc:
            self._refused(topic, exc)
            raise
        if admission.dropped:
            self._dropped(admission.dropped)
        future: asyncio.Future[list[str]] = loop.create_future()
        if not payloads:
            future.set_result([])  # nothing to commit: no transaction would resolve it
            return future
        request = self._request
        start = len(request.seqs)
        seqs = admission.seqs
        # The batch is staged by C-level iteration (zip, chain, map, dict.update): no Python
        # bytecode runs per message.
        request.seqs += seqs
        request.params += chain.from_iterable(
            zip(seqs, repeat(topic), payloads, repeat(1), repeat(int(self._clock() * 1000)))
        )
        total = sum(sizes)
        if self._resident_bytes + total <= self._limits.resident_bytes:
            self._payloads.update(zip(seqs, payloads, strict=True))
            self._topics.update(dict.fromkeys(seqs, topic))
            self._resident_bytes += total
        else:
            for seq, payload in zip(seqs, payloads, strict=True):
                self._keep_resident(seq, topic, payload)
        request.waiters.append((future, start, len(request.seqs), False))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def _check_submit(self, topic: str, qos: int) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if not self._open or loop is None:
            raise OutboxClosedError("the outbox is not open")
        if qos != 1:
            raise UsageError(f"only QoS 1 is supported by the outbox, got {qos}")
        if topic not in self._checked_topics:
            check_topic(topic)
            if len(self._checked_topics) >= _TOPIC_CACHE:
                self._checked_topics.clear()
            self._checked_topics.add(topic)
        return loop

    def _refused(self, topic: str, exc: OutboxFullError) -> None:
        _log.warning(
            "outbox.refused",
            topic=topic,
            limit=exc.limit_name,
            refused_total=self._core.stats().refused,
        )

    def _keep_resident(self, seq: int, topic: str, payload: bytes) -> None:
        """Keep a payload in memory if the resident budget allows (else it is read back)."""
        if self._resident_bytes + len(payload) <= self._limits.resident_bytes:
            self._payloads[seq] = payload
            self._topics[seq] = topic
            self._resident_bytes += len(payload)

    async def put(self, topic: str, payload: bytes, *, qos: int = 1) -> str:
        """Persist a message; return its id once its row is committed ("accepted").

        Args:
            topic: the MQTT topic (see :func:`check_topic`).
            payload: the payload bytes.
            qos: the QoS level; only 1 is supported.

        Returns:
            The stable message id.

        Raises:
            OutboxClosedError: the outbox is not open.
            TopicError: the topic is not publishable.
            PayloadTooLargeError: the payload exceeds ``max_payload_bytes``.
            OutboxFullError: full, and the policy is REFUSE (back-pressure: retry later).
            StorageError: the commit failed.
        """
        return await self.submit(topic, payload, qos=qos)

    def _on_done(self, batch: list[_Request], error: StorageError | None) -> None:
        """A transaction ended (on the loop, called by the SQLite thread)."""
        committed = 0
        for request in batch:
            if error is None:
                committed += self._committed(request)
            else:
                self._abandoned(request, error)
            if request.fetch_future is not None:
                self._fetched(request)
        if error is not None:
            _log.error("outbox.commit_failed", error=str(error))
        if self._senders:
            # At most one sender per message now sendable; one more after a failure, in case
            # the abandoned rows were what held the head back.
            self._wake_senders(committed or 1)

    def _committed(self, request: _Request) -> int:
        """``request``'s rows are durable: make them sendable, tell their producers."""
        seqs = request.seqs
        # A message dropped before its commit was still accepted, then dropped.
        self._core.committed(seqs)
        prefix = f"{self._uid}-"
        for future, start, end, single in request.waiters:
            if future.done():
                continue
            if single:
                future.set_result(f"{prefix}{seqs[start]}")
            else:
                future.set_result(list(map(prefix.__add__, map(str, seqs[start:end]))))
        return len(seqs)

    def _abandoned(self, request: _Request, error: StorageError) -> None:
        """``request``'s rows are not durable: forget them rather than send what the producer
        was told failed."""
        for seq in request.seqs:
            self._core.abandon(seq)
            self._forget_payload(seq)
        for future, _start, _end, _single in request.waiters:
            if not future.done():
                future.set_exception(error)

    def _forget_payload(self, seq: int) -> None:
        payload = self._payloads.pop(seq, None)
        if payload is not None:
            del self._topics[seq]
            self._resident_bytes -= len(payload)

    def _dropped(self, dropped: tuple[tuple[int, int], ...]) -> None:
        for seq, _size in dropped:
            self._forget_payload(seq)
        self._request.deletes.extend(seq for seq, _size in dropped)
        _log.warning(
            "outbox.dropped",
            count=len(dropped),
            first_seq=dropped[0][0],
            last_seq=dropped[-1][0],
            bytes=sum(size for _seq, size in dropped),
            dropped_total=self._core.stats().dropped,
        )

    # -- the publisher's side ------------------------------------------------------------------

    def take_nowait(self) -> StoredMessage | None:
        """The next message to publish if one is ready with its payload in memory, else None.

        The message is in flight from now on: :meth:`ack` or :meth:`release` it.
        """
        core = self._core
        payloads = self._payloads
        seq = core.take_head_if(payloads)
        if seq is None:
            return None
        if core.in_flight == 1:  # it was 0: no longer idle
            self._idle.clear()
        # Built when taken, not when staged: it lives only while in flight (at most 100).
        message = _new_object(StoredMessage)
        _SET_SEQ(message, seq)
        _SET_MESSAGE_ID(message, f"{self._uid}-{seq}")
        _SET_TOPIC(message, self._topics[seq])
        _SET_PAYLOAD(message, payloads[seq])
        _SET_QOS(message, 1)
        return message

    async def next_message(self) -> StoredMessage:
        """Wait for the next message to publish (within the in-flight bound) and take it.

        Raises:
            OutboxClosedError: the outbox closed while waiting.
            StorageError: its payload could not be read back from SQLite.
        """
        while True:
            if not self._open:
                raise OutboxClosedError("the outbox is not open")
            message = self.take_nowait()
            if message is not None:
                if self._senders and self._core.head() is not None:
                    self._wake_senders(1)  # more can go: pass the baton
                return message
            head = self._core.peek_queued(_FETCH_BATCH)
            if head and head[0] not in self._payloads:
                await self._load(head)
                continue
            waiter: asyncio.Future[None] = self._running_loop().create_future()
            self._senders.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    # Woken, then cancelled before it ran: another sender takes the wake-up.
                    self._wake_senders(1)
                else:
                    with contextlib.suppress(ValueError):
                        self._senders.remove(waiter)
                raise

    def _wake_senders(self, count: int) -> None:
        """Wake up to ``count`` senders waiting in :meth:`next_message`, oldest first."""
        senders = self._senders
        while count > 0 and senders:
            waiter = senders.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    async def _load(self, seqs: list[int]) -> None:
        """Read payloads of queued messages back from SQLite into memory.

        Concurrent callers share one read; the payloads are in memory when it resolves (stored
        by :meth:`_on_done`, so no waiter can see it resolved and the payloads still missing).
        """
        waiting = self._fetching.get(seqs[0])
        if waiting is None:
            waiting = self._running_loop().create_future()
            wanted = [s for s in seqs if s not in self._payloads and s not in self._fetching]
            for seq in wanted:
                self._fetching[seq] = waiting
            self._request.fetch = wanted
            self._request.fetch_future = waiting
            self._flush()
        await asyncio.shield(waiting)

    def _fetched(self, request: _Request) -> None:
        """Store what the SQLite thread read back for ``request`` and wake its waiters."""
        future = request.fetch_future
        for seq in request.fetch:
            self._fetching.pop(seq, None)
        result = request.fetched
        if future is None or future.done():
            return
        if isinstance(result, StorageError):
            future.set_exception(result)
            return
        found = result or {}
        for seq, (topic, payload, _qos) in found.items():
            if self._core.state(seq) is not EntryState.GONE and seq not in self._payloads:
                self._payloads[seq] = payload
                self._topics[seq] = topic
                self._resident_bytes += len(payload)
        missing = [
            s
            for s in request.fetch
            if s not in found and self._core.state(s) is not EntryState.GONE
        ]
        if missing:
            future.set_exception(
                StorageError(str(self._path), "read", f"{len(missing)} queued rows missing")
            )
        else:
            future.set_result({})

    def ack(self, seq: int) -> None:
        """The PUBACK for ``seq`` arrived: delete its row (batched) and free its place.

        Raises:
            UsageError: ``seq`` is not in flight.
        """
        core = self._core
        size = core.ack(seq)  # raises before anything changes when seq is not in flight
        if self._payloads.pop(seq, None) is not None:
            del self._topics[seq]
            self._resident_bytes -= size
        self._request.deletes.append(seq)
        if self._delete_timer is None and not self._flush_scheduled:
            self._delete_timer = self._running_loop().call_later(_DELETE_DELAY, self._flush)
        if core.in_flight == 0:
            self._idle.set()
        if self._senders and core.head() is not None:
            self._wake_senders(1)  # its place in the in-flight window lets a message go

    def release(self, seq: int) -> None:
        """No PUBACK will come for ``seq`` (connection lost): queue it again, at the head.

        Raises:
            UsageError: ``seq`` is not in flight.
        """
        self._core.release((seq,))
        if self._core.in_flight == 0:
            self._idle.set()
        self._wake_senders(1)  # it is at the head again

    async def wait_idle(self) -> None:
        """Wait until no message is in flight."""
        await self._idle.wait()

    # -- flushing ------------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise OutboxClosedError("the outbox was never opened")
        return self._loop

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._delete_timer is not None:
            self._delete_timer.cancel()
            self._delete_timer = None
        request = self._request
        if not (request.seqs or request.deletes or request.fetch_future is not None):
            return
        self._request = _Request()
        if self._db is not None:
            self._db.submit(request)


def _stats_fields(stats: OutboxStats) -> dict[str, int]:
    return {
        "depth": stats.depth,
        "bytes": stats.bytes,
        "in_flight": stats.in_flight,
        "dropped": stats.dropped,
        "refused": stats.refused,
        "accepted": stats.accepted,
        "acked": stats.acked,
    }
