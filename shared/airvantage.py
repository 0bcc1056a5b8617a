"""AirVantage's wire formats: device MQTT payloads, command tasks, acks, Kinesis envelopes.

Theory of operation
-------------------
This module is pure: bytes in, typed values out, and back. It never opens a socket, reads a
clock or awaits anything; the adapters (``ztp_daemon/link.py``, ``cloud_daemon/consumer.py``,
the sandbox) do the I/O and call it.

Three families of payloads cross AirVantage (DESIGN.md §3):

- **Device data** on ``{serial}/messages/json``. Three shapes carry the same thing, a list of
  :class:`DataPoint` (``path``, ``value``, optional ``timestamp_ms``):

  - :attr:`DataShape.PLAIN` ``{"ztp.csr": "..."}``: the server stamps the time;
  - :attr:`DataShape.TIMESTAMPED` ``{"1349907137000": {"ztp.csr": "..."}}``;
  - :attr:`DataShape.ARRAY` ``[{"ztp.csr": [{"timestamp": 1416324560869, "value": "..."}]}]``,
    the only shape that carries several values of one path in one message.

  :func:`parse_device_message` accepts all three (and an object mixing plain pairs and timestamp
  groups); :func:`encode_device_message` writes the one asked for and refuses points the shape
  cannot carry faithfully (a timestamp in the plain shape, a repeated path in an object).
- **Command tasks** on ``{serial}/tasks/json`` and their **acks** on ``{serial}/acks/json``:
  :func:`parse_tasks` / :func:`encode_tasks`, :func:`parse_acks` / :func:`encode_acks`. A task
  that is not a command (AirVantage's settings writes have an undocumented shape) parses as an
  :class:`OtherTask`, so the device can still acknowledge it with an error.
- **Kinesis connector records**: :func:`parse_envelope` returns an :class:`IncomingCommunication`,
  an :class:`OperationStateChange`, or an :class:`OtherEvent` for any other named event (alerts,
  usage, names we have never seen), so a consumer dispatches with ``match`` and never crashes on
  a record it does not use.

Rules the codecs follow:

- **Bounded first.** Every parser refuses a payload over ``max_bytes`` with
  :class:`~shared.errors.LimitExceededError` before decoding a single byte.
- **Liberal where AirVantage is the author, strict where it matters.** Timestamps may be JSON
  integers, integral floats or strings of digits; a task list may be a single object. But JSON
  must be valid UTF-8, without ``NaN``/``Infinity`` and without duplicate keys (two parsers
  could pick different values), and every field we use must have the documented type.
- **Who is at fault.** A bad peer payload raises :class:`~shared.errors.WireFormatError` with
  ``field`` (``[0].command.id``, ``content.system.id``), ``expected`` and ``got``; building a
  value badly on our own side raises :class:`InvalidValueError`, a
  :class:`~shared.errors.UsageError` carrying the same three attributes.
- A data path made only of digits is refused everywhere: in an object it could not be told from
  a timestamp key.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, TypeAlias

from shared.errors import (
    DecodeError,
    InvalidValueError,
    LimitExceededError,
    WireFormatError,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "INCOMING_COMMUNICATION",
    "MAX_SERIAL_CHARS",
    "MAX_TIMESTAMP_MS",
    "OPERATION_STATE_CHANGE",
    "Ack",
    "AckStatus",
    "CommandTask",
    "DataPoint",
    "DataShape",
    "Event",
    "IncomingCommunication",
    "InvalidValueError",
    "OperationStateChange",
    "OtherEvent",
    "OtherTask",
    "Scalar",
    "Task",
    "acks_topic",
    "decode_json",
    "encode_acks",
    "encode_device_message",
    "encode_envelope",
    "encode_tasks",
    "messages_topic",
    "parse_acks",
    "parse_device_message",
    "parse_envelope",
    "parse_tasks",
    "tasks_topic",
    "validate_serial",
]

Scalar: TypeAlias = str | int | float | bool
"""A data value or command parameter: what AirVantage's JSON carries as a leaf."""

DEFAULT_MAX_PAYLOAD_BYTES: Final = 64 * 1024
"""Default bound on one MQTT payload or Kinesis record. A fragmented CSR is ~3 KB."""

