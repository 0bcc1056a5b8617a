"""The provisioning machine: every (state, event) pair, the flows, resume, random sequences.

Renewal runs in its own states (``RENEW_*``) with a second key (``KEY2``/``CSR2``): the setups
named ``renew...`` feed the renewal's request id and key to the columns.

The machine is pure, so these tests are synchronous. Deliveries reach it through a
``DeliveryDecoder``; here an in-memory fake decoder stands in for the shared fragment codec, so
the machine's own logic is what is tested: its params are ``{"n": count, "i": index, "body":
part}`` and the joined parts are a JSON delivery or refusal.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox.pki import issue_certificate
from shared.errors import DecodeError, UsageError
from shared.messages import CertificateDelivery, Rejected, delivery_params
from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.errors import IllegalTransitionError
from ztp_daemon.machine import (
    DELIVER_COMMAND,
    RENEW_COMMAND,
    RENEWAL_STATES,
    TRANSITIONS,
    AckTask,
    Action,
    CancelRetry,
    CertificateVerified,
    CredentialsStored,
    Delivery,
    DeliveryDecoder,
    DeliveryFailed,
    DiscardKey,
    Event,
    FragmentHeld,
    Input,
    KeyReady,
    LinkDown,
    LinkUp,
    MachineConfig,
    MakeKey,
    Persist,
    Persisted,
    ProvisioningMachine,
    PublishRequest,
    Refusal,
    RenewalDue,
    RenewalNotDue,
    RenewalPolicy,
    RenewRequested,
    ReportStatus,
    ScheduleRetry,
    SharedCodecDecoder,
    Start,
    StartPublisher,
    State,
    StateRecord,
    StorageFailed,
    StoreCredentials,
    TaskReceived,
    TaskRefused,
    TaskRepeated,
    TimerFired,
    renewal_due,
    request_id_for,
)
from ztp_daemon.state import StateFile

SERIAL = "4B1234567890"
ENDPOINT = "a1b2c3-ats.iot.eu-west-1.amazonaws.com"
CERT_ID = "c" * 64
BAD_ID = "b" * 64  # a different certificate has a different id
T0 = 1_780_000_000.0  # 2026-05-28, inside the certificates' validity


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "machine test CA")])
    now = dt.datetime.fromtimestamp(T0, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


CA_CERT, CA_KEY = _ca()
KEY = ec.generate_private_key(ec.SECP256R1())
CSR = build_csr(KEY, CsrSubject(SERIAL))
REQUEST_ID = request_id_for(CSR)


def _cert_pem(key: ec.EllipticCurvePrivateKey) -> str:
    cert = issue_certificate(
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERIAL)]),
        ca_cert=CA_CERT,
        ca_key=CA_KEY,
        now=dt.datetime.fromtimestamp(T0, dt.UTC),
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


GOOD_PEM = _cert_pem(KEY)
WRONG_KEY_PEM = _cert_pem(ec.generate_private_key(ec.SECP256R1()))
# The renewal's key, CSR and certificate.
KEY2 = ec.generate_private_key(ec.SECP256R1())
CSR2 = build_csr(KEY2, CsrSubject(SERIAL))
REQUEST_ID2 = request_id_for(CSR2)
GOOD_PEM2 = _cert_pem(KEY2)
CERT_ID2 = "e" * 64
# GOOD_PEM's validity: from 5 minutes before T0, for 3650 days.
NOT_BEFORE = T0 - 300
NOT_AFTER = T0 + 3650 * 86400


class FakeDecoder(DeliveryDecoder):
    """Joins ``body`` parts by index; the whole is JSON ``{"t": "dlv"|"rej", ...}``."""

    def __init__(self) -> None:
        self.parts: dict[int, str] = {}
        self.resets = 0

    def feed(self, params: Mapping[str, object], *, now: float) -> Delivery | Refusal | None:  # noqa: ARG002 - no expiry in the fake
        try:
            count, index, body = int(str(params["n"])), int(str(params["i"])), params["body"]
        except (KeyError, ValueError) as exc:
            raise DecodeError("params", "n, i and body", dict(params)) from exc
        if not isinstance(body, str) or not 0 <= index < count:
            raise DecodeError("params.i", f"0..{count - 1}", index)
        self.parts[index] = body
        if len(self.parts) < count:
            return None
        text = "".join(self.parts[i] for i in range(count))
        self.parts.clear()
        message = json.loads(text)
        if message["t"] == "rej":
            return Refusal(message["rid"], message["why"])
        return Delivery(message["rid"], message["cid"], message["ep"], message["crt"])

    def reset(self) -> None:
        self.parts.clear()
        self.resets += 1


def deliver(
    uid: str,
    *,
    pem: str = GOOD_PEM,
    request_id: str = REQUEST_ID,
    endpoint: str = ENDPOINT,
    parts: int = 1,
    cert_id: str = CERT_ID,
) -> list[TaskReceived]:
    text = json.dumps({"t": "dlv", "rid": request_id, "cid": cert_id, "ep": endpoint, "crt": pem})
    size = -(-len(text) // parts)
    return [
        TaskReceived(
            f"{uid}" if parts == 1 else f"{uid}-{i}",
            DELIVER_COMMAND,
            {"n": str(parts), "i": str(i), "body": text[i * size : (i + 1) * size]},
        )
        for i in range(parts)
    ]


def refuse(uid: str, *, request_id: str = REQUEST_ID) -> TaskReceived:
    text = json.dumps({"t": "rej", "rid": request_id, "why": "csr_key_too_small"})
    return TaskReceived(uid, DELIVER_COMMAND, {"n": "1", "i": "0", "body": text})


CONFIG = MachineConfig(serial=SERIAL)


def new_machine(record: StateRecord | None = None, *, seed: int = 7) -> ProvisioningMachine:
    return ProvisioningMachine(
        CONFIG, decoder=FakeDecoder(), rng=random.Random(seed), record=record
    )


def types(actions: list[Action]) -> list[type[Action]]:
    return [type(a) for a in actions]


def run(machine: ProvisioningMachine, *events: Input, now: float = T0) -> list[Action]:
    out: list[Action] = []
    for event in events:
        out += machine.handle(event, now=now)
    return out


# --- the canonical setups: one machine per situation, built by legal events only --------------


def fresh() -> ProvisioningMachine:
    return new_machine()


def started_link_up() -> ProvisioningMachine:
    machine = new_machine()
    run(machine, LinkUp())
    return machine


def making_key() -> ProvisioningMachine:
    machine = started_link_up()
    run(machine, Start())
    return machine


def fresh_after_failure() -> ProvisioningMachine:
    machine = making_key()
    run(machine, StorageFailed("disk full"))
    return machine


def key_ready() -> ProvisioningMachine:
    machine = making_key()
    run(machine, KeyReady(CSR))
    return machine


def record(state: State, **changes: object) -> StateRecord:
    base: dict[str, object] = {"state": state, "request_id": REQUEST_ID, "csr_pem": CSR}
    if state in {State.WAITING_RETRY, State.RENEW_WAITING}:
        base |= {"attempts": 1, "next_retry_at": T0 + 30, "last_error": "wrong_key"}
    if state is State.PROVISIONED or state in RENEWAL_STATES:
        base |= {
            "attempts": 1,
            "bundle_version": 1,
            "certificate_id": CERT_ID,
            "not_before": NOT_BEFORE,
            "not_after": NOT_AFTER,
            "renew_at": T0 + 2000 * 86400,
        }
    if state in RENEWAL_STATES:
        base |= {"request_id": REQUEST_ID2, "csr_pem": CSR2}
    base |= changes
    return StateRecord(**base)  # type: ignore[arg-type]


def resumed(state: State) -> Callable[[], ProvisioningMachine]:
    def build() -> ProvisioningMachine:
        machine = new_machine(record(state))
        run(machine, LinkUp())
        return machine

    return build


def request_sent_persisting() -> ProvisioningMachine:
    machine = key_ready()
    run(machine, Persisted())
    return machine


def request_sent() -> ProvisioningMachine:
    machine = request_sent_persisting()
    run(machine, Persisted())
    return machine


def receiving() -> ProvisioningMachine:
    machine = request_sent()
    run(machine, deliver("t1", parts=2)[0])
    return machine


def storing() -> ProvisioningMachine:
    machine = request_sent()
    run(machine, *deliver("t1"))
    return machine


def provisioned_persisting() -> ProvisioningMachine:
    machine = storing()
    run(machine, CredentialsStored(1))
    return machine


def provisioned() -> ProvisioningMachine:
    machine = provisioned_persisting()
    run(machine, Persisted())
    return machine


def waiting_retry_persisting() -> ProvisioningMachine:
    machine = request_sent()
    run(machine, *deliver("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID))
    return machine


def waiting_retry() -> ProvisioningMachine:
    machine = waiting_retry_persisting()
    run(machine, Persisted())
    return machine


def renew_task(uid: str = "rn") -> TaskReceived:
    return TaskReceived(uid, RENEW_COMMAND, {})


def provisioned_due() -> ProvisioningMachine:
    """Resumed provisioned with renewal already due: Start arms the timer with no wait."""
    machine = new_machine(record(State.PROVISIONED, renew_at=T0 - 1))
    run(machine, LinkUp(), Start())
    return machine


def renew_making_key() -> ProvisioningMachine:
    machine = provisioned()
    run(machine, renew_task())
    return machine


def renew_making_key_auto() -> ProvisioningMachine:
    machine = provisioned_due()
    run(machine, TimerFired())
    return machine


def renew_key_ready_persisting() -> ProvisioningMachine:
    machine = renew_making_key()
    run(machine, KeyReady(CSR2))
    return machine


def renew_sent_persisting() -> ProvisioningMachine:
    machine = renew_key_ready_persisting()
    run(machine, Persisted())
    return machine


def renew_sent() -> ProvisioningMachine:
    machine = renew_sent_persisting()
    run(machine, Persisted())
    return machine


def renew_receiving() -> ProvisioningMachine:
    machine = renew_sent()
    run(machine, deliver2("t2", parts=2)[0])
    return machine


def renew_storing() -> ProvisioningMachine:
    machine = renew_sent()
    run(machine, *deliver2("t2"))
    return machine


def renewed_persisting() -> ProvisioningMachine:
    machine = renew_storing()
    run(machine, CredentialsStored(2))
    return machine


def renew_waiting_persisting() -> ProvisioningMachine:
    machine = renew_sent()
    run(machine, *deliver2("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID))
    return machine


def renew_waiting() -> ProvisioningMachine:
    machine = renew_waiting_persisting()
    run(machine, Persisted())
    return machine


def deliver2(uid: str, **kwargs: Any) -> list[TaskReceived]:
    """A delivery for the renewal's request (its certificate by default)."""
    return deliver(
        uid,
        **({"pem": GOOD_PEM2, "request_id": REQUEST_ID2, "cert_id": CERT_ID2} | kwargs),
    )


