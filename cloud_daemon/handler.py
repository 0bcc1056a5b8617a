"""The shard handler: from connector records to certificates on their way, and the deliveries after.

Theory of operation
-------------------

:class:`ShardHandler` is the :data:`~cloud_daemon.consumer.Handler` of the service's
:class:`~cloud_daemon.consumer.StreamConsumer`. For each record of a batch, in order, it asks
the pure :class:`~cloud_daemon.intake.Intake` what to do, then does it:

=================  ===========================================================================
action             what the handler does
=================  ===========================================================================
``Issue``          :meth:`Issuer.issue` (mints once per thing and key; a redelivery re-sends the
                   stored certificate), then, in a task of the batch, ``send_delivery`` of a
                   ``CertificateDelivery``, ``record_delivery``, and the operation handed to
                   the tracker. A serial or system uid that cannot name a thing is answered
                   with a refusal instead.
``Refuse``         logs ``csr.refused`` with the reason, sends a ``Rejected`` to the device.
``Confirm``        :meth:`Issuer.confirm` (deactivates the thing's other certificates); the
                   tracker stops following the delivery.
``DeviceRejected`` logs it; the tracker stops following the delivery.
``OperationChanged`` feeds the tracker (the connector's ``event.operation.state.change``).
``Ignored``        logged at debug level, counted by reason.
=================  ===========================================================================

The handler never waits for a device: ``send_delivery`` creates the AirVantage operation and
returns, and the operation is followed outside the shard by :class:`DeliveryLoop` (a named task
of the service), so an offline device never holds a shard. Nor does the next record wait for
the AirVantage call of a certificate's first delivery: that call runs in a task of the batch
(at most ``max_sending`` at once) while the next record's IoT calls are made, since IoT's
quota, not AirVantage, bounds the fleet's rate. The batch returns only once its deliveries are
sent, so the consumer never checkpoints past a certificate not yet on its way.

When a record's actions fail (IoT or AirVantage unreachable, an issuance in progress
elsewhere), no further record is started, and the handler returns a
:class:`~cloud_daemon.consumer.RecordFailure` naming the earliest record that failed, after
:meth:`Intake.forget` of the ``message.id`` of that record and of every one after it: the
consumer retries from there with backoff and dead-letters past its budget. Every step is
idempotent, so a retried or redelivered record never mints a second certificate (a record
after the failed one that had succeeded is done again: its certificate is re-sent).

:class:`DeliveryTracker` is the pure core of the follow-up (time passed in): each delivery is
keyed by (serial, request id) and holds its current operation. Polling is the fallback: the
device's ``provisioned`` status (and the connector's ``event.operation.state.change``, when it
is configured) normally ends the follow-up first, so an operation is polled only ``first_poll``
seconds after it was created (the answer may be waiting behind a burst of requests in the
shard: a minute covers a thousand gateways at IoT's quota), then again after twice that wait,
doubling up to ``poll_cap``; a failed send is retried after ``poll_interval``, doubling. An
operation whose counters say FAILURE, or that stays pending past ``operation_timeout``, is sent
again as a new operation (same fragments, same transfer id: the device takes a second copy for
the duplicate it is) until ``attempts`` operations were created, then given up and logged. A
confirmation from the device ends the follow-up whatever the operation says.

:class:`DeliveryLoop` drives the tracker: it sleeps until the next step falls due, and a send,
settle or operation event wakes it only when that brings a step due sooner (a burst sends and
settles thousands of deliveries, none due for a minute).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeAlias

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from cloud_daemon.airvantage import AirVantageClient, OperationOutcome, OperationStatus
from cloud_daemon.consumer import RecordFailure, ShardBatch, StreamRecord
from cloud_daemon.intake import (
    MAX_RECORD_BYTES,
    Confirm,
    DeviceRejected,
    Ignored,
    Intake,
    Issue,
    OperationChanged,
    Refuse,
)
from cloud_daemon.issuer import Issued, Issuer
from shared.airvantage import IncomingCommunication, parse_envelope
from shared.errors import DecodeError, LimitExceededError, UsageError, ZtpError
from shared.messages import CertificateDelivery, DeliveryMessage, Rejected, sanitize_reason

__all__ = [
    "CloudMetrics",
    "Delivery",
    "DeliveryDone",
    "DeliveryGivenUp",
    "DeliveryLoop",
    "DeliveryTracker",
    "Poll",
    "Resend",
    "ShardHandler",
    "TrackerStep",
    "transfer_id_for",
]

_log = structlog.get_logger()

_REASON_CHARS: Final = 300
_MAX_SENDING: Final = 8
_IDENTITY_FIELDS: Final = frozenset({"serial", "system_uid"})


def transfer_id_for(request_id: str) -> str:
    """The fragment transfer id of the answer to ``request_id`` (stable across redeliveries).

    Args:
        request_id: the device's request id.

    Returns:
        ``d-`` and 24 hex digits: within the 32-character bound whatever the request id, and
        distinct from the device's own transfer ids.
    """
    return "d-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


# --- metrics ---------------------------------------------------------------------------------


class CloudMetrics:
    """The service's Prometheus counters, in a registry of their own.

    Args:
        registry: where they are registered (a fresh :class:`CollectorRegistry` by default).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.records = Counter(
            "ztp_cloud_handled_records", "Records given to the shard handler", registry=r
        )
        self.record_failures = Counter(
            "ztp_cloud_record_failures", "Records whose actions failed (to be retried)", registry=r
        )
        self.ignored = Counter(
            "ztp_cloud_ignored", "Records or parts of them ignored", ["reason"], registry=r
        )
        self.issuances = Counter("ztp_cloud_issuances", "Certificates minted", registry=r)
        self.reused = Counter(
            "ztp_cloud_reused", "Requests answered with a certificate already issued", registry=r
        )
        self.refusals = Counter("ztp_cloud_refusals", "Requests refused", ["reason"], registry=r)
        self.confirmations = Counter(
            "ztp_cloud_confirmations", "Certificates the devices confirmed installed", registry=r
        )
        self.device_rejections = Counter(
            "ztp_cloud_device_rejections", "Deliveries the devices refused", registry=r
        )
        self.deliveries = Counter(
            "ztp_cloud_deliveries", "ztp.deliver operations created (first sends)", registry=r
        )
        self.redeliveries = Counter(
            "ztp_cloud_redeliveries", "ztp.deliver operations sent again", registry=r
        )
        self.deliveries_done = Counter(
            "ztp_cloud_deliveries_done", "Deliveries the device acknowledged", registry=r
        )
        self.deliveries_given_up = Counter(
            "ztp_cloud_deliveries_given_up", "Deliveries abandoned after every attempt", registry=r
        )
        self.throttles = Counter(
            "ztp_cloud_throttles", "AWS calls throttled, by API", ["api"], registry=r
        )
        self.tracked = Gauge(
            "ztp_cloud_deliveries_tracked", "Deliveries followed until acknowledged", registry=r
        )


