"""An AirVantage emulator: the REST API, the device MQTT API and the Kinesis connector.

No public AirVantage emulator exists, so the sandbox plays AirVantage itself. This module is an
independent implementation of the shapes in DESIGN.md §3; it deliberately shares no code with
``shared/airvantage.py``, so a codec bug on one side shows up as a test failure on the other.

Theory of operation
-------------------
The emulator has a synchronous core, :class:`_Ledger`, and an async driver,
:class:`AirVantageEmulator`. The ledger holds everything AirVantage knows (systems, tokens,
operations and their tasks, the fault knobs' counters) and *decides*: every call returns what to do
(task payloads to publish, records to put) and never does I/O. The driver performs those actions:

- **REST** (aiohttp on 127.0.0.1): ``/api/oauth/token`` issues bearer tokens; every ``/api/v1``
  route requires one. Creating a command or settings operation makes one *task* per target
  system; the ledger hands the driver the task payloads to publish.
- **Device side** (aiomqtt, the privileged account on the device broker): tasks are published
  with QoS 1 on ``{serial}/tasks/json``; acks are read on ``+/acks/json`` and move each task to
  SUCCESS or FAILURE. An operation is SCHEDULED until one of its tasks is published, IN_PROGRESS
  until every task is acknowledged, then FINISHED (FINISHED says nothing about success: read the
  counters, as with the real service).
- **Redelivery**: the emulator is not the broker, so it cannot see a device re-subscribe. It
  republishes a task still unacknowledged (a) on a timer, every ``redelivery_interval`` seconds
  until acked, and (b) at once when the device publishes anything (data or an ack) after a silence
  of at least ``activity_gap`` seconds, which is what a device that reconnects and re-subscribes
  does first (only tasks sent at least ``activity_gap`` ago: younger ones reached the new
  subscription or are in flight). Either way a device may see a task more than once, as DESIGN.md
  says it must expect.
- **Settings tasks**: AirVantage does not document how a settings write reaches an MQTT device.
  The emulator's choice is the command shape with ``settings`` in place of ``command``:
  ``[{"uid": "<task uid>", "timestamp": <ms>, "settings": [{"key": "...", "value": ...}]}]``,
  acknowledged like any task. The ``reboot`` flag is accepted and ignored.
- **Kinesis connector**: device data on ``+/messages/json`` (any of the three shapes) becomes
  ``event.system.incoming.communication`` envelopes put into the stream with the system uid as
  partition key. Data paths the application model does not declare are dropped, as AirVantage
  does; a message with nothing declared left produces no record. One connector task puts the
  queued records in PutRecords batches (≤ 500), retrying failed entries, so records of one system
  keep their order unless a retry intervenes (consumers must not rely on order anyway). With
  ``envelope_style="nested"`` the data sits under timestamp keys in one record per message; with
  ``"flat"`` the pairs sit directly in ``content``, one record per distinct timestamp. With
  ``operation_events=True``, every operation state change also becomes an
  ``event.operation.state.change`` record (partition key: the operation uid).
- **Control** (``/_emulator/...``, no token, no faults): ``GET``/``POST /_emulator/faults`` reads
  or sets the knobs (``{"expire_tokens": true}`` and ``{"release_held_tasks": true}`` act at
  once), ``GET /_emulator/operations`` lists every operation.
- **Faults** (:class:`Faults`, settable from tests or ``POST /_emulator/faults``): 429 with
  ``Retry-After`` or a 5xx for the next N ``/api`` requests, added latency, expiring every token,
  duplicated task delivery, reordered task delivery (the next N tasks, across operations and
  systems, are held and then published in reverse order; held tasks count as PENDING), and
  duplicated connector records.

Errors on the REST side use AirVantage's shape ``{"error": "<code>", "errorParameters": [...]}``;
the codes are the emulator's own (AirVantage does not publish a list), listed on
:class:`ApiRequestError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import enum
import hmac
import json
import math
import random
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Self

import aiomqtt
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from aiohttp.typedefs import Handler
from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import ConfigError, PeerError, TransportError, UsageError, WireFormatError

__all__ = [
    "DEFAULT_MODEL_PATH",
    "AckSeen",
    "AirVantageEmulator",
    "ApiRequestError",
    "ApplicationModel",
    "CommandSpec",
    "EnvelopeStyle",
    "Faults",
    "OperationKind",
    "OperationSnapshot",
    "OperationState",
    "PublishedTask",
    "TaskState",
]

log = structlog.get_logger()

DEFAULT_MODEL_PATH = Path(__file__).with_name("ztp.app.json")

EnvelopeStyle = Literal["nested", "flat"]
RegisterCallback = Callable[[str, str], Awaitable[None]]
Scalar = str | int | float | bool

_COMMUNICATION_EVENT = "event.system.incoming.communication"
_OPERATION_EVENT = "event.operation.state.change"
# AirVantage's documented password limit; the serial doubles as an MQTT topic level and username.
_MAX_PASSWORD = 255
_MAX_SERIAL = 64
# PutRecords accepts at most 500 records and 5 MiB per call; stay under both.
_MAX_BATCH_RECORDS = 500
_MAX_BATCH_BYTES = 4 * 1024 * 1024
_FORBIDDEN_SERIAL_CHARS = frozenset("/+#\x00")


# --------------------------------------------------------------------------------------------
# The application model


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """A command declared in the application model.

    Attributes:
        command_id: the id the REST call names (``ztp.deliver``).
        parameters: the parameter names accepted, or ``None`` to accept any.
    """

    command_id: str
    parameters: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.command_id or "." not in self.command_id:
            raise ConfigError("model.commands.id", "must be '<asset>.<name>'")


@dataclass(frozen=True, slots=True)
class ApplicationModel:
    """The data paths, settings and commands AirVantage knows for the application.

    Attributes:
        app_type: the application type (unique id of the model).
        variables: declared data paths (``ztp.request``); other device data is dropped.
        settings: declared setting keys a settings operation may write.
        commands: declared commands by id.
    """

    app_type: str
    variables: frozenset[str]
    settings: frozenset[str]
    commands: Mapping[str, CommandSpec]

    def __post_init__(self) -> None:
        if not self.app_type:
            raise ConfigError("model.type", "must not be empty")
        for path in self.variables:
            if not path or "." not in path:
                raise ConfigError("model.variables.path", "must be '<asset>.<path>'")
        for key, spec in self.commands.items():
            if key != spec.command_id:
                raise ConfigError("model.commands", "key and command id differ")
        object.__setattr__(self, "commands", MappingProxyType(dict(self.commands)))

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Self:
        """Build a model from its JSON document (the format of ``sandbox/ztp.app.json``).

        Args:
            document: the decoded JSON object.

        Returns:
            The model.

        Raises:
            ConfigError: a required member is missing or has the wrong type.
        """
        try:
            commands = {}
            for entry in document.get("commands", []):
                params = entry.get("parameters")
                spec = CommandSpec(
                    command_id=str(entry["id"]),
                    parameters=None if params is None else frozenset(str(p) for p in params),
                )
                commands[spec.command_id] = spec
            return cls(
                app_type=str(document["type"]),
                variables=frozenset(str(v["path"]) for v in document.get("variables", [])),
                settings=frozenset(str(s["path"]) for s in document.get("settings", [])),
                commands=commands,
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError("model", f"malformed application model: {exc!r}") from exc

    @classmethod
    def load(cls, path: Path = DEFAULT_MODEL_PATH) -> Self:
        """Read a model file.

        Args:
            path: the JSON model file; the project's own model by default.

        Returns:
            The model.

        Raises:
            ConfigError: the file is unreadable or malformed.
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError("model", f"cannot read {path}: {exc}") from exc
        if not isinstance(document, dict):
            raise ConfigError("model", "the model file must hold a JSON object")
        return cls.from_json(document)


