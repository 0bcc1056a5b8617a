"""Intake: from a Kinesis connector record to the actions the cloud daemon must take.

Theory of operation
-------------------
:class:`Intake` is pure and synchronous: record bytes and the current time in, a tuple of
actions out. It never raises for anything a peer can send; whatever it cannot use becomes an
:class:`Ignored` action carrying the reason, so the driver logs it and the consumer moves on.

For each record (:meth:`Intake.receive`):

0. A record whose bytes name neither ``ztp.request``, ``ztp.status`` nor
   ``event.operation.state.change`` can hold nothing for us (the connector streams every
   communication of every system: telemetry, alerts, usage): it is ``Ignored(NOT_OURS)``
   before any JSON decoding. The connector writes names as plain JSON text; a name spelled
   with JSON escapes is not recognised.
1. :func:`~shared.airvantage.parse_envelope`. An undecodable record is ``Ignored(MALFORMED)``;
   an operation state change becomes :class:`OperationChanged`; any other event is
   ``Ignored(NOT_OURS)``.
2. An incoming communication whose ``message.id`` was seen recently is
   ``Ignored(DUPLICATE)`` (Kinesis delivers at least once, and the connector may write twice).
   When the driver fails to carry out a record's actions it calls :meth:`Intake.forget`, so
   the consumer's retry of that record is processed again rather than taken for a duplicate.
3. Its ``ztp.request`` values go to a :class:`~shared.fragments.Reassembler` keyed by the
   serial AirVantage authenticated (``communication.id``). A completed transfer is decoded
   (:func:`~shared.messages.decode_request`), its ``sn`` compared with the authenticated
   serial, and its CSR vetted (:func:`~cloud_daemon.validation.validate_csr`): the result is
   :class:`Issue` or :class:`Refuse`. A request too large to reassemble is refused
   (``too_large``) once per transfer, under the transfer id (the device uses its request id as
   transfer id, DESIGN.md and ``docs/messages.md``).
4. A completed transfer's request is remembered (bounded): a later copy of its fragments in
   another message (the device resending because no answer came) emits the same
   :class:`Issue` again, and the issuer's ledger turns that into a re-send of the certificate
   already issued, never a second one. At most one action per transfer per record.
5. Its ``ztp.status`` values become :class:`Confirm` (the device installed the certificate) or
   :class:`DeviceRejected` (the device's verification failed).
6. A communication with neither path is ``Ignored(NOT_OURS)``.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from cloud_daemon.validation import (
    DEFAULT_CSR_POLICY,
    CsrPolicy,
    CsrRefused,
    RefusalReason,
    ValidCsr,
    validate_csr,
)
from shared.airvantage import (
    OPERATION_STATE_CHANGE,
    IncomingCommunication,
    OperationStateChange,
    Scalar,
    parse_envelope,
    validate_serial,
)
from shared.errors import (
    DecodeError,
    FragmentError,
    InvalidValueError,
    LimitExceededError,
    UsageError,
)
from shared.fragments import (
    Completed,
    Duplicate,
    Reassembler,
    ReassemblyLimits,
    Stale,
    parse_fragment,
)
from shared.messages import (
    REQUEST_PATH,
    STATUS_PATH,
    CertificateRequest,
    Provisioned,
    decode_request,
    decode_status,
    request_fragments,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "Action",
    "Confirm",
    "DeviceRejected",
    "IgnoreReason",
    "Ignored",
    "Intake",
    "Issue",
    "OperationChanged",
    "Refuse",
]

_DEFAULT_SEEN: Final = 10_000
MAX_RECORD_BYTES: Final = 1024 * 1024
"""Kinesis's own bound on a record: anything smaller is parsed, so an oversized request is
answered with a ``too_large`` refusal rather than dropped unanswered."""
_DETAIL_CHARS: Final = 200
# What a record must name, as text, to be worth decoding (step 0 of the theory of operation).
_MARKERS: Final = (REQUEST_PATH, STATUS_PATH, OPERATION_STATE_CHANGE)
_BYTE_MARKERS: Final = tuple(marker.encode() for marker in _MARKERS)


class IgnoreReason(enum.StrEnum):
    """Why a record (or part of one) led to nothing."""

    MALFORMED = "malformed"
    NOT_OURS = "not_ours"
    DUPLICATE = "duplicate"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Issue:
    """Issue (or re-send) the certificate for a vetted CSR.

    Attributes:
        system_uid: AirVantage's uid of the system (where the delivery goes).
        serial: the authenticated serial (the thing's identity).
        request_id: the device's request id (every answer repeats it).
        csr: the vetted CSR.
        message_id: the record's ``message.id``, if any (for logs).
    """

    system_uid: str
    serial: str
    request_id: str
    csr: ValidCsr
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """Tell the device its CSR is refused, and log why.

    Attributes:
        system_uid: the system to answer.
        serial: the authenticated serial.
        request_id: the request refused (the transfer id when the request never decoded).
        refusal: the reason.
    """

    system_uid: str
    serial: str
    request_id: str
    refusal: CsrRefused


@dataclass(frozen=True, slots=True)
class Confirm:
    """The device verified and installed a certificate: mark the delivery done.

    Attributes:
        system_uid: the system.
        serial: the authenticated serial.
        request_id: the request completed.
        certificate_id: the certificate now in use.
    """

    system_uid: str
    serial: str
    request_id: str
    certificate_id: str


@dataclass(frozen=True, slots=True)
class DeviceRejected:
    """The device refused what it received (verification failed): log it.

    Attributes:
        system_uid: the system.
        serial: the authenticated serial.
        request_id: the request concerned.
        reason: the device's reason (printable, short).
    """

    system_uid: str
    serial: str
    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperationChanged:
    """An AirVantage operation changed state (from the connector's operation events).

    Attributes:
        operation_uid: the operation.
        state: the new state.
        counters: tasks per outcome; FINISHED is not success, these are.
    """

    operation_uid: str
    state: str
    counters: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Ignored:
    """Nothing to do, and why (the driver logs it).

    Attributes:
        reason: the category.
        detail: a short, printable explanation (never a secret: peer data is truncated).
        serial: the serial concerned, when known.
    """

    reason: IgnoreReason
    detail: str
    serial: str | None = None

    def __post_init__(self) -> None:
        text = "".join(c if " " <= c <= "~" else "?" for c in self.detail)
        if len(text) > _DETAIL_CHARS:
            text = f"{text[: _DETAIL_CHARS - 3]}..."
        object.__setattr__(self, "detail", text)


Action: TypeAlias = Issue | Refuse | Confirm | DeviceRejected | OperationChanged | Ignored


@dataclass(slots=True)
class _Context:
    event: IncomingCommunication
    actions: list[Action] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)


class Intake:
    """Turns connector records into actions; pure, keeps bounded memory of what it saw.

    Args:
        limits: the reassembler's bounds (defaults suit CSRs of RSA-4096 and below).
        policy: what CSRs are accepted.
        seen_capacity: how many recent ``message.id`` values are remembered for de-duplication.
        max_record_bytes: the largest record parsed (larger ones are ``Ignored(MALFORMED)``).

    Raises:
        UsageError: ``seen_capacity`` or ``max_record_bytes`` is not positive.
    """

    def __init__(
        self,
        *,
        limits: ReassemblyLimits | None = None,
        policy: CsrPolicy = DEFAULT_CSR_POLICY,
        seen_capacity: int = _DEFAULT_SEEN,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        for name, value in (
            ("seen_capacity", seen_capacity),
            ("max_record_bytes", max_record_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer")
        self._max_record_bytes = max_record_bytes
        self._reassembler = Reassembler(limits=limits)
        self._policy = policy
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_capacity = seen_capacity
        # (serial, transfer id) -> decoded request, for resends of a completed transfer.
        self._requests: OrderedDict[tuple[str, str], CertificateRequest] = OrderedDict()
        self._refused: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._memory = self._reassembler.limits.max_completed

    def receive(self, data: bytes | str, *, now: float) -> tuple[Action, ...]:
        """Decide what one connector record asks for.

        Args:
            data: the record's data.
            now: the current time in seconds (a monotonic clock; only differences matter).

        Returns:
            The actions, in record order; never empty (at least one :class:`Ignored`).

        Raises:
            UsageError: ``now`` is not a finite number (a caller bug).
        """
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise UsageError("now must be a finite number of seconds")
        if not _names_ours(data):
            return (Ignored(IgnoreReason.NOT_OURS, "no ztp path or operation event named"),)
        try:
            event = parse_envelope(data, max_bytes=self._max_record_bytes)
        except (DecodeError, LimitExceededError) as exc:
            return (Ignored(IgnoreReason.MALFORMED, str(exc)),)
        match event:
            case OperationStateChange():
                counters = tuple(sorted(event.counters.items()))
                return (OperationChanged(event.operation_uid, event.new_state, counters),)
            case IncomingCommunication():
                return self._communication(event, now)
            case _:
                return (Ignored(IgnoreReason.NOT_OURS, f"event {event.name}"),)

    def forget(self, message_id: str | None) -> None:
        """Forget that a message was seen, so its redelivery is processed again.

        Call it when the actions of a record could not be carried out (the consumer will
        retry the record).

        Args:
            message_id: the record's ``message.id`` (``None`` is accepted and ignored).
        """
        if message_id is not None:
            self._seen.pop(message_id, None)

    def _remember(self, store: OrderedDict[str, None], key: str) -> None:
        store[key] = None
        store.move_to_end(key)
        while len(store) > self._seen_capacity:
            store.popitem(last=False)

    def _communication(self, event: IncomingCommunication, now: float) -> tuple[Action, ...]:
        serial = event.serial
        if event.message_id is not None:
            if event.message_id in self._seen:
                return (Ignored(IgnoreReason.DUPLICATE, f"message {event.message_id}", serial),)
            self._remember(self._seen, event.message_id)
        paths = {point.path for point in event.points}
        if REQUEST_PATH not in paths and STATUS_PATH not in paths:
            return (Ignored(IgnoreReason.NOT_OURS, "no ztp data in the message", serial),)
        try:
            validate_serial(serial)
        except InvalidValueError as exc:
            return (Ignored(IgnoreReason.MALFORMED, f"communication.id: {exc}", serial),)
        context = _Context(event)
        if REQUEST_PATH in paths:
            self._requests_in(context, now)
        for point in event.points:
            if point.path == STATUS_PATH:
                context.actions.append(self._status(event, point.value))
        return tuple(context.actions)

    def _requests_in(self, context: _Context, now: float) -> None:
        event = context.event
        try:
            texts = request_fragments(event.points)
        except DecodeError as exc:
            context.actions.append(Ignored(IgnoreReason.MALFORMED, str(exc), event.serial))
            return
        for text in texts:
            self._fragment(context, text, now)

    def _fragment(self, context: _Context, text: str, now: float) -> None:
        serial = context.event.serial
        try:
            transfer_id = parse_fragment(text).transfer_id
        except FragmentError as exc:
            context.actions.append(Ignored(IgnoreReason.MALFORMED, str(exc), serial))
            return
        key = (serial, transfer_id)
        if transfer_id in context.answered or key in self._refused:
            return
        try:
            outcome = self._reassembler.receive(text, now=now, source=serial)
        except LimitExceededError as exc:
            self._refuse_transfer(context, key, exc)
            return
        except FragmentError as exc:
            context.actions.append(Ignored(IgnoreReason.MALFORMED, str(exc), serial))
            return
        match outcome:
            case Completed():
                context.answered.add(transfer_id)
                context.actions.append(self._completed(context.event, key, outcome.payload))
            case Duplicate(completed=True) if key in self._requests:
                context.answered.add(transfer_id)
                self._requests.move_to_end(key)
                context.actions.append(self._vet(context.event, self._requests[key]))
            case Stale():
                context.actions.append(
                    Ignored(IgnoreReason.STALE, f"transfer {transfer_id} superseded", serial)
                )
            case _:
                pass  # a fragment stored, or a copy of one held: nothing to do yet

    def _refuse_transfer(
        self, context: _Context, key: tuple[str, str], exc: LimitExceededError
    ) -> None:
        event = context.event
        self._refused[key] = None
        while len(self._refused) > self._memory:
            self._refused.popitem(last=False)
        context.answered.add(key[1])
        refusal = CsrRefused(
            RefusalReason.TOO_LARGE, f"request {exc.limit_name} {exc.actual} > {exc.limit}"
        )
        context.actions.append(Refuse(event.system_uid, event.serial, key[1], refusal))

    def _completed(
        self, event: IncomingCommunication, key: tuple[str, str], payload: bytes
    ) -> Action:
        try:
            request = decode_request(payload)
        except LimitExceededError as exc:
            refusal = CsrRefused(RefusalReason.TOO_LARGE, str(exc))
            return Refuse(event.system_uid, event.serial, key[1], refusal)
        except DecodeError as exc:
            if exc.field == "csr" and "at most" in exc.expected:
                refusal = CsrRefused(RefusalReason.TOO_LARGE, f"csr: {exc.got} characters")
                return Refuse(event.system_uid, event.serial, key[1], refusal)
            return Ignored(IgnoreReason.MALFORMED, f"request: {exc}", event.serial)
        self._requests[key] = request
        while len(self._requests) > self._memory:
            self._requests.popitem(last=False)
        return self._vet(event, request)

    def _vet(self, event: IncomingCommunication, request: CertificateRequest) -> Action:
        if request.serial != event.serial:
            refusal = CsrRefused(
                RefusalReason.CN_MISMATCH,
                f"request names serial {request.serial!r}, "
                f"AirVantage authenticated {event.serial!r}",
            )
            return Refuse(event.system_uid, event.serial, request.request_id, refusal)
        verdict = validate_csr(request.csr_pem, serial=event.serial, policy=self._policy)
        if isinstance(verdict, CsrRefused):
            return Refuse(event.system_uid, event.serial, request.request_id, verdict)
        return Issue(event.system_uid, event.serial, request.request_id, verdict, event.message_id)

    @staticmethod
    def _status(event: IncomingCommunication, value: Scalar) -> Action:
        try:
            report = decode_status(value)
        except (DecodeError, LimitExceededError) as exc:
            return Ignored(IgnoreReason.MALFORMED, f"status: {exc}", event.serial)
        if isinstance(report, Provisioned):
            return Confirm(event.system_uid, event.serial, report.request_id, report.certificate_id)
        return DeviceRejected(event.system_uid, event.serial, report.request_id, report.reason)


def _names_ours(data: bytes | str) -> bool:
    """Whether a record's text names one of our data paths or the operation event."""
    if isinstance(data, str):
        return any(marker in data for marker in _MARKERS)
    return any(marker in data for marker in _BYTE_MARKERS)
