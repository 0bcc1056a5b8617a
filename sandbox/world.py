"""The whole sandbox in one object: PKI, both brokers, AWS (moto) and the AirVantage emulator.

Theory of operation
-------------------
:class:`Sandbox` is an async context manager that owns every part of the local cloud, all in one
directory::

    DIR/pki/       the sandbox CA, its CRL and the brokers' server certificates
    DIR/brokers/   both mosquitto brokers' configuration, ACLs, logs and pid files
    DIR/aws/       the moto server's log

Start-up runs in two waves, each one concurrent, because the parts of a wave do not need each
other:

1. the device broker, the IoT broker and the moto server (moto is told the IoT broker's pid
   file, so a certificate deactivated or revoked through IoT rewrites the CRL and reloads the
   broker, and its DescribeEndpoint answers the IoT broker's host);
2. the Kinesis stream, and the AirVantage emulator on the device broker's privileged account,
   writing into that stream.

Then ``devices`` gateways are registered: a serial and a random password each, with one
password-file reload on the device broker for all of them and one system per serial in the
emulator. :attr:`Sandbox.description` says how to reach it all, as one JSON-able object
(:class:`SandboxDescription`); ``ztp-sandbox up`` prints it.

Stop runs in reverse order (emulator, moto, IoT broker, device broker), shielded from
cancellation: a cancelled stop still finishes before the cancellation propagates, so no child
process outlives the context. A start that fails or is cancelled stops what it started.

:class:`SandboxThread` runs a :class:`Sandbox` on a private event loop in a thread of its own, so
code on other loops (pytest tests, each with its own loop) can share one sandbox: it hands
coroutines to that loop and waits for their results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from sandbox.airvantage import AirVantageEmulator, ApplicationModel, Faults
from sandbox.aws import MotoSandbox
from sandbox.brokers import DeviceBroker, IotBroker
from sandbox.errors import SandboxError, SandboxUsageError
from sandbox.moto_fidelity import FidelityConfig
from sandbox.pki import SandboxPki
from shared.errors import TransportError

__all__ = [
    "DEFAULT_CLIENT_ID",
    "DEFAULT_STREAM",
    "MQTT_SOCKET_OPTIONS",
    "AirVantageAccess",
    "DeviceCredentials",
    "IotMqttAccess",
    "Sandbox",
    "SandboxDescription",
    "SandboxThread",
]

T = TypeVar("T")
P = TypeVar("P")

DEFAULT_STREAM: Final = "ztp-sandbox"
DEFAULT_CLIENT_ID: Final = "ztp-cloud"
#: Socket options every MQTT client of the sandbox should pass (aiomqtt's ``socket_options``):
#: paho leaves Nagle's algorithm on, and with the peer's delayed ACK each QoS 1 exchange then
#: stalls about 44 ms on loopback.
MQTT_SOCKET_OPTIONS: Final = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)

# Both brokers listen here only; the IoT broker's certificate names it (and localhost).
_LOOPBACK: Final = "127.0.0.1"
_SERIAL_PREFIX: Final = "SBX"
_MAX_DEVICES: Final = 10_000
_STREAM_ACTIVE_TIMEOUT: Final = 10.0

_log = structlog.get_logger()


# --------------------------------------------------------------------------------------------
# The description


def _member(document: object, key: str, kind: type[T], where: str) -> T:
    """``document[key]`` if it is a ``kind``; a description that lacks it is refused."""
    value = document.get(key) if isinstance(document, Mapping) else None
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        msg = f"sandbox description: {where}{key} must be a {kind.__name__}"
        raise SandboxUsageError(msg)
    return value


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """A gateway registered in the sandbox.

    Attributes:
        serial: its serial: MQTT username, client id and topic prefix on the device broker.
        password: its MQTT password (never in a ``repr``, never logged).
    """

    serial: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.serial or not self.password:
            msg = "a device needs a serial and a password"
            raise SandboxUsageError(msg)

    def to_json(self) -> dict[str, str]:
        """Return ``{"serial": ..., "password": ...}``."""
        return {"serial": self.serial, "password": self.password}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Self:
        """The inverse of :meth:`to_json`.

        Raises:
            SandboxUsageError: a member is missing or has the wrong type.
        """
        return cls(
            _member(document, "serial", str, "devices[]."),
            _member(document, "password", str, "devices[]."),
        )


@dataclass(frozen=True, slots=True)
class IotMqttAccess:
    """Where a thing reaches the sandbox IoT broker (mutual TLS).

    Attributes:
        host: the broker's address (loopback); DescribeEndpoint answers it too.
        port: its TCP port.
        ca_file: the CA certificate to trust (it also signs every certificate IoT issues).
        observer_cert_file: a client certificate that may read every topic (tests, demo).
        observer_key_file: its private key (0600).
    """

    host: str
    port: int
    ca_file: Path
    observer_cert_file: Path
    observer_key_file: Path

    def __post_init__(self) -> None:
        if not self.host or not 0 < self.port < 65536:
            msg = f"not a usable MQTT endpoint: {self.host!r}:{self.port}"
            raise SandboxUsageError(msg)

    def to_json(self) -> dict[str, Any]:
        """Return the access as a JSON object (paths as strings)."""
        return {
            "host": self.host,
            "port": self.port,
            "ca_file": str(self.ca_file),
            "observer_cert_file": str(self.observer_cert_file),
            "observer_key_file": str(self.observer_key_file),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Self:
        """The inverse of :meth:`to_json`.

        Raises:
            SandboxUsageError: a member is missing or has the wrong type.
        """
        where = "iot_mqtt."
        return cls(
            host=_member(document, "host", str, where),
            port=_member(document, "port", int, where),
            ca_file=Path(_member(document, "ca_file", str, where)),
            observer_cert_file=Path(_member(document, "observer_cert_file", str, where)),
            observer_key_file=Path(_member(document, "observer_key_file", str, where)),
        )


@dataclass(frozen=True, slots=True)
class AirVantageAccess:
    """How the daemons reach the AirVantage emulator.

    Attributes:
        api_url: the REST base URL (``/api/oauth/token`` and ``/api/v1/...`` hang off it).
        mqtt_host: the device broker's host.
        mqtt_port: the device broker's port (plain MQTT).
        client_id: the OAuth client id the emulator accepts (client_credentials grant).
        client_secret: its secret (never in a ``repr``, never logged).
    """

    api_url: str
    mqtt_host: str
    mqtt_port: int
    client_id: str
    client_secret: str = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Return the access as a JSON object, secret included (it is what a client needs)."""
        return {
            "api_url": self.api_url,
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self.mqtt_port,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Self:
        """The inverse of :meth:`to_json`.

        Raises:
            SandboxUsageError: a member is missing or has the wrong type.
        """
        where = "airvantage."
        return cls(
            api_url=_member(document, "api_url", str, where),
            mqtt_host=_member(document, "mqtt_host", str, where),
            mqtt_port=_member(document, "mqtt_port", int, where),
            client_id=_member(document, "client_id", str, where),
            client_secret=_member(document, "client_secret", str, where),
        )


@dataclass(frozen=True, slots=True)
class SandboxDescription:
    """How to reach a running sandbox: what ``ztp-sandbox up`` prints and writes.

    Attributes:
        directory: the sandbox directory.
        aws_endpoint_url: the moto server, for aiobotocore's ``endpoint_url`` (any access key
            is accepted; clients should make one attempt, see
            :meth:`~sandbox.aws.MotoSandbox.client_kwargs`).
        region: the AWS region to name.
        kinesis_stream: the stream the AirVantage connector writes into.
        iot_mqtt: the IoT broker (mutual TLS; DescribeEndpoint answers its host).
        airvantage: the emulator's REST API and device broker.
        devices: the gateways registered so far.
        pids: process ids: ``sandbox`` (the process running it), ``device_broker``,
            ``iot_broker``, ``moto``.
    """

    directory: Path
    aws_endpoint_url: str
    region: str
    kinesis_stream: str
    iot_mqtt: IotMqttAccess
    airvantage: AirVantageAccess
    devices: tuple[DeviceCredentials, ...]
    pids: Mapping[str, int]

    def to_json(self) -> dict[str, Any]:
        """Return the description as one JSON-able object (secrets included, by design)."""
        return {
            "directory": str(self.directory),
            "aws_endpoint_url": self.aws_endpoint_url,
            "region": self.region,
            "kinesis_stream": self.kinesis_stream,
            "iot_mqtt": self.iot_mqtt.to_json(),
            "airvantage": self.airvantage.to_json(),
            "devices": [device.to_json() for device in self.devices],
            "pids": dict(self.pids),
        }

    @classmethod
    def from_json(cls, document: object) -> Self:
        """Read a description back (``DIR/sandbox.json``, or the line ``up --json`` prints).

        Args:
            document: the decoded JSON document.

        Returns:
            The description.

        Raises:
            SandboxUsageError: a member is missing or has the wrong type.
        """
        if not isinstance(document, Mapping):
            msg = "sandbox description: must be a JSON object"
            raise SandboxUsageError(msg)
        pids = _member(document, "pids", dict, "")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in pids.values()):
            msg = "sandbox description: pids must map names to process ids"
            raise SandboxUsageError(msg)
        return cls(
            directory=Path(_member(document, "directory", str, "")),
            aws_endpoint_url=_member(document, "aws_endpoint_url", str, ""),
            region=_member(document, "region", str, ""),
            kinesis_stream=_member(document, "kinesis_stream", str, ""),
            iot_mqtt=IotMqttAccess.from_json(_member(document, "iot_mqtt", dict, "")),
            airvantage=AirVantageAccess.from_json(_member(document, "airvantage", dict, "")),
            devices=tuple(
                DeviceCredentials.from_json(d) for d in _member(document, "devices", list, "")
            ),
            pids=dict(pids),
        )

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read a description file (``DIR/sandbox.json``).

        Raises:
            SandboxUsageError: the file is missing, not JSON, or not a description.
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            msg = f"cannot read the sandbox description {path}: {exc}"
            raise SandboxUsageError(msg) from exc
        return cls.from_json(document)


