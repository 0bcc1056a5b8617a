"""``ztp-sandbox demo``: a fleet of untouched gateways provisions itself into the sandbox.

Theory of operation
-------------------
:func:`run_demo` starts, in one working directory (a fresh temporary one unless given)::

    DIR/sandbox/        the whole local cloud (:class:`~sandbox.world.Sandbox`), in this process
    DIR/cloud/          one ``ztp-cloud run`` process: its SQLite store and ``cloud.log``
    DIR/gw-<serial>/    per gateway: ``ztp.toml``, the password file, the state directory and
                        ``daemon.log`` of one ``ztp-daemon run`` process

As soon as a gateway's daemon starts, a tiny producer in the demo hands it a few readings through
its ingestion socket (``state/ingest.sock``), as any program on the gateway would, long before the
gateway has a certificate: they wait in its durable outbox (``state/outbox.sqlite3``, through a
SIGKILL too, with ``--crash``) and the daemon publishes them to the IoT broker once it holds a
certificate. Once a gateway is provisioned, the producer hands it one more reading, live. Its
heartbeat (``dt/<serial>/health``) is counted among the messages, not among the readings.

While the fleet provisions, a progress tick (every ``tick`` seconds) reads each gateway's state
file (what ``ztp-daemon status --json`` prints, through the same function), the fragments the
AirVantage emulator sent it and the acks it returned, and the messages an observer client
(the IoT broker's read-everything certificate) counted on ``dt/<serial>/...``. A gateway's
provisioning latency is the time from its process start to the write of its ``provisioned``
state record (the record's mtime).

The run ends when every gateway is provisioned and all its readings arrived, when the timeout
passes, when a gateway's daemon exits, or when ``shutdown()`` returns (Ctrl-C). Then IoT is
asked, through aiobotocore, for every certificate (ListCertificates) and each gateway's thing
principals, giving the active certificates and the duplicates (every active certificate beyond
one per gateway). Every process started is stopped (SIGTERM, then SIGKILL after a bound), and
the sandbox after them, whatever happened.

The decisions (percentiles, failures, the summary and its text) are pure functions over
:class:`GatewayProgress` snapshots, so they are tested without processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TextIO

import aiomqtt
import structlog
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from sandbox.brokers import BrokerAddress, ClientCertificate, client_tls_context
from sandbox.errors import SandboxError, SandboxUsageError
from sandbox.world import MQTT_SOCKET_OPTIONS, DeviceCredentials, Sandbox
from shared.errors import TransportError, ZtpError

__all__ = [
    "DEFAULT_DEVICES",
    "DEFAULT_MESSAGES",
    "DEFAULT_TIMEOUT",
    "LIVE_READINGS",
    "DemoOptions",
    "DemoSummary",
    "GatewayFailure",
    "GatewayProgress",
    "failures_of",
    "percentile",
    "render_progress",
    "render_summary",
    "run_demo",
    "summarize",
]

DEFAULT_DEVICES: Final = 10
DEFAULT_MESSAGES: Final = 3
DEFAULT_TIMEOUT: Final = 120.0
_CLOUD_READY_TIMEOUT: Final = 30.0
_STOP_TIMEOUT: Final = 10.0
_TELEMETRY: Final = "demo"
_PROVISIONED: Final = "provisioned"
_CRASH_STATES: Final = frozenset({"key_ready", "request_sent"})
#: Readings each gateway gets through its ingestion socket once provisioned.
LIVE_READINGS: Final = 1
_LIVE_OK: Final = "ok"
_INGEST_WAIT: Final = 10.0

_log = structlog.get_logger()


# --------------------------------------------------------------------------------------------
# What the demo reports (pure)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """How the demo runs.

    Attributes:
        devices: how many gateways (each its own ``ztp-daemon`` process).
        messages: readings each gateway gets through its ingestion socket at start-up.
        timeout: seconds from the first gateway's start until the run gives up.
        directory: the working directory; a new one under /tmp when None.
        keep: keep the working directory after a run that succeeded (a failed run's is always
            kept, for its logs).
        tick: seconds between progress reports.
        crash: how many gateways get SIGKILLed once mid-provisioning (the first time they are
            seen in ``key_ready`` or ``request_sent``) and are started again, to show that they
            resume with the same key and request and that the cloud issues no second
            certificate.
    """

    devices: int = DEFAULT_DEVICES
    messages: int = DEFAULT_MESSAGES
    timeout: float = DEFAULT_TIMEOUT
    directory: Path | None = None
    keep: bool = True
    tick: float = 0.25
    crash: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 1000:
            msg = f"devices must be in 1..1000, got {self.devices}"
            raise SandboxUsageError(msg)
        if not 0 <= self.messages <= 1000:
            msg = f"messages must be in 0..1000, got {self.messages}"
            raise SandboxUsageError(msg)
        if not 0 <= self.crash <= self.devices:
            msg = f"crash must be in 0..devices ({self.devices}), got {self.crash}"
            raise SandboxUsageError(msg)
        if not (self.timeout > 0 and self.tick > 0):
            msg = "timeout and tick must be positive"
            raise SandboxUsageError(msg)


@dataclass(frozen=True, slots=True)
class GatewayProgress:
    """One gateway at one moment of the demo.

    Attributes:
        serial: its serial (and thing name).
        state: its provisioning state (``fresh`` before its first record).
        attempts: how many times it sent its certificate request.
        last_error: the reason of its last failed delivery, if any.
        fragments_sent: certificate fragments the AirVantage emulator sent it (tasks, once each).
        fragments_acked: of those, the ones in tasks it acknowledged OK.
        messages: messages from it counted at the IoT broker (any ``dt/<serial>/...`` topic:
            its queued readings, QoS 1 repeats and its heartbeats included).
        readings: distinct queued readings of it that reached the IoT broker.
        provisioned_after: seconds from its process start to its ``provisioned`` record.
        exit_code: its daemon's exit status, once it has exited.
        restarts: how many times the demo SIGKILLed and restarted its daemon.
        live: how handing readings in went: None before the live one was sent, ``"ok"`` once
            the ingestion socket accepted it, else why not (``"at boot, ..."`` when the readings
            handed in at start-up were not accepted).
    """

    serial: str
    state: str = "fresh"
    attempts: int = 0
    last_error: str | None = None
    fragments_sent: int = 0
    fragments_acked: int = 0
    messages: int = 0
    readings: int = 0
    provisioned_after: float | None = None
    exit_code: int | None = None
    restarts: int = 0
    live: str | None = None

    @property
    def provisioned(self) -> bool:
        """Whether its certificate is stored."""
        return self.state == _PROVISIONED


@dataclass(frozen=True, slots=True)
class GatewayFailure:
    """A gateway that did not make it, and why."""

    serial: str
    reason: str

    def to_json(self) -> dict[str, str]:
        """Return ``{"serial", "reason"}``."""
        return {"serial": self.serial, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What the demo shows at the end (``--json`` prints :meth:`to_json`).

    Attributes:
        devices: gateways started.
        provisioned: gateways whose certificate is stored.
        active_certificates: ACTIVE certificates in (sandboxed) AWS IoT.
        duplicate_certificates: active certificates beyond one per provisioned gateway.
        messages_received: messages counted at the IoT broker on the gateways' topics.
        messages_expected: readings queued in all outboxes and handed in live.
        readings_received: distinct queued readings that reached the IoT broker.
        wall_seconds: from the first gateway's start to the end of the run.
        provision_p50_seconds: median provisioning latency (None: nothing provisioned).
        provision_p99_seconds: 99th percentile provisioning latency.
        failures: every gateway that failed, with why.
        directory: the working directory (logs, state).
        interrupted: the run was stopped from outside (Ctrl-C) before it ended.
        restarted: gateways SIGKILLed mid-provisioning and started again.
    """

    devices: int
    provisioned: int
    active_certificates: int
    duplicate_certificates: int
    messages_received: int
    messages_expected: int
    readings_received: int
    wall_seconds: float
    provision_p50_seconds: float | None
    provision_p99_seconds: float | None
    failures: tuple[GatewayFailure, ...]
    directory: Path
    interrupted: bool = False
    restarted: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Every gateway provisioned, no duplicate, every reading arrived, not interrupted."""
        return not self.failures and not self.interrupted and self.duplicate_certificates == 0

    def to_json(self) -> dict[str, Any]:
        """One JSON object with the figures the issue names (and a few more)."""

        def seconds(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "devices": self.devices,
            "provisioned": self.provisioned,
            "active_certificates": self.active_certificates,
            "duplicate_certificates": self.duplicate_certificates,
            "messages_received": self.messages_received,
            "messages_expected": self.messages_expected,
            "readings_received": self.readings_received,
            "wall_seconds": round(self.wall_seconds, 3),
            "provision_p50_seconds": seconds(self.provision_p50_seconds),
            "provision_p99_seconds": seconds(self.provision_p99_seconds),
            "failures": [failure.to_json() for failure in self.failures],
            "interrupted": self.interrupted,
            "restarted": list(self.restarted),
            "directory": str(self.directory),
        }


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile of ``values`` (None when empty).

    Args:
        values: the samples, in any order.
        fraction: in (0, 1]: 0.5 for the median, 0.99 for p99.

    Returns:
        The smallest sample with at least ``fraction`` of the samples at or below it.

    Raises:
        SandboxUsageError: ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        msg = f"fraction must be in (0, 1], got {fraction}"
        raise SandboxUsageError(msg)
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def failures_of(
    progress: Sequence[GatewayProgress], *, messages: int, ended_by: str | None
) -> tuple[GatewayFailure, ...]:
    """Every gateway that did not provision or whose readings did not all arrive, and why.

    Args:
        progress: each gateway's last snapshot.
        messages: readings each gateway should have delivered (queued and live).
        ended_by: why the run ended early (``"timeout after 120 s"``), or None if it finished.

    Returns:
        One failure per gateway that failed, in the order given.
    """
    found: list[GatewayFailure] = []
    for gateway in progress:
        reason: str | None = None
        if gateway.exit_code is not None and not gateway.provisioned:
            reason = f"ztp-daemon exited with status {gateway.exit_code} in state {gateway.state}"
        elif not gateway.provisioned:
            reason = f"still {gateway.state}"
            details = [f"request sent {gateway.attempts}x"]
            if gateway.fragments_sent:
                details.append(
                    f"{gateway.fragments_acked}/{gateway.fragments_sent} fragments acked"
                )
            if gateway.last_error:
                details.append(f"last error: {gateway.last_error}")
            reason += f" ({', '.join(details)})"
        elif gateway.live is not None and gateway.live != _LIVE_OK:
            reason = f"provisioned, but handing in a reading failed: {gateway.live}"
        elif gateway.readings < messages:
            reason = f"provisioned, but {gateway.readings}/{messages} readings reached IoT"
            if gateway.exit_code is not None:
                reason += f"; ztp-daemon exited with status {gateway.exit_code}"
        elif gateway.exit_code is not None:
            reason = f"provisioned, but ztp-daemon exited with status {gateway.exit_code}"
        if reason is not None:
            if ended_by is not None:
                reason += f" at {ended_by}"
            found.append(GatewayFailure(gateway.serial, reason))
    return tuple(found)


def summarize(
    progress: Sequence[GatewayProgress],
    *,
    messages: int,
    active_by_gateway: Mapping[str, int],
    active_certificates: int,
    wall_seconds: float,
    ended_by: str | None,
    directory: Path,
    interrupted: bool = False,
) -> DemoSummary:
    """Build the summary from the last snapshots and what IoT holds.

    Args:
        progress: each gateway's last snapshot.
        messages: readings each gateway should have delivered.
        active_by_gateway: ACTIVE certificates attached to each gateway's thing.
        active_certificates: ACTIVE certificates in IoT altogether.
        wall_seconds: the run's wall time.
        ended_by: why the run ended early, or None.
        directory: the working directory.
        interrupted: stopped from outside.

    Returns:
        The summary; a provisioned gateway without exactly one active certificate is a failure.
    """
    failures = list(failures_of(progress, messages=messages, ended_by=ended_by))
    failed = {failure.serial for failure in failures}
    holders = 0
    for gateway in progress:
        count = active_by_gateway.get(gateway.serial, 0)
        holders += count > 0
        if gateway.provisioned and count != 1 and gateway.serial not in failed:
            failures.append(
                GatewayFailure(gateway.serial, f"provisioned, but {count} active certificates")
            )
    latencies = [g.provisioned_after for g in progress if g.provisioned_after is not None]
    return DemoSummary(
        devices=len(progress),
        provisioned=sum(g.provisioned for g in progress),
        active_certificates=active_certificates,
        # Any active certificate beyond one per gateway: a second one for a thing, or an orphan.
        duplicate_certificates=max(0, active_certificates - holders),
        messages_received=sum(g.messages for g in progress),
        messages_expected=messages * len(progress),
        readings_received=sum(g.readings for g in progress),
        wall_seconds=wall_seconds,
        provision_p50_seconds=percentile(latencies, 0.5),
        provision_p99_seconds=percentile(latencies, 0.99),
        failures=tuple(failures),
        directory=directory,
        interrupted=interrupted,
        restarted=tuple(g.serial for g in progress if g.restarts),
    )


def render_progress(
    progress: Sequence[GatewayProgress], *, elapsed: float, messages: int, rows: int = 20
) -> str:
    """The live view: the overall line, then one line per gateway (at most ``rows``).

    Args:
        progress: each gateway's snapshot.
        elapsed: seconds since the first gateway started.
        messages: readings each gateway should deliver.
        rows: gateway lines to show; the rest are summed up in one line.

    Returns:
        The text, without a trailing newline.
    """
    done = sum(g.provisioned for g in progress)
    received = sum(g.readings for g in progress)
    lines = [
        f"elapsed {elapsed:6.1f} s   provisioned {done}/{len(progress)}   "
        f"readings at IoT {received}/{messages * len(progress)}",
        f"  {'gateway':<16} {'state':<14} {'fragments':>9}  {'publishing':<10}",
    ]
    for gateway in progress[:rows]:
        fragments = (
            f"{gateway.fragments_acked}/{gateway.fragments_sent}" if gateway.fragments_sent else "-"
        )
        publishing = (
            f"{gateway.readings}/{messages} ({gateway.messages} msgs)"
            if gateway.provisioned
            else "-"
        )
        state = gateway.state if gateway.exit_code is None else f"exited {gateway.exit_code}"
        lines.append(f"  {gateway.serial:<16} {state:<14} {fragments:>9}  {publishing:<10}")
    if len(progress) > rows:
        rest = progress[rows:]
        lines.append(
            f"  ... {len(rest)} more: {sum(g.provisioned for g in rest)} provisioned, "
            f"{sum(g.readings for g in rest)} readings"
        )
    return "\n".join(lines)


def render_summary(summary: DemoSummary) -> str:
    """The closing text a person reads.

    Args:
        summary: the run's summary.

    Returns:
        The text, without a trailing newline.
    """

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f} s"

    verdict = "ok" if summary.ok else ("INTERRUPTED" if summary.interrupted else "FAILED")
    lines = [
        f"ztp demo {verdict}: {summary.provisioned}/{summary.devices} gateways provisioned "
        f"in {summary.wall_seconds:.2f} s",
        f"  active certificates in IoT   {summary.active_certificates}"
        f" ({summary.duplicate_certificates} duplicates)",
        f"  messages received at IoT     {summary.messages_received}"
        f" ({summary.readings_received} of {summary.messages_expected} readings)",
        f"  provisioning latency         p50 {seconds(summary.provision_p50_seconds)}"
        f"   p99 {seconds(summary.provision_p99_seconds)}",
    ]
    if summary.restarted:
        lines.append(f"  SIGKILLed mid-provisioning and restarted: {', '.join(summary.restarted)}")
    if summary.failures:
        lines.append(f"  failed gateways ({len(summary.failures)}):")
        lines += [f"    {failure.serial}: {failure.reason}" for failure in summary.failures]
        lines.append(f"  logs and state kept in {summary.directory}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Processes


class _Child:
    """One child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.started = time.time()

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode

    async def stop(self, within: float = _STOP_TIMEOUT) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(within):
                    await self.process.wait()
            except TimeoutError:
                _log.warning("demo.kill", process=self.name, after_s=within)
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
        await self.process.wait()