# --------------------------------------------------------------------------------------------
# Errors and records


class ApiRequestError(PeerError):
    """A REST request the emulator refuses, rendered as AirVantage's error body.

    Codes used: ``invalid_request``, ``invalid_client``, ``invalid_grant``,
    ``unsupported_grant_type`` (OAuth), ``invalid_token`` (401 on ``/api/v1``),
    ``request.invalid``, ``system.not.found``, ``command.unknown``,
    ``command.parameter.unknown``, ``setting.unknown``, ``operation.not.found``,
    ``too.many.requests`` (429), ``service.unavailable`` (5xx faults).

    Attributes:
        status: the HTTP status.
        code: the ``error`` member.
        parameters: the ``errorParameters`` member (never a secret).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        parameters: Iterable[str] = (),
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.parameters = tuple(parameters)
        self.headers = dict(headers or {})
        super().__init__(f"HTTP {status} {code} {list(self.parameters)}")

    def to_json(self) -> dict[str, Any]:
        """Return AirVantage's error body."""
        return {"error": self.code, "errorParameters": list(self.parameters)}


class OperationState(enum.StrEnum):
    """AirVantage's operation states."""

    SCHEDULED = "SCHEDULED"
    IN_PROGRESS = "IN_PROGRESS"
    FINISHED = "FINISHED"


class TaskState(enum.StrEnum):
    """The state of one system's task, as counted in an operation's ``counters``."""

    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


class OperationKind(enum.StrEnum):
    """What an operation does on its systems."""

    COMMAND = "COMMAND"
    SETTINGS = "SETTINGS"


