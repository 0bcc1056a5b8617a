"""Intake: connector records in, actions out (pure; no I/O)."""

from __future__ import annotations

import itertools
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.intake import (
    Confirm,
    DeviceRejected,
    Ignored,
    IgnoreReason,
    Intake,
    Issue,
    OperationChanged,
    Refuse,
)
from cloud_daemon.validation import RefusalReason
from shared.airvantage import (
    DataPoint,
    IncomingCommunication,
    OperationStateChange,
    OtherEvent,
    encode_envelope,
)
from shared.errors import UsageError
from shared.fragments import split
from shared.messages import (
    REQUEST_PATH,
    CertificateRequest,
    Provisioned,
    Rejected,
    encode_message,
    request_data_points,
    status_data_point,
)

SERIAL = "SN0001"
SYSTEM = "sys0001"
CERT_ID = "ab" * 32
_ids = itertools.count()


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str = SERIAL) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def record(
    points: tuple[DataPoint, ...],
    *,
    serial: str = SERIAL,
    message_id: str | None = None,
    fresh_id: bool = True,
) -> bytes:
    if message_id is None and fresh_id:
        message_id = f"m{next(_ids)}"
    return encode_envelope(
        IncomingCommunication(SYSTEM, serial, message_id, 1_700_000_000_000, points)
    )


def request_points(
    pem: str, *, request_id: str = "req-1", serial: str = SERIAL, transfer_id: str | None = None
) -> tuple[DataPoint, ...]:
    request = CertificateRequest(request_id, serial, pem)
    return request_data_points(
        request, transfer_id=transfer_id or request_id, now_ms=1_700_000_000_000
    )


def only(actions: tuple[object, ...]) -> object:
    assert len(actions) == 1, actions
    return actions[0]


