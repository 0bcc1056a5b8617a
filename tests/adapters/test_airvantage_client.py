"""The AirVantage REST client against the emulator (real aiohttp server, mosquitto, moto).

A test device (a plain aiomqtt client) takes ``ztp.deliver`` tasks, reassembles the fragments
with the shared codec and acknowledges them, as the device daemon will.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from cloud_daemon.airvantage import (
    AirVantageClient,
    AirVantageClientConfig,
    AirVantageCredentials,
    OperationOutcome,
    OperationStatus,
    parse_retry_after,
)
from cloud_daemon.errors import (
    AirVantageApiError,
    AirVantageAuthError,
    AirVantageTransportError,
    DeliveryFailedError,
    SystemNotFoundError,
)
from cloud_daemon.ratelimit import Backoff
from sandbox.airvantage import AirVantageEmulator, ApplicationModel
from shared.airvantage import (
    Ack,
    CommandTask,
    encode_acks,
    parse_tasks,
)
from shared.config import Secret
from shared.errors import ConfigError
from shared.fragments import Completed, Duplicate, Reassembler
from shared.messages import (
    MAX_PARAM_CHARS,
    CertificateDelivery,
    DeliveryMessage,
    Rejected,
    decode_delivery,
    fragments_from_params,
)
from tests.adapters.kinesis_fixtures import moto_server
from tests.sandbox.airvantage_fixtures import (
    REGION,
    Broker,
    create_stream,
    run_mosquitto,
)

CLIENT_ID = "ztp-cloud"
CLIENT_SECRET = "cloud-secret-8c1f"
USER = ("ops@example.com", "user-password-77d2")
CERT_ID = "0123456789abcdef" * 4


# --------------------------------------------------------------------------------------------
# Peers


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
async def emulator(broker: Broker, moto_endpoint: str) -> AsyncIterator[AirVantageEmulator]:
    stream = f"av-{uuid.uuid4().hex[:12]}"
    await create_stream(moto_endpoint, stream)
    async with AirVantageEmulator(
        broker_host=broker.host,
        broker_port=broker.port,
        admin_username=None,
        admin_password=None,
        aws_endpoint_url=moto_endpoint,
        region=REGION,
        stream_name=stream,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        model=ApplicationModel.load(),
        users={USER[0]: USER[1]},
        redelivery_interval=None,
    ) as running:
        yield running


class RecordingClient(AirVantageClient):
    """Remembers the tokens it obtained, so the tests can look for them in the logs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens_seen: list[str] = []

    async def _fetch_token(self) -> Secret:
        token = await super()._fetch_token()
        self.tokens_seen.append(token.reveal())
        return token


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as captured:
        yield captured


Factory = Callable[..., Awaitable[RecordingClient]]