# --------------------------------------------------------------------------------------------
# The orchestrator


def _new_serial() -> str:
    return f"{_SERIAL_PREFIX}{secrets.token_hex(6).upper()}"


def _new_password() -> str:
    return secrets.token_urlsafe(18)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a TaskGroup wrapped, or the group itself when there are several."""
    if len(group.exceptions) == 1:
        return group.exceptions[0]
    return group


class Sandbox:
    """The local cloud: PKI, device broker, IoT broker, moto and the AirVantage emulator.

    Use as an async context manager; see the module docstring for the order of things.

    Args:
        directory: where every part keeps its files (created if needed; no whitespace, since
            mosquitto cannot configure such paths).
        devices: how many gateways to register at start-up.
        stream_name: the Kinesis stream the connector writes into.
        stream_shards: its shard count.
        client_id: the OAuth client id the emulator accepts.
        client_secret: its secret; random when None.
        model: the AirVantage application model; the project's ``sandbox/ztp.app.json`` when
            None.
        fidelity: moto's fault knobs at start and after every reset.
        redelivery_interval: seconds between the emulator's redeliveries of an unacked task
            (None: only when the device comes back).
    """

    def __init__(
        self,
        directory: Path,
        *,
        devices: int = 0,
        stream_name: str = DEFAULT_STREAM,
        stream_shards: int = 1,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str | None = None,
        model: ApplicationModel | None = None,
        fidelity: FidelityConfig | None = None,
        redelivery_interval: float | None = 10.0,
    ) -> None:
        if not 0 <= devices <= _MAX_DEVICES:
            msg = f"devices must be in 0..{_MAX_DEVICES}, got {devices}"
            raise SandboxUsageError(msg)
        if stream_shards < 1:
            msg = f"stream_shards must be at least 1, got {stream_shards}"
            raise SandboxUsageError(msg)
        if not stream_name or not client_id:
            msg = "stream_name and client_id must not be empty"
            raise SandboxUsageError(msg)
        self._directory = directory.absolute()
        self._device_count = devices
        self._stream_name = stream_name
        self._stream_shards = stream_shards
        self._client_id = client_id
        self._client_secret = client_secret or secrets.token_urlsafe(24)
        self._model = model
        self._fidelity = fidelity
        self._redelivery_interval = redelivery_interval

        self._pki: SandboxPki | None = None
        self._device_broker: DeviceBroker | None = None
        self._iot_broker: IotBroker | None = None
        self._aws: MotoSandbox | None = None
        self._emulator: AirVantageEmulator | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._kinesis: Any = None
        self._devices: list[DeviceCredentials] = []
        # Serials whose broker account was made in bulk before the emulator registered them.
        self._preloaded: set[str] = set()
        self._started = False

    # -- parts ---------------------------------------------------------------------------------

    def _need(self, part: P | None, what: str) -> P:
        if part is None or not self._started:
            msg = f"the sandbox is not running (no {what})"
            raise SandboxUsageError(msg)
        return part

    @property
    def directory(self) -> Path:
        """The sandbox directory."""
        return self._directory

    @property
    def pki(self) -> SandboxPki:
        """The sandbox CA (trusted by both brokers, signs what IoT issues)."""
        return self._need(self._pki, "PKI")

    @property
    def device_broker(self) -> DeviceBroker:
        """The AirVantage device broker."""
        return self._need(self._device_broker, "device broker")

    @property
    def iot_broker(self) -> IotBroker:
        """The IoT Core data endpoint."""
        return self._need(self._iot_broker, "IoT broker")

    @property
    def aws(self) -> MotoSandbox:
        """The moto server (use :meth:`MotoSandbox.client_kwargs` for aiobotocore clients)."""
        return self._need(self._aws, "moto server")

    @property
    def emulator(self) -> AirVantageEmulator:
        """The AirVantage emulator."""
        return self._need(self._emulator, "AirVantage emulator")

    @property
    def devices(self) -> tuple[DeviceCredentials, ...]:
        """Every gateway registered so far, in order."""
        return tuple(self._devices)

    @property
    def pids(self) -> dict[str, int]:
        """The process ids: this process and each child process that is running."""
        children = {
            "device_broker": self._device_broker.pid if self._device_broker else None,
            "iot_broker": self._iot_broker.pid if self._iot_broker else None,
            "moto": self._aws.pid if self._aws else None,
        }
        return {"sandbox": os.getpid()} | {k: v for k, v in children.items() if v is not None}

    @property
    def description(self) -> SandboxDescription:
        """How to reach the running sandbox.

        Raises:
            SandboxUsageError: the sandbox is not running.
        """
        iot = self.iot_broker.address
        observer_cert, observer_key = self.iot_broker.observer_certificate()
        device = self.device_broker.address
        return SandboxDescription(
            directory=self._directory,
            aws_endpoint_url=self.aws.endpoint_url,
            region=self.aws.region,
            kinesis_stream=self._stream_name,
            iot_mqtt=IotMqttAccess(
                iot.host, iot.port, self.pki.ca_file, observer_cert, observer_key
            ),
            airvantage=AirVantageAccess(
                api_url=self.emulator.api_url,
                mqtt_host=device.host,
                mqtt_port=device.port,
                client_id=self._client_id,
                client_secret=self._client_secret,
            ),
            devices=self.devices,
            pids=self.pids,
        )

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            msg = "the sandbox is already started"
            raise SandboxUsageError(msg)
        began = time.monotonic()
        self._stack = stack = contextlib.AsyncExitStack()
        try:
            await self._start(stack)
        except BaseExceptionGroup as group:
            await self._stop_shielded()
            raise _single(group) from None
        except BaseException:
            await self._stop_shielded()
            raise
        _log.info(
            "sandbox.started",
            directory=str(self._directory),
            devices=len(self._devices),
            elapsed_ms=round((time.monotonic() - began) * 1000, 1),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._stop_shielded()

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        directory = self._directory
        directory.mkdir(parents=True, exist_ok=True)
        # Key generation and file writes: off the loop, they would stall other tasks.
        pki = self._pki = await asyncio.to_thread(SandboxPki.load_or_create, directory / "pki")
        device_broker = self._device_broker = DeviceBroker(directory / "brokers", pki=pki)
        iot_broker = self._iot_broker = IotBroker(directory / "brokers", pki=pki)
        aws = self._aws = MotoSandbox(
            directory / "aws",
            pki=pki,
            iot_endpoint_host=_LOOPBACK,
            iot_broker_pid_file=iot_broker.pid_file,
            config=self._fidelity,
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(device_broker.start(), name="sandbox.start.device-broker")
            group.create_task(iot_broker.start(), name="sandbox.start.iot-broker")
            group.create_task(aws.start(), name="sandbox.start.moto")
        emulator = AirVantageEmulator(
            broker_host=device_broker.address.host,
            broker_port=device_broker.address.port,
            admin_username=device_broker.admin_username,
            admin_password=device_broker.admin_password,
            aws_endpoint_url=aws.endpoint_url,
            region=aws.region,
            stream_name=self._stream_name,
            client_id=self._client_id,
            client_secret=self._client_secret,
            model=self._model or ApplicationModel.load(),
            redelivery_interval=self._redelivery_interval,
            on_register=self._on_register,
        )
        # One client for the sandbox's life: a new one costs ~0.2 s of model loading per reset.
        self._kinesis = await stack.enter_async_context(
            get_session().create_client("kinesis", **aws.client_kwargs())
        )
        async with asyncio.TaskGroup() as group:
            group.create_task(self._create_stream(), name="sandbox.start.kinesis-stream")
            # Entered in this task, not a child: the emulator's own TaskGroup belongs to the
            # task that enters it, and this one also exits it.
            self._emulator = await stack.enter_async_context(emulator)
        self._started = True
        if self._device_count:
            await self.add_devices(self._device_count)

    async def _create_stream(self) -> None:
        """Create the connector's stream and wait until it is ACTIVE.

        Raises:
            SandboxUsageError: the sandbox is not running.
            TransportError: moto refused or did not answer.
        """
        kinesis = self._kinesis
        if kinesis is None:
            msg = "the sandbox is not running (no Kinesis client)"
            raise SandboxUsageError(msg)
        try:
            await kinesis.create_stream(
                StreamName=self._stream_name, ShardCount=self._stream_shards
            )
            async with asyncio.timeout(_STREAM_ACTIVE_TIMEOUT):
                while True:
                    summary = await kinesis.describe_stream_summary(StreamName=self._stream_name)
                    if summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                        return
                    await asyncio.sleep(0.02)
        except (BotoCoreError, ClientError, TimeoutError) as exc:
            msg = f"cannot create the Kinesis stream {self._stream_name!r}: {exc}"
            raise TransportError(msg) from exc

    async def _stop_shielded(self) -> None:
        # A cancelled caller still waits for the stop to finish, then sees its cancellation.
        stopping = asyncio.create_task(self._stop(), name="sandbox.stop")
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            await stopping
            raise

    async def _stop(self) -> None:
        began = time.monotonic()
        stack, self._stack = self._stack, None
        self._started = False
        errors: list[BaseException] = []
        steps: list[Callable[[], Coroutine[Any, Any, None]]] = []
        if stack is not None:
            steps.append(stack.aclose)
        steps += [
            part.stop
            for part in (self._aws, self._iot_broker, self._device_broker)
            if part is not None
        ]
        for step in steps:
            try:
                await step()
            except Exception as exc:  # noqa: BLE001 - every part must get its stop; raised below
                _log.warning("sandbox.stop_failed", step=repr(step), error=repr(exc))
                errors.append(exc)
        self._emulator = self._kinesis = None
        _log.info("sandbox.stopped", elapsed_ms=round((time.monotonic() - began) * 1000, 1))
        if errors:
            msg = f"{len(errors)} part(s) of the sandbox failed to stop cleanly"
            raise SandboxError(msg) from errors[0]

    # -- devices and state -----------------------------------------------------------------------

    async def _on_register(self, serial: str, password: str) -> None:
        # The emulator creates the broker account of each system it registers; bulk
        # registrations made every account already, with a single reload.
        if serial in self._preloaded:
            self._preloaded.discard(serial)
            return
        await self.device_broker.add_device(serial, password)

    async def add_devices(self, count: int) -> tuple[DeviceCredentials, ...]:
        """Register ``count`` new gateways (fresh serial, random password) with one reload.

        Args:
            count: how many.

        Returns:
            Their credentials, usable on the device broker when this returns.

        Raises:
            SandboxUsageError: a bad count, or the sandbox is not running.
            BrokerReloadError: the device broker did not confirm the new accounts.
        """
        if not 0 <= count <= _MAX_DEVICES:
            msg = f"count must be in 0..{_MAX_DEVICES}, got {count}"
            raise SandboxUsageError(msg)
        fresh = [DeviceCredentials(_new_serial(), _new_password()) for _ in range(count)]
        if not fresh:
            return ()
        await self.device_broker.add_devices({d.serial: d.password for d in fresh})
        self._preloaded.update(d.serial for d in fresh)
        for device in fresh:
            await self.emulator.register_system(device.serial, device.password)
            self._devices.append(device)
        return tuple(fresh)

    async def register_device(
        self, serial: str | None = None, password: str | None = None
    ) -> DeviceCredentials:
        """Register one gateway in the emulator and on the device broker.

        Args:
            serial: its serial; a fresh one when None.
            password: its MQTT password; a random one when None.

        Returns:
            Its credentials, usable on the device broker when this returns.

        Raises:
            UsageError: a bad or already registered serial, a bad password.
            BrokerReloadError: the device broker did not confirm the account.
        """
        device = DeviceCredentials(serial or _new_serial(), password or _new_password())
        await self.emulator.register_system(device.serial, device.password)
        self._devices.append(device)
        return device

    async def reset(self) -> None:
        """Put the shared state back as it was after start, for the next test.

        moto's backends are emptied (and its knobs restored, the CRL emptied and the IoT broker
        reloaded), the Kinesis stream is made again empty, the emulator's tasks held by the
        reorder fault are released and every fault knob is back at its default. The IoT broker
        has reloaded the empty CRL when this returns. Systems and broker accounts stay: tests use
        fresh serials.

        Raises:
            SandboxUsageError: the sandbox is not running.
            TransportError: moto did not answer.
            BrokerReloadError: the IoT broker did not confirm its reload.
        """
        emulator = self.emulator
        emulator.release_held_tasks()
        emulator.faults.update(Faults().to_json())
        await self.aws.reset()
        # moto signals the broker without waiting for it; this reload is confirmed on return,
        # so a certificate revoked by the previous test is accepted again from here on.
        await self.iot_broker.reload()
        await self._create_stream()


# --------------------------------------------------------------------------------------------
# A sandbox on a loop of its own


class SandboxThread:
    """A :class:`Sandbox` running on a private event loop in a background thread.

    For code that cannot keep one event loop for the sandbox's whole life (pytest gives every
    test its own loop): coroutines are handed to the sandbox's loop and their results handed
    back, so nothing the sandbox owns is touched from another loop or thread.

    Use as a (sync) context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        directory: the sandbox directory.
        start_timeout: seconds to wait for the sandbox to start.
        **options: passed to :class:`Sandbox`.
    """

    def __init__(self, directory: Path, *, start_timeout: float = 60.0, **options: Any) -> None:
        self._directory = directory
        self._start_timeout = start_timeout
        self._options = options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sandbox: Sandbox | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready: concurrent.futures.Future[SandboxDescription] = concurrent.futures.Future()

    @property
    def sandbox(self) -> Sandbox:
        """The running sandbox; touch it only through :meth:`run` or :meth:`run_sync`.

        Raises:
            SandboxUsageError: not running.
        """
        if self._sandbox is None:
            msg = "the sandbox thread is not running"
            raise SandboxUsageError(msg)
        return self._sandbox

    @property
    def description(self) -> SandboxDescription:
        """How to reach the sandbox (taken on its loop, so it is consistent)."""
        return self.run_sync(_describe)

    def start(self) -> SandboxDescription:
        """Start the thread and the sandbox on it; return once the sandbox runs.

        Returns:
            The sandbox's description.

        Raises:
            SandboxUsageError: already started.
            TimeoutError: the sandbox did not start within ``start_timeout``.
            Exception: whatever the sandbox's start raised.
        """
        if self._thread is not None:
            msg = "the sandbox thread is already started"
            raise SandboxUsageError(msg)
        self._thread = threading.Thread(target=self._main, name="ztp-sandbox", daemon=True)
        self._thread.start()
        try:
            return self._ready.result(timeout=self._start_timeout)
        except BaseException:
            self.stop()
            raise

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        try:
            async with Sandbox(self._directory, **self._options) as sandbox:
                self._sandbox = sandbox
                self._ready.set_result(sandbox.description)
                await self._stop_event.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
                return
            raise
        finally:
            self._sandbox = None

    def submit(
        self, work: Callable[[Sandbox], Coroutine[Any, Any, T]]
    ) -> concurrent.futures.Future[T]:
        """Run ``work(sandbox)`` on the sandbox's loop.

        Args:
            work: a coroutine function taking the sandbox.

        Returns:
            A thread-safe future of its result (cancelling it cancels the work).

        Raises:
            SandboxUsageError: not running.
        """
        sandbox, loop = self.sandbox, self._loop
        if loop is None:
            msg = "the sandbox thread is not running"
            raise SandboxUsageError(msg)
        return asyncio.run_coroutine_threadsafe(work(sandbox), loop)

    async def run(self, work: Callable[[Sandbox], Coroutine[Any, Any, T]]) -> T:
        """Run ``work(sandbox)`` on the sandbox's loop and await its result from this loop."""
        return await asyncio.wrap_future(self.submit(work))

    def run_sync(
        self, work: Callable[[Sandbox], Coroutine[Any, Any, T]], *, timeout: float = 30.0
    ) -> T:
        """Run ``work(sandbox)`` on the sandbox's loop and block until its result.

        Raises:
            TimeoutError: no result within ``timeout`` seconds (the work is cancelled).
        """
        future = self.submit(work)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the sandbox and the thread; safe to call twice.

        Raises:
            TimeoutError: the thread did not end within ``timeout`` seconds.
        """
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            msg = f"the sandbox thread did not stop within {timeout} s"
            raise TimeoutError(msg)
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


async def _describe(sandbox: Sandbox) -> SandboxDescription:
    return sandbox.description
