"""The Kinesis consumer: pure decisions, then real reads against the moto sandbox.

The sandbox (``sandbox.aws.MotoSandbox``) runs with its AWS-fidelity layer: closed shards end
and name their children, writes go only to open shards, GetRecords is throttled past its quota
and iterators expire when the knobs say so. One sandbox per module, reset before each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime as dt
import itertools
import json
import math
import pickle
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog

from cloud_daemon.consumer import (
    ConsumerConfig,
    Handler,
    RecordFailure,
    ShardBatch,
    ShardConsumer,
    ShardOutcome,
    StartPosition,
    StreamConsumer,
    StreamRecord,
    backoff_delay,
    failure_verdict,
    next_poll_delay,
    records_from_aws,
)
from cloud_daemon.deadletter import DeadLetter, JsonLinesDeadLetter, MemoryDeadLetter
from cloud_daemon.errors import AwsTransportError
from cloud_daemon.leases import (
    DynamoLeaseStore,
    Lease,
    LeaseStore,
    MemoryLeaseStore,
    SqliteLeaseStore,
    create_lease_table,
)
from sandbox.aws import MotoSandbox
from shared.errors import ConfigError, DecodeError, UsageError
from tests.adapters import kinesis_fixtures as kf

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def fast_config(stream: str, worker: str = "w1", **changes: Any) -> ConsumerConfig:
    """Settings scaled down so a test takes seconds, not minutes."""
    settings: dict[str, Any] = {
        "stream_name": stream,
        "worker_id": worker,
        "poll_interval": 0.2,
        "max_idle_wait": 0.4,
        "discovery_interval": 0.3,
        "lease_duration": 3.0,
        "renew_interval": 0.5,
        "retry_backoff": 0.01,
        "retry_backoff_cap": 0.05,
        "throttle_backoff": 0.05,
        "throttle_backoff_cap": 0.4,
        "drain_timeout": 5.0,
    }
    settings.update(changes)
    return ConsumerConfig(**settings)


# --- pure decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [(0, 0.5, 0.05), (3, 1.0, 0.8), (10, 1.0, 5.0), (10_000, 0.25, 1.25), (2, 0.0, 0.0)],
)
def test_backoff_is_full_jitter_under_a_cap(attempt: int, rand: float, expected: float) -> None:
    assert backoff_delay(attempt, base=0.1, cap=5.0, rand=rand) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("previous", "got", "behind", "expected"),
    [
        (0.2, True, 0, 0.2),  # records came: keep the fastest legal pace
        (0.8, False, 500, 0.2),  # behind the tip: keep reading fast
        (0.2, False, 0, 0.4),  # caught up and idle: back off...
        (0.4, False, 0, 0.8),
        (0.8, False, 0, 1.0),  # ...up to max_idle_wait
        (0.8, False, None, 1.0),
    ],
)
def test_poll_pacing_adapts_to_idle_shards(
    previous: float, got: bool, behind: int | None, expected: float
) -> None:
    config = ConsumerConfig(stream_name="s", worker_id="w", max_idle_wait=1.0)
    assert next_poll_delay(
        previous, got_records=got, millis_behind=behind, config=config
    ) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("attempts", "age", "verdict"),
    [
        (1, 10, None),
        (2, 10, None),
        (3, 10, "retry budget spent (3 attempts)"),
        (1, 61, "older than max_record_age (61.0 s > 60 s)"),
    ],
)
def test_failure_verdict(attempts: int, age: float, verdict: str | None) -> None:
    config = ConsumerConfig(stream_name="s", worker_id="w", retry_attempts=3, max_record_age=60)
    now = T0 + dt.timedelta(seconds=age)
    assert failure_verdict(attempts=attempts, arrival=T0, now=now, config=config) == verdict


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"stream_name": ""}, "consumer.stream_name"),
        ({"poll_interval": 0.1}, "consumer.poll_interval"),  # would break 5 calls/s per shard
        ({"batch_limit": 10_001}, "consumer.batch_limit"),
        ({"list_shards_page": 1001}, "consumer.list_shards_page"),
        ({"start": StartPosition.AT_TIMESTAMP}, "consumer.start_timestamp"),
        ({"max_idle_wait": 0.1}, "consumer.max_idle_wait"),
        ({"retry_attempts": 0}, "consumer.retry_attempts"),
        ({"renew_interval": 10.0}, "consumer.renew_interval"),
        ({"max_record_age": 0}, "consumer.max_record_age"),
    ],
)
def test_config_validates_when_built(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ConsumerConfig(**({"stream_name": "s", "worker_id": "w"} | changes))
    assert caught.value.key == key


def record(seq: int, shard: str = "s0") -> StreamRecord:
    return StreamRecord(shard, seq, "k", b"x", T0)


def test_batch_validates_order_and_shard() -> None:
    with pytest.raises(UsageError):
        ShardBatch("s", "s0", ())
    with pytest.raises(UsageError):
        ShardBatch("s", "s0", (record(2), record(10), record(9)))
    with pytest.raises(UsageError):
        ShardBatch("s", "s0", (record(1, "s1"),))
    assert len(ShardBatch("s", "s0", (record(9), record(10))).records) == 2


def test_record_from_aws_uses_integer_sequence_numbers() -> None:
    parsed = StreamRecord.from_aws(
        "s0",
        {
            "SequenceNumber": "49590338271490256608559692538361571095921575989136588898",
            "ApproximateArrivalTimestamp": T0,
            "Data": b"{}",
            "PartitionKey": "k",
        },
    )
    assert parsed.sequence_number == 49590338271490256608559692538361571095921575989136588898
    with pytest.raises(DecodeError):
        StreamRecord.from_aws("s0", {"SequenceNumber": "1", "Data": b"", "PartitionKey": "k"})


def aws_record(seq: int, **changes: Any) -> dict[str, Any]:
    """One element of GetRecords' ``Records`` as aiobotocore returns it."""
    local = dt.timezone(dt.timedelta(hours=2))  # botocore's timestamps are in the local zone
    return {
        "SequenceNumber": str(seq),
        "ApproximateArrivalTimestamp": (T0 + dt.timedelta(milliseconds=seq % 1000)).astimezone(
            local
        ),
        "Data": f"d{seq}".encode(),
        "PartitionKey": f"k{seq % 3}",
    } | changes


def test_records_of_an_answer_match_record_by_record_parsing() -> None:
    answer = [aws_record(seq) for seq in (5, 6, 90, 2**120)]
    built = records_from_aws("s0", answer)
    assert built == [StreamRecord.from_aws("s0", r) for r in answer]
    assert [r.sequence_number for r in built] == [5, 6, 90, 2**120]
    assert built[2].arrival == T0 + dt.timedelta(milliseconds=90)
    assert built[2].arrival.tzinfo is dt.UTC  # converted on reading, whatever botocore's zone
    assert (built[2].shard_id, built[2].partition_key, built[2].data) == ("s0", "k0", b"d90")
    assert records_from_aws("s0", []) == []


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ([aws_record(1), aws_record(3), aws_record(2)], "Records[].SequenceNumber"),
        ([aws_record(4), aws_record(4)], "Records[].SequenceNumber"),  # a repeat
        ([aws_record(1, SequenceNumber="-1")], "SequenceNumber"),
        ([aws_record(1, SequenceNumber="1_0")], "SequenceNumber"),
        ([aws_record(1, SequenceNumber="\u0661")], "SequenceNumber"),  # a digit, not ASCII
        ([aws_record(1, Data="text")], "Records[].Data"),
        ([aws_record(1, PartitionKey=7)], "Records[].PartitionKey"),
        ([aws_record(1, ApproximateArrivalTimestamp=T0.replace(tzinfo=None))], "Records[]."),
        ([{"SequenceNumber": "1", "Data": b"", "PartitionKey": "k"}], "Records[]."),
        ([aws_record(1), "not a record"], "Records[]"),
        ({"Records": []}, "Records"),
    ],
)
def test_a_malformed_answer_is_refused_as_a_whole(answer: Any, field: str) -> None:
    with pytest.raises(DecodeError) as caught:
        records_from_aws("s0", answer)
    assert caught.value.field.startswith(field)