@dataclass(frozen=True, slots=True)
class OperationSnapshot:
    """An operation as ``GET /api/v1/operations/{uid}`` shows it.

    Attributes:
        uid: the operation uid.
        kind: command or settings.
        state: SCHEDULED, IN_PROGRESS or FINISHED.
        counters: the number of tasks in each :class:`TaskState` (all four states present).
        task_uids: the uid of each system's task.
        command_id: the command, for a command operation.
    """

    uid: str
    kind: OperationKind
    state: OperationState
    counters: Mapping[str, int]
    task_uids: tuple[str, ...]
    command_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the REST representation."""
        body: dict[str, Any] = {
            "uid": self.uid,
            "type": self.kind.value,
            "state": self.state.value,
            "counters": [{"state": s, "count": n} for s, n in self.counters.items()],
        }
        if self.command_id is not None:
            body["commandId"] = self.command_id
        return body


@dataclass(frozen=True, slots=True)
class AckSeen:
    """One ack read on ``{serial}/acks/json``, whether it changed anything or not."""

    serial: str
    uid: str
    status: str
    message: str | None


@dataclass(frozen=True, slots=True)
class PublishedTask:
    """One task payload the emulator published (a redelivery or duplicate counts again)."""

    serial: str
    task_uid: str
    payload: Mapping[str, Any]


@dataclass(slots=True)
class Faults:
    """Fault knobs, settable at run time; counters count down as faults fire.

    Attributes:
        rate_limit_next: answer the next N ``/api`` requests with 429.
        retry_after: the ``Retry-After`` seconds sent with a 429.
        server_error_next: answer the next N ``/api`` requests with ``server_error_status``.
        server_error_status: the 5xx status to answer with.
        latency: seconds added before answering every ``/api`` request.
        duplicate_tasks: publish each of the next N tasks twice.
        reorder_tasks: hold the next N tasks, then publish them in reverse order.
        duplicate_records: put each of the next N connector records twice.
    """

    rate_limit_next: int = 0
    retry_after: int = 1
    server_error_next: int = 0
    server_error_status: int = 503
    latency: float = 0.0
    duplicate_tasks: int = 0
    reorder_tasks: int = 0
    duplicate_records: int = 0

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if not numeric or value < 0:
                raise UsageError(f"fault {f.name} must be a non-negative number")
            if f.name != "latency" and not isinstance(value, int):
                raise UsageError(f"fault {f.name} must be an integer")
        if not 500 <= self.server_error_status <= 599:
            raise UsageError("fault server_error_status must be a 5xx status")

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set several knobs at once; nothing changes if any value is invalid.

        Args:
            changes: knob names and new values (``latency`` may be a float).

        Raises:
            UsageError: an unknown knob or an invalid value.
        """
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise UsageError(f"unknown fault knobs: {unknown}")
        current = self.to_json()
        candidate = Faults(**{**current, **changes})
        for name in names:
            setattr(self, name, getattr(candidate, name))

    def to_json(self) -> dict[str, Any]:
        """Return the knobs as a JSON object."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# --------------------------------------------------------------------------------------------
# Device payload codecs (pure)


@dataclass(frozen=True, slots=True)
class _Point:
    path: str
    value: Scalar
    timestamp_ms: int | None


def _scalar(value: object, where: str) -> Scalar:
    if isinstance(value, str | int | float | bool):
        return value
    raise WireFormatError(where, "a string, number or boolean", value)


def _timestamp(value: object, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise WireFormatError(where, "a timestamp in ms", value)


def _decode_json(payload: bytes, where: str) -> object:
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireFormatError(where, "JSON", payload[:40]) from exc


def _parse_keyed(document: Mapping[str, object]) -> list[_Point]:
    points = []
    for key, value in document.items():
        if isinstance(value, dict):
            # Shape 2: {"<ms>": {"<path>": value}}.
            stamp = _timestamp(key, "message.<timestamp>")
            for path, inner in value.items():
                points.append(_Point(path, _scalar(inner, f"message.{key}.{path}"), stamp))
        else:
            # Shape 1: {"<path>": value}; the server stamps the time.
            points.append(_Point(key, _scalar(value, f"message.{key}"), None))
    return points


def _parse_series(document: list[object]) -> list[_Point]:
    # Shape 3: [{"<path>": [{"timestamp": ms, "value": v}, ...]}].
    points = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise WireFormatError(f"message[{index}]", "an object", entry)
        for path, series in entry.items():
            where = f"message[{index}].{path}"
            if not isinstance(series, list):
                raise WireFormatError(where, "a list", series)
            for sample in series:
                if not isinstance(sample, dict) or "value" not in sample:
                    raise WireFormatError(where, "{timestamp, value}", sample)
                stamp = _timestamp(sample.get("timestamp"), f"{where}.timestamp")
                points.append(_Point(path, _scalar(sample["value"], f"{where}.value"), stamp))
    return points


def _parse_device_data(payload: bytes) -> list[_Point]:
    """Decode a ``{serial}/messages/json`` payload in any of its three shapes."""
    document = _decode_json(payload, "message")
    if isinstance(document, dict):
        points = _parse_keyed(document)
    elif isinstance(document, list):
        points = _parse_series(document)
    else:
        raise WireFormatError("message", "an object or a list", document)
    for point in points:
        if not point.path:
            raise WireFormatError("message", "a data path", point.path)
    return points


def _parse_acks(payload: bytes) -> list[tuple[str, str, str | None]]:
    """Decode a ``{serial}/acks/json`` payload into (uid, status, message) triples."""
    document = _decode_json(payload, "acks")
    if not isinstance(document, list):
        raise WireFormatError("acks", "a list", document)
    acks = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict):
            raise WireFormatError(f"acks[{index}]", "an object", entry)
        uid, status, message = entry.get("uid"), entry.get("status"), entry.get("message")
        if not isinstance(uid, str) or not uid:
            raise WireFormatError(f"acks[{index}].uid", "a task uid", uid)
        if status not in ("OK", "ERROR"):
            raise WireFormatError(f"acks[{index}].status", "OK or ERROR", status)
        if message is not None and not isinstance(message, str):
            raise WireFormatError(f"acks[{index}].message", "a string", message)
        acks.append((uid, status, message))
    return acks


def _build_communication_envelopes(
    *,
    system_uid: str,
    serial: str,
    points: Iterable[_Point],
    received_ms: int,
    style: EnvelopeStyle,
    new_uid: Callable[[], str],
) -> list[dict[str, Any]]:
    """Wrap one device message's declared points as the Kinesis connector does."""
    by_stamp: dict[int, dict[str, Scalar]] = {}
    for point in points:
        stamp = received_ms if point.timestamp_ms is None else point.timestamp_ms
        by_stamp.setdefault(stamp, {})[point.path] = point.value
    if not by_stamp:
        return []

    def envelope(data: Mapping[str, Any]) -> dict[str, Any]:
        content = {"system.id": system_uid, "communication.id": serial, "message.id": new_uid()}
        return {"name": _COMMUNICATION_EVENT, "date": received_ms, "content": {**content, **data}}

    if style == "nested":
        return [envelope({str(stamp): values for stamp, values in sorted(by_stamp.items())})]
    return [envelope(values) for _, values in sorted(by_stamp.items())]


# --------------------------------------------------------------------------------------------
# The ledger: the synchronous core


@dataclass(frozen=True, slots=True)
class _System:
    uid: str
    serial: str
    name: str


@dataclass(slots=True)
class _Task:
    uid: str
    operation_uid: str
    serial: str
    body: dict[str, Any]
    state: TaskState = TaskState.PENDING
    last_sent: float | None = None
    message: str | None = None

    def payload(self) -> bytes:
        return json.dumps([{"uid": self.uid, **self.body}]).encode()


@dataclass(slots=True)
class _Operation:
    uid: str
    kind: OperationKind
    command_id: str | None
    tasks: list[_Task]
    state: OperationState = OperationState.SCHEDULED

    def counters(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in TaskState), 0)
        for task in self.tasks:
            counts[task.state.value] += 1
        return counts

    def derive_state(self) -> OperationState:
        if all(t.state in (TaskState.SUCCESS, TaskState.FAILURE) for t in self.tasks):
            return OperationState.FINISHED
        if any(t.state is not TaskState.PENDING for t in self.tasks):
            return OperationState.IN_PROGRESS
        return OperationState.SCHEDULED

    def snapshot(self) -> OperationSnapshot:
        return OperationSnapshot(
            uid=self.uid,
            kind=self.kind,
            state=self.state,
            counters=MappingProxyType(self.counters()),
            task_uids=tuple(t.uid for t in self.tasks),
            command_id=self.command_id,
        )


@dataclass(frozen=True, slots=True)
class _Publish:
    """An action: publish ``payload`` on ``{serial}/tasks/json``."""

    serial: str
    task_uid: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class _Token:
    expires_at: float
    company: str | None


