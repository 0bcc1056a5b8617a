"""The Kinesis stream consumer: leases, shard readers, the processing contract.

Theory of operation
-------------------

:class:`StreamConsumer` is an async context manager owning one :class:`asyncio.TaskGroup`:

- ``kinesis-discovery``: every ``discovery_interval`` (and at once when a shard finishes) it
  lists the shards (``ListShards``, paginated), reads the lease table, tells the pure core which
  leases have lapsed (:class:`cloud_daemon.lineage.LeaseExpiry`: a counter unchanged for a whole
  ``lease_duration`` on this worker's monotonic clock; wall clocks play no part), asks it
  (:func:`cloud_daemon.lineage.plan_assignment`) which leases to claim, claims them with
  conditional writes, and starts a reader for each lease won. A child shard is ready only when
  all its parents are finished, so records of one partition key stay in order across splits
  and merges. Then it deletes the finished rows that no longer order any child
  (:func:`cloud_daemon.lineage.plan_cleanup`), each on condition that it is finished.
- ``kinesis-renewal``: every ``renew_interval`` it renews every lease held (each renewal bumps
  the counter the other workers watch). A lease taken over by another worker
  (:class:`~cloud_daemon.errors.LeaseLostError`), or one we could not renew in time, stops its
  reader at once: a worker never reads a shard it cannot prove it owns. "In time" is measured
  on the monotonic clock from when the last successful renewal was *sent*: no other worker can
  have seen that counter earlier, so none can take the lease before a ``lease_duration`` has
  passed since then, and the reader stops a ``renew_interval`` before that.
- ``kinesis-shard-<id>``: one :class:`ShardConsumer` per owned shard. It starts from the
  checkpoint (``AFTER_SEQUENCE_NUMBER``) or the configured start, calls ``GetRecords`` at most
  once per ``poll_interval`` (0.2 s: AWS's 5 calls/s per shard, plus a small margin), waits
  longer while the shard is idle (doubling up to ``max_idle_wait``), backs off with full jitter
  when throttled, and gets a fresh iterator from the last record read when one expires. A
  closed shard read to its end (no ``NextShardIterator``) is marked finished, which releases
  its children.
- ``kinesis-fetch-<id>``: the shard reader's next ``GetRecords`` call, made while the handler
  works on the current batch (one call ahead, never more), so a busy shard is read without a
  gap between calls. The reader awaits it, or cancels and awaits it, before it ends.

The processing contract: records go to the handler in order, in batches; the checkpoint moves
only after the handler succeeded (at least once). A batch read ahead is handled only after the
one before it is checkpointed; it is dropped, and read again from the checkpoint, when the
batch before it needed retries or the reader stops first. A batch that raises is bisected, without
waiting, until the failing record is alone; a failing record (or one the handler names in a
:class:`RecordFailure`) is retried with backoff until ``retry_attempts`` or ``max_record_age``
runs out, then written to the dead-letter sink with its reason, and the checkpoint moves past
it. Never a stuck shard, never a silent skip: if the sink fails, the reader retries the sink.

Shutdown is handed in from outside: leaving the ``async with`` block stops discovery, lets each
reader finish its current batch and checkpoint (bounded by ``drain_timeout``), releases every
lease (graceful hand-off: another worker takes it at once, without repeats), then stops renewal.

Sequence numbers are integers everywhere; strings only on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import structlog
from structlog.contextvars import bound_contextvars

from cloud_daemon.deadletter import DeadLetter, DeadLetterSink, JsonLinesDeadLetter
from cloud_daemon.errors import (
    AwsServiceError,
    AwsTransportError,
    IteratorExpiredError,
    LeaseLostError,
    LeaseTakenError,
    ThrottledError,
)
from cloud_daemon.leases import LeaseStore, aws_errors
from cloud_daemon.lineage import (
    Lease,
    LeaseExpiry,
    ShardGraph,
    ShardInfo,
    parse_sequence_number,
    plan_assignment,
    plan_cleanup,
)
from shared.errors import ConfigError, DecodeError, PeerError, TransportError, UsageError

__all__ = [
    "ConsumerConfig",
    "Handler",
    "RecordFailure",
    "ShardBatch",
    "ShardConsumer",
    "ShardMetrics",
    "ShardOutcome",
    "StartPosition",
    "StreamConsumer",
    "StreamRecord",
    "backoff_delay",
    "failure_verdict",
    "next_poll_delay",
    "records_from_aws",
]

_log = structlog.get_logger()

# AWS's bounds on one GetRecords call.
_GET_RECORDS_MAX = 10_000
_LIST_SHARDS_MAX = 1000  # ListShards' MaxResults bound, also its default
_REASON_LIMIT = 500
_RATE_WINDOW = 10.0  # seconds of history behind records_per_second
# Added to every pause between two GetRecords calls on a shard: AWS counts calls when they
# arrive, and a request's latency varies, so calls spaced exactly poll_interval (0.2 s) apart
# sometimes arrive as a sixth call in one second and are throttled.
_PACING_MARGIN = 0.01
_BUILD_CHUNK = 500  # records built between two yields to the event loop


class StartPosition(enum.Enum):
    """Where a shard without a checkpoint starts."""

    TRIM_HORIZON = "TRIM_HORIZON"
    LATEST = "LATEST"
    AT_TIMESTAMP = "AT_TIMESTAMP"


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """How the consumer reads, retries and shares a stream.

    Attributes:
        stream_name: the Kinesis stream.
        worker_id: this instance's name in the lease table (unique per instance).
        start: where a shard without a checkpoint starts.
        start_timestamp: the time for ``AT_TIMESTAMP`` (timezone-aware).
        batch_limit: records per GetRecords call and per handler batch (1..10,000).
        poll_interval: least seconds between two GetRecords calls on one shard (>= 0.2: AWS
            allows 5 per second per shard).
        max_idle_wait: the longest wait between calls on a shard that is caught up.
        retry_attempts: handler attempts for one failing record before it is dead-lettered.
        retry_backoff: the first retry's backoff ceiling, in seconds (doubles, full jitter).
        retry_backoff_cap: the largest retry backoff ceiling.
        max_record_age: a failing record older than this (seconds since Kinesis received it)
            is dead-lettered without further retries; ``None`` for no bound.
        throttle_backoff: the first backoff ceiling after a throttle or an AWS failure.
        throttle_backoff_cap: the largest one.
        lease_duration: seconds a lease's counter must stand still, on the watching worker's
            monotonic clock, before that worker may take the lease (the same on every worker).
        renew_interval: seconds between renewals (default: a third of ``lease_duration``).
        discovery_interval: seconds between shard listings.
        drain_timeout: on shutdown, how long readers may take to finish their batch.
        allow_steal: whether to take leases from a live, more loaded worker to balance.
        list_shards_page: ``MaxResults`` per ListShards call (1..1,000).
    """

    stream_name: str
    worker_id: str
    start: StartPosition = StartPosition.TRIM_HORIZON
    start_timestamp: dt.datetime | None = None
    batch_limit: int = 1000
    poll_interval: float = 0.2
    max_idle_wait: float = 1.0
    retry_attempts: int = 5
    retry_backoff: float = 0.5
    retry_backoff_cap: float = 30.0
    max_record_age: float | None = None
    throttle_backoff: float = 0.2
    throttle_backoff_cap: float = 5.0
    lease_duration: float = 10.0
    renew_interval: float | None = None
    discovery_interval: float = 10.0
    drain_timeout: float = 5.0
    allow_steal: bool = True
    list_shards_page: int = 1000

    def __post_init__(self) -> None:  # noqa: PLR0912 - one check per field reads best flat
        if not self.stream_name:
            raise ConfigError("consumer.stream_name", "must not be empty")
        if not self.worker_id:
            raise ConfigError("consumer.worker_id", "must not be empty")
        if self.start is StartPosition.AT_TIMESTAMP and (
            self.start_timestamp is None or self.start_timestamp.tzinfo is None
        ):
            raise ConfigError("consumer.start_timestamp", "AT_TIMESTAMP needs an aware time")
        if not 1 <= self.batch_limit <= _GET_RECORDS_MAX:
            raise ConfigError("consumer.batch_limit", f"must be 1..{_GET_RECORDS_MAX}")
        if not 1 <= self.list_shards_page <= _LIST_SHARDS_MAX:
            raise ConfigError("consumer.list_shards_page", f"must be 1..{_LIST_SHARDS_MAX}")
        if self.poll_interval < 0.2:
            raise ConfigError("consumer.poll_interval", "must be >= 0.2 s (5 calls/s per shard)")
        if self.max_idle_wait < self.poll_interval:
            raise ConfigError("consumer.max_idle_wait", "must be >= poll_interval")
        if self.retry_attempts < 1:
            raise ConfigError("consumer.retry_attempts", "must be >= 1")
        for name in ("retry_backoff", "throttle_backoff", "drain_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"consumer.{name}", "must be >= 0")
        if self.retry_backoff_cap < self.retry_backoff:
            raise ConfigError("consumer.retry_backoff_cap", "must be >= retry_backoff")
        if self.throttle_backoff_cap < self.throttle_backoff:
            raise ConfigError("consumer.throttle_backoff_cap", "must be >= throttle_backoff")
        if self.max_record_age is not None and self.max_record_age <= 0:
            raise ConfigError("consumer.max_record_age", "must be > 0 or None")
        if self.lease_duration <= 0 or self.discovery_interval <= 0:
            raise ConfigError("consumer.lease_duration", "durations must be > 0")
        if self.renew_interval is not None and not 0 < self.renew_interval < self.lease_duration:
            raise ConfigError("consumer.renew_interval", "must be > 0 and < lease_duration")

    @property
    def effective_renew_interval(self) -> float:
        """The renewal period in force."""
        return self.renew_interval or self.lease_duration / 3


# --- records, batches, handler ---------------------------------------------------------------


class StreamRecord:
    """One Kinesis record; immutable, compared and hashed by value.

    A slotted class rather than a frozen dataclass: GetRecords returns up to 10,000 records a
    call, and a frozen dataclass's constructor (one ``object.__setattr__`` per field) plus the
    conversion of every arrival time to UTC were most of the consumer's own cost per record.
    The consumer builds records from a GetRecords answer it validated as a whole
    (:func:`records_from_aws`); the arrival time is converted when it is read.

    Attributes:
        shard_id: the shard it was read from.
        sequence_number: its sequence number, as an integer.
        partition_key: its partition key.
        data: its payload.
        arrival: when Kinesis received it (timezone-aware, UTC).
    """

    __slots__ = ("_arrival", "data", "partition_key", "sequence_number", "shard_id")
    __match_args__ = ("shard_id", "sequence_number", "partition_key", "data", "arrival")

    shard_id: str
    sequence_number: int
    partition_key: str
    data: bytes
    _arrival: dt.datetime

    def __init__(
        self,
        shard_id: str,
        sequence_number: int,
        partition_key: str,
        data: bytes,
        arrival: dt.datetime,
    ) -> None:
        """Args:
        shard_id: the shard it was read from.
        sequence_number: its sequence number (>= 0).
        partition_key: its partition key.
        data: its payload.
        arrival: when Kinesis received it (timezone-aware).

        Raises:
            UsageError: a negative sequence number or a naive arrival time.
        """
        if sequence_number < 0:
            raise UsageError("a sequence number is >= 0")
        if arrival.tzinfo is None:
            raise UsageError("a record's arrival time must be timezone-aware")
        set_shard, set_sequence, set_key, set_data, set_arrival = _RECORD_SLOTS
        set_shard(self, shard_id)
        set_sequence(self, sequence_number)
        set_key(self, partition_key)
        set_data(self, data)
        set_arrival(self, arrival)

    @property
    def arrival(self) -> dt.datetime:
        """When Kinesis received the record, in UTC."""
        arrival = self._arrival
        return arrival if arrival.tzinfo is dt.UTC else arrival.astimezone(dt.UTC)

    def _key(self) -> tuple[str, int, str, bytes, dt.datetime]:
        # Aware datetimes compare and hash by instant, whatever their zone.
        return (self.shard_id, self.sequence_number, self.partition_key, self.data, self._arrival)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamRecord):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"StreamRecord(shard_id={self.shard_id!r}, sequence_number={self.sequence_number}, "
            f"partition_key={self.partition_key!r}, data={self.data!r}, "
            f"arrival={self.arrival!r})"
        )

    def __reduce__(self) -> tuple[type[StreamRecord], tuple[str, int, str, bytes, dt.datetime]]:
        # copy and pickle rebuild through __init__: restoring slots one by one would meet the
        # refusing __setattr__ below.
        return (StreamRecord, self._key())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"StreamRecord is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"StreamRecord is immutable: cannot delete {name!r}")

    @classmethod
    def from_aws(cls, shard_id: str, data: Mapping[str, Any]) -> StreamRecord:
        """Build from one element of GetRecords' ``Records``.

        Raises:
            DecodeError: a field is missing or has the wrong type.
        """
        arrival = data.get("ApproximateArrivalTimestamp")
        if not isinstance(arrival, dt.datetime) or arrival.tzinfo is None:
            raise DecodeError("Records[].ApproximateArrivalTimestamp", "a timestamp", arrival)
        payload = data.get("Data")
        key = data.get("PartitionKey")
        if not isinstance(payload, bytes):
            raise DecodeError("Records[].Data", "bytes", type(payload).__name__)
        if not isinstance(key, str):
            raise DecodeError("Records[].PartitionKey", "a string", key)
        return cls(
            shard_id, parse_sequence_number(data.get("SequenceNumber")), key, payload, arrival
        )


# The slots' own descriptors write below StreamRecord's refusing __setattr__: the cheapest way
# to fill an immutable object in Python (cheaper than object.__setattr__ by name).
_RECORD_SLOTS: Final[tuple[Callable[[StreamRecord, Any], None], ...]] = tuple(
    vars(StreamRecord)[name].__set__
    for name in ("shard_id", "sequence_number", "partition_key", "data", "_arrival")
)


def records_from_aws(shard_id: str, records: object) -> list[StreamRecord]:
    """Build the records of one GetRecords answer, validated once for the whole batch.

    Args:
        shard_id: the shard read.
        records: the answer's ``Records``.

    Returns:
        The records, in the answer's order (sequence numbers strictly increasing).

    Raises:
        DecodeError: ``Records`` is not a list, a record lacks a field or has one of the wrong
            type, or the sequence numbers do not increase.
    """
    if not isinstance(records, list):
        raise DecodeError("Records", "a list", type(records).__name__)
    built: list[StreamRecord] = []
    append = built.append
    new = object.__new__
    set_shard, set_sequence, set_key, set_data, set_arrival = _RECORD_SLOTS
    previous = -1
    for item in records:
        # The hot path: up to 10,000 records a call, so the checks are inline and the record is
        # filled through its slots; anything unexpected goes through from_aws for its error.
        try:
            text = item["SequenceNumber"]
            data = item["Data"]
            key = item["PartitionKey"]
            arrival = item["ApproximateArrivalTimestamp"]
        except (KeyError, TypeError):
            text = data = key = arrival = None
        if not (
            type(text) is str
            and text.isdigit()
            and text.isascii()
            and type(data) is bytes
            and type(key) is str
            and isinstance(arrival, dt.datetime)
            and arrival.tzinfo is not None
        ):
            if not isinstance(item, Mapping):
                raise DecodeError("Records[]", "an object", type(item).__name__)
            record = StreamRecord.from_aws(shard_id, item)  # raises what is wrong
            sequence = record.sequence_number
        else:
            sequence = int(text)
            record = new(StreamRecord)
            set_shard(record, shard_id)
            set_sequence(record, sequence)
            set_key(record, key)
            set_data(record, data)
            set_arrival(record, arrival)
        append(record)
        if sequence <= previous:
            raise DecodeError("Records[].SequenceNumber", "increasing sequence numbers", sequence)
        previous = sequence
    return built


@dataclass(frozen=True, slots=True)
class ShardBatch:
    """Records of one shard, in order, handed to the handler together.

    Attributes:
        stream: the stream name.
        shard_id: the shard.
        records: one or more records, sequence numbers strictly increasing.
        millis_behind_latest: how far behind the tip of the shard the read was.
    """

    stream: str
    shard_id: str
    records: tuple[StreamRecord, ...]
    millis_behind_latest: int | None = None

    def __post_init__(self) -> None:
        if not self.records:
            raise UsageError("a shard batch holds at least one record")
        previous = -1
        for record in self.records:
            if record.shard_id != self.shard_id:
                raise UsageError(f"record of {record.shard_id} in a batch of {self.shard_id}")
            if record.sequence_number <= previous:
                raise UsageError("batch records must be in increasing sequence order")
            previous = record.sequence_number

    @classmethod
    def _of_checked(
        cls,
        stream: str,
        shard_id: str,
        records: tuple[StreamRecord, ...],
        millis_behind_latest: int | None,
    ) -> ShardBatch:
        """Build from records of one shard already known to be in order (validated when the
        GetRecords answer was read): bisection builds many batches of the same records."""
        batch = object.__new__(cls)
        for name, value in (
            ("stream", stream),
            ("shard_id", shard_id),
            ("records", records),
            ("millis_behind_latest", millis_behind_latest),
        ):
            object.__setattr__(batch, name, value)
        return batch


@dataclass(frozen=True, slots=True)
class RecordFailure:
    """A handler's answer: records before ``sequence_number`` succeeded, this one failed.

    Attributes:
        sequence_number: the first record of the batch that failed.
        reason: why (kept in the dead letter; never a secret).
    """

    sequence_number: int
    reason: str


#: The handler: ``None`` when every record of the batch succeeded, a :class:`RecordFailure`
#: naming the first failed record otherwise. Raising counts as a failure of the whole batch.
#: It may see a record more than once (at least once delivery): it must be idempotent.
Handler = Callable[[ShardBatch], Awaitable[RecordFailure | None]]


# --- pure decisions ------------------------------------------------------------------------


def backoff_delay(attempt: int, *, base: float, cap: float, rand: float) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(cap, base * 2**attempt))``.

    Args:
        attempt: 0 for the first retry.
        base: the first ceiling.
        cap: the largest ceiling.
        rand: a uniform number in ``[0, 1)`` (passed in, so this stays pure).

    Returns:
        Seconds to wait.
    """
    return rand * min(cap, base * 2.0 ** min(attempt, 62))


