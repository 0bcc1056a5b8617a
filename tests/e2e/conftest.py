"""Peers shared by the device daemon's end-to-end tests: one of each per test module.

The device broker and the IoT broker (mosquitto) and a moto server, started once per module;
``cloud`` plays the cloud through the AirVantage emulator for the module's ``serial`` and
``password`` fixtures, which each module defines.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from sandbox.brokers import DeviceBroker, IotBroker
from sandbox.pki import SandboxPki
from tests.adapters.kinesis_fixtures import moto_server
from tests.e2e.device_fixtures import Cloud, open_cloud
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
