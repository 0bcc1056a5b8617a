"""Helpers for tests against a real moto server: the server, clients, streams, lease tables.

Two servers: stock moto in a thread of the test process (``moto_server``: fast to start, right
for DynamoDB conditional writes), and the project's sandbox (``sandbox_aws``: a child process with
the AWS-fidelity layer, needed wherever Kinesis must behave like AWS: reshards, throttling,
iterator expiry). Clients reach both over HTTP through aiobotocore, exactly as the daemon reaches
AWS. Every helper takes unique names, so tests sharing one server do not see each other's
streams and tables.

Test modules wrap these in their own fixtures (fixtures imported from another module confuse
linters about redefinitions).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

from sandbox.aws import MotoSandbox
from sandbox.pki import SandboxPki

__all__ = [
    "aws_client",
    "consumer_command",
    "create_stream",
    "moto_server",
    "put_records",
    "sandbox_aws",
    "unique_name",
]

_names = itertools.count()


def unique_name(prefix: str) -> str:
    """A stream or table name no other test of this process uses."""
    return f"{prefix}-{os.getpid()}-{next(_names)}"


@contextmanager
def moto_server() -> Iterator[str]:
    """Run a moto server on a free loopback port; yield its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@asynccontextmanager
async def aws_client(service: str, endpoint_url: str) -> AsyncIterator[Any]:
    """An aiobotocore client for ``service`` on the moto server.

    Retries are off: an operation moto lacks answers 500, which botocore would retry for ~11 s.
    """
    session = get_session()
    async with session.create_client(
        service,
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=AioConfig(retries={"max_attempts": 1}),
    ) as client:
        yield client


async def create_stream(kinesis: Any, name: str, shards: int) -> list[str]:
    """Create a stream, wait until it is active, return its shard ids sorted."""
    await kinesis.create_stream(StreamName=name, ShardCount=shards)
    await kinesis.get_waiter("stream_exists").wait(
        StreamName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )
    listing = await kinesis.list_shards(StreamName=name)
    return sorted(s["ShardId"] for s in listing["Shards"])


async def put_records(
    kinesis: Any, name: str, items: list[tuple[str, bytes]], *, chunk: int = 500
) -> list[int]:
    """Put ``(partition key, data)`` pairs in order, ``chunk`` per PutRecords call.

    Returns:
        The sequence numbers, in the order of ``items``.
    """
    sequences: list[int] = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        answer = await kinesis.put_records(
            StreamName=name, Records=[{"PartitionKey": k, "Data": d} for k, d in part]
        )
        if answer.get("FailedRecordCount"):
            raise AssertionError(f"moto refused {answer['FailedRecordCount']} records")
        sequences.extend(int(r["SequenceNumber"]) for r in answer["Records"])
    return sequences


@asynccontextmanager
async def sandbox_aws(directory: Path) -> AsyncIterator[MotoSandbox]:
    """The project's moto sandbox (a child process, fidelity layer on) under ``directory``."""
    pki = SandboxPki.load_or_create(directory / "pki")
    async with MotoSandbox(directory / "aws", pki=pki) as aws:
        yield aws


# --- a consumer in a process of its own (SIGKILL and SIGTERM tests) ---------------------------


async def _consume(
    endpoint_url: str, stream: str, table: str, worker: str, lease_duration: str = "2.0"
) -> None:
    """Run a StreamConsumer until SIGTERM; report on stdout, one JSON object per line.

    Lines: ``{"owned": [...]}`` on every ownership change, ``{"seq": "...", "shard": "..."}``
    for every record handled (before its checkpoint), ``{"exited": true}`` after the hand-off.
    """
    import asyncio
    import json
    import signal
    import sys

    import structlog

    from cloud_daemon.consumer import ConsumerConfig, RecordFailure, ShardBatch, StreamConsumer
    from cloud_daemon.deadletter import MemoryDeadLetter
    from cloud_daemon.leases import DynamoLeaseStore

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

    def emit(message: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def handle(batch: ShardBatch) -> RecordFailure | None:
        for record in batch.records:
            emit({"seq": str(record.sequence_number), "shard": record.shard_id})
        return None

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    config = ConsumerConfig(
        stream_name=stream,
        worker_id=worker,
        poll_interval=0.2,
        max_idle_wait=0.4,
        discovery_interval=0.3,
        lease_duration=float(lease_duration),
        renew_interval=0.5,
    )
    async with (
        aws_client("kinesis", endpoint_url) as kinesis,
        aws_client("dynamodb", endpoint_url) as dynamodb,
        StreamConsumer(
            kinesis=kinesis,
            leases=DynamoLeaseStore(dynamodb, table),
            handler=handle,
            config=config,
            dead_letter=MemoryDeadLetter(),
            on_ownership_change=lambda owned: emit({"owned": sorted(owned)}),
        ),
    ):
        emit({"started": worker})
        await stop.wait()
    emit({"exited": True})


def consumer_command(
    endpoint_url: str, stream: str, table: str, worker: str, *, lease_duration: float = 2.0
) -> list[str]:
    """The command line that runs :func:`_consume` in a child process."""
    import sys

    return [
        sys.executable, "-m", "tests.adapters.kinesis_fixtures",
        endpoint_url, stream, table, worker, str(lease_duration),
    ]  # fmt: skip


if __name__ == "__main__":
    import asyncio
    import sys

    asyncio.run(_consume(*sys.argv[1:6]))