def next_poll_delay(
    previous_idle: float, *, got_records: bool, millis_behind: int | None, config: ConsumerConfig
) -> float:
    """How long after the last GetRecords call to make the next one.

    Args:
        previous_idle: the delay used after the previous call.
        got_records: whether the last call returned records.
        millis_behind: the last call's ``MillisBehindLatest``.
        config: the pacing bounds.

    Returns:
        ``poll_interval`` while there is data to read; while the shard is caught up and idle,
        the previous delay doubled, up to ``max_idle_wait``.
    """
    if got_records or (millis_behind or 0) > 0:
        return config.poll_interval
    return min(config.max_idle_wait, max(config.poll_interval, previous_idle * 2))


def failure_verdict(
    *, attempts: int, arrival: dt.datetime, now: dt.datetime, config: ConsumerConfig
) -> str | None:
    """Decide whether a failing record gets another attempt.

    Args:
        attempts: how many attempts failed so far (>= 1).
        arrival: when Kinesis received the record.
        now: the current time.
        config: the retry budget and maximum age.

    Returns:
        ``None`` to retry, else why the record goes to the dead-letter sink.
    """
    if attempts >= config.retry_attempts:
        return f"retry budget spent ({attempts} attempts)"
    if config.max_record_age is not None:
        age = (now - arrival).total_seconds()
        if age > config.max_record_age:
            return f"older than max_record_age ({age:.1f} s > {config.max_record_age} s)"
    return None