def test_a_complete_request_is_issued(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    pem = csr_pem(key)
    action = only(intake.receive(record(request_points(pem), message_id="m-a"), now=0.0))
    assert isinstance(action, Issue)
    assert (action.system_uid, action.serial, action.request_id) == (SYSTEM, SERIAL, "req-1")
    assert action.csr.csr_pem == pem
    assert action.message_id == "m-a"


def test_fragments_across_records_and_out_of_order(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    points = request_points(csr_pem(key))
    assert len(points) >= 2
    actions = [intake.receive(record((p,)), now=float(i)) for i, p in enumerate(reversed(points))]
    assert all(a == () for a in actions[:-1])
    assert isinstance(only(actions[-1]), Issue)


def test_redelivered_record_is_a_duplicate(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    data = record(request_points(csr_pem(key)), message_id="m-dup")
    assert isinstance(only(intake.receive(data, now=0.0)), Issue)
    action = only(intake.receive(data, now=1.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.DUPLICATE


def test_forget_lets_a_failed_record_be_processed_again(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    data = record(request_points(csr_pem(key)), message_id="m-retry")
    assert isinstance(only(intake.receive(data, now=0.0)), Issue)
    intake.forget("m-retry")
    intake.forget(None)
    again = only(intake.receive(data, now=1.0))
    assert isinstance(again, Issue)
    assert again.request_id == "req-1"


def test_a_resent_request_in_a_new_message_is_issued_again(key: ec.EllipticCurvePrivateKey) -> None:
    # The device repeats its request because no answer came: the ledger turns this into a
    # re-send of the stored certificate, so intake must pass it on, once per record.
    intake = Intake()
    points = request_points(csr_pem(key))
    assert isinstance(only(intake.receive(record(points), now=0.0)), Issue)
    assert isinstance(only(intake.receive(record(points), now=1.0)), Issue)


def test_request_serial_must_be_the_authenticated_one(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    points = request_points(csr_pem(key, "SN0002"), serial="SN0002")
    action = only(intake.receive(record(points, serial=SERIAL), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.CN_MISMATCH
    assert action.serial == SERIAL


def test_csr_for_another_device_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    action = only(intake.receive(record(request_points(csr_pem(key, "SN0002"))), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.CN_MISMATCH
    assert action.request_id == "req-1"
    assert Rejected(action.request_id, action.refusal.reason)  # fits the wire message


def test_weak_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - under test
    action = only(Intake().receive(record(request_points(csr_pem(weak))), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.WEAK_KEY


def test_100_kb_request_is_refused_once_as_too_large() -> None:
    payload = json.dumps(
        {"v": 1, "t": "req", "rid": "big-1", "sn": SERIAL, "csr": "A" * 100_000}
    ).encode()
    texts = split(payload, transfer_id="big-1")
    points = tuple(DataPoint(REQUEST_PATH, t, 1_700_000_000_000 + i) for i, t in enumerate(texts))
    intake = Intake()
    action = only(intake.receive(record(points), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.TOO_LARGE
    assert action.request_id == "big-1"
    assert intake.receive(record(points[:3]), now=1.0) == ()  # refused once per transfer


def test_csr_over_the_message_bound_is_too_large() -> None:
    payload = json.dumps(
        {"v": 1, "t": "req", "rid": "big-2", "sn": SERIAL, "csr": "A" * 5000}
    ).encode()
    texts = split(payload, transfer_id="big-2")
    points = tuple(DataPoint(REQUEST_PATH, t, 1_700_000_000_000 + i) for i, t in enumerate(texts))
    action = only(Intake().receive(record(points), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.TOO_LARGE


def test_garbage_csr_in_a_well_formed_request_is_unparseable() -> None:
    garbage = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    action = only(Intake().receive(record(request_points(garbage)), now=0.0))
    assert isinstance(action, Refuse)
    assert action.refusal.reason_code is RefusalReason.UNPARSEABLE


def test_garbage_request_payload_is_ignored_as_malformed() -> None:
    texts = split(b"not json at all", transfer_id="junk")
    points = tuple(DataPoint(REQUEST_PATH, t, 1_700_000_000_000 + i) for i, t in enumerate(texts))
    action = only(Intake().receive(record(points), now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.MALFORMED


def test_garbage_fragment_is_ignored_as_malformed() -> None:
    action = only(Intake().receive(record((DataPoint(REQUEST_PATH, "hello"),)), now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.MALFORMED


def test_provisioned_status_confirms() -> None:
    point = status_data_point(Provisioned("req-1", CERT_ID))
    action = only(Intake().receive(record((point,)), now=0.0))
    assert action == Confirm(SYSTEM, SERIAL, "req-1", CERT_ID)


def test_rejected_status_is_reported() -> None:
    point = status_data_point(Rejected("req-1", "key mismatch"))
    action = only(Intake().receive(record((point,)), now=0.0))
    assert action == DeviceRejected(SYSTEM, SERIAL, "req-1", "key mismatch")


def test_bad_status_is_malformed() -> None:
    action = only(Intake().receive(record((DataPoint("ztp.status", "{}"),)), now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.MALFORMED


def test_other_data_is_not_ours() -> None:
    action = only(Intake().receive(record((DataPoint("temp.celsius", 21),)), now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.NOT_OURS


@pytest.mark.parametrize(
    "data",
    [
        b"not json at all",
        b'{"name": "event.system.incoming.communication", "content": {"temp.celsius": 21}',
        '{"name": "event.alert", "date": 5}',
        b"\xff\xfe" * 1000,
    ],
)
def test_a_record_naming_nothing_of_ours_is_skipped_undecoded(data: bytes | str) -> None:
    # Malformed or not: nothing in it could be a request, a status or an operation event.
    action = only(Intake().receive(data, now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.NOT_OURS


def test_a_record_naming_ours_is_still_decoded() -> None:
    for text in ("ztp.request", "ztp.status", "event.operation.state.change"):
        data = b'{"broken": "' + text.encode()
        action = only(Intake().receive(data, now=0.0))
        assert isinstance(action, Ignored)
        assert action.reason is IgnoreReason.MALFORMED, text


def test_operation_events_are_passed_on() -> None:
    data = encode_envelope(OperationStateChange("op-1", "FINISHED", {"SUCCESS": 1}, 5))
    assert only(Intake().receive(data, now=0.0)) == OperationChanged(
        "op-1", "FINISHED", (("SUCCESS", 1),)
    )


def test_other_events_are_not_ours() -> None:
    action = only(Intake().receive(encode_envelope(OtherEvent("event.alert", 5)), now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.NOT_OURS


def test_a_serial_unsafe_as_a_thing_name_is_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    data = encode_envelope(
        IncomingCommunication(SYSTEM, "SN/01", "m-x", 5, request_points(csr_pem(key)))
    )
    action = only(Intake().receive(data, now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.MALFORMED


def test_superseded_transfer_is_stale(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake()
    pem = csr_pem(key)
    old = request_data_points(
        CertificateRequest("req-old", SERIAL, pem), transfer_id="old", now_ms=1, seq=1
    )
    new = request_data_points(
        CertificateRequest("req-new", SERIAL, pem), transfer_id="new", now_ms=1, seq=2
    )
    assert intake.receive(record(new[:1]), now=0.0) == ()
    action = only(intake.receive(record(old[:1]), now=1.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.STALE


def test_request_and_status_in_one_record(key: ec.EllipticCurvePrivateKey) -> None:
    points = (*request_points(csr_pem(key)), status_data_point(Provisioned("req-0", CERT_ID)))
    actions = Intake().receive(record(points), now=0.0)
    assert [type(a) for a in actions] == [Issue, Confirm]


def test_seen_memory_is_bounded(key: ec.EllipticCurvePrivateKey) -> None:
    intake = Intake(seen_capacity=2)
    point = status_data_point(Provisioned("req-1", CERT_ID))
    first = record((point,), message_id="a")
    intake.receive(first, now=0.0)
    intake.receive(record((point,), message_id="b"), now=0.0)
    intake.receive(record((point,), message_id="c"), now=0.0)
    assert isinstance(only(intake.receive(first, now=0.0)), Confirm)  # "a" was forgotten


@pytest.mark.parametrize("bad", [0, -1, True])
def test_seen_capacity_validates(bad: int) -> None:
    with pytest.raises(UsageError):
        Intake(seen_capacity=bad)


def test_now_must_be_finite() -> None:
    with pytest.raises(UsageError):
        Intake().receive(b"{}", now=float("nan"))


def test_secret_free_details() -> None:
    action = only(Intake().receive(b'{"name": 1, "password": "hunter2"}', now=0.0))
    assert isinstance(action, Ignored)
    assert "hunter2" not in action.detail


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400))
def test_any_record_yields_actions_without_raising(data: bytes | str) -> None:
    actions = Intake().receive(data, now=0.0)
    assert actions
    for action in actions:
        if isinstance(action, Ignored):
            assert action.detail.isascii()


def test_encoded_message_roundtrip_sanity() -> None:
    # The test helper above builds requests exactly as the device does.
    assert encode_message(Provisioned("r", CERT_ID)).startswith(b'{"v":1')


def test_record_over_the_bound_is_malformed(key: ec.EllipticCurvePrivateKey) -> None:
    data = record(request_points(csr_pem(key)))
    action = only(Intake(max_record_bytes=len(data) - 1).receive(data, now=0.0))
    assert isinstance(action, Ignored)
    assert action.reason is IgnoreReason.MALFORMED
