"""The provisioning machine: every (state, event) pair, the flows, resume, random sequences.

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
from dataclasses import dataclass
from pathlib import Path

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
    if state is State.WAITING_RETRY:
        base |= {"attempts": 1, "next_retry_at": T0 + 30, "last_error": "wrong_key"}
    if state is State.PROVISIONED:
        base |= {"attempts": 1, "bundle_version": 1, "certificate_id": CERT_ID}
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
}

# One concrete input per table column. Outcome columns are tasks that the machine interprets as
# that outcome whenever the current state can accept it.
COLUMNS: dict[type[Event], Callable[[], Input]] = {
    Start: Start,
    LinkUp: LinkUp,
    LinkDown: LinkDown,
    TimerFired: TimerFired,
    KeyReady: lambda: KeyReady(CSR),
    Persisted: Persisted,
    CredentialsStored: lambda: CredentialsStored(1),
    StorageFailed: lambda: StorageFailed("disk full"),
    FragmentHeld: lambda: deliver("p", parts=2)[0],
    CertificateVerified: lambda: deliver("t1")[0],
    DeliveryFailed: lambda: deliver("bad", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[0],
    TaskRefused: lambda: TaskReceived("x", "ztp.unknown", {}),
    TaskRepeated: lambda: deliver("t1")[0],
}
OUTCOMES = {FragmentHeld, CertificateVerified, DeliveryFailed, TaskRefused, TaskRepeated}

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
    ("provisioned-persisting", Persisted): [AckTask, DiscardKey, ReportStatus, StartPublisher],
    ("provisioned-persisting", StorageFailed): [AckTask, ReportStatus, StartPublisher],
    ("provisioned", TaskRefused): [AckTask],
    ("provisioned", TaskRepeated): [AckTask],
    ("provisioned-resumed", Start): [DiscardKey, ReportStatus, StartPublisher],
    ("waiting-retry-persisting", Persisted): [],
    ("waiting-retry-persisting", StorageFailed): [],
    ("waiting-retry", TimerFired): [PublishRequest, ScheduleRetry, Persist],
    ("waiting-retry", FragmentHeld): [AckTask],
    ("waiting-retry", CertificateVerified): [CancelRetry, StoreCredentials],
    ("waiting-retry", DeliveryFailed): [AckTask, ReportStatus, ScheduleRetry, Persist],
    ("waiting-retry", TaskRefused): [AckTask],
    ("waiting-retry-resumed", Start): [ScheduleRetry],
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
}

PAIRS = [(name, column) for name in SETUPS for column in COLUMNS]


@pytest.mark.parametrize(("setup", "column"), PAIRS, ids=[f"{n}-{c.__name__}" for n, c in PAIRS])
def test_every_state_event_pair(setup: str, column: type[Event]) -> None:
    state, build = SETUPS[setup]
    machine = build()
    assert machine.state is state
    before = machine.snapshot()
    event = COLUMNS[column]()
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


def test_timer_is_not_armed_after_a_certificate_is_verified() -> None:
    machine = storing()
    run(machine, CredentialsStored(1), Persisted())
    with pytest.raises(IllegalTransitionError):
        machine.handle(TimerFired(), now=T0)


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
    assert persist.record == StateRecord(
        State.PROVISIONED, REQUEST_ID, CSR, attempts=1, bundle_version=3, certificate_id=CERT_ID
    )
    # The task is acked once the PROVISIONED record is durable, not before.
    assert run(machine, Persisted()) == [
        AckTask("t-1", ok=True),
        DiscardKey(),
        ReportStatus(REQUEST_ID, provisioned=True, certificate_id=CERT_ID),
        StartPublisher(3),
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
        assert types(actions) == [DiscardKey, ReportStatus, StartPublisher]
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
    Persisted,
    lambda: CredentialsStored(2),
    lambda: StorageFailed("x"),
    lambda: deliver("p", parts=2)[0],
    lambda: deliver("p", parts=2)[1],
    lambda: deliver("g")[0],
    lambda: deliver("b", pem=WRONG_KEY_PEM, cert_id=BAD_ID)[0],
    lambda: refuse("r"),
    lambda: TaskReceived("z", "other", {}),
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(EVENT_POOL) - 1), max_size=60),
    st.sampled_from([None, State.KEY_READY, State.WAITING_RETRY, State.PROVISIONED]),
)
def test_random_sequences_never_corrupt_state(picks: list[int], start: State | None) -> None:
    machine = new_machine(None if start is None else record(start))
    key_made = False
    published_csrs: set[str] = set()
    for pick in picks:
        event = EVENT_POOL[pick]()
        before = machine.snapshot()
        state = machine.state
        try:
            actions = machine.handle(event, now=T0)
        except IllegalTransitionError:
            assert machine.snapshot() == before
            continue
        assert machine.state in TRANSITIONS
        if not isinstance(event, TaskReceived):
            assert machine.state is TRANSITIONS[state][type(event)]
        for action in actions:
            if isinstance(action, MakeKey):
                # A key is asked for only while no request was ever published.
                assert not published_csrs
                key_made = True
            if isinstance(action, PublishRequest):
                published_csrs.add(action.csr_pem)
            if isinstance(action, Persist):
                assert action.record.state in (
                    State.KEY_READY,
                    State.REQUEST_SENT,
                    State.WAITING_RETRY,
                    State.PROVISIONED,
                )
        assert len(published_csrs) <= 1, "two different CSRs were published"
        if machine.state in (State.REQUEST_SENT, State.RECEIVING, State.WAITING_RETRY):
            assert machine.record is not None
    assert key_made or start is not None or not published_csrs


def test_outcome_names_are_table_columns() -> None:
    columns = {event for row in TRANSITIONS.values() for event in row}
    assert {FragmentHeld, CertificateVerified, DeliveryFailed, TaskRefused, TaskRepeated} <= columns
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