async def _stop_all(children: Sequence[_Child]) -> None:
    """Stop every child at once (shielded: a cancelled caller still waits for it)."""

    async def stop() -> None:
        async with asyncio.TaskGroup() as group:
            for child in children:
                group.create_task(child.stop(), name=f"demo.stop.{child.name}")

    stopping = asyncio.create_task(stop(), name="demo.stop")
    try:
        await asyncio.shield(stopping)
    except asyncio.CancelledError:
        await stopping
        raise


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    # A clean slate: a ZTP_* variable of the caller's shell would override the demo's files.
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ZTP_", "NOTIFY_", "WATCHDOG_", "AWS_"))
    }
    return {**clean, **extra}


class _CloudDaemon:
    """``ztp-cloud run`` against the sandbox; its JSON log lines copied into ``cloud.log``."""

    def __init__(self, directory: Path, sandbox: Sandbox) -> None:
        self._directory = directory
        self._sandbox = sandbox
        self._child: _Child | None = None
        self._ready = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    @property
    def child(self) -> _Child:
        assert self._child is not None
        return self._child

    async def __aenter__(self) -> Self:
        self._directory.mkdir(parents=True, exist_ok=True)
        description = self._sandbox.description
        access = description.airvantage
        secret_file = self._directory / "airvantage-client-secret"
        _write_private(secret_file, access.client_secret + "\n")
        env = _child_env(
            {
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "ZTP_CLOUD_AWS_ENDPOINT_URL": description.aws_endpoint_url,
                "ZTP_CLOUD_AWS_REGION": description.region,
                "ZTP_CLOUD_AWS_MAX_ATTEMPTS": "1",
                "ZTP_CLOUD_KINESIS_STREAM": description.kinesis_stream,
                "ZTP_CLOUD_KINESIS_WORKER_ID": "ztp-demo-cloud",
                "ZTP_CLOUD_KINESIS_MAX_IDLE_WAIT": "0.2",
                "ZTP_CLOUD_KINESIS_DISCOVERY_INTERVAL": "1",
                "ZTP_CLOUD_KINESIS_DRAIN_TIMEOUT": "2",
                "ZTP_CLOUD_AIRVANTAGE_API_URL": access.api_url,
                "ZTP_CLOUD_AIRVANTAGE_CLIENT_ID": access.client_id,
                "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE": str(secret_file),
                "ZTP_CLOUD_AIRVANTAGE_POLL_INTERVAL": "0.2",
                "ZTP_CLOUD_STORE_PATH": str(self._directory / "store"),
                "ZTP_CLOUD_HTTP_HOST": "127.0.0.1",
                "ZTP_CLOUD_HTTP_PORT": "0",
            }
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cloud_daemon",
            "run",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        self._child = _Child("ztp-cloud", process)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._copy_log(process), name="demo.cloud-log")
        return self

    async def _copy_log(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        with (self._directory / "cloud.log").open("ab") as log:
            while line := await process.stdout.readline():
                log.write(line)
                log.flush()
                if not self._ready.is_set() and b'"service.ready"' in line:
                    self._ready.set()
        self._ready.set()  # it exited: wake wait_ready, which then sees the exit

    async def wait_ready(self, within: float = _CLOUD_READY_TIMEOUT) -> None:
        """Wait for ``service.ready``.

        Raises:
            SandboxError: the daemon exited or was not ready in time.
        """
        try:
            async with asyncio.timeout(within):
                await self._ready.wait()
        except TimeoutError:
            msg = f"ztp-cloud was not ready within {within:g} s; see {self._log_file}"
            raise SandboxError(msg) from None
        if self.child.exit_code is not None:
            msg = f"ztp-cloud exited with status {self.child.exit_code}; see {self._log_file}"
            raise SandboxError(msg)

    @property
    def _log_file(self) -> Path:
        return self._directory / "cloud.log"

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._child is not None:
            await _stop_all([self._child])
        if self._group is not None:
            await self._group.__aexit__(None, None, None)


def _write_private(path: Path, text: str) -> None:
    """Write a secret file 0600, atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


@dataclass(slots=True)
class _Gateway:
    """One gateway's files and, once started, its ``ztp-daemon`` process."""

    credentials: DeviceCredentials
    directory: Path
    child: _Child | None = None
    provisioned_after: float | None = None
    # Set when the demo stops the daemon: its exit from then on is ours, not a failure.
    stopped: bool = False
    exit_before_stop: int | None = None
    restarts: int = 0
    live: str | None = None

    @property
    def exit_code(self) -> int | None:
        if self.stopped:
            return self.exit_before_stop
        return None if self.child is None else self.child.exit_code

    @property
    def serial(self) -> str:
        return self.credentials.serial

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def config_file(self) -> Path:
        return self.directory / "ztp.toml"


def _gateway_config(gateway: _Gateway, sandbox: Sandbox) -> str:
    device = sandbox.device_broker.address
    iot = sandbox.iot_broker.address
    return f"""\
# Written by ztp-sandbox demo: one gateway against the sandbox.
[device]
serial = "{gateway.serial}"
state_dir = "{gateway.state_dir}"

[airvantage]
host = "{device.host}"
port = {device.port}
tls = false
password_file = "{gateway.directory / "airvantage-password"}"
connect_timeout = 5.0
backoff_base = 0.1
backoff_cap = 2.0
min_connect_interval = 0.1

[verification]
check_cn = true
ca_bundle = "{sandbox.pki.ca_file}"

[retry]
first = 10.0
cap = 30.0

[publisher]
enabled = true
host = "{iot.host}"
port = {iot.port}
ca_file = "{iot.ca_file}"

[log]
destination = "stderr"
level = "info"
"""


async def _prepare_gateway(gateway: _Gateway, sandbox: Sandbox) -> None:
    """Write the gateway's configuration and password file."""
    gateway.directory.mkdir(parents=True, exist_ok=True)
    _write_private(gateway.directory / "airvantage-password", gateway.credentials.password + "\n")
    gateway.config_file.write_text(_gateway_config(gateway, sandbox))


async def _spawn_gateway(gateway: _Gateway) -> None:
    # The log file is the child's stderr itself: nothing to copy, nothing to block on.
    with (gateway.directory / "daemon.log").open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ztp_daemon",
            "run",
            "--config",
            str(gateway.config_file),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_child_env({}),
        )
    first = gateway.child
    gateway.child = _Child(f"ztp-daemon.{gateway.serial}", process)
    if first is not None:
        # Latency counts from the gateway's first start, restarts included.
        gateway.child.started = first.started


