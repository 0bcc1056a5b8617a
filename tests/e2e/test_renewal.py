"""Certificate renewal end to end: a real ``ztp-daemon`` process, renewed on command and by itself.

The test plays the cloud through the AirVantage emulator (the operator's ``ztp.renew`` is a
command operation created through its REST API) and signs CSRs with the sandbox CA; the
publisher talks mutual TLS to the sandbox's IoT broker, where an observer subscribes to the
gateway's topics. Every test checks that no private key, password or token reached a log line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from sandbox.brokers import IotBroker, client_tls_context
from shared.messages import CertificateRequest, Provisioned
from tests.e2e.device_fixtures import (
    Cloud,
    Daemon,
    Issued,
    assert_no_secrets,
    public_key_of_csr,
    public_key_of_pem,
    state_dir,
    status_json,
)

pytestmark = pytest.mark.slow  # each test waits for the publisher's 5 s credential poll


@pytest.fixture
def serial(request: pytest.FixtureRequest) -> str:
    # Unique per test, readable in the brokers' logs.
    return f"SNRENEW{abs(hash(request.node.name)) % 10**10:010d}"


@pytest.fixture
def password(serial: str) -> str:
    return f"av-renew-{serial.lower()}-pw"


@pytest.fixture
async def observer(iot_broker: IotBroker, serial: str) -> AsyncIterator[aiomqtt.Client]:
    """A client of the IoT broker subscribed to everything the gateway publishes."""
    client = aiomqtt.Client(
        iot_broker.address.host,
        iot_broker.address.port,
        identifier=f"observer-{serial}",
        tls_context=client_tls_context(iot_broker.address, iot_broker.observer),
    )
    async with client:
        await client.subscribe(f"dt/{serial}/#", qos=1)
        yield client


def common_name(request: CertificateRequest) -> str:
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    value = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def connected(line: str) -> bool:
    return "event=publisher.connected" in line


async def reconnected_with_bundle_2(daemon: Daemon, *, after: int) -> int:
    """Wait until the publisher saw bundle 2 and connected with it; return the line's index."""
    changed = await daemon.wait_line(
        lambda line: "event=publisher.credentials_changed" in line and "new=bundle-2" in line,
        after=after,
    )
    start = daemon.lines.index(changed)
    line = await daemon.wait_line(connected, after=start)
    return daemon.lines.index(line, start)


class Feed:
    """Numbered messages handed in through the ingestion socket, and the observer's view."""

    def __init__(self, socket_path: Path, serial: str) -> None:
        self.socket_path = socket_path
        self.topic = f"dt/{serial}/seq"
        self.sent = 0

    async def send(self, count: int) -> None:
        reader, writer = await asyncio.open_unix_connection(self.socket_path)
        try:
            for _ in range(count):
                self.sent += 1
                line = {"topic": self.topic, "payload": {"n": self.sent}, "qos": 1}
                writer.write(json.dumps(line).encode() + b"\n")
                await writer.drain()
                assert json.loads(await reader.readline())["ok"] is True
        finally:
            writer.close()
            await writer.wait_closed()

    async def all_received(self, observer: aiomqtt.Client, seen: set[int]) -> set[int]:
        """Read the observer until every message sent so far arrived (QoS 1: repeats allowed)."""
        async with asyncio.timeout(15):
            while not set(range(1, self.sent + 1)) <= seen:
                message = await anext(aiter(observer.messages))
                if str(message.topic) == self.topic:
                    seen.add(json.loads(bytes(message.payload))["n"])  # type: ignore[arg-type]
        return seen


async def provision(
    daemon: Daemon, cloud: Cloud, *, lifetime: dt.timedelta | None = None
) -> tuple[CertificateRequest, Issued, bytes]:
    """Start the daemon and deliver its first certificate; return request, certificate, key."""
    await daemon.start()
    first = await cloud.wait_request(1)
    key_pem = (state_dir(daemon) / "pending.key").read_bytes()
    issued = cloud.issue(first, lifetime=lifetime)
    [ack] = await cloud.acks(await cloud.command(cloud.params(first, issued)))
    assert ack.status == "OK"
    assert await cloud.wait_status(1) == Provisioned(first.request_id, issued.certificate_id)
    await daemon.wait_line(connected)
    return first, issued, key_pem