# --- metrics --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardMetrics:
    """A snapshot of one shard's counters, for the service's metrics endpoint.

    Attributes:
        shard_id: the shard.
        records: records handled (each success counted once per delivery).
        records_per_second: over the last ten seconds.
        millis_behind_latest: from the last GetRecords answer, ``None`` before the first.
        throttles: GetRecords or GetShardIterator calls throttled.
        errors: handler failures, AWS failures and dead-letter sink failures.
        dead_lettered: records given up on.
        iterator_refreshes: expired iterators replaced from the checkpoint.
        owned: whether this worker reads the shard now.
        finished: whether the shard was read to its end.
    """

    shard_id: str
    records: int
    records_per_second: float
    millis_behind_latest: int | None
    throttles: int
    errors: int
    dead_lettered: int
    iterator_refreshes: int
    owned: bool
    finished: bool


@dataclass(slots=True)
class _Counters:
    records: int = 0
    millis_behind_latest: int | None = None
    throttles: int = 0
    errors: int = 0
    dead_lettered: int = 0
    iterator_refreshes: int = 0
    owned: bool = False
    finished: bool = False
    window: deque[tuple[float, int]] = field(default_factory=deque)

    def handled(self, count: int, now: float) -> None:
        self.records += count
        self.window.append((now, count))
        while self.window and self.window[0][0] < now - _RATE_WINDOW:
            self.window.popleft()

    def snapshot(self, shard_id: str, now: float) -> ShardMetrics:
        recent = sum(n for t, n in self.window if t >= now - _RATE_WINDOW)
        return ShardMetrics(
            shard_id,
            self.records,
            recent / _RATE_WINDOW,
            self.millis_behind_latest,
            self.throttles,
            self.errors,
            self.dead_lettered,
            self.iterator_refreshes,
            self.owned,
            self.finished,
        )