async def _exchange(path: Path, lines: bytes, count: int) -> list[Any]:
    """Write ``lines`` to the socket at ``path`` and read ``count`` JSON replies."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(lines)
        await writer.drain()
        return [json.loads(await reader.readline()) for _ in range(count)]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _hand_in(
    gateway: _Gateway, readings: Sequence[int], *, live: bool, wait: float | None = _INGEST_WAIT
) -> str:
    """Hand readings to the gateway's ingestion socket, as a program on the gateway would.

    Args:
        gateway: whose socket.
        readings: the reading numbers to hand in, one line each.
        live: marks the readings handed in once provisioned.
        wait: how long to keep trying (the socket opens a moment after the daemon starts);
            None: until cancelled.

    Returns:
        ``"ok"`` once the daemon accepted every one (committed to its outbox), else why not.
    """
    path = gateway.state_dir / "ingest.sock"
    topic = f"dt/{gateway.serial}/{_TELEMETRY}"
    lines = b"".join(
        json.dumps(
            {"topic": topic, "payload": {"serial": gateway.serial, "reading": r, "live": live}}
        ).encode()
        + b"\n"
        for r in readings
    )
    last_error: Exception | None = None
    try:
        async with asyncio.timeout(wait):
            while True:
                try:
                    replies = await _exchange(path, lines, len(readings))
                    break
                except (OSError, ValueError) as exc:
                    # Not open yet (the daemon opens it a moment after it starts), or the daemon
                    # went away mid-exchange (a --crash restart): unanswered lines go again.
                    last_error = exc
                    await asyncio.sleep(0.05)
    except TimeoutError:
        return f"no answer on {path} within {wait:g} s (last error: {last_error})"
    for reply in replies:
        if not (isinstance(reply, dict) and reply.get("ok") is True):
            error = reply.get("error") if isinstance(reply, dict) else reply
            return f"refused by the ingestion socket: {error}"
    return _LIVE_OK


# --------------------------------------------------------------------------------------------
# Watching: the IoT broker, the emulator, the state files


class _Observer:
    """Counts the messages on ``dt/<thing>/...`` at the IoT broker, and the distinct readings."""

    def __init__(self, address: BrokerAddress, certificate: ClientCertificate) -> None:
        self._address = address
        self._certificate = certificate
        self.counts: Counter[str] = Counter()
        self.readings: dict[str, set[int]] = {}
        self._subscribed = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._run(), name="demo.observer")
        try:
            async with asyncio.timeout(10):
                await self._subscribed.wait()
        except TimeoutError:
            await self.__aexit__(None, None, None)
            msg = "the IoT broker observer did not subscribe within 10 s"
            raise SandboxError(msg) from None
        return self

    async def _run(self) -> None:
        context = await asyncio.to_thread(client_tls_context, self._address, self._certificate)
        client = aiomqtt.Client(
            self._address.host,
            self._address.port,
            identifier=f"ztp-demo-observer-{secrets.token_hex(4)}",
            tls_context=context,
            socket_options=MQTT_SOCKET_OPTIONS,
            max_queued_incoming_messages=0,
        )
        try:
            async with client:
                await client.subscribe("dt/#", qos=1)
                self._subscribed.set()
                async for message in client.messages:
                    parts = message.topic.value.split("/")
                    if len(parts) >= 3:
                        self.counts[parts[1]] += 1
                    if len(parts) == 3 and parts[2] == _TELEMETRY:
                        self._reading(parts[1], message.payload)
        except aiomqtt.MqttError as exc:
            msg = f"the IoT broker observer lost its connection: {exc}"
            raise TransportError(msg) from exc

    def _reading(self, serial: str, payload: object) -> None:
        # QoS 1 may repeat a reading (a crash between PUBACK and the row's delete): count each
        # reading once, by the number the demo gave it.
        if not isinstance(payload, bytes | bytearray):
            return
        try:
            reading = json.loads(payload)["reading"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(reading, int):
            self.readings.setdefault(serial, set()).add(reading)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel("demo over")
        if self._group is not None:
            with contextlib.suppress(TransportError):
                await self._group.__aexit__(None, None, None)


def _fragments(sandbox: Sandbox) -> tuple[Counter[str], Counter[str]]:
    """Per serial: fragments sent in tasks (each task once), fragments in tasks acked OK."""
    emulator = sandbox.emulator
    ok = {(a.serial, a.uid) for a in emulator.acks_seen if a.status == "OK"}
    sent: Counter[str] = Counter()
    acked: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for task in emulator.tasks_published:
        key = (task.serial, task.task_uid)
        if key in seen:
            continue
        seen.add(key)
        count = _fragment_count(task.payload)
        sent[task.serial] += count
        if key in ok:
            acked[task.serial] += count
    return sent, acked


def _fragment_count(payload: Any) -> int:
    # A task payload is a list of tasks; a delivery's fragments are its command's parameters.
    items = payload if isinstance(payload, list) else [payload]
    count = 0
    for item in items:
        command = item.get("command") if isinstance(item, Mapping) else None
        params = command.get("params") if isinstance(command, Mapping) else None
        if isinstance(params, Mapping):
            count += len(params)
    return count


def _read_state(gateway: _Gateway) -> tuple[dict[str, Any], float | None]:
    """The gateway's status report (as ``ztp-daemon status --json``) and its record's mtime."""
    from ztp_daemon.__main__ import status_report  # noqa: PLC0415 - device side, demo only
    from ztp_daemon.errors import StorageError  # noqa: PLC0415

    try:
        report = status_report(gateway.state_dir)
    except StorageError as exc:
        return {"state": "unreadable", "last_error": str(exc)}, None
    try:
        mtime = (gateway.state_dir / "state.json").stat().st_mtime
    except OSError:
        mtime = None
    return report, mtime


async def _snapshot(
    gateways: Sequence[_Gateway], sandbox: Sandbox, observer: _Observer
) -> list[GatewayProgress]:
    reports = await asyncio.to_thread(lambda: [_read_state(g) for g in gateways])
    sent, acked = _fragments(sandbox)
    progress: list[GatewayProgress] = []
    for gateway, (report, mtime) in zip(gateways, reports, strict=True):
        state = str(report.get("state", "unknown"))
        child = gateway.child
        if state == _PROVISIONED and gateway.provisioned_after is None and child is not None:
            written = mtime if mtime is not None else time.time()
            gateway.provisioned_after = max(0.0, written - child.started)
        progress.append(
            GatewayProgress(
                serial=gateway.serial,
                state=state,
                attempts=int(report.get("attempts") or 0),
                last_error=report.get("last_error"),
                fragments_sent=sent[gateway.serial],
                fragments_acked=acked[gateway.serial],
                messages=observer.counts[gateway.serial],
                readings=len(observer.readings.get(gateway.serial, ())),
                provisioned_after=gateway.provisioned_after,
                exit_code=gateway.exit_code,
                restarts=gateway.restarts,
                live=gateway.live,
            )
        )
    return progress


async def _certificates(sandbox: Sandbox, serials: Sequence[str]) -> tuple[int, dict[str, int]]:
    """ACTIVE certificates in IoT, and how many are attached to each gateway's thing.

    Raises:
        TransportError: moto did not answer.
    """
    try:
        async with get_session().create_client("iot", **sandbox.aws.client_kwargs()) as iot:
            status: dict[str, str] = {}
            marker: str | None = None
            while True:
                page = await iot.list_certificates(
                    pageSize=250, **({"marker": marker} if marker else {})
                )
                for certificate in page.get("certificates", []):
                    status[certificate["certificateArn"]] = certificate["status"]
                marker = page.get("nextMarker")
                if not marker:
                    break
            by_gateway: dict[str, int] = {}
            for serial in serials:
                try:
                    answer = await iot.list_thing_principals(thingName=serial)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "ResourceNotFoundException":
                        by_gateway[serial] = 0
                        continue
                    raise
                by_gateway[serial] = sum(
                    status.get(arn) == "ACTIVE" for arn in answer.get("principals", [])
                )
    except (BotoCoreError, ClientError) as exc:
        msg = f"cannot list the certificates in IoT: {exc}"
        raise TransportError(msg) from exc
    return sum(value == "ACTIVE" for value in status.values()), by_gateway


# --------------------------------------------------------------------------------------------
# The run


def _new_directory() -> Path:
    # mosquitto cannot configure paths with whitespace: a short /tmp path is safest.
    return Path(tempfile.mkdtemp(prefix="ztp-demo-", dir="/tmp"))


async def run_demo(
    options: DemoOptions,
    *,
    shutdown: Callable[[], Awaitable[object]],
    on_progress: Callable[[Sequence[GatewayProgress], float], None] | None = None,
) -> DemoSummary:
    """Run the demo: sandbox, one cloud daemon, ``options.devices`` gateway daemons.

    Args:
        options: how many gateways, readings, the timeout, the working directory.
        shutdown: awaited alongside the run; when it returns first, the run stops early and
            the summary says ``interrupted``.
        on_progress: called every tick with each gateway's snapshot and the elapsed seconds.

    Returns:
        The summary (its ``ok`` says whether every gateway made it).

    Raises:
        SandboxError: the sandbox or the cloud daemon did not start.
        ZtpError: another failure of the sandbox's parts (moto, brokers).
    """
    directory = (options.directory or _new_directory()).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    summary = await _run_in(directory, options, shutdown, on_progress)
    if summary.ok and not options.keep:
        await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)
    return summary


class _Fleet:
    """The gateways' daemons during one run: start, watch, crash on purpose, stop."""

    def __init__(
        self,
        gateways: Sequence[_Gateway],
        *,
        sandbox: Sandbox,
        observer: _Observer,
        options: DemoOptions,
        on_progress: Callable[[Sequence[GatewayProgress], float], None] | None,
        cloud: _Child,
    ) -> None:
        self.gateways = list(gateways)
        self._cloud = cloud
        self._sandbox = sandbox
        self._observer = observer
        self._options = options
        self._on_progress = on_progress
        self._feeds: dict[str, asyncio.Task[None]] = {}
        self.began = time.monotonic()

    @property
    def children(self) -> list[_Child]:
        return [g.child for g in self.gateways if g.child is not None]

    async def start(self) -> None:
        async with asyncio.TaskGroup() as group:
            for gateway in self.gateways:
                group.create_task(
                    _prepare_gateway(gateway, self._sandbox),
                    name=f"demo.prepare.{gateway.serial}",
                )
        self.began = time.monotonic()
        for gateway in self.gateways:
            await _spawn_gateway(gateway)
            self._feeds[f"{gateway.serial}/boot"] = asyncio.create_task(
                self._feed_boot(gateway), name=f"demo.boot.{gateway.serial}"
            )

    async def snapshot(self) -> list[GatewayProgress]:
        return await _snapshot(self.gateways, self._sandbox, self._observer)

    async def _crash(self, progress: Sequence[GatewayProgress]) -> None:
        due = self._options.crash - sum(g.restarts for g in self.gateways)
        for gateway, seen in zip(self.gateways, progress, strict=True):
            if due <= 0:
                return
            if gateway.restarts or seen.state not in _CRASH_STATES or gateway.child is None:
                continue
            _log.info("demo.crash", gateway=gateway.serial, state=seen.state)
            gateway.child.process.kill()
            await gateway.child.process.wait()
            gateway.restarts += 1
            await _spawn_gateway(gateway)
            due -= 1

    def _feed(self, progress: Sequence[GatewayProgress]) -> None:
        """Start the live reading of each gateway newly provisioned (tasks kept, see stop)."""
        for gateway, seen in zip(self.gateways, progress, strict=True):
            if seen.provisioned and gateway.serial not in self._feeds:
                self._feeds[gateway.serial] = asyncio.create_task(
                    self._feed_one(gateway), name=f"demo.live.{gateway.serial}"
                )

    async def _feed_boot(self, gateway: _Gateway) -> None:
        # Handed in at boot, before the gateway has a certificate: they wait in its outbox.
        readings = range(1, self._options.messages + 1)
        if not readings:
            return
        # A fleet on two cores may take a while to boot: try until the run ends (it cancels).
        outcome = await _hand_in(gateway, readings, live=False, wait=None)
        _log.info("demo.boot_readings", gateway=gateway.serial, outcome=outcome)
        if outcome != _LIVE_OK:
            gateway.live = f"at boot, {outcome}"

    async def _feed_one(self, gateway: _Gateway) -> None:
        outcome = await _hand_in(gateway, [self._options.messages + 1], live=True)
        if gateway.live is None:  # a failure at boot stays the one reported
            gateway.live = outcome
        _log.info("demo.live_reading", gateway=gateway.serial, outcome=gateway.live)

    async def watch(self) -> str | None:
        """Report progress every tick until the run ends; return why it ended early, if so."""
        options = self._options
        expected = options.messages + LIVE_READINGS
        deadline = self.began + options.timeout
        while True:
            progress = await self.snapshot()
            if options.crash:
                await self._crash(progress)
            self._feed(progress)
            elapsed = time.monotonic() - self.began
            if self._on_progress is not None:
                self._on_progress(progress, elapsed)
            if all(g.provisioned and g.readings >= expected for g in progress):
                return None
            if any(g.live not in (None, _LIVE_OK) for g in progress):
                return f"a refused live reading after {elapsed:.1f} s"
            if any(g.exit_code is not None for g in progress):
                return f"a daemon's exit after {elapsed:.1f} s"
            if self._cloud.exit_code is not None:
                return f"ztp-cloud's exit with status {self._cloud.exit_code} after {elapsed:.1f} s"
            if time.monotonic() >= deadline:
                return f"the timeout of {options.timeout:g} s"
            await asyncio.sleep(options.tick)

    async def stop(self) -> None:
        """Stop the live producers and every daemon; exits from here on are not failures."""
        for task in self._feeds.values():
            task.cancel("demo over")
        await asyncio.gather(*self._feeds.values(), return_exceptions=True)
        for gateway in self.gateways:
            gateway.exit_before_stop, gateway.stopped = gateway.exit_code, True
        await _stop_all(self.children)


