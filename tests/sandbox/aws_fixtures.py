"""Fixtures for tests against the patched moto server (:class:`sandbox.aws.MotoSandbox`).

One server per test module (starting one costs about a second), reset before every test, so
each test sees empty AWS backends and the start-up knobs. Async fixtures here use the module's
event loop: a module using them marks itself ``pytest.mark.asyncio(loop_scope="module")``.

The sandbox gets a PKI of its own, not the run's shared ``sandbox_pki``: a reset rewrites the
CRL, which would disturb brokers other tests share.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiobotocore.session import get_session

from sandbox.aws import MotoSandbox
from sandbox.pki import SandboxPki

__all__ = [
    "IOT_ENDPOINT_HOST",
    "HangupCounter",
    "aws",
    "aws_broker_pid_file",
    "aws_pki",
    "dynamodb",
    "hangup_counter",
    "iot",
    "kinesis",
    "moto_sandbox",
]

#: The data endpoint host the module's sandbox announces (not the default, to prove it is used).
IOT_ENDPOINT_HOST = "iot.sandbox.localhost"

# A stand-in for the IoT broker's process: it writes its pid file and counts SIGHUPs on stdout.
_HANGUP_COUNTER = """
import os, signal, sys, time
count = 0
def hup(signum, frame):
    global count
    count += 1
    print(count, flush=True)
signal.signal(signal.SIGHUP, hup)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
print(0, flush=True)
while True:
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def aws_pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    """A sandbox CA for this module's moto server alone."""
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("aws-pki"))


@pytest.fixture(scope="module")
def aws_broker_pid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the module's stand-in IoT broker writes its pid (the sandbox signals that pid)."""
    return tmp_path_factory.mktemp("aws-broker") / "broker.pid"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def moto_sandbox(
    tmp_path_factory: pytest.TempPathFactory, aws_pki: SandboxPki, aws_broker_pid_file: Path
) -> AsyncIterator[MotoSandbox]:
    """The module's moto server (not reset: use ``aws`` in tests)."""
    async with MotoSandbox(
        tmp_path_factory.mktemp("aws"),
        pki=aws_pki,
        iot_endpoint_host=IOT_ENDPOINT_HOST,
        iot_broker_pid_file=aws_broker_pid_file,
    ) as sandbox:
        yield sandbox


@pytest_asyncio.fixture(loop_scope="module")
async def aws(moto_sandbox: MotoSandbox) -> MotoSandbox:
    """The module's moto server, reset: empty backends, start-up knobs, empty CRL."""
    await moto_sandbox.reset()
    return moto_sandbox


# One session for the run: a fresh one parses botocore's service model again for every client
# (~0.2 s per test here); a warm session makes a client in a few ms. Sessions hold no loop.
_SESSION = get_session()


async def _client(sandbox: MotoSandbox, service: str) -> AsyncIterator[Any]:
    async with _SESSION.create_client(service, **sandbox.client_kwargs()) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def kinesis(aws: MotoSandbox) -> AsyncIterator[Any]:
    """An aiobotocore Kinesis client on the reset sandbox."""
    async for client in _client(aws, "kinesis"):
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def iot(aws: MotoSandbox) -> AsyncIterator[Any]:
    """An aiobotocore IoT client on the reset sandbox."""
    async for client in _client(aws, "iot"):
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def dynamodb(aws: MotoSandbox) -> AsyncIterator[Any]:
    """An aiobotocore DynamoDB client on the reset sandbox."""
    async for client in _client(aws, "dynamodb"):
        yield client


class HangupCounter:
    """A real process that owns the broker pid file and reports every SIGHUP it receives."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.count = 0

    async def wait_for(self, count: int) -> None:
        """Wait (at most 5 s) until at least ``count`` SIGHUPs have arrived."""
        assert self.process.stdout is not None
        async with asyncio.timeout(5):
            while self.count < count:
                self.count = int(await self.process.stdout.readline())


@pytest_asyncio.fixture(loop_scope="module")
async def hangup_counter(
    aws: MotoSandbox, aws_broker_pid_file: Path
) -> AsyncIterator[HangupCounter]:
    """Start the stand-in broker after the reset, so the count starts at zero."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HANGUP_COUNTER, str(aws_broker_pid_file),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    counter = HangupCounter(process)
    try:
        assert process.stdout is not None
        # The first line ("0") says the pid file is written and the handler installed.
        async with asyncio.timeout(10):
            assert int(await process.stdout.readline()) == 0
        yield counter
    finally:
        process.kill()
        await process.wait()
        # The sandbox must find no pid file rather than a stale pid between tests.
        await asyncio.to_thread(aws_broker_pid_file.unlink, missing_ok=True)