# --- one shard ------------------------------------------------------------------------------


class ShardOutcome(enum.Enum):
    """How a shard reader ended."""

    FINISHED = "finished"  # read to its end and marked finished
    STOPPED = "stopped"  # asked to stop; the last batch handled is checkpointed


class _Processed(enum.Enum):
    """How handing one GetRecords answer to the handler went."""

    DONE = "done"  # every record handled and checkpointed, first time
    AFTER_FAILURES = "after_failures"  # all handled or dead-lettered, some after retries
    STOPPED = "stopped"  # ``stop`` ended it early; what was handled is checkpointed


@dataclass(frozen=True, slots=True)
class _Fetched:
    """One GetRecords answer."""

    records: list[Any]  # its Records, as aiobotocore returned them (not yet validated)
    next_iterator: str | None  # ``None``: a closed shard read to its end
    millis_behind: int | None
    started: float  # loop time the call went out (pacing counts from it)


async def _cancel(task: asyncio.Task[Any], why: str) -> None:
    """Cancel ``task`` and wait until it has ended: nothing of a reader outlives it."""
    task.cancel(why)
    await asyncio.wait([task])
    if not task.cancelled():
        # It ended on its own first; its result or failure is no longer wanted (a failure of
        # a read ahead shows again when the shard is read from the checkpoint).
        task.exception()


class _Next(enum.Enum):
    """What follows a record's failure."""

    RETRY = "retry"
    BURIED = "buried"  # dead-lettered and checkpointed past
    STOP = "stop"  # the reader was asked to stop while waiting


