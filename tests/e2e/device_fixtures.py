"""Helpers for the device daemon's end-to-end tests: the cloud played by the test, and the daemon
as a real ``ztp-daemon`` process.

- :class:`Cloud` plays the cloud daemon against the sandbox's AirVantage emulator: it reads the
  gateway's certificate requests (and status reports) out of the Kinesis stream the emulator's
  connector writes, signs CSRs with the sandbox CA, and delivers certificates in fragments
  through the emulator's REST command operation, reading the device's acks back.
- :class:`Daemon` runs ``python -m ztp_daemon run --config FILE`` with its logs on stderr, reads
  every log line as it comes (tests wait for a line, never sleep), and can SIGKILL it.
- :func:`state_dir`, :func:`public_key_of_csr`, :func:`public_key_of_pem` and
  :func:`assert_no_secrets` are what the tests check a gateway with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sandbox.airvantage import AckSeen, AirVantageEmulator, ApplicationModel, OperationState
from sandbox.brokers import BrokerAddress, DeviceBroker
from sandbox.pki import SandboxPki, issue_certificate
from shared.airvantage import IncomingCommunication, parse_envelope
from shared.fragments import Completed, Reassembler
from shared.messages import (
    DELIVER_COMMAND,
    RENEW_COMMAND,
    STATUS_PATH,
    CertificateDelivery,
    CertificateRequest,
    Provisioned,
    Rejected,
    StatusReport,
    decode_request,
    decode_status,
    delivery_params,
    request_fragments,
)
from tests.sandbox.airvantage_fixtures import create_stream

__all__ = [
    "CLIENT_ID",
    "CLIENT_SECRET",
    "ENDPOINT",
    "REGION",
    "Cloud",
    "Daemon",
    "Issued",
    "assert_no_secrets",
    "daemon_config",
    "open_cloud",
    "public_key_of_csr",
    "public_key_of_pem",
    "state_dir",
    "status_json",
    "ztp_model",
]

REGION = "eu-west-1"
CLIENT_ID = "ztp-cloud"
CLIENT_SECRET = "cloud-client-secret-e2e"
ENDPOINT = "iot.sandbox.localhost"
WAIT = 15.0
#: A command the model declares but the device does not know.
OTHER_COMMAND = "ztp.reboot"


def ztp_model() -> ApplicationModel:
    """The project's model plus one unknown command and one setting, for the refusal tests.

    The daemon must refuse a command it does not know and a settings write with an ERROR ack;
    the shipped model declares neither, so AirVantage (and the emulator) would not send them.
    """
    base = ApplicationModel.load()
    commands = dict(base.commands)
    extra = ApplicationModel.from_json(
        {"type": "x", "commands": [{"id": OTHER_COMMAND, "parameters": None}]}
    )
    commands.update(extra.commands)
    return ApplicationModel(
        app_type=base.app_type,
        variables=base.variables,
        settings=base.settings | {"/ztp/ztp/endpoint"},
        commands=commands,
    )


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate the test cloud made for a request."""

    certificate_pem: str
    certificate_id: str


