"""The provisioning state machine of the device daemon: a pure core (no I/O, clock passed in).

Theory of operation
===================

A gateway makes one key pair, sends one certificate signing request (CSR) through AirVantage, and
waits for the cloud daemon to deliver, in ``ztp.deliver`` command tasks, a certificate for that key
and the IoT data endpoint. :class:`ProvisioningMachine` decides every step and does none of them:
:meth:`~ProvisioningMachine.handle` takes one event and the current time and returns the actions
to perform, in order. An async driver performs them and feeds back what happened.

States (:class:`State`) and the legal moves between them are data: :data:`TRANSITIONS` maps each
state and event type to the one state that event leads to. An event absent from the table, or
refused by one of the guards below, raises :class:`~ztp_daemon.errors.IllegalTransitionError` and
leaves the machine exactly as it was::

    FRESH --Start--> MAKING_KEY --KeyReady--> KEY_READY --Persisted--> REQUEST_SENT
    REQUEST_SENT --FragmentHeld--> RECEIVING --CertificateVerified--> STORING
    STORING --CredentialsStored--> PROVISIONED (ack, report, start the publisher, once durable)
    REQUEST_SENT/RECEIVING --DeliveryFailed--> WAITING_RETRY --TimerFired--> REQUEST_SENT
    REQUEST_SENT/RECEIVING --TimerFired (no delivery in time)--> REQUEST_SENT (the same CSR again)
    WAITING_RETRY accepts a late delivery just as REQUEST_SENT does
    STORING --StorageFailed--> WAITING_RETRY;  MAKING_KEY/KEY_READY --StorageFailed--> FRESH
    resumed from a record: KEY_READY/WAITING_RETRY/PROVISIONED --Start--> carry on from there

Renewal (rotation) runs the same steps in a parallel set of states while the bundle in use stays
in use; the publisher keeps publishing on it until the new bundle is committed::

    PROVISIONED --RenewalDue (timer) | RenewRequested (ztp.renew)--> RENEW_MAKING_KEY
    RENEW_MAKING_KEY --KeyReady--> RENEW_KEY_READY --Persisted--> RENEW_SENT
    RENEW_SENT --FragmentHeld--> RENEW_RECEIVING --CertificateVerified--> RENEW_STORING
    RENEW_STORING --CredentialsStored--> PROVISIONED (the new bundle; ack, report, once durable)
    RENEW_SENT/RENEW_RECEIVING --DeliveryFailed--> RENEW_WAITING --TimerFired--> RENEW_SENT
    RENEW_MAKING_KEY/RENEW_KEY_READY --StorageFailed--> PROVISIONED (the old record, rearmed)
    PROVISIONED --RenewalNotDue (timer, early)--> PROVISIONED (armed again)
    resumed: RENEW_KEY_READY/RENEW_SENT/RENEW_WAITING --Start--> the same CSR, publisher first

The driver's contract:

1. ``Start`` comes first (``LinkUp``/``LinkDown`` may precede it); a second ``Start`` is illegal.
2. Actions of one batch are performed in order. :class:`MakeKey`, :class:`Persist` and
   :class:`StoreCredentials` are *storage actions*; each is the last of its batch, and the driver
   feeds its completion (:class:`KeyReady`, :class:`Persisted`, :class:`CredentialsStored`, or
   :class:`StorageFailed`) before any other event except ``LinkUp``/``LinkDown``: until then
   tasks and timers are illegal (the driver queues them), so no two storage actions overlap. A
   task acked only after its credentials are stored and arriving again meanwhile (QoS 1) is
   therefore seen after the commit, and acked OK as a repeat.
3. The driver owns one timer: :class:`ScheduleRetry` (re)arms it, :class:`CancelRetry` disarms it,
   and it feeds :class:`TimerFired` only for the armed timer.
4. :class:`PublishRequest`, :class:`AckTask` and :class:`ReportStatus` go over the AirVantage link.
   The machine holds them while the link is down and returns them with the next ``LinkUp``.

Tasks are interpreted before the table applies: a :class:`TaskReceived` is fed to the injected
:class:`DeliveryDecoder` (:class:`SharedCodecDecoder` in production: ``f01``.. params through
:mod:`shared.fragments` and :mod:`shared.messages`) and, when a delivery is
complete, to :func:`~ztp_daemon.verify.verify_certificate`. The result is one *outcome* event
(:class:`FragmentHeld`, :class:`CertificateVerified`, :class:`DeliveryFailed`,
:class:`TaskRefused`, :class:`TaskRepeated`, :class:`RenewRequested`; in PROVISIONED a
``TimerFired`` becomes :class:`RenewalDue` or :class:`RenewalNotDue`), and the table decides
what that outcome may do in the current state. Outcomes are internal: the driver cannot feed
them. Interpretation knows the state, so every task gets an answer: a task the state cannot use
is refused with an ERROR ack (``no request outstanding``, ``already provisioned``, a decoding
error...). A verified delivery is acked only once its bundle is committed and recorded, so a
daemon killed before gets it again.

Durability and resume: the machine emits :class:`Persist` with a :class:`StateRecord` when it has
made a key and CSR, on each send of the request, on entering WAITING_RETRY, and once provisioned.
A new machine built from the last stored record resumes: with a record it never asks for a new key
and re-sends the *same* CSR (and request id, which is derived from the CSR, so the cloud recognises
a repeat). The CSR is published only after its record is durable, so a CSR that was never stored
was never sent either. The success report, the ack of the delivering task and the publisher
start follow the durable PROVISIONED record: killed before the record is durable, the daemon gets
the delivery again (unacked) instead of an acked delivery it has no record of. A machine resumed
PROVISIONED reports again (a kill may have fallen between the record and the report; the cloud
takes a repeat as the same news). Storing the same certificate twice (killed between storing and
persisting) is idempotent in the bundle store.

Renewal: the automatic trigger is the one timer, armed in PROVISIONED for the due time of the
certificate in use: :func:`renewal_due`, ``at_fraction`` of its lifetime (``not_before`` to
``not_after``) plus or minus ``jitter_fraction`` of it, drawn once from the injected rng when the
certificate is stored and kept in the record (``renew_at``). The timer waits at most
``check_interval`` (1 h): a wall clock that jumps (a gateway booting with a poor clock) is
noticed within that time, so an early expiry is interpreted as :class:`RenewalNotDue` and the
timer armed again, a due one as :class:`RenewalDue`. ``Start`` in PROVISIONED arms it too, with
no wait when renewal is already due. The operator's ``ztp.renew`` command
(:data:`RENEW_COMMAND`, no parameters) is interpreted as :class:`RenewRequested`: in PROVISIONED
it starts a renewal, acked OK once the new key and CSR are durable (RENEW_KEY_READY); in a
renewal state it is acked OK at once (one is under way); before the first provisioning it is
refused. A renewal asks for a *fresh* key (``MakeKey(fresh=True)``: any pending key is dropped
first, so the bundle's key is never reused), and keeps the bundle in use recorded in its
records (``bundle_version``, ``certificate_id``, validity), so a daemon killed mid-renewal
resumes with the same new key and CSR, and starts the publisher on the committed bundle at once
(:class:`StartPublisher` comes first on resume). Retries, backoff and refusals behave as in
first provisioning; a refused renewal never touches the bundle in use. A renewal whose key or
first record cannot be stored goes back to PROVISIONED (the old record) and acks the command
ERROR; with automatic renewal on, it tries again at the due time, and never sooner than a
backoff (a renewal the operator asked for early waits for the next command).

Retry timing: the first send waits ``delivery_timeout`` (60 s) for a delivery; each later wait is
exponential backoff with full jitter, ``uniform(0, min(retry_cap, delivery_timeout * 2**(n-1)))``
for the n-th send, with ``retry_cap`` 1 h. Randomness comes from an injected ``random.Random``.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
import enum
import hashlib
import math
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from shared.backoff import full_jitter_delay
from shared.errors import PeerError, UsageError
from shared.fragments import Completed, Reassembler, ReassemblyLimits
from shared.messages import (
    DELIVER_COMMAND,
    RENEW_COMMAND,
    CertificateDelivery,
    Rejected,
    decode_delivery,
    fragments_from_params,
    sanitize_reason,
)
from ztp_daemon.errors import IllegalTransitionError, VerificationError
from ztp_daemon.verify import VerifyPolicy, verify_certificate

__all__ = [
    "DELIVER_COMMAND",
    "PERSISTED_STATES",
    "RENEWAL_STATES",
    "RENEW_COMMAND",
    "TRANSITIONS",
    "AckTask",
    "Action",
    "CancelRetry",
    "CertificateVerified",
    "CredentialsStored",
    "Delivery",
    "DeliveryDecoder",
    "DeliveryFailed",
    "DiscardKey",
    "Event",
    "FragmentHeld",
    "Input",
    "KeyReady",
    "LinkDown",
    "LinkUp",
    "MachineConfig",
    "MakeKey",
    "Persist",
    "Persisted",
    "ProvisioningMachine",
    "PublishRequest",
    "Refusal",
    "RenewRequested",
    "RenewalDue",
    "RenewalNotDue",
    "RenewalPolicy",
    "ReportStatus",
    "ScheduleRetry",
    "SharedCodecDecoder",
    "Start",
    "StartPublisher",
    "State",
    "StateRecord",
    "StorageFailed",
    "StoreCredentials",
    "TaskReceived",
    "TaskRefused",
    "TaskRepeated",
    "TimerFired",
    "renewal_due",
    "request_id_for",
]

_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")
_MAX_REASON_CHARS = 200


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        msg = f"{name} must be 1..128 characters of [A-Za-z0-9._:-], got {value!r:.80}"
        raise ValueError(msg)


def _short(text: str) -> str:
    """Bound a reason for an ack or a status report (AirVantage strings stay small)."""
    return text if len(text) <= _MAX_REASON_CHARS else f"{text[: _MAX_REASON_CHARS - 3]}..."


class State(enum.Enum):
    """Where the gateway is in its provisioning."""

    FRESH = "fresh"
    MAKING_KEY = "making_key"
    KEY_READY = "key_ready"
    REQUEST_SENT = "request_sent"
    RECEIVING = "receiving"
    STORING = "storing"
    PROVISIONED = "provisioned"
    WAITING_RETRY = "waiting_retry"
    RENEW_MAKING_KEY = "renew_making_key"
    RENEW_KEY_READY = "renew_key_ready"
    RENEW_SENT = "renew_sent"
    RENEW_RECEIVING = "renew_receiving"
    RENEW_STORING = "renew_storing"
    RENEW_WAITING = "renew_waiting"


#: The states a :class:`StateRecord` may hold (the others are never written).
PERSISTED_STATES = frozenset(
    {
        State.KEY_READY,
        State.REQUEST_SENT,
        State.WAITING_RETRY,
        State.PROVISIONED,
        State.RENEW_KEY_READY,
        State.RENEW_SENT,
        State.RENEW_WAITING,
    }
)
#: The states of a renewal: a bundle is in use while a new certificate is asked for.
RENEWAL_STATES = frozenset(
    {
        State.RENEW_MAKING_KEY,
        State.RENEW_KEY_READY,
        State.RENEW_SENT,
        State.RENEW_RECEIVING,
        State.RENEW_STORING,
        State.RENEW_WAITING,
    }
)
# Each renewal state does what its first-provisioning counterpart does, with a bundle in use.
_PHASE: Mapping[State, State] = {
    **{state: state for state in State},
    State.RENEW_MAKING_KEY: State.MAKING_KEY,
    State.RENEW_KEY_READY: State.KEY_READY,
    State.RENEW_SENT: State.REQUEST_SENT,
    State.RENEW_RECEIVING: State.RECEIVING,
    State.RENEW_STORING: State.STORING,
    State.RENEW_WAITING: State.WAITING_RETRY,
}


def request_id_for(csr_pem: str) -> str:
    """Derive the request id from the CSR: the same CSR always travels under the same id."""
    return hashlib.sha256(csr_pem.strip().encode("ascii")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class StateRecord:
    """What survives a restart; :mod:`ztp_daemon.state` writes it as JSON.

    Attributes:
        state: one of :data:`PERSISTED_STATES`.
        request_id: the id of our one request (derived from the CSR).
        csr_pem: the CSR, re-sent unchanged after a restart.
        attempts: how many times the request has been sent.
        next_retry_at: when to send again (epoch seconds), in WAITING_RETRY.
        last_error: the reason of the last failed delivery, if any.
        bundle_version: the credential bundle version in use, once provisioned (while renewing,
            the bundle still in use).
        certificate_id: the id of the certificate in use, once provisioned.
        not_before: the start of that certificate's validity (epoch seconds).
        not_after: the end of that certificate's validity (epoch seconds).
        renew_at: when its automatic renewal is due (epoch seconds); ``None`` when off.

    In the renewal states, ``request_id``, ``csr_pem``, ``attempts``, ``next_retry_at`` and
    ``last_error`` are the renewal's; the other fields describe the bundle in use.
    """

    state: State
    request_id: str
    csr_pem: str
    attempts: int = 0
    next_retry_at: float | None = None
    last_error: str | None = None
    bundle_version: int | None = None
    certificate_id: str | None = None
    not_before: float | None = None
    not_after: float | None = None
    renew_at: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, State) or self.state not in PERSISTED_STATES:
            msg = f"state {self.state!r} is never persisted"
            raise ValueError(msg)
        _check_id("request_id", self.request_id)
        if "-----BEGIN CERTIFICATE REQUEST-----" not in self.csr_pem:
            msg = "csr_pem is not a PEM certificate request"
            raise ValueError(msg)
        if self.attempts < 0:
            msg = "attempts must not be negative"
            raise ValueError(msg)
        for name in ("next_retry_at", "not_before", "not_after", "renew_at"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                msg = f"{name} must be finite"
                raise ValueError(msg)
        if (self.not_before is None) != (self.not_after is None) or (
            self.not_before is not None
            and self.not_after is not None
            and self.not_before > self.not_after
        ):
            msg = "not_before and not_after come together, not_before first"
            raise ValueError(msg)
        if self.state in {State.WAITING_RETRY, State.RENEW_WAITING} and self.next_retry_at is None:
            msg = f"a {self.state.name} record needs next_retry_at"
            raise ValueError(msg)
        if self.state is State.PROVISIONED or self.state in RENEWAL_STATES:
            if self.bundle_version is None or self.bundle_version < 1:
                msg = f"a {self.state.name} record needs a bundle_version >= 1"
                raise ValueError(msg)
            # What the status report will carry: AWS IoT's id, 64 lowercase hex digits. A record
            # holding anything else (a damaged or hand-edited file) is refused when loaded, not
            # at every start by the report that cannot encode it.
            certificate_id = self.certificate_id
            if not isinstance(certificate_id, str) or not _CERTIFICATE_ID.fullmatch(certificate_id):
                msg = f"certificate_id must be 64 lowercase hex digits, got {certificate_id!r:.80}"
                raise ValueError(msg)

    @property
    def renewing(self) -> bool:
        """Whether this record is of a renewal under way."""
        return self.state in RENEWAL_STATES


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """When a certificate in use is renewed automatically.

    Attributes:
        at_fraction: the fraction of the lifetime after which renewal is due (2/3, as step-ca).
        jitter_fraction: plus or minus this fraction of the lifetime, drawn once per
            certificate, so a fleet provisioned together does not renew together.
        check_interval: the longest the timer waits before looking at the clock again, seconds.
    """

    at_fraction: float = 2 / 3
    jitter_fraction: float = 0.05
    check_interval: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.at_fraction < 1:
            msg = "at_fraction must be in (0, 1)"
            raise ValueError(msg)
        if not 0 <= self.jitter_fraction < min(self.at_fraction, 1 - self.at_fraction):
            msg = "jitter_fraction must be >= 0 and keep at_fraction +/- jitter inside (0, 1)"
            raise ValueError(msg)
        if not (math.isfinite(self.check_interval) and self.check_interval > 0):
            msg = "check_interval must be finite and positive"
            raise ValueError(msg)


def renewal_due(
    not_before: float, not_after: float, *, policy: RenewalPolicy, rand: float
) -> float:
    """When a certificate valid from ``not_before`` to ``not_after`` is due for renewal.

    Args:
        not_before: the start of its validity, epoch seconds.
        not_after: the end of its validity, epoch seconds.
        policy: the fraction of the lifetime and the jitter.
        rand: a uniform draw in [0, 1) (``random.Random.random()``): 0 is the earliest time,
            0.5 the fraction itself, 1 the latest.

    Returns:
        ``not_before + lifetime * (at_fraction +/- jitter_fraction)``, epoch seconds.

    Raises:
        UsageError: ``not_before`` after ``not_after``, or ``rand`` outside [0, 1].
    """
    if not not_before <= not_after or not 0 <= rand <= 1:
        msg = "need not_before <= not_after and 0 <= rand <= 1"
        raise UsageError(msg)
    fraction = policy.at_fraction + (2 * rand - 1) * policy.jitter_fraction
    return not_before + (not_after - not_before) * fraction


# --- what the decoder produces -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    """A complete certificate delivery, decoded (not yet verified)."""

    request_id: str
    certificate_id: str
    endpoint: str
    certificate_pem: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The cloud refused our request (for example the CSR failed its checks)."""

    request_id: str
    reason: str


