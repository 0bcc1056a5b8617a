"""Fixtures of the sandbox tier: the sandbox PKI and the two mosquitto brokers.

The brokers are session-scoped (one mosquitto each for the whole run) and started from a sync
fixture on a private event loop: a broker is not tied to the loop that started it, so tests drive
it from their own loops. Tests keep each other out of the way by using fresh identities: a new
serial (``unique_serial``, from ``tests/conftest.py``) or a new thing certificate
(``client_certificate``) per test. A test that stops, restarts or breaks a broker makes its own
instead of using the shared ones.

The whole sandbox (``shared_sandbox`` / ``sandbox`` in ``tests/conftest.py``) has brokers of its
own: these stay apart because the broker tests rewrite the CRL and the password file at will,
which the sandbox's moto server and emulator also write.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest

from sandbox.brokers import (
    BrokerAddress,
    ClientCertificate,
    DeviceBroker,
    IotBroker,
    write_client_certificate,
)
from sandbox.pki import SandboxPki

T = TypeVar("T")


def run_on_private_loop(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on a fresh loop that is never made the current one."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


class _Startable(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


@contextlib.contextmanager
def running_on_private_loops(broker: S) -> Iterator[S]:
    """Start ``broker`` on a private loop, yield it, stop it on another (for sync fixtures)."""
    run_on_private_loop(broker.start())
    try:
        yield broker
    finally:
        run_on_private_loop(broker.stop())


async def handshake_refused(address: BrokerAddress, tls: ssl.SSLContext) -> bool:
    """Whether the broker fails the TLS handshake (TLS 1.2 clients: the refusal is in it).

    A bare TLS client rather than aiomqtt: paho leaves its SSL socket unclosed when the handshake
    fails, and the ResourceWarning would fail whichever test the garbage collector runs in.
    """
    try:
        async with asyncio.timeout(3.0):
            _, writer = await asyncio.open_connection(address.host, address.port, ssl=tls)
    except ssl.SSLError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@pytest.fixture(scope="session")
def sandbox_pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    """The sandbox CA (and its CRL) for the whole run."""
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def device_broker(
    tmp_path_factory: pytest.TempPathFactory, sandbox_pki: SandboxPki
) -> Iterator[DeviceBroker]:
    """A plain-MQTT device broker shared by the run; register devices with fresh serials."""
    with running_on_private_loops(
        DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=sandbox_pki)
    ) as broker:
        yield broker


@pytest.fixture(scope="session")
def iot_broker(
    tmp_path_factory: pytest.TempPathFactory, sandbox_pki: SandboxPki
) -> Iterator[IotBroker]:
    """A mutual-TLS IoT broker shared by the run; connect with fresh thing certificates."""
    with running_on_private_loops(
        IotBroker(tmp_path_factory.mktemp("iot-broker"), pki=sandbox_pki)
    ) as broker:
        yield broker


@pytest.fixture
def client_certificate(
    sandbox_pki: SandboxPki, tmp_path: Path
) -> Callable[[str], ClientCertificate]:
    """Sign a client certificate for a CN with the sandbox CA (fresh EC key, files in tmp_path)."""

    def make(common_name: str) -> ClientCertificate:
        return write_client_certificate(sandbox_pki, common_name, tmp_path / "clients")

    return make


@pytest.fixture
def unique_thing(client_certificate: Callable[[str], ClientCertificate]) -> ClientCertificate:
    """A certificate for a thing name no other test uses."""
    return client_certificate(f"thing-{uuid.uuid4().hex[:12]}")
