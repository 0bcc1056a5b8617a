"""Minimal real peers for the AirVantage emulator's tests: mosquitto and Kinesis helpers.

Stand-ins until ``sandbox/brokers.py`` and ``sandbox/aws.py`` land: a mosquitto child process
with a tiny generated configuration (anonymous, ``user root``, ``set_tcp_nodelay true``), plus
Kinesis helpers that go through aiobotocore exactly as the cloud daemon does. The moto server
they talk to is ``tests.adapters.kinesis_fixtures.moto_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

__all__ = [
    "REGION",
    "Broker",
    "create_stream",
    "kinesis_client",
    "read_stream",
    "run_mosquitto",
]

REGION = "eu-west-1"
_MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# One session for the run: a fresh one parses botocore's Kinesis model again (~60-100 ms per
# client on this machine); a client of a warm session costs a few ms. Sessions hold no loop.
_SESSION = get_session()


@dataclass(frozen=True, slots=True)
class Broker:
    """Where a test broker listens."""

    host: str
    port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def run_mosquitto(directory: Path) -> Iterator[Broker]:
    """Run mosquitto on a free loopback port until the context ends.

    Args:
        directory: where the configuration and the log go.

    Yields:
        The broker's address, once it accepts connections.
    """
    port = _free_port()
    config = directory / "mosquitto.conf"
    log_file = directory / "mosquitto.log"
    config.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "user root\n"
        "set_tcp_nodelay true\n"
        "persistence false\n"
        f"log_dest file {log_file}\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
    )
    process = subprocess.Popen([_MOSQUITTO, "-c", str(config)])
    try:
        deadline = time.monotonic() + 10.0
        while not _accepts(port):
            if process.poll() is not None:
                log = log_file.read_text() if log_file.exists() else ""
                raise RuntimeError(f"mosquitto exited with {process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not listen within 10 s")
            time.sleep(0.02)
        yield Broker("127.0.0.1", port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.asynccontextmanager
async def kinesis_client(endpoint_url: str) -> AsyncIterator[Any]:
    """An aiobotocore Kinesis client for the moto server (one attempt: moto 500s are final).

    ``total_max_attempts`` counts the first attempt; botocore's ``max_attempts`` does not, so
    ``max_attempts: 1`` would still retry once.
    """
    async with _SESSION.create_client(
        "kinesis",
        region_name=REGION,
        endpoint_url=endpoint_url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=AioConfig(retries={"total_max_attempts": 1}),
    ) as client:
        yield client


async def create_stream(endpoint_url: str, name: str, *, shards: int = 1) -> None:
    """Create a stream and wait until it is ACTIVE."""
    async with kinesis_client(endpoint_url) as client:
        await client.create_stream(StreamName=name, ShardCount=shards)
        for _ in range(100):
            described = await client.describe_stream_summary(StreamName=name)
            if described["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"stream {name} did not become ACTIVE")


async def read_stream(endpoint_url: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """Read every record of every shard from the start.

    Returns:
        ``(partition key, decoded JSON envelope)`` pairs, shard by shard in sequence order.
    """
    records: list[tuple[str, dict[str, Any]]] = []
    async with kinesis_client(endpoint_url) as client:
        shards = (await client.list_shards(StreamName=name))["Shards"]
        for shard in shards:
            iterator = (
                await client.get_shard_iterator(
                    StreamName=name,
                    ShardId=shard["ShardId"],
                    ShardIteratorType="TRIM_HORIZON",
                )
            )["ShardIterator"]
            while iterator:
                page = await client.get_records(ShardIterator=iterator, Limit=1000)
                records.extend((r["PartitionKey"], json.loads(r["Data"])) for r in page["Records"])
                if not page["Records"]:
                    break
                iterator = page.get("NextShardIterator")
    return records