class DeliveryDecoder(abc.ABC):
    """Turns the params of ``ztp.deliver`` tasks into deliveries: reassembly plus decoding.

    Pure and synchronous, like the machine that owns it.
    """

    @abc.abstractmethod
    def feed(self, params: Mapping[str, object], *, now: float) -> Delivery | Refusal | None:
        """Take one task's params.

        Args:
            params: the command task's parameters.
            now: the current time, epoch seconds (for expiring partial transfers).

        Returns:
            The delivery or refusal once complete, ``None`` while fragments are missing.

        Raises:
            PeerError: malformed fragments or message, or a bound exceeded.
        """

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget every partial transfer (a new request attempt starts clean)."""


class SharedCodecDecoder(DeliveryDecoder):
    """The production decoder: ``f01``.. params, :mod:`shared.fragments`, :mod:`shared.messages`.

    A task normally carries every fragment of a delivery, but fragments may also be spread over
    several tasks in any order; the reassembler holds them until the transfer completes.
    :meth:`reset` (each new send of the request) starts a fresh reassembler, so a delivery the
    cloud sends again under the same transfer id is decoded again rather than taken as a repeat.

    Args:
        limits: the reassembler's bounds (the defaults suit certificates).
    """

    def __init__(self, *, limits: ReassemblyLimits | None = None) -> None:
        self._limits = limits
        self._reassembler = Reassembler(limits=limits)

    def feed(self, params: Mapping[str, object], *, now: float) -> Delivery | Refusal | None:
        """Reassemble and decode; see :meth:`DeliveryDecoder.feed`."""
        result: Delivery | Refusal | None = None
        for text in fragments_from_params(params):
            outcome = self._reassembler.receive(text, now=now)
            if isinstance(outcome, Completed):
                match decode_delivery(outcome.payload):
                    case CertificateDelivery() as msg:
                        result = Delivery(
                            msg.request_id, msg.certificate_id, msg.endpoint, msg.certificate_pem
                        )
                    case Rejected() as msg:
                        result = Refusal(msg.request_id, msg.reason)
        return result

    def reset(self) -> None:
        """Start a fresh reassembler."""
        self._reassembler = Reassembler(limits=self._limits)


# --- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """Base of everything the machine reacts to."""


@dataclass(frozen=True, slots=True)
class Start(Event):
    """Begin provisioning, or resume it from the stored record."""


@dataclass(frozen=True, slots=True)
class LinkUp(Event):
    """The AirVantage link is connected and subscribed to tasks."""


@dataclass(frozen=True, slots=True)
class LinkDown(Event):
    """The AirVantage link is down."""


@dataclass(frozen=True, slots=True)
class TaskReceived(Event):
    """A command task from AirVantage (``{serial}/tasks/json``)."""

    uid: str
    command_id: str
    params: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.uid, str) or not self.uid or len(self.uid) > 128:
            msg = "uid must be a non-empty string of at most 128 characters"
            raise ValueError(msg)
        command: object = self.command_id
        if not isinstance(command, str):
            msg = "command_id must be a string"
            raise TypeError(msg)


@dataclass(frozen=True, slots=True)
class TimerFired(Event):
    """The timer armed by the last :class:`ScheduleRetry` expired."""


@dataclass(frozen=True, slots=True)
class KeyReady(Event):
    """The key exists (made or loaded) and this CSR was signed with it.

    The public key is read from the CSR, which also proves the CSR parses.
    """

    csr_pem: str
    public_key: PublicKeyTypes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            public_key = _public_key_of(self.csr_pem)
        except (ValueError, UnicodeEncodeError) as exc:
            msg = "csr_pem is not a PEM certificate request"
            raise ValueError(msg) from exc
        object.__setattr__(self, "public_key", public_key)


@dataclass(frozen=True, slots=True)
class Persisted(Event):
    """The last :class:`Persist` is durable."""


@dataclass(frozen=True, slots=True)
class CredentialsStored(Event):
    """The last :class:`StoreCredentials` committed this bundle version."""

    version: int

    def __post_init__(self) -> None:
        if self.version < 1:
            msg = "bundle versions start at 1"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class StorageFailed(Event):
    """The last storage action failed (disk full, permissions...)."""

    reason: str


#: The events a driver may feed to :meth:`ProvisioningMachine.handle`.
Input: TypeAlias = (
    Start
    | LinkUp
    | LinkDown
    | TaskReceived
    | TimerFired
    | KeyReady
    | Persisted
    | CredentialsStored
    | StorageFailed
)


@dataclass(frozen=True, slots=True)
class FragmentHeld(Event):
    """Outcome: part of a delivery arrived; more is expected."""

    uid: str


@dataclass(frozen=True, slots=True)
class CertificateVerified(Event):
    """Outcome: a complete delivery for our request passed every check."""

    uid: str
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class DeliveryFailed(Event):
    """Outcome: a delivery for our request failed verification, or the cloud refused it."""

    uid: str
    reason: str
    _: dataclasses.KW_ONLY
    verification: bool


@dataclass(frozen=True, slots=True)
class TaskRefused(Event):
    """Outcome: a task that is not (or not now) acceptable; acked ERROR, nothing else changes."""

    uid: str
    reason: str


@dataclass(frozen=True, slots=True)
class TaskRepeated(Event):
    """Outcome: a repeat of a delivery already being stored or stored (QoS 1 redelivery)."""

    uid: str


@dataclass(frozen=True, slots=True)
class RenewRequested(Event):
    """Outcome: an operator's ``ztp.renew`` command, once provisioned."""

    uid: str