@pytest.fixture
async def make_client(
    emulator: AirVantageEmulator,
    logs: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> AsyncIterator[Factory]:
    """Build clients on the emulator; after the test, no secret may appear in any log."""
    clients: list[RecordingClient] = []
    async with contextlib.AsyncExitStack() as stack:

        async def build(**overrides: Any) -> RecordingClient:
            options: dict[str, Any] = {
                "base_url": emulator.api_url,
                "credentials": AirVantageCredentials(CLIENT_ID, Secret(CLIENT_SECRET)),
                "retry": Backoff(base=0.05, cap=0.2, attempts=5),
                "poll_interval": 0.05,
                "operation_timeout": 5.0,
            }
            options.update(overrides)
            client = RecordingClient(AirVantageClientConfig(**options))
            clients.append(await stack.enter_async_context(client))
            return client

        yield build
    secrets_ = [CLIENT_SECRET, USER[1], *(t for c in clients for t in c.tokens_seen)]
    text = json.dumps(logs, default=str) + caplog.text
    for secret in secrets_:
        assert secret not in text


def new_serial() -> str:
    return f"SN{uuid.uuid4().hex[:10].upper()}"


def certificate_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SN1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Device:
    """A gateway on the device broker: takes deliver tasks, reassembles, acknowledges.

    Args:
        broker: the device broker.
        serial: its serial (client id and topic prefix).
        fail_first: acknowledge this many completed deliveries with ERROR first.
    """

    def __init__(self, broker: Broker, serial: str, *, fail_first: int = 0) -> None:
        self.broker = broker
        self.serial = serial
        self.fail_first = fail_first
        self.received: list[DeliveryMessage] = []
        self.params_seen: list[dict[str, Any]] = []
        self.ready = asyncio.Event()
        self.reassembler = Reassembler()

    async def run(self) -> None:
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=self.serial
        ) as client:
            await client.subscribe(f"{self.serial}/tasks/json", qos=1)
            self.ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                for task in parse_tasks(message.payload):
                    assert isinstance(task, CommandTask)
                    ack = self.handle(task)
                    await client.publish(f"{self.serial}/acks/json", encode_acks([ack]), qos=1)

    def handle(self, task: CommandTask) -> Ack:
        self.params_seen.append(dict(task.params))
        done = False
        for text in fragments_from_params(task.params):
            outcome = self.reassembler.receive(text, now=time.monotonic())
            if isinstance(outcome, Completed):
                self.received.append(decode_delivery(outcome.payload))
                done = True
            elif isinstance(outcome, Duplicate) and outcome.completed:
                done = True
        if done and self.fail_first > 0:
            self.fail_first -= 1
            return Ack.error(task.uid, "verification failed")
        return Ack.ok(task.uid) if done else Ack.error(task.uid, "incomplete")


@contextlib.asynccontextmanager
async def running(device: Device) -> AsyncIterator[Device]:
    async with asyncio.TaskGroup() as group:
        task = group.create_task(device.run(), name=f"device-{device.serial}")
        await asyncio.wait_for(device.ready.wait(), 5)
        try:
            yield device
        finally:
            task.cancel("test over")


# --------------------------------------------------------------------------------------------
# Token and systems