@dataclass(slots=True)
class _Ledger:
    """Everything AirVantage knows; decides, never does I/O. ``now`` is always passed in."""

    model: ApplicationModel
    faults: Faults
    systems: dict[str, _System] = field(default_factory=dict)
    serials: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, _Token] = field(default_factory=dict)
    # Every token ever issued, expired ones included: the test suite's secret guard must know
    # them all, and ``tokens`` forgets a token once it expires.
    issued_tokens: list[str] = field(default_factory=list)
    operations: dict[str, _Operation] = field(default_factory=dict)
    tasks: dict[str, _Task] = field(default_factory=dict)
    held: list[_Task] = field(default_factory=list)
    last_seen: dict[str, float] = field(default_factory=dict)
    # Tasks delivered and not yet acknowledged, and operations whose state may have moved:
    # kept aside so acks and redeliveries cost O(open work), not O(history).
    open_tasks: dict[str, _Task] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)

    # Tokens ------------------------------------------------------------------------------

    def issue_token(self, *, now: float, lifetime: float, company: str | None) -> str:
        token = secrets.token_hex(16)
        self.tokens[token] = _Token(expires_at=now + lifetime, company=company)
        self.issued_tokens.append(token)
        return token

    def token_valid(self, token: str, *, now: float) -> bool:
        entry = self.tokens.get(token)
        if entry is None:
            return False
        if entry.expires_at <= now:
            del self.tokens[token]
            return False
        return True

    def expire_tokens(self) -> None:
        self.tokens.clear()

    # Systems -----------------------------------------------------------------------------

    def add_system(self, serial: str, name: str) -> str:
        if serial in self.serials:
            raise UsageError(f"system {serial!r} is already registered")
        uid = uuid.uuid4().hex
        self.systems[uid] = _System(uid=uid, serial=serial, name=name)
        self.serials[serial] = uid
        return uid

    # Operations --------------------------------------------------------------------------

    def create_operation(
        self,
        *,
        kind: OperationKind,
        system_uids: list[str],
        command_id: str | None,
        body: dict[str, Any],
        now: float,
        now_ms: int,
    ) -> tuple[_Operation, list[_Publish]]:
        for uid in system_uids:
            if uid not in self.systems:
                raise ApiRequestError(400, "system.not.found", [uid])
        operation = _Operation(uid=uuid.uuid4().hex, kind=kind, command_id=command_id, tasks=[])
        for system_uid in dict.fromkeys(system_uids):
            task = _Task(
                uid=uuid.uuid4().hex,
                operation_uid=operation.uid,
                serial=self.systems[system_uid].serial,
                body={"timestamp": now_ms, **body},
            )
            operation.tasks.append(task)
            self.tasks[task.uid] = task
        self.operations[operation.uid] = operation
        self.touched.add(operation.uid)
        return operation, self._dispatch(operation.tasks, now=now)

    def _dispatch(self, tasks: list[_Task], *, now: float) -> list[_Publish]:
        """Apply the reorder and duplicate faults to first deliveries."""
        ready: list[_Task] = []
        for task in tasks:
            if self.faults.reorder_tasks > 0:
                self.held.append(task)
                self.faults.reorder_tasks -= 1
                if self.faults.reorder_tasks == 0:
                    ready.extend(reversed(self.held))
                    self.held.clear()
            else:
                ready.append(task)
        actions: list[_Publish] = []
        for task in ready:
            copies = 1
            if self.faults.duplicate_tasks > 0:
                self.faults.duplicate_tasks -= 1
                copies = 2
            actions.extend([self._send(task, now=now)] * copies)
        return actions

    def _send(self, task: _Task, *, now: float) -> _Publish:
        if task.state is TaskState.PENDING:
            task.state = TaskState.IN_PROGRESS
            self.open_tasks[task.uid] = task
            self.touched.add(task.operation_uid)
        task.last_sent = now
        return _Publish(serial=task.serial, task_uid=task.uid, payload=task.payload())

    def release_held(self, *, now: float) -> list[_Publish]:
        """Publish tasks the reorder fault holds (when the test lowers the knob)."""
        tasks = list(reversed(self.held))
        self.held.clear()
        return [self._send(task, now=now) for task in tasks]

    def unacked(self, serial: str | None = None) -> list[_Task]:
        return [t for t in self.open_tasks.values() if serial is None or t.serial == serial]

    def still_unacked(self, task_uid: str) -> bool:
        return task_uid in self.open_tasks

    def due_redeliveries(self, *, now: float, interval: float) -> list[_Publish]:
        return [
            self._send(t, now=now)
            for t in self.unacked()
            if t.last_sent is None or now - t.last_sent >= interval
        ]

    def device_activity(self, serial: str, *, now: float, gap: float) -> list[_Publish]:
        """Note that a device spoke; after a silence, assume it reconnected and redeliver.

        Only tasks sent at least ``gap`` ago go again: one sent since reached the device's new
        subscription or is still on its way (the timer covers the rest).
        """
        previous = self.last_seen.get(serial)
        self.last_seen[serial] = now
        if previous is not None and now - previous < gap:
            return []
        return [
            self._send(t, now=now)
            for t in self.unacked(serial)
            if t.last_sent is None or now - t.last_sent >= gap
        ]

    def refresh_states(self) -> list[tuple[_Operation, OperationState]]:
        """Recompute touched operations' states; return ``(operation, old state)`` per change."""
        changed = []
        for uid in sorted(self.touched):
            operation = self.operations[uid]
            new = operation.derive_state()
            if new is not operation.state:
                changed.append((operation, operation.state))
                operation.state = new
        self.touched.clear()
        return changed

    def record_ack(self, serial: str, uid: str, status: str, message: str | None) -> bool:
        """Apply one ack; the first ack of a task wins. Returns whether it changed a task."""
        task = self.tasks.get(uid)
        if task is None or task.serial != serial:
            return False
        if task.state in (TaskState.SUCCESS, TaskState.FAILURE):
            return False
        task.state = TaskState.SUCCESS if status == "OK" else TaskState.FAILURE
        task.message = message
        self.open_tasks.pop(uid, None)
        self.touched.add(task.operation_uid)
        return True


# --------------------------------------------------------------------------------------------
# The async driver


def _validate_serial(serial: str) -> None:
    if not serial or len(serial) > _MAX_SERIAL or _FORBIDDEN_SERIAL_CHARS & set(serial):
        raise UsageError("a serial must be 1-64 characters without '/', '+', '#' or NUL")


def _operation_envelope(operation: _Operation, old: OperationState, now_ms: int) -> dict[str, Any]:
    return {
        "name": _OPERATION_EVENT,
        "date": now_ms,
        "content": {
            "operation.uid": operation.uid,
            "operation.state.old": old.value,
            "operation.state.new": operation.state.value,
            "operation.counters": [
                {"state": s, "count": n} for s, n in operation.counters().items()
            ],
        },
    }


@dataclass(frozen=True, slots=True)
class _Record:
    partition_key: str
    envelope: dict[str, Any]
    data: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", json.dumps(self.envelope).encode())