async def _run_in(
    directory: Path,
    options: DemoOptions,
    shutdown: Callable[[], Awaitable[object]],
    on_progress: Callable[[Sequence[GatewayProgress], float], None] | None,
) -> DemoSummary:
    async with contextlib.AsyncExitStack() as stack:
        sandbox = await stack.enter_async_context(
            Sandbox(directory / "sandbox", devices=options.devices)
        )
        iot = sandbox.iot_broker
        observer = await stack.enter_async_context(_Observer(iot.address, iot.observer))
        cloud = await stack.enter_async_context(_CloudDaemon(directory / "cloud", sandbox))
        await cloud.wait_ready()
        fleet = _Fleet(
            [_Gateway(c, directory / f"gw-{c.serial}") for c in sandbox.devices],
            sandbox=sandbox,
            observer=observer,
            options=options,
            on_progress=on_progress,
            cloud=cloud.child,
        )
        stack.push_async_callback(fleet.stop)
        await fleet.start()
        _log.info("demo.started", devices=options.devices, directory=str(directory))
        watching = asyncio.create_task(fleet.watch(), name="demo.watch")
        stopping = asyncio.create_task(_await(shutdown), name="demo.shutdown")
        try:
            await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watching, stopping):
                task.cancel("demo over")
            await asyncio.gather(watching, stopping, return_exceptions=True)
        wall = time.monotonic() - fleet.began
        interrupted = watching.cancelled()
        ended_by = "interruption" if interrupted else watching.result()
        # The daemons stop before IoT is counted: nothing is issued behind the count.
        await fleet.stop()
        progress = await fleet.snapshot()
        active, by_gateway = await _certificates(sandbox, [g.serial for g in fleet.gateways])
        summary = summarize(
            progress,
            messages=options.messages + LIVE_READINGS,
            active_by_gateway=by_gateway,
            active_certificates=active,
            wall_seconds=wall,
            ended_by=ended_by,
            directory=directory,
            interrupted=interrupted,
        )
        figures = {k: v for k, v in summary.to_json().items() if k != "failures"}
        _log.info("demo.finished", failed=len(summary.failures), **figures)
        return summary
    raise AssertionError  # pragma: no cover - the stack never swallows an exception