def test_records_are_immutable_values() -> None:
    one = record(7)
    with pytest.raises(AttributeError):
        one.sequence_number = 8
    with pytest.raises(AttributeError):
        del one.data
    zone = dt.timezone(dt.timedelta(hours=-5))
    same = StreamRecord("s0", 7, "k", b"x", T0.astimezone(zone))
    assert same == one
    assert hash(same) == hash(one)
    assert len({one, same, record(8)}) == 2
    assert same.arrival.tzinfo is dt.UTC
    assert copy.copy(one) == one
    assert pickle.loads(pickle.dumps(one)) == one  # noqa: S301 - our own bytes, just made
    assert "sequence_number=7" in repr(one)
    with pytest.raises(UsageError):
        StreamRecord("s0", 1, "k", b"", T0.replace(tzinfo=None))
    with pytest.raises(UsageError):
        StreamRecord("s0", -1, "k", b"", T0)
    match one:
        case StreamRecord("s0", 7, "k"):
            pass
        case _:  # pragma: no cover - the match must take the first arm
            pytest.fail("positional match on a record")


# --- against the sandbox -------------------------------------------------------------------

sandboxed = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moto_sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[MotoSandbox]:
    async with kf.sandbox_aws(tmp_path_factory.mktemp("consumer-aws")) as sandbox:
        yield sandbox


@pytest_asyncio.fixture(loop_scope="module")
async def aws(moto_sandbox: MotoSandbox) -> MotoSandbox:
    await moto_sandbox.reset()
    return moto_sandbox


@pytest_asyncio.fixture(loop_scope="module")
async def kinesis(aws: MotoSandbox) -> AsyncIterator[Any]:
    async with kf.aws_client("kinesis", aws.endpoint_url) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def dynamodb(aws: MotoSandbox) -> AsyncIterator[Any]:
    async with kf.aws_client("dynamodb", aws.endpoint_url) as client:
        yield client


@dataclass(frozen=True)
class Seen:
    worker: str
    shard: str
    seq: int
    key: str
    data: bytes
    at: float


@dataclass
class Recorder:
    """Collects what handlers accepted; wakes waiters on every batch (no polling)."""

    seen: list[Seen] = field(default_factory=list)
    batches: list[ShardBatch] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def handler(
        self,
        worker: str = "w1",
        *,
        fail: Callable[[StreamRecord], str | None] | None = None,
        raises: Callable[[StreamRecord], bool] | None = None,
        delay: float = 0.0,
    ) -> Handler:
        """A handler that accepts records in order; ``fail`` names a failing record (partial
        failure), ``raises`` makes the whole batch raise, ``delay`` makes it slow."""

        async def handle(batch: ShardBatch) -> RecordFailure | None:
            self.batches.append(batch)
            if delay:
                await asyncio.sleep(delay)
            try:
                if raises is not None and any(raises(r) for r in batch.records):
                    raise ValueError("poison pill")
                for r in batch.records:
                    reason = fail(r) if fail is not None else None
                    if reason is not None:
                        return RecordFailure(r.sequence_number, reason)
                    self.seen.append(
                        Seen(
                            worker,
                            r.shard_id,
                            r.sequence_number,
                            r.partition_key,
                            r.data,
                            time.monotonic(),
                        )
                    )
                return None
            finally:
                self.changed.set()

        return handle

    def sequences(self, worker: str | None = None) -> list[int]:
        return [s.seq for s in self.seen if worker is None or s.worker == worker]

    async def wait_for(self, expected: set[int], within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while not expected <= set(self.sequences()):
                self.changed.clear()
                await self.changed.wait()


class Ownership:
    """Follows several consumers' owned shards through their change callbacks."""

    def __init__(self) -> None:
        self.owned: dict[str, frozenset[str]] = {}
        self.changed = asyncio.Event()

    def callback(self, worker: str) -> Callable[[frozenset[str]], None]:
        def changed(shards: frozenset[str]) -> None:
            self.owned[worker] = shards
            self.changed.set()

        return changed

    async def wait(
        self, predicate: Callable[[dict[str, frozenset[str]]], bool], within: float
    ) -> float:
        started = time.monotonic()
        async with asyncio.timeout(within):
            while not predicate(self.owned):
                self.changed.clear()
                await self.changed.wait()
        return time.monotonic() - started


def items(count: int, keys: int, prefix: str = "r") -> list[tuple[str, bytes]]:
    return [(f"key-{i % keys}", f"{prefix}-{i}".encode()) for i in range(count)]


def assert_in_order_per_shard(seen: list[Seen]) -> None:
    """First deliveries of each shard come in increasing sequence order."""
    first: dict[int, Seen] = {}
    for s in seen:
        first.setdefault(s.seq, s)
    by_shard: dict[str, list[int]] = {}
    for s in first.values():
        by_shard.setdefault(s.shard, []).append(s.seq)
    for shard, seqs in by_shard.items():
        assert seqs == sorted(seqs), shard


@sandboxed
async def test_consumes_every_record_in_order_and_resumes_from_checkpoints(
    kinesis: Any, tmp_path: Path
) -> None:
    stream = kf.unique_name("basic")
    shards = await kf.create_stream(kinesis, stream, 3)
    first = await kf.put_records(kinesis, stream, items(300, 20))
    recorder = Recorder()
    dead = MemoryDeadLetter()
    async with SqliteLeaseStore(tmp_path / "leases.sqlite3") as store:
        config = fast_config(stream)
        async with StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=recorder.handler(),
            config=config,
            dead_letter=dead,
        ) as consumer:
            await recorder.wait_for(set(first))
            metrics = consumer.metrics()
        assert sorted(recorder.sequences()) == sorted(first)  # each exactly once
        assert_in_order_per_shard(recorder.seen)
        assert sum(m.records for m in metrics.values()) == 300
        assert set(metrics) == set(shards)
        table = await store.list_leases()
        for shard in shards:
            mine = [s.seq for s in recorder.seen if s.shard == shard]
            assert table[shard].checkpoint == max(mine)
            assert table[shard].owner is None  # released on the way out
        assert dead.letters == []

        # A restart resumes after the checkpoints: only new records are handled.
        second = await kf.put_records(kinesis, stream, items(60, 20, prefix="again"))
        again = Recorder()
        async with StreamConsumer(
            kinesis=kinesis, leases=store, handler=again.handler(), config=config, dead_letter=dead
        ):
            await again.wait_for(set(second))
        assert sorted(again.sequences()) == sorted(second)


