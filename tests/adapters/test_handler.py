"""The shard handler and the delivery follow-up: the pure tracker, then real peers end to end.

End to end: a device on mosquitto publishes its request, the AirVantage emulator's connector puts
it into the moto sandbox's stream, the records go to :class:`ShardHandler` in shard batches, the
certificate reaches the device as ``ztp.deliver`` tasks, and the device's ``provisioned`` status
comes back the same way as a confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from structlog.testing import capture_logs

from cloud_daemon.airvantage import (
    AirVantageClient,
    AirVantageClientConfig,
    AirVantageCredentials,
    OperationOutcome,
)
from cloud_daemon.consumer import RecordFailure, ShardBatch, StreamRecord
from cloud_daemon.handler import (
    CloudMetrics,
    Delivery,
    DeliveryDone,
    DeliveryGivenUp,
    DeliveryLoop,
    DeliveryTracker,
    Poll,
    Resend,
    ShardHandler,
    transfer_id_for,
)
from cloud_daemon.intake import Intake
from cloud_daemon.ledger import IssuanceState, SqliteLedger
from cloud_daemon.ratelimit import Backoff
from sandbox.aws import MotoSandbox
from shared.airvantage import Ack, CommandTask, acks_topic, encode_acks
from shared.config import Secret
from shared.errors import UsageError
from shared.messages import CertificateDelivery, Rejected
from tests.adapters.test_issuer import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_PASSWORD,
    E2EDevice,
    active_for_thing,
    certificates,
    make_issuer,
    new_serial,
    open_cloud_peers,
    request_csr,
    request_points,
)
from tests.sandbox.airvantage_fixtures import Broker, run_mosquitto
from tests.sandbox.aws_fixtures import aws, aws_broker_pid_file, aws_pki, moto_sandbox

__all__ = ["aws", "aws_broker_pid_file", "aws_pki", "moto_sandbox"]  # fixtures

module_loop = pytest.mark.asyncio(loop_scope="module")
WAIT = 20.0

# --- the pure tracker ----------------------------------------------------------------------


def delivery(serial: str = "SN1", request_id: str = "r1") -> Delivery:
    return Delivery("sys1", serial, request_id, Rejected(request_id, "weak_key: x"), "d-1")


def tracker(**overrides: Any) -> DeliveryTracker:
    options = {"attempts": 3, "operation_timeout": 100.0, "poll_interval": 1.0, "poll_cap": 8.0}
    return DeliveryTracker(**{**options, **overrides})


def test_success_ends_the_follow_up() -> None:
    t = tracker()
    t.sent(delivery(), operation_uid="op1", attempt=1, now=0.0)
    assert t.due(0.5) == ()
    assert t.due(1.0) == (Poll(delivery(), "op1"),)
    assert t.observe("op1", OperationOutcome.SUCCESS, now=1.1) == DeliveryDone(delivery(), "op1", 1)
    assert len(t) == 0
    assert t.next_due() is None


def test_pending_polls_back_off_to_the_cap() -> None:
    t = tracker()
    t.sent(delivery(), operation_uid="op1", attempt=1, now=0.0)
    now, gaps = 0.0, []
    for _ in range(6):
        due = t.next_due()
        assert due is not None
        gaps.append(due - now)
        now = due
        assert t.due(now) == (Poll(delivery(), "op1"),)
        assert t.observe("op1", OperationOutcome.PENDING, now=now) is None
    assert gaps == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_first_poll_waits_first_poll_then_backs_off() -> None:
    t = tracker(first_poll=30.0, poll_cap=60.0)
    t.sent(delivery(), operation_uid="op1", attempt=1, now=0.0)
    assert t.next_due() == 30.0
    assert t.due(29.9) == ()
    assert t.due(30.0) == (Poll(delivery(), "op1"),)
    assert t.observe("op1", OperationOutcome.PENDING, now=30.0) is None
    assert t.next_due() == 90.0  # doubled, up to the cap


def test_a_status_before_the_first_poll_means_no_poll_at_all() -> None:
    t = tracker(first_poll=30.0, poll_cap=60.0)
    for index in range(3):
        t.sent(delivery(request_id=f"r{index}"), operation_uid=f"op{index}", attempt=1, now=0.0)
    assert t.settle("SN1", "r0")  # the device's status, read from the stream
    assert t.observe("op1", OperationOutcome.SUCCESS, now=1.0) is not None  # a connector event
    assert t.due(30.0) == (Poll(delivery(request_id="r2"), "op2"),)  # the one heard nothing of
    assert t.due(1000.0) == (Poll(delivery(request_id="r2"), "op2"),)


def test_a_failed_send_is_retried_after_poll_interval_not_first_poll() -> None:
    t = tracker(first_poll=30.0, poll_cap=60.0)
    t.send_failed(delivery(), attempt=1, now=0.0)
    assert t.due(1.0) == (Resend(delivery(), 1),)


def test_failure_resends_then_gives_up() -> None:
    t = tracker(attempts=2)
    t.sent(delivery(), operation_uid="op1", attempt=1, now=0.0)
    assert t.observe("op1", OperationOutcome.FAILURE, now=1.0) == Resend(delivery(), 2)
    assert t.due(1.0) == (Resend(delivery(), 2),)
    assert t.observe("op1", OperationOutcome.SUCCESS, now=1.0) is None  # superseded
    t.sent(delivery(), operation_uid="op2", attempt=2, now=1.5)
    given_up = t.observe("op2", OperationOutcome.FAILURE, now=2.0)
    assert given_up == DeliveryGivenUp(delivery(), "op2", 2, "failure")
    assert len(t) == 0


def test_pending_past_the_timeout_is_sent_again() -> None:
    t = tracker(operation_timeout=5.0, poll_cap=100.0)
    t.sent(delivery(), operation_uid="op1", attempt=1, now=0.0)
    assert t.observe("op1", OperationOutcome.PENDING, now=4.0) is None
    assert t.next_due() == 5.0  # the next poll is pulled in to the deadline
    assert t.observe("op1", OperationOutcome.PENDING, now=5.0) == Resend(delivery(), 2)


def test_a_failed_send_backs_off_and_a_confirmation_settles() -> None:
    t = tracker()
    t.send_failed(delivery(), attempt=1, now=0.0)
    assert t.due(1.0) == (Resend(delivery(), 1),)
    t.send_failed(delivery(), attempt=1, now=1.0)
    assert t.next_due() == 3.0
    t.sent(delivery(), operation_uid="op1", attempt=1, now=3.0)
    assert t.settle("SN1", "r1")
    assert not t.settle("SN1", "r1")
    assert t.observe("op1", OperationOutcome.SUCCESS, now=4.0) is None
    assert t.observe("unknown", OperationOutcome.FAILURE, now=4.0) is None


def test_capacity_drops_the_oldest() -> None:
    t = tracker(capacity=2)
    for i in range(3):
        t.sent(delivery(request_id=f"r{i}"), operation_uid=f"op{i}", attempt=1, now=0.0)
    assert len(t) == 2
    assert t.observe("op0", OperationOutcome.SUCCESS, now=1.0) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"attempts": 0},
        {"operation_timeout": 0.0},
        {"poll_interval": 0.0},
        {"poll_cap": 0.5},
        {"first_poll": 0.0},
    ],
)
def test_tracker_bounds(overrides: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        tracker(**overrides)


def test_transfer_ids_are_stable_and_bounded() -> None:
    assert transfer_id_for("r" * 64) == transfer_id_for("r" * 64)
    assert transfer_id_for("a") != transfer_id_for("b")
    assert len(transfer_id_for("r" * 64)) <= 32


# --- end to end against the sandbox --------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("handler-mosquitto")) as running:
        yield running


class Shard:
    """Reads a one-shard stream from the start into ``ShardBatch`` objects."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.shard_id = ""
        self.iterator: str | None = None

    async def next_batch(self) -> ShardBatch | None:
        if self.iterator is None:
            shard = (await self.kinesis.list_shards(StreamName=self.stream))["Shards"][0]
            self.shard_id = shard["ShardId"]
            self.iterator = (
                await self.kinesis.get_shard_iterator(
                    StreamName=self.stream, ShardId=self.shard_id, ShardIteratorType="TRIM_HORIZON"
                )
            )["ShardIterator"]
        page = await self.kinesis.get_records(ShardIterator=self.iterator, Limit=100)
        self.iterator = page["NextShardIterator"]
        records = tuple(StreamRecord.from_aws(self.shard_id, r) for r in page["Records"])
        return ShardBatch(self.stream, self.shard_id, records) if records else None