def certificate_id_of(cert: x509.Certificate) -> str:
    """AWS IoT's certificate id: the SHA-256 of the DER, in hex."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass
class Cloud:
    """The cloud side of the conversation, driven by the test."""

    emulator: AirVantageEmulator
    pki: SandboxPki
    aws_endpoint_url: str
    stream: str
    serial: str
    http: aiohttp.ClientSession
    token: str = ""
    _transfers: int = field(default=0)

    # -- reading what the device sent -----------------------------------------------------------

    async def _envelopes(self) -> list[IncomingCommunication]:
        found: list[IncomingCommunication] = []
        async with get_session().create_client(
            "kinesis",
            region_name=REGION,
            endpoint_url=self.aws_endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=AioConfig(retries={"total_max_attempts": 1}),
        ) as kinesis:
            shards = (await kinesis.list_shards(StreamName=self.stream))["Shards"]
            for shard in shards:
                iterator = (
                    await kinesis.get_shard_iterator(
                        StreamName=self.stream,
                        ShardId=shard["ShardId"],
                        ShardIteratorType="TRIM_HORIZON",
                    )
                )["ShardIterator"]
                while iterator:
                    page = await kinesis.get_records(ShardIterator=iterator, Limit=1000)
                    for record in page["Records"]:
                        event = parse_envelope(record["Data"])
                        if isinstance(event, IncomingCommunication):
                            found.append(event)
                    if not page["Records"]:
                        break
                    iterator = page.get("NextShardIterator")
        return [e for e in found if e.serial == self.serial]

    async def requests(self) -> list[CertificateRequest]:
        """Every complete request the gateway sent, in order (each attempt is one transfer)."""
        reassembler = Reassembler()
        requests: list[CertificateRequest] = []
        for event in await self._envelopes():
            for text in request_fragments(event.points):
                outcome = reassembler.receive(text, now=0.0, source=self.serial)
                if isinstance(outcome, Completed):
                    requests.append(decode_request(outcome.payload))
        return requests

    async def statuses(self) -> list[StatusReport]:
        """Every status report the gateway sent, in order."""
        return [
            decode_status(point.value)
            for event in await self._envelopes()
            for point in event.points
            if point.path == STATUS_PATH
        ]

    async def _more_records(self, seen: int) -> None:
        await self.emulator.wait_until(lambda: len(self.emulator.records_put) > seen, within=WAIT)

    async def wait_request(self, count: int) -> CertificateRequest:
        """Wait until the gateway has sent ``count`` requests; return the last."""
        async with asyncio.timeout(WAIT):
            while True:
                seen = len(self.emulator.records_put)
                requests = await self.requests()
                if len(requests) >= count:
                    return requests[-1]
                await self._more_records(seen)

    async def wait_status(self, count: int) -> StatusReport:
        """Wait until the gateway has sent ``count`` status reports; return the last."""
        async with asyncio.timeout(WAIT):
            while True:
                seen = len(self.emulator.records_put)
                statuses = await self.statuses()
                if len(statuses) >= count:
                    return statuses[-1]
                await self._more_records(seen)

    async def wait_provisioned(self) -> Provisioned:
        """Wait until the gateway has reported ``provisioned``; return the first such report."""
        count = 1
        while True:
            await self.wait_status(count)
            found = [s for s in await self.statuses() if isinstance(s, Provisioned)]
            if found:
                return found[0]
            count = len(await self.statuses()) + 1

    # -- making certificates --------------------------------------------------------------------

    def issue(
        self,
        request: CertificateRequest,
        *,
        other_key: bool = False,
        common_name: str | None = None,
        expired: bool = False,
        lifetime: dt.timedelta | None = None,
    ) -> Issued:
        """Sign the request's CSR with the sandbox CA, or a deliberately wrong variant of it.

        With ``lifetime``, the certificate is valid from one second ago for exactly that long
        (a short-lived certificate, for the automatic renewal).
        """
        csr = x509.load_pem_x509_csr(request.csr_pem.encode("ascii"))
        public_key = csr.public_key()
        if other_key:
            public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        subject = csr.subject
        if common_name is not None:
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        if lifetime is not None:
            start = now - dt.timedelta(seconds=1)
            short = (
                x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.pki.ca_cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + lifetime)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
                )
                .sign(self.pki.ca_key, hashes.SHA256())
            )
            return Issued(
                short.public_bytes(serialization.Encoding.PEM).decode(), certificate_id_of(short)
            )
        cert = issue_certificate(
            public_key=public_key,
            subject=subject,
            ca_cert=self.pki.ca_cert,
            ca_key=self.pki.ca_key,
            now=now - dt.timedelta(days=400) if expired else now,
            validity=dt.timedelta(days=1 if expired else 365),
        )
        return Issued(
            cert.public_bytes(serialization.Encoding.PEM).decode(), certificate_id_of(cert)
        )

    def params(self, request: CertificateRequest, issued: Issued) -> dict[str, str]:
        """The ``ztp.deliver`` parameters of a delivery, under a fresh transfer id."""
        self._transfers += 1
        delivery = CertificateDelivery(
            request.request_id, issued.certificate_id, ENDPOINT, issued.certificate_pem
        )
        return delivery_params(
            delivery, transfer_id=f"t{uuid.uuid4().hex[:12]}", seq=self._transfers
        )

    def refusal_params(self, request: CertificateRequest, reason: str) -> dict[str, str]:
        """The ``ztp.deliver`` parameters of the cloud refusing the request."""
        self._transfers += 1
        return delivery_params(
            Rejected(request.request_id, reason),
            transfer_id=f"t{uuid.uuid4().hex[:12]}",
            seq=self._transfers,
        )

    # -- delivering -----------------------------------------------------------------------------

    async def _api(self, path: str, body: Mapping[str, Any]) -> Any:
        if not self.token:
            async with self.http.post(
                f"{self.emulator.api_url}/api/oauth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
            ) as response:
                response.raise_for_status()
                self.token = (await response.json())["access_token"]
        async with self.http.post(
            f"{self.emulator.api_url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            response.raise_for_status()
            return await response.json()

    async def command(self, params: Mapping[str, str], *, command: str = DELIVER_COMMAND) -> str:
        """Create a command operation for the gateway; return the operation uid."""
        system = self.emulator.system_uid(self.serial)
        body = {"systems": {"uids": [system]}, "commandId": command, "parameters": dict(params)}
        answer = await self._api("/api/v1/operations/systems/command", body)
        return str(answer["operation"])

    async def renew(self) -> str:
        """Ask the gateway to renew its certificate, as an operator would; return the operation."""
        return await self.command({}, command=RENEW_COMMAND)

    async def settings(self, settings: Mapping[str, str]) -> str:
        """Create a settings operation for the gateway; return the operation uid."""
        system = self.emulator.system_uid(self.serial)
        body = {
            "systems": {"uids": [system]},
            "settings": [{"key": key, "value": value} for key, value in settings.items()],
            "reboot": False,
        }
        answer = await self._api("/api/v1/operations/systems/settings", body)
        return str(answer["operation"])

    async def set_faults(self, **knobs: int) -> None:
        """Set the emulator's fault knobs through its REST control route."""
        async with self.http.post(
            f"{self.emulator.api_url}/_emulator/faults", json=knobs
        ) as response:
            response.raise_for_status()

    async def acks(self, *operations: str) -> list[AckSeen]:
        """Wait until the operations are FINISHED; return the first ack of each of their tasks."""
        await self.emulator.wait_until(
            lambda: all(
                self.emulator.operation(uid).state is OperationState.FINISHED for uid in operations
            ),
            within=WAIT,
        )
        tasks = [task for uid in operations for task in self.emulator.operation(uid).task_uids]
        return [next(a for a in self.emulator.acks_seen if a.uid == task) for task in tasks]