async def test_operator_renewal_rotates_key_and_certificate_and_loses_no_message(
    daemon: Daemon, cloud: Cloud, observer: aiomqtt.Client, serial: str, password: str
) -> None:
    first, issued1, old_key = await provision(daemon, cloud)
    directory = state_dir(daemon)
    feed = Feed(directory / "ingest.sock", serial)
    seen: set[int] = set()
    await feed.send(10)
    await feed.all_received(observer, seen)

    # The operator asks for a renewal: acked OK once the new key and CSR are durable.
    [ack] = await cloud.acks(await cloud.renew())
    assert ack.status == "OK"
    second = await cloud.wait_request(2)
    new_key = (directory / "pending.key").read_bytes()
    assert common_name(second) == common_name(first) == serial
    assert second.serial == serial
    assert second.request_id != first.request_id
    assert public_key_of_csr(second) == public_key_of_pem(new_key)
    assert public_key_of_csr(second) != public_key_of_csr(first)
    report = await asyncio.to_thread(status_json, daemon.config)
    assert report["renewal_in_progress"] is True
    assert report["state"] == "renew_sent"
    assert (report["certificate_id"], report["bundle_version"]) == (issued1.certificate_id, 1)

    # Meanwhile the old certificate keeps publishing; asked again, the gateway says OK.
    await feed.send(10)
    await feed.all_received(observer, seen)
    [again] = await cloud.acks(await cloud.renew())
    assert again.status == "OK"
    assert {r.csr_pem for r in (await cloud.requests())[1:]} == {second.csr_pem}

    # The cloud refuses the renewal: the gateway waits to ask again, still on bundle 1.
    mark = len(daemon.lines)
    [refused] = await cloud.acks(await cloud.command(cloud.refusal_params(second, "not now")))
    assert refused.status == "OK"
    await daemon.wait_state("renew_waiting", after=mark)
    assert (directory / "bundles" / "current").readlink() == Path("v000001")
    await feed.send(5)
    await feed.all_received(observer, seen)

    # The new certificate: bundle 2 committed and reported; the publisher reconnects with it
    # while messages keep coming in, and none is lost.
    mark = len(daemon.lines)
    issued2 = cloud.issue(second)
    [ack] = await cloud.acks(await cloud.command(cloud.params(second, issued2)))
    assert ack.status == "OK"
    assert await cloud.wait_status(2) == Provisioned(second.request_id, issued2.certificate_id)
    await daemon.wait_state("provisioned", after=mark)
    switched = asyncio.create_task(reconnected_with_bundle_2(daemon, after=mark))
    async with asyncio.timeout(15):
        while not switched.done():
            await feed.send(2)
            await asyncio.sleep(0.2)
    await switched
    await feed.send(5)
    await feed.all_received(observer, seen)
    assert feed.sent >= 32

    bundles = directory / "bundles"
    assert (bundles / "current").readlink() == Path("v000002")
    assert (bundles / "v000002" / "key.pem").read_bytes() == new_key
    assert public_key_of_pem((bundles / "v000002" / "key.pem").read_bytes()) != public_key_of_pem(
        old_key
    )
    assert (bundles / "v000002" / "certificate.pem").read_text() == issued2.certificate_pem
    assert not (directory / "pending.key").exists()
    report = await asyncio.to_thread(status_json, daemon.config)
    assert report["state"] == "provisioned"
    assert report["renewal_in_progress"] is False
    assert (report["certificate_id"], report["bundle_version"]) == (issued2.certificate_id, 2)
    assert report["renewal_due"] is not None
    assert await daemon.stop() == 0
    assert_no_secrets(daemon, cloud, password, old_key, new_key)


async def test_killed_mid_renewal_resumes_with_the_same_key_and_publishes_meanwhile(
    daemon: Daemon, cloud: Cloud, observer: aiomqtt.Client, serial: str, password: str
) -> None:
    _, _, old_key = await provision(daemon, cloud)
    directory = state_dir(daemon)
    [ack] = await cloud.acks(await cloud.renew())
    assert ack.status == "OK"
    second = await cloud.wait_request(2)
    new_key = (directory / "pending.key").read_bytes()

    await daemon.kill()
    mark = len(daemon.lines)
    await daemon.start()
    # The publisher runs on the committed bundle at once, while the renewal resumes.
    await daemon.wait_line(connected, after=mark)  # bundle 2 does not exist yet
    feed = Feed(directory / "ingest.sock", serial)
    await feed.send(5)
    await feed.all_received(observer, set())
    assert await cloud.wait_request(3) == second  # the same CSR, the same request id
    assert (directory / "pending.key").read_bytes() == new_key
    report = await asyncio.to_thread(status_json, daemon.config)
    assert report["renewal_in_progress"] is True
    assert report["bundle_version"] == 1
    starts = [line for line in daemon.lines[mark:] if "event=publisher.started" in line]
    assert len(starts) == 1, "one publisher task"

    issued2 = cloud.issue(second)
    [ack] = await cloud.acks(await cloud.command(cloud.params(second, issued2)))
    assert ack.status == "OK"
    await daemon.wait_state("provisioned", after=mark)
    await reconnected_with_bundle_2(daemon, after=mark)
    assert (directory / "bundles" / "v000002" / "key.pem").read_bytes() == new_key
    assert await daemon.stop() == 0
    assert_no_secrets(daemon, cloud, password, old_key, new_key)


async def test_a_short_lived_certificate_is_renewed_automatically(
    daemon: Daemon, cloud: Cloud, password: str
) -> None:
    # Valid for 6 s: renewal is due after 4 s, plus or minus 0.3 s of jitter.
    first, _, old_key = await provision(daemon, cloud, lifetime=dt.timedelta(seconds=6))
    report = await asyncio.to_thread(status_json, daemon.config)
    due = dt.datetime.fromisoformat(report["renewal_due"])
    expires = dt.datetime.fromisoformat(report["certificate_expires"])
    assert dt.timedelta(seconds=1) <= expires - due <= dt.timedelta(seconds=3)
    second = await cloud.wait_request(2)
    assert dt.datetime.now(dt.UTC) >= due - dt.timedelta(seconds=1)
    await daemon.wait_line(lambda line: "event=renewal.started" in line)
    assert public_key_of_csr(second) != public_key_of_csr(first)
    assert common_name(second) == common_name(first)
    new_key = (state_dir(daemon) / "pending.key").read_bytes()

    mark = len(daemon.lines)
    issued2 = cloud.issue(second)  # a year this time
    [ack] = await cloud.acks(await cloud.command(cloud.params(second, issued2)))
    assert ack.status == "OK"
    assert await cloud.wait_status(2) == Provisioned(second.request_id, issued2.certificate_id)
    await daemon.wait_state("provisioned", after=mark)
    report = await asyncio.to_thread(status_json, daemon.config)
    assert (report["certificate_id"], report["bundle_version"]) == (issued2.certificate_id, 2)
    next_due = dt.datetime.fromisoformat(report["renewal_due"])
    assert next_due - dt.datetime.now(dt.UTC) > dt.timedelta(days=200)
    assert await daemon.stop() == 0
    assert_no_secrets(daemon, cloud, password, old_key, new_key)
