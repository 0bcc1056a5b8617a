"""Peers shared by the device daemon's end-to-end tests: one of each per test module.

The device broker and the IoT broker (mosquitto) and a moto server, started once per module;
``cloud`` plays the cloud through the AirVantage emulator and ``daemon`` is the gateway's
``ztp-daemon`` process (not started), both for the module's ``serial`` and ``password``
fixtures, which each module defines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandbox.brokers import DeviceBroker, IotBroker
from sandbox.pki import SandboxPki
from tests.adapters.kinesis_fixtures import moto_server
from tests.e2e.device_fixtures import Cloud, Daemon, daemon_config, open_cloud
from tests.sandbox.conftest import running_on_private_loops


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[DeviceBroker]:
    with running_on_private_loops(
        DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=pki)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def iot_broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[IotBroker]:
    with running_on_private_loops(
        IotBroker(tmp_path_factory.mktemp("iot-broker"), pki=pki)
    ) as running:
        yield running


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
async def cloud(
    broker: DeviceBroker, pki: SandboxPki, moto_endpoint: str, serial: str, password: str
) -> AsyncIterator[Cloud]:
    async with open_cloud(
        broker=broker, pki=pki, aws_endpoint_url=moto_endpoint, serial=serial, password=password
    ) as playing:
        yield playing


@pytest.fixture
def identity(serial: str, password: str) -> tuple[str, str]:
    """The gateway's serial and AirVantage password, together."""
    return serial, password


@pytest.fixture
async def daemon(
    tmp_path: Path,
    broker: DeviceBroker,
    iot_broker: IotBroker,
    pki: SandboxPki,
    identity: tuple[str, str],
) -> AsyncIterator[Daemon]:
    serial, password = identity
    config = daemon_config(
        tmp_path / "gateway",
        serial=serial,
        password=password,
        broker=broker,
        pki=pki,
        iot=iot_broker.address,
    )
    process = Daemon(config, tmp_path / "daemon.log")
    yield process
    if process.running:
        await process.kill()
