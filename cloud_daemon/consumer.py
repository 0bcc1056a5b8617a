"""The Kinesis stream consumer: leases, shard readers, the processing contract.

Theory of operation
-------------------

:class:`StreamConsumer` is an async context manager owning one :class:`asyncio.TaskGroup`:

- ``kinesis-discovery``: every ``discovery_interval`` (and at once when a shard finishes) it
  lists the shards (``ListShards``, paginated), reads the lease table, asks the pure core
  (:func:`cloud_daemon.lineage.plan_assignment`) which leases to claim, claims them with
  conditional writes, and starts a reader for each lease won. A child shard is ready only when
  all its parents are finished, so records of one partition key stay in order across splits
  and merges.
- ``kinesis-renewal``: every ``renew_interval`` it renews every lease held. A lease taken over
  by another worker (:class:`~cloud_daemon.errors.LeaseLostError`), or one we could not renew
  before it lapsed, stops its reader at once: a worker never reads a shard it cannot prove it
  owns.
- ``kinesis-shard-<id>``: one :class:`ShardConsumer` per owned shard. It starts from the
  checkpoint (``AFTER_SEQUENCE_NUMBER``) or the configured start, calls ``GetRecords`` at most
  once per ``poll_interval`` (0.2 s: AWS's 5 calls/s per shard), waits longer while the shard is
  idle (doubling up to ``max_idle_wait``), backs off with full jitter when throttled, and gets a
  fresh iterator from the checkpoint when one expires. A closed shard read to its end (no
  ``NextShardIterator``) is marked finished, which releases its children.

The processing contract: records go to the handler in order, in batches; the checkpoint moves
only after the handler succeeded (at least once). A batch that raises is bisected, without
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
from typing import Any, Self

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
    ShardGraph,
    ShardInfo,
    parse_sequence_number,
    plan_assignment,
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
]

_log = structlog.get_logger()

# AWS's bounds on one GetRecords call.
_GET_RECORDS_MAX = 10_000
_LIST_SHARDS_MAX = 1000  # ListShards' MaxResults bound, also its default
_REASON_LIMIT = 500
_RATE_WINDOW = 10.0  # seconds of history behind records_per_second


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
        lease_duration: seconds a lease lasts without renewal.
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


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One Kinesis record.

    Attributes:
        shard_id: the shard it was read from.
        sequence_number: its sequence number, as an integer.
        partition_key: its partition key.
        data: its payload.
        arrival: when Kinesis received it (timezone-aware).
    """

    shard_id: str
    sequence_number: int
    partition_key: str
    data: bytes
    arrival: dt.datetime

    @classmethod
    def from_aws(cls, shard_id: str, data: Mapping[str, Any]) -> StreamRecord:
        """Build from one element of GetRecords' ``Records``.

        Raises:
            DecodeError: a field is missing or has the wrong type.
        """
        arrival = data.get("ApproximateArrivalTimestamp")
        if not isinstance(arrival, dt.datetime):
            raise DecodeError("Records[].ApproximateArrivalTimestamp", "a timestamp", arrival)
        payload = data.get("Data")
        key = data.get("PartitionKey")
        if not isinstance(payload, bytes):
            raise DecodeError("Records[].Data", "bytes", type(payload).__name__)
        if not isinstance(key, str):
            raise DecodeError("Records[].PartitionKey", "a string", key)
        return cls(
            shard_id,
            parse_sequence_number(data.get("SequenceNumber")),
            key,
            payload,
            arrival.astimezone(dt.UTC),
        )


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
        self._position: int | None = lease.checkpoint
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
        if self._position is not None:
            request |= {
                "ShardIteratorType": "AFTER_SEQUENCE_NUMBER",
                "StartingSequenceNumber": str(self._position),
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

        Args:
            stop: set by the owner to ask for a graceful stop (after the current batch).

        Returns:
            How the reader ended.

        Raises:
            LeaseLostError: another worker took the lease; nothing more was checkpointed.
            DecodeError: AWS answered something malformed.
        """
        iterator = await self._iterator(stop)
        idle = self._config.poll_interval
        wait = 0.0
        failures = 0
        loop = asyncio.get_running_loop()
        while iterator is not None:
            if await _wait_or_stop(stop, wait):
                return ShardOutcome.STOPPED
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
                _log.info("consumer.iterator_expired", checkpoint=self._position)
                iterator = await self._iterator(stop)
                wait = 0.0
                continue
            except (ThrottledError, AwsServiceError, AwsTransportError) as exc:
                self._count_failure(exc)
                wait = self._aws_backoff(failures)
                failures += 1
                continue
            failures = 0
            behind = answer.get("MillisBehindLatest")
            self.counters.millis_behind_latest = behind if isinstance(behind, int) else None
            records = [StreamRecord.from_aws(self.shard_id, r) for r in answer.get("Records", [])]
            if self._position is not None:
                # A fresh iterator can start at or before the checkpoint: those are handled.
                records = [r for r in records if r.sequence_number > self._position]
            if records and not await self._process(
                records, self.counters.millis_behind_latest, stop
            ):
                return ShardOutcome.STOPPED
            iterator = answer.get("NextShardIterator")
            if iterator is None:
                if not await self._persist(
                    lambda: self._leases.mark_finished(self.shard_id, owner=self._owner), stop
                ):
                    return ShardOutcome.STOPPED  # the next owner reads the (empty) end again
                self.counters.finished = True
                _log.info("consumer.shard_finished", checkpoint=self._position)
                return ShardOutcome.FINISHED
            idle = next_poll_delay(
                idle, got_records=bool(records), millis_behind=behind, config=self._config
            )
            wait = max(0.0, started + idle - loop.time())
        return ShardOutcome.STOPPED

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
    ) -> bool:
        """Hand ``records`` to the handler under the processing contract.

        Returns:
            ``False`` when ``stop`` ended processing early; everything handled up to then is
            checkpointed, unless the store failed too (then the next owner repeats it).
        """
        pending = records
        size = len(pending)  # records per handler call: the whole batch unless narrowing
        narrowing = False  # bisecting towards a record that fails without being named
        attempts = 0  # failed attempts of pending[0], once it is alone
        while pending:
            if stop.is_set():
                # Everything handled so far is checkpointed; the rest is the next owner's.
                return False
            batch = ShardBatch(
                self._config.stream_name, self.shard_id, tuple(pending[:size]), behind
            )
            failure = await self._call_handler(batch)
            if failure is None:
                self._handled(len(batch.records))
                if not await self._checkpoint(batch.records[-1].sequence_number, stop):
                    return False
                pending = pending[len(batch.records) :]
                if attempts:  # a record that failed alone succeeded on retry: back to batches
                    narrowing, attempts = False, 0
                size = min(size, len(pending)) if narrowing else len(pending)
                continue
            index, reason = failure
            if index < 0 and len(batch.records) > 1:
                # The batch failed without saying which record: bisect, without waiting, until
                # the failing record is alone. Halves that succeed keep the narrowed size.
                narrowing = True
                size = math.ceil(len(batch.records) / 2)
                continue
            if index > 0:
                self._handled(index)
                if not await self._checkpoint(batch.records[index - 1].sequence_number, stop):
                    return False
                pending = pending[index:]
                attempts = 0
            attempts += 1
            size = 1  # retry the failing record alone
            match await self._after_failure(pending[0], attempts, reason, stop):
                case _Next.STOP:
                    return False
                case _Next.BURIED:
                    pending = pending[1:]
                    size, narrowing, attempts = len(pending), False, 0
                case _Next.RETRY:
                    pass
        return True

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
        clock: wall-clock time, seconds since the epoch (lease expiry, record age).
        rand: uniform numbers in [0, 1) for backoff jitter.
        """
        self._kinesis = kinesis
        self._leases = leases
        self._handler = handler
        self._config = config
        self._dead_letter = dead_letter or JsonLinesDeadLetter(Path("dead-letters.jsonl"))
        self._clock = clock
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
            now=self._clock(),
            allow_steal=self._config.allow_steal,
        )
        for claim in plan.claims:
            if self._closing or claim.shard_id in self._readers:
                continue
            try:
                lease = await self._leases.acquire(
                    claim.shard_id,
                    owner=self._config.worker_id,
                    expected_counter=claim.expected_counter,
                    now=self._clock(),
                    duration=self._config.lease_duration,
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
            self._start_reader(lease)

    def _is_closing(self) -> bool:
        return self._closing

    def _start_reader(self, lease: Lease) -> None:
        if self._tasks is None:  # pragma: no cover - discovery runs only inside the block
            return
        reader = _Reader(lease, asyncio.Event())
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
        now = self._clock()
        try:
            reader.lease = await self._leases.renew(
                shard_id,
                owner=self._config.worker_id,
                now=now,
                duration=self._config.lease_duration,
            )
        except LeaseLostError:
            lost = True
        except (AwsServiceError, AwsTransportError) as exc:
            _log.warning("consumer.renew_failed", shard=shard_id, error=type(exc).__name__)
            # Keep reading only while the lease we last wrote is still in force.
            lost = reader.lease.expires_at <= now + self._config.effective_renew_interval
        else:
            lost = False
        if lost and reader.task is not None and not reader.task.done():
            _log.warning("consumer.lease_lost", shard=shard_id)
            reader.task.cancel("lease lost")