@dataclass(frozen=True, slots=True)
class RenewalDue(Event):
    """Outcome: the timer of PROVISIONED expired and the certificate is due for renewal."""


@dataclass(frozen=True, slots=True)
class RenewalNotDue(Event):
    """Outcome: the timer of PROVISIONED expired before the due time (it is armed again)."""


# --- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Action:
    """Base of everything the machine asks the driver to do."""


@dataclass(frozen=True, slots=True)
class MakeKey(Action):
    """Load the key, or make it if there is none; sign a CSR; answer :class:`KeyReady`.

    Attributes:
        fresh: drop any pending key first and make a new one (a renewal: the key of the bundle
            in use must never be asked for again).
    """

    fresh: bool = False


@dataclass(frozen=True, slots=True)
class Persist(Action):
    """Write this record atomically; answer :class:`Persisted`."""

    record: StateRecord


@dataclass(frozen=True, slots=True)
class PublishRequest(Action):
    """Send the certificate request (``ztp.request``) over the link."""

    request_id: str
    csr_pem: str
    attempt: int


@dataclass(frozen=True, slots=True)
class AckTask(Action):
    """Acknowledge a task: OK, or ERROR with a message."""

    uid: str
    ok: bool
    message: str | None = None


@dataclass(frozen=True, slots=True)
class StoreCredentials(Action):
    """Commit key, certificate and endpoint as one bundle; answer :class:`CredentialsStored`."""

    request_id: str
    certificate_id: str
    endpoint: str
    certificate_pem: str