class ListShardsLog:
    """The real Kinesis client, with every ListShards request kept (to see the pages asked)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.requests: list[dict[str, Any]] = []

    async def list_shards(self, **request: Any) -> Any:
        self.requests.append(request)
        return await self._client.list_shards(**request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@sandboxed
async def test_shard_listing_pages_of_one_find_every_shard(kinesis: Any) -> None:
    stream = kf.unique_name("paged")
    shards = await kf.create_stream(kinesis, stream, 4)
    sent = await kf.put_records(kinesis, stream, items(80, 16))
    recorder = Recorder()
    logged = ListShardsLog(kinesis)
    async with StreamConsumer(
        kinesis=logged,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(),
        config=fast_config(stream, list_shards_page=1),
        dead_letter=MemoryDeadLetter(),
    ) as consumer:
        await recorder.wait_for(set(sent))
        owned = consumer.owned_shards()
    assert owned == set(shards)
    assert sorted(recorder.sequences()) == sorted(sent)
    # One listing is a first page naming the stream, then pages asked by their token alone.
    first, *rest = logged.requests[:4]
    assert first == {"StreamName": stream, "MaxResults": 1}
    assert [set(r) for r in rest] == [{"NextToken", "MaxResults"}] * 3


@sandboxed
async def test_latest_start_reads_only_what_arrives_after(kinesis: Any) -> None:
    stream = kf.unique_name("latest")
    await kf.create_stream(kinesis, stream, 1)
    await kf.put_records(kinesis, stream, items(20, 4, prefix="old"))
    recorder = Recorder()
    ownership = Ownership()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(),
        config=fast_config(stream, start=StartPosition.LATEST),
        dead_letter=MemoryDeadLetter(),
        on_ownership_change=ownership.callback("w1"),
    ):
        await ownership.wait(lambda o: bool(o.get("w1")), within=10)
        # When the reader's LATEST iterator exists is not observable: put probes until one is
        # handled (each probe waits well past a poll), then the records the test counts.
        probes: list[int] = []
        for n in range(20):
            probes += await kf.put_records(kinesis, stream, [("probe", f"probe-{n}".encode())])
            with contextlib.suppress(TimeoutError):
                await recorder.wait_for({probes[-1]}, within=1.0)
                break
        new = await kf.put_records(kinesis, stream, items(10, 4, prefix="new"))
        await recorder.wait_for(set(new))
    handled = recorder.sequences()
    assert not [s for s in recorder.seen if s.data.startswith(b"old")]  # nothing from before
    assert set(new) <= set(handled) <= set(new) | set(probes)


@sandboxed
async def test_at_timestamp_start_skips_what_arrived_before(kinesis: Any) -> None:
    stream = kf.unique_name("timestamp")
    await kf.create_stream(kinesis, stream, 1)
    await kf.put_records(kinesis, stream, items(10, 2, prefix="old"))
    await asyncio.sleep(0.2)  # arrival times have millisecond resolution: leave a clear gap
    since = dt.datetime.now(dt.UTC)
    await asyncio.sleep(0.2)
    new = await kf.put_records(kinesis, stream, items(10, 2, prefix="new"))
    recorder = Recorder()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(),
        config=fast_config(stream, start=StartPosition.AT_TIMESTAMP, start_timestamp=since),
        dead_letter=MemoryDeadLetter(),
    ):
        await recorder.wait_for(set(new))
    assert recorder.sequences() == new


@sandboxed
async def test_split_and_merge_while_records_flow(kinesis: Any) -> None:
    stream = kf.unique_name("reshard")
    shards = await kf.create_stream(kinesis, stream, 2)
    recorder = Recorder()
    put: list[int] = []
    order: dict[str, list[int]] = {}

    async def produce(rounds: int) -> None:
        for n in range(rounds):
            batch = items(20, 10, prefix=f"p{n}")
            sequences = await kf.put_records(kinesis, stream, batch)
            put.extend(sequences)
            for (key, _), seq in zip(batch, sequences, strict=True):
                order.setdefault(key, []).append(seq)
            await asyncio.sleep(0.03)

    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(),
        config=fast_config(stream, batch_limit=25),
        dead_letter=MemoryDeadLetter(),
    ) as consumer:
        await produce(10)
        listing = await kinesis.list_shards(StreamName=stream)
        first = next(s for s in listing["Shards"] if s["ShardId"] == shards[0])
        low = int(first["HashKeyRange"]["StartingHashKey"])
        high = int(first["HashKeyRange"]["EndingHashKey"])
        await kinesis.split_shard(
            StreamName=stream, ShardToSplit=shards[0], NewStartingHashKey=str((low + high) // 2)
        )
        consumer.discover_now()
        await produce(10)
        listing = await kinesis.list_shards(StreamName=stream)
        children = sorted(
            s["ShardId"] for s in listing["Shards"] if s.get("ParentShardId") == shards[0]
        )
        # the upper child is adjacent to the second original shard: merge them
        await kinesis.merge_shards(
            StreamName=stream, ShardToMerge=children[1], AdjacentShardToMerge=shards[1]
        )
        await produce(10)
        await recorder.wait_for(set(put), within=30)
        metrics = consumer.metrics()

    assert set(recorder.sequences()) == set(put)  # none skipped
    first_seen: list[int] = []
    known: set[int] = set()
    for seq in recorder.sequences():
        if seq not in known:
            known.add(seq)
            first_seen.append(seq)
    position = {seq: i for i, seq in enumerate(first_seen)}
    for key, sequences in order.items():
        # parents before children: each key's records handled in the order they were put
        handled = sorted(sequences, key=position.__getitem__)
        assert handled == sequences, key
    finished = {sid for sid, m in metrics.items() if m.finished}
    assert finished == {shards[0], shards[1], children[1]}


@sandboxed
async def test_throttling_loses_nothing_and_consumption_continues(
    kinesis: Any, aws: MotoSandbox
) -> None:
    stream = kf.unique_name("throttled")
    await kf.create_stream(kinesis, stream, 2)
    # One call per second per shard: our pace of five is throttled whenever data is waiting.
    await aws.configure(kinesis_throttling=True, get_records_per_second=1)
    put = await kf.put_records(kinesis, stream, items(120, 12))
    recorder = Recorder()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(),
        config=fast_config(stream, batch_limit=25),
        dead_letter=MemoryDeadLetter(),
    ) as consumer:
        await recorder.wait_for(set(put), within=40)
        metrics = consumer.metrics()
    assert sorted(recorder.sequences()) == sorted(put)
    assert_in_order_per_shard(recorder.seen)
    assert sum(m.throttles for m in metrics.values()) > 0


@sandboxed
async def test_expired_iterators_are_replaced_from_the_checkpoint(
    kinesis: Any, aws: MotoSandbox
) -> None:
    stream = kf.unique_name("expiry")
    await kf.create_stream(kinesis, stream, 2)
    await aws.configure(iterator_lifetime=0.4)
    put = await kf.put_records(kinesis, stream, items(160, 12))
    recorder = Recorder()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        # slower than the iterator lifetime: the next iterator has expired when it is used
        # (from the third batch of a shard on: the first reads ahead come sooner)
        handler=recorder.handler(delay=0.5),
        config=fast_config(stream, batch_limit=16),
        dead_letter=MemoryDeadLetter(),
    ) as consumer:
        await recorder.wait_for(set(put), within=40)
        metrics = consumer.metrics()
    assert sorted(recorder.sequences()) == sorted(put)  # nothing lost, nothing repeated
    assert_in_order_per_shard(recorder.seen)
    assert sum(m.iterator_refreshes for m in metrics.values()) >= 4


@sandboxed
async def test_a_poison_record_is_retried_then_dead_lettered_and_the_shard_moves_on(
    kinesis: Any, tmp_path: Path
) -> None:
    stream = kf.unique_name("poison")
    await kf.create_stream(kinesis, stream, 1)
    batch = items(60, 5)
    batch[37] = ("key-poison", b"poison")
    put = await kf.put_records(kinesis, stream, batch)
    poison = put[37]
    recorder = Recorder()
    sink = JsonLinesDeadLetter(tmp_path / "dead.jsonl")
    store = MemoryLeaseStore()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=store,
        handler=recorder.handler(raises=lambda r: r.data == b"poison"),
        config=fast_config(stream, retry_attempts=3),
        dead_letter=sink,
    ) as consumer:
        await recorder.wait_for(set(put) - {poison})
        await asyncio.sleep(0.3)  # the checkpoint follows the handler
        metrics = consumer.metrics()
    lines = (tmp_path / "dead.jsonl").read_text().splitlines()
    assert len(lines) == 1
    letter = json.loads(lines[0])
    assert letter["sequence_number"] == str(poison)
    assert letter["attempts"] == 3
    assert "retry budget spent" in letter["reason"]
    assert "ValueError: poison pill" in letter["reason"]
    assert letter["data_base64"] == "cG9pc29u"
    assert (tmp_path / "dead.jsonl").stat().st_mode & 0o777 == 0o600
    assert poison not in recorder.sequences()
    assert set(recorder.sequences()) == set(put) - {poison}  # never a silent skip
    (only,) = metrics.values()
    assert only.dead_lettered == 1
    assert store.rows[only.shard_id].checkpoint == put[-1]  # moved past the poison
    # bisection finds the poison in a few calls, not one call per record
    assert len(recorder.batches) <= 16


def test_dead_letter_validates_and_serialises() -> None:
    letter = DeadLetter("s", "s0", 2**100, "k", b"\x00\xff", T0, 3, "why", T0)
    line = json.loads(letter.to_json())
    assert line["sequence_number"] == str(2**100)
    assert line["data_base64"] == "AP8="
    with pytest.raises(UsageError):
        DeadLetter("s", "s0", 1, "k", b"", T0.replace(tzinfo=None), 1, "why", T0)


@sandboxed
async def test_a_named_record_failure_is_retried_without_repeating_its_predecessors(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("partial")
    await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(30, 3))
    flaky = put[12]
    failures = {flaky: 2}

    def fail(r: StreamRecord) -> str | None:
        if failures.get(r.sequence_number, 0) > 0:
            failures[r.sequence_number] -= 1
            return "AirVantage busy"
        return None

    recorder = Recorder()
    dead = MemoryDeadLetter()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(fail=fail),
        config=fast_config(stream, retry_attempts=3),
        dead_letter=dead,
    ):
        await recorder.wait_for(set(put))
    assert recorder.sequences() == put  # each once, in order
    assert dead.letters == []


@sandboxed
async def test_a_failing_record_past_its_maximum_age_is_dead_lettered_at_once(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("aged")
    await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(5, 1))
    recorder = Recorder()
    dead = MemoryDeadLetter()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=MemoryLeaseStore(),
        handler=recorder.handler(fail=lambda r: "broken" if r.sequence_number == put[2] else None),
        config=fast_config(stream, retry_attempts=10, max_record_age=60),
        dead_letter=dead,
        clock=lambda: time.time() + 3600,  # every record is an hour old
    ):
        await recorder.wait_for(set(put) - {put[2]})
    (letter,) = dead.letters
    assert (letter.sequence_number, letter.attempts) == (put[2], 1)
    assert letter.reason.startswith("older than max_record_age")


class Partitionable(LeaseStore):
    """A real lease store that can be cut off, as a crashed or partitioned worker is."""

    def __init__(self, inner: LeaseStore) -> None:
        self.inner = inner
        self.cut = False

    def _check(self, operation: str) -> None:
        if self.cut:
            raise AwsTransportError(operation, "partitioned by the test")

    async def list_leases(self) -> dict[str, Lease]:
        self._check("Scan")
        return await self.inner.list_leases()

    async def acquire(self, shard_id: str, **kwargs: Any) -> Lease:  # type: ignore[override]
        self._check("PutItem")
        return await self.inner.acquire(shard_id, **kwargs)

    async def renew(self, shard_id: str, **kwargs: Any) -> Lease:  # type: ignore[override]
        self._check("UpdateItem")
        return await self.inner.renew(shard_id, **kwargs)

    async def checkpoint(self, shard_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self._check("UpdateItem")
        await self.inner.checkpoint(shard_id, **kwargs)

    async def get_checkpoint(self, shard_id: str) -> int | None:
        self._check("GetItem")
        return await self.inner.get_checkpoint(shard_id)

    async def mark_finished(self, shard_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self._check("UpdateItem")
        await self.inner.mark_finished(shard_id, **kwargs)

    async def release(self, shard_id: str, **kwargs: Any) -> None:  # type: ignore[override]
        self._check("UpdateItem")
        await self.inner.release(shard_id, **kwargs)

    async def delete_finished(self, shard_id: str) -> bool:
        self._check("DeleteItem")
        return await self.inner.delete_finished(shard_id)


@sandboxed
async def test_a_lease_store_outage_stalls_the_shard_then_it_resumes_without_loss(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("outage")
    await kf.create_stream(kinesis, stream, 1)
    store = Partitionable(MemoryLeaseStore())
    recorder = Recorder()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=store,
        handler=recorder.handler(),
        config=fast_config(stream, lease_duration=5.0),
        dead_letter=MemoryDeadLetter(),
    ) as consumer:
        first = await kf.put_records(kinesis, stream, items(20, 4))
        await recorder.wait_for(set(first))
        store.cut = True
        second = await kf.put_records(kinesis, stream, items(20, 4, prefix="during"))
        await recorder.wait_for({second[0]})  # handled, but its checkpoint cannot be written
        await asyncio.sleep(1.0)
        store.cut = False
        third = await kf.put_records(kinesis, stream, items(20, 4, prefix="after"))
        await recorder.wait_for(set(second) | set(third))
        metrics = consumer.metrics()
    assert sorted(recorder.sequences()) == sorted(first + second + third)
    (only,) = metrics.values()
    assert only.errors > 0
    row = (await store.inner.list_leases())[only.shard_id]
    assert row.checkpoint == third[-1]


@sandboxed
async def test_a_hung_handler_is_cancelled_after_the_drain_timeout_and_its_lease_released(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("hung")
    await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(10, 2))
    store = MemoryLeaseStore()
    entered = asyncio.Event()

    async def hang(batch: ShardBatch) -> RecordFailure | None:
        entered.set()
        await asyncio.Event().wait()
        return None

    async with StreamConsumer(
        kinesis=kinesis,
        leases=store,
        handler=hang,
        config=fast_config(stream, drain_timeout=0.5),
        dead_letter=MemoryDeadLetter(),
    ):
        async with asyncio.timeout(10):
            await entered.wait()
        leaving = time.monotonic()
    assert 0.5 <= time.monotonic() - leaving < 5.0  # the drain timeout ends it, not the hang
    (row,) = store.rows.values()
    assert row.owner is None  # released: another worker may start at once
    assert row.checkpoint is None  # nothing was handled, so nothing was checkpointed
    assert put


@pytest.fixture
def balanced() -> Callable[[dict[str, frozenset[str]]], bool]:
    def check(owned: dict[str, frozenset[str]]) -> bool:
        a, b = owned.get("a", frozenset()), owned.get("b", frozenset())
        return len(a) == 2 and len(b) == 2 and not a & b

    return check


@sandboxed
async def test_two_consumers_share_the_lease_table_and_one_takes_over_after_a_crash(
    kinesis: Any, dynamodb: Any, balanced: Callable[[dict[str, frozenset[str]]], bool]
) -> None:
    stream = kf.unique_name("pair")
    shards = await kf.create_stream(kinesis, stream, 4)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    dynamo = DynamoLeaseStore(dynamodb, table)
    store_a = Partitionable(dynamo)
    recorder = Recorder()
    ownership = Ownership()
    lease_duration = 2.0

    def consumer(worker: str, store: LeaseStore) -> StreamConsumer:
        return StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=recorder.handler(worker),
            config=fast_config(stream, worker, lease_duration=lease_duration),
            dead_letter=MemoryDeadLetter(),
            on_ownership_change=ownership.callback(worker),
        )

    async with consumer("b", dynamo), consumer("a", store_a):
        await ownership.wait(balanced, within=15)
        put = await kf.put_records(kinesis, stream, items(200, 16))
        await recorder.wait_for(set(put))
        a_shards = ownership.owned["a"]
        # Exclusive ownership in the table too.
        rows = await dynamo.list_leases()
        assert {sid for sid, r in rows.items() if r.owner == "a"} == a_shards
        assert {sid for sid, r in rows.items() if r.owner == "b"} == set(shards) - a_shards
        # "a" dies: it can no longer reach the lease table (nor release anything).
        store_a.cut = True
        checkpoints = {sid: rows[sid].checkpoint for sid in a_shards}
        more = await kf.put_records(kinesis, stream, items(100, 16, prefix="late"))
        took = await ownership.wait(lambda o: len(o.get("b", ())) == 4, within=15)
        await recorder.wait_for(set(more))
        assert ownership.owned["a"] == frozenset()  # "a" stopped reading once its leases lapsed
    # "b" took over within the lease expiry (plus a discovery round and a renewal period)
    assert took < lease_duration + 0.3 + 0.5 + 1.5
    assert set(recorder.sequences()) == set(put) | set(more)
    by_b = [s for s in recorder.seen if s.worker == "b" and s.shard in a_shards]
    for shard, checkpoint in checkpoints.items():
        taken = [s.seq for s in by_b if s.shard == shard]
        # "b" resumed right after "a"'s last checkpoint: what repeats is only what came after
        assert checkpoint is None or min(taken, default=checkpoint + 1) > checkpoint
    repeated = {s.seq for s in recorder.seen if s.worker == "a"} & {s.seq for s in by_b}
    last = {s.seq: s.shard for s in recorder.seen}
    for seq in repeated:
        checkpoint = checkpoints[last[seq]]
        assert checkpoint is None or seq > checkpoint


@sandboxed
async def test_graceful_hand_off_repeats_nothing(
    kinesis: Any, dynamodb: Any, balanced: Callable[[dict[str, frozenset[str]]], bool]
) -> None:
    stream = kf.unique_name("handoff")
    await kf.create_stream(kinesis, stream, 4)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    store = DynamoLeaseStore(dynamodb, table)
    recorder = Recorder()
    ownership = Ownership()
    lease_duration = 5.0

    def consumer(worker: str) -> StreamConsumer:
        return StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=recorder.handler(worker),
            config=fast_config(stream, worker, lease_duration=lease_duration, renew_interval=1.0),
            dead_letter=MemoryDeadLetter(),
            on_ownership_change=ownership.callback(worker),
        )

    put: list[int] = []
    async with consumer("b"):
        async with consumer("a"):
            await ownership.wait(balanced, within=15)
            put += await kf.put_records(kinesis, stream, items(200, 16))
            await recorder.wait_for(set(put))
            put += await kf.put_records(kinesis, stream, items(100, 16, prefix="mid"))
        # "a" left the block (SIGTERM in production): it checkpointed and released its leases
        took = await ownership.wait(lambda o: len(o.get("b", ())) == 4, within=10)
        put += await kf.put_records(kinesis, stream, items(100, 16, prefix="after"))
        await recorder.wait_for(set(put))
    assert took < lease_duration  # released leases are taken at once, not after expiry
    assert sorted(recorder.sequences()) == sorted(put)  # every record exactly once


class RenewalLog(Partitionable):
    """A cuttable store that notes when each successful renewal of a shard was sent."""

    def __init__(self, inner: LeaseStore) -> None:
        super().__init__(inner)
        self.renewal_sent: dict[str, float] = {}

    async def renew(self, shard_id: str, **kwargs: Any) -> Lease:
        sent = time.monotonic()
        lease = await super().renew(shard_id, **kwargs)
        self.renewal_sent[shard_id] = sent
        return lease


class Gains:
    """When each worker gained each shard (monotonic time), from the ownership callbacks."""

    def __init__(self, ownership: Ownership) -> None:
        self.ownership = ownership
        self.events: list[tuple[float, str, str]] = []  # (when, worker, shard)

    def callback(self, worker: str) -> Callable[[frozenset[str]], None]:
        inner = self.ownership.callback(worker)
        held: set[str] = set()

        def changed(shards: frozenset[str]) -> None:
            now = time.monotonic()
            self.events += [(now, worker, sid) for sid in sorted(shards - held)]
            held.clear()
            held.update(shards)
            inner(shards)

        return changed

    def since(self, moment: float) -> list[tuple[str, str]]:
        return [(worker, sid) for when, worker, sid in self.events if when >= moment]


@pytest.mark.slow
@sandboxed
async def test_wall_clocks_two_hours_apart_neither_steal_nor_delay_a_takeover(
    kinesis: Any, dynamodb: Any, balanced: Callable[[dict[str, frozenset[str]]], bool]
) -> None:
    stream = kf.unique_name("skew")
    await kf.create_stream(kinesis, stream, 4)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    dynamo = DynamoLeaseStore(dynamodb, table)
    store_a = RenewalLog(dynamo)
    recorder, ownership = Recorder(), Ownership()
    gains = Gains(ownership)
    lease_duration, renew_interval, discovery = 2.0, 0.5, 0.3

    def consumer(worker: str, store: LeaseStore, skew: float) -> StreamConsumer:
        return StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=recorder.handler(worker),
            config=fast_config(
                stream,
                worker,
                lease_duration=lease_duration,
                renew_interval=renew_interval,
                discovery_interval=discovery,
            ),
            dead_letter=MemoryDeadLetter(),
            on_ownership_change=gains.callback(worker),
            # Far more than a lease duration apart: to each, the other's wall clock is absurd.
            clock=lambda: time.time() + skew,
        )

    async with consumer("a", store_a, -3600.0):
        await ownership.wait(lambda o: len(o.get("a", ())) == 4, within=15)
        async with consumer("b", dynamo, +3600.0):
            await ownership.wait(balanced, within=15)
            settled = time.monotonic()
            put = await kf.put_records(kinesis, stream, items(200, 16))
            await recorder.wait_for(set(put))
            # b took exactly the two leases balance needs (one steal per round), nothing else.
            assert [w for w, _ in gains.since(0.0)] == ["a"] * 4 + ["b"] * 2
            # Three lease durations later nobody has taken anything from anybody.
            await asyncio.sleep(3 * lease_duration)
            assert gains.since(settled) == []
            assert balanced(ownership.owned)
            a_shards = ownership.owned["a"]
            rows = await dynamo.list_leases()
            checkpoints = {sid: rows[sid].checkpoint for sid in a_shards}
            # "a" stops renewing: its counters stand still from here on.
            store_a.cut = True
            cut = time.monotonic()
            more = await kf.put_records(kinesis, stream, items(100, 16, prefix="late"))
            await ownership.wait(lambda o: len(o.get("b", ())) == 4, within=15)
            await recorder.wait_for(set(more))
            taken = {sid: when for when, worker, sid in gains.events if when >= cut}
            assert ownership.owned["a"] == frozenset()
    assert set(taken) == set(a_shards)
    for sid, when in taken.items():
        # No sooner than a lease duration after a's last counter bump was sent (b cannot
        # have seen that counter earlier), and not much later: a discovery round and the
        # time to see the counter stand still.
        quiet = when - store_a.renewal_sent[sid]
        assert lease_duration <= quiet < lease_duration + discovery + renew_interval + 1.5, sid
    assert set(recorder.sequences()) == set(put) | set(more)
    for seq in {s.seq for s in recorder.seen if s.worker == "b" and s.shard in a_shards}:
        shard_of = {s.seq: s.shard for s in recorder.seen}
        checkpoint = checkpoints[shard_of[seq]]
        assert checkpoint is None or seq > checkpoint  # b resumed after a's checkpoints


async def wait_rows(
    store: LeaseStore, predicate: Callable[[dict[str, Lease]], bool], within: float
) -> dict[str, Lease]:
    """The lease table once ``predicate`` holds (read every 0.1 s: a table has no events)."""
    for _ in range(math.ceil(within / 0.1)):
        rows = await store.list_leases()
        if predicate(rows):
            return rows
        await asyncio.sleep(0.1)
    raise AssertionError(f"lease table never as expected: {sorted(rows)}")


@pytest.mark.slow
@sandboxed
async def test_a_reshard_deletes_parent_rows_once_children_started_and_nothing_is_reread(
    kinesis: Any, dynamodb: Any
) -> None:
    stream = kf.unique_name("cleanup")
    shards = await kf.create_stream(kinesis, stream, 2)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    store = DynamoLeaseStore(dynamodb, table)
    recorder = Recorder()
    put: list[int] = []
    order: dict[str, list[int]] = {}

    async def produce(rounds: int) -> None:
        for n in range(rounds):
            # Many keys: every child of the split receives some, so every child checkpoints.
            batch = items(40, 40, prefix=f"p{n}")
            sequences = await kf.put_records(kinesis, stream, batch)
            put.extend(sequences)
            for (key, _), seq in zip(batch, sequences, strict=True):
                order.setdefault(key, []).append(seq)
            await asyncio.sleep(0.03)

    def consumer(worker: str) -> StreamConsumer:
        return StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=recorder.handler(worker),
            config=fast_config(stream, worker, batch_limit=25),
            dead_letter=MemoryDeadLetter(),
        )

    with structlog.testing.capture_logs() as events:
        async with consumer("a") as a, consumer("b") as b:
            await produce(5)
            listing = await kinesis.list_shards(StreamName=stream)
            first = next(s for s in listing["Shards"] if s["ShardId"] == shards[0])
            low = int(first["HashKeyRange"]["StartingHashKey"])
            high = int(first["HashKeyRange"]["EndingHashKey"])
            await kinesis.split_shard(
                StreamName=stream,
                ShardToSplit=shards[0],
                NewStartingHashKey=str((low + high) // 2),
            )
            a.discover_now()
            b.discover_now()
            await produce(5)
            listing = await kinesis.list_shards(StreamName=stream)
            children = sorted(
                s["ShardId"] for s in listing["Shards"] if s.get("ParentShardId") == shards[0]
            )
            # The split's parent goes once both children have checkpoints; the children stay.
            rows = await wait_rows(store, lambda r: shards[0] not in r, within=15)
            assert set(children) <= set(rows)
            await kinesis.merge_shards(
                StreamName=stream, ShardToMerge=children[1], AdjacentShardToMerge=shards[1]
            )
            await produce(5)
            listing = await kinesis.list_shards(StreamName=stream)
            (merged,) = (
                s["ShardId"]
                for s in listing["Shards"]
                if s.get("AdjacentParentShardId") or s.get("ParentShardId") == children[1]
            )
            await recorder.wait_for(set(put), within=30)
            # Both merge parents go once the merged child has a checkpoint.
            rows = await wait_rows(store, lambda r: set(r) == {children[0], merged}, within=15)
            # Rounds later the deleted rows stay deleted: no shard is taken up again.
            await asyncio.sleep(1.0)
            assert set(await store.list_leases()) == {children[0], merged}

    assert rows[merged].checkpoint is not None
    assert set(recorder.sequences()) == set(put)  # none skipped
    first_seen: dict[int, int] = {}
    for seq in recorder.sequences():
        first_seen.setdefault(seq, len(first_seen))
    for key, sequences in order.items():
        # parents before children: each key's records handled in the order they were put
        assert sorted(sequences, key=first_seen.__getitem__) == sequences, key
    # Each parent row deleted exactly once, though both workers clean up (conditional deletes).
    deleted = sorted(e["shard"] for e in events if e["event"] == "consumer.lease_deleted")
    assert deleted == sorted([shards[0], shards[1], children[1]])
    # No shard was started from its beginning twice.
    fresh = [
        e["shard"]
        for e in events
        if e["event"] == "consumer.lease_taken" and e["checkpoint"] is None
    ]
    assert len(fresh) == len(set(fresh))


@sandboxed
async def test_an_owner_that_cannot_renew_stops_reading_by_its_own_monotonic_clock(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("deadline")
    await kf.create_stream(kinesis, stream, 1)
    store = Partitionable(MemoryLeaseStore())
    ownership = Ownership()
    skip = [0.0]  # seconds the injected monotonic clock has jumped ahead
    recorder = Recorder()
    async with StreamConsumer(
        kinesis=kinesis,
        leases=store,
        handler=recorder.handler(),
        config=fast_config(stream, lease_duration=30.0, renew_interval=0.3),
        dead_letter=MemoryDeadLetter(),
        on_ownership_change=ownership.callback("w1"),
        monotonic=lambda: time.monotonic() + skip[0],
    ):
        await ownership.wait(lambda o: len(o.get("w1", ())) == 1, within=10)
        store.cut = True
        await asyncio.sleep(1.0)  # renewals fail, but the lease is young: keep reading
        assert len(ownership.owned["w1"]) == 1
        # 29 s pass on the owner's clock: less than a renewal period is left before another
        # worker, which saw the last counter no earlier than it was sent, may take the lease.
        skip[0] = 29.0
        stopped = await ownership.wait(lambda o: not o.get("w1"), within=5)
    assert stopped < 1.0  # at the next renewal attempt, not 30 s of wall time later


class TrimmedListing:
    """The real Kinesis client, whose listings leave out the shards in ``trimmed``, as AWS's
    do once a closed shard's records are older than the stream's retention (no sandbox knob
    ages a shard out)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.trimmed: set[str] = set()

    async def list_shards(self, **request: Any) -> Any:
        answer = await self._client.list_shards(**request)
        shards = [s for s in answer["Shards"] if s["ShardId"] not in self.trimmed]
        return answer | {"Shards": shards}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@sandboxed