@contextlib.asynccontextmanager
async def open_cloud(
    *,
    broker: DeviceBroker,
    pki: SandboxPki,
    aws_endpoint_url: str,
    serial: str,
    password: str,
    redelivery_interval: float | None = 2.0,
) -> AsyncIterator[Cloud]:
    """An emulator on the broker with a fresh stream, the gateway registered, and a Cloud."""
    stream = f"ztp-{uuid.uuid4().hex[:12]}"
    await create_stream(aws_endpoint_url, stream)
    emulator = AirVantageEmulator(
        broker_host=broker.address.host,
        broker_port=broker.address.port,
        admin_username=broker.admin_username,
        admin_password=broker.admin_password,
        aws_endpoint_url=aws_endpoint_url,
        region=REGION,
        stream_name=stream,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        model=ztp_model(),
        redelivery_interval=redelivery_interval,
        activity_gap=0.5,
        on_register=broker.add_device,
    )
    async with emulator, aiohttp.ClientSession() as http:
        await emulator.register_system(serial, password)
        yield Cloud(emulator, pki, aws_endpoint_url, stream, serial, http)


def daemon_config(
    directory: Path,
    *,
    serial: str,
    password: str,
    broker: DeviceBroker,
    pki: SandboxPki,
    retry: float = 4.0,
    check_cn: bool = True,
    iot: BrokerAddress | None = None,
    publish_timeout: float = 5.0,
) -> Path:
    """Write the daemon's TOML configuration (and its password file) into ``directory``.

    With ``iot``, the publisher is enabled and pointed at that broker (the delivered endpoint
    is a sandbox name that does not resolve).
    """
    directory.mkdir(parents=True, exist_ok=True)
    password_file = directory / "airvantage-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    publisher = "enabled = false"
    if iot is not None:
        publisher = (
            f'enabled = true\nhost = "{iot.host}"\nport = {iot.port}\nca_file = "{iot.ca_file}"'
        )
    config = directory / "ztp.toml"
    config.write_text(
        f"""
[device]
serial = "{serial}"
state_dir = "{directory / "state"}"

[airvantage]
host = "{broker.address.host}"
port = {broker.address.port}
tls = false
password_file = "{password_file}"
connect_timeout = 5.0
publish_timeout = {publish_timeout}
backoff_base = 0.05
backoff_cap = 0.5
min_connect_interval = 0.05

[verification]
check_cn = {"true" if check_cn else "false"}
ca_bundle = "{pki.ca_file}"

[retry]
first = {retry}
cap = {retry}

[publisher]
{publisher}

[log]
destination = "stderr"
level = "debug"
"""
    )
    return config


