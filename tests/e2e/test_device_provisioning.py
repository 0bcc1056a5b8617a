"""The device daemon end to end: a real ``ztp-daemon`` process against the sandbox.

The gateway talks to the sandbox device broker (mosquitto); the test plays the cloud through the
AirVantage emulator (its Kinesis connector on a moto server, its REST command operation with the
duplicate and reorder fault knobs) and signs CSRs with the sandbox CA. Every test reads the
process's stderr and checks that no private key, password or token reached a log line.
"""

from __future__ import annotations

import asyncio
import random
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from shared.messages import CertificateRequest, Provisioned, Rejected
from tests.e2e.device_fixtures import (
    ENDPOINT,
    OTHER_COMMAND,
    Cloud,
    Daemon,
    daemon_config,
    open_cloud,
    status_json,
)
from tests.sandbox.airvantage_fixtures import run_moto
from tests.sandbox.conftest import run_on_private_loop


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[DeviceBroker]:
    running = DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=pki)
    run_on_private_loop(running.start())
    try:
        yield running
    finally:
        run_on_private_loop(running.stop())


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with run_moto() as endpoint:
        yield endpoint


@pytest.fixture
def serial() -> str:
    return f"SN{uuid.uuid4().hex[:12].upper()}"


@pytest.fixture
def password() -> str:
    return f"av-{uuid.uuid4().hex}"


@pytest.fixture
async def cloud(
    broker: DeviceBroker, pki: SandboxPki, moto_endpoint: str, serial: str, password: str
) -> AsyncIterator[Cloud]:
    async with open_cloud(
        broker=broker, pki=pki, aws_endpoint_url=moto_endpoint, serial=serial, password=password
    ) as playing:
        yield playing


@pytest.fixture
async def daemon(
    tmp_path: Path, broker: DeviceBroker, pki: SandboxPki, serial: str, password: str
) -> AsyncIterator[Daemon]:
    config = daemon_config(
        tmp_path / "gateway", serial=serial, password=password, broker=broker, pki=pki
    )
    process = Daemon(config, tmp_path / "daemon.log")
    yield process
    if process.running:
        await process.kill()


def state_dir(daemon: Daemon) -> Path:
    return daemon.config.parent / "state"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_no_secrets(daemon: Daemon, cloud: Cloud, password: str, *key_pems: bytes) -> None:
    text = daemon.text()
    assert daemon.lines, "the daemon logged nothing"
    assert password not in text
    assert "PRIVATE KEY" not in text
    assert cloud.token
    assert cloud.token not in text
    for pem in key_pems:
        for line in pem.decode().splitlines():
            if "-----" not in line and len(line) >= 16:
                assert line not in text


def public_key_of_csr(request: CertificateRequest) -> bytes:
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_of_pem(key_pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def corrupt(params: dict[str, str]) -> dict[str, str]:
    """Change one character in the body of the second fragment (still valid base64url)."""
    key = sorted(params)[1]
    text = params[key]
    position = len(text) - 5
    swapped = "B" if text[position] != "B" else "C"
    return {**params, key: text[:position] + swapped + text[position + 1 :]}


async def test_fresh_gateway_is_provisioned_from_shuffled_duplicated_fragments(
    daemon: Daemon, cloud: Cloud, serial: str, password: str
) -> None:
    await daemon.start()
    request = await cloud.wait_request(1)
    directory = state_dir(daemon)
    key_pem = (directory / "pending.key").read_bytes()
    assert request.serial == serial
    csr = x509.load_pem_x509_csr(request.csr_pem.encode())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == serial
    assert public_key_of_csr(request) == public_key_of_pem(key_pem)
    assert mode(directory) == 0o700
    assert mode(directory / "pending.key") == 0o600

    issued = cloud.issue(request)
    items = list(cloud.params(request, issued).items())
    assert len(items) > 3
    random.Random(4).shuffle(items)
    # The emulator holds every fragment task, then publishes them reversed, each one twice.
    await cloud.set_faults(reorder_tasks=len(items), duplicate_tasks=len(items))
    operations = [await cloud.command({key: value}) for key, value in items]
    acks = await cloud.acks(*operations)
    assert [ack.status for ack in acks] == ["OK"] * len(items)
    assert await cloud.wait_status(1) == Provisioned(request.request_id, issued.certificate_id)
    await daemon.wait_state("provisioned")

    bundles = directory / "bundles"
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "v000001"]
    version = bundles / "v000001"
    assert mode(version) == 0o700
    assert mode(version / "key.pem") == 0o600
    assert (version / "key.pem").read_bytes() == key_pem
    assert (version / "certificate.pem").read_text() == issued.certificate_pem
    assert not (directory / "pending.key").exists()

    report = await asyncio.to_thread(status_json, daemon.config)
    assert report["state"] == "provisioned"
    assert report["serial"] == serial
    assert report["certificate_id"] == issued.certificate_id
    assert report["endpoint"] == ENDPOINT
    assert report["certificate_expired"] is False
    assert await daemon.stop() == 0
    assert_no_secrets(daemon, cloud, password, key_pem)