@dataclass(frozen=True, slots=True)
class ScheduleRetry(Action):
    """(Re)arm the one timer to fire after ``delay`` seconds."""

    delay: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.delay) and self.delay >= 0):
            msg = "delay must be finite and not negative"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class CancelRetry(Action):
    """Disarm the timer."""


@dataclass(frozen=True, slots=True)
class ReportStatus(Action):
    """Report ``provisioned`` (with the certificate id) or ``rejected`` (with a reason)."""

    request_id: str
    provisioned: bool
    certificate_id: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.provisioned != (self.certificate_id is not None):
            msg = "a provisioned report carries the certificate id, a rejected one does not"
            raise ValueError(msg)
        if not self.provisioned and not self.reason:
            msg = "a rejected report carries a reason"
            raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class StartPublisher(Action):
    """Provisioning is done: have the supervisor start the publisher on this bundle."""

    bundle_version: int


@dataclass(frozen=True, slots=True)
class DiscardKey(Action):
    """Remove the key store's pending key: the bundle now holds the key and the record says so."""


# --- the table ---------------------------------------------------------------------------------

_S = State
#: Every legal move: the state an event of this type leads to from this state.
TRANSITIONS: Mapping[State, Mapping[type[Event], State]] = {
    _S.FRESH: {
        Start: _S.MAKING_KEY,
        TimerFired: _S.MAKING_KEY,
        LinkUp: _S.FRESH,
        LinkDown: _S.FRESH,
        TaskRefused: _S.FRESH,
    },
    _S.MAKING_KEY: {
        KeyReady: _S.KEY_READY,
        StorageFailed: _S.FRESH,
        LinkUp: _S.MAKING_KEY,
        LinkDown: _S.MAKING_KEY,
    },
    _S.KEY_READY: {
        Start: _S.REQUEST_SENT,
        Persisted: _S.REQUEST_SENT,
        StorageFailed: _S.FRESH,
        LinkUp: _S.KEY_READY,
        LinkDown: _S.KEY_READY,
    },
    _S.REQUEST_SENT: {
        TimerFired: _S.REQUEST_SENT,
        Persisted: _S.REQUEST_SENT,
        StorageFailed: _S.REQUEST_SENT,
        FragmentHeld: _S.RECEIVING,
        CertificateVerified: _S.STORING,
        DeliveryFailed: _S.WAITING_RETRY,
        TaskRefused: _S.REQUEST_SENT,
        LinkUp: _S.REQUEST_SENT,
        LinkDown: _S.REQUEST_SENT,
    },
    _S.RECEIVING: {
        TimerFired: _S.REQUEST_SENT,
        FragmentHeld: _S.RECEIVING,
        CertificateVerified: _S.STORING,
        DeliveryFailed: _S.WAITING_RETRY,
        TaskRefused: _S.RECEIVING,
        LinkUp: _S.RECEIVING,
        LinkDown: _S.RECEIVING,
    },
    _S.STORING: {
        CredentialsStored: _S.PROVISIONED,
        StorageFailed: _S.WAITING_RETRY,
        LinkUp: _S.STORING,
        LinkDown: _S.STORING,
    },
    _S.PROVISIONED: {
        Start: _S.PROVISIONED,
        Persisted: _S.PROVISIONED,
        StorageFailed: _S.PROVISIONED,
        TaskRepeated: _S.PROVISIONED,
        TaskRefused: _S.PROVISIONED,
        RenewalDue: _S.RENEW_MAKING_KEY,
        RenewRequested: _S.RENEW_MAKING_KEY,
        RenewalNotDue: _S.PROVISIONED,
        LinkUp: _S.PROVISIONED,
        LinkDown: _S.PROVISIONED,
    },
    _S.WAITING_RETRY: {
        Start: _S.WAITING_RETRY,
        TimerFired: _S.REQUEST_SENT,
        Persisted: _S.WAITING_RETRY,
        StorageFailed: _S.WAITING_RETRY,
        FragmentHeld: _S.RECEIVING,
        CertificateVerified: _S.STORING,
        DeliveryFailed: _S.WAITING_RETRY,
        TaskRefused: _S.WAITING_RETRY,
        LinkUp: _S.WAITING_RETRY,
        LinkDown: _S.WAITING_RETRY,
    },
    _S.RENEW_MAKING_KEY: {
        KeyReady: _S.RENEW_KEY_READY,
        StorageFailed: _S.PROVISIONED,
        LinkUp: _S.RENEW_MAKING_KEY,
        LinkDown: _S.RENEW_MAKING_KEY,
    },
    _S.RENEW_KEY_READY: {
        Start: _S.RENEW_SENT,
        Persisted: _S.RENEW_SENT,
        StorageFailed: _S.PROVISIONED,
        LinkUp: _S.RENEW_KEY_READY,
        LinkDown: _S.RENEW_KEY_READY,
    },
    _S.RENEW_SENT: {
        TimerFired: _S.RENEW_SENT,
        Persisted: _S.RENEW_SENT,
        StorageFailed: _S.RENEW_SENT,
        FragmentHeld: _S.RENEW_RECEIVING,
        CertificateVerified: _S.RENEW_STORING,
        DeliveryFailed: _S.RENEW_WAITING,
        TaskRefused: _S.RENEW_SENT,
        RenewRequested: _S.RENEW_SENT,
        LinkUp: _S.RENEW_SENT,
        LinkDown: _S.RENEW_SENT,
    },
    _S.RENEW_RECEIVING: {
        TimerFired: _S.RENEW_SENT,
        FragmentHeld: _S.RENEW_RECEIVING,
        CertificateVerified: _S.RENEW_STORING,
        DeliveryFailed: _S.RENEW_WAITING,
        TaskRefused: _S.RENEW_RECEIVING,
        RenewRequested: _S.RENEW_RECEIVING,
        LinkUp: _S.RENEW_RECEIVING,
        LinkDown: _S.RENEW_RECEIVING,
    },
    _S.RENEW_STORING: {
        CredentialsStored: _S.PROVISIONED,
        StorageFailed: _S.RENEW_WAITING,
        LinkUp: _S.RENEW_STORING,
        LinkDown: _S.RENEW_STORING,
    },
    _S.RENEW_WAITING: {
        Start: _S.RENEW_WAITING,
        TimerFired: _S.RENEW_SENT,
        Persisted: _S.RENEW_WAITING,
        StorageFailed: _S.RENEW_WAITING,
        FragmentHeld: _S.RENEW_RECEIVING,
        CertificateVerified: _S.RENEW_STORING,
        DeliveryFailed: _S.RENEW_WAITING,
        TaskRefused: _S.RENEW_WAITING,
        RenewRequested: _S.RENEW_WAITING,
        LinkUp: _S.RENEW_WAITING,
        LinkDown: _S.RENEW_WAITING,
    },
}

