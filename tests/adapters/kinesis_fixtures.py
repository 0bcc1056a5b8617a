"""Helpers for tests against a real moto server: the server, clients, streams, lease tables.

Stock moto in server mode, in a thread of the test process (``ThreadedMotoServer``), until the
sandbox's fidelity layer (``sandbox/aws.py``) lands; the clients reach it over HTTP through
aiobotocore, exactly as the daemon reaches AWS. Every helper takes unique names, so tests
sharing one server do not see each other's streams and tables.

Test modules wrap these in their own fixtures (fixtures imported from another module confuse
linters about redefinitions).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from moto.server import ThreadedMotoServer

__all__ = [
    "aws_client",
    "create_stream",
    "moto_server",
    "put_records",
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
) -> None:
    """Put ``(partition key, data)`` pairs in order, ``chunk`` per PutRecords call."""
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        answer = await kinesis.put_records(
            StreamName=name, Records=[{"PartitionKey": k, "Data": d} for k, d in part]
        )
        if answer.get("FailedRecordCount"):
            raise AssertionError(f"moto refused {answer['FailedRecordCount']} records")