SETUPS: dict[str, tuple[State, Callable[[], ProvisioningMachine]]] = {
    "fresh": (State.FRESH, fresh),
    "fresh-link-up": (State.FRESH, started_link_up),
    "fresh-after-failure": (State.FRESH, fresh_after_failure),
    "making-key": (State.MAKING_KEY, making_key),
    "key-ready-persisting": (State.KEY_READY, key_ready),
    "key-ready-resumed": (State.KEY_READY, resumed(State.KEY_READY)),
    "request-sent-resumed": (State.KEY_READY, resumed(State.REQUEST_SENT)),
    "request-sent-persisting": (State.REQUEST_SENT, request_sent_persisting),
    "request-sent": (State.REQUEST_SENT, request_sent),
    "receiving": (State.RECEIVING, receiving),
    "storing": (State.STORING, storing),
    "provisioned-persisting": (State.PROVISIONED, provisioned_persisting),
    "provisioned": (State.PROVISIONED, provisioned),
    "provisioned-resumed": (State.PROVISIONED, resumed(State.PROVISIONED)),
    "waiting-retry-persisting": (State.WAITING_RETRY, waiting_retry_persisting),
    "waiting-retry": (State.WAITING_RETRY, waiting_retry),
    "waiting-retry-resumed": (State.WAITING_RETRY, resumed(State.WAITING_RETRY)),
    "provisioned-due": (State.PROVISIONED, provisioned_due),
    "renew-making-key": (State.RENEW_MAKING_KEY, renew_making_key),
    "renew-making-key-auto": (State.RENEW_MAKING_KEY, renew_making_key_auto),
    "renew-key-ready-persisting": (State.RENEW_KEY_READY, renew_key_ready_persisting),
    "renew-key-ready-resumed": (State.RENEW_KEY_READY, resumed(State.RENEW_KEY_READY)),
    "renew-sent-resumed": (State.RENEW_KEY_READY, resumed(State.RENEW_SENT)),
    "renew-sent-persisting": (State.RENEW_SENT, renew_sent_persisting),
    "renew-sent": (State.RENEW_SENT, renew_sent),
    "renew-receiving": (State.RENEW_RECEIVING, renew_receiving),
    "renew-storing": (State.RENEW_STORING, renew_storing),
    "renewed-persisting": (State.PROVISIONED, renewed_persisting),
    "renew-waiting-persisting": (State.RENEW_WAITING, renew_waiting_persisting),
    "renew-waiting": (State.RENEW_WAITING, renew_waiting),
    "renew-waiting-resumed": (State.RENEW_WAITING, resumed(State.RENEW_WAITING)),
}


# One concrete input per table column (for a renewal setup, with the renewal's key and request).
# Outcome columns are tasks (or, in PROVISIONED, the timer) that the machine interprets as that
# outcome whenever the current state can accept it.
def _deliveries(renewal: bool) -> Callable[..., list[TaskReceived]]:
    return deliver2 if renewal else deliver


COLUMNS: dict[type[Event], Callable[[bool], Input]] = {
    Start: lambda _: Start(),
    LinkUp: lambda _: LinkUp(),
    LinkDown: lambda _: LinkDown(),
    TimerFired: lambda _: TimerFired(),
    KeyReady: lambda renewal: KeyReady(CSR2 if renewal else CSR),
    Persisted: lambda _: Persisted(),
    CredentialsStored: lambda renewal: CredentialsStored(2 if renewal else 1),
    StorageFailed: lambda _: StorageFailed("disk full"),
    FragmentHeld: lambda renewal: _deliveries(renewal)("p", parts=2)[0],
    CertificateVerified: lambda renewal: _deliveries(renewal)("t1")[0],
    DeliveryFailed: lambda renewal: _deliveries(renewal)("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[
        0
    ],
    TaskRefused: lambda _: TaskReceived("x", "ztp.unknown", {}),
    TaskRepeated: lambda renewal: _deliveries(renewal)("t1")[0],
    RenewRequested: lambda _: renew_task(),
    RenewalDue: lambda _: TimerFired(),
    RenewalNotDue: lambda _: TimerFired(),
}
OUTCOMES = {
    FragmentHeld,
    CertificateVerified,
    DeliveryFailed,
    TaskRefused,
    TaskRepeated,
    RenewRequested,
}
# The timer's outcomes exist only in PROVISIONED; elsewhere the TimerFired column covers it.
TIMER_OUTCOMES = {RenewalDue, RenewalNotDue}

