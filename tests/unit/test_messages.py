"""The ztp messages: validation, the versioned encoding, and the AirVantage channel mapping."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.airvantage import (
    CommandTask,
    DataPoint,
    DataShape,
    IncomingCommunication,
    InvalidValueError,
    encode_device_message,
    encode_envelope,
    encode_tasks,
    parse_device_message,
    parse_envelope,
    parse_tasks,
)
from shared.errors import LimitExceededError, MessageError, UsageError
from shared.fragments import Completed, Reassembler
from shared.messages import (
    DELIVER_COMMAND,
    MAX_CERTIFICATE_PEM_CHARS,
    MAX_DELIVERY_FRAGMENTS,
    MAX_PARAM_CHARS,
    MAX_REASON_CHARS,
    MAX_REQUEST_ID_CHARS,
    REQUEST_PATH,
    STATUS_PATH,
    CertificateDelivery,
    CertificateRequest,
    Message,
    Provisioned,
    Rejected,
    decode_delivery,
    decode_message,
    decode_request,
    decode_status,
    delivery_params,
    encode_message,
    fragments_from_params,
    request_data_points,
    request_fragments,
    sanitize_reason,
    status_data_point,
)

SERIAL = "LL542500111003"
CERT_ID = "a" * 64
ENDPOINT = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"


def _pems() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERIAL)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return (
        csr.public_bytes(serialization.Encoding.PEM).decode(),
        cert.public_bytes(serialization.Encoding.PEM).decode(),
    )


CSR_PEM, CERT_PEM = _pems()

REQUEST = CertificateRequest("req-0001", SERIAL, CSR_PEM)
DELIVERY = CertificateDelivery("req-0001", CERT_ID, ENDPOINT, CERT_PEM)
PROVISIONED = Provisioned("req-0001", CERT_ID)
REJECTED = Rejected("req-0001", "CSR key is RSA-1024; need RSA >= 2048 or EC P-256/384/521")


# -- encoding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [REQUEST, DELIVERY, PROVISIONED, REJECTED])
def test_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert data.isascii()
    assert decode_message(data) == msg
    assert decode_message(data.decode()) == msg


def test_encoding_is_exactly_as_documented() -> None:
    assert encode_message(PROVISIONED) == (
        b'{"v":1,"t":"prv","rid":"req-0001","cid":"' + CERT_ID.encode() + b'"}'
    )
    assert encode_message(Rejected("r1", "bad csr")) == (
        b'{"v":1,"t":"rej","rid":"r1","why":"bad csr"}'
    )
    assert list(json.loads(encode_message(REQUEST))) == ["v", "t", "rid", "sn", "csr"]
    assert list(json.loads(encode_message(DELIVERY))) == ["v", "t", "rid", "cid", "ep", "crt"]


def test_encode_refuses_a_non_message() -> None:
    with pytest.raises(UsageError):
        encode_message("hello")  # type: ignore[arg-type]


def _doc(msg: Message, **changes: object) -> bytes:
    doc = json.loads(encode_message(msg))
    for key, value in changes.items():
        if value is _DELETE:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


_DELETE = object()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        pytest.param(b"{", "payload", id="malformed-json"),
        pytest.param(b"\xc3\x28", "payload", id="not-utf8"),
        pytest.param(b"[]", "message", id="array"),
        pytest.param(b'"x"', "message", id="string"),
        pytest.param(_doc(PROVISIONED, v=_DELETE), "v", id="missing-version"),
        pytest.param(_doc(PROVISIONED, v=2), "v", id="future-version"),
        pytest.param(_doc(PROVISIONED, v=True), "v", id="bool-version"),
        pytest.param(_doc(PROVISIONED, v="1"), "v", id="string-version"),
        pytest.param(_doc(PROVISIONED, t=_DELETE), "t", id="missing-tag"),
        pytest.param(_doc(PROVISIONED, t="ack"), "t", id="unknown-tag"),
        pytest.param(_doc(PROVISIONED, t=1), "t", id="tag-not-string"),
        pytest.param(_doc(PROVISIONED, cid=_DELETE), "cid", id="missing-field"),
        pytest.param(_doc(PROVISIONED, extra="x"), "extra", id="unknown-field"),
        pytest.param(_doc(PROVISIONED, csr=CSR_PEM), "csr", id="field-of-another-type"),
        pytest.param(_doc(PROVISIONED, rid=7), "rid", id="id-not-string"),
        pytest.param(_doc(PROVISIONED, rid="a/b"), "rid", id="id-bad-alphabet"),
        pytest.param(_doc(PROVISIONED, rid=""), "rid", id="id-empty"),
        pytest.param(_doc(PROVISIONED, rid="r" * 65), "rid", id="id-too-long"),
        pytest.param(_doc(PROVISIONED, cid="A" * 64), "cid", id="cert-id-uppercase"),
        pytest.param(_doc(PROVISIONED, cid="a" * 63), "cid", id="cert-id-short"),
        pytest.param(_doc(REQUEST, sn="a/b"), "sn", id="serial-with-slash"),
        pytest.param(_doc(REQUEST, sn=None), "sn", id="serial-null"),
        pytest.param(_doc(REQUEST, csr=CERT_PEM), "csr", id="csr-is-a-certificate"),
        pytest.param(_doc(REQUEST, csr=CSR_PEM[:-30]), "csr", id="csr-truncated"),
        pytest.param(_doc(DELIVERY, crt=CSR_PEM), "crt", id="certificate-is-a-csr"),
        pytest.param(_doc(DELIVERY, crt="hello"), "crt", id="certificate-no-markers"),
        pytest.param(_doc(DELIVERY, ep="host:8883"), "ep", id="endpoint-with-port"),
        pytest.param(_doc(DELIVERY, ep="https://x.com"), "ep", id="endpoint-url"),
        pytest.param(_doc(DELIVERY, ep=""), "ep", id="endpoint-empty"),
        pytest.param(_doc(REJECTED, why=""), "why", id="reason-empty"),
        pytest.param(_doc(REJECTED, why='say "no"'), "why", id="reason-with-quote"),
        pytest.param(_doc(REJECTED, why="x" * 121), "why", id="reason-too-long"),
        pytest.param(_doc(REJECTED, why="line\nbreak"), "why", id="reason-control-char"),
    ],
)
def test_decode_refuses_bad_input(data: bytes, field: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode_message(data)
    assert caught.value.field == field


def test_decode_refuses_oversized_input() -> None:
    with pytest.raises(LimitExceededError) as caught:
        decode_message(b" " * (16 * 1024 + 1))
    assert caught.value.limit_name == "max_payload_bytes"
    with pytest.raises(LimitExceededError):
        decode_message(encode_message(DELIVERY), max_bytes=100)


def test_error_messages_never_carry_a_whole_pem() -> None:
    with pytest.raises(MessageError) as caught:
        decode_message(_doc(REQUEST, csr=CSR_PEM.replace("REQUEST", "THING")))
    assert len(str(caught.value)) < 200


# -- validation when built ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: CertificateRequest("", SERIAL, CSR_PEM), "request_id"),
        (
            lambda: CertificateRequest("r" * (MAX_REQUEST_ID_CHARS + 1), SERIAL, CSR_PEM),
            "request_id",
        ),
        (lambda: CertificateRequest("r.1", SERIAL, CSR_PEM), "request_id"),
        (lambda: CertificateRequest("r1", "a+b", CSR_PEM), "serial"),
        (lambda: CertificateRequest("r1", SERIAL, "x" * 5000), "csr_pem"),
        (lambda: CertificateRequest("r1", SERIAL, CSR_PEM + CSR_PEM), "csr_pem"),
        (lambda: CertificateRequest("r1", SERIAL, CSR_PEM.replace("MI", "M!", 1)), "csr_pem"),
        (lambda: CertificateDelivery("r1", "xyz", ENDPOINT, CERT_PEM), "certificate_id"),
        (lambda: CertificateDelivery("r1", CERT_ID, "-bad.example.com", CERT_PEM), "endpoint"),
        (lambda: CertificateDelivery("r1", CERT_ID, "a..b", CERT_PEM), "endpoint"),
        (lambda: CertificateDelivery("r1", CERT_ID, "a" * 64 + ".com", CERT_PEM), "endpoint"),
        (lambda: CertificateDelivery("r1", CERT_ID, ENDPOINT, "x"), "certificate_pem"),
        (
            lambda: CertificateDelivery(
                "r1", CERT_ID, ENDPOINT, CERT_PEM * (MAX_CERTIFICATE_PEM_CHARS // len(CERT_PEM) + 1)
            ),
            "certificate_pem",
        ),
        (lambda: Provisioned("r1", CERT_ID.upper()), "certificate_id"),
        (lambda: Rejected("r1", "x" * (MAX_REASON_CHARS + 1)), "reason"),
        (lambda: Rejected("r1", "back\\slash"), "reason"),
        (lambda: Rejected("r1", "é"), "reason"),
        (lambda: Rejected("r1", 5), "reason"),  # type: ignore[arg-type]
    ],
)
def test_messages_validate_when_built(build: Callable[[], object], field: str) -> None:
    with pytest.raises(InvalidValueError) as caught:
        build()
    assert caught.value.field == field
    assert isinstance(caught.value, UsageError)


@pytest.mark.parametrize(
    "endpoint", [ENDPOINT, "localhost", "127.0.0.1", "iot.sandbox", "A-1.b", "x" * 63]
)
def test_valid_endpoints(endpoint: str) -> None:
    assert CertificateDelivery("r1", CERT_ID, endpoint, CERT_PEM).endpoint == endpoint


def test_pem_variants_accepted() -> None:
    # CRLF line ends, no final newline, the legacy NEW CERTIFICATE REQUEST label, a chain.
    CertificateRequest("r1", SERIAL, CSR_PEM.replace("\n", "\r\n"))
    CertificateRequest("r1", SERIAL, CSR_PEM.rstrip("\n"))
    CertificateRequest(
        "r1", SERIAL, CSR_PEM.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
    )
    CertificateDelivery("r1", CERT_ID, ENDPOINT, CERT_PEM + CERT_PEM)


def test_mixed_csr_labels_refused() -> None:
    pem = CSR_PEM.replace("BEGIN CERTIFICATE REQUEST", "BEGIN NEW CERTIFICATE REQUEST")
    with pytest.raises(InvalidValueError):
        CertificateRequest("r1", SERIAL, pem)


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        REQUEST.serial = "other"  # type: ignore[misc]


# -- property: every valid message round-trips --------------------------------------------------

_ids = st.from_regex(rf"[A-Za-z0-9_-]{{1,{MAX_REQUEST_ID_CHARS}}}", fullmatch=True)
_serials = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
_cert_ids = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hosts = st.lists(_labels, min_size=1, max_size=5).map(".".join)
_reasons = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
    min_size=1,
    max_size=MAX_REASON_CHARS,
)


def _pem_strategy(label: str, max_lines: int) -> st.SearchStrategy[str]:
    line = st.from_regex(r"[A-Za-z0-9+/]{1,64}", fullmatch=True)
    return st.lists(line, min_size=1, max_size=max_lines).map(
        lambda lines: f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n"
    )


_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(CertificateRequest, _ids, _serials, _pem_strategy("CERTIFICATE REQUEST", 25)),
    st.builds(CertificateDelivery, _ids, _cert_ids, _hosts, _pem_strategy("CERTIFICATE", 30)),
    st.builds(Provisioned, _ids, _cert_ids),
    st.builds(Rejected, _ids, _reasons),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_messages)
def test_every_message_round_trips(msg: Message) -> None:
    assert decode_message(encode_message(msg)) == msg


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.builds(Provisioned, _ids, _cert_ids), st.builds(Rejected, _ids, _reasons)))
def test_every_status_report_fits_one_value(report: Provisioned | Rejected) -> None:
    point = status_data_point(report)
    assert isinstance(point.value, str)
    assert len(point.value) <= MAX_PARAM_CHARS
    assert decode_status(point.value) == report


def test_worst_case_status_reports_fit_one_value() -> None:
    longest_id = "r" * MAX_REQUEST_ID_CHARS
    for report in (
        Provisioned(longest_id, CERT_ID),
        Rejected(longest_id, "~" * MAX_REASON_CHARS),
        Rejected(longest_id, "<" * MAX_REASON_CHARS),  # json.dumps escapes nothing ASCII but '"\'
    ):
        assert len(status_data_point(report).value) <= MAX_PARAM_CHARS  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_sanitize_reason_always_yields_a_valid_reason(text: str) -> None:
    reason = sanitize_reason(text)
    assert Rejected("r1", reason).reason == reason


def test_sanitize_reason_examples() -> None:
    assert sanitize_reason("got 'x'") == "got 'x'"
    assert sanitize_reason('got "x"\n') == "got 'x'?"
    assert sanitize_reason("") == "unspecified"
    assert sanitize_reason("y" * 500) == "y" * (MAX_REASON_CHARS - 3) + "..."


# -- device → cloud: the request channel -------------------------------------------------------


def test_request_data_points_are_fragments_with_increasing_timestamps() -> None:
    points = request_data_points(REQUEST, transfer_id="t1", now_ms=1_700_000_000_000)
    assert len(points) > 1
    assert all(p.path == REQUEST_PATH for p in points)
    assert [p.timestamp_ms for p in points] == [1_700_000_000_000 + i for i in range(len(points))]
    assert all(isinstance(p.value, str) and len(p.value) <= 255 for p in points)
    assert all(isinstance(p.value, str) and p.value.isascii() for p in points)


def test_request_travels_device_to_cloud() -> None:
    points = request_data_points(REQUEST, transfer_id="t1", now_ms=1_700_000_000_000, seq=3)
    # The device publishes one array-shaped message ...
    payload = encode_device_message(points, shape=DataShape.ARRAY)
    # ... AirVantage forwards it through the connector (emulated with our own encoder) ...
    seen = parse_device_message(payload)
    record = encode_envelope(IncomingCommunication("sys1", SERIAL, "m1", 1_700_000_000_500, seen))
    event = parse_envelope(record)
    assert isinstance(event, IncomingCommunication)
    # ... and the cloud reassembles, in any order.
    fragments = list(request_fragments(event.points))
    random.Random(7).shuffle(fragments)
    reassembler = Reassembler()
    outcomes = [reassembler.receive(text, now=0.0, source=event.serial) for text in fragments]
    done = outcomes[-1]
    assert isinstance(done, Completed)
    assert decode_request(done.payload) == REQUEST


def test_request_fragments_ignores_other_paths_and_refuses_non_fragments() -> None:
    points = (DataPoint("ztp.other", 1), DataPoint(REQUEST_PATH, "Z1.x", 1))
    assert request_fragments(points) == ("Z1.x",)
    for bad in (5, True, "", "é", "x" * 256):
        with pytest.raises(MessageError) as caught:
            request_fragments((DataPoint(REQUEST_PATH, bad),))
        assert caught.value.field == REQUEST_PATH


def test_decode_request_refuses_other_messages() -> None:
    with pytest.raises(MessageError) as caught:
        decode_request(encode_message(DELIVERY))
    assert caught.value.field == "t"


# -- device → cloud: status reports ------------------------------------------------------------


@pytest.mark.parametrize("report", [PROVISIONED, REJECTED])
def test_status_point(report: Provisioned | Rejected) -> None:
    point = status_data_point(report, timestamp_ms=5)
    assert (point.path, point.timestamp_ms) == (STATUS_PATH, 5)
    assert decode_status(point.value) == report
    payload = encode_device_message([status_data_point(report)], shape=DataShape.PLAIN)
    (back,) = parse_device_message(payload)
    assert decode_status(back.value) == report


@pytest.mark.parametrize(
    ("value", "field"),
    [
        pytest.param(5, STATUS_PATH, id="number"),
        pytest.param("x" * 256, STATUS_PATH, id="too-long"),
        pytest.param("not json", "payload", id="not-json"),
        pytest.param('{"v":1,"t":"dlv"}', "rid", id="incomplete"),
        pytest.param(
            encode_message(Rejected("r", "x")).decode().replace('"rej"', '"req"'),
            "why",
            id="fields-of-another-type",
        ),
    ],
)
def test_decode_status_refuses_bad_values(value: object, field: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode_status(value)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_decode_status_refuses_a_request() -> None:
    small = CertificateRequest(
        "r", "s", "-----BEGIN CERTIFICATE REQUEST-----\nAA\n-----END CERTIFICATE REQUEST-----"
    )
    with pytest.raises(MessageError) as caught:
        decode_status(encode_message(small).decode())
    assert caught.value.field == "t"


def test_status_data_point_refuses_other_messages() -> None:
    with pytest.raises(UsageError):
        status_data_point(REQUEST)  # type: ignore[arg-type]


# -- cloud → device: the deliver command -------------------------------------------------------


@pytest.mark.parametrize("msg", [DELIVERY, REJECTED])
def test_delivery_travels_cloud_to_device(msg: CertificateDelivery | Rejected) -> None:
    params = delivery_params(msg, transfer_id="d1", seq=2)
    assert list(params) == [f"f{i:02d}" for i in range(1, len(params) + 1)]
    assert all(len(v) <= MAX_PARAM_CHARS and v.isascii() for v in params.values())
    # AirVantage turns the operation into a task; params may arrive in any key order.
    items = list(params.items())
    random.Random(3).shuffle(items)
    shuffled = dict(items)
    payload = encode_tasks([CommandTask("task-1", 1, DELIVER_COMMAND, shuffled)])
    (task,) = parse_tasks(payload)
    assert isinstance(task, CommandTask)
    assert task.command_id == DELIVER_COMMAND
    fragments = fragments_from_params(task.params)
    assert fragments == tuple(params.values())
    reassembler = Reassembler()
    outcomes = [reassembler.receive(text, now=0.0) for text in fragments]
    done = outcomes[-1]
    assert isinstance(done, Completed)
    assert decode_delivery(done.payload) == msg


def test_certificate_takes_few_fragments() -> None:
    assert len(delivery_params(DELIVERY, transfer_id="d1")) <= 8


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({}, "params", id="empty"),
        pytest.param({"f00": "Z1.x"}, "params", id="f00"),
        pytest.param({"f1": "Z1.x"}, "params", id="one-digit"),
        pytest.param({"f100": "Z1.x"}, "params", id="three-digits"),
        pytest.param({"F01": "Z1.x"}, "params", id="uppercase"),
        pytest.param({"f01": "Z1.x", "endpoint": "h"}, "params", id="foreign-key"),
        pytest.param({"f01": 5}, "params.f01", id="number-value"),
        pytest.param({"f01": ""}, "params.f01", id="empty-value"),
        pytest.param({"f01": "x" * 256}, "params.f01", id="too-long"),
        pytest.param({"f01": "Z1.é"}, "params.f01", id="non-ascii"),
        pytest.param({"f01": "a\tb"}, "params.f01", id="control-char"),
    ],
)
def test_fragments_from_params_refuses_non_fragments(params: dict[str, object], field: str) -> None:
    with pytest.raises(MessageError) as caught:
        fragments_from_params(params)
    assert caught.value.field == field


def test_fragments_from_params_orders_by_number_and_tolerates_gaps() -> None:
    assert fragments_from_params({"f10": "c", "f02": "b", "f01": "a"}) == ("a", "b", "c")


def test_decode_delivery_refuses_other_messages() -> None:
    with pytest.raises(MessageError) as caught:
        decode_delivery(encode_message(PROVISIONED))
    assert caught.value.field == "t"


def test_delivery_params_refuses_too_many_fragments_and_wrong_types() -> None:
    # The smallest fragments cut the largest certificate into more than f01..f99 can name.
    pem = CERT_PEM * (MAX_CERTIFICATE_PEM_CHARS // len(CERT_PEM))
    big = CertificateDelivery("r1", CERT_ID, ENDPOINT, pem)
    with pytest.raises(UsageError, match=str(MAX_DELIVERY_FRAGMENTS)):
        delivery_params(big, transfer_id="d1", max_chars=96)
    with pytest.raises(UsageError):
        delivery_params(REQUEST, transfer_id="d1")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        delivery_params(DELIVERY, transfer_id="not valid!")