class Daemon:
    """One ``ztp-daemon run`` process at a time, restartable; its log lines kept for the test.

    Args:
        config: the configuration file.
        log_file: where every line of every run is appended too (for a failing test's report).
    """

    def __init__(self, config: Path, log_file: Path) -> None:
        self.config = config
        self.log_file = log_file
        self.lines: list[str] = []
        self.runs = 0
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._process is not None and self._process.returncode is None

    async def start(self, *, env: Mapping[str, str] | None = None) -> None:
        """Start a run (with ``env`` added to a clean environment); read its lines from now on."""
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("ZTP_", "NOTIFY_", "WATCHDOG_"))
        }
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ztp_daemon",
            "run",
            "--config",
            str(self.config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**clean, **(env or {})},
        )
        self.runs += 1
        self._reader = asyncio.create_task(self._read(self._process), name="test.daemon-log")

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        with self.log_file.open("a") as copy:
            copy.write(f"--- run {self.runs} ---\n")
            while line := await process.stderr.readline():
                text = line.decode(errors="replace").rstrip("\n")
                copy.write(text + "\n")
                copy.flush()
                self.lines.append(text)
                self._changed.set()
        self._changed.set()

    async def wait_line(self, predicate: Callable[[str], bool], *, after: int = 0) -> str:
        """Wait for a log line (from index ``after`` on) satisfying ``predicate``."""
        async with asyncio.timeout(WAIT):
            while True:
                for line in self.lines[after:]:
                    if predicate(line):
                        return line
                if not self.running and self._reader is not None and self._reader.done():
                    raise AssertionError(f"the daemon exited; see {self.log_file}")
                self._changed.clear()
                await self._changed.wait()

    async def wait_state(self, state: str, *, after: int = 0) -> None:
        """Wait until the daemon logs that it is in ``state`` (logged once it is durable)."""
        await self.wait_line(
            lambda line: "event=provisioning.state" in line and f"state={state}" in line,
            after=after,
        )

    async def kill(self) -> None:
        """SIGKILL the process and reap it."""
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGKILL)
        await self._process.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self) -> int:
        """SIGTERM the process; return its exit status."""
        assert self._process is not None
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await self._process.wait()
        if self._reader is not None:
            await self._reader
        return code

    def text(self) -> str:
        """Every line of every run."""
        return "\n".join(self.lines)


def status_json(config: Path) -> dict[str, Any]:
    """Run ``ztp-daemon status --json --config FILE`` (synchronously) and decode its output."""
    done = subprocess.run(
        [sys.executable, "-m", "ztp_daemon", "status", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def state_dir(daemon: Daemon) -> Path:
    return daemon.config.parent / "state"


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