_OUTCOMES: tuple[type[Event], ...] = (
    FragmentHeld,
    CertificateVerified,
    DeliveryFailed,
    TaskRefused,
    TaskRepeated,
    RenewRequested,
    RenewalDue,
    RenewalNotDue,
)
_COMPLETIONS: Mapping[type[Event], type[Action]] = {
    KeyReady: MakeKey,
    Persisted: Persist,
    CredentialsStored: StoreCredentials,
}
_LINK_BOUND = (PublishRequest, AckTask, ReportStatus)
# States in which a delivery for our request can be accepted.
_AWAITING_DELIVERY = frozenset({State.REQUEST_SENT, State.RECEIVING, State.WAITING_RETRY})


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """What the machine needs to know beyond its events.

    Attributes:
        serial: the gateway's serial (the CSR's CN, checked against the certificate's CN).
        delivery_timeout: seconds to wait for a delivery after the first send (60).
        retry_cap: the longest wait between sends, seconds (1 h).
        verify: the switchable certificate checks and the CA bundle.
        renewal: when to renew automatically; ``None`` turns the automatic trigger off (the
            operator's ``ztp.renew`` command works either way).
    """

    serial: str
    delivery_timeout: float = 60.0
    retry_cap: float = 3600.0
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    renewal: RenewalPolicy | None = field(default_factory=RenewalPolicy)

    def __post_init__(self) -> None:
        if not self.serial:
            msg = "serial must not be empty"
            raise ValueError(msg)
        if not (0 < self.delivery_timeout <= self.retry_cap) or not math.isfinite(self.retry_cap):
            msg = "need 0 < delivery_timeout <= retry_cap < inf"
            raise ValueError(msg)


def _public_key_of(csr_pem: str) -> PublicKeyTypes:
    return x509.load_pem_x509_csr(csr_pem.strip().encode("ascii")).public_key()