class Rig:
    """Emulator, stream, ledger, client, handler and follow-up loop for one test."""

    def __init__(self, aws: MotoSandbox, broker: Broker, tmp_path: Path, **emulator: Any) -> None:
        self.aws = aws
        self.broker = broker
        self.tmp_path = tmp_path
        self.emulator_options = emulator
        self.stream = f"handler-{uuid.uuid4().hex[:8]}"
        self.stack = contextlib.AsyncExitStack()
        self.metrics = CloudMetrics()
        self.poll_interval = 0.1

    async def __aenter__(self) -> Rig:
        stack = self.stack
        self.kinesis, self.iot, self.emulator = await open_cloud_peers(
            stack, self.aws, self.broker, stream=self.stream, **self.emulator_options
        )
        self.ledger = await stack.enter_async_context(
            SqliteLedger(self.tmp_path / "ledger.sqlite3")
        )
        self.client = await stack.enter_async_context(
            AirVantageClient(
                AirVantageClientConfig(
                    base_url=self.emulator.api_url,
                    credentials=AirVantageCredentials(CLIENT_ID, Secret(CLIENT_SECRET)),
                    retry=Backoff(base=0.05, cap=0.2, attempts=3),
                    poll_interval=0.05,
                )
            )
        )
        self.loop = DeliveryLoop(
            tracker=DeliveryTracker(
                attempts=3, operation_timeout=10.0, poll_interval=self.poll_interval, poll_cap=0.5
            ),
            client=self.client,
            metrics=self.metrics,
        )
        task = asyncio.get_running_loop().create_task(self.loop.run(), name="test-tracker")
        stack.push_async_callback(cancel, task)
        self.handler = ShardHandler(
            intake=Intake(),
            issuer=make_issuer(self.iot, self.ledger),
            client=self.client,
            deliveries=self.loop,
            metrics=self.metrics,
        )
        self.shard = Shard(self.kinesis, self.stream)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stack.aclose()

    async def device(self, serial: str, key: Any, kind: type[E2EDevice] = E2EDevice) -> E2EDevice:
        await self.emulator.register_system(serial, DEVICE_PASSWORD)
        device = kind(self.broker, serial, key)
        task = asyncio.get_running_loop().create_task(device.run(), name=f"device-{serial}")
        self.stack.push_async_callback(cancel, task)
        async with asyncio.timeout(5):
            await device.ready.wait()
        return device

    async def run_until(self, done: Callable[[], bool]) -> list[RecordFailure]:
        failures = []
        async with asyncio.timeout(WAIT):
            while not done():
                batch = await self.shard.next_batch()
                if batch is not None:
                    failure = await self.handler(batch)
                    if failure is not None:
                        failures.append(failure)
                await asyncio.sleep(0.05)
        return failures

    def value(self, name: str, **labels: str) -> float:
        found = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