# --- the delivery tracker (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message on its way to one device.

    Attributes:
        system_uid: the device's system.
        serial: the device's serial.
        request_id: the request answered.
        message: a certificate delivery or a refusal.
        transfer_id: the fragment transfer id (the same on every redelivery).
    """

    system_uid: str
    serial: str
    request_id: str
    message: DeliveryMessage = field(repr=False)
    transfer_id: str

    @property
    def key(self) -> tuple[str, str]:
        """(serial, request id): one delivery followed per request."""
        return self.serial, self.request_id


@dataclass(frozen=True, slots=True)
class Poll:
    """Ask AirVantage how an operation stands."""

    delivery: Delivery
    operation_uid: str


@dataclass(frozen=True, slots=True)
class Resend:
    """Create a new operation for a delivery (attempt number ``attempt``)."""

    delivery: Delivery
    attempt: int


@dataclass(frozen=True, slots=True)
class DeliveryDone:
    """The device acknowledged the delivery."""

    delivery: Delivery
    operation_uid: str
    attempts: int


@dataclass(frozen=True, slots=True)
class DeliveryGivenUp:
    """Every attempt failed or timed out."""

    delivery: Delivery
    operation_uid: str | None
    attempts: int
    reason: str


TrackerStep: TypeAlias = Poll | Resend


class _Phase(enum.Enum):
    WAITING = "waiting"  # an operation exists; poll it when due
    SENDING = "sending"  # a new operation must be created when due


@dataclass(slots=True)
class _Tracked:
    delivery: Delivery
    operation_uid: str | None
    attempt: int
    phase: _Phase
    started: float
    due: float
    delay: float


class DeliveryTracker:
    """Which deliveries are still on their way, and what to do next for each. Pure.

    Args:
        attempts: operations created for one delivery before giving up (>= 1).
        operation_timeout: seconds one operation may stay pending before it is sent again.
        poll_interval: the first wait before sending again after a failed send (doubling), and
            before the first poll when ``first_poll`` is not given.
        poll_cap: the longest wait between two polls or sends.
        first_poll: the wait before the first poll of an operation (doubling while pending):
            long enough for the device's status, read from the stream, to settle it first.
        capacity: the most deliveries followed at once; the oldest is dropped beyond it.

    Raises:
        UsageError: a bound is not positive.
    """

    def __init__(
        self,
        *,
        attempts: int,
        operation_timeout: float,
        poll_interval: float,
        poll_cap: float = 60.0,
        capacity: int = 100_000,
        first_poll: float | None = None,
    ) -> None:
        if attempts < 1 or capacity < 1:
            raise UsageError("attempts and capacity must be >= 1")
        if not (operation_timeout > 0 and poll_interval > 0 and poll_cap >= poll_interval):
            raise UsageError("operation_timeout, poll_interval must be > 0, poll_cap >= interval")
        if first_poll is not None and not first_poll > 0:
            raise UsageError("first_poll must be > 0")
        self._attempts = attempts
        self._timeout = operation_timeout
        self._interval = poll_interval
        self._first = poll_interval if first_poll is None else first_poll
        self._cap = poll_cap
        self._capacity = capacity
        self._by_key: dict[tuple[str, str], _Tracked] = {}
        self._by_operation: dict[str, tuple[str, str]] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def sent(self, delivery: Delivery, *, operation_uid: str, attempt: int, now: float) -> float:
        """An operation was created for ``delivery``: follow it.

        Args:
            delivery: what was sent.
            operation_uid: the operation created.
            attempt: 1 for the first send.
            now: the current time (monotonic seconds).

        Returns:
            When its first poll falls due.
        """
        old = self._by_key.pop(delivery.key, None)
        if old is not None and old.operation_uid is not None:
            self._by_operation.pop(old.operation_uid, None)
        self._by_key[delivery.key] = _Tracked(
            delivery, operation_uid, attempt, _Phase.WAITING, now, now + self._first, self._first
        )
        self._by_operation[operation_uid] = delivery.key
        while len(self._by_key) > self._capacity:
            oldest = next(iter(self._by_key))
            self.settle(*oldest)
        return now + self._first

    def send_failed(self, delivery: Delivery, *, attempt: int, now: float) -> None:
        """Creating an operation failed (AirVantage unreachable): try again later.

        Args:
            delivery: what could not be sent.
            attempt: the attempt that failed to start (it is tried again, not counted).
            now: the current time.
        """
        tracked = self._by_key.get(delivery.key)
        delay = self._interval if tracked is None else min(self._cap, tracked.delay * 2)
        self._by_key[delivery.key] = _Tracked(
            delivery, None, attempt, _Phase.SENDING, now, now + delay, delay
        )
        if tracked is not None and tracked.operation_uid is not None:
            self._by_operation.pop(tracked.operation_uid, None)

    def settle(self, serial: str, request_id: str) -> bool:
        """Stop following a delivery (the device confirmed or refused it).

        Returns:
            Whether it was followed.
        """
        tracked = self._by_key.pop((serial, request_id), None)
        if tracked is None:
            return False
        if tracked.operation_uid is not None:
            self._by_operation.pop(tracked.operation_uid, None)
        return True

    def due(self, now: float) -> tuple[TrackerStep, ...]:
        """What to do now: polls of operations and resends, oldest due first.

        Each returned step is pushed back by one interval, so a step whose answer never comes
        is simply due again later.
        """
        steps: list[TrackerStep] = []
        # Only the few due ones are sorted: thousands may be followed during a burst.
        ready = [t for t in self._by_key.values() if t.due <= now]
        for tracked in sorted(ready, key=lambda t: t.due):
            tracked.due = now + tracked.delay
            if tracked.phase is _Phase.SENDING:
                steps.append(Resend(tracked.delivery, tracked.attempt))
            elif tracked.operation_uid is not None:
                steps.append(Poll(tracked.delivery, tracked.operation_uid))
        return tuple(steps)

    def next_due(self) -> float | None:
        """When the next step falls due, or ``None`` when nothing is followed."""
        return min((t.due for t in self._by_key.values()), default=None)

    def observe(
        self, operation_uid: str, outcome: OperationOutcome, *, now: float
    ) -> DeliveryDone | DeliveryGivenUp | Resend | None:
        """What an operation's counters say, from a poll or a connector event.

        Args:
            operation_uid: the operation.
            outcome: SUCCESS, FAILURE or PENDING.
            now: the current time.

        Returns:
            :class:`DeliveryDone`, :class:`DeliveryGivenUp`, a :class:`Resend` that is now
            scheduled (for the log), or ``None`` (not ours, or still pending in time).
        """
        key = self._by_operation.get(operation_uid)
        tracked = None if key is None else self._by_key.get(key)
        if tracked is None or tracked.operation_uid != operation_uid:
            return None
        if outcome is OperationOutcome.SUCCESS:
            self.settle(*tracked.delivery.key)
            return DeliveryDone(tracked.delivery, operation_uid, tracked.attempt)
        if outcome is OperationOutcome.PENDING and now - tracked.started < self._timeout:
            tracked.delay = min(self._cap, tracked.delay * 2)
            tracked.due = min(now + tracked.delay, tracked.started + self._timeout)
            return None
        reason = "failure" if outcome is OperationOutcome.FAILURE else "timeout"
        if tracked.attempt >= self._attempts:
            self.settle(*tracked.delivery.key)
            return DeliveryGivenUp(tracked.delivery, operation_uid, tracked.attempt, reason)
        self._by_operation.pop(operation_uid, None)
        tracked.operation_uid = None
        tracked.attempt += 1
        tracked.phase = _Phase.SENDING
        tracked.delay = self._interval
        tracked.due = now
        return Resend(tracked.delivery, tracked.attempt)


# --- the follow-up driver --------------------------------------------------------------------


class DeliveryLoop:
    """Drives a :class:`DeliveryTracker`: polls operations, sends again, logs the outcome.

    Args:
        tracker: the pure core.
        client: the AirVantage client.
        metrics: the service's counters.
        clock: a monotonic clock.

    Run :meth:`run` as a named task of the service's TaskGroup; cancel it to stop (it holds no
    state that a cancellation could corrupt).
    """

    def __init__(
        self,
        *,
        tracker: DeliveryTracker,
        client: AirVantageClient,
        metrics: CloudMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()
        # When run() wakes next on its own: -inf while it works through due steps (it looks
        # at the tracker again before it waits), +inf while nothing is followed. A change that
        # brings nothing due sooner leaves it asleep: a burst sends and settles thousands.
        self._deadline = -math.inf

    def sent(self, delivery: Delivery, *, operation_uid: str) -> None:
        """A first operation was created: follow it."""
        due = self.tracker.sent(delivery, operation_uid=operation_uid, attempt=1, now=self._clock())
        self._metrics.tracked.set(len(self.tracker))
        if due < self._deadline:
            self._wake.set()

    def settle(self, serial: str, request_id: str) -> None:
        """The device answered: stop following its delivery."""
        # Nothing falls due sooner: run() finds the delivery gone when it next wakes.
        self.tracker.settle(serial, request_id)
        self._metrics.tracked.set(len(self.tracker))

    def observe(self, operation_uid: str, outcome: OperationOutcome) -> None:
        """An operation's state as the connector reported it."""
        result = self.tracker.observe(operation_uid, outcome, now=self._clock())
        self._apply(result)
        self._metrics.tracked.set(len(self.tracker))
        if isinstance(result, Resend):  # due now
            self._wake.set()

    def _apply(self, result: DeliveryDone | DeliveryGivenUp | Resend | None) -> None:
        match result:
            case DeliveryDone():
                self._metrics.deliveries_done.inc()
                _log.info(
                    "delivery.done",
                    serial=result.delivery.serial,
                    request_id=result.delivery.request_id,
                    operation=result.operation_uid,
                    attempts=result.attempts,
                )
            case DeliveryGivenUp():
                self._metrics.deliveries_given_up.inc()
                _log.error(
                    "delivery.given_up",
                    serial=result.delivery.serial,
                    request_id=result.delivery.request_id,
                    operation=result.operation_uid,
                    attempts=result.attempts,
                    reason=result.reason,
                )
            case Resend():
                _log.warning(
                    "delivery.resend_scheduled",
                    serial=result.delivery.serial,
                    request_id=result.delivery.request_id,
                    attempt=result.attempt,
                )
            case None:
                pass

    async def run(self) -> None:
        """Follow deliveries until cancelled."""
        while True:
            for step in self.tracker.due(self._clock()):
                await self._step(step)
            self._metrics.tracked.set(len(self.tracker))
            due = self.tracker.next_due()
            self._deadline = math.inf if due is None else due
            wait = None if due is None else max(0.0, due - self._clock())
            self._wake.clear()
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._deadline = -math.inf

    async def _step(self, step: TrackerStep) -> None:
        match step:
            case Poll():
                status = await self._poll(step.operation_uid)
                if status is not None:
                    self._apply(
                        self.tracker.observe(step.operation_uid, status.outcome, now=self._clock())
                    )
            case Resend():
                await self._resend(step)

    async def _poll(self, operation_uid: str) -> OperationStatus | None:
        try:
            return await self._client.operation(operation_uid)
        except ZtpError as exc:
            # Due again after its interval; AirVantage may be back by then.
            _log.warning("delivery.poll_failed", operation=operation_uid, error=str(exc))
            return None

    async def _resend(self, step: Resend) -> None:
        delivery = step.delivery
        try:
            uid = await self._client.send_delivery(
                delivery.system_uid,
                delivery.message,
                transfer_id=delivery.transfer_id,
                attempt=step.attempt,
            )
        except ZtpError as exc:
            _log.warning(
                "delivery.resend_failed",
                serial=delivery.serial,
                request_id=delivery.request_id,
                error=str(exc),
            )
            self.tracker.send_failed(delivery, attempt=step.attempt, now=self._clock())
            return
        self._metrics.redeliveries.inc()
        self.tracker.sent(delivery, operation_uid=uid, attempt=step.attempt, now=self._clock())


