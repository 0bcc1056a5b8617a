"""The typed messages the two daemons exchange through AirVantage, and their channel mapping.

Theory of operation
-------------------
Four messages make up the provisioning conversation (all pure, frozen, slotted dataclasses that
validate when built, so a value that exists is a value that can be sent):

==========================  ================  ===============================================
message                     direction         meaning
==========================  ================  ===============================================
:class:`CertificateRequest`  device → cloud    "sign this CSR for gateway ``serial``"
:class:`CertificateDelivery` cloud → device    "here is your certificate and IoT endpoint"
:class:`Provisioned`         device → cloud    "the certificate verified and is installed"
:class:`Rejected`            either way        cloud: CSR refused; device: verification failed
==========================  ================  ===============================================

Encoding (:func:`encode_message` / :func:`decode_message`): compact JSON, ASCII only, one object
with a format version ``"v": 1``, a type tag ``"t"`` and short field keys, in a fixed order::

    {"v":1,"t":"req","rid":<request_id>,"sn":<serial>,"csr":<csr_pem>}
    {"v":1,"t":"dlv","rid":<request_id>,"cid":<certificate_id>,"ep":<endpoint>,"crt":<pem>}
    {"v":1,"t":"prv","rid":<request_id>,"cid":<certificate_id>}
    {"v":1,"t":"rej","rid":<request_id>,"why":<reason>}

The decoder is strict: another version, another tag, a missing field, an unknown field or a
field that fails validation raises :class:`~shared.errors.MessageError` naming the wire key. A
new field means a new version.

Channels (AirVantage carries strings of at most 255 characters):

- device → cloud, data path :data:`REQUEST_PATH` on ``{serial}/messages/json``: the encoded
  request is cut by :func:`shared.fragments.split`; one MQTT message in the array shape carries
  every fragment as a value of the path, with timestamps ``now_ms, now_ms + 1, ...``
  (:func:`request_data_points`). The cloud feeds :func:`request_fragments` to a
  :class:`~shared.fragments.Reassembler` and decodes the payload with :func:`decode_request`.
- device → cloud, data path :data:`STATUS_PATH`: a :class:`Provisioned` or :class:`Rejected`,
  unfragmented (its encoding never exceeds 255 characters, by the limits on its fields)
  (:func:`status_data_point` / :func:`decode_status`).
- cloud → device, command :data:`DELIVER_COMMAND`: the fragments of an encoded
  :class:`CertificateDelivery` or :class:`Rejected` as parameters ``f01``, ``f02``, ...
  (:func:`delivery_params`); the device turns them back into fragment texts with
  :func:`fragments_from_params`, reassembles, and decodes with :func:`decode_delivery`.

``docs/messages.md`` is the normative description.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, TypeAlias

from shared.airvantage import (
    DataPoint,
    InvalidValueError,
    Scalar,
    decode_json,
    validate_serial,
)
from shared.errors import MessageError, UsageError
from shared.fragments import MAX_FRAGMENT_CHARS, split

__all__ = [
    "DELIVER_COMMAND",
    "FORMAT_VERSION",
    "MAX_CERTIFICATE_PEM_CHARS",
    "MAX_CSR_PEM_CHARS",
    "MAX_DELIVERY_FRAGMENTS",
    "MAX_MESSAGE_BYTES",
    "MAX_PARAM_CHARS",
    "MAX_REASON_CHARS",
    "MAX_REQUEST_ID_CHARS",
    "RENEW_COMMAND",
    "REQUEST_PATH",
    "STATUS_PATH",
    "CertificateDelivery",
    "CertificateRequest",
    "DeliveryMessage",
    "Message",
    "Provisioned",
    "Rejected",
    "StatusReport",
    "decode_delivery",
    "decode_message",
    "decode_request",
    "decode_status",
    "delivery_params",
    "encode_message",
    "fragments_from_params",
    "request_data_points",
    "request_fragments",
    "sanitize_reason",
    "status_data_point",
]

FORMAT_VERSION: Final = 1
REQUEST_PATH: Final = "ztp.request"
STATUS_PATH: Final = "ztp.status"
DELIVER_COMMAND: Final = "ztp.deliver"
RENEW_COMMAND: Final = "ztp.renew"
"""The operator's command asking a provisioned gateway to renew its certificate now (no
parameters): a new key and CSR, sent as a new :class:`CertificateRequest`."""

MAX_PARAM_CHARS: Final = 255
"""Largest string value or command parameter AirVantage is sure to carry."""
MAX_REQUEST_ID_CHARS: Final = 64
MAX_REASON_CHARS: Final = 120
MAX_CSR_PEM_CHARS: Final = 4096
"""A CSR of an RSA-4096 key is ~1.7 KB of PEM; EC keys far less."""
MAX_CERTIFICATE_PEM_CHARS: Final = 6144
"""An AWS IoT certificate is ~1.2 KB of PEM; room for a short chain, and still under the
reassembler's default 8 KiB payload bound once encoded."""
MAX_MESSAGE_BYTES: Final = 16 * 1024
MAX_DELIVERY_FRAGMENTS: Final = 99
"""Parameters ``f01`` to ``f99``: two digits, so the keys sort as they are numbered."""