async def cancel(task: asyncio.Task[None]) -> None:
    task.cancel("test over")
    with contextlib.suppress(asyncio.CancelledError):
        await task


@pytest_asyncio.fixture(loop_scope="module")
async def rig(aws: MotoSandbox, broker: Broker, tmp_path: Path) -> AsyncIterator[Rig]:
    async with Rig(aws, broker, tmp_path) as opened:
        yield opened


@module_loop
async def test_request_to_certificate_to_confirmation(rig: Rig) -> None:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    device = await rig.device(serial, key)
    await device.send(request_points("req-h1", serial, request_csr(key, serial)))
    assert await rig.run_until(lambda: rig.value("ztp_cloud_confirmations_total") == 1) == []
    [answer] = device.received
    assert isinstance(answer, CertificateDelivery)
    assert await active_for_thing(rig.iot, f"ztp-{serial}") == [answer.certificate_id]
    [entry] = await rig.ledger.entries_for_thing(f"ztp-{serial}")
    assert entry.state is IssuanceState.CONFIRMED
    assert entry.operation_uid is not None
    # The delivery is settled: acknowledged (polled) or confirmed, whichever came first.
    await rig.run_until(lambda: len(rig.loop.tracker) == 0)
    assert rig.value("ztp_cloud_issuances_total") == 1
    assert rig.value("ztp_cloud_deliveries_total") == 1
    assert rig.value("ztp_cloud_redeliveries_total") == 0