# --- the shard handler -----------------------------------------------------------------------


class ShardHandler:
    """The consumer's handler: intake, issuance, delivery, confirmation.

    Args:
        intake: the pure intake (owned by this handler: one per consumer).
        issuer: the IoT issuer.
        client: the AirVantage client.
        deliveries: the follow-up of deliveries.
        metrics: the service's counters.
        clock: a monotonic clock (the intake's reassembly time).
        max_sending: first deliveries sent to AirVantage at once while later records proceed.

    Raises:
        UsageError: ``max_sending`` is below 1.
    """

    def __init__(
        self,
        *,
        intake: Intake,
        issuer: Issuer,
        client: AirVantageClient,
        deliveries: DeliveryLoop,
        metrics: CloudMetrics,
        clock: Callable[[], float] = time.monotonic,
        max_sending: int = _MAX_SENDING,
    ) -> None:
        if max_sending < 1:
            raise UsageError("max_sending must be >= 1")
        self._intake = intake
        self._issuer = issuer
        self._client = client
        self._deliveries = deliveries
        self._metrics = metrics
        self._clock = clock
        self._sending = asyncio.Semaphore(max_sending)

    async def __call__(self, batch: ShardBatch) -> RecordFailure | None:
        """Handle a batch, record by record, in order.

        Args:
            batch: records of one shard.

        Returns:
            ``None`` when every record's actions were carried out, else a
            :class:`RecordFailure` naming the first record that failed (the ones before it
            succeeded).
        """
        failed: dict[int, ZtpError] = {}
        async with asyncio.TaskGroup() as sends:
            for index, record in enumerate(batch.records):
                if failed:
                    break  # a delivery of this batch failed: the retry starts there
                self._metrics.records.inc()
                try:
                    await self._record(record, _Batch(index, sends, failed))
                except ZtpError as exc:
                    failed[index] = exc
        if not failed:
            return None
        first = min(failed)
        for later in batch.records[first:]:
            self._intake.forget(_message_id(later.data))
        record, error = batch.records[first], failed[first]
        self._metrics.record_failures.inc()
        reason = f"{type(error).__name__}: {error}"[:_REASON_CHARS]
        _log.warning(
            "record.failed",
            sequence=str(record.sequence_number),
            error=type(error).__name__,
            reason=reason,
        )
        return RecordFailure(record.sequence_number, reason)

    async def _record(self, record: StreamRecord, batch: _Batch) -> None:
        for action in self._intake.receive(record.data, now=self._clock()):
            match action:
                case Issue():
                    await self._issue(action, batch)
                case Refuse():
                    self._metrics.refusals.labels(reason=action.refusal.reason_code.value).inc()
                    _log.warning(
                        "csr.refused",
                        serial=action.serial,
                        request_id=action.request_id,
                        reason=action.refusal.reason_code.value,
                        detail=action.refusal.detail,
                    )
                    await self._send(
                        Delivery(
                            action.system_uid,
                            action.serial,
                            action.request_id,
                            Rejected(action.request_id, action.refusal.reason),
                            transfer_id_for(action.request_id),
                        )
                    )
                case Confirm():
                    confirmation = await self._issuer.confirm(
                        serial=action.serial, certificate_id=action.certificate_id
                    )
                    self._deliveries.settle(action.serial, action.request_id)
                    if confirmation.known:
                        self._metrics.confirmations.inc()
                case DeviceRejected():
                    self._metrics.device_rejections.inc()
                    _log.warning(
                        "device.rejected",
                        serial=action.serial,
                        request_id=action.request_id,
                        reason=action.reason,
                    )
                    self._deliveries.settle(action.serial, action.request_id)
                case OperationChanged():
                    status = OperationStatus(
                        action.operation_uid, action.state, dict(action.counters)
                    )
                    self._deliveries.observe(action.operation_uid, status.outcome)
                case Ignored():
                    self._metrics.ignored.labels(reason=action.reason.value).inc()
                    _log.debug(
                        "record.ignored",
                        reason=action.reason.value,
                        detail=action.detail,
                        serial=action.serial,
                    )

    async def _issue(self, action: Issue, batch: _Batch) -> None:
        try:
            issued = await self._issuer.issue(
                serial=action.serial,
                system_uid=action.system_uid,
                request_id=action.request_id,
                csr=action.csr,
            )
        except DecodeError as exc:
            if exc.field not in _IDENTITY_FIELDS:
                raise
            # The device's identity cannot name a thing: its request can never succeed.
            self._metrics.refusals.labels(reason="unusable_identity").inc()
            _log.warning(
                "csr.refused",
                serial=action.serial,
                request_id=action.request_id,
                reason="unusable_identity",
                detail=str(exc),
            )
            reason = sanitize_reason(f"unusable_identity: {exc.field} cannot name an IoT thing")
            await self._send(
                Delivery(
                    action.system_uid,
                    action.serial,
                    action.request_id,
                    Rejected(action.request_id, reason),
                    transfer_id_for(action.request_id),
                )
            )
            return
        (self._metrics.reused if issued.reused else self._metrics.issuances).inc()
        delivery = Delivery(
            action.system_uid,
            action.serial,
            action.request_id,
            CertificateDelivery(
                action.request_id, issued.certificate_id, issued.endpoint, issued.certificate_pem
            ),
            transfer_id_for(action.request_id),
        )
        await self._sending.acquire()
        batch.sends.create_task(
            self._deliver(issued, delivery, batch),
            name=f"ztp-deliver-{action.serial}-{action.request_id}",
        )

    async def _deliver(self, issued: Issued, delivery: Delivery, batch: _Batch) -> None:
        """Send a certificate's first delivery and record it; a failure fails its record."""
        try:
            operation_uid = await self._send(delivery)
            await self._issuer.record_delivery(
                issued, request_id=delivery.request_id, operation_uid=operation_uid
            )
        except ZtpError as exc:
            batch.failed.setdefault(batch.index, exc)
        finally:
            self._sending.release()

    async def _send(self, delivery: Delivery) -> str:
        operation_uid = await self._client.send_delivery(
            delivery.system_uid, delivery.message, transfer_id=delivery.transfer_id
        )
        self._metrics.deliveries.inc()
        self._deliveries.sent(delivery, operation_uid=operation_uid)
        return operation_uid


@dataclass(frozen=True, slots=True)
class _Batch:
    """Where a record's deliveries go: the batch's task group, and failures by record index."""

    index: int
    sends: asyncio.TaskGroup
    failed: dict[int, ZtpError]


def _message_id(data: bytes) -> str | None:
    try:
        event = parse_envelope(data, max_bytes=MAX_RECORD_BYTES)
    except (DecodeError, LimitExceededError):
        return None
    return event.message_id if isinstance(event, IncomingCommunication) else None