async def _await(shutdown: Callable[[], Awaitable[object]]) -> None:
    await shutdown()


# --------------------------------------------------------------------------------------------
# The command


class _Display:
    """Progress on a terminal (redrawn in place) or a pipe (a line for each change)."""

    def __init__(self, out: TextIO, *, messages: int) -> None:
        self._out = out
        self._messages = messages
        self._tty = out.isatty()
        self._drawn = 0
        self._states: dict[str, str] = {}
        self._totals: tuple[int, int] | None = None
        self._last_print = 0.0

    def progress(self, progress: Sequence[GatewayProgress], elapsed: float) -> None:
        if self._tty:
            text = render_progress(progress, elapsed=elapsed, messages=self._messages)
            if self._drawn:
                self._out.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the table's top
            self._out.write(text + "\n")
            self._drawn = text.count("\n") + 1
            self._out.flush()
            return
        # A pipe or a file: a line when a gateway changes state, and the overall line when the
        # totals change (or every 5 s), not every tick.
        for gateway in progress:
            state = gateway.state if gateway.exit_code is None else f"exited {gateway.exit_code}"
            if self._states.get(gateway.serial) != state:
                self._states[gateway.serial] = state
                self._out.write(f"  {elapsed:6.1f} s  {gateway.serial}  {state}\n")
        totals = (sum(g.provisioned for g in progress), sum(g.readings for g in progress))
        if totals != self._totals or elapsed - self._last_print >= 5:
            headline = render_progress(progress, elapsed=elapsed, messages=self._messages)
            self._out.write(headline.split("\n", 1)[0] + "\n")
            self._totals, self._last_print = totals, elapsed
        self._out.flush()