# What the canonical input of each legal (state, column) does, link up, for the setups above.
EXPECTED: dict[tuple[str, type[Event]], list[type[Action]]] = {
    ("fresh", Start): [MakeKey],
    ("fresh", LinkUp): [],
    ("fresh", LinkDown): [],
    ("fresh-link-up", Start): [MakeKey],
    ("fresh-after-failure", TimerFired): [MakeKey],
    ("fresh-after-failure", TaskRefused): [AckTask],
    ("making-key", KeyReady): [Persist],
    ("making-key", StorageFailed): [ScheduleRetry],
    ("key-ready-persisting", Persisted): [PublishRequest, ScheduleRetry, Persist],
    ("key-ready-persisting", StorageFailed): [ScheduleRetry],
    ("key-ready-resumed", Start): [PublishRequest, ScheduleRetry, Persist],
    ("request-sent-resumed", Start): [PublishRequest, ScheduleRetry, Persist],
    ("request-sent-persisting", Persisted): [],
    ("request-sent-persisting", StorageFailed): [],
    ("request-sent", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("request-sent", FragmentHeld): [AckTask],
    ("request-sent", CertificateVerified): [CancelRetry, StoreCredentials],
    ("request-sent", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("request-sent", TaskRefused): [AckTask],
    ("receiving", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("receiving", FragmentHeld): [AckTask],
    ("receiving", CertificateVerified): [CancelRetry, StoreCredentials],
    ("receiving", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("receiving", TaskRefused): [AckTask],
    ("storing", CredentialsStored): [Persist],
    ("storing", StorageFailed): [AckTask, ScheduleRetry, Persist],
    ("provisioned-persisting", Persisted): [
        AckTask,
        DiscardKey,
        ReportStatus,
        StartPublisher,
        ScheduleRetry,
    ],
    ("provisioned-persisting", StorageFailed): [
        AckTask,
        ReportStatus,
        StartPublisher,
        ScheduleRetry,
    ],
    ("provisioned", TaskRefused): [AckTask],
    ("provisioned", TaskRepeated): [AckTask],
    ("provisioned", RenewRequested): [CancelRetry, MakeKey],
    ("provisioned", RenewalNotDue): [ScheduleRetry],
    ("provisioned-resumed", Start): [DiscardKey, ReportStatus, StartPublisher, ScheduleRetry],
    ("provisioned-due", RenewalDue): [MakeKey],
    ("provisioned-due", RenewRequested): [CancelRetry, MakeKey],
    ("provisioned-due", TaskRefused): [AckTask],
    ("provisioned-due", TaskRepeated): [AckTask],
    ("waiting-retry-persisting", Persisted): [],
    ("waiting-retry-persisting", StorageFailed): [],
    ("waiting-retry", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("waiting-retry", FragmentHeld): [AckTask],
    ("waiting-retry", CertificateVerified): [CancelRetry, StoreCredentials],
    ("waiting-retry", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("waiting-retry", TaskRefused): [AckTask],
    ("waiting-retry-resumed", Start): [ScheduleRetry],
    # Renewal.
    ("renew-making-key", KeyReady): [Persist],
    ("renew-making-key", StorageFailed): [AckTask, ScheduleRetry],
    ("renew-making-key-auto", KeyReady): [Persist],
    ("renew-making-key-auto", StorageFailed): [ScheduleRetry],
    ("renew-key-ready-persisting", Persisted): [AckTask, PublishRequest, ScheduleRetry, Persist],
    ("renew-key-ready-persisting", StorageFailed): [AckTask, ScheduleRetry],
    ("renew-key-ready-resumed", Start): [StartPublisher, PublishRequest, ScheduleRetry, Persist],
    ("renew-sent-resumed", Start): [StartPublisher, PublishRequest, ScheduleRetry, Persist],
    ("renew-sent-persisting", Persisted): [],
    ("renew-sent-persisting", StorageFailed): [],
    ("renew-sent", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("renew-sent", FragmentHeld): [AckTask],
    ("renew-sent", CertificateVerified): [CancelRetry, StoreCredentials],
    ("renew-sent", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("renew-sent", TaskRefused): [AckTask],
    ("renew-sent", RenewRequested): [AckTask],
    ("renew-receiving", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("renew-receiving", FragmentHeld): [AckTask],
    ("renew-receiving", CertificateVerified): [CancelRetry, StoreCredentials],
    ("renew-receiving", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("renew-receiving", TaskRefused): [AckTask],
    ("renew-receiving", RenewRequested): [AckTask],
    ("renew-storing", CredentialsStored): [Persist],
    ("renew-storing", StorageFailed): [AckTask, ScheduleRetry, Persist],
    ("renewed-persisting", Persisted): [
        AckTask,
        DiscardKey,
        ReportStatus,
        StartPublisher,
        ScheduleRetry,
    ],
    ("renewed-persisting", StorageFailed): [AckTask, ReportStatus, StartPublisher, ScheduleRetry],
    ("renew-waiting-persisting", Persisted): [],
    ("renew-waiting-persisting", StorageFailed): [],
    ("renew-waiting", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("renew-waiting", FragmentHeld): [AckTask],
    ("renew-waiting", CertificateVerified): [CancelRetry, StoreCredentials],
    ("renew-waiting", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("renew-waiting", TaskRefused): [AckTask],
    ("renew-waiting", RenewRequested): [AckTask],
    ("renew-waiting-resumed", Start): [StartPublisher, ScheduleRetry],
}
# Link events are legal (and silent) in every started or resumed setup.
for _name in SETUPS:
    EXPECTED.setdefault((_name, LinkUp), [])
    EXPECTED.setdefault((_name, LinkDown), [])

# The same task means different things in different states: a complete good delivery is a new
# certificate while one is awaited, and a repeat once provisioned.
ALIASES: dict[tuple[str, type[Event]], type[Event]] = {
    ("request-sent", TaskRepeated): CertificateVerified,
    ("receiving", TaskRepeated): CertificateVerified,
    ("waiting-retry", TaskRepeated): CertificateVerified,
    ("provisioned", CertificateVerified): TaskRepeated,
    ("provisioned-due", CertificateVerified): TaskRepeated,
    ("renew-sent", TaskRepeated): CertificateVerified,
    ("renew-receiving", TaskRepeated): CertificateVerified,
    ("renew-waiting", TaskRepeated): CertificateVerified,
    # In PROVISIONED the timer is interpreted: not yet due, or due.
    ("provisioned", TimerFired): RenewalNotDue,
    ("provisioned", RenewalDue): RenewalNotDue,
    ("provisioned-due", TimerFired): RenewalDue,
    ("provisioned-due", RenewalNotDue): RenewalDue,
}
# Before Start, or while a storage action is outstanding, a task is illegal (the driver queues it).
TASKS_ILLEGAL = {
    "fresh",
    "fresh-link-up",
    "making-key",
    "key-ready-persisting",
    "key-ready-resumed",
    "request-sent-resumed",
    "request-sent-persisting",
    "storing",
    "provisioned-persisting",
    "provisioned-resumed",
    "waiting-retry-persisting",
    "waiting-retry-resumed",
    "renew-making-key",
    "renew-making-key-auto",
    "renew-key-ready-persisting",
    "renew-key-ready-resumed",
    "renew-sent-resumed",
    "renew-sent-persisting",
    "renew-storing",
    "renewed-persisting",
    "renew-waiting-persisting",
    "renew-waiting-resumed",
}

PAIRS = [
    (name, column)
    for name, (state, _) in SETUPS.items()
    for column in COLUMNS
    if column not in TIMER_OUTCOMES or state is State.PROVISIONED
]


@pytest.mark.parametrize(("setup", "column"), PAIRS, ids=[f"{n}-{c.__name__}" for n, c in PAIRS])
def test_every_state_event_pair(setup: str, column: type[Event]) -> None:
    state, build = SETUPS[setup]
    machine = build()
    assert machine.state is state
    before = machine.snapshot()
    event = COLUMNS[column](setup.startswith("renew"))
    column = ALIASES.get((setup, column), column)
    expected = EXPECTED.get((setup, column))
    if expected is None and column in OUTCOMES and setup not in TASKS_ILLEGAL:
        # A task that this state cannot use as `column` is still answered: refused with one
        # ERROR ack, and nothing else changes.
        actions = machine.handle(event, now=T0)
        assert len(actions) == 1
        assert isinstance(actions[0], AckTask)
        assert not actions[0].ok
        assert machine.state is state
        return
    if expected is None:
        with pytest.raises(IllegalTransitionError) as caught:
            machine.handle(event, now=T0)
        assert caught.value.state == state.name
        assert caught.value.event == type(event).__name__
        assert machine.snapshot() == before, "a refused event changed the machine"
        return
    actions = machine.handle(event, now=T0)
    assert types(actions) == expected
    assert machine.state is TRANSITIONS[state][column]


def test_every_table_entry_is_exercised() -> None:
    """Each legal (state, event type) of the table has a canonical case above that takes it."""
    exercised = {(SETUPS[name][0], column) for name, column in EXPECTED}
    table = {(state, event) for state, row in TRANSITIONS.items() for event in row}
    assert table <= exercised | {(s, c) for s, c in table if c in (LinkUp, LinkDown)}, sorted(
        (s.name, c.__name__) for s, c in table - exercised
    )
    assert exercised <= table, sorted((s.name, c.__name__) for s, c in exercised - table)


def test_outcome_events_cannot_be_fed() -> None:
    machine = request_sent()
    before = machine.snapshot()
    with pytest.raises(IllegalTransitionError, match="machine's own"):
        machine.handle(
            CertificateVerified("t", Delivery(REQUEST_ID, CERT_ID, ENDPOINT, GOOD_PEM)), now=T0
        )  # type: ignore[arg-type]
    assert machine.snapshot() == before


# --- guards beyond the table --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "event", "reason"),
    [
        (making_key, Start(), "already started"),
        (fresh, TaskReceived("t", DELIVER_COMMAND, {}), "Start must come first"),
        (fresh, TimerFired(), "Start must come first"),
        (making_key, TaskReceived("t", DELIVER_COMMAND, {}), "awaiting the completion of MakeKey"),
        (storing, deliver("t1")[0], "awaiting the completion of StoreCredentials"),
        (request_sent_persisting, TimerFired(), "awaiting the completion of Persist"),
        (request_sent, Persisted(), "no storage action is outstanding"),
        (request_sent, StorageFailed("x"), "no storage action is outstanding"),
        (provisioned, Persisted(), "no storage action is outstanding"),
        (started_link_up, TimerFired(), "Start must come first"),
    ],
)
def test_guards(build: Callable[[], ProvisioningMachine], event: Input, reason: str) -> None:
    machine = build()
    before = machine.snapshot()
    with pytest.raises(IllegalTransitionError, match=reason):
        machine.handle(event, now=T0)
    assert machine.snapshot() == before


def test_the_retry_timer_is_replaced_by_the_renewal_check_once_provisioned() -> None:
    machine = storing()
    actions = run(machine, CredentialsStored(1), Persisted())
    assert isinstance(actions[-1], ScheduleRetry)
    assert actions[-1].delay == 3600.0  # the check interval: renewal is years away
    assert run(machine, TimerFired()) == [ScheduleRetry(3600.0)]  # no request sent again


def test_timer_is_not_armed_after_a_certificate_is_verified_when_renewal_is_off() -> None:
    machine = ProvisioningMachine(
        MachineConfig(serial=SERIAL, renewal=None),
        decoder=FakeDecoder(),
        rng=random.Random(1),
        record=record(State.REQUEST_SENT),
    )
    run(machine, LinkUp(), Start(), Persisted(), *deliver("t1"), CredentialsStored(1))
    assert machine.record is not None
    assert machine.record.renew_at is None
    assert StartPublisher(1) in run(machine, Persisted())
    with pytest.raises(IllegalTransitionError):
        machine.handle(TimerFired(), now=T0)
    # The operator's command still renews.
    assert run(machine, renew_task()) == [MakeKey(fresh=True)]


def test_now_must_be_finite() -> None:
    with pytest.raises(UsageError):
        fresh().handle(Start(), now=float("nan"))


# --- the flows, with exact actions ------------------------------------------------------------


def test_happy_path() -> None:
    machine = new_machine()
    assert run(machine, LinkUp(), Start()) == [MakeKey()]
    [persist] = run(machine, KeyReady(CSR))
    assert isinstance(persist, Persist)
    assert persist.record == StateRecord(State.KEY_READY, REQUEST_ID, CSR)
    actions = run(machine, Persisted())
    assert actions[:2] == [PublishRequest(REQUEST_ID, CSR, 1), ScheduleRetry(60.0)]
    assert isinstance(actions[2], Persist)
    assert actions[2].record.state is State.REQUEST_SENT
    assert actions[2].record.attempts == 1
    assert run(machine, Persisted()) == []
    first, second = deliver("t", parts=2)
    assert run(machine, first) == [AckTask("t-0", ok=True)]
    assert machine.state is State.RECEIVING
    assert run(machine, second) == [
        CancelRetry(),
        StoreCredentials(REQUEST_ID, CERT_ID, ENDPOINT, GOOD_PEM),
    ]
    [persist] = run(machine, CredentialsStored(3))
    assert isinstance(persist, Persist)
    renew_at = persist.record.renew_at
    assert renew_at is not None
    assert persist.record == StateRecord(
        State.PROVISIONED,
        REQUEST_ID,
        CSR,
        attempts=1,
        bundle_version=3,
        certificate_id=CERT_ID,
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
        renew_at=renew_at,
    )
    lifetime = NOT_AFTER - NOT_BEFORE
    assert abs(renew_at - (NOT_BEFORE + lifetime * 2 / 3)) <= lifetime * 0.05
    # The task is acked once the PROVISIONED record is durable, not before; the renewal check
    # is armed last.
    assert run(machine, Persisted()) == [
        AckTask("t-1", ok=True),
        DiscardKey(),
        ReportStatus(REQUEST_ID, provisioned=True, certificate_id=CERT_ID),
        StartPublisher(3),
        ScheduleRetry(3600.0),
    ]
    assert machine.state is State.PROVISIONED
    # A QoS 1 repeat of the completing task is acked OK; another delivery is refused.
    assert run(machine, deliver("t", parts=2)[1]) == [AckTask("t-1", ok=True)]
    [ack] = run(machine, *deliver("other", cert_id="d" * 64))
    assert ack == AckTask("other", ok=False, message="already provisioned")


def test_verification_failure_acks_error_reports_and_retries_the_same_request() -> None:
    machine = request_sent()
    actions = run(machine, *deliver("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID))
    ack, report, schedule, persist = actions
    assert isinstance(ack, AckTask)
    assert not ack.ok
    assert ack.message is not None
    assert ack.message.startswith("wrong_key")
    assert isinstance(report, ReportStatus)
    assert not report.provisioned
    assert report.reason == ack.message
    assert isinstance(schedule, ScheduleRetry)
    assert 0 <= schedule.delay <= 120
    assert isinstance(persist, Persist)
    assert persist.record.state is State.WAITING_RETRY
    assert persist.record.next_retry_at == pytest.approx(T0 + schedule.delay)
    assert persist.record.last_error == ack.message
    run(machine, Persisted())
    actions = run(machine, TimerFired(), now=T0 + schedule.delay)
    assert actions[0] == PublishRequest(REQUEST_ID, CSR, 2)
    assert machine.state is State.REQUEST_SENT


def test_cloud_refusal_acks_ok_and_retries_without_a_report() -> None:
    machine = request_sent()
    actions = run(machine, refuse("r"))
    assert types(actions) == [AckTask, ScheduleRetry, Persist]
    assert actions[0] == AckTask("r", ok=True)
    assert machine.state is State.WAITING_RETRY


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (TaskReceived("u", "ztp.other", {}), "unknown command 'ztp.other'"),
        (deliver("u", request_id="f" * 32)[0], "delivery for another request"),
        (refuse("u", request_id="f" * 32), "refusal for another request"),
        (TaskReceived("u", DELIVER_COMMAND, {"n": "x"}), "DecodeError"),
    ],
)
def test_unusable_tasks_are_acked_error_and_change_nothing(
    task: TaskReceived, message: str
) -> None:
    machine = request_sent()
    state = machine.state
    [ack] = run(machine, task)
    assert isinstance(ack, AckTask)
    assert not ack.ok
    assert ack.message is not None
    assert message in ack.message
    assert machine.state is state


def test_bad_certificate_id_is_a_verification_failure() -> None:
    machine = request_sent()
    actions = run(machine, *deliver("t", cert_id="bad id with spaces"))
    assert types(actions) == [AckTask, ReportStatus, ScheduleRetry, Persist]
    assert machine.state is State.WAITING_RETRY


def test_storage_failure_while_storing_acks_error_and_retries() -> None:
    machine = storing()
    actions = run(machine, StorageFailed("disk full"))
    assert actions[0] == AckTask("t1", ok=False, message="storage failed: disk full")
    assert machine.state is State.WAITING_RETRY


def test_key_failure_retries_from_scratch() -> None:
    machine = making_key()
    [schedule] = run(machine, StorageFailed("read-only file system"))
    assert isinstance(schedule, ScheduleRetry)
    assert machine.state is State.FRESH
    assert machine.record is None
    assert run(machine, TimerFired()) == [MakeKey()]


def test_partial_delivery_timing_out_resends_and_forgets_fragments() -> None:
    machine = receiving()
    resets = machine._decoder.resets  # type: ignore[attr-defined]
    actions = run(machine, TimerFired())
    assert actions[0] == PublishRequest(REQUEST_ID, CSR, 2)
    assert machine._decoder.resets == resets + 1  # type: ignore[attr-defined]
    assert machine.state is State.REQUEST_SENT


def test_late_delivery_while_waiting_is_accepted() -> None:
    machine = waiting_retry()
    assert types(run(machine, *deliver("late"))) == [CancelRetry, StoreCredentials]
    assert machine.state is State.STORING


# --- link holding --------------------------------------------------------------------------------


def test_link_bound_actions_are_held_while_down_and_a_newer_request_replaces_an_older() -> None:
    machine = new_machine()
    run(machine, Start(), KeyReady(CSR))
    actions = run(machine, Persisted())
    assert types(actions) == [ScheduleRetry, Persist]  # the publish is held
    run(machine, Persisted())
    run(machine, TimerFired())
    run(machine, Persisted())
    assert run(machine, LinkUp()) == [PublishRequest(REQUEST_ID, CSR, 2)]
    assert run(machine, LinkDown()) == []
    # Acks and reports wait for the link too, in order.
    actions = run(machine, *deliver("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID))
    assert types(actions) == [ScheduleRetry, Persist]
    run(machine, Persisted())
    assert types(run(machine, LinkUp())) == [AckTask, ReportStatus]
    assert run(machine, LinkUp()) == []


# --- retry timing --------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    machine = request_sent()
    delays = []
    for _ in range(14):
        actions = run(machine, TimerFired())
        run(machine, Persisted())
        delays += [a.delay for a in actions if isinstance(a, ScheduleRetry)]
    for n, delay in enumerate(delays, start=2):
        assert 0 <= delay <= min(3600, 60 * 2 ** (n - 1))
    assert max(delays) > 600  # the cap grows: by the 14th send some wait is long
    assert any(d < 60 for d in delays)  # full jitter: some waits are short


def test_same_seed_same_delays() -> None:
    def delays(seed: int) -> list[float]:
        machine = new_machine(seed=seed)
        run(machine, LinkUp(), Start(), KeyReady(CSR), Persisted(), Persisted())
        out = []
        for _ in range(5):
            actions = run(machine, TimerFired())
            run(machine, Persisted())
            out += [a.delay for a in actions if isinstance(a, ScheduleRetry)]
        return out

    assert delays(1) == delays(1)
    assert delays(1) != delays(2)


# --- resume from each state, through the real state file -------------------------------------


def _persists(actions: list[Action]) -> list[StateRecord]:
    return [a.record for a in actions if isinstance(a, Persist)]


@dataclass
class Run:
    """A driver-like loop that also stores every Persist through the real StateFile."""

    machine: ProvisioningMachine
    store: StateFile
    published: list[PublishRequest]
    make_key_calls: int = 0

    def feed(self, event: Input) -> list[Action]:
        actions = self.machine.handle(event, now=T0)
        for action in actions:
            if isinstance(action, Persist):
                self.store.save(action.record)
            if isinstance(action, PublishRequest):
                self.published.append(action)
            if isinstance(action, MakeKey):
                self.make_key_calls += 1
        return actions


KILL_POINTS: dict[str, list[Callable[[], Input]]] = {
    # Events fed before the kill; the kill lands after the last one's actions were performed
    # (including its Persist) but before its completion event was fed.
    "making-key": [LinkUp, Start],
    "key-ready": [LinkUp, Start, lambda: KeyReady(CSR)],
    "request-sent": [LinkUp, Start, lambda: KeyReady(CSR), Persisted],
    "receiving": [
        LinkUp,
        Start,
        lambda: KeyReady(CSR),
        Persisted,
        Persisted,
        lambda: deliver("t", parts=2)[0],
    ],
    "storing": [
        LinkUp,
        Start,
        lambda: KeyReady(CSR),
        Persisted,
        Persisted,
        lambda: deliver("t")[0],
    ],
    "provisioned": [
        LinkUp,
        Start,
        lambda: KeyReady(CSR),
        Persisted,
        Persisted,
        lambda: deliver("t")[0],
        lambda: CredentialsStored(1),
    ],
    "waiting-retry": [
        LinkUp,
        Start,
        lambda: KeyReady(CSR),
        Persisted,
        Persisted,
        lambda: deliver("b", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[0],
    ],
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_resume_after_a_kill_in_each_state(point: str, tmp_path: Path) -> None:
    store = StateFile(tmp_path / "state")
    first = Run(new_machine(), store, [])
    for make in KILL_POINTS[point]:
        first.feed(make())
    # Killed here. A new machine starts from whatever the state file holds.
    stored = store.load()
    second = Run(new_machine(stored, seed=99), store, [])
    actions = second.feed(LinkUp()) + second.feed(Start())
    if stored is None:
        # No record: nothing was ever published, so making the key again is safe (the key store
        # hands back the same key; the CSR is signed again and sent for the first time).
        assert first.published == []
        assert actions == [MakeKey()]
        return
    assert second.make_key_calls == 0, "a second key while a request is outstanding"
    assert all(p.csr_pem == CSR and p.request_id == REQUEST_ID for p in first.published)
    if stored.state is State.PROVISIONED:
        # The report goes again: a kill may have come between the record and the report.
        assert types(actions) == [DiscardKey, ReportStatus, StartPublisher, ScheduleRetry]
        return
    if stored.state is State.WAITING_RETRY:
        assert stored.next_retry_at is not None
        assert actions == [ScheduleRetry(max(0.0, stored.next_retry_at - T0))]
        actions = second.feed(TimerFired())
    published = [a for a in actions if isinstance(a, PublishRequest)]
    assert published == [PublishRequest(REQUEST_ID, CSR, stored.attempts + 1)]
    # And it can finish: a delivery is verified against the key from the stored CSR.
    second.feed(Persisted())
    assert types(second.feed(deliver("again")[0])) == [CancelRetry, StoreCredentials]


def test_resume_after_storing_then_killed_before_the_record() -> None:
    """Killed after the bundle commit, before PROVISIONED is durable: the same request again."""
    machine = storing()
    stored = machine.record
    assert stored is not None
    assert stored.state is State.REQUEST_SENT
    again = new_machine(stored)
    actions = run(again, LinkUp(), Start())
    assert actions[0] == PublishRequest(REQUEST_ID, CSR, 2)


# --- records ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"state": State.FRESH},
        {"state": State.STORING},
        {"request_id": "has space"},
        {"csr_pem": "not a csr"},
        {"attempts": -1},
        {"state": State.WAITING_RETRY, "next_retry_at": None},
        {"state": State.PROVISIONED, "bundle_version": None},
        {"state": State.PROVISIONED, "bundle_version": 1, "certificate_id": None},
        {"next_retry_at": float("inf")},
    ],
)
def test_invalid_records_are_refused(changes: dict[str, object]) -> None:
    base: dict[str, object] = {"state": State.KEY_READY, "request_id": REQUEST_ID, "csr_pem": CSR}
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        StateRecord(**(base | changes))  # type: ignore[arg-type]


def test_events_and_actions_validate() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        KeyReady("not a csr")
    with pytest.raises(ValueError):  # noqa: PT011
        TaskReceived("", DELIVER_COMMAND, {})
    with pytest.raises(ValueError):  # noqa: PT011
        CredentialsStored(0)
    with pytest.raises(ValueError):  # noqa: PT011
        ScheduleRetry(-1)
    with pytest.raises(ValueError):  # noqa: PT011
        ReportStatus(REQUEST_ID, provisioned=True)
    with pytest.raises(ValueError):  # noqa: PT011
        ReportStatus(REQUEST_ID, provisioned=False)
    with pytest.raises(ValueError):  # noqa: PT011
        MachineConfig(serial=SERIAL, delivery_timeout=0)


def test_request_id_is_derived_from_the_csr() -> None:
    assert request_id_for(CSR) == request_id_for(CSR.strip() + "\n")
    assert len(REQUEST_ID) == 32
    other = build_csr(KEY, CsrSubject(SERIAL))
    assert request_id_for(other) != REQUEST_ID  # ECDSA signatures differ: so would the id


# --- random sequences never corrupt the machine ------------------------------------------------

EVENT_POOL: list[Callable[[], Input]] = [
    Start,
    LinkUp,
    LinkDown,
    TimerFired,
    lambda: KeyReady(CSR),
    lambda: KeyReady(CSR2),
    Persisted,
    lambda: CredentialsStored(2),
    lambda: StorageFailed("x"),
    lambda: deliver("p", parts=2)[0],
    lambda: deliver("p", parts=2)[1],
    lambda: deliver("g")[0],
    lambda: deliver2("g2")[0],
    lambda: deliver("b", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[0],
    lambda: refuse("r"),
    lambda: refuse("r2", request_id=REQUEST_ID2),
    renew_task,
    lambda: TaskReceived("z", "other", {}),
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.integers(0, len(EVENT_POOL) - 1), max_size=60),
    st.sampled_from(
        [
            None,
            State.KEY_READY,
            State.WAITING_RETRY,
            State.PROVISIONED,
            State.RENEW_SENT,
            State.RENEW_WAITING,
        ]
    ),
    st.sampled_from([T0, T0 + 2500 * 86400]),
)
# One walk with every invariant beside the step that may break it.
def test_random_sequences_never_corrupt_state(  # noqa: PLR0912
    picks: list[int], start: State | None, now: float
) -> None:
    machine = new_machine(None if start is None else record(start))
    key_made = False
    published_csrs: set[str] = set()
    for pick in picks:
        event = EVENT_POOL[pick]()
        before = machine.snapshot()
        state = machine.state
        try:
            actions = machine.handle(event, now=now)
        except IllegalTransitionError:
            assert machine.snapshot() == before
            continue
        assert machine.state in TRANSITIONS
        if isinstance(event, TimerFired) and state is State.PROVISIONED:
            expected = RenewalDue if machine.state is State.RENEW_MAKING_KEY else RenewalNotDue
            assert machine.state is TRANSITIONS[state][expected]
        elif not isinstance(event, TaskReceived):
            assert machine.state is TRANSITIONS[state][type(event)]
        for action in actions:
            if isinstance(action, MakeKey):
                # A fresh key only to leave PROVISIONED; otherwise only while nothing was sent.
                if action.fresh:
                    assert state is State.PROVISIONED
                    published_csrs.clear()
                else:
                    assert not published_csrs
                key_made = True
            if isinstance(action, PublishRequest):
                record_ = machine.record
                assert record_ is not None
                assert action.csr_pem == record_.csr_pem
                published_csrs.add(action.csr_pem)
            if isinstance(action, Persist):
                assert action.record.state in PERSISTED
                # A renewal never forgets the bundle in use.
                if action.record.state in RENEWAL_STATES:
                    assert action.record.bundle_version is not None
        assert len(published_csrs) <= 1, "two different CSRs were published for one key"
        if machine.state in (State.REQUEST_SENT, State.RECEIVING, State.WAITING_RETRY):
            assert machine.record is not None
        if machine.state in RENEWAL_STATES | {State.PROVISIONED}:
            assert machine.record is not None
            assert machine.record.bundle_version is not None
    assert key_made or start is not None or not published_csrs


PERSISTED = {
    State.KEY_READY,
    State.REQUEST_SENT,
    State.WAITING_RETRY,
    State.PROVISIONED,
    State.RENEW_KEY_READY,
    State.RENEW_SENT,
    State.RENEW_WAITING,
}


def test_outcome_names_are_table_columns() -> None:
    columns = {event for row in TRANSITIONS.values() for event in row}
    assert {FragmentHeld, CertificateVerified, DeliveryFailed, TaskRefused, TaskRepeated} <= columns
    assert {RenewRequested, RenewalDue, RenewalNotDue} <= columns
    assert TaskReceived not in columns


# --- the production decoder: shared fragments and messages -----------------------------------


def codec_machine(record_: StateRecord | None = None) -> ProvisioningMachine:
    return ProvisioningMachine(
        CONFIG, decoder=SharedCodecDecoder(), rng=random.Random(3), record=record_
    )


def codec_params(
    message: CertificateDelivery | Rejected, transfer_id: str = "tx1", max_chars: int = 200
) -> dict[str, str]:
    return delivery_params(message, transfer_id=transfer_id, max_chars=max_chars)


GOOD_DELIVERY = CertificateDelivery(REQUEST_ID, CERT_ID, ENDPOINT, GOOD_PEM)


def test_shared_codec_delivery_in_one_task() -> None:
    machine = codec_machine(record(State.REQUEST_SENT))
    run(machine, LinkUp(), Start(), Persisted())
    params = codec_params(GOOD_DELIVERY)
    assert len(params) > 3
    actions = run(machine, TaskReceived("u1", DELIVER_COMMAND, params))
    assert actions == [CancelRetry(), StoreCredentials(REQUEST_ID, CERT_ID, ENDPOINT, GOOD_PEM)]


def test_shared_codec_fragments_spread_over_tasks_in_any_order() -> None:
    machine = codec_machine(record(State.REQUEST_SENT))
    run(machine, LinkUp(), Start(), Persisted())
    items = list(codec_params(GOOD_DELIVERY).items())
    items.reverse()
    *head, last = items
    for n, (key, value) in enumerate(head):
        assert run(machine, TaskReceived(f"u{n}", DELIVER_COMMAND, {key: value})) == [
            AckTask(f"u{n}", ok=True)
        ]
        # A QoS 1 repeat of the same fragment is harmless.
        run(machine, TaskReceived(f"u{n}", DELIVER_COMMAND, {key: value}))
    assert machine.state is State.RECEIVING
    actions = run(machine, TaskReceived("last", DELIVER_COMMAND, dict([last])))
    assert types(actions) == [CancelRetry, StoreCredentials]


def test_shared_codec_rejection_and_bad_input() -> None:
    machine = codec_machine(record(State.REQUEST_SENT))
    run(machine, LinkUp(), Start(), Persisted())
    [ack] = run(machine, TaskReceived("x", DELIVER_COMMAND, {"cert1": "abc"}))
    assert isinstance(ack, AckTask)
    assert not ack.ok
    assert ack.message is not None
    assert ack.message.startswith("MessageError")
    fragments = list(codec_params(GOOD_DELIVERY).values())
    [ack] = run(machine, TaskReceived("y", DELIVER_COMMAND, {"f01": fragments[0][:-3] + "%%%"}))
    assert not ack.ok  # type: ignore[union-attr]
    actions = run(
        machine,
        TaskReceived("r", DELIVER_COMMAND, codec_params(Rejected(REQUEST_ID, "csr refused"), "t2")),
    )
    assert types(actions) == [AckTask, ScheduleRetry, Persist]
    assert machine.state is State.WAITING_RETRY


def test_shared_codec_same_delivery_is_decoded_again_after_a_resend() -> None:
    """A delivery that failed once, sent again under the same transfer id, is verified again."""
    bad = CertificateDelivery(REQUEST_ID, BAD_ID, ENDPOINT, WRONG_KEY_PEM)
    machine = codec_machine(record(State.REQUEST_SENT))
    run(machine, LinkUp(), Start(), Persisted())
    assert types(run(machine, TaskReceived("b1", DELIVER_COMMAND, codec_params(bad)))) == [
        AckTask,
        ReportStatus,
        ScheduleRetry,
        Persist,
    ]
    run(machine, Persisted(), TimerFired(), Persisted())
    actions = run(machine, TaskReceived("b2", DELIVER_COMMAND, codec_params(bad)))
    assert types(actions) == [AckTask, ReportStatus, ScheduleRetry, Persist]
    assert isinstance(actions[1], ReportStatus)
    assert actions[1].reason is not None
    Rejected(REQUEST_ID, actions[1].reason)  # the report's reason is a valid wire reason


# --- renewal: the flows, with exact actions -----------------------------------------------------


def test_renewal_on_command_makes_a_new_key_and_keeps_the_bundle_in_use() -> None:
    machine = provisioned()
    old = machine.record
    assert old is not None
    # The command starts a renewal: the renewal timer is disarmed, a fresh key asked for.
    assert run(machine, renew_task("op1")) == [CancelRetry(), MakeKey(fresh=True)]
    assert machine.state is State.RENEW_MAKING_KEY
    [persist] = run(machine, KeyReady(CSR2))
    assert isinstance(persist, Persist)
    assert persist.record == replace(
        old,
        state=State.RENEW_KEY_READY,
        request_id=REQUEST_ID2,
        csr_pem=CSR2,
        attempts=0,
        next_retry_at=None,
        last_error=None,
    )
    # Acked once the new key and CSR are durable; then the new request goes out.
    assert run(machine, Persisted()) == [
        AckTask("op1", ok=True),
        PublishRequest(REQUEST_ID2, CSR2, 1),
        ScheduleRetry(60.0),
        Persist(replace(persist.record, state=State.RENEW_SENT, attempts=1, next_retry_at=None)),
    ]
    run(machine, Persisted())
    assert machine.state is State.RENEW_SENT
    # Asked again while under way: OK at once, nothing else.
    assert run(machine, renew_task("op2")) == [AckTask("op2", ok=True)]
    # A delivery of the old request is not for this one; a certificate of the old key fails.
    [ack] = run(machine, *deliver("old"))
    assert ack == AckTask("old", ok=False, message="delivery for another request")
    actions = run(machine, *deliver2("oldkey", pem=GOOD_PEM))
    assert types(actions) == [AckTask, ReportStatus, ScheduleRetry, Persist]
    assert isinstance(actions[0], AckTask)
    assert actions[0].message is not None
    assert actions[0].message.startswith("wrong_key")
    assert machine.state is State.RENEW_WAITING
    run(machine, Persisted())
    # The new certificate: stored as bundle 2, reported, the publisher told, the check rearmed.
    assert run(machine, *deliver2("new")) == [
        CancelRetry(),
        StoreCredentials(REQUEST_ID2, CERT_ID2, ENDPOINT, GOOD_PEM2),
    ]
    [persist] = run(machine, CredentialsStored(2))
    assert isinstance(persist, Persist)
    assert persist.record.state is State.PROVISIONED
    assert (persist.record.request_id, persist.record.csr_pem) == (REQUEST_ID2, CSR2)
    assert (persist.record.bundle_version, persist.record.certificate_id) == (2, CERT_ID2)
    assert run(machine, Persisted()) == [
        AckTask("new", ok=True),
        DiscardKey(),
        ReportStatus(REQUEST_ID2, provisioned=True, certificate_id=CERT_ID2),
        StartPublisher(2),
        ScheduleRetry(3600.0),
    ]
    assert machine.state is State.PROVISIONED
    # A repeat of the completing task is OK; the first certificate's delivery is old news.
    assert run(machine, deliver2("new")[0]) == [AckTask("new", ok=True)]
    [ack] = run(machine, *deliver("t1-again"))
    assert ack == AckTask("t1-again", ok=False, message="already provisioned")


def test_renewal_is_due_at_the_fraction_of_the_lifetime_and_checked_at_start() -> None:
    due = T0 + 100
    machine = new_machine(record(State.PROVISIONED, renew_at=due))
    actions = run(machine, LinkUp(), Start())
    assert actions[-1] == ScheduleRetry(100.0)
    # Early (a clock that jumped back, a timer that fired soon): armed again, no renewal.
    assert run(machine, TimerFired(), now=due - 10) == [ScheduleRetry(10.0)]
    assert machine.state is State.PROVISIONED
    assert run(machine, TimerFired(), now=due) == [MakeKey(fresh=True)]
    assert machine.state is State.RENEW_MAKING_KEY
    # No command to ack: once the record is durable, the request goes straight out.
    run(machine, KeyReady(CSR2))
    assert types(run(machine, Persisted(), now=due)) == [PublishRequest, ScheduleRetry, Persist]


def test_renewal_timer_waits_at_most_the_check_interval() -> None:
    config = MachineConfig(serial=SERIAL, renewal=RenewalPolicy(check_interval=600.0))
    machine = ProvisioningMachine(
        config,
        decoder=FakeDecoder(),
        rng=random.Random(1),
        record=record(State.PROVISIONED, renew_at=T0 + 10_000),
    )
    assert run(machine, LinkUp(), Start())[-1] == ScheduleRetry(600.0)
    # The wall clock jumped past the due time meanwhile: the next check renews.
    assert run(machine, TimerFired(), now=T0 + 20_000) == [MakeKey(fresh=True)]


def test_record_without_a_due_time_computes_one_and_a_legacy_record_has_none() -> None:
    machine = new_machine(record(State.PROVISIONED, renew_at=None))
    assert machine.renew_at is not None
    lifetime = NOT_AFTER - NOT_BEFORE
    assert abs(machine.renew_at - (NOT_BEFORE + lifetime * 2 / 3)) <= lifetime * 0.05
    legacy = new_machine(record(State.PROVISIONED, renew_at=None, not_before=None, not_after=None))
    assert legacy.renew_at is None
    assert run(legacy, LinkUp(), Start()) == [
        DiscardKey(),
        ReportStatus(REQUEST_ID, provisioned=True, certificate_id=CERT_ID),
        StartPublisher(1),
    ]
    assert run(legacy, renew_task()) == [MakeKey(fresh=True)]


def test_renew_command_before_the_first_provisioning_is_refused() -> None:
    for build in (request_sent, receiving, waiting_retry, fresh_after_failure):
        machine = build()
        state = machine.state
        [ack] = run(machine, renew_task())
        assert ack == AckTask(
            "rn", ok=False, message="not provisioned yet: there is no certificate to renew"
        )
        assert machine.state is state


def test_a_renewal_refused_by_the_cloud_keeps_the_bundle_and_tries_again_later() -> None:
    machine = renew_sent()
    actions = run(machine, refuse("no", request_id=REQUEST_ID2))
    assert types(actions) == [AckTask, ScheduleRetry, Persist]
    assert actions[0] == AckTask("no", ok=True)
    assert isinstance(actions[2], Persist)
    waiting = actions[2].record
    assert waiting.state is State.RENEW_WAITING
    assert (waiting.bundle_version, waiting.certificate_id) == (1, CERT_ID)
    assert waiting.last_error is not None
    assert "refused by the cloud" in waiting.last_error
    assert not any(isinstance(a, (StartPublisher, DiscardKey, MakeKey)) for a in actions)
    run(machine, Persisted())
    actions = run(machine, TimerFired())
    assert actions[0] == PublishRequest(REQUEST_ID2, CSR2, 2)  # the same CSR again
    assert machine.state is State.RENEW_SENT


@pytest.mark.parametrize("build", [renew_making_key, renew_key_ready_persisting])
def test_a_renewal_whose_key_cannot_be_stored_goes_back_to_the_bundle_in_use(
    build: Callable[[], ProvisioningMachine],
) -> None:
    machine = build()
    provisioned_record = provisioned().record
    actions = run(machine, StorageFailed("read-only file system"))
    assert actions[0] == AckTask("rn", ok=False, message="renewal failed: read-only file system")
    [schedule] = actions[1:]
    assert isinstance(schedule, ScheduleRetry)
    assert schedule.delay > 0  # backoff, not at once
    assert machine.state is State.PROVISIONED
    assert machine.record is not None
    assert provisioned_record is not None
    assert machine.record.request_id == provisioned_record.request_id
    assert machine.record.state is State.PROVISIONED
    # Still provisioned: a later command starts again with a fresh key.
    assert run(machine, renew_task("again")) == [CancelRetry(), MakeKey(fresh=True)]


def test_a_renewal_stored_but_not_recorded_runs_on_the_new_bundle() -> None:
    machine = renewed_persisting()
    actions = run(machine, StorageFailed("disk full"))
    assert actions[:3] == [
        AckTask("t2", ok=True),
        ReportStatus(REQUEST_ID2, provisioned=True, certificate_id=CERT_ID2),
        StartPublisher(2),
    ]
    assert machine.state is State.PROVISIONED


def test_renewal_links_bound_actions_wait_for_the_link() -> None:
    machine = provisioned()
    run(machine, LinkDown(), renew_task("op"), KeyReady(CSR2))
    actions = run(machine, Persisted())
    assert types(actions) == [ScheduleRetry, Persist]
    assert run(machine, LinkUp()) == [AckTask("op", ok=True), PublishRequest(REQUEST_ID2, CSR2, 1)]


# --- renewal: resume after a kill ---------------------------------------------------------------

RENEWAL_KILL_POINTS: dict[str, list[Callable[[], Input]]] = {
    "renew-making-key": [renew_task],
    "renew-key-ready": [renew_task, lambda: KeyReady(CSR2)],
    "renew-sent": [renew_task, lambda: KeyReady(CSR2), Persisted],
    "renew-receiving": [
        renew_task,
        lambda: KeyReady(CSR2),
        Persisted,
        Persisted,
        lambda: deliver2("t", parts=2)[0],
    ],
    "renew-storing": [
        renew_task,
        lambda: KeyReady(CSR2),
        Persisted,
        Persisted,
        lambda: deliver2("t")[0],
    ],
    "renew-waiting": [
        renew_task,
        lambda: KeyReady(CSR2),
        Persisted,
        Persisted,
        lambda: deliver2("b", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[0],
    ],
}


@pytest.mark.parametrize("point", list(RENEWAL_KILL_POINTS))
def test_resume_after_a_kill_mid_renewal(point: str, tmp_path: Path) -> None:
    store = StateFile(tmp_path / "state")
    first = Run(new_machine(), store, [])
    for make in [*KILL_POINTS["provisioned"], Persisted, *RENEWAL_KILL_POINTS[point]]:
        first.feed(make())
    stored = store.load()
    assert stored is not None
    second = Run(new_machine(stored, seed=99), store, [])
    actions = second.feed(LinkUp()) + second.feed(Start())
    if not stored.renewing:
        # Killed before the renewal's first record: still provisioned on bundle 1; the
        # unacked command comes again from AirVantage and starts it afresh.
        assert first.published[-1].csr_pem == CSR
        assert types(actions) == [DiscardKey, ReportStatus, StartPublisher, ScheduleRetry]
        assert types(second.feed(renew_task())) == [CancelRetry, MakeKey]
        return
    assert second.make_key_calls == 0, "a second new key while a renewal is under way"
    # The bundle in use is published on at once, before anything else.
    assert actions[0] == StartPublisher(1)
    assert (stored.bundle_version, stored.certificate_id) == (1, CERT_ID)
    if stored.state is State.RENEW_WAITING:
        assert stored.next_retry_at is not None
        assert actions[1:] == [ScheduleRetry(max(0.0, stored.next_retry_at - T0))]
        actions = second.feed(TimerFired())
    published = [a for a in actions if isinstance(a, PublishRequest)]
    assert published == [PublishRequest(REQUEST_ID2, CSR2, stored.attempts + 1)]
    second.feed(Persisted())
    assert types(second.feed(deliver2("again")[0])) == [CancelRetry, StoreCredentials]
    second.feed(CredentialsStored(2))
    assert StartPublisher(2) in second.feed(Persisted())
    final = store.load()
    assert final is not None
    assert (final.state, final.bundle_version, final.certificate_id) == (
        State.PROVISIONED,
        2,
        CERT_ID2,
    )


# --- renewal: the due time and the policy -------------------------------------------------------


def test_renewal_due_is_the_fraction_of_the_lifetime_plus_or_minus_the_jitter() -> None:
    policy = RenewalPolicy(at_fraction=0.5, jitter_fraction=0.1)
    assert renewal_due(1000.0, 2000.0, policy=policy, rand=0.5) == 1500.0
    assert renewal_due(1000.0, 2000.0, policy=policy, rand=0.0) == 1400.0
    assert renewal_due(1000.0, 2000.0, policy=policy, rand=1.0) == pytest.approx(1600.0)
    default = RenewalPolicy()
    assert renewal_due(0.0, 3.0, policy=default, rand=0.5) == pytest.approx(2.0)
    with pytest.raises(UsageError):
        renewal_due(2.0, 1.0, policy=default, rand=0.5)
    with pytest.raises(UsageError):
        renewal_due(1.0, 2.0, policy=default, rand=1.5)


@settings(max_examples=200, deadline=None)
@given(
    st.floats(0, 2e9),
    st.floats(1, 1e9),
    st.floats(0.05, 0.95),
    st.floats(0, 1),
    st.floats(0, 1, exclude_max=True),
)
def test_renewal_due_stays_inside_the_jitter_window(
    start: float, lifetime: float, fraction: float, jitter_share: float, rand: float
) -> None:
    jitter = jitter_share * min(fraction, 1 - fraction) * 0.99
    policy = RenewalPolicy(at_fraction=fraction, jitter_fraction=jitter)
    due = renewal_due(start, start + lifetime, policy=policy, rand=rand)
    assert start < due < start + lifetime
    low = start + lifetime * (fraction - jitter)
    high = start + lifetime * (fraction + jitter)
    assert low - 1e-6 * (abs(low) + 1) <= due <= high + 1e-6 * (abs(high) + 1)


@pytest.mark.parametrize(
    "changes",
    [
        {"at_fraction": 0.0},
        {"at_fraction": 1.0},
        {"jitter_fraction": -0.01},
        {"at_fraction": 0.9, "jitter_fraction": 0.1},
        {"check_interval": 0.0},
        {"check_interval": float("inf")},
    ],
)
def test_invalid_renewal_policies_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        RenewalPolicy(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {"state": State.RENEW_SENT, "bundle_version": None},
        {"state": State.RENEW_KEY_READY, "certificate_id": None},
        {"state": State.RENEW_WAITING, "next_retry_at": None},
        {"not_before": T0 + 1, "not_after": T0},
        {"not_before": T0, "not_after": None},
        {"renew_at": float("nan")},
    ],
)
def test_invalid_renewal_records_are_refused(changes: dict[str, object]) -> None:
    base = {
        "state": State.PROVISIONED,
        "request_id": REQUEST_ID,
        "csr_pem": CSR,
        "bundle_version": 1,
        "certificate_id": CERT_ID,
        "next_retry_at": T0,
    }
    StateRecord(**base)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        StateRecord(**(base | changes))  # type: ignore[arg-type]