_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
_CERTIFICATE_ID_RE: Final = re.compile(r"[0-9a-f]{64}")
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Printable ASCII without '"' and '\\', which JSON would escape to two characters: a reason of
# MAX_REASON_CHARS then always fits, encoded, in one 255-character status value.
_REASON_RE: Final = re.compile(rf"[\x20\x21\x23-\x5b\x5d-\x7e]{{1,{MAX_REASON_CHARS}}}")
_PEM_BODY: Final = r"\r?\n(?:[A-Za-z0-9+/=]+\r?\n)+"
_CSR_PEM_RE: Final = re.compile(
    rf"-----BEGIN ((?:NEW )?)CERTIFICATE REQUEST-----{_PEM_BODY}"
    r"-----END \1CERTIFICATE REQUEST-----(?:\r?\n)?"
)
_CERT_BLOCK: Final = rf"-----BEGIN CERTIFICATE-----{_PEM_BODY}-----END CERTIFICATE-----"
_CERTIFICATE_PEM_RE: Final = re.compile(rf"{_CERT_BLOCK}(?:\r?\n{_CERT_BLOCK})*(?:\r?\n)?")
_PARAM_KEY_RE: Final = re.compile(r"f(0[1-9]|[1-9][0-9])")
_FRAGMENT_TEXT_RE: Final = re.compile(rf"[\x20-\x7e]{{1,{MAX_FRAGMENT_CHARS}}}")


# -- field checks (raise InvalidValueError: the caller built a bad message) ---------------------