@module_loop
async def test_refusals_reach_the_device_and_are_counted(rig: Rig) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - hostile
    serial = new_serial()
    device = await rig.device(serial, weak)
    # A serial valid for AirVantage that cannot name an IoT thing ('.' is not allowed there).
    dotted = f"SN.{uuid.uuid4().hex[:8].upper()}"
    dotted_key = ec.generate_private_key(ec.SECP256R1())
    dotted_device = await rig.device(dotted, dotted_key)
    with capture_logs() as logs:
        await device.send(request_points("req-weak", serial, request_csr(weak, serial)))
        await dotted_device.send(request_points("req-dot", dotted, request_csr(dotted_key, dotted)))
        await rig.run_until(lambda: bool(device.received and dotted_device.received))
    [answer] = device.received
    assert isinstance(answer, Rejected)
    assert answer.reason.startswith("weak_key: ")
    [dotted_answer] = dotted_device.received
    assert isinstance(dotted_answer, Rejected)
    assert dotted_answer.reason.startswith("unusable_identity: ")
    refused = {e["reason"] for e in logs if e["event"] == "csr.refused"}
    assert refused == {"weak_key", "unusable_identity"}
    assert rig.value("ztp_cloud_refusals_total", reason="weak_key") == 1
    assert rig.value("ztp_cloud_refusals_total", reason="unusable_identity") == 1
    assert await certificates(rig.iot) == []


@module_loop
async def test_a_failed_record_is_reported_and_processed_again(rig: Rig) -> None:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    device = await rig.device(serial, key)
    await device.send(request_points("req-fail", serial, request_csr(key, serial)))
    batch = None
    async with asyncio.timeout(WAIT):
        while batch is None:
            batch = await rig.shard.next_batch()
    rig.emulator.faults.update({"server_error_next": 50, "server_error_status": 503})
    failure = await rig.handler(batch)
    assert failure is not None
    assert failure.sequence_number == batch.records[0].sequence_number
    assert "AirVantage" in failure.reason
    # The consumer retries the record: it must be processed again, not taken for a duplicate.
    rig.emulator.faults.update({"server_error_next": 0})
    assert await rig.handler(batch) is None
    await rig.run_until(lambda: bool(device.received))
    [answer] = device.received
    assert isinstance(answer, CertificateDelivery)
    assert len(await certificates(rig.iot)) == 1  # the retry re-sent, it did not mint again
    assert rig.value("ztp_cloud_record_failures_total") == 1
    assert rig.value("ztp_cloud_reused_total") == 1


class FlakyDevice(E2EDevice):
    """Refuses its first task (as a device whose flash write failed), then behaves."""

    refusals = 1

    async def on_task(self, client: aiomqtt.Client, task: CommandTask) -> None:
        if self.refusals:
            self.refusals -= 1
            self.tasks.append(task)
            ack = encode_acks([Ack.error(task.uid, "flash write failed")])
            await client.publish(acks_topic(self.serial), ack, qos=1)
            return
        await super().on_task(client, task)


@module_loop
async def test_a_failed_operation_is_redelivered(rig: Rig) -> None:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    device = await rig.device(serial, key, FlakyDevice)
    await device.send(request_points("req-flaky", serial, request_csr(key, serial)))
    with capture_logs() as logs:
        await rig.run_until(lambda: rig.value("ztp_cloud_confirmations_total") == 1)
    assert len(device.tasks) == 2
    assert device.tasks[0].params == device.tasks[1].params  # same fragments, same transfer
    [answer] = device.received
    assert isinstance(answer, CertificateDelivery)
    assert rig.value("ztp_cloud_redeliveries_total") == 1
    events = [e["event"] for e in logs]
    assert "delivery.resend_scheduled" in events
    assert len(await certificates(rig.iot)) == 1


