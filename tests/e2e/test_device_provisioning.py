"""The device daemon end to end: a real ``ztp-daemon`` process against the sandbox.

The gateway talks to the sandbox device broker (mosquitto); the test plays the cloud through the
AirVantage emulator (its Kinesis connector on a moto server, its REST command operation with the
duplicate and reorder fault knobs) and signs CSRs with the sandbox CA. Every test reads the
process's stderr and checks that no private key, password or token reached a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandbox.brokers import DeviceBroker, IotBroker, client_tls_context
from sandbox.pki import SandboxPki
from shared.messages import Provisioned, Rejected
from tests.e2e.device_fixtures import (
    ENDPOINT,
    OTHER_COMMAND,
    Cloud,
    Daemon,
    assert_no_secrets,
    daemon_config,
    open_cloud,
    public_key_of_csr,
    public_key_of_pem,
    state_dir,
    status_json,
)
from ztp_daemon.bundle import Bundle
from ztp_daemon.config import load_device_config
from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.link import CONNECTION_TASK_NAME
from ztp_daemon.machine import State, StateRecord, request_id_for
from ztp_daemon.state import StateFile
from ztp_daemon.supervisor import MACHINE_TASK_NAME, PUBLISHER_TASK_NAME, serve


@pytest.fixture
def serial() -> str:
    return f"SN{uuid.uuid4().hex[:12].upper()}"


@pytest.fixture
def password() -> str:
    return f"av-{uuid.uuid4().hex}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def corrupt(params: dict[str, str]) -> dict[str, str]:
    """Change one character in the body of the second fragment (still valid base64url)."""
    key = sorted(params)[1]
    text = params[key]
    position = len(text) - 5
    swapped = "B" if text[position] != "B" else "C"
    return {**params, key: text[:position] + swapped + text[position + 1 :]}


async def test_fresh_gateway_is_provisioned_from_shuffled_duplicated_fragments(
    daemon: Daemon, cloud: Cloud, serial: str, password: str, iot_broker: IotBroker
) -> None:
    observer = aiomqtt.Client(
        iot_broker.address.host,
        iot_broker.address.port,
        identifier=f"observer-{serial}",
        tls_context=client_tls_context(iot_broker.address, iot_broker.observer),
    )
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
    # Ingestion is open before the certificate arrives: the line waits in the outbox, and the
    # observer, subscribed before the publisher can connect, sees it once provisioned.
    async with observer:
        await observer.subscribe(f"dt/{serial}/#", qos=1)
        [early] = await ingest(
            directory / "ingest.sock",
            {"topic": f"dt/{serial}/boot", "payload": {"up": 1}, "qos": 1},
        )
        assert early["ok"] is True

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

        # The publisher took over with the delivered certificate: mutual TLS to the IoT broker.
        await daemon.wait_line(lambda line: "event=publisher.connected" in line)
        # A gateway program's line on the ingestion socket reaches the IoT broker; a line outside
        # the thing's own prefix is refused on the socket.
        replies = await ingest(
            directory / "ingest.sock",
            {"topic": f"dt/{serial}/sensors", "payload": {"t": 21.5}, "qos": 1},
            {"topic": "dt/SOMEONE-ELSE/sensors", "payload": 1, "qos": 1},
        )
        assert replies[0]["ok"] is True
        assert replies[1]["ok"] is False
        received: dict[str, bytes] = {}
        async with asyncio.timeout(10):
            async for message in observer.messages:
                received[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
                if {f"dt/{serial}/sensors", f"dt/{serial}/boot"} <= received.keys():
                    break
        assert json.loads(received[f"dt/{serial}/sensors"]) == {"t": 21.5}
        assert json.loads(received[f"dt/{serial}/boot"]) == {"up": 1}

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


async def test_serve_in_process_refuses_settings_and_hands_the_bundle_to_the_publisher(
    tmp_path: Path,
    broker: DeviceBroker,
    pki: SandboxPki,
    cloud: Cloud,
    identity: tuple[str, str],
) -> None:
    serial, password = identity
    config = load_device_config(
        daemon_config(tmp_path, serial=serial, password=password, broker=broker, pki=pki), {}
    )
    opened: list[Bundle] = []
    publishing = asyncio.Event()
    closed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def publisher(bundle: Bundle) -> AsyncIterator[None]:
        opened.append(bundle)
        publishing.set()
        try:
            yield
        finally:
            closed.set()

    stop = asyncio.Event()
    ready = asyncio.Event()

    async def shutdown() -> None:
        await stop.wait()

    running = asyncio.create_task(
        serve(
            config,
            shutdown=shutdown,
            ready=ready,
            publisher_factory=publisher,
            rng=random.Random(1),
        )
    )
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        request = await cloud.wait_request(1)
        # A settings write is not a command: refused by its uid, and nothing else changes.
        [ack] = await cloud.acks(await cloud.settings({"/ztp/ztp/endpoint": "x.example.com"}))
        assert ack.status == "ERROR"
        assert ack.message is not None
        assert "not a command task" in ack.message
        issued = cloud.issue(request)
        [ack] = await cloud.acks(await cloud.command(cloud.params(request, issued)))
        assert ack.status == "OK"
        async with asyncio.timeout(10):
            await publishing.wait()
        [bundle] = opened
        assert (bundle.version, bundle.certificate_id) == (1, issued.certificate_id)
        assert bundle.endpoint == ENDPOINT
        names = {task.get_name() for task in asyncio.all_tasks()}
        assert {MACHINE_TASK_NAME, PUBLISHER_TASK_NAME, CONNECTION_TASK_NAME} <= names
        assert not closed.is_set()
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await running
    assert closed.is_set()
    names = {task.get_name() for task in asyncio.all_tasks()}
    assert not {MACHINE_TASK_NAME, PUBLISHER_TASK_NAME, CONNECTION_TASK_NAME} & names


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZTP_")}
    return subprocess.run(
        [sys.executable, "-m", "ztp_daemon", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
        env={**base, **(env or {})},
    )


def test_cli_help_status_and_a_bad_configuration(tmp_path: Path, pki: SandboxPki) -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    assert "run" in top.stdout
    assert "status" in top.stdout
    run_help = run_cli("run", "--help")
    assert run_help.returncode == 0
    assert "ZTP_AIRVANTAGE_PASSWORD_FILE" in run_help.stdout
    assert "ZTP_RENEWAL_AT_FRACTION" in run_help.stdout
    assert "ztp.renew" in top.stdout

    fresh = run_cli("status", "--state-dir", str(tmp_path / "none"))
    assert fresh.returncode == 0
    assert fresh.stdout.splitlines()[0].split()[:2] == ["state:", "fresh"]

    # A gateway waiting to retry: the person reading sees why and when.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = build_csr(key, CsrSubject("SN-STATUS"))
    StateFile(tmp_path / "state").save(
        StateRecord(
            State.WAITING_RETRY,
            request_id_for(csr),
            csr,
            attempts=3,
            next_retry_at=2_000_000_000.0,
            last_error="expired: valid until 2025-01-01",
        )
    )
    human = run_cli("status", "--state-dir", str(tmp_path / "state"))
    assert human.returncode == 0
    assert "waiting_retry" in human.stdout
    assert "SN-STATUS" in human.stdout
    assert "expired: valid until 2025-01-01" in human.stdout
    assert "2033-05-18T03:33:20+00:00" in human.stdout
    config = tmp_path / "ztp.toml"
    config.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\n')
    machine = run_cli("status", "--json", "--config", str(config))
    assert machine.returncode == 0
    report = json.loads(machine.stdout)
    assert (report["state"], report["serial"], report["attempts"]) == (
        "waiting_retry",
        "SN-STATUS",
        3,
    )
    assert report["renewal_in_progress"] is False

    # A gateway renewing: the person reading sees that the old certificate stays in use.
    key2 = ec.generate_private_key(ec.SECP256R1())
    csr2 = build_csr(key2, CsrSubject("SN-STATUS"))
    StateFile(tmp_path / "renewing").save(
        StateRecord(
            State.RENEW_SENT,
            request_id_for(csr2),
            csr2,
            attempts=1,
            bundle_version=1,
            certificate_id="c" * 64,
            renew_at=1_900_000_000.0,
        )
    )
    renewing = run_cli("status", "--state-dir", str(tmp_path / "renewing"))
    assert renewing.returncode == 0
    assert "renew_sent" in renewing.stdout
    assert "renewal:             in progress" in renewing.stdout

    # No password anywhere: refused by key before anything starts, the secret never echoed.
    missing = run_cli("run", "--config", str(config))
    assert missing.returncode == 2
    assert "airvantage.password" in missing.stderr
    bad = run_cli(
        "run",
        "--config",
        str(config),
        env={"ZTP_AIRVANTAGE_PASSWORD": "pw-123", "ZTP_RETRY_CAP": "x"},
    )
    assert bad.returncode == 2
    assert "ZTP_RETRY_CAP" in bad.stderr
    assert "pw-123" not in bad.stderr + bad.stdout

    # A damaged state file: neither command starts afresh over it (that would make a second key).
    (tmp_path / "state" / "state.json").write_text("{not json")
    damaged = run_cli("status", "--state-dir", str(tmp_path / "state"))
    assert damaged.returncode == 1
    assert "state.json" in damaged.stderr
    refused = run_cli(
        "run",
        "--config",
        str(config),
        env={
            "ZTP_AIRVANTAGE_PASSWORD": "pw-123",
            "ZTP_DEVICE_SERIAL": "SN-STATUS",
            "ZTP_LOG_DESTINATION": "stderr",
        },
    )
    assert refused.returncode == 1
    assert "event=daemon.failed error=StorageError" in refused.stderr
    assert "pw-123" not in refused.stderr
    assert not (tmp_path / "state" / "pending.key").exists()


@pytest.mark.slow
async def test_a_request_lost_to_a_stalled_link_goes_again_once_reconnected(
    tmp_path: Path, pki: SandboxPki, moto_endpoint: str, identity: tuple[str, str]
) -> None:
    serial, password = identity
    (tmp_path / "stalled").mkdir()
    async with DeviceBroker(tmp_path / "stalled", pki=pki) as stalled:
        config = daemon_config(
            tmp_path / "gateway",
            serial=serial,
            password=password,
            broker=stalled,
            pki=pki,
            retry=1.0,
            publish_timeout=0.4,
        )
        daemon = Daemon(config, tmp_path / "daemon.log")
        async with open_cloud(
            broker=stalled,
            pki=pki,
            aws_endpoint_url=moto_endpoint,
            serial=serial,
            password=password,
        ) as cloud:
            try:
                await daemon.start()
                first = await cloud.wait_request(1)
                pid = stalled.pid
                assert pid is not None
                # The broker stops answering; the retry timer's re-send gets no PUBACK.
                os.kill(pid, signal.SIGSTOP)
                try:
                    deferred = await daemon.wait_line(
                        lambda line: (
                            "event=link.send_deferred" in line and "action=PublishRequest" in line
                        )
                    )
                finally:
                    os.kill(pid, signal.SIGCONT)
                mark = daemon.lines.index(deferred)
                await daemon.wait_line(lambda line: "event=link.connected" in line, after=mark)
                await daemon.wait_line(lambda line: "event=request.sent" in line, after=mark)
                sent = await cloud.requests()
                assert len(sent) >= 2
                assert {r.csr_pem for r in sent} == {first.csr_pem}
                issued = cloud.issue(first)
                [ack] = await cloud.acks(await cloud.command(cloud.params(first, issued)))
                assert ack.status == "OK"
                assert await cloud.wait_provisioned() == Provisioned(
                    first.request_id, issued.certificate_id
                )
                assert await daemon.stop() == 0
            finally:
                if daemon.running:
                    await daemon.kill()
            assert_no_secrets(daemon, cloud, password)


async def test_systemd_hears_ready_status_watchdog_and_stopping(
    tmp_path: Path, daemon: Daemon, cloud: Cloud
) -> None:
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
        listener.setblocking(False)  # noqa: FBT003 - the socket API takes a bare flag
        loop = asyncio.get_running_loop()
        heard: list[str] = []

        async def hear(predicate: Callable[[str], bool]) -> str:
            async with asyncio.timeout(10):
                while True:
                    datagram = (await loop.sock_recv(listener, 4096)).decode()
                    heard.append(datagram)
                    if predicate(datagram):
                        return datagram

        # A 1 s watchdog: pings every 0.5 s, while the machine loop beats every 0.25 s.
        await daemon.start(env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "1000000"})
        ready = await hear(lambda d: "READY=1" in d)
        assert "STATUS=provisioning:" in ready
        await cloud.wait_request(1)
        if not any("STATUS=provisioning: request_sent" in d for d in heard):
            await hear(lambda d: "STATUS=provisioning: request_sent" in d)
        for _ in range(2):
            await hear(lambda d: d.strip() == "WATCHDOG=1")
        assert await daemon.stop() == 0
        await hear(lambda d: "STOPPING=1" in d)


async def ingest(socket_path: Path, *lines: dict[str, object]) -> list[dict[str, object]]:
    """Write JSON lines to the daemon's ingestion socket and read one reply line for each."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    try:
        replies = []
        for line in lines:
            writer.write(json.dumps(line).encode() + b"\n")
            await writer.drain()
            replies.append(json.loads(await reader.readline()))
        return replies
    finally:
        writer.close()
        await writer.wait_closed()