async def test_a_finished_row_is_deleted_once_its_shard_ages_out_of_the_listing(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("trimmed")
    (parent,) = await kf.create_stream(kinesis, stream, 1)
    before = await kf.put_records(kinesis, stream, items(20, 4))
    listing = await kinesis.list_shards(StreamName=stream)
    high = int(listing["Shards"][0]["HashKeyRange"]["EndingHashKey"])
    await kinesis.split_shard(
        StreamName=stream, ShardToSplit=parent, NewStartingHashKey=str(high // 2)
    )
    store = MemoryLeaseStore()
    recorder = Recorder()
    trimming = TrimmedListing(kinesis)
    ownership = Ownership()
    async with StreamConsumer(
        kinesis=trimming,
        leases=store,
        handler=recorder.handler(),
        config=fast_config(stream),
        dead_letter=MemoryDeadLetter(),
        on_ownership_change=ownership.callback("w1"),
    ) as consumer:
        await recorder.wait_for(set(before))
        # The parent is read to its end; its children start, but receive nothing, so they
        # have no checkpoint, and the parent's row must stay to order them.
        await ownership.wait(lambda o: len(o.get("w1", ())) == 2, within=10)
        await asyncio.sleep(1.0)  # a few discovery rounds
        assert store.rows[parent].finished
        trimming.trimmed.add(parent)
        consumer.discover_now()
        await wait_rows(store, lambda rows: parent not in rows, within=5)
        # The children go on: what arrives now is read.
        after = await kf.put_records(kinesis, stream, items(20, 4, prefix="after"))
        await recorder.wait_for(set(after))
    assert sorted(recorder.sequences()) == sorted(before + after)
    assert parent not in store.rows


@pytest.fixture
def memory_store() -> MemoryLeaseStore:
    return MemoryLeaseStore()


@sandboxed
async def test_a_missing_stream_ends_the_consumer(
    kinesis: Any, memory_store: MemoryLeaseStore
) -> None:
    recorder = Recorder()
    with pytest.raises(ExceptionGroup) as caught:
        async with StreamConsumer(
            kinesis=kinesis,
            leases=memory_store,
            handler=recorder.handler(),
            config=fast_config(kf.unique_name("absent")),
            dead_letter=MemoryDeadLetter(),
        ):
            await asyncio.Event().wait()
    (error,) = caught.value.exceptions
    assert type(error).__name__ == "ResourceNotFoundError"


# --- reading ahead: the next GetRecords call while the handler works ------------------------


@dataclass
class Span:
    started: float
    ended: float | None = None


class KinesisLog:
    """The real Kinesis client, with GetRecords calls timed and GetShardIterator requests kept;
    calls after the first ``hold_after`` wait at ``gate`` (a slow call, held open by the test)."""

    def __init__(self, client: Any, *, hold_after: int | None = None) -> None:
        self._client = client
        self.hold_after = hold_after
        self.gate = asyncio.Event()
        self.held = asyncio.Event()
        self.calls: list[Span] = []
        self.cancelled = 0
        self.answered = asyncio.Event()
        self.iterator_requests: list[dict[str, Any]] = []

    async def get_records(self, **request: Any) -> Any:
        span = Span(time.monotonic())
        self.calls.append(span)
        try:
            if self.hold_after is not None and len(self.calls) > self.hold_after:
                self.held.set()
                await self.gate.wait()
            answer = await self._client.get_records(**request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        span.ended = time.monotonic()
        self.answered.set()
        return answer

    async def get_shard_iterator(self, **request: Any) -> Any:
        self.iterator_requests.append(request)
        return await self._client.get_shard_iterator(**request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def wait_answers(self, count: int, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while sum(c.ended is not None for c in self.calls) < count:
                self.answered.clear()
                await self.answered.wait()


def fetch_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("kinesis-fetch-")]


@sandboxed
async def test_a_failing_batch_drops_the_batch_read_ahead_and_rereads_from_its_checkpoint(
    kinesis: Any,
) -> None:
    stream = kf.unique_name("ahead-fail")
    (shard,) = await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(60, 6))
    poison = put[5]  # in the first batch of 20
    failures_left = [2]

    def raises(r: StreamRecord) -> bool:
        if r.sequence_number == poison and failures_left[0] > 0:
            failures_left[0] -= 1
            return True
        return False

    recorder = Recorder()
    inner = recorder.handler(raises=raises)
    handling: list[Span] = []

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        span = Span(time.monotonic())
        handling.append(span)
        if len(handling) == 1:
            await asyncio.sleep(0.5)  # long enough for the next batch to be read meanwhile
        try:
            return await inner(batch)
        finally:
            span.ended = time.monotonic()

    logged = KinesisLog(kinesis)
    store = MemoryLeaseStore()
    dead = MemoryDeadLetter()
    async with StreamConsumer(
        kinesis=logged,
        leases=store,
        handler=handle,
        config=fast_config(stream, batch_limit=20, retry_attempts=5),
        dead_letter=dead,
    ):
        await recorder.wait_for(set(put))
    assert recorder.sequences() == put  # nothing skipped, nothing repeated, in order
    assert dead.letters == []
    assert store.rows[shard].checkpoint == put[-1]
    # The second call went out while the handler still held the first batch...
    first = handling[0]
    assert first.ended is not None
    assert first.started < logged.calls[1].started < first.ended
    # ...and its batch was dropped after the failures: the reader went back to the checkpoint.
    rereads = [
        r for r in logged.iterator_requests if r.get("ShardIteratorType") == "AFTER_SEQUENCE_NUMBER"
    ]
    assert [r["StartingSequenceNumber"] for r in rereads] == [str(put[19])]
    # Calls stay paced to the interval, reads ahead included.
    starts = [c.started for c in logged.calls]
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.2


@sandboxed
async def test_reading_ahead_overlaps_the_handler_and_keeps_the_pace(kinesis: Any) -> None:
    stream = kf.unique_name("ahead")
    (shard,) = await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(100, 10))
    recorder = Recorder()
    inner = recorder.handler(delay=0.3)
    handling: list[Span] = []

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        span = Span(time.monotonic())
        handling.append(span)
        try:
            return await inner(batch)
        finally:
            span.ended = time.monotonic()

    logged = KinesisLog(kinesis)
    store = MemoryLeaseStore()
    async with StreamConsumer(
        kinesis=logged,
        leases=store,
        handler=handle,
        config=fast_config(stream, batch_limit=20),
        dead_letter=MemoryDeadLetter(),
    ):
        await recorder.wait_for(set(put))
    assert recorder.sequences() == put
    assert store.rows[shard].checkpoint == put[-1]
    assert len(handling) == 5
    starts = [c.started for c in logged.calls]
    for span in handling:
        # while the handler holds a batch, the call reading the next one goes out
        assert span.ended is not None
        assert any(span.started < start < span.ended for start in starts)
    # Still 5 calls/s at most, with a margin (calls exactly 0.2 s apart can reach AWS as six
    # in one second): 0.21 s apart, less a few milliseconds between pacing and this log.
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.205
    # Only the reader's first iterator: nothing was dropped or read again.
    assert [r["ShardIteratorType"] for r in logged.iterator_requests] == ["TRIM_HORIZON"]


@pytest.mark.parametrize("ahead", ["in_flight", "answered", "reader_cancelled"])
@sandboxed
async def test_stopping_with_a_read_ahead_loses_nothing_and_checkpoints_what_was_handled(
    kinesis: Any, ahead: str
) -> None:
    stream = kf.unique_name("ahead-stop")
    (shard,) = await kf.create_stream(kinesis, stream, 1)
    put = await kf.put_records(kinesis, stream, items(40, 4))
    store = MemoryLeaseStore()
    config = fast_config(stream, batch_limit=20)
    recorder = Recorder()
    inner = recorder.handler()
    entered, release = asyncio.Event(), asyncio.Event()

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        entered.set()
        await release.wait()
        return await inner(batch)

    async def reader(kinesis: Any, handler: Handler, stop: asyncio.Event) -> ShardOutcome:
        lease = await store.acquire(
            shard,
            owner="w1",
            expected_counter=store.rows[shard].counter if shard in store.rows else None,
        )
        consumer = ShardConsumer(
            kinesis=kinesis,
            leases=store,
            handler=handler,
            dead_letter=MemoryDeadLetter(),
            config=config,
            lease=lease,
        )
        return await consumer.run(stop)

    logged = KinesisLog(kinesis, hold_after=1 if ahead != "answered" else None)
    stop = asyncio.Event()
    task = asyncio.create_task(reader(logged, handle, stop), name="test-reader")
    async with asyncio.timeout(10):
        await entered.wait()  # the first batch is with the handler...
        if ahead == "answered":
            await logged.wait_answers(2)  # ...and the second has been read
        else:
            await logged.held.wait()  # ...and the call reading the second is in flight
    if ahead == "reader_cancelled":
        task.cancel("drain timeout")  # the owner gave up waiting for the handler
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task
        expected_checkpoint = None
        handled: list[int] = []
    else:
        stop.set()
        release.set()
        async with asyncio.timeout(10):
            assert await task is ShardOutcome.STOPPED
        expected_checkpoint = put[19]
        handled = put[:20]
    assert recorder.sequences() == handled  # the batch read ahead was not handled...
    assert store.rows[shard].checkpoint == expected_checkpoint  # ...nor checkpointed
    assert fetch_tasks() == []  # nothing of the reader outlives it
    if ahead != "answered":
        assert logged.cancelled == 1

    # The next owner starts from the checkpoint: every record exactly once overall.
    release.set()
    logged.gate.set()
    store.rows[shard] = dataclasses.replace(store.rows[shard], owner=None)
    stop = asyncio.Event()
    task = asyncio.create_task(reader(kinesis, inner, stop), name="test-next-owner")
    await recorder.wait_for(set(put))
    stop.set()
    async with asyncio.timeout(10):
        assert await task is ShardOutcome.STOPPED
    assert recorder.sequences() == put
    assert store.rows[shard].checkpoint == put[-1]


class OutOfOrderKinesis:
    """A stand-in for Kinesis answering one GetRecords out of order, across two of the chunks
    the reader builds records in: no real peer answers so, which is the point."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def get_shard_iterator(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        return {"ShardIterator": "iterator-1"}

    async def get_records(self, **request: Any) -> dict[str, Any]:
        self.requests.append(request)
        sequences = list(range(1, 1201))
        sequences[500] = 3  # chunk two (records 500-999) starts below chunk one
        return {
            "Records": [aws_record(seq) for seq in sequences],
            "NextShardIterator": f"iterator-{len(self.requests)}",
            "MillisBehindLatest": 0,
        }


async def test_an_answer_out_of_order_across_build_chunks_is_refused_and_nothing_handled() -> None:
    store = MemoryLeaseStore()
    lease = await store.acquire("s0", owner="w1", expected_counter=None)
    handled: list[ShardBatch] = []

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        handled.append(batch)
        return None

    kinesis = OutOfOrderKinesis()
    consumer = ShardConsumer(
        kinesis=kinesis,
        leases=store,
        handler=handle,
        dead_letter=MemoryDeadLetter(),
        config=fast_config("s"),
        lease=lease,
    )
    with pytest.raises(DecodeError) as caught:
        async with asyncio.timeout(10):
            await consumer.run(asyncio.Event())
    assert caught.value.field == "Records[].SequenceNumber"
    assert handled == []
    assert store.rows["s0"].checkpoint is None
    assert fetch_tasks() == []  # the call reading ahead was cancelled on the way out
    assert [r.get("ShardIteratorType") for r in kinesis.requests] == ["TRIM_HORIZON", None]


# --- consumers in processes of their own: SIGKILL and SIGTERM ------------------------------

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ChildConsumer:
    """A consumer process (``kinesis_fixtures._consume``) and what it reports on stdout."""

    def __init__(self, worker: str, recorder: Recorder, ownership: Ownership) -> None:
        self.worker = worker
        self.recorder = recorder
        self.ownership = ownership
        self.exited = asyncio.Event()
        self.process: asyncio.subprocess.Process | None = None

    async def run(self, command: list[str], log: Path) -> None:
        """Start the process and follow its reports until its stdout closes."""
        with log.open("ab") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=PROJECT_ROOT
            )
        assert self.process.stdout is not None
        changed = self.ownership.callback(self.worker)
        async for line in self.process.stdout:
            report = json.loads(line)
            if "seq" in report:
                self.recorder.seen.append(
                    Seen(
                        self.worker, report["shard"], int(report["seq"]), "", b"", time.monotonic()
                    )
                )
                self.recorder.changed.set()
            elif "owned" in report:
                changed(frozenset(report["owned"]))
            elif "exited" in report:
                self.exited.set()
        await self.process.wait()
        changed(frozenset())  # a dead process owns nothing

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)


async def start_pair(
    tg: asyncio.TaskGroup,
    aws: MotoSandbox,
    *,
    stream: str,
    table: str,
    tmp_path: Path,
    recorder: Recorder,
    ownership: Ownership,
    lease_duration: float = 2.0,
) -> tuple[ChildConsumer, ChildConsumer]:
    pair = (ChildConsumer("a", recorder, ownership), ChildConsumer("b", recorder, ownership))
    for child in pair:
        command = kf.consumer_command(
            aws.endpoint_url, stream, table, child.worker, lease_duration=lease_duration
        )
        tg.create_task(child.run(command, tmp_path / f"{child.worker}.log"), name=child.worker)
    return pair


@pytest.mark.slow
@sandboxed
async def test_sigkill_a_consumer_process_and_the_other_takes_over_from_its_checkpoints(
    aws: MotoSandbox,
    kinesis: Any,
    dynamodb: Any,
    tmp_path: Path,
    balanced: Callable[[dict[str, frozenset[str]]], bool],
) -> None:
    stream = kf.unique_name("killed")
    await kf.create_stream(kinesis, stream, 4)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    store = DynamoLeaseStore(dynamodb, table)
    recorder, ownership = Recorder(), Ownership()
    async with asyncio.TaskGroup() as tg:
        a, b = await start_pair(
            tg,
            aws,
            stream=stream,
            table=table,
            tmp_path=tmp_path,
            recorder=recorder,
            ownership=ownership,
        )
        await ownership.wait(balanced, within=30)
        put = await kf.put_records(kinesis, stream, items(200, 16))
        await recorder.wait_for(set(put))
        a_shards = ownership.owned["a"]
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        rows = await store.list_leases()
        checkpoints = {sid: rows[sid].checkpoint for sid in a_shards}
        assert all(rows[sid].owner == "a" for sid in a_shards)  # not released: it died
        more = await kf.put_records(kinesis, stream, items(100, 16, prefix="late"))
        await ownership.wait(lambda o: len(o.get("b", ())) == 4, within=15)
        took = time.monotonic() - killed
        await recorder.wait_for(set(more))
        b.signal(signal.SIGTERM)
    # the lease duration is 2 s; add a discovery round, a renewal period and process jitter
    assert took < 2.0 + 0.3 + 0.5 + 1.5
    assert set(recorder.sequences()) == set(put) | set(more)
    shard_of = {s.seq: s.shard for s in recorder.seen}
    by_b = {s.seq for s in recorder.seen if s.worker == "b" and s.shard in a_shards}
    for seq in by_b:
        checkpoint = checkpoints[shard_of[seq]]
        # "b" resumed after "a"'s last checkpoint: only later records can repeat
        assert checkpoint is None or seq > checkpoint


@pytest.mark.slow
@sandboxed
async def test_sigterm_a_consumer_process_hands_off_without_repeats(
    aws: MotoSandbox,
    kinesis: Any,
    dynamodb: Any,
    tmp_path: Path,
    balanced: Callable[[dict[str, frozenset[str]]], bool],
) -> None:
    stream = kf.unique_name("terminated")
    await kf.create_stream(kinesis, stream, 4)
    table = kf.unique_name("leases")
    await create_lease_table(dynamodb, table)
    recorder, ownership = Recorder(), Ownership()
    async with asyncio.TaskGroup() as tg:
        a, b = await start_pair(
            tg,
            aws,
            stream=stream,
            table=table,
            tmp_path=tmp_path,
            recorder=recorder,
            ownership=ownership,
            lease_duration=6.0,
        )
        await ownership.wait(balanced, within=30)
        put = await kf.put_records(kinesis, stream, items(200, 16))
        await recorder.wait_for(set(put))
        put += await kf.put_records(kinesis, stream, items(100, 16, prefix="mid"))
        a.signal(signal.SIGTERM)
        terminated = time.monotonic()
        async with asyncio.timeout(10):
            await a.exited.wait()
        await ownership.wait(lambda o: len(o.get("b", ())) == 4, within=10)
        took = time.monotonic() - terminated
        put += await kf.put_records(kinesis, stream, items(100, 16, prefix="after"))
        await recorder.wait_for(set(put))
        b.signal(signal.SIGTERM)
    assert a.process is not None
    assert a.process.returncode == 0
    assert took < 3.0  # released leases are taken at once, not after the 6 s expiry
    assert sorted(recorder.sequences()) == sorted(put)  # every record exactly once