async def _wait_or_stop(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds unless ``stop`` is set first; return whether it was set."""
    if stop.is_set():
        return True
    if delay <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await stop.wait()
    return stop.is_set()


class ShardConsumer:
    """Reads one leased shard, hands its records to the handler, checkpoints, dead-letters.

    Built by :class:`StreamConsumer` for each lease it wins; usable alone in tests.
    """

    def __init__(
        self,
        *,
        kinesis: Any,
        leases: LeaseStore,
        handler: Handler,
        dead_letter: DeadLetterSink,
        config: ConsumerConfig,
        lease: Lease,
        counters: _Counters | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Args:
        kinesis: an aiobotocore Kinesis client (owned by the caller).
        leases: the lease store holding ``lease``.
        handler: receives the records.
        dead_letter: receives records given up on.
        config: pacing and retry settings.
        lease: the lease held on the shard (its checkpoint is the starting point).
        counters: where to count (a fresh set when ``None``).
        clock: wall-clock time, seconds since the epoch.
        rand: uniform numbers in [0, 1) for backoff jitter.
        """
        self._kinesis = kinesis
        self._leases = leases
        self._handler = handler
        self._dead_letter = dead_letter
        self._config = config
        self.shard_id = lease.shard_id
        self._owner = config.worker_id
        self._position: int | None = lease.checkpoint  # the checkpoint: handled up to here
        # Read up to here: ahead of the checkpoint by the batches fetched but not yet handled.
        # A fresh iterator starts after it; it falls back to the checkpoint when those batches
        # are dropped.
        self._read_position: int | None = lease.checkpoint
        self._latest_since: dt.datetime | None = None
        self.counters = counters or _Counters()
        self._clock = clock
        self._rand = rand

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def _iterator_request(self) -> dict[str, Any]:
        request: dict[str, Any] = {
            "StreamName": self._config.stream_name,
            "ShardId": self.shard_id,
        }
        if self._read_position is not None:
            request |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": str(self._read_position),
            }
        elif self._latest_since is not None:
            # Started at LATEST with nothing handled yet: re-reading from when we started loses
            # nothing, where a second LATEST would skip what arrived in between.
            request |= {"ShardIteratorType": "AT_TIMESTAMP", "Timestamp": self._latest_since}
        elif self._config.start is StartPosition.AT_TIMESTAMP:
            request |= {
                "ShardIteratorType": "AT_TIMESTAMP",
                "Timestamp": self._config.start_timestamp,
            }
        else:
            if self._config.start is StartPosition.LATEST:
                self._latest_since = self._now()
            request["ShardIteratorType"] = self._config.start.value
        return request

    async def _iterator(self, stop: asyncio.Event) -> str | None:
        """A fresh iterator from the checkpoint, retried through throttles and failures."""
        attempt = 0
        while True:
            try:
                async with aws_errors(
                    "GetShardIterator", resource=self._config.stream_name, shard_id=self.shard_id
                ):
                    answer = await self._kinesis.get_shard_iterator(**self._iterator_request())
                iterator = answer.get("ShardIterator")
                if not isinstance(iterator, str):
                    raise DecodeError("ShardIterator", "a string", iterator)
            except (ThrottledError, AwsServiceError, AwsTransportError) as exc:
                self._count_failure(exc)
                if await _wait_or_stop(stop, self._aws_backoff(attempt)):
                    return None
                attempt += 1
            else:
                return iterator

    def _aws_backoff(self, attempt: int) -> float:
        # Never sooner than the pacing interval: a retry is a call like any other.
        return max(
            self._config.poll_interval,
            backoff_delay(
                attempt,
                base=self._config.throttle_backoff,
                cap=self._config.throttle_backoff_cap,
                rand=self._rand(),
            ),
        )

    def _count_failure(self, exc: Exception) -> None:
        if isinstance(exc, ThrottledError):
            self.counters.throttles += 1
            _log.info("consumer.throttled", limit=exc.limit_name)
        else:
            self.counters.errors += 1
            _log.warning("consumer.aws_failed", error=type(exc).__name__, detail=str(exc))

    async def run(self, stop: asyncio.Event) -> ShardOutcome:
        """Read the shard until it ends or ``stop`` is set.

        The next GetRecords call goes out while the handler works on the current batch (one
        call ahead, never more, still paced to ``poll_interval``): the handler sees batches in
        shard order, the checkpoint moves only after the handler succeeded, and a batch fetched
        ahead is dropped, and read again from the checkpoint, whenever the batch before it
        needed a retry or the reader stops before handling it.

        Args:
            stop: set by the owner to ask for a graceful stop (after the current batch).

        Returns:
            How the reader ended.

        Raises:
            LeaseLostError: another worker took the lease; nothing more was checkpointed.
            DecodeError: AWS answered something malformed.
        """
        loop = asyncio.get_running_loop()
        idle = self._config.poll_interval
        ahead: asyncio.Task[_Fetched | None] | None = self._fetch_ahead(None, loop.time(), stop)
        try:
            while ahead is not None:
                fetched = await ahead
                ahead = None
                if fetched is None:
                    return ShardOutcome.STOPPED
                if fetched.next_iterator is not None:
                    idle = next_poll_delay(
                        idle,
                        got_records=bool(fetched.records),
                        millis_behind=fetched.millis_behind,
                        config=self._config,
                    )
                    ahead = self._fetch_ahead(
                        fetched.next_iterator, fetched.started + idle + _PACING_MARGIN, stop
                    )
                records = await self._read_records(fetched.records)
                if records:
                    processed = await self._process(records, fetched.millis_behind, stop)
                    if processed is _Processed.STOPPED:
                        return ShardOutcome.STOPPED
                    if processed is _Processed.AFTER_FAILURES and ahead is not None:
                        # Retries may have taken long: read on from the checkpoint rather than
                        # from what was fetched before them. The call just cancelled may have
                        # gone out: wait a whole interval before the next.
                        await _cancel(ahead, "batch needed retries")
                        self._read_position = self._position
                        ahead = self._fetch_ahead(None, loop.time() + idle + _PACING_MARGIN, stop)
                if fetched.next_iterator is None:
                    if not await self._persist(
                        lambda: self._leases.mark_finished(self.shard_id, owner=self._owner), stop
                    ):
                        return ShardOutcome.STOPPED  # the next owner reads the (empty) end again
                    self.counters.finished = True
                    _log.info("consumer.shard_finished", checkpoint=self._position)
                    return ShardOutcome.FINISHED
                if stop.is_set():
                    # What was fetched ahead is dropped: the next owner reads it from the
                    # checkpoint.
                    return ShardOutcome.STOPPED
            return ShardOutcome.STOPPED  # pragma: no cover - the loop returns from inside
        finally:
            if ahead is not None:
                await _cancel(ahead, "reader ending")

    async def _read_records(self, answer: list[Any]) -> list[StreamRecord]:
        """Build and validate an answer's records; drop those at or before the read position.

        The call reading ahead is already scheduled: yielding to the loop between chunks lets
        its request go out early, so the sandbox or AWS prepares the next answer while these
        records are built, rather than after.

        Raises:
            DecodeError: a malformed record, or sequence numbers that do not increase.
        """
        records: list[StreamRecord] = []
        for start in range(0, len(answer), _BUILD_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = records_from_aws(self.shard_id, answer[start : start + _BUILD_CHUNK])
            if records and chunk[0].sequence_number <= records[-1].sequence_number:
                raise DecodeError(
                    "Records[].SequenceNumber",
                    "increasing sequence numbers",
                    chunk[0].sequence_number,
                )
            records += chunk
        after = self._read_position
        if records and after is not None and records[0].sequence_number <= after:
            # A fresh iterator can start at or before the read position: those are held or
            # handled already.
            records = [r for r in records if r.sequence_number > after]
        if records:
            self._read_position = records[-1].sequence_number
        return records

    def _fetch_ahead(
        self, iterator: str | None, not_before: float, stop: asyncio.Event
    ) -> asyncio.Task[_Fetched | None]:
        # A task the reader always awaits, or cancels and awaits, before it ends (run's
        # finally): not a TaskGroup's, which would wrap a malformed answer's DecodeError in an
        # ExceptionGroup on its way out of run().
        return asyncio.create_task(
            self._fetch(iterator, not_before, stop), name=f"kinesis-fetch-{self.shard_id}"
        )

    async def _fetch(
        self, iterator: str | None, not_before: float, stop: asyncio.Event
    ) -> _Fetched | None:
        """One GetRecords answer, with throttles, failures and expired iterators dealt with.

        Args:
            iterator: where to read; ``None`` for a fresh iterator from the read position.
            not_before: the loop time before which the call must not go out (pacing).
            stop: ends the waits (pacing, backoff) early.

        Returns:
            The answer, or ``None`` if ``stop`` came first.

        Raises:
            DecodeError: AWS answered something malformed.
        """
        loop = asyncio.get_running_loop()
        failures = 0
        while True:
            if await _wait_or_stop(stop, not_before - loop.time()):
                return None
            if iterator is None:
                iterator = await self._iterator(stop)
                if iterator is None:
                    return None
            started = loop.time()
            try:
                async with aws_errors(
                    "GetRecords", resource=self._config.stream_name, shard_id=self.shard_id
                ):
                    answer = await self._kinesis.get_records(
                        ShardIterator=iterator, Limit=self._config.batch_limit
                    )
            except IteratorExpiredError:
                self.counters.iterator_refreshes += 1
                _log.info(
                    "consumer.iterator_expired",
                    checkpoint=self._position,
                    read_position=self._read_position,
                )
                iterator, not_before = None, 0.0
                continue
            except (ThrottledError, AwsServiceError, AwsTransportError) as exc:
                self._count_failure(exc)
                not_before = loop.time() + self._aws_backoff(failures)
                failures += 1
                continue
            behind = answer.get("MillisBehindLatest")
            behind = behind if isinstance(behind, int) else None
            self.counters.millis_behind_latest = behind
            records = answer.get("Records", [])
            if not isinstance(records, list):
                raise DecodeError("Records", "a list", type(records).__name__)
            next_iterator = answer.get("NextShardIterator")
            if next_iterator is not None and not isinstance(next_iterator, str):
                raise DecodeError("NextShardIterator", "a string", type(next_iterator).__name__)
            return _Fetched(records, next_iterator, behind, started)

    async def _persist(self, write: Callable[[], Awaitable[None]], stop: asyncio.Event) -> bool:
        """Run a lease-store write, retrying store failures; ``False`` if ``stop`` came first.

        Raises:
            LeaseLostError: we no longer own the lease (never retried: it ends the reader).
        """
        attempt = 0
        while True:
            try:
                await write()
            except (AwsServiceError, AwsTransportError) as exc:
                self._count_failure(exc)
                if await _wait_or_stop(stop, self._aws_backoff(attempt)):
                    return False
                attempt += 1
            else:
                return True

    async def _checkpoint(self, sequence: int, stop: asyncio.Event) -> bool:
        """Checkpoint ``sequence``; ``False`` if ``stop`` came before the store answered (the
        next owner then repeats what was handled since the last checkpoint)."""
        written = await self._persist(
            lambda: self._leases.checkpoint(self.shard_id, owner=self._owner, sequence=sequence),
            stop,
        )
        if written:
            self._position = sequence
        return written

    async def _call_handler(self, batch: ShardBatch) -> tuple[int, str] | None:
        """Run the handler; on failure, the index of the failed record (-1: unknown) and why."""
        try:
            outcome = await self._handler(batch)
        # The handler is application code: any failure of it is a record failure, never the
        # consumer's end.
        except Exception as exc:  # noqa: BLE001
            return -1, f"{type(exc).__name__}: {exc}"[:_REASON_LIMIT]
        if outcome is None:
            return None
        for index, record in enumerate(batch.records):
            if record.sequence_number == outcome.sequence_number:
                return index, outcome.reason[:_REASON_LIMIT]
        # A failure naming a record outside the batch cannot be placed.
        return -1, outcome.reason[:_REASON_LIMIT]

    async def _process(
        self, records: list[StreamRecord], behind: int | None, stop: asyncio.Event
    ) -> _Processed:
        """Hand ``records`` (in order, of this shard) to the handler under the processing
        contract.

        Returns:
            ``STOPPED`` when ``stop`` ended processing early: everything handled up to then is
            checkpointed, unless the store failed too (then the next owner repeats it).
            ``AFTER_FAILURES`` when every record was handled or dead-lettered but some only
            after a failure; ``DONE`` otherwise.
        """
        pending = records
        size = len(pending)  # records per handler call: the whole batch unless narrowing
        narrowing = False  # bisecting towards a record that fails without being named
        attempts = 0  # failed attempts of pending[0], once it is alone
        failed = False
        while pending:
            if stop.is_set():
                # Everything handled so far is checkpointed; the rest is the next owner's.
                return _Processed.STOPPED
            batch = ShardBatch._of_checked(
                self._config.stream_name, self.shard_id, tuple(pending[:size]), behind
            )
            failure = await self._call_handler(batch)
            if failure is None:
                self._handled(len(batch.records))
                if not await self._checkpoint(batch.records[-1].sequence_number, stop):
                    return _Processed.STOPPED
                pending = pending[len(batch.records) :]
                if attempts:  # a record that failed alone succeeded on retry: back to batches
                    narrowing, attempts = False, 0
                size = min(size, len(pending)) if narrowing else len(pending)
                continue
            index, reason = failure
            failed = True
            if index < 0 and len(batch.records) > 1:
                # The batch failed without saying which record: bisect, without waiting, until
                # the failing record is alone. Halves that succeed keep the narrowed size.
                narrowing = True
                size = math.ceil(len(batch.records) / 2)
                continue
            if index > 0:
                self._handled(index)
                if not await self._checkpoint(batch.records[index - 1].sequence_number, stop):
                    return _Processed.STOPPED
                pending = pending[index:]
                attempts = 0
            attempts += 1
            size = 1  # retry the failing record alone
            match await self._after_failure(pending[0], attempts, reason, stop):
                case _Next.STOP:
                    return _Processed.STOPPED
                case _Next.BURIED:
                    pending = pending[1:]
                    size, narrowing, attempts = len(pending), False, 0
                case _Next.RETRY:
                    pass
        return _Processed.AFTER_FAILURES if failed else _Processed.DONE

    def _handled(self, count: int) -> None:
        self.counters.handled(count, self._clock())

    async def _after_failure(
        self, failed: StreamRecord, attempts: int, reason: str, stop: asyncio.Event
    ) -> _Next:
        """Wait to retry ``failed``, or dead-letter it and checkpoint past it."""
        self.counters.errors += 1
        _log.warning(
            "consumer.record_failed",
            sequence=str(failed.sequence_number),
            attempt=attempts,
            reason=reason,
        )
        verdict = failure_verdict(
            attempts=attempts, arrival=failed.arrival, now=self._now(), config=self._config
        )
        if verdict is None:
            delay = backoff_delay(
                attempts - 1,
                base=self._config.retry_backoff,
                cap=self._config.retry_backoff_cap,
                rand=self._rand(),
            )
            return _Next.STOP if await _wait_or_stop(stop, delay) else _Next.RETRY
        if not await self._bury(failed, attempts, f"{verdict}; last failure: {reason}", stop):
            return _Next.STOP
        if not await self._checkpoint(failed.sequence_number, stop):
            return _Next.STOP
        return _Next.BURIED

    async def _bury(
        self, record: StreamRecord, attempts: int, reason: str, stop: asyncio.Event
    ) -> bool:
        """Write ``record`` to the dead-letter sink, retrying the sink until it succeeds."""
        letter = DeadLetter(
            stream=self._config.stream_name,
            shard_id=self.shard_id,
            sequence_number=record.sequence_number,
            partition_key=record.partition_key,
            data=record.data,
            arrival=record.arrival,
            attempts=attempts,
            reason=reason[:_REASON_LIMIT],
            failed_at=self._now(),
        )
        attempt = 0
        while True:
            try:
                await self._dead_letter.put(letter)
            except Exception as exc:  # noqa: BLE001 - the sink is pluggable: any failure means "not stored", so retry
                self.counters.errors += 1
                _log.error("consumer.dead_letter_failed", error=type(exc).__name__)
                if await _wait_or_stop(stop, self._aws_backoff(attempt)):
                    return False
                attempt += 1
            else:
                self.counters.dead_lettered += 1
                _log.warning(
                    "consumer.record_dead_lettered",
                    sequence=str(record.sequence_number),
                    attempts=attempts,
                    reason=letter.reason,
                )
                return True


# --- the stream -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Reader:
    lease: Lease
    stop: asyncio.Event
    renewed_at: float  # monotonic time the last counter bump that succeeded was sent
    task: asyncio.Task[None] | None = None


class StreamConsumer:
    """Consume a Kinesis stream with leases, in an ``async with`` block.

    Example::

        async with StreamConsumer(kinesis=client, leases=store, handler=handle,
                                  config=ConsumerConfig(stream_name="ztp", worker_id=host)):
            await shutdown.wait()
        # leaving the block hands every lease off gracefully
    """

    def __init__(
        self,
        *,
        kinesis: Any,
        leases: LeaseStore,
        handler: Handler,
        config: ConsumerConfig,
        dead_letter: DeadLetterSink | None = None,
        on_ownership_change: Callable[[frozenset[str]], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Args:
        kinesis: an aiobotocore Kinesis client (owned by the caller).
        leases: where leases and checkpoints live (owned by the caller).
        handler: receives the records, batch by batch, in order per shard.
        config: the consumer's settings.
        dead_letter: where failing records go; ``JsonLinesDeadLetter("dead-letters.jsonl")``
            in the working directory when ``None``.
        on_ownership_change: called with the owned shards whenever they change (readiness,
            metrics, tests); it must not block.
        clock: wall-clock time, seconds since the epoch (record age, metrics); never used
            for leases.
        monotonic: a monotonic clock in seconds, for lease expiry and renewal deadlines.
        rand: uniform numbers in [0, 1) for backoff jitter.
        """
        self._kinesis = kinesis
        self._leases = leases
        self._handler = handler
        self._config = config
        self._dead_letter = dead_letter or JsonLinesDeadLetter(Path("dead-letters.jsonl"))
        self._clock = clock
        self._monotonic = monotonic
        self._expiry = LeaseExpiry(duration=config.lease_duration)
        self._rand = rand
        self._on_ownership_change = on_ownership_change
        self._readers: dict[str, _Reader] = {}
        self._counters: dict[str, _Counters] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._renewal_stop = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []

    # -- public surface --

    def owned_shards(self) -> frozenset[str]:
        """The shards this worker reads now."""
        return frozenset(self._readers)

    def metrics(self) -> dict[str, ShardMetrics]:
        """A snapshot of every shard's counters seen by this worker, by shard id."""
        now = self._clock()
        return {sid: c.snapshot(sid, now) for sid, c in sorted(self._counters.items())}

    def discover_now(self) -> None:
        """Ask for a shard listing and lease round at once (after a reshard, in tests)."""
        self._wake.set()

    async def __aenter__(self) -> Self:
        tasks = asyncio.TaskGroup()
        await tasks.__aenter__()
        self._tasks = tasks
        name = self._config.stream_name
        self._background = [
            tasks.create_task(self._discovery_loop(), name=f"kinesis-discovery-{name}"),
            tasks.create_task(self._renewal_loop(), name=f"kinesis-renewal-{name}"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is None:
            return
        try:
            await self._hand_off()
        finally:
            # Whatever happened in the hand-off, nothing may outlive the block.
            self._closing = True
            self._wake.set()
            self._renewal_stop.set()
            await tasks.__aexit__(exc_type, exc, tb)

    # -- shutdown --

    async def _hand_off(self) -> None:
        """Stop discovery, drain readers (bounded), release their leases, stop renewal."""
        self._closing = True
        self._wake.set()
        # Discovery first, so no reader starts after the snapshot below.
        discovery = self._background[0]
        if not discovery.done():
            _, late = await asyncio.wait([discovery], timeout=self._config.drain_timeout)
            for task in late:
                task.cancel("consumer closing")
        readers = list(self._readers.values())
        for reader in readers:
            reader.stop.set()
        running = [r.task for r in readers if r.task is not None and not r.task.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=self._config.drain_timeout)
            for task in late:
                task.cancel("consumer drain timeout")
            if late:
                await asyncio.wait(late)
        # Readers release their own leases when they stop; a cancelled one could not.
        for reader in readers:
            if reader.task is not None and reader.task.cancelled():
                await self._release(reader.lease.shard_id)
        self._renewal_stop.set()

    async def _release(self, shard_id: str) -> None:
        try:
            await self._leases.release(shard_id, owner=self._config.worker_id)
        except (LeaseLostError, AwsServiceError, AwsTransportError) as exc:
            # Not released: the lease lapses after lease_duration instead.
            _log.warning("consumer.release_failed", shard=shard_id, error=type(exc).__name__)

    # -- discovery and leases --

    async def _list_shards(self) -> ShardGraph:
        shards: list[ShardInfo] = []
        request: dict[str, Any] = {
            "StreamName": self._config.stream_name,
            "MaxResults": self._config.list_shards_page,
        }
        while True:
            async with aws_errors("ListShards", resource=self._config.stream_name):
                page = await self._kinesis.list_shards(**request)
            shards.extend(ShardInfo.from_aws(s) for s in page.get("Shards", []))
            token = page.get("NextToken")
            if not token:
                return ShardGraph.of(shards)
            # AWS refuses StreamName together with NextToken.
            request = {"NextToken": token, "MaxResults": self._config.list_shards_page}

    async def _discovery_loop(self) -> None:
        while not self._closing:
            try:
                await self._discover()
            # A refusal, a malformed listing or a network failure: try again next round. A
            # usage error (the stream does not exist) ends the consumer.
            except (PeerError, TransportError) as exc:
                _log.warning("consumer.discovery_failed", error=type(exc).__name__, detail=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.discovery_interval):
                    await self._wake.wait()
            self._wake.clear()

    async def _discover(self) -> None:
        graph = await self._list_shards()
        table = await self._leases.list_leases()
        plan = plan_assignment(
            graph=graph,
            leases=table,
            me=self._config.worker_id,
            lapsed=self._expiry.observe(table, self._monotonic()),
            allow_steal=self._config.allow_steal,
        )
        for claim in plan.claims:
            if self._closing or claim.shard_id in self._readers:
                continue
            sent = self._monotonic()
            try:
                lease = await self._leases.acquire(
                    claim.shard_id,
                    owner=self._config.worker_id,
                    expected_counter=claim.expected_counter,
                )
            except LeaseTakenError:
                continue
            if self._is_closing():  # the hand-off began while we were taking it
                await self._release(claim.shard_id)
                return
            _log.info(
                "consumer.lease_taken",
                shard=claim.shard_id,
                stolen_from=claim.stolen_from,
                checkpoint=None if lease.checkpoint is None else str(lease.checkpoint),
            )
            self._start_reader(lease, sent)
        if not self._closing:
            await self._clean_up(graph, table)

    async def _clean_up(self, graph: ShardGraph, table: Mapping[str, Lease]) -> None:
        """Delete the finished rows no child needs any more (conditional: races are harmless)."""
        for shard_id in plan_cleanup(graph=graph, leases=table):
            if await self._leases.delete_finished(shard_id):
                _log.info("consumer.lease_deleted", shard=shard_id, listed=shard_id in graph.shards)

    def _is_closing(self) -> bool:
        return self._closing

    def _start_reader(self, lease: Lease, sent: float) -> None:
        if self._tasks is None:  # pragma: no cover - discovery runs only inside the block
            return
        reader = _Reader(lease, asyncio.Event(), sent)
        self._readers[lease.shard_id] = reader
        reader.task = self._tasks.create_task(
            self._run_reader(reader), name=f"kinesis-shard-{lease.shard_id}"
        )
        self._ownership_changed()

    def _ownership_changed(self) -> None:
        if self._on_ownership_change is not None:
            self._on_ownership_change(self.owned_shards())

    async def _run_reader(self, reader: _Reader) -> None:
        shard_id = reader.lease.shard_id
        counters = self._counters.setdefault(shard_id, _Counters())
        counters.owned = True
        consumer = ShardConsumer(
            kinesis=self._kinesis,
            leases=self._leases,
            handler=self._handler,
            dead_letter=self._dead_letter,
            config=self._config,
            lease=reader.lease,
            counters=counters,
            clock=self._clock,
            rand=self._rand,
        )
        try:
            with bound_contextvars(stream=self._config.stream_name, shard=shard_id):
                outcome = await consumer.run(reader.stop)
                if outcome is ShardOutcome.STOPPED:
                    await self._release(shard_id)
                    _log.info("consumer.lease_released")
        except LeaseLostError:
            _log.warning("consumer.lease_lost", shard=shard_id)
        finally:
            counters.owned = False
            if self._readers.get(shard_id) is reader:
                del self._readers[shard_id]
                self._ownership_changed()
            self._wake.set()  # a finished parent may release its children

    async def _renewal_loop(self) -> None:
        interval = self._config.effective_renew_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._renewal_stop.wait()
            if self._renewal_stop.is_set():
                return
            for shard_id, reader in list(self._readers.items()):
                await self._renew(shard_id, reader)

    async def _renew(self, shard_id: str, reader: _Reader) -> None:
        sent = self._monotonic()
        try:
            reader.lease = await self._leases.renew(shard_id, owner=self._config.worker_id)
        except LeaseLostError:
            lost = True
        except (AwsServiceError, AwsTransportError) as exc:
            _log.warning("consumer.renew_failed", shard=shard_id, error=type(exc).__name__)
            # No other worker saw our last counter before we sent it, so none may take the
            # lease before renewed_at + lease_duration on its clock: stop reading one renewal
            # period before that, as the next chance to check may come too late.
            deadline = reader.renewed_at + self._config.lease_duration
            lost = self._monotonic() + self._config.effective_renew_interval >= deadline
        else:
            reader.renewed_at = sent
            lost = False
        if lost and reader.task is not None and not reader.task.done():
            _log.warning("consumer.lease_lost", shard=shard_id)
            reader.task.cancel("lease lost")
