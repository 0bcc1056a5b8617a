"""Kinesis consumer benchmark: our StreamConsumer against a bare GetRecords loop and async-kinesis.

Run ``python -m bench.kinesis [--quick] [--json]``. Everything happens in one run, on one
:class:`~sandbox.aws.MotoSandbox`:

1. Two streams (1 shard, 4 shards) are filled once with fixed-size records.
2. Three contenders read each stream from TRIM_HORIZON to its last record, in turn, repeated
   (3 times with ``--quick``, 5 without), the order rotated every round so drift in the sandbox
   favours nobody:

   - ``kinesis``: :class:`cloud_daemon.consumer.StreamConsumer` with a no-op handler, a
     :class:`~cloud_daemon.leases.SqliteLeaseStore` in a temporary directory (checkpoint after
     every batch, as in production), ``batch_limit`` 10,000 and AWS's pacing (5 calls/s/shard);
   - ``bare_loop``: aiobotocore ``GetRecords(Limit=10000)`` back to back, one task per shard,
     nothing else: the sandbox's own ceiling;
   - ``async_kinesis``: async-kinesis 3.0.1 at its fastest sensible settings (10,000 records per
     call, 5 calls/s per shard, strings not JSON, in-memory checkpoints, short dry-shard sleep).

3. Our consumer, with its production defaults, reads a shard written at its 1,000 records/s
   limit for a while (sandbox throttling on); it keeps up when it handles every record and
   MillisBehindLatest, sampled from its metrics, stays under one second.

Every contender runs in a child process of its own (``python -m bench.kinesis child ...``),
started once and driven over stdin/stdout with JSON lines, so neither the moto server's CPU
nor this process's is counted. A child times each run itself, from the command to the last
record handled, and reports the CPU it used in that window (``resource.getrusage``, all its
threads): set-up and teardown are outside the window for every contender alike. Figures are
medians; a ratio is the median of round-by-round ratios (the runs of one round are adjacent in
time, so load from elsewhere on the machine moves both sides alike). The best run of each is
reported beside the median: on a shared machine it is the least disturbed one. The "whole run"
CPU column is read by this process from ``/proc/<pid>/stat`` around each run command, set-up
and teardown included, as a cross-check of the children's own figure.

The sandbox computes MillisBehindLatest as AWS does, from the newest record's arrival minus the
last returned record's: it stays 0 while every call drains the shard, so the end-to-end lag
(handling time minus arrival of each batch's last record) is reported beside it.

async-kinesis is a benchmark baseline, not a project dependency: when it does not import, its
figures are ``null`` with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.common import cpu_seconds, format_table, median, rss_bytes

__all__ = ["Plan", "main", "run_benchmark"]

REGION: Final = "us-east-1"
PAYLOAD_BYTES: Final = 256
CONTENDERS: Final = ("kinesis", "bare_loop", "async_kinesis")
_PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
_GET_RECORDS_LIMIT: Final = 10_000
_PUT_CHUNK: Final = 500
_RUN_TIMEOUT: Final = 180.0  # a stalled contender is reported, not waited for
_SAMPLE_INTERVAL: Final = 0.05  # metrics sampling: faster than GetRecords' 5 calls/s


@dataclass(frozen=True, slots=True)
class Plan:
    """How much to measure.

    Attributes:
        repetitions: runs per contender and stream (the median is reported).
        records: records put into each stream, by shard count.
        keep_up_seconds: how long the live shard is written at 1,000 records/s.
        keep_up_rate: records per second written to the live shard.
    """

    repetitions: int
    records: Mapping[int, int]
    keep_up_seconds: float
    keep_up_rate: int = 1000

    @classmethod
    def of(cls, *, quick: bool) -> Plan:
        """The quick plan (well under a minute) or the full one."""
        if quick:
            return cls(repetitions=3, records={1: 10_000, 4: 20_000}, keep_up_seconds=5.0)
        return cls(repetitions=5, records={1: 50_000, 4: 80_000}, keep_up_seconds=10.0)


def _payload(index: int) -> bytes:
    head = json.dumps(
        {"name": "event.system.incoming.communication", "i": index}, separators=(",", ":")
    ).encode()
    return head + b" " * (PAYLOAD_BYTES - len(head))


def _client_kwargs(endpoint_url: str) -> dict[str, Any]:
    """aiobotocore client arguments for the sandbox (no retries, like MotoSandbox's own)."""
    from aiobotocore.config import AioConfig

    return {
        "endpoint_url": endpoint_url,
        "region_name": REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "config": AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
    }


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------
# Child side: one contender per process.


def _emit(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _stdin() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _command(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        return {"op": "exit"}
    command: dict[str, Any] = json.loads(line)
    return command


@dataclass(slots=True)
class _Window:
    """Wall and CPU time from a run's start to its last record."""

    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=_own_cpu)
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def close(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = _own_cpu() - self.cpu_started

    def report(self, records: int) -> dict[str, Any]:
        return {
            "event": "done",
            "records": records,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
        }


async def _run_kinesis(kinesis: Any, work: Path, stream: str, total: int, run: int) -> _Window:
    from cloud_daemon.consumer import ConsumerConfig, RecordFailure, ShardBatch, StreamConsumer
    from cloud_daemon.deadletter import JsonLinesDeadLetter
    from cloud_daemon.leases import SqliteLeaseStore

    handled = 0
    reached = asyncio.Event()

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        nonlocal handled
        handled += len(batch.records)
        if handled >= total:
            reached.set()
        return None

    config = ConsumerConfig(stream_name=stream, worker_id="bench", batch_limit=_GET_RECORDS_LIMIT)
    async with SqliteLeaseStore(work / f"leases-{stream}-{run}.sqlite3") as store:
        window = _Window()
        async with StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=handle,
            config=config,
            dead_letter=JsonLinesDeadLetter(work / "dead-letters.jsonl"),
        ):
            await reached.wait()
            window.close()
    return window


async def _run_bare_loop(kinesis: Any, stream: str, expect: Mapping[str, int]) -> _Window:
    window = _Window()

    async def drain(shard_id: str, count: int) -> None:
        answer = await kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
        )
        iterator = answer["ShardIterator"]
        got = 0
        while got < count:
            answer = await kinesis.get_records(ShardIterator=iterator, Limit=_GET_RECORDS_LIMIT)
            got += len(answer["Records"])
            iterator = answer["NextShardIterator"]

    async with asyncio.TaskGroup() as tasks:
        for shard_id, count in expect.items():
            tasks.create_task(drain(shard_id, count), name=f"bare-loop-{shard_id}")
    window.close()
    return window


async def _run_async_kinesis(endpoint_url: str, stream: str, total: int) -> _Window:
    import kinesis

    window = _Window()
    received = 0
    async with kinesis.Consumer(
        stream,
        endpoint_url=endpoint_url,
        region_name=REGION,
        record_limit=_GET_RECORDS_LIMIT,
        shard_fetch_rate=5,  # AWS's 5 calls/s per shard; its default is 1
        sleep_time_no_records=0.2,  # a dry shard's sleep blocks every shard's fetches
        idle_timeout=30.0,  # iteration must not end early while a shard sleeps
        max_queue_size=_GET_RECORDS_LIMIT * 4,
        processor=kinesis.StringProcessor(),  # the cheapest: our handler gets bytes
        use_list_shards=True,
    ) as consumer:
        async for _item in consumer:
            received += 1
            if received >= total:
                window.close()
                break
    return window


async def _live(kinesis: Any, work: Path, stream: str, reader: asyncio.StreamReader) -> None:
    """Our consumer with production defaults on a shard being written; report on ``drain``."""
    import datetime as dt

    from cloud_daemon.consumer import ConsumerConfig, RecordFailure, ShardBatch, StreamConsumer
    from cloud_daemon.deadletter import JsonLinesDeadLetter
    from cloud_daemon.leases import SqliteLeaseStore

    handled = 0
    max_lag = 0.0
    progress = asyncio.Event()

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        nonlocal handled, max_lag
        handled += len(batch.records)
        lag = dt.datetime.now(dt.UTC) - batch.records[-1].arrival
        max_lag = max(max_lag, lag.total_seconds())
        progress.set()
        return None

    owned = asyncio.Event()
    config = ConsumerConfig(stream_name=stream, worker_id="bench-live")
    behind: list[int] = []
    async with (
        SqliteLeaseStore(work / f"leases-{stream}.sqlite3") as store,
        StreamConsumer(
            kinesis=kinesis,
            leases=store,
            handler=handle,
            config=config,
            dead_letter=JsonLinesDeadLetter(work / "dead-letters.jsonl"),
            on_ownership_change=lambda shards: owned.set() if shards else None,
        ) as consumer,
    ):
        await owned.wait()
        _emit({"event": "owning"})

        async def sample() -> None:
            while True:
                behind.extend(
                    m.millis_behind_latest
                    for m in consumer.metrics().values()
                    if m.millis_behind_latest is not None
                )
                await asyncio.sleep(_SAMPLE_INTERVAL)

        async with asyncio.TaskGroup() as tasks:
            sampler = tasks.create_task(sample(), name="bench-live-sampler")
            command = await _command(reader)
            expect, timeout = int(command["expect"]), float(command["timeout"])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while handled < expect:
                        progress.clear()
                        await progress.wait()
            sampler.cancel("drained")
        metrics = list(consumer.metrics().values())
    _emit(
        {
            "event": "drained",
            "handled": handled,
            "max_millis_behind_latest": max(behind, default=None),
            "max_lag_ms": round(max_lag * 1000),
            "throttles": sum(m.throttles for m in metrics),
            "errors": sum(m.errors for m in metrics),
        }
    )


def _probe_async_kinesis() -> tuple[str | None, str | None]:
    """``(version, None)`` when async-kinesis imports, ``(None, reason)`` when it does not."""
    import importlib
    import importlib.metadata

    try:
        importlib.import_module("kinesis")
    except ImportError as exc:
        return None, f"async-kinesis does not import: {exc}"
    try:
        return importlib.metadata.version("async-kinesis"), None
    except importlib.metadata.PackageNotFoundError:
        return None, None


async def _child(kind: str, endpoint_url: str, work: Path) -> int:
    import structlog
    from aiobotocore.session import get_session

    # stdout is the protocol: logs go to stderr (the parent keeps them in a file).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    version: str | None = None
    if kind == "async_kinesis":
        version, unavailable = _probe_async_kinesis()
        if unavailable is not None:
            _emit({"event": "unavailable", "reason": unavailable})
            return 0
    reader = await _stdin()
    async with get_session().create_client("kinesis", **_client_kwargs(endpoint_url)) as client:
        _emit({"event": "ready", "pid": os.getpid(), "version": version})
        run = 0
        while True:
            command = await _command(reader)
            match command["op"]:
                case "exit":
                    return 0
                case "live":
                    await _live(client, work, str(command["stream"]), reader)
                case "run":
                    stream = str(command["stream"])
                    expect = {str(k): int(v) for k, v in command["expect"].items()}
                    total = sum(expect.values())
                    run += 1
                    if kind == "kinesis":
                        window = await _run_kinesis(client, work, stream, total, run)
                    elif kind == "bare_loop":
                        window = await _run_bare_loop(client, stream, expect)
                    else:
                        window = await _run_async_kinesis(endpoint_url, stream, total)
                    _emit(window.report(total))
                case other:
                    _emit({"event": "error", "reason": f"unknown command {other!r}"})
                    return 2


# --------------------------------------------------------------------------------------------
# Parent side.


class ContenderError(Exception):
    """A contender's process failed, stalled or answered out of protocol."""


class _ChildProcess:
    """One contender's process and its JSON-lines conversation."""

    def __init__(self, kind: str, log: Path) -> None:
        self.kind = kind
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.unavailable: str | None = None
        self.version: str | None = None

    async def start(self, endpoint_url: str, work: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        # async-kinesis builds its own client: it finds the sandbox's dummy keys here.
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
        env["AWS_DEFAULT_REGION"] = REGION
        with self.log.open("ab") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.kinesis", "child",
                "--kind", self.kind, "--endpoint", endpoint_url, "--work", str(work),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=_PROJECT_ROOT,
                env=env,
            )  # fmt: skip
        first = await self.receive(within=60.0)
        if first.get("event") == "unavailable":
            self.unavailable = str(first.get("reason"))
            await self.stop()
        elif first.get("event") != "ready":
            raise ContenderError(f"{self.kind}: expected ready, got {first}")
        else:
            self.version = first.get("version")

    @property
    def pid(self) -> int:
        if self.process is None:
            raise ContenderError(f"{self.kind} is not running")
        return self.process.pid

    async def send(self, message: Mapping[str, Any]) -> None:
        if self.process is None or self.process.stdin is None:
            raise ContenderError(f"{self.kind} is not running")
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()

    async def receive(self, *, within: float) -> dict[str, Any]:
        if self.process is None or self.process.stdout is None:
            raise ContenderError(f"{self.kind} is not running")
        try:
            async with asyncio.timeout(within):
                line = await self.process.stdout.readline()
        except TimeoutError:
            raise ContenderError(f"{self.kind}: no answer within {within:.0f} s") from None
        if not line:
            raise ContenderError(f"{self.kind} exited; see {self.log}")
        message: dict[str, Any] = json.loads(line)
        return message

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(ConnectionError):
                process.stdin.write(b'{"op": "exit"}\n')
                await process.stdin.drain()
                process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


@dataclass(slots=True)
class _Runs:
    """One contender's runs on one stream."""

    records_per_s: list[float] = field(default_factory=list)
    cpu_us_per_record: list[float] = field(default_factory=list)
    process_cpu_us_per_record: list[float] = field(default_factory=list)
    failure: str | None = None


async def _fill(kinesis: Any, stream: str, shards: int, count: int) -> dict[str, int]:
    """Create ``stream`` and put ``count`` records; return records per shard."""
    await kinesis.create_stream(StreamName=stream, ShardCount=shards)
    await kinesis.get_waiter("stream_exists").wait(
        StreamName=stream, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    per_shard: Counter[str] = Counter()
    for start in range(0, count, _PUT_CHUNK):
        chunk = range(start, min(count, start + _PUT_CHUNK))
        answer = await kinesis.put_records(
            StreamName=stream,
            Records=[{"PartitionKey": f"gw-{i}", "Data": _payload(i)} for i in chunk],
        )
        if answer.get("FailedRecordCount"):
            raise ContenderError(f"the sandbox refused {answer['FailedRecordCount']} records")
        per_shard.update(r["ShardId"] for r in answer["Records"])
    return dict(sorted(per_shard.items()))


async def _one_run(
    child: _ChildProcess, stream: str, expect: Mapping[str, int], runs: _Runs
) -> None:
    total = sum(expect.values())
    before = cpu_seconds(child.pid)
    await child.send({"op": "run", "stream": stream, "expect": dict(expect)})
    done = await child.receive(within=_RUN_TIMEOUT)
    after = cpu_seconds(child.pid)
    if done.get("event") != "done":
        raise ContenderError(f"{child.kind}: {done}")
    runs.records_per_s.append(total / float(done["seconds"]))
    runs.cpu_us_per_record.append(float(done["cpu_seconds"]) / total * 1e6)
    runs.process_cpu_us_per_record.append((after - before) / total * 1e6)


async def _write_live(
    kinesis: Any, stream: str, *, rate: int, seconds: float, tick: float = 0.05
) -> dict[str, Any]:
    """Write ``rate`` records/s for ``seconds``, refused records first in the next tick.

    A tick may carry up to twice its share while a backlog of refused records remains, so the
    shard's own limit, not this writer, decides how much is written each second.
    """
    loop = asyncio.get_running_loop()
    per_tick = max(1, round(rate * tick))
    total = round(rate * seconds)
    backlog: deque[int] = deque()
    produced = written = refused = 0
    started = loop.time()
    deadline = started + seconds * 3
    step = 0
    while written < total and loop.time() < deadline:
        await asyncio.sleep(max(0.0, started + step * tick - loop.time()))
        step += 1
        fresh = min(per_tick, total - produced)
        backlog.extend(range(produced, produced + fresh))
        produced += fresh
        batch = [backlog.popleft() for _ in range(min(2 * per_tick, len(backlog)))]
        if not batch:
            continue
        answer = await kinesis.put_records(
            StreamName=stream,
            Records=[{"PartitionKey": f"live-{i}", "Data": _payload(i)} for i in batch],
        )
        failed = [i for i, r in zip(batch, answer["Records"], strict=True) if "ErrorCode" in r]
        backlog.extendleft(reversed(failed))
        refused += len(failed)
        written += len(batch) - len(failed)
    elapsed = loop.time() - started
    return {
        "written": written,
        "write_rate": round(written / elapsed, 1),
        "write_seconds": round(elapsed, 2),
        "writes_refused": refused,
    }


async def _keep_up(
    aws: Any, kinesis: Any, work: Path, plan: Plan, log: Callable[[str], None]
) -> dict[str, Any]:
    stream = "bench-live"
    await kinesis.create_stream(StreamName=stream, ShardCount=1)
    await kinesis.get_waiter("stream_exists").wait(
        StreamName=stream, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    await aws.configure(kinesis_throttling=True)
    child = _ChildProcess("kinesis", work / "live.log")
    await child.start(aws.endpoint_url, work)
    try:
        await child.send({"op": "live", "stream": stream})
        owning = await child.receive(within=30.0)
        if owning.get("event") != "owning":
            raise ContenderError(f"live consumer: {owning}")
        log(f"writing {plan.keep_up_rate} records/s for {plan.keep_up_seconds:.0f} s")
        cpu_before = cpu_seconds(child.pid)
        written = await _write_live(
            kinesis, stream, rate=plan.keep_up_rate, seconds=plan.keep_up_seconds
        )
        await child.send({"op": "drain", "expect": written["written"], "timeout": 5.0})
        drained = await child.receive(within=30.0)
        cpu_used = cpu_seconds(child.pid) - cpu_before
    finally:
        await child.stop()
        await aws.configure(kinesis_throttling=False)
    behind = drained.get("max_millis_behind_latest")
    keeps_up = drained.get("handled") == written["written"] and behind is not None and behind < 1000
    return {
        "keeps_up_1000_per_s": keeps_up,
        "max_millis_behind_latest": behind,
        "handled": drained.get("handled"),
        "max_lag_ms": drained.get("max_lag_ms"),
        "read_throttles": drained.get("throttles"),
        "errors": drained.get("errors"),
        "cpu_fraction_of_one_core": round(cpu_used / written["write_seconds"], 3),
        **written,
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, 3)


def _paired(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """The median of round-by-round ratios: runs of one round are adjacent in time, so load
    from elsewhere on the machine shifts both sides of each ratio alike."""
    ratios = [n / d for n, d in zip(numerators, denominators, strict=False) if d]
    return round(median(ratios), 3) if ratios else None


def _summary(runs: Mapping[str, _Runs], records: int) -> dict[str, Any]:
    out: dict[str, Any] = {"records": records}
    usable = {name: runs[name].failure is None and bool(runs[name].records_per_s) for name in runs}
    for name in CONTENDERS:
        entry = runs[name]
        ok = usable[name]
        out[f"{name}_records_per_s"] = round(median(entry.records_per_s), 1) if ok else None
        # The least disturbed run: on a busy machine, a steadier view than the median.
        out[f"{name}_best_records_per_s"] = round(max(entry.records_per_s), 1) if ok else None
        out[f"{name}_cpu_us_per_record"] = round(median(entry.cpu_us_per_record), 2) if ok else None
        out[f"{name}_process_cpu_us_per_record"] = (
            round(median(entry.process_cpu_us_per_record), 2) if ok else None
        )
        out[f"{name}_runs_records_per_s"] = [round(v, 1) for v in entry.records_per_s]
        out[f"{name}_runs_cpu_us_per_record"] = [round(v, 2) for v in entry.cpu_us_per_record]
        if entry.failure is not None:
            out[f"{name}_failure"] = entry.failure

    def paired(attribute: str, other: str) -> float | None:
        if not (usable["kinesis"] and usable[other]):
            return None
        ours: list[float] = getattr(runs["kinesis"], attribute)
        theirs: list[float] = getattr(runs[other], attribute)
        return _paired(ours, theirs)

    out["kinesis_vs_bare_loop"] = paired("records_per_s", "bare_loop")
    out["kinesis_vs_bare_loop_best"] = _ratio(
        out["kinesis_best_records_per_s"], out["bare_loop_best_records_per_s"]
    )
    out["kinesis_vs_async_kinesis"] = paired("records_per_s", "async_kinesis")
    out["kinesis_cpu_vs_async_kinesis"] = paired("cpu_us_per_record", "async_kinesis")
    out["kinesis_cpu_vs_bare_loop"] = paired("cpu_us_per_record", "bare_loop")
    out["async_kinesis_vs_bare_loop"] = (
        _paired(runs["async_kinesis"].records_per_s, runs["bare_loop"].records_per_s)
        if usable["async_kinesis"] and usable["bare_loop"]
        else None
    )
    return out


async def run_benchmark(plan: Plan, *, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every measurement on one sandbox and return the figures.

    Args:
        plan: how much to measure.
        log: receives progress lines.

    Returns:
        The figures, JSON-ready (see the module docstring and :func:`main`).

    Raises:
        ContenderError: a stream could not be filled or the live consumer failed.
        TransportError: the sandbox did not start.
    """
    from aiobotocore.session import get_session

    from sandbox.aws import MotoSandbox
    from sandbox.pki import SandboxPki

    with tempfile.TemporaryDirectory(prefix="bench-kinesis-") as temporary:
        work = Path(temporary)
        pki = SandboxPki.load_or_create(work / "pki")
        async with (
            MotoSandbox(work / "aws", pki=pki) as aws,
            get_session().create_client("kinesis", **aws.client_kwargs()) as kinesis,
        ):
            streams: dict[int, tuple[str, dict[str, int]]] = {}
            for shards, count in plan.records.items():
                log(f"filling a {shards}-shard stream with {count:,} records")
                name = f"bench-{shards}"
                streams[shards] = (name, await _fill(kinesis, name, shards, count))
            children = {name: _ChildProcess(name, work / f"{name}.log") for name in CONTENDERS}
            figures: dict[str, Any] = {}
            try:
                await asyncio.gather(*(c.start(aws.endpoint_url, work) for c in children.values()))
                for shards, (stream, expect) in streams.items():
                    runs = {name: _Runs() for name in CONTENDERS}
                    for name, child in children.items():
                        runs[name].failure = child.unavailable
                    for round_ in range(plan.repetitions):
                        order = CONTENDERS[round_ % 3 :] + CONTENDERS[: round_ % 3]
                        for name in order:
                            if runs[name].failure is not None:
                                continue
                            try:
                                await _one_run(children[name], stream, expect, runs[name])
                            except ContenderError as exc:
                                runs[name].failure = str(exc)
                                await children[name].stop()
                        log(f"{shards} shard(s): round {round_ + 1}/{plan.repetitions} done")
                    key = "1_shard" if shards == 1 else f"{shards}_shards"
                    figures[key] = _summary(runs, sum(expect.values()))
                rss = {
                    name: round(rss_bytes(child.pid) / 2**20, 1)
                    for name, child in children.items()
                    if child.process is not None
                }
            finally:
                await asyncio.gather(*(c.stop() for c in children.values()))
            log("keep-up: our consumer on a shard written at its limit")
            keep_up = await _keep_up(aws, kinesis, work, plan, log)
    one = figures.get("1_shard", {})
    async_kinesis = children["async_kinesis"]
    return {
        "quick": plan.repetitions < 5,
        "repetitions": plan.repetitions,
        "payload_bytes": PAYLOAD_BYTES,
        "async_kinesis_version": async_kinesis.version,
        "async_kinesis_unavailable": async_kinesis.unavailable,
        **{k: one.get(k) for k in _TOP_LEVEL},
        "keeps_up_1000_per_s": keep_up["keeps_up_1000_per_s"],
        "max_millis_behind_latest": keep_up["max_millis_behind_latest"],
        **figures,
        "keep_up": keep_up,
        "rss_mib_after_runs": rss,
    }


_TOP_LEVEL: Final = (
    "kinesis_records_per_s",
    "bare_loop_records_per_s",
    "async_kinesis_records_per_s",
    "kinesis_vs_bare_loop",
    "kinesis_vs_async_kinesis",
    "kinesis_cpu_us_per_record",
    "bare_loop_cpu_us_per_record",
    "async_kinesis_cpu_us_per_record",
    "kinesis_cpu_vs_async_kinesis",
)


def _goal(
    value: float | None, *, at_least: float | None = None, at_most: float | None = None
) -> str:
    if value is None:
        return "n/a"
    if at_least is not None:
        return "met" if value >= at_least else "missed"
    if at_most is not None:
        return "met" if value <= at_most else "missed"
    return ""


def _fmt(value: float | None, pattern: str) -> str | None:
    return None if value is None else format(value, pattern)


def render(figures: Mapping[str, Any]) -> str:
    """The figures as a readable report: a table per shard count, goals, the keep-up run."""
    labels = {"kinesis": "ztp StreamConsumer", "bare_loop": "bare GetRecords loop"}
    labels["async_kinesis"] = f"async-kinesis {figures.get('async_kinesis_version') or ''}".strip()
    lines = [
        f"Kinesis consumers on the moto sandbox: {figures['payload_bytes']}-byte records, "
        f"medians of {figures['repetitions']} runs",
        "",
    ]
    rows: list[Sequence[object]] = []
    for key in ("1_shard", "4_shards"):
        data = figures.get(key)
        if not data:
            continue
        for name in CONTENDERS:
            rate = data.get(f"{name}_records_per_s")
            rows.append(
                [
                    key.replace("_", " "),
                    labels[name],
                    data["records"],
                    _fmt(rate, ",.0f"),
                    _fmt(data.get(f"{name}_best_records_per_s"), ",.0f"),
                    _fmt(1.0 if name == "bare_loop" else data.get(f"{name}_vs_bare_loop"), ".2f"),
                    _fmt(data.get(f"{name}_cpu_us_per_record"), ".1f"),
                    _fmt(data.get(f"{name}_process_cpu_us_per_record"), ".1f"),
                ]
            )
    headers = [
        "stream",
        "contender",
        "records",
        "records/s",
        "best/s",
        "vs bare",
        "CPU us/rec",
        "(whole run)",
    ]
    lines.append(format_table(headers, rows))
    lines.append("")
    goal_rows: list[Sequence[object]] = []
    for key in ("1_shard", "4_shards"):
        data = figures.get(key) or {}
        vs_bare = data.get("kinesis_vs_bare_loop")
        vs_ak = data.get("kinesis_vs_async_kinesis")
        cpu = data.get("kinesis_cpu_vs_async_kinesis")
        goal_rows += [
            [
                key,
                "ours / bare loop records/s >= 0.95",
                _fmt(vs_bare, ".3f"),
                _goal(vs_bare, at_least=0.95),
            ],
            [
                key,
                "  the same, best run of each",
                _fmt(data.get("kinesis_vs_bare_loop_best"), ".3f"),
                _goal(data.get("kinesis_vs_bare_loop_best"), at_least=0.95),
            ],
            [key, "ours / async-kinesis records/s", _fmt(vs_ak, ".3f"), _goal(vs_ak, at_least=1.0)],
            [
                key,
                "ours / async-kinesis CPU per record <= 0.5",
                _fmt(cpu, ".3f"),
                _goal(cpu, at_most=0.5),
            ],
        ]
    keep = figures["keep_up"]
    behind = keep.get("max_millis_behind_latest")
    goal_rows.append(
        [
            "live",
            "keeps up at 1,000 records/s (MillisBehindLatest < 1 s)",
            f"{behind} ms" if behind is not None else None,
            "met" if keep["keeps_up_1000_per_s"] else "missed",
        ]
    )
    lines.append(format_table(["stream", "goal", "value", ""], goal_rows))
    lines.append("")
    lines.append(
        f"keep-up: {keep['written']:,} records written in {keep['write_seconds']} s "
        f"({keep['write_rate']}/s, {keep['writes_refused']} refused and re-sent), "
        f"{keep['handled']:,} handled; max MillisBehindLatest {behind} ms, max end-to-end lag "
        f"{keep['max_lag_ms']} ms, {keep['read_throttles']} read throttles, consumer CPU "
        f"{keep['cpu_fraction_of_one_core']:.1%} of a core"
    )
    if figures.get("async_kinesis_unavailable"):
        lines.append(f"async-kinesis: {figures['async_kinesis_unavailable']}")
    for key in ("1_shard", "4_shards"):
        for name in CONTENDERS:
            failure = (figures.get(key) or {}).get(f"{name}_failure")
            if failure and not figures.get("async_kinesis_unavailable"):
                lines.append(f"{key} {labels[name]} failed: {failure}")
    lines.append(f"RSS after the runs (MiB): {figures['rss_mib_after_runs']}")
    load = figures.get("load_average_1min")
    if load:
        lines.append(
            f"load average (1 min) before/after: {load['before']}/{load['after']} on "
            f"{load['cpus']} CPUs; ratios are medians of round-by-round ratios"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.kinesis [--quick] [--json]`` (and the children's ``child`` mode).

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every measurement ran (goals missed or not), 1 otherwise.
    """
    import structlog

    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["child"]:
        child = argparse.ArgumentParser(prog="python -m bench.kinesis child")
        child.add_argument("--kind", choices=CONTENDERS, required=True)
        child.add_argument("--endpoint", required=True)
        child.add_argument("--work", type=Path, required=True)
        options = child.parse_args(arguments[1:])
        return asyncio.run(_child(options.kind, options.endpoint, options.work))
    parser = argparse.ArgumentParser(
        prog="python -m bench.kinesis", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="3 runs of smaller streams")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(arguments)
    plan = Plan.of(quick=options.quick)
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {line}", file=sys.stderr, flush=True)

    # stdout carries the table or the JSON object: the sandbox's own log lines go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    load_before = os.getloadavg()
    figures = asyncio.run(run_benchmark(plan, log=log))
    figures["elapsed_seconds"] = round(time.monotonic() - started, 1)
    # Other work on the machine moves wall-clock figures (CPU per record much less): say so.
    figures["load_average_1min"] = {
        "before": round(load_before[0], 2),
        "after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    if options.json:
        print(json.dumps(figures, indent=2))
    else:
        print(render(figures))
    failed = any(
        (figures.get(key) or {}).get(f"{name}_failure")
        for key in ("1_shard", "4_shards")
        for name in ("kinesis", "bare_loop")
    )
    return 1 if failed or not figures["keep_up"]["handled"] else 0


if __name__ == "__main__":
    sys.exit(main())