@module_loop
async def test_operation_events_from_the_stream_settle_deliveries(
    aws: MotoSandbox, broker: Broker, tmp_path: Path
) -> None:
    async with Rig(aws, broker, tmp_path, operation_events=True) as events_rig:
        # Polls so rare that only the connector's operation events can settle in time.
        events_rig.loop.tracker = DeliveryTracker(
            attempts=3, operation_timeout=60.0, poll_interval=30.0
        )
        serial = new_serial()
        key = ec.generate_private_key(ec.SECP256R1())
        device = await events_rig.device(serial, key, FlakyDevice)
        await device.send(request_points("req-ev", serial, request_csr(key, serial)))
        start = time.monotonic()
        await events_rig.run_until(lambda: events_rig.value("ztp_cloud_confirmations_total") == 1)
        assert time.monotonic() - start < 15
        assert events_rig.value("ztp_cloud_redeliveries_total") == 1
        assert len(device.tasks) == 2


async def batch_of(rig: Rig, count: int) -> ShardBatch:
    """The next ``count`` records of the shard, as one batch (as a busy shard returns them)."""
    records: list[StreamRecord] = []
    async with asyncio.timeout(WAIT):
        while len(records) < count:
            batch = await rig.shard.next_batch()
            if batch is None:
                await asyncio.sleep(0.05)
                continue
            records.extend(batch.records)
    return ShardBatch(rig.stream, rig.shard.shard_id, tuple(records))


@module_loop
async def test_the_next_issuance_does_not_wait_for_a_slow_airvantage(rig: Rig) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(2)]
    serials = [new_serial() for _ in keys]
    devices = [await rig.device(s, k) for s, k in zip(serials, keys, strict=True)]
    for index, (device, serial, key) in enumerate(zip(devices, serials, keys, strict=True)):
        await device.send(request_points(f"req-slow{index}", serial, request_csr(key, serial)))
    batch = await batch_of(rig, 2)
    rig.emulator.faults.update({"latency": 0.3})
    try:
        with capture_logs() as logs:
            assert await rig.handler(batch) is None
    finally:
        rig.emulator.faults.update({"latency": 0.0})
    events = [
        e["event"] for e in logs if e["event"] in {"issuance.minted", "airvantage.delivery_sent"}
    ]
    # The second certificate was minted while the first one's delivery was still being sent,
    # and both deliveries were sent before the batch returned.
    assert events == [
        "issuance.minted",
        "issuance.minted",
        "airvantage.delivery_sent",
        "airvantage.delivery_sent",
    ]
    await rig.run_until(lambda: all(d.received for d in devices))
    for device in devices:
        [answer] = device.received
        assert isinstance(answer, CertificateDelivery)
    for serial in serials:
        [entry] = await rig.ledger.entries_for_thing(f"ztp-{serial}")
        assert entry.operation_uid is not None  # recorded by the delivery task


@module_loop
async def test_a_failed_delivery_in_a_batch_retries_from_its_record(rig: Rig) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    serials = [new_serial() for _ in keys]
    devices = [await rig.device(s, k) for s, k in zip(serials, keys, strict=True)]
    for index, (device, serial, key) in enumerate(zip(devices, serials, keys, strict=True)):
        await device.send(request_points(f"req-part{index}", serial, request_csr(key, serial)))
    batch = await batch_of(rig, 3)
    before = len(await certificates(rig.iot))
    rig.emulator.faults.update({"server_error_next": 1000, "server_error_status": 503})
    try:
        failure = await rig.handler(batch)
    finally:
        rig.emulator.faults.update({"server_error_next": 0})
    assert failure is not None
    assert failure.sequence_number == batch.records[0].sequence_number
    assert "AirVantage" in failure.reason
    # The consumer retries from the failed record: every record from there is processed again.
    assert await rig.handler(batch) is None
    await rig.run_until(lambda: all(d.received for d in devices))
    # One certificate per gateway: a record done twice re-sent what it had minted.
    assert len(await certificates(rig.iot)) - before == 3
    for device, serial in zip(devices, serials, strict=True):
        [entry] = await rig.ledger.entries_for_thing(f"ztp-{serial}")
        assert {a.certificate_id for a in device.received} == {entry.certificate_id}