def demo_main(
    *,
    devices: int,
    as_json: bool,
    timeout: float,
    directory: Path | None,
    messages: int = DEFAULT_MESSAGES,
    crash: int = 0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the demo from the command line (``ztp-sandbox demo``); logs go to ``DIR/demo.log``.

    Args:
        devices: gateways to provision.
        as_json: print one JSON object instead of the live view and the summary text.
        timeout: seconds before the run gives up.
        directory: the working directory (kept), or None for a temporary one (removed when
            every gateway succeeded).
        messages: readings each gateway gets through its ingestion socket at start-up.
        crash: gateways to SIGKILL once mid-provisioning and start again.
        out: where the progress and the summary go.
        err: where errors go.

    Returns:
        0 when every gateway provisioned and published, 1 otherwise, 2 for bad arguments.
    """
    from shared.logs import configure_logging  # noqa: PLC0415

    try:
        options = DemoOptions(
            devices=devices,
            messages=messages,
            timeout=timeout,
            directory=(directory or _new_directory()).absolute(),
            keep=directory is not None,
            crash=crash,
        )
    except SandboxUsageError as exc:
        print(f"ztp-sandbox demo: {exc}", file=err)
        return 2
    assert options.directory is not None
    options.directory.mkdir(parents=True, exist_ok=True)
    display = _Display(out, messages=messages + LIVE_READINGS)
    if not as_json:
        kept = "" if options.keep else " (removed if all goes well)"
        out.write(
            f"ztp demo: {devices} gateways; sandbox, logs and state in {options.directory}{kept}\n"
        )
        out.flush()
    with (options.directory / "demo.log").open("a", encoding="utf-8") as log_stream:
        configure_logging(
            style="keyvalue",
            destination="stderr",
            ident="ztp-demo",
            level="info",
            stream=log_stream,
        )
        try:
            summary = asyncio.run(
                _main_async(options, on_progress=None if as_json else display.progress)
            )
        except (ZtpError, SandboxError) as exc:
            print(f"ztp-sandbox demo: {exc} (logs in {options.directory})", file=err)
            return 1
    if as_json:
        out.write(json.dumps(summary.to_json(), separators=(",", ":")) + "\n")
    else:
        out.write(render_summary(summary) + "\n")
    out.flush()
    return 0 if summary.ok else 1


async def _main_async(
    options: DemoOptions,
    *,
    on_progress: Callable[[Sequence[GatewayProgress], float], None] | None,
) -> DemoSummary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        return await run_demo(options, shutdown=stop.wait, on_progress=on_progress)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