async def test_client_credentials_and_system_lookup(
    emulator: AirVantageEmulator, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    assert await client.system_uid(serial) == uid
    assert await client.system_uid(serial) == uid  # cached
    with pytest.raises(SystemNotFoundError) as caught:
        await client.system_uid(new_serial())
    assert caught.value.serial.startswith("SN")
    assert client.token_fetches == 1


async def test_password_grant(emulator: AirVantageEmulator, make_client: Factory) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    credentials = AirVantageCredentials(
        CLIENT_ID, Secret(CLIENT_SECRET), username=USER[0], password=Secret(USER[1])
    )
    client = await make_client(credentials=credentials, company="company-1")
    assert credentials.grant_type == "password"
    assert await client.system_uid(serial) == uid


async def test_bad_credentials_fail_without_retrying(
    make_client: Factory, logs: list[dict[str, Any]]
) -> None:
    client = await make_client(
        credentials=AirVantageCredentials(CLIENT_ID, Secret("wrong-secret-5521"))
    )
    with pytest.raises(AirVantageAuthError) as caught:
        await client.system_uid("SN1")
    assert caught.value.status == 401
    assert "wrong-secret-5521" not in str(caught.value)
    assert [e for e in logs if e["event"] == "airvantage.retry"] == []


async def test_an_expired_token_is_refreshed_once(
    emulator: AirVantageEmulator, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    assert await client.system_uid(serial) == uid
    emulator.expire_tokens()
    other = new_serial()
    other_uid = await emulator.register_system(other, "device-password")
    assert await client.system_uid(other) == other_uid
    assert client.token_fetches == 2


async def test_a_token_is_refreshed_before_it_expires(
    emulator: AirVantageEmulator, make_client: Factory
) -> None:
    serial = new_serial()
    await emulator.register_system(serial, "device-password")
    # The emulator grants 24 h; a margin longer than that means "refresh every time".
    client = await make_client(refresh_margin=90_000.0)
    await client.system_uid(serial)
    client._systems.clear()
    await client.system_uid(serial)
    assert client.token_fetches == 2


# --------------------------------------------------------------------------------------------
# Delivery


async def test_delivery_fragments_reassemble_on_the_device(
    emulator: AirVantageEmulator, broker: Broker, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    message = CertificateDelivery("req-1", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    client = await make_client()
    async with running(Device(broker, serial)) as device:
        delivered = await client.deliver(uid, message, transfer_id="d-req-1", seq=7)
    assert delivered.attempts == 1
    assert device.received == [message]
    params = device.params_seen[0]
    assert len(params) > 1
    assert all(len(v) <= MAX_PARAM_CHARS for v in params.values())
    status = await client.operation(delivered.operation_uid)
    assert status.outcome is OperationOutcome.SUCCESS
    assert status.counters["SUCCESS"] == 1


async def test_a_refusal_is_delivered_too(
    emulator: AirVantageEmulator, broker: Broker, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    refusal = Rejected("req-2", "cn_mismatch: subject CN 'SN2' is not the authenticated serial")
    async with running(Device(broker, serial)) as device:
        await client.deliver(uid, refusal, transfer_id="d-req-2")
    assert device.received == [refusal]


async def test_send_then_track_separately(
    emulator: AirVantageEmulator, broker: Broker, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    message = CertificateDelivery("req-8", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    async with running(Device(broker, serial)) as device:
        operation = await client.send_delivery(uid, message, transfer_id="d-req-8")
        first = await client.operation(operation)  # sent, not waited for
        status = await client.wait_for_operation(operation)
    assert first.uid == status.uid == operation
    assert status.outcome is OperationOutcome.SUCCESS
    assert device.received == [message]


async def test_429_with_retry_after_is_honoured(
    emulator: AirVantageEmulator,
    broker: Broker,
    make_client: Factory,
    logs: list[dict[str, Any]],
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    message = CertificateDelivery("req-3", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    emulator.faults.update({"rate_limit_next": 1, "retry_after": 1})
    start = time.monotonic()
    async with running(Device(broker, serial)) as device:
        await client.deliver(uid, message, transfer_id="d-req-3")
    assert time.monotonic() - start >= 0.95
    assert device.received == [message]
    retries = [e for e in logs if e["event"] == "airvantage.retry"]
    assert [(e["status"], e["retry_after"], e["retry_in"]) for e in retries] == [(429, 1.0, 1.0)]


async def test_5xx_are_retried_with_backoff(
    emulator: AirVantageEmulator,
    broker: Broker,
    make_client: Factory,
    logs: list[dict[str, Any]],
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    message = CertificateDelivery("req-4", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    emulator.faults.update({"server_error_next": 3, "server_error_status": 500})
    async with running(Device(broker, serial)) as device:
        await client.deliver(uid, message, transfer_id="d-req-4")
    assert device.received == [message]
    statuses = [e["status"] for e in logs if e["event"] == "airvantage.retry"]
    assert statuses == [500, 500, 500]


async def test_expired_token_during_delivery(
    emulator: AirVantageEmulator, broker: Broker, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    await client.system_uid(serial)
    emulator.expire_tokens()
    message = CertificateDelivery("req-5", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    async with running(Device(broker, serial)) as device:
        await client.deliver(uid, message, transfer_id="d-req-5")
    assert device.received == [message]
    assert client.token_fetches == 2


async def test_a_failed_operation_is_redelivered(
    emulator: AirVantageEmulator,
    broker: Broker,
    make_client: Factory,
    logs: list[dict[str, Any]],
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    message = CertificateDelivery("req-6", CERT_ID, "iot.sandbox.localhost", certificate_pem())
    async with running(Device(broker, serial, fail_first=1)) as device:
        delivered = await client.deliver(uid, message, transfer_id="d-req-6")
    assert delivered.attempts == 2
    assert device.received == [message]  # the second copy was a duplicate of the first
    assert len(device.params_seen) == 2
    assert device.params_seen[0] == device.params_seen[1]
    failed = [e for e in logs if e["event"] == "airvantage.delivery_failed"]
    assert [e["reason"] for e in failed] == ["failure"]


async def test_an_unanswered_delivery_times_out_and_fails(
    emulator: AirVantageEmulator, make_client: Factory
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client(operation_timeout=0.3, delivery_attempts=2)
    message = Rejected("req-7", "weak_key: RSA-1024 is below RSA-2048")
    with pytest.raises(DeliveryFailedError) as caught:
        await client.deliver(uid, message, transfer_id="d-req-7")
    assert (caught.value.attempts, caught.value.reason) == (2, "timeout")
    assert len(emulator.operations()) == 2


async def test_4xx_is_final(emulator: AirVantageEmulator, make_client: Factory) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    client = await make_client()
    with pytest.raises(AirVantageApiError) as caught:
        await client.send_command(uid, "ztp.unknown", {})
    assert (caught.value.status, caught.value.code) == (400, "command.unknown")
    with pytest.raises(AirVantageApiError) as missing:
        await client.operation("no-such-operation")
    assert missing.value.status == 404


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_network_errors_are_retried_then_raised(
    make_client: Factory, logs: list[dict[str, Any]]
) -> None:
    client = await make_client(
        base_url=f"http://127.0.0.1:{_closed_port()}",
        retry=Backoff(base=0.01, cap=0.02, attempts=3),
    )
    with pytest.raises(AirVantageTransportError) as caught:
        await client.system_uid("SN1")
    assert caught.value.retry_after is None
    assert len([e for e in logs if e["event"] == "airvantage.retry"]) == 2


# --------------------------------------------------------------------------------------------
# Pure parts


def test_retry_after_forms() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    later = email.utils.format_datetime(now + dt.timedelta(seconds=30), usegmt=True)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(later, now=now) == 30.0
    assert parse_retry_after(email.utils.format_datetime(now, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("state", "counters", "outcome"),
    [
        ("SCHEDULED", {}, OperationOutcome.PENDING),
        ("IN_PROGRESS", {"PENDING": 1}, OperationOutcome.PENDING),
        ("IN_PROGRESS", {"FAILURE": 1}, OperationOutcome.FAILURE),
        ("FINISHED", {"SUCCESS": 1, "FAILURE": 0}, OperationOutcome.SUCCESS),
        ("FINISHED", {"SUCCESS": 0, "FAILURE": 0}, OperationOutcome.FAILURE),
        ("FINISHED", {"CANCELLED": 1}, OperationOutcome.FAILURE),
    ],
)
def test_finished_is_not_success(
    state: str, counters: dict[str, int], outcome: OperationOutcome
) -> None:
    assert OperationStatus("op", state, counters).outcome is outcome


@pytest.mark.parametrize(
    "overrides",
    [
        {"base_url": "ftp://x"},
        {"poll_interval": 0},
        {"request_timeout": float("nan")},
        {"delivery_attempts": 0},
        {"refresh_margin": -1},
    ],
)
def test_config_validates(overrides: dict[str, Any]) -> None:
    options: dict[str, Any] = {
        "base_url": "https://eu.airvantage.net",
        "credentials": AirVantageCredentials(CLIENT_ID, Secret(CLIENT_SECRET)),
        **overrides,
    }
    with pytest.raises(ConfigError):
        AirVantageClientConfig(**options)


def test_credentials_validate_and_do_not_show_secrets() -> None:
    with pytest.raises(ConfigError):
        AirVantageCredentials("", Secret("s"))
    with pytest.raises(ConfigError):
        AirVantageCredentials(CLIENT_ID, Secret("s"), username="u")
    credentials = AirVantageCredentials(
        CLIENT_ID, Secret(CLIENT_SECRET), username=USER[0], password=Secret(USER[1])
    )
    assert CLIENT_SECRET not in repr(credentials)
    assert USER[1] not in repr(credentials)