class ProvisioningMachine:
    """Decides each provisioning step; performs none (see the module's theory of operation).

    Args:
        config: serial, timings, verification and renewal policies.
        decoder: turns ``ztp.deliver`` task params into deliveries.
        rng: the source of jitter (seed it in tests).
        record: the last stored record, to resume from; ``None`` for a fresh gateway.
    """

    def __init__(
        self,
        config: MachineConfig,
        *,
        decoder: DeliveryDecoder,
        rng: random.Random,
        record: StateRecord | None = None,
    ) -> None:
        self._config = config
        self._decoder = decoder
        self._rng = rng
        self._record = record
        self._public_key: PublicKeyTypes | None = None
        self._renew_at: float | None = None
        if record is None:
            self._state = State.FRESH
        else:
            self._public_key = _public_key_of(record.csr_pem)
            # A request in flight when the daemon died is simply sent again on Start.
            if record.state in {State.WAITING_RETRY, State.PROVISIONED, State.RENEW_WAITING}:
                self._state = record.state
            elif record.renewing:
                self._state = State.RENEW_KEY_READY
            else:
                self._state = State.KEY_READY
            if record.bundle_version is not None:
                self._renew_at = self._due_of(record)
        self._started = False
        self._link_up = False
        self._timer_armed = False
        self._awaiting: type[Action] | None = None
        self._held: list[Action] = []
        self._storing_uid: str | None = None
        self._delivered_uids: set[str] = set()
        self._pending_delivery: Delivery | None = None
        self._local_failures = 0
        # The command that started the renewal under way, acked once its first record is durable.
        self._renew_uid: str | None = None
        # The PROVISIONED record a renewal started from, until the renewal's own is durable.
        self._provisioned_record: StateRecord | None = None

    # --- inspection ----------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state."""
        return self._state

    @property
    def record(self) -> StateRecord | None:
        """The latest record the machine asked to persist (``None`` before the key exists)."""
        return self._record

    @property
    def link_up(self) -> bool:
        """Whether the machine believes the AirVantage link is up."""
        return self._link_up

    @property
    def renew_at(self) -> float | None:
        """When the certificate in use is due for automatic renewal (``None``: never)."""
        return self._renew_at

    def snapshot(self) -> tuple[object, ...]:
        """Everything an event may change, for tests asserting that a refusal changed nothing."""
        return (
            self._state,
            self._record,
            self._started,
            self._link_up,
            self._timer_armed,
            self._awaiting,
            tuple(self._held),
            self._storing_uid,
            frozenset(self._delivered_uids),
            self._pending_delivery,
            self._local_failures,
            self._renew_uid,
            self._provisioned_record,
            self._renew_at,
        )

    # --- the one entry point -------------------------------------------------------------------

    def handle(self, event: Input, *, now: float) -> list[Action]:
        """Take one event and return the actions to perform, in order.

        Args:
            event: what happened (never an outcome event: those are the machine's own).
            now: the current wall-clock time, epoch seconds.

        Returns:
            The actions to perform, in order (link-bound ones held while the link is down).

        Raises:
            IllegalTransitionError: the event is not legal now; nothing changed.
            UsageError: ``now`` is not a finite number.
        """
        if not math.isfinite(now):
            msg = "now must be a finite number of epoch seconds"
            raise UsageError(msg)
        if isinstance(event, _OUTCOMES):
            self._refuse(event, "outcome events are the machine's own, not input")
        self._check_guards(event)
        # Interpretation knows the state, so the outcome it yields is always in the table.
        step: Event
        if isinstance(event, TaskReceived):
            step = self._classify(event, now)
        elif isinstance(event, TimerFired) and self._state is State.PROVISIONED:
            step = RenewalDue() if self._is_due(now) else RenewalNotDue()
        else:
            step = event
        target = self._target(step)
        actions = self._apply(step, now)
        self._state = target
        return self._route(actions)

    # --- guards --------------------------------------------------------------------------------

    def _refuse(self, event: Event, reason: str = "not in the transition table") -> None:
        raise IllegalTransitionError(self._state.name, type(event).__name__, reason)

    def _target(self, event: Event) -> State:
        target = TRANSITIONS[self._state].get(type(event))
        if target is None:
            self._refuse(event)
            raise AssertionError  # pragma: no cover - _refuse always raises
        return target

    def _check_guards(self, event: Input) -> None:
        if isinstance(event, Start):
            if self._started:
                self._refuse(event, "already started")
            return
        if not self._started and not isinstance(event, (LinkUp, LinkDown)):
            self._refuse(event, "Start must come first")
        expected = _COMPLETIONS.get(type(event))
        if self._awaiting is not None:
            if isinstance(event, (StorageFailed, LinkUp, LinkDown)) or expected is self._awaiting:
                return
            self._refuse(event, f"awaiting the completion of {self._awaiting.__name__}")
        if expected is not None or isinstance(event, StorageFailed):
            self._refuse(event, "no storage action is outstanding")
        if isinstance(event, TimerFired) and not self._timer_armed:
            self._refuse(event, "no timer is armed")

    # --- interpretation (pure, before the table) -----------------------------------------------

    # Each return is one outcome; splitting them up would hide the order of the checks.
    def _classify(self, task: TaskReceived, now: float) -> Event:  # noqa: PLR0911
        uid = task.uid
        if task.command_id == RENEW_COMMAND:
            if self._state is State.PROVISIONED or self._state in RENEWAL_STATES:
                return RenewRequested(uid)
            return TaskRefused(uid, "not provisioned yet: there is no certificate to renew")
        if task.command_id != DELIVER_COMMAND:
            return TaskRefused(uid, _short(f"unknown command {task.command_id!r}"))
        if self._state is State.PROVISIONED:
            return self._classify_after_provisioning(task, now)
        if _PHASE[self._state] not in _AWAITING_DELIVERY:
            return TaskRefused(uid, "no request outstanding")
        record = self._require_record()
        try:
            result = self._decoder.feed(task.params, now=now)
        except PeerError as exc:
            return TaskRefused(uid, _short(f"{type(exc).__name__}: {exc}"))
        match result:
            case None:
                return FragmentHeld(uid)
            case Refusal(request_id=rid) if rid != record.request_id:
                return TaskRefused(uid, "refusal for another request")
            case Refusal(reason=reason):
                return DeliveryFailed(
                    uid, _short(f"refused by the cloud: {reason}"), verification=False
                )
            case Delivery(request_id=rid) if rid != record.request_id:
                return TaskRefused(uid, "delivery for another request")
            case Delivery() as delivery:
                return self._verify(uid, delivery, now)
        raise AssertionError  # pragma: no cover - the match is exhaustive

    def _classify_after_provisioning(self, task: TaskReceived, now: float) -> Event:
        if task.uid in self._delivered_uids:
            return TaskRepeated(task.uid)
        record = self._require_record()
        try:
            result = self._decoder.feed(task.params, now=now)
        except PeerError:
            result = None
        if (
            isinstance(result, Delivery)
            and result.request_id == record.request_id
            and result.certificate_id == record.certificate_id
        ):
            return TaskRepeated(task.uid)
        return TaskRefused(task.uid, "already provisioned")

    def _verify(self, uid: str, delivery: Delivery, now: float) -> Event:
        if self._public_key is None:  # pragma: no cover - a record always brings the key
            raise AssertionError
        try:
            verify_certificate(
                delivery.certificate_pem,
                endpoint=delivery.endpoint,
                public_key=self._public_key,
                serial=self._config.serial,
                now=dt.datetime.fromtimestamp(now, dt.UTC),
                policy=self._config.verify,
            )
        except VerificationError as exc:
            return DeliveryFailed(uid, _short(f"{exc.reason}: {exc.detail}"), verification=True)
        try:
            _check_id("certificate_id", delivery.certificate_id)
        except ValueError:
            return DeliveryFailed(uid, "bad_certificate_id", verification=True)
        return CertificateVerified(uid, delivery)

    # --- renewal timing ------------------------------------------------------------------------

    def _due_of(self, record: StateRecord) -> float | None:
        """The renewal due time of the record's certificate, under the configured policy."""
        policy = self._config.renewal
        if policy is None:
            return None
        if record.renew_at is not None:
            return record.renew_at
        if record.not_before is None or record.not_after is None:
            return None  # a record from before renewal existed: only the command renews
        return renewal_due(
            record.not_before, record.not_after, policy=policy, rand=self._rng.random()
        )

    def _is_due(self, now: float) -> bool:
        return self._renew_at is not None and now >= self._renew_at

    def _arm_renewal(self, now: float) -> list[Action]:
        """Arm the timer for the renewal check: at the due time, or after ``check_interval``."""
        policy = self._config.renewal
        if policy is None or self._renew_at is None:
            return []
        delay = min(max(0.0, self._renew_at - now), policy.check_interval)
        if self._local_failures:
            # A renewal that failed locally is not tried again at once.
            delay = max(delay, self._retry_delay(self._local_failures + 1))
        return [self._schedule(delay)]

    # --- effects -------------------------------------------------------------------------------

    def _require_record(self) -> StateRecord:
        if self._record is None:  # pragma: no cover - states past KEY_READY always have one
            raise AssertionError
        return self._record

    def _retry_delay(self, attempt: int) -> float:
        """The wait after the ``attempt``-th send (1-based): fixed first, then full jitter."""
        timeout, cap = self._config.delivery_timeout, self._config.retry_cap
        if attempt <= 1:
            return timeout
        return full_jitter_delay(attempt, base=timeout, cap=cap, rand=self._rng.random())

    def _persist(self, record: StateRecord) -> Action:
        self._record = record
        self._awaiting = Persist
        return Persist(record)

    def _schedule(self, delay: float) -> Action:
        self._timer_armed = True
        return ScheduleRetry(delay)

    def _send(self) -> list[Action]:
        """Send the request (again) and wait for a delivery."""
        record = self._require_record()
        attempts = record.attempts + 1
        self._decoder.reset()
        sent = State.RENEW_SENT if self._state in RENEWAL_STATES else State.REQUEST_SENT
        return [
            PublishRequest(record.request_id, record.csr_pem, attempts),
            self._schedule(self._retry_delay(attempts)),
            self._persist(replace(record, state=sent, attempts=attempts, next_retry_at=None)),
        ]

    def _fail_delivery(self, reason: str, now: float) -> list[Action]:
        """Wait with backoff, then send the same request again."""
        record = self._require_record()
        self._decoder.reset()
        delay = self._retry_delay(record.attempts + 1)
        waiting = State.RENEW_WAITING if self._state in RENEWAL_STATES else State.WAITING_RETRY
        return [
            self._schedule(delay),
            self._persist(
                replace(record, state=waiting, next_retry_at=now + delay, last_error=reason)
            ),
        ]

    def _start_publisher(self) -> Action:
        record = self._require_record()
        if record.bundle_version is None:  # pragma: no cover - provisioned records have one
            raise AssertionError
        return StartPublisher(record.bundle_version)

    def _provisioned_actions(self, now: float, *, discard_key: bool) -> list[Action]:
        record = self._require_record()
        if record.bundle_version is None or record.certificate_id is None:  # pragma: no cover
            raise AssertionError
        actions: list[Action] = [DiscardKey()] if discard_key else []
        actions.append(
            ReportStatus(record.request_id, provisioned=True, certificate_id=record.certificate_id)
        )
        actions.append(self._start_publisher())
        return actions + self._arm_renewal(now)

    def _begin_renewal(self, uid: str | None) -> list[Action]:
        """Leave PROVISIONED for a renewal: a fresh key first, the bundle in use untouched."""
        self._provisioned_record = self._require_record()
        self._renew_uid = uid
        actions: list[Action] = []
        if self._timer_armed:
            self._timer_armed = False
            actions.append(CancelRetry())
        self._awaiting = MakeKey
        return [*actions, MakeKey(fresh=True)]

    def _ack_renewal(self, *, ok: bool, message: str | None = None) -> list[Action]:
        uid, self._renew_uid = self._renew_uid, None
        return [] if uid is None else [AckTask(uid, ok=ok, message=message)]

    # A flat dispatch, one branch per event type, reads like the table it follows.
    def _apply(self, event: Event, now: float) -> list[Action]:  # noqa: PLR0911, PLR0912
        # One branch per event type; the table has already said the move is legal.
        if isinstance(event, (KeyReady, Persisted, CredentialsStored, StorageFailed)):
            self._awaiting = None
        match event:
            case Start():
                return self._on_start(now)
            case LinkUp():
                self._link_up = True
                held, self._held = self._held, []
                return held
            case LinkDown():
                self._link_up = False
                return []
            case TimerFired():
                self._timer_armed = False
                if self._state is State.FRESH:
                    self._awaiting = MakeKey
                    return [MakeKey()]
                return self._send()
            case KeyReady():
                return self._on_key_ready(event)
            case Persisted():
                if _PHASE[self._state] is State.KEY_READY:
                    self._provisioned_record = None
                    return self._ack_renewal(ok=True) + self._send()
                if self._state is State.PROVISIONED:
                    return self._ack_stored() + self._provisioned_actions(now, discard_key=True)
                return []
            case StorageFailed(reason=reason):
                return self._on_storage_failed(reason, now)
            case CredentialsStored(version=version):
                return self._on_credentials_stored(version)
            case _:
                return self._on_outcome(event, now)

    def _on_key_ready(self, event: KeyReady) -> list[Action]:
        self._public_key = event.public_key
        self._local_failures = 0
        csr = event.csr_pem.strip() + "\n"
        request_id = request_id_for(csr)
        if self._state is State.RENEW_MAKING_KEY:
            # The renewal's request; the bundle in use stays described in the same record.
            record = replace(
                self._require_record(),
                state=State.RENEW_KEY_READY,
                request_id=request_id,
                csr_pem=csr,
                attempts=0,
                next_retry_at=None,
                last_error=None,
            )
        else:
            record = StateRecord(State.KEY_READY, request_id, csr)
        return [self._persist(record)]

    def _on_start(self, now: float) -> list[Action]:
        self._started = True
        match self._state:
            case State.FRESH:
                self._awaiting = MakeKey
                return [MakeKey()]
            case State.KEY_READY:
                return self._send()
            case State.WAITING_RETRY:
                return self._resume_wait(now)
            case State.RENEW_KEY_READY:
                # The bundle in use is committed: publish on it while the renewal goes on.
                return [self._start_publisher(), *self._send()]
            case State.RENEW_WAITING:
                return [self._start_publisher(), *self._resume_wait(now)]
            case _:
                # Resumed provisioned: the report may have been lost to a kill right after the
                # record became durable, so it goes again (the cloud takes a repeat as the same
                # news); a leftover pending key goes now.
                return self._provisioned_actions(now, discard_key=True)

    def _resume_wait(self, now: float) -> list[Action]:
        record = self._require_record()
        due = record.next_retry_at if record.next_retry_at is not None else now
        return [self._schedule(max(0.0, due - now))]

    def _on_storage_failed(self, reason: str, now: float) -> list[Action]:
        match self._state:
            case State.MAKING_KEY | State.KEY_READY:
                # Nothing was sent yet: start again from the key after a pause.
                self._record = None
                self._public_key = None
                self._local_failures += 1
                return [self._schedule(self._retry_delay(self._local_failures + 1))]
            case State.RENEW_MAKING_KEY | State.RENEW_KEY_READY:
                # Nothing was sent yet and the stored record is still the PROVISIONED one: go
                # back to it, and try again later.
                restored = self._provisioned_record
                if restored is None:  # pragma: no cover - set when the renewal began
                    raise AssertionError
                self._record, self._provisioned_record = restored, None
                self._public_key = _public_key_of(restored.csr_pem)
                self._local_failures += 1
                message = _short(f"renewal failed: {reason}")
                return self._ack_renewal(ok=False, message=message) + self._arm_renewal(now)
            case State.STORING | State.RENEW_STORING:
                uid, self._storing_uid = self._storing_uid, None
                self._pending_delivery = None
                message = _short(f"storage failed: {reason}")
                acks: list[Action] = (
                    [] if uid is None else [AckTask(uid, ok=False, message=message)]
                )
                return acks + self._fail_delivery(message, now)
            case State.PROVISIONED:
                # The bundle is committed, only its record is missing: run on it, keep the key
                # (a restart re-sends the request and the bundle store recognises the repeat).
                return self._ack_stored() + self._provisioned_actions(now, discard_key=False)
            case _:
                # A record of a send or a wait was lost; the timer is armed, so carry on.
                return []

    def _on_credentials_stored(self, version: int) -> list[Action]:
        delivery = self._pending_delivery
        if delivery is None:  # pragma: no cover - set on entering STORING
            raise AssertionError
        uid = self._storing_uid
        if uid is not None:
            self._delivered_uids.add(uid)
        self._pending_delivery = None
        # Verified before, so it parses; its validity times the next renewal.
        certificate = x509.load_pem_x509_certificate(
            delivery.certificate_pem.strip().encode("ascii")
        )
        not_before = certificate.not_valid_before_utc.timestamp()
        not_after = certificate.not_valid_after_utc.timestamp()
        policy = self._config.renewal
        renew_at = (
            None
            if policy is None
            else renewal_due(not_before, not_after, policy=policy, rand=self._rng.random())
        )
        self._renew_at = renew_at
        record = replace(
            self._require_record(),
            state=State.PROVISIONED,
            next_retry_at=None,
            bundle_version=version,
            certificate_id=delivery.certificate_id,
            not_before=not_before,
            not_after=not_after,
            renew_at=renew_at,
        )
        # The task is acked only once this record is durable (see _ack_stored): a daemon killed
        # before then gets the delivery again, rather than a stored bundle it does not know of.
        return [self._persist(record)]

    def _ack_stored(self) -> list[Action]:
        """Ack the task whose delivery is now stored and recorded."""
        uid, self._storing_uid = self._storing_uid, None
        return [] if uid is None else [AckTask(uid, ok=True)]

    # One branch per outcome, as in the table.
    def _on_outcome(self, event: Event, now: float) -> list[Action]:  # noqa: PLR0911
        match event:
            case FragmentHeld(uid=uid):
                return [AckTask(uid, ok=True)]
            case CertificateVerified(uid=uid, delivery=delivery):
                self._timer_armed = False
                self._storing_uid = uid
                self._pending_delivery = delivery
                self._awaiting = StoreCredentials
                self._decoder.reset()
                return [
                    CancelRetry(),
                    StoreCredentials(
                        delivery.request_id,
                        delivery.certificate_id,
                        delivery.endpoint,
                        delivery.certificate_pem,
                    ),
                ]
            case DeliveryFailed(uid=uid, reason=reason, verification=verification):
                record = self._require_record()
                if verification:
                    head: list[Action] = [
                        AckTask(uid, ok=False, message=reason),
                        # Fit for shared.messages.Rejected as it is.
                        ReportStatus(
                            record.request_id, provisioned=False, reason=sanitize_reason(reason)
                        ),
                    ]
                else:
                    # The task itself was fine: the cloud's answer was simply no.
                    head = [AckTask(uid, ok=True)]
                return head + self._fail_delivery(reason, now)
            case TaskRefused(uid=uid, reason=reason):
                return [AckTask(uid, ok=False, message=reason)]
            case TaskRepeated(uid=uid):
                return [AckTask(uid, ok=True)]
            case RenewRequested(uid=uid):
                if self._state is State.PROVISIONED:
                    return self._begin_renewal(uid)
                return [AckTask(uid, ok=True)]  # one is under way: that is what was asked
            case RenewalDue():
                self._timer_armed = False
                return self._begin_renewal(None)
            case RenewalNotDue():
                self._timer_armed = False
                return self._arm_renewal(now)
        raise AssertionError(f"unhandled {type(event).__name__}")  # pragma: no cover

    def _route(self, actions: list[Action]) -> list[Action]:
        """Hold link-bound actions while the link is down; a newer request replaces an older."""
        if self._link_up:
            return actions
        out: list[Action] = []
        for action in actions:
            if isinstance(action, _LINK_BOUND):
                if isinstance(action, PublishRequest):
                    self._held = [a for a in self._held if not isinstance(a, PublishRequest)]
                self._held.append(action)
            else:
                out.append(action)
        return out