MAX_SERIAL_CHARS: Final = 64
MAX_TIMESTAMP_MS: Final = 2**53 - 1
"""Largest timestamp accepted: the largest integer a JSON peer is sure to keep exact."""

INCOMING_COMMUNICATION: Final = "event.system.incoming.communication"
OPERATION_STATE_CHANGE: Final = "event.operation.state.change"

_MAX_NAME_CHARS: Final = 255
# A serial is both an MQTT topic level and an MQTT username (and a line in mosquitto's password
# file, where ':' separates the user from the hash), so it is held to a conservative alphabet.
_SERIAL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGITS_RE: Final = re.compile(r"[0-9]{1,16}")

_SYSTEM_ID: Final = "system.id"
_COMMUNICATION_ID: Final = "communication.id"
_MESSAGE_ID: Final = "message.id"
_RESERVED_CONTENT_KEYS: Final = frozenset({_SYSTEM_ID, _COMMUNICATION_ID, _MESSAGE_ID})


def _describe(value: object, *, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


_JSON_TYPE_NAMES: Final[tuple[tuple[type, str], ...]] = (
    (bool, "boolean"),  # before int: a bool is an int to isinstance
    (int, "number"),
    (float, "number"),
    (str, "string"),
    (list, "array"),
    (dict, "object"),
    (type(None), "null"),
)


def _type_name(value: object) -> str:
    """Describe a JSON value by its JSON type, for ``got`` when the type itself is wrong."""
    for kind, name in _JSON_TYPE_NAMES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _join(prefix: str, name: str) -> str:
    if not prefix:
        return name
    if not name:
        return prefix
    if name.startswith("["):
        return f"{prefix}{name}"
    return f"{prefix}.{name}"


@contextmanager
def _peer_fault(prefix: str, error: type[DecodeError] = WireFormatError) -> Iterator[None]:
    """Re-raise a validation failure of peer-supplied data as the peer's fault."""
    try:
        yield
    except InvalidValueError as exc:
        raise error(_join(prefix, exc.field), exc.expected, exc.value) from exc


# -- field checks (raise InvalidValueError; decoders translate) --------------------------------


def _check_text(name: str, value: object, *, max_chars: int = _MAX_NAME_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidValueError(name, "a string", _type_name(value))
    if not 0 < len(value) <= max_chars or not value.isprintable():
        raise InvalidValueError(name, f"1 to {max_chars} printable characters", value)
    return value


def _check_optional_text(name: str, value: object) -> str | None:
    return None if value is None else _check_text(name, value)


def _check_path(name: str, value: object) -> str:
    path = _check_text(name, value)
    if path.isdigit():
        raise InvalidValueError(name, "a data path that is not only digits", path)
    return path


def _check_scalar(name: str, value: object) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidValueError(name, "a finite number", value)
    if isinstance(value, str | int | float | bool):
        return value
    raise InvalidValueError(name, "a string, number or boolean", _type_name(value))


def _check_timestamp(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(name, "an integer count of milliseconds", _type_name(value))
    if not 0 <= value <= MAX_TIMESTAMP_MS:
        raise InvalidValueError(name, f"milliseconds in 0..{MAX_TIMESTAMP_MS}", value)
    return value


def _check_optional_timestamp(name: str, value: object) -> int | None:
    return None if value is None else _check_timestamp(name, value)


def _read_timestamp(name: str, value: object) -> int:
    """Read a peer's timestamp liberally: an integer, an integral float or a string of digits."""
    if isinstance(value, str):
        if not _DIGITS_RE.fullmatch(value):
            raise InvalidValueError(name, "milliseconds as digits", value)
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return _check_timestamp(name, value)


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidValueError(name, "a non-negative integer", value)
    return value


def _read_count(name: str, value: object) -> int:
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
        value = int(value)
    return _check_count(name, value)


def _expect_object(name: str, value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InvalidValueError(name, "an object", _type_name(value))
    return value


def _expect_array(name: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise InvalidValueError(name, "an array", _type_name(value))
    return value


def validate_serial(serial: str) -> str:
    """Check that a gateway serial is safe as an MQTT topic level and username.

    Allowed: 1 to 64 characters of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit. That
    excludes the MQTT wildcards and separator (``+ # /``), NUL and every control character, a
    leading ``$`` (reserved topics) and ``:`` (mosquitto's password-file separator).

    Args:
        serial: the serial number (or IMEI) AirVantage knows the gateway by.

    Returns:
        The serial, unchanged.

    Raises:
        InvalidValueError: the serial is not a string, is empty, too long or has a character
            outside the alphabet.
    """
    if not isinstance(serial, str):
        raise InvalidValueError("serial", "a string", _type_name(serial))
    if len(serial) > MAX_SERIAL_CHARS or not _SERIAL_RE.fullmatch(serial):
        raise InvalidValueError(
            "serial", f"1 to {MAX_SERIAL_CHARS} characters of A-Z a-z 0-9 . _ -", serial
        )
    return serial


def messages_topic(serial: str) -> str:
    """Return the topic a device publishes data on: ``{serial}/messages/json``.

    Raises:
        InvalidValueError: ``serial`` fails :func:`validate_serial`.
    """
    return f"{validate_serial(serial)}/messages/json"


def tasks_topic(serial: str) -> str:
    """Return the topic a device receives command tasks on: ``{serial}/tasks/json``.

    Raises:
        InvalidValueError: ``serial`` fails :func:`validate_serial`.
    """
    return f"{validate_serial(serial)}/tasks/json"


def acks_topic(serial: str) -> str:
    """Return the topic a device acknowledges tasks on: ``{serial}/acks/json``.

    Raises:
        InvalidValueError: ``serial`` fails :func:`validate_serial`.
    """
    return f"{validate_serial(serial)}/acks/json"


# -- strict, bounded JSON ----------------------------------------------------------------------


def decode_json(
    payload: bytes | bytearray | memoryview | str,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    error: type[DecodeError] = WireFormatError,
) -> object:
    """Decode one JSON document from a peer, bounded and strict.

    Args:
        payload: the raw payload; text is measured by its UTF-8 encoding.
        max_bytes: the largest payload accepted, in bytes.
        error: the :class:`~shared.errors.DecodeError` subclass to raise (the message codec
            passes :class:`~shared.errors.MessageError`).

    Returns:
        The decoded document (dict, list, str, int, float, bool or None).

    Raises:
        LimitExceededError: ``limit_name="max_payload_bytes"``, before anything is decoded.
        DecodeError: (as ``error``) not UTF-8, not JSON, ``NaN``/``Infinity``, a duplicate key,
            nesting too deep, or an integer too long to convert.
    """
    if isinstance(payload, str):
        # A character is at least one UTF-8 byte: refuse huge text before encoding it.
        if len(payload) > max_bytes:
            raise LimitExceededError("max_payload_bytes", max_bytes, len(payload))
        try:
            raw = payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise error("payload", "UTF-8 text", f"unencodable character at {exc.start}") from exc
    else:
        raw = bytes(payload)
    if len(raw) > max_bytes:
        raise LimitExceededError("max_payload_bytes", max_bytes, len(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error("payload", "UTF-8 text", f"invalid byte at {exc.start}") from exc

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        obj = dict(items)
        if len(obj) != len(items):
            seen: set[str] = set()
            for key, _ in items:
                if key in seen:
                    raise error("payload", "JSON objects without duplicate keys", key)
                seen.add(key)
        return obj

    def constant(name: str) -> object:
        raise error("payload", "JSON without NaN or Infinity", name)

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError as exc:
        raise error("payload", "JSON nested to a sane depth", "too deep") from exc
    except ValueError as exc:
        # JSONDecodeError, and the int-from-digits limit of CPython's guard against huge ints.
        raise error("payload", "valid JSON", str(exc)) from exc


def _dump(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


# -- device data -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DataPoint:
    """One value of one data path, as a device publishes it and AirVantage forwards it.

    Attributes:
        path: the data name, ``<asset>.<path>`` by convention (``ztp.request``); 1 to 255
            printable characters, not only digits.
        value: a string, number (finite) or boolean.
        timestamp_ms: milliseconds since the Unix epoch, or ``None`` when the server stamps it.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    path: str
    value: Scalar
    timestamp_ms: int | None = None

    def __post_init__(self) -> None:
        _check_path("path", self.path)
        _check_scalar("value", self.value)
        _check_optional_timestamp("timestamp_ms", self.timestamp_ms)


class DataShape(enum.Enum):
    """The three payload shapes of ``{serial}/messages/json``."""

    PLAIN = "plain"
    """``{"path": value}``: no timestamps, the server stamps the time; one value per path."""
    TIMESTAMPED = "timestamped"
    """``{"<ms>": {"path": value}}``: every point timestamped; one value per path and time."""
    ARRAY = "array"
    """``[{"path": [{"timestamp": ms, "value": v}, ...]}]``: several values of a path."""


def _point(prefix: str, key: str, value: object, timestamp_ms: int | None) -> DataPoint:
    with _peer_fault(_join(prefix, key)):
        return DataPoint(_check_path("", key), _check_scalar("", value), timestamp_ms)


def _samples(prefix: str, key: str, samples: object) -> Iterator[DataPoint]:
    where = _join(prefix, key)
    with _peer_fault(where):
        path = _check_path("", key)
    with _peer_fault(""):
        items = _expect_array(where, samples)
    for index, sample in enumerate(items):
        at = f"{where}[{index}]"
        with _peer_fault(""):
            obj = _expect_object(at, sample)
        if "value" not in obj:
            raise WireFormatError(f"{at}.value", "a value", "nothing")
        timestamp = None
        if obj.get("timestamp") is not None:
            with _peer_fault(""):
                timestamp = _read_timestamp(f"{at}.timestamp", obj["timestamp"])
        with _peer_fault(""):
            yield DataPoint(path, _check_scalar(f"{at}.value", obj["value"]), timestamp)


def _object_points(
    obj: Mapping[str, object], prefix: str, *, skip: frozenset[str] = frozenset()
) -> Iterator[DataPoint]:
    """Read ``path: value`` pairs, ``"<ms>": {path: value}`` groups and ``path: [samples]``."""
    for key, value in obj.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            with _peer_fault(""):
                timestamp = _read_timestamp(_join(prefix, key), key)
            for path, inner in value.items():
                yield _point(_join(prefix, key), path, inner, timestamp)
        elif isinstance(value, list):
            # Not a documented object shape, but the array shape's own sample list: accepted
            # because a connector forwarding an array-shaped message may well render it so.
            yield from _samples(prefix, key, value)
        else:
            yield _point(prefix, key, value, None)


def parse_device_message(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[DataPoint, ...]:
    """Decode a ``{serial}/messages/json`` payload in any of the three shapes.

    Args:
        payload: the MQTT payload.
        max_bytes: the largest payload accepted.

    Returns:
        The data points in document order (timestamp ``None`` where the server stamps it).

    Raises:
        LimitExceededError: the payload is larger than ``max_bytes``.
        WireFormatError: not JSON, or not one of the shapes; ``field`` says where.
    """
    doc = decode_json(payload, max_bytes=max_bytes)
    if isinstance(doc, dict):
        return tuple(_object_points(doc, ""))
    if isinstance(doc, list):
        points: list[DataPoint] = []
        for index, element in enumerate(doc):
            with _peer_fault(""):
                obj = _expect_object(f"[{index}]", element)
            for path, samples in obj.items():
                points.extend(_samples(f"[{index}]", path, samples))
        return tuple(points)
    raise WireFormatError("payload", "a JSON object or array", _type_name(doc))


def _unique(points: Iterable[DataPoint], what: str) -> None:
    seen: set[tuple[str, int | None]] = set()
    for point in points:
        key = (point.path, point.timestamp_ms)
        if key in seen:
            raise InvalidValueError("points", f"one value per path {what}", point.path)
        seen.add(key)


def encode_device_message(
    points: Iterable[DataPoint], *, shape: DataShape = DataShape.ARRAY
) -> bytes:
    """Encode data points as a ``{serial}/messages/json`` payload (compact UTF-8 JSON).

    Args:
        points: the points, in the order they should appear.
        shape: which of the three shapes to write.

    Returns:
        The payload.

    Raises:
        InvalidValueError: the shape cannot carry the points faithfully: a timestamp in
            ``PLAIN``, a point without one in ``TIMESTAMPED`` or ``ARRAY``, or a path repeated
            where an object key would collide.
    """
    points = tuple(points)
    if shape is DataShape.PLAIN:
        for point in points:
            if point.timestamp_ms is not None:
                raise InvalidValueError("timestamp_ms", "None in the plain shape", point.path)
        _unique(points, "in the plain shape")
        return _dump({point.path: point.value for point in points})
    groups: dict[str, dict[str, Scalar]] = {}
    series: dict[str, list[dict[str, Scalar]]] = {}
    for point in points:
        if point.timestamp_ms is None:
            raise InvalidValueError("timestamp_ms", f"a timestamp in the {shape.value} shape", None)
        groups.setdefault(str(point.timestamp_ms), {})[point.path] = point.value
        series.setdefault(point.path, []).append(
            {"timestamp": point.timestamp_ms, "value": point.value}
        )
    if shape is DataShape.TIMESTAMPED:
        _unique(points, "and timestamp")
        return _dump(groups)
    return _dump([series] if series else [])


# -- command tasks and acks --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommandTask:
    """A command AirVantage asks the device to run (one element of ``{serial}/tasks/json``).

    Attributes:
        uid: the task's identifier, echoed in the ack.
        timestamp_ms: when AirVantage created the task, if it said.
        command_id: the command's declared id (``ztp.deliver``).
        params: the command's parameters (a read-only copy of what was given).

    Raises:
        InvalidValueError: a field is empty, too long, not printable, or a parameter value is
            not a string, finite number or boolean.
    """

    uid: str
    timestamp_ms: int | None
    command_id: str
    params: Mapping[str, Scalar] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_text("uid", self.uid)
        _check_optional_timestamp("timestamp_ms", self.timestamp_ms)
        _check_text("command_id", self.command_id)
        copy = dict(self.params)
        for key, value in copy.items():
            _check_text("params", key)
            _check_scalar(f"params.{key}", value)
        object.__setattr__(self, "params", MappingProxyType(copy))


@dataclass(frozen=True, slots=True)
class OtherTask:
    """A task that is not a command (a settings write, or a kind we do not know).

    The device cannot run it but can still acknowledge it (with an error) by its ``uid``.

    Attributes:
        uid: the task's identifier.
        timestamp_ms: when AirVantage created the task, if it said.
        kinds: the task's other top-level keys (``("settings",)``), for logs.
    """

    uid: str
    timestamp_ms: int | None
    kinds: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_text("uid", self.uid)
        _check_optional_timestamp("timestamp_ms", self.timestamp_ms)


Task: TypeAlias = CommandTask | OtherTask


def _parse_task(index: int, element: object) -> Task:
    at = f"[{index}]"
    with _peer_fault(""):
        obj = _expect_object(at, element)
    if "uid" not in obj:
        raise WireFormatError(f"{at}.uid", "a task uid", "nothing")
    with _peer_fault(at):
        uid = _check_text("uid", obj["uid"])
        raw_ts = obj.get("timestamp")
        timestamp = None if raw_ts is None else _read_timestamp("timestamp", raw_ts)
    if "command" not in obj:
        kinds = tuple(key for key in obj if key not in {"uid", "timestamp"})
        return OtherTask(uid, timestamp, kinds)
    where = f"{at}.command"
    with _peer_fault(""):
        command = _expect_object(where, obj["command"])
    if "id" not in command:
        raise WireFormatError(f"{where}.id", "a command id", "nothing")
    with _peer_fault(where):
        command_id = _check_text("id", command["id"])
        raw_params = command.get("params")
        given = {} if raw_params is None else _expect_object("params", raw_params)
    params: dict[str, Scalar] = {}
    with _peer_fault(f"{where}.params"):
        for key, value in given.items():
            params[_check_text("", key)] = _check_scalar(key, value)
    with _peer_fault(where):
        return CommandTask(uid, timestamp, command_id, params)


def parse_tasks(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[Task, ...]:
    """Decode a ``{serial}/tasks/json`` payload.

    Args:
        payload: the MQTT payload: an array of tasks (a single task object is also accepted).
        max_bytes: the largest payload accepted.

    Returns:
        One :class:`CommandTask` or :class:`OtherTask` per task, in order.

    Raises:
        LimitExceededError: the payload is larger than ``max_bytes``.
        WireFormatError: not JSON, or a task without a usable ``uid``, or a command without a
            usable ``id`` or with ill-typed ``params``.
    """
    doc = decode_json(payload, max_bytes=max_bytes)
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise WireFormatError("payload", "an array of tasks", _type_name(doc))
    return tuple(_parse_task(index, element) for index, element in enumerate(doc))


def encode_tasks(tasks: Iterable[CommandTask]) -> bytes:
    """Encode command tasks as a ``{serial}/tasks/json`` payload (what AirVantage sends).

    Args:
        tasks: the tasks; a task without a timestamp is written without one.

    Returns:
        The payload, a JSON array.
    """
    doc: list[dict[str, object]] = []
    for task in tasks:
        element: dict[str, object] = {"uid": task.uid}
        if task.timestamp_ms is not None:
            element["timestamp"] = task.timestamp_ms
        element["command"] = {"id": task.command_id, "params": dict(task.params)}
        doc.append(element)
    return _dump(doc)


class AckStatus(enum.Enum):
    """The outcome a device reports for a task."""

    OK = "OK"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Ack:
    """A device's acknowledgement of one task (one element of ``{serial}/acks/json``).

    Attributes:
        uid: the task's uid.
        status: :attr:`AckStatus.OK` or :attr:`AckStatus.ERROR`.
        message: why it failed (1 to 255 printable characters), or ``None``.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    uid: str
    status: AckStatus
    message: str | None = None

    def __post_init__(self) -> None:
        _check_text("uid", self.uid)
        if not isinstance(self.status, AckStatus):
            raise InvalidValueError("status", "an AckStatus", self.status)
        _check_optional_text("message", self.message)

    @classmethod
    def ok(cls, uid: str) -> Ack:
        """Return a success ack for the task ``uid``."""
        return cls(uid, AckStatus.OK)

    @classmethod
    def error(cls, uid: str, message: str) -> Ack:
        """Return a failure ack for the task ``uid``, saying why in ``message``."""
        return cls(uid, AckStatus.ERROR, message)

    @property
    def is_ok(self) -> bool:
        """Whether the task succeeded."""
        return self.status is AckStatus.OK


def encode_acks(acks: Iterable[Ack]) -> bytes:
    """Encode acks as a ``{serial}/acks/json`` payload.

    Args:
        acks: the acks, in order.

    Returns:
        ``[{"uid": ..., "status": "OK"}]``, with ``"message"`` where one is set.
    """
    doc: list[dict[str, str]] = []
    for ack in acks:
        element = {"uid": ack.uid, "status": ack.status.value}
        if ack.message is not None:
            element["message"] = ack.message
        doc.append(element)
    return _dump(doc)


def parse_acks(
    payload: bytes | str, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> tuple[Ack, ...]:
    """Decode a ``{serial}/acks/json`` payload (what AirVantage reads from a device).

    Args:
        payload: an array of acks (a single ack object is also accepted); the status is matched
            without regard to case.
        max_bytes: the largest payload accepted.

    Returns:
        The acks, in order.

    Raises:
        LimitExceededError: the payload is larger than ``max_bytes``.
        WireFormatError: not JSON, a missing or ill-typed ``uid``, a status other than
            ``OK``/``ERROR``, or an ill-typed ``message``.
    """
    doc = decode_json(payload, max_bytes=max_bytes)
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        raise WireFormatError("payload", "an array of acks", _type_name(doc))
    acks: list[Ack] = []
    for index, element in enumerate(doc):
        at = f"[{index}]"
        with _peer_fault(""):
            obj = _expect_object(at, element)
        for key in ("uid", "status"):
            if key not in obj:
                raise WireFormatError(f"{at}.{key}", f"an ack {key}", "nothing")
        status = obj["status"]
        if not isinstance(status, str) or status.upper() not in AckStatus.__members__:
            raise WireFormatError(f"{at}.status", "OK or ERROR", status)
        with _peer_fault(at):
            uid = _check_text("uid", obj["uid"])
            message = _check_optional_text("message", obj.get("message"))
            acks.append(Ack(uid, AckStatus[status.upper()], message))
    return tuple(acks)


# -- Kinesis connector envelope ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IncomingCommunication:
    """A device message, as the Kinesis connector forwards it.

    Attributes:
        system_uid: AirVantage's uid of the system (``content["system.id"]``).
        serial: the communication id, the gateway's serial or IMEI
            (``content["communication.id"]``). Checked only to be printable; a caller that
            turns it into a topic or username applies :func:`validate_serial`.
        message_id: AirVantage's uid of the message, if the record carries one.
        date_ms: when AirVantage received it.
        points: the data, in record order; points directly in ``content`` have no timestamp.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    system_uid: str
    serial: str
    message_id: str | None
    date_ms: int
    points: tuple[DataPoint, ...]

    def __post_init__(self) -> None:
        _check_text("system_uid", self.system_uid)
        _check_text("serial", self.serial)
        _check_optional_text("message_id", self.message_id)
        _check_timestamp("date_ms", self.date_ms)
        points = tuple(self.points)
        for point in points:
            if not isinstance(point, DataPoint):
                raise InvalidValueError("points", "DataPoint values", point)
        object.__setattr__(self, "points", points)


@dataclass(frozen=True, slots=True)
class OperationStateChange:
    """An AirVantage operation changed state (``event.operation.state.change``).

    Attributes:
        operation_uid: the operation's uid.
        new_state: the state entered (``SCHEDULED``, ``IN_PROGRESS``, ``FINISHED``, ...).
        counters: systems per outcome (``{"SUCCESS": 1, "FAILURE": 0}``); FINISHED is not
            success, read these.
        date_ms: when it happened, if the record says.

    Raises:
        InvalidValueError: a field breaks the rules above.
    """

    operation_uid: str
    new_state: str
    counters: Mapping[str, int] = field(default_factory=dict, hash=False)
    date_ms: int | None = None

    def __post_init__(self) -> None:
        _check_text("operation_uid", self.operation_uid)
        _check_text("new_state", self.new_state)
        copy = dict(self.counters)
        for state, count in copy.items():
            _check_text("counters", state)
            _check_count(f"counters.{state}", count)
        _check_optional_timestamp("date_ms", self.date_ms)
        object.__setattr__(self, "counters", MappingProxyType(copy))


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """Any other named connector event (alerts, usage, unknown): recognised, not used.

    Attributes:
        name: the event name.
        date_ms: when it happened, if the record says (and says it readably).
    """

    name: str
    date_ms: int | None = None

    def __post_init__(self) -> None:
        _check_text("name", self.name)
        _check_optional_timestamp("date_ms", self.date_ms)


Event: TypeAlias = IncomingCommunication | OperationStateChange | OtherEvent


def _required(
    obj: Mapping[str, object], prefix: str, key: str, check: Callable[[str, object], str]
) -> str:
    if key not in obj:
        raise WireFormatError(_join(prefix, key), "a string", "nothing")
    with _peer_fault(prefix):
        return check(key, obj[key])


def _read_counters(raw: object) -> dict[str, int]:
    where = "content.operation.counters"
    counters: dict[str, int] = {}
    if raw is None:
        return counters
    if isinstance(raw, dict):
        with _peer_fault(where):
            for state, count in raw.items():
                counters[_check_text("", state)] = _read_count(state, count)
        return counters
    with _peer_fault(""):
        items = _expect_array(where, raw)
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        with _peer_fault(""):
            obj = _expect_object(at, item)
        state = _required(obj, at, "state", _check_text)
        if "count" not in obj:
            raise WireFormatError(f"{at}.count", "a count", "nothing")
        with _peer_fault(at):
            counters[state] = counters.get(state, 0) + _read_count("count", obj["count"])
    return counters


def parse_envelope(data: bytes | str, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Event:
    """Decode one Kinesis connector record.

    Args:
        data: the record's data.
        max_bytes: the largest record accepted.

    Returns:
        :class:`IncomingCommunication` for ``event.system.incoming.communication``,
        :class:`OperationStateChange` for ``event.operation.state.change``, and
        :class:`OtherEvent` for any other name (its ``date`` and ``content`` are not checked
        beyond the date being readable, else ``None``).

    Raises:
        LimitExceededError: the record is larger than ``max_bytes``.
        WireFormatError: not a JSON object, no string ``name``, or a known event whose
            ``date``, ``content`` or fields are missing or ill-typed.
    """
    doc = decode_json(data, max_bytes=max_bytes)
    if not isinstance(doc, dict):
        raise WireFormatError("record", "a JSON object", _type_name(doc))
    name = _required(doc, "", "name", _check_text)
    raw_date = doc.get("date")
    if name not in {INCOMING_COMMUNICATION, OPERATION_STATE_CHANGE}:
        try:
            date = None if raw_date is None else _read_timestamp("date", raw_date)
        except InvalidValueError:
            date = None  # an event we do not use is not refused for a field we do not read
        return OtherEvent(name, date)
    with _peer_fault(""):
        content = _expect_object("content", doc.get("content"))
    if name == OPERATION_STATE_CHANGE:
        with _peer_fault(""):
            date = None if raw_date is None else _read_timestamp("date", raw_date)
        operation_uid = _required(content, "content", "operation.uid", _check_text)
        new_state = _required(content, "content", "operation.state.new", _check_text)
        counters = _read_counters(content.get("operation.counters"))
        return OperationStateChange(operation_uid, new_state, counters, date)
    if raw_date is None:
        raise WireFormatError("date", "milliseconds", "nothing")
    with _peer_fault(""):
        date_ms = _read_timestamp("date", raw_date)
    system_uid = _required(content, "content", _SYSTEM_ID, _check_text)
    serial = _required(content, "content", _COMMUNICATION_ID, _check_text)
    with _peer_fault("content"):
        message_id = _check_optional_text(_MESSAGE_ID, content.get(_MESSAGE_ID))
    points = tuple(_object_points(content, "content", skip=_RESERVED_CONTENT_KEYS))
    return IncomingCommunication(system_uid, serial, message_id, date_ms, points)


def encode_envelope(event: Event) -> bytes:
    """Encode a Kinesis connector record (what the sandbox's connector writes).

    An incoming communication's points without a timestamp go directly into ``content``; points
    with one are nested under their timestamp key, so :func:`parse_envelope` gives the same
    points back (plain ones first, then groups in order of first appearance).

    Args:
        event: the event to encode.

    Returns:
        The record data, compact UTF-8 JSON.

    Raises:
        InvalidValueError: an incoming communication repeats a path at one timestamp (or
            without one), or uses a path the envelope reserves (``system.id``...).
    """
    match event:
        case IncomingCommunication():
            content: dict[str, object] = {
                _SYSTEM_ID: event.system_uid,
                _COMMUNICATION_ID: event.serial,
            }
            if event.message_id is not None:
                content[_MESSAGE_ID] = event.message_id
            _unique(event.points, "and timestamp")
            groups: dict[str, dict[str, Scalar]] = {}
            for point in event.points:
                if point.path in _RESERVED_CONTENT_KEYS:
                    raise InvalidValueError(
                        "points", "paths the envelope does not reserve", point.path
                    )
                if point.timestamp_ms is None:
                    content[point.path] = point.value
                else:
                    groups.setdefault(str(point.timestamp_ms), {})[point.path] = point.value
            content.update(groups)
            return _dump(
                {"name": INCOMING_COMMUNICATION, "date": event.date_ms, "content": content}
            )
        case OperationStateChange():
            doc: dict[str, object] = {"name": OPERATION_STATE_CHANGE}
            if event.date_ms is not None:
                doc["date"] = event.date_ms
            doc["content"] = {
                "operation.uid": event.operation_uid,
                "operation.state.new": event.new_state,
                "operation.counters": [
                    {"state": state, "count": count} for state, count in event.counters.items()
                ],
            }
            return _dump(doc)
        case OtherEvent():
            other: dict[str, object] = {"name": event.name}
            if event.date_ms is not None:
                other["date"] = event.date_ms
            other["content"] = {}
            return _dump(other)
