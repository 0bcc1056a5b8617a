"""The link stops when told to, whatever is in flight (real mosquitto device broker).

Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses for the CONNACK, SUBACK, PUBACK and
the disconnect) returns the awaited result when a cancellation arrives together with it,
swallowing the cancellation, and aiomqtt's teardown can replace a cancellation with its own
``MqttError``. Both made device supervisors that were stopped mid-send never return from
``serve()`` (found by ``bench.fleet`` with hundreds of gateways on one loop). These tests stop
a link at exactly those moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from shared.airvantage import Ack, DataPoint
from tests.adapters.test_link import Device, settings_for
from tests.sandbox.conftest import running_on_private_loops
from ztp_daemon.errors import LinkError
from ztp_daemon.link import AirVantageLink, Connected, Disconnected

# More than the kernel's loopback buffers take (tcp_wmem + tcp_rmem maxima, ~10 MB): with the
# broker stopped, part of this message stays queued in the client, and so does a DISCONNECT.
_UNWRITABLE_CHARS = 16_000_000


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[DeviceBroker]:
    with running_on_private_loops(
        DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=pki)
    ) as running:
        yield running


@pytest.fixture
async def device(broker: DeviceBroker) -> Device:
    serial = f"SN{uuid.uuid4().hex[:12].upper()}"
    password = f"pw-{uuid.uuid4().hex}"
    await broker.add_device(serial, password)
    return Device(serial, password)


async def test_a_send_cancelled_as_its_puback_arrives_ends_cancelled(
    broker: DeviceBroker, device: Device
) -> None:
    # A sender acking in a loop has a PUBACK in flight nearly always; cancelled at random
    # moments, some cancellations land in the turn its PUBACK is read. Before the fix 16 of
    # 40 were swallowed: ack() returned as sent and the loop went on sending.
    rng = random.Random(5)
    swallowed = 0
    async with AirVantageLink(settings_for(broker, device), on_event=device.record) as link:
        await device.wait_for(lambda: device.count(Connected) == 1)

        async def send_until_cancelled() -> None:
            while True:
                await link.ack([Ack.ok("t-loop")])

        for _ in range(40):
            sender = asyncio.create_task(send_until_cancelled())
            await asyncio.sleep(rng.uniform(0.002, 0.01))
            sender.cancel()
            done, _ = await asyncio.wait({sender}, timeout=1.0)
            if not done or not sender.cancelled():
                swallowed += 1
                sender.cancel()
                await asyncio.wait({sender}, timeout=1.0)
        assert link.connected
    assert swallowed == 0, f"{swallowed} of 40 cancellations were swallowed"


async def test_closing_ends_the_link_when_its_disconnect_cannot_be_written(
    tmp_path: Path, pki: SandboxPki, device: Device
) -> None:
    # The broker stops reading with a message half written, so the DISCONNECT of the link's
    # close stays queued; aiomqtt gives up after its timeout with MqttError, which the link
    # took for a lost connection: it reconnected, and close() never returned.
    (tmp_path / "stalled").mkdir()
    async with DeviceBroker(tmp_path / "stalled", pki=pki) as stalled:
        await stalled.add_device(device.serial, device.password)
        settings = settings_for(stalled, device, connect_timeout=0.5, publish_timeout=10.0)
        link = AirVantageLink(settings, on_event=device.record)
        await link.__aenter__()
        pid = stalled.pid
        assert pid is not None
        try:
            await device.wait_for(lambda: device.count(Connected) == 1)
            os.kill(pid, signal.SIGSTOP)
            sender = asyncio.create_task(
                link.publish_data([DataPoint("ztp.blob", "x" * _UNWRITABLE_CHARS, 1)])
            )
            await asyncio.sleep(0.3)  # the client writes what the kernel takes, then waits
            closing = asyncio.create_task(link.__aexit__(None, None, None))
            done, _ = await asyncio.wait({closing}, timeout=settings.connect_timeout + 2.0)
            if not done:  # clean up before failing: the link must not outlive the test
                closing.cancel()
                await asyncio.wait({closing}, timeout=2.0)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, LinkError):
                await sender
        finally:
            os.kill(pid, signal.SIGCONT)
        assert done, "the link did not close"
        assert closing.exception() is None
        # Closed, not lost and reconnected.
        assert device.count(Disconnected) == 0
        assert device.count(Connected) == 1