class AirVantageEmulator:
    """AirVantage for both daemons, on loopback: REST, device MQTT and the Kinesis connector.

    Use as an async context manager. On entry the REST server listens, the MQTT client is
    connected and subscribed, and the Kinesis client is open; on exit the background tasks are
    cancelled and everything is closed in reverse order.

    Device broker accounts are the caller's business: pass ``on_register`` (an async callback
    taking ``(serial, password)``, e.g. the sandbox broker's ``add_device``) and
    :meth:`register_system` awaits it before the system exists; leave it ``None`` for a broker
    that allows anonymous clients.
    """

    def __init__(
        self,
        *,
        broker_host: str,
        broker_port: int,
        admin_username: str | None,
        admin_password: str | None,
        broker_ca_file: Path | None = None,
        aws_endpoint_url: str,
        region: str,
        stream_name: str,
        client_id: str,
        client_secret: str,
        model: ApplicationModel,
        users: Mapping[str, str] | None = None,
        port: int = 0,
        token_lifetime: float = 86400.0,
        envelope_style: EnvelopeStyle = "nested",
        operation_events: bool = False,
        redelivery_interval: float | None = 10.0,
        activity_gap: float = 2.0,
        on_register: RegisterCallback | None = None,
        aws_access_key_id: str = "testing",
        aws_secret_access_key: str = "testing",  # noqa: S107 - moto accepts any; no secret
        connect_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Configure the emulator; nothing starts before ``async with``.

        Args:
            broker_host: the device broker's host.
            broker_port: the device broker's port.
            admin_username: the privileged broker account (``None`` for anonymous).
            admin_password: its password.
            broker_ca_file: CA bundle to verify the broker with; TLS is used when given.
            aws_endpoint_url: the Kinesis endpoint (the moto server).
            region: the AWS region.
            stream_name: the stream the connector writes into.
            client_id: the OAuth client id the REST API accepts.
            client_secret: its secret.
            model: the application model (declared data paths, settings, commands).
            users: username → password accepted by the password grant.
            port: the REST port (0 picks a free one; see :attr:`api_url`).
            token_lifetime: seconds a token lives (AirVantage: 24 h).
            envelope_style: ``"nested"`` (data under timestamp keys) or ``"flat"``.
            operation_events: also put ``event.operation.state.change`` records.
            redelivery_interval: seconds between redeliveries of an unacked task (``None``: off).
            activity_gap: silence after which device activity counts as a reconnect.
            on_register: async ``(serial, password)`` callback creating the broker account.
            aws_access_key_id: credentials for the Kinesis client (moto accepts any).
            aws_secret_access_key: ditto.
            connect_timeout: seconds to wait for the broker on entry.
            clock: wall clock in seconds (token expiry, timestamps); tests may pass their own.

        Raises:
            UsageError: an invalid option.
        """
        if token_lifetime <= 0 or activity_gap < 0 or connect_timeout <= 0:
            raise UsageError("token_lifetime and connect_timeout must be > 0, activity_gap >= 0")
        if redelivery_interval is not None and redelivery_interval <= 0:
            raise UsageError("redelivery_interval must be > 0 or None")
        if envelope_style not in ("nested", "flat"):
            raise UsageError("envelope_style must be 'nested' or 'flat'")
        self._broker_host = broker_host
        self._broker_port = broker_port
        self._admin_username = admin_username
        self._admin_password = admin_password
        self._broker_ca_file = broker_ca_file
        self._aws_endpoint_url = aws_endpoint_url
        self._region = region
        self._stream_name = stream_name
        self._client_id = client_id
        self._client_secret = client_secret
        self._users = dict(users or {})
        self._port = port
        self._token_lifetime = token_lifetime
        self._envelope_style: EnvelopeStyle = envelope_style
        self._operation_events = operation_events
        self._redelivery_interval = redelivery_interval
        self._activity_gap = activity_gap
        self._on_register = on_register
        self._aws_credentials = (aws_access_key_id, aws_secret_access_key)
        self._connect_timeout = connect_timeout
        self._clock = clock

        self.faults = Faults()
        self._ledger = _Ledger(model=model, faults=self.faults)
        self._outbox: asyncio.Queue[_Publish] = asyncio.Queue()
        self._records: asyncio.Queue[_Record] = asyncio.Queue()
        self._mqtt_ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._api_port: int | None = None
        self._acks: list[AckSeen] = []
        self._published: list[PublishedTask] = []
        self._records_put: list[dict[str, Any]] = []
        self._rejected: list[tuple[str, str]] = []

    # Lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        try:
            await self._start()
        except BaseExceptionGroup as group:
            # The TaskGroup wraps a start-up failure; callers catch our error, not a group.
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], TransportError):
                raise group.exceptions[0] from None
            raise
        return self

    async def _start(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            session = get_session()
            self._kinesis = await stack.enter_async_context(
                session.create_client(
                    "kinesis",
                    region_name=self._region,
                    endpoint_url=self._aws_endpoint_url,
                    aws_access_key_id=self._aws_credentials[0],
                    aws_secret_access_key=self._aws_credentials[1],
                    # One attempt: the connector retries itself, and moto answers 500 for
                    # what it lacks, which botocore would otherwise retry for ~11 s
                    # (total_max_attempts counts the first attempt; max_attempts does not).
                    config=AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
                )
            )
            group = await stack.enter_async_context(asyncio.TaskGroup())
            stack.callback(self._cancel_tasks)
            self._tasks = [
                group.create_task(self._mqtt_loop(), name="airvantage-emulator.mqtt"),
                group.create_task(self._connector_loop(), name="airvantage-emulator.connector"),
            ]
            if self._redelivery_interval is not None:
                self._tasks.append(
                    group.create_task(
                        self._redelivery_loop(self._redelivery_interval),
                        name="airvantage-emulator.redelivery",
                    )
                )
            runner = web.AppRunner(self._make_app(), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", self._port)
            await site.start()
            self._api_port = runner.addresses[0][1]
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await self._mqtt_ready.wait()
            except TimeoutError as exc:
                raise TransportError(
                    f"device broker {self._broker_host}:{self._broker_port} not reachable "
                    f"within {self._connect_timeout} s"
                ) from exc
            log.info("airvantage_emulator.started", api_url=self.api_url)
            self._stack = stack.pop_all()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            try:
                await stack.aclose()
            finally:
                self._api_port = None
            log.info("airvantage_emulator.stopped")

    def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel("airvantage emulator shutting down")

    # Public API --------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The REST base URL (``http://127.0.0.1:<port>``); ``/api/...`` paths hang off it."""
        if self._api_port is None:
            raise UsageError("the emulator is not running")
        return f"http://127.0.0.1:{self._api_port}"

    @property
    def model(self) -> ApplicationModel:
        """The application model in force."""
        return self._ledger.model

    async def register_system(self, serial: str, password: str, *, name: str = "") -> str:
        """Create a system for a gateway.

        Args:
            serial: the gateway serial (its MQTT username and topic prefix).
            password: the system's MQTT password (≤ 255 characters); handed to ``on_register``
                and never stored or logged by the emulator.
            name: a display name (defaults to the serial).

        Returns:
            The new system's uid.

        Raises:
            UsageError: a bad serial or password, or the serial is already registered.
        """
        _validate_serial(serial)
        if not password or len(password) > _MAX_PASSWORD:
            raise UsageError("a system password must be 1-255 characters")
        if serial in self._ledger.serials:
            raise UsageError(f"system {serial!r} is already registered")
        if self._on_register is not None:
            await self._on_register(serial, password)
        uid = self._ledger.add_system(serial, name or serial)
        log.info("airvantage_emulator.system_registered", serial=serial, system_uid=uid)
        return uid

    def system_uid(self, serial: str) -> str | None:
        """Return the uid of the system with ``serial``, if registered."""
        return self._ledger.serials.get(serial)

    def expire_tokens(self) -> None:
        """Make every token issued so far invalid (the next ``/api/v1`` call gets 401)."""
        self._ledger.expire_tokens()
        log.info("airvantage_emulator.tokens_expired")

    @property
    def issued_tokens(self) -> tuple[str, ...]:
        """Every bearer token issued so far, expired ones included, oldest first.

        For the test suite's secret guard, which checks that none of them reaches a log; never
        log what this returns.
        """
        return tuple(self._ledger.issued_tokens)

    def release_held_tasks(self) -> None:
        """Publish the tasks the reorder fault holds now, in reverse order, and stop holding."""
        self.faults.reorder_tasks = 0
        self._publish_all(self._ledger.release_held(now=self._loop_time()))
        self._after_operations_moved()

    def operations(self) -> list[OperationSnapshot]:
        """Return every operation, oldest first."""
        return [op.snapshot() for op in self._ledger.operations.values()]

    def operation(self, uid: str) -> OperationSnapshot:
        """Return one operation.

        Raises:
            UsageError: no such operation.
        """
        try:
            return self._ledger.operations[uid].snapshot()
        except KeyError:
            raise UsageError(f"no operation {uid!r}") from None

    @property
    def acks_seen(self) -> tuple[AckSeen, ...]:
        """Every ack read from devices, in arrival order (duplicates and strays included)."""
        return tuple(self._acks)

    @property
    def tasks_published(self) -> tuple[PublishedTask, ...]:
        """Every task publication, in order (redeliveries and duplicates included)."""
        return tuple(self._published)

    @property
    def records_put(self) -> tuple[dict[str, Any], ...]:
        """Every envelope put into Kinesis, in order (duplicates included)."""
        return tuple(self._records_put)

    @property
    def rejected(self) -> tuple[tuple[str, str], ...]:
        """Device publications dropped as malformed or from unknown systems: (topic, reason)."""
        return tuple(self._rejected)

    async def wait_until(self, predicate: Callable[[], bool], *, within: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever the emulator's state moves.

        Raises:
            TimeoutError: it did not hold within ``within`` seconds.
        """
        async with asyncio.timeout(within):
            while not predicate():
                await self._changed.wait()

    # Internals ---------------------------------------------------------------------------

    def _bump(self) -> None:
        # Wake every waiter, then arm a fresh event for the next change.
        self._changed.set()
        self._changed = asyncio.Event()

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    def _publish_all(self, actions: Iterable[_Publish]) -> None:
        for action in actions:
            self._outbox.put_nowait(action)

    def _after_operations_moved(self) -> None:
        now_ms = int(self._clock() * 1000)
        for operation, old in self._ledger.refresh_states():
            log.info(
                "airvantage_emulator.operation_state",
                operation=operation.uid,
                state=operation.state.value,
            )
            if self._operation_events:
                envelope = _operation_envelope(operation, old, now_ms)
                self._enqueue_record(_Record(operation.uid, envelope))
        self._bump()

    def _enqueue_record(self, record: _Record) -> None:
        copies = 1
        if self.faults.duplicate_records > 0:
            self.faults.duplicate_records -= 1
            copies = 2
        for _ in range(copies):
            self._records.put_nowait(record)

    def _mqtt_client(self) -> aiomqtt.Client:
        tls_context = None
        if self._broker_ca_file is not None:
            tls_context = ssl.create_default_context(cafile=str(self._broker_ca_file))
        return aiomqtt.Client(
            self._broker_host,
            self._broker_port,
            username=self._admin_username,
            password=self._admin_password,
            identifier=f"airvantage-emulator-{uuid.uuid4().hex[:8]}",
            tls_context=tls_context,
            max_inflight_messages=100,
            timeout=self._connect_timeout,
            # Without it every QoS 1 exchange stalls ~44 ms on Nagle + delayed ACK (measured on
            # loopback against mosquitto with set_tcp_nodelay: 44 ms vs 0.5 ms per round trip).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )

    async def _mqtt_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._mqtt_client() as client:
                    await client.subscribe([("+/messages/json", 1), ("+/acks/json", 1)])
                    attempt = 0
                    self._mqtt_ready.set()
                    log.info("airvantage_emulator.mqtt_connected", port=self._broker_port)
                    # Tasks published while disconnected were lost: send the unacked again.
                    self._publish_all(
                        self._ledger.due_redeliveries(now=self._loop_time(), interval=0.0)
                    )
                    async with asyncio.TaskGroup() as group:
                        group.create_task(
                            self._publish_loop(client), name="airvantage-emulator.mqtt-publish"
                        )
                        async for message in client.messages:
                            self._on_device_publication(
                                message.topic.value, _payload_bytes(message.payload)
                            )
            except* aiomqtt.MqttError as group:
                self._mqtt_ready.clear()
                attempt += 1
                # Full jitter, capped: many emulators restarted together do not stampede.
                delay = random.uniform(0, min(5.0, 0.1 * 2**attempt))  # noqa: S311 - jitter, not crypto
                log.warning(
                    "airvantage_emulator.mqtt_disconnected",
                    error=str(group.exceptions[0]),
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
                await asyncio.sleep(delay)

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        while True:
            action = await self._outbox.get()
            if not self._ledger.still_unacked(action.task_uid):
                # Acknowledged while this (re)delivery waited in the outbox.
                continue
            await client.publish(f"{action.serial}/tasks/json", action.payload, qos=1)
            self._published.append(
                PublishedTask(action.serial, action.task_uid, json.loads(action.payload)[0])
            )
            self._bump()

    async def _redelivery_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval / 2)
            actions = self._ledger.due_redeliveries(now=self._loop_time(), interval=interval)
            if actions:
                log.info("airvantage_emulator.redelivering", tasks=len(actions))
                self._publish_all(actions)

    def _on_device_publication(self, topic: str, payload: bytes) -> None:
        levels = topic.split("/")
        serial = levels[0]
        system_uid = self._ledger.serials.get(serial)
        if system_uid is None:
            self._reject(topic, "unknown system")
            return
        try:
            if levels[1] == "acks":
                self._on_acks(serial, payload)
            else:
                self._on_data(serial, system_uid, payload)
        except WireFormatError as exc:
            self._reject(topic, str(exc))
        # After the acks are applied, so a task acknowledged by this very publication is not
        # sent again.
        self._publish_all(
            self._ledger.device_activity(serial, now=self._loop_time(), gap=self._activity_gap)
        )

    def _reject(self, topic: str, reason: str) -> None:
        log.warning("airvantage_emulator.publication_dropped", topic=topic, reason=reason)
        self._rejected.append((topic, reason))
        self._bump()

    def _on_acks(self, serial: str, payload: bytes) -> None:
        for uid, status, message in _parse_acks(payload):
            self._acks.append(AckSeen(serial=serial, uid=uid, status=status, message=message))
            applied = self._ledger.record_ack(serial, uid, status, message)
            log.info(
                "airvantage_emulator.ack", serial=serial, task=uid, status=status, applied=applied
            )
        self._after_operations_moved()

    def _on_data(self, serial: str, system_uid: str, payload: bytes) -> None:
        points = _parse_device_data(payload)
        declared = [p for p in points if p.path in self._ledger.model.variables]
        dropped = sorted({p.path for p in points} - {p.path for p in declared})
        if dropped:
            log.info("airvantage_emulator.undeclared_paths_dropped", serial=serial, paths=dropped)
        envelopes = _build_communication_envelopes(
            system_uid=system_uid,
            serial=serial,
            points=declared,
            received_ms=int(self._clock() * 1000),
            style=self._envelope_style,
            new_uid=lambda: uuid.uuid4().hex,
        )
        for envelope in envelopes:
            self._enqueue_record(_Record(system_uid, envelope))
        self._bump()

    async def _connector_loop(self) -> None:
        # One task puts batches one after another: moto loses records under concurrent
        # PutRecords, and one writer keeps each system's records in order.
        carry: _Record | None = None
        while True:
            batch = [carry if carry is not None else await self._records.get()]
            carry = None
            size = len(batch[0].data)
            while len(batch) < _MAX_BATCH_RECORDS and not self._records.empty():
                record = self._records.get_nowait()
                size += len(record.data)
                if size > _MAX_BATCH_BYTES:
                    carry = record  # first of the next batch
                    break
                batch.append(record)
            await self._put_batch(batch)

    async def _put_batch(self, batch: list[_Record]) -> None:
        pending = batch
        for attempt in range(1, 4):
            try:
                answer = await self._kinesis.put_records(
                    StreamName=self._stream_name,
                    Records=[{"Data": r.data, "PartitionKey": r.partition_key} for r in pending],
                )
            except (BotoCoreError, ClientError) as exc:
                log.warning("airvantage_emulator.put_failed", error=str(exc), attempt=attempt)
                await asyncio.sleep(0.1 * 2**attempt)
                continue
            failed = []
            for record, result in zip(pending, answer["Records"], strict=True):
                if "ErrorCode" in result:
                    failed.append(record)
                else:
                    self._records_put.append(record.envelope)
            self._bump()
            if not failed:
                return
            log.warning("airvantage_emulator.put_partial", failed=len(failed), attempt=attempt)
            pending = failed
            await asyncio.sleep(0.1 * 2**attempt)
        log.error("airvantage_emulator.records_dropped", count=len(pending))

    # REST --------------------------------------------------------------------------------

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_middleware, self._faults_middleware])
        app.router.add_post("/api/oauth/token", self._token)
        app.router.add_get("/api/v1/systems", self._systems)
        app.router.add_post("/api/v1/operations/systems/command", self._command)
        app.router.add_post("/api/v1/operations/systems/settings", self._settings)
        app.router.add_get("/api/v1/operations/{uid}", self._get_operation)
        app.router.add_get("/_emulator/faults", self._get_faults)
        app.router.add_post("/_emulator/faults", self._set_faults)
        app.router.add_get("/_emulator/operations", self._list_operations)
        return app

    @web.middleware
    async def _errors_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiRequestError as exc:
            return web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
        except web.HTTPException as exc:
            # aiohttp's own refusals (no such route, wrong method) in AirVantage's shape too.
            if exc.status < 400 or not request.path.startswith("/api/"):
                raise
            code = {404: "not.found", 405: "method.not.allowed"}.get(exc.status, "request.invalid")
            refusal = ApiRequestError(exc.status, code, [request.path])
            return web.json_response(refusal.to_json(), status=exc.status)

    @web.middleware
    async def _faults_middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        if self.faults.latency > 0:
            await asyncio.sleep(self.faults.latency)
        if self.faults.rate_limit_next > 0:
            self.faults.rate_limit_next -= 1
            raise ApiRequestError(
                429, "too.many.requests", headers={"Retry-After": str(self.faults.retry_after)}
            )
        if self.faults.server_error_next > 0:
            self.faults.server_error_next -= 1
            raise ApiRequestError(self.faults.server_error_status, "service.unavailable")
        if request.path.startswith("/api/v1/"):
            self._authorize(request)
        return await handler(request)

    def _authorize(self, request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = request.query.get("access_token", "")
        if not token or not self._ledger.token_valid(token.strip(), now=self._clock()):
            raise ApiRequestError(
                401, "invalid_token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )

    def _client_matches(self, client_id: str, client_secret: str) -> bool:
        # Both comparisons always run, so timing does not tell which part was wrong.
        id_ok = hmac.compare_digest(client_id.encode(), self._client_id.encode())
        secret_ok = hmac.compare_digest(client_secret.encode(), self._client_secret.encode())
        return id_ok and secret_ok

    async def _token(self, request: web.Request) -> web.Response:
        form: dict[str, str] = {k: str(v) for k, v in (await request.post()).items()}
        params = {**dict(request.query), **form}
        client_id, client_secret = params.get("client_id", ""), params.get("client_secret", "")
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            client_id, client_secret = _decode_basic(encoded)
        grant = params.get("grant_type")
        if grant is None:
            raise ApiRequestError(400, "invalid_request", ["grant_type"])
        if grant not in ("client_credentials", "password"):
            raise ApiRequestError(400, "unsupported_grant_type", [grant])
        if not self._client_matches(client_id, client_secret):
            raise ApiRequestError(401, "invalid_client")
        if grant == "password":
            username, password = params.get("username", ""), params.get("password", "")
            expected = self._users.get(username)
            if expected is None or not hmac.compare_digest(password.encode(), expected.encode()):
                raise ApiRequestError(401, "invalid_grant")
        token = self._ledger.issue_token(
            now=self._clock(), lifetime=self._token_lifetime, company=params.get("company")
        )
        log.info("airvantage_emulator.token_issued", grant=grant)
        return web.json_response(
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": math.ceil(self._token_lifetime),
            }
        )

    async def _systems(self, request: web.Request) -> web.Response:
        systems = list(self._ledger.systems.values())
        gateway = request.query.get("gateway")
        if gateway is not None:
            kind, _, value = gateway.partition(":")
            if kind != "serialNumber" or not value:
                raise ApiRequestError(400, "request.invalid", ["gateway"])
            systems = [s for s in systems if s.serial == value]
        wanted = request.query.get("fields")
        items = []
        for system in systems:
            item: dict[str, Any] = {
                "uid": system.uid,
                "name": system.name,
                "gateway": {"serialNumber": system.serial},
            }
            if wanted:
                item = {k: v for k, v in item.items() if k in wanted.split(",")}
            items.append(item)
        return web.json_response({"items": items, "count": len(items), "size": len(items)})

    @staticmethod
    async def _json_object(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiRequestError(400, "request.invalid", ["body"]) from None
        if not isinstance(body, dict):
            raise ApiRequestError(400, "request.invalid", ["body"])
        return body

    @staticmethod
    def _system_uids(body: Mapping[str, Any]) -> list[str]:
        systems = body.get("systems")
        uids = systems.get("uids") if isinstance(systems, dict) else None
        if not isinstance(uids, list) or not uids or not all(isinstance(u, str) for u in uids):
            raise ApiRequestError(400, "request.invalid", ["systems.uids"])
        return uids

    def _start_operation(
        self,
        *,
        kind: OperationKind,
        uids: list[str],
        command_id: str | None,
        body: dict[str, Any],
    ) -> web.Response:
        operation, actions = self._ledger.create_operation(
            kind=kind,
            system_uids=uids,
            command_id=command_id,
            body=body,
            now=self._loop_time(),
            now_ms=int(self._clock() * 1000),
        )
        log.info(
            "airvantage_emulator.operation_created",
            operation=operation.uid,
            kind=kind.value,
            systems=len(operation.tasks),
        )
        self._publish_all(actions)
        self._after_operations_moved()
        return web.json_response({"operation": operation.uid})

    async def _command(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        uids = self._system_uids(body)
        command_id = body.get("commandId")
        if not isinstance(command_id, str):
            raise ApiRequestError(400, "request.invalid", ["commandId"])
        spec = self._ledger.model.commands.get(command_id)
        if spec is None:
            raise ApiRequestError(400, "command.unknown", [command_id])
        parameters = body.get("parameters", {})
        if not isinstance(parameters, dict) or not all(
            isinstance(v, str | int | float | bool) for v in parameters.values()
        ):
            raise ApiRequestError(400, "request.invalid", ["parameters"])
        if spec.parameters is not None:
            unknown = sorted(set(parameters) - spec.parameters)
            if unknown:
                raise ApiRequestError(400, "command.parameter.unknown", unknown)
        return self._start_operation(
            kind=OperationKind.COMMAND,
            uids=uids,
            command_id=command_id,
            body={"command": {"id": command_id, "params": parameters}},
        )

    async def _settings(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        uids = self._system_uids(body)
        settings = body.get("settings")
        if not isinstance(settings, list) or not settings:
            raise ApiRequestError(400, "request.invalid", ["settings"])
        written = []
        for entry in settings:
            if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
                raise ApiRequestError(400, "request.invalid", ["settings.key"])
            if not isinstance(entry.get("value"), str | int | float | bool):
                raise ApiRequestError(400, "request.invalid", ["settings.value"])
            if entry["key"] not in self._ledger.model.settings:
                raise ApiRequestError(400, "setting.unknown", [entry["key"]])
            written.append({"key": entry["key"], "value": entry["value"]})
        if not isinstance(body.get("reboot", False), bool):
            raise ApiRequestError(400, "request.invalid", ["reboot"])
        return self._start_operation(
            kind=OperationKind.SETTINGS, uids=uids, command_id=None, body={"settings": written}
        )

    async def _get_operation(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        operation = self._ledger.operations.get(uid)
        if operation is None:
            raise ApiRequestError(404, "operation.not.found", [uid])
        return web.json_response(operation.snapshot().to_json())

    async def _get_faults(self, _request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_json())

    async def _set_faults(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        expire = body.pop("expire_tokens", False)
        release = body.pop("release_held_tasks", False)
        try:
            self.faults.update(body)
        except UsageError as exc:
            raise ApiRequestError(400, "request.invalid", [str(exc)]) from None
        if expire is True:
            self.expire_tokens()
        if release is True:
            self.release_held_tasks()
        log.info("airvantage_emulator.faults_set", **self.faults.to_json())
        return web.json_response(self.faults.to_json())

    async def _list_operations(self, _request: web.Request) -> web.Response:
        return web.json_response({"items": [op.to_json() for op in self.operations()]})


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


def _decode_basic(encoded: str) -> tuple[str, str]:
    """Decode HTTP Basic credentials (RFC 7617); aiohttp's own helper is deprecated in 3.14."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiRequestError(401, "invalid_client") from None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon:
        raise ApiRequestError(401, "invalid_client")
    return client_id, client_secret