def _check_type(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(name, "a string", type(value).__name__)
    return value


def _check_id(name: str, value: object) -> str:
    text = _check_type(name, value)
    if len(text) > MAX_REQUEST_ID_CHARS or not _ID_RE.fullmatch(text):
        raise InvalidValueError(
            name, f"1 to {MAX_REQUEST_ID_CHARS} characters of A-Z a-z 0-9 _ -", text
        )
    return text


def _check_certificate_id(name: str, value: object) -> str:
    text = _check_type(name, value)
    if not _CERTIFICATE_ID_RE.fullmatch(text):
        raise InvalidValueError(name, "an AWS IoT certificate id: 64 lowercase hex digits", text)
    return text


def _check_endpoint(name: str, value: object) -> str:
    text = _check_type(name, value)
    if not 0 < len(text) <= 253 or not all(_LABEL_RE.fullmatch(x) for x in text.split(".")):
        raise InvalidValueError(name, "a host name (labels of A-Z a-z 0-9 -, dot-separated)", text)
    return text


def _check_pem(name: str, value: object, pattern: re.Pattern[str], max_chars: int) -> str:
    text = _check_type(name, value)
    if len(text) > max_chars:
        raise InvalidValueError(name, f"at most {max_chars} characters of PEM", len(text))
    if not pattern.fullmatch(text):
        label = "CERTIFICATE REQUEST" if pattern is _CSR_PEM_RE else "CERTIFICATE"
        raise InvalidValueError(name, f"PEM between BEGIN/END {label} markers", text)
    return text


def _check_reason(name: str, value: object) -> str:
    text = _check_type(name, value)
    if not _REASON_RE.fullmatch(text):
        raise InvalidValueError(
            name, f"1 to {MAX_REASON_CHARS} printable ASCII characters, no '\"' or '\\\\'", text
        )
    return text


def sanitize_reason(text: str) -> str:
    """Turn any text (an exception message, say) into a valid :attr:`Rejected.reason`.

    Double quotes become single quotes, other characters outside printable ASCII (and
    backslashes) become ``?``, and text longer than :data:`MAX_REASON_CHARS` is cut with
    ``...``. Empty text becomes ``"unspecified"``.

    Args:
        text: the text to clean.

    Returns:
        A reason that :class:`Rejected` accepts.
    """
    cleaned = "".join(
        "'" if char == '"' else char if _REASON_RE.fullmatch(char) else "?" for char in text
    )
    if len(cleaned) > MAX_REASON_CHARS:
        cleaned = f"{cleaned[: MAX_REASON_CHARS - 3]}..."
    return cleaned or "unspecified"


# -- the messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """Device → cloud: sign this CSR for this gateway.

    Attributes:
        request_id: the device's id for this request, 1 to 64 characters of ``A-Z a-z 0-9 _ -``;
            every answer repeats it.
        serial: the gateway serial (see :func:`shared.airvantage.validate_serial`).
        csr_pem: one PEM ``CERTIFICATE REQUEST`` block, at most :data:`MAX_CSR_PEM_CHARS`.
            Only its armour is checked here; the cloud parses and vets the CSR itself.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    request_id: str
    serial: str
    csr_pem: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        if not isinstance(self.serial, str):
            raise InvalidValueError("serial", "a string", type(self.serial).__name__)
        validate_serial(self.serial)
        _check_pem("csr_pem", self.csr_pem, _CSR_PEM_RE, MAX_CSR_PEM_CHARS)


@dataclass(frozen=True, slots=True)
class CertificateDelivery:
    """Cloud → device: the certificate AWS IoT issued for a request, and where to connect.

    Attributes:
        request_id: the request answered.
        certificate_id: AWS IoT's certificate id (64 lowercase hex digits).
        endpoint: the IoT Core data endpoint host name (``iot:Data-ATS``), without a port.
        certificate_pem: one or more PEM ``CERTIFICATE`` blocks, at most
            :data:`MAX_CERTIFICATE_PEM_CHARS`.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    request_id: str
    certificate_id: str
    endpoint: str
    certificate_pem: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_certificate_id("certificate_id", self.certificate_id)
        _check_endpoint("endpoint", self.endpoint)
        _check_pem(
            "certificate_pem", self.certificate_pem, _CERTIFICATE_PEM_RE, MAX_CERTIFICATE_PEM_CHARS
        )


@dataclass(frozen=True, slots=True)
class Provisioned:
    """Device → cloud: the delivered certificate verified against the key and is installed.

    Attributes:
        request_id: the request completed.
        certificate_id: the certificate now in use.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    request_id: str
    certificate_id: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_certificate_id("certificate_id", self.certificate_id)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refusal: from the cloud, the CSR was refused; from the device, verification failed.

    Attributes:
        request_id: the request refused.
        reason: 1 to :data:`MAX_REASON_CHARS` printable ASCII characters without ``"`` or
            ``\\`` (use :func:`sanitize_reason` on free text). Never a secret.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    request_id: str
    reason: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_reason("reason", self.reason)


Message: TypeAlias = CertificateRequest | CertificateDelivery | Provisioned | Rejected
StatusReport: TypeAlias = Provisioned | Rejected
DeliveryMessage: TypeAlias = CertificateDelivery | Rejected

# Wire layout per type: (tag, ((wire key, attribute), ...)), in encoding order.
_LAYOUT: Final[dict[type[Message], tuple[str, tuple[tuple[str, str], ...]]]] = {
    CertificateRequest: ("req", (("rid", "request_id"), ("sn", "serial"), ("csr", "csr_pem"))),
    CertificateDelivery: (
        "dlv",
        (
            ("rid", "request_id"),
            ("cid", "certificate_id"),
            ("ep", "endpoint"),
            ("crt", "certificate_pem"),
        ),
    ),
    Provisioned: ("prv", (("rid", "request_id"), ("cid", "certificate_id"))),
    Rejected: ("rej", (("rid", "request_id"), ("why", "reason"))),
}
_BY_TAG: Final = {tag: (kind, fields) for kind, (tag, fields) in _LAYOUT.items()}


def encode_message(msg: Message) -> bytes:
    """Encode a message: compact ASCII JSON with version, type tag and short keys.

    Args:
        msg: the message (already valid: it was validated when built).

    Returns:
        The encoding, e.g. ``{"v":1,"t":"prv","rid":"r1","cid":"..."}``.

    Raises:
        UsageError: ``msg`` is not one of the four message types.
    """
    layout = _LAYOUT.get(type(msg))
    if layout is None:
        raise UsageError(f"not a ztp message: {type(msg).__name__}")
    tag, fields = layout
    doc: dict[str, object] = {"v": FORMAT_VERSION, "t": tag}
    for key, attribute in fields:
        doc[key] = getattr(msg, attribute)
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@contextmanager
def _peer_fault(wire_keys: Mapping[str, str], prefix: str = "") -> Iterator[None]:
    """Re-raise a validation failure of received data as a MessageError naming the wire key."""
    try:
        yield
    except InvalidValueError as exc:
        key = wire_keys.get(exc.field, exc.field)
        raise MessageError(f"{prefix}{key}", exc.expected, exc.value) from exc


def decode_message(data: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode a message encoded by :func:`encode_message`.

    Args:
        data: the encoding (a reassembled payload, or a status value).
        max_bytes: the largest encoding accepted.

    Returns:
        The message, validated.

    Raises:
        LimitExceededError: ``data`` is larger than ``max_bytes``.
        MessageError: not JSON, not an object, another version or type tag, a missing or
            unknown field, or a field that fails validation; ``field`` is the wire key.
    """
    doc = decode_json(data, max_bytes=max_bytes, error=MessageError)
    if not isinstance(doc, dict):
        raise MessageError("message", "a JSON object", type(doc).__name__)
    version = doc.get("v")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise MessageError("v", f"format version {FORMAT_VERSION}", version)
    tag = doc.get("t")
    if not isinstance(tag, str) or tag not in _BY_TAG:
        raise MessageError("t", f"one of {', '.join(sorted(_BY_TAG))}", tag)
    kind, fields = _BY_TAG[tag]
    known = {"v", "t"} | {key for key, _ in fields}
    for key in doc:
        if key not in known:
            raise MessageError(key, f"no such field in a version {FORMAT_VERSION} {tag!r}", key)
    values: dict[str, str] = {}
    for key, attribute in fields:
        if key not in doc:
            raise MessageError(key, f"the {attribute} of a {tag!r}", "nothing")
        value = doc[key]
        if not isinstance(value, str):
            raise MessageError(key, "a string", value)
        values[attribute] = value
    with _peer_fault({attribute: key for key, attribute in fields}):
        return kind(**values)


def _unexpected(msg: Message, *kinds: type[Message]) -> MessageError:
    expected = " or ".join(repr(_LAYOUT[kind][0]) for kind in kinds)
    return MessageError("t", expected, _LAYOUT[type(msg)][0])


def decode_request(data: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> CertificateRequest:
    """Decode a reassembled :data:`REQUEST_PATH` payload (cloud side).

    Raises:
        LimitExceededError: ``data`` is larger than ``max_bytes``.
        MessageError: as :func:`decode_message`, or the message is not a request.
    """
    msg = decode_message(data, max_bytes=max_bytes)
    if isinstance(msg, CertificateRequest):
        return msg
    raise _unexpected(msg, CertificateRequest)


def decode_delivery(data: bytes | str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> DeliveryMessage:
    """Decode a reassembled :data:`DELIVER_COMMAND` payload (device side).

    Raises:
        LimitExceededError: ``data`` is larger than ``max_bytes``.
        MessageError: as :func:`decode_message`, or the message is neither a delivery nor a
            rejection.
    """
    msg = decode_message(data, max_bytes=max_bytes)
    if isinstance(msg, CertificateDelivery | Rejected):
        return msg
    raise _unexpected(msg, CertificateDelivery, Rejected)


# -- channels ----------------------------------------------------------------------------------


def request_data_points(
    req: CertificateRequest,
    *,
    transfer_id: str,
    now_ms: int,
    seq: int = 0,
    max_chars: int = MAX_FRAGMENT_CHARS,
) -> tuple[DataPoint, ...]:
    """Cut a request into :data:`REQUEST_PATH` data points, for one array-shaped message.

    Publish the result with ``encode_device_message(points, shape=DataShape.ARRAY)``.

    Args:
        req: the request.
        transfer_id: the fragment transfer id (see :func:`shared.fragments.split`).
        now_ms: the timestamp of the first fragment; the n-th gets ``now_ms + n``, so
            AirVantage keeps every value of the path.
        seq: the fragment sequence number (a higher one supersedes earlier transfers).
        max_chars: the largest fragment.

    Returns:
        One point per fragment, in index order.

    Raises:
        UsageError: a bad ``transfer_id``, ``seq``, ``max_chars`` or ``now_ms``.
    """
    fragments = split(encode_message(req), transfer_id=transfer_id, max_chars=max_chars, seq=seq)
    return tuple(
        DataPoint(REQUEST_PATH, fragment, now_ms + index)
        for index, fragment in enumerate(fragments)
    )


def _check_fragment_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not _FRAGMENT_TEXT_RE.fullmatch(value):
        raise MessageError(
            name, f"fragment text: 1 to {MAX_FRAGMENT_CHARS} printable ASCII characters", value
        )
    return value


def request_fragments(points: Iterable[DataPoint]) -> tuple[str, ...]:
    """Pick the request fragments out of a device message's points (cloud side).

    Feed each to ``Reassembler.receive(text, now=..., source=serial)``; decode a completed
    payload with :func:`decode_request`.

    Args:
        points: the points of one incoming communication (other paths are ignored).

    Returns:
        The :data:`REQUEST_PATH` values, in the order given.

    Raises:
        MessageError: a :data:`REQUEST_PATH` value is not fragment text.
    """
    return tuple(
        _check_fragment_text(REQUEST_PATH, point.value)
        for point in points
        if point.path == REQUEST_PATH
    )


def status_data_point(report: StatusReport, *, timestamp_ms: int | None = None) -> DataPoint:
    """Encode a status report as one unfragmented :data:`STATUS_PATH` data point.

    Args:
        report: a :class:`Provisioned` or :class:`Rejected`.
        timestamp_ms: when it happened, or ``None`` to let the server stamp it.

    Returns:
        The data point; its value is at most 255 characters.

    Raises:
        UsageError: ``report`` is not a status report.
    """
    if not isinstance(report, Provisioned | Rejected):
        raise UsageError(f"not a status report: {type(report).__name__}")
    return DataPoint(STATUS_PATH, encode_message(report).decode("ascii"), timestamp_ms)


def decode_status(value: Scalar) -> StatusReport:
    """Decode the value of a :data:`STATUS_PATH` data point (cloud side).

    Args:
        value: the data point's value.

    Returns:
        The :class:`Provisioned` or :class:`Rejected` report.

    Raises:
        MessageError: the value is not a string of at most 255 characters, or does not decode
            to a status report.
    """
    if not isinstance(value, str) or len(value) > MAX_PARAM_CHARS:
        raise MessageError(STATUS_PATH, f"a string of at most {MAX_PARAM_CHARS} characters", value)
    msg = decode_message(value, max_bytes=4 * MAX_PARAM_CHARS)
    if isinstance(msg, Provisioned | Rejected):
        return msg
    raise _unexpected(msg, Provisioned, Rejected)


def delivery_params(
    msg: DeliveryMessage,
    *,
    transfer_id: str,
    seq: int = 0,
    max_chars: int = MAX_FRAGMENT_CHARS,
) -> dict[str, str]:
    """Cut a delivery or rejection into :data:`DELIVER_COMMAND` parameters (cloud side).

    Args:
        msg: a :class:`CertificateDelivery` or :class:`Rejected`.
        transfer_id: the fragment transfer id (see :func:`shared.fragments.split`).
        seq: the fragment sequence number.
        max_chars: the largest fragment.

    Returns:
        ``{"f01": fragment0, "f02": fragment1, ...}``, in order.

    Raises:
        UsageError: ``msg`` is not a delivery or rejection, a bad fragment argument, or more
            than :data:`MAX_DELIVERY_FRAGMENTS` fragments.
    """
    if not isinstance(msg, CertificateDelivery | Rejected):
        raise UsageError(f"not a delivery message: {type(msg).__name__}")
    fragments = split(encode_message(msg), transfer_id=transfer_id, max_chars=max_chars, seq=seq)
    if len(fragments) > MAX_DELIVERY_FRAGMENTS:
        raise UsageError(
            f"delivery needs {len(fragments)} fragments, more than {MAX_DELIVERY_FRAGMENTS}"
        )
    return {f"f{index:02d}": fragment for index, fragment in enumerate(fragments, start=1)}


def fragments_from_params(params: Mapping[str, object]) -> tuple[str, ...]:
    """Turn :data:`DELIVER_COMMAND` parameters back into fragment texts (device side).

    Completeness is the reassembler's business (each fragment carries its index and count), so
    gaps in the numbering are not refused here.

    Args:
        params: the command task's parameters.

    Returns:
        The fragment texts, ordered by parameter number.

    Raises:
        MessageError: no parameters, a key other than ``f01``..``f99`` (``field`` is
            ``params``), or a value that is not fragment text (``field`` is ``params.<key>``).
    """
    if not params:
        raise MessageError("params", "fragment parameters f01, f02, ...", "none")
    numbered: list[tuple[int, str]] = []
    for key, value in params.items():
        match = _PARAM_KEY_RE.fullmatch(key) if isinstance(key, str) else None
        if match is None:
            raise MessageError("params", "only fragment keys f01..f99", key)
        numbered.append((int(match.group(1)), _check_fragment_text(f"params.{key}", value)))
    return tuple(text for _, text in sorted(numbered))
