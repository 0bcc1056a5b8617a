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
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from structlog.testing import capture_logs

from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from shared.airvantage import Ack, DataPoint
from tests.adapters.test_link import WAIT, Device, admin, next_payload, settings_for, task_payload
from tests.sandbox.conftest import running_on_private_loops
from ztp_daemon.bundle import BundleStore
from ztp_daemon.csr import CsrSubject
from ztp_daemon.errors import LinkError
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.link import AirVantageLink, Connected, Disconnected
from ztp_daemon.machine import (
    MachineConfig,
    ProvisioningMachine,
    SharedCodecDecoder,
    State,
    StateRecord,
    request_id_for,
)
from ztp_daemon.state import StateFile
from ztp_daemon.supervisor import Supervisor

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


# --- the supervisor's shutdown: the item in progress is finished first -------------------------


class _WedgingKeyStore(FileKeyStore):
    """A key store whose discard hangs once armed: a slow disk under a renewal's fresh key."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.armed = False
        self.wedged = threading.Event()
        self.release = threading.Event()

    def discard(self) -> None:
        if self.armed:
            self.wedged.set()
            self.release.wait(timeout=30)
        super().discard()


def _provisioned_supervisor(
    broker: DeviceBroker, device: Device, directory: Path, *, drain_timeout: float
) -> tuple[Supervisor, _WedgingKeyStore]:
    """A supervisor resumed PROVISIONED (it reports so on connecting), its key store wedgeable."""
    keystore = _WedgingKeyStore(directory)
    csr_pem = keystore.load_or_create().sign_csr(CsrSubject(device.serial))
    record = StateRecord(
        State.PROVISIONED,
        request_id_for(csr_pem),
        csr_pem,
        attempts=1,
        bundle_version=1,
        certificate_id="c" * 64,
    )
    machine = ProvisioningMachine(
        MachineConfig(serial=device.serial),
        decoder=SharedCodecDecoder(),
        rng=random.Random(3),
        record=record,
    )
    supervisor = Supervisor(
        machine=machine,
        serial=device.serial,
        subject=CsrSubject(device.serial),
        keystore=keystore,
        state_file=StateFile(directory),
        bundles=BundleStore(directory / "bundles"),
        link_settings=settings_for(broker, device),
        drain_timeout=drain_timeout,
    )
    return supervisor, keystore


def _waiter(event: asyncio.Event) -> Callable[[], Awaitable[None]]:
    async def wait() -> None:
        await event.wait()

    return wait


async def _paths(client: aiomqtt.Client) -> dict[str, Any]:
    """The next message from the device: its data paths, or its acks by uid."""
    payload = await next_payload(client)
    if payload and "uid" in payload[0]:
        return {ack["uid"]: ack["status"] for ack in payload}
    return {path: values for point in payload for path, values in point.items()}


async def test_a_supervisor_stopped_mid_item_sends_what_the_item_owes_first(
    broker: DeviceBroker, device: Device, tmp_path: Path
) -> None:
    # Stopped while a renewal's fresh key is being made (the disk is slow), the machine still
    # stores it and then acks the command and sends the request. Before, shutdown cancelled the
    # machine at once: nothing of it went out (as the "provisioned" report of a gateway stopped
    # right after its bundle became durable: the cloud never heard, bench.fleet lost 1-2 of 300).
    supervisor, keystore = _provisioned_supervisor(broker, device, tmp_path, drain_timeout=5.0)
    topics = (f"{device.serial}/messages/json", f"{device.serial}/acks/json")
    stop = asyncio.Event()
    async with admin(broker, *topics) as cloud, asyncio.TaskGroup() as group:
        running = group.create_task(supervisor.run(shutdown=_waiter(stop)))
        try:
            assert "ztp.status" in await _paths(cloud)  # resumed PROVISIONED: reported
            keystore.armed = True
            await cloud.publish(
                f"{device.serial}/tasks/json", task_payload("t-renew", "ztp.renew"), qos=1
            )
            assert await asyncio.to_thread(keystore.wedged.wait, WAIT)
            stop.set()
            await asyncio.sleep(0.3)
            assert not running.done()  # draining: the item in progress is not abandoned
        finally:
            keystore.release.set()
            stop.set()
        assert await _paths(cloud) == {"t-renew": "OK"}
        assert "ztp.request" in await _paths(cloud)
        async with asyncio.timeout(WAIT):
            await running


async def test_the_drain_is_bounded(broker: DeviceBroker, device: Device, tmp_path: Path) -> None:
    supervisor, keystore = _provisioned_supervisor(broker, device, tmp_path, drain_timeout=0.3)
    stop = asyncio.Event()
    try:
        with capture_logs() as events:
            async with admin(broker, f"{device.serial}/messages/json") as cloud:
                running = asyncio.create_task(supervisor.run(shutdown=_waiter(stop)))
                assert "ztp.status" in await _paths(cloud)
                keystore.armed = True
                await cloud.publish(
                    f"{device.serial}/tasks/json", task_payload("t-renew", "ztp.renew"), qos=1
                )
                assert await asyncio.to_thread(keystore.wedged.wait, WAIT)
                stop.set()
                async with asyncio.timeout(0.3 + 2.0):
                    await running
    finally:
        keystore.release.set()
    timeouts = [e for e in events if e["event"] == "supervisor.drain_timeout"]
    assert len(timeouts) == 1
    assert timeouts[0]["timeout_s"] == 0.3