async def test_bad_deliveries_and_unknown_commands_are_refused_and_the_daemon_runs_on(
    daemon: Daemon, cloud: Cloud, serial: str, password: str
) -> None:
    await daemon.start()
    request = await cloud.wait_request(1)
    key_pem = (state_dir(daemon) / "pending.key").read_bytes()
    good = cloud.issue(request)
    cases = [
        ("wrong_key", cloud.params(request, cloud.issue(request, other_key=True))),
        ("expired", cloud.params(request, cloud.issue(request, expired=True))),
        ("subject_mismatch", cloud.params(request, cloud.issue(request, common_name="SN-OTHER"))),
        ("DigestMismatchError", corrupt(cloud.params(request, good))),
    ]
    for reason, params in cases:
        [ack] = await cloud.acks(await cloud.command(params))
        assert ack.status == "ERROR", reason
        assert ack.message is not None
        assert reason in ack.message
        assert daemon.running
    [ack] = await cloud.acks(await cloud.command({"f01": "x"}, command=OTHER_COMMAND))
    assert ack.status == "ERROR"
    assert ack.message == f"unknown command {OTHER_COMMAND!r}"

    # Each verification failure was reported as a rejection of our request.
    rejected = [s for s in await cloud.statuses() if isinstance(s, Rejected)]
    assert [r.reason.split(":")[0] for r in rejected] == [
        "wrong_key",
        "expired",
        "subject_mismatch",
    ]
    assert {r.request_id for r in rejected} == {request.request_id}

    # Still alive and still asking for the same certificate: the good delivery is taken.
    [ack] = await cloud.acks(await cloud.command(cloud.params(request, good)))
    assert ack.status == "OK"
    assert await cloud.wait_status(4) == Provisioned(request.request_id, good.certificate_id)
    assert {r.csr_pem for r in await cloud.requests()} == {request.csr_pem}
    assert daemon.running
    assert await daemon.stop() == 0
    assert_no_secrets(daemon, cloud, password, key_pem)


@pytest.mark.slow
async def test_killed_in_each_state_and_restarted_keeps_one_key_one_csr_one_bundle(
    daemon: Daemon, cloud: Cloud, password: str
) -> None:
    directory = state_dir(daemon)

    async def restart() -> int:
        await daemon.kill()
        mark = len(daemon.lines)
        await daemon.start()
        return mark

    # Killed while starting afresh (making the key, or just after).
    await daemon.start()
    await daemon.wait_line(lambda line: "event=supervisor.starting" in line)
    await restart()
    first = await cloud.wait_request(1)
    key_pem = (directory / "pending.key").read_bytes()
    assert public_key_of_csr(first) == public_key_of_pem(key_pem)

    # Killed with the request sent: the same CSR goes out again.
    sent = len(await cloud.requests())
    await restart()
    assert await cloud.wait_request(sent + 1) == first

    # Killed while receiving fragments: the partial delivery is forgotten, the CSR re-sent.
    issued = cloud.issue(first)
    params = cloud.params(first, issued)
    half = dict(sorted(params.items())[: len(params) // 2])
    [ack] = await cloud.acks(await cloud.command(half))
    assert ack.status == "OK"
    await daemon.wait_state("receiving")
    sent = len(await cloud.requests())
    await restart()
    assert await cloud.wait_request(sent + 1) == first

    # Killed while waiting to retry after a refused delivery: it waits, then re-sends.
    [ack] = await cloud.acks(
        await cloud.command(cloud.params(first, cloud.issue(first, expired=True)))
    )
    assert ack.status == "ERROR"
    mark = len(daemon.lines)
    await daemon.wait_state("waiting_retry", after=mark)
    sent = len(await cloud.requests())
    await restart()
    assert await cloud.wait_request(sent + 1) == first

    # Killed while storing (or just after): the unacked task comes again, stored once.
    mark = len(daemon.lines)
    await cloud.command(cloud.params(first, issued))
    await daemon.wait_state("storing", after=mark)
    mark = await restart()
    await daemon.wait_state("provisioned", after=mark)

    # Killed once provisioned: it comes back provisioned, and says so (again, if need be).
    mark = await restart()
    await daemon.wait_state("provisioned", after=mark)
    assert await cloud.wait_provisioned() == Provisioned(first.request_id, issued.certificate_id)
    assert daemon.running
    assert await daemon.stop() == 0

    assert {r.csr_pem for r in await cloud.requests()} == {first.csr_pem}
    bundles = directory / "bundles"
    assert sorted(p.name for p in bundles.iterdir()) == ["current", "v000001"]
    assert (bundles / "current").readlink() == Path("v000001")
    assert (bundles / "v000001" / "key.pem").read_bytes() == key_pem
    assert mode(bundles / "v000001") == 0o700
    assert mode(bundles / "v000001" / "key.pem") == 0o600
    assert not (directory / "pending.key").exists()
    report = await asyncio.to_thread(status_json, daemon.config)
    assert report["state"] == "provisioned"
    assert report["certificate_id"] == issued.certificate_id
    assert_no_secrets(daemon, cloud, password, key_pem)
