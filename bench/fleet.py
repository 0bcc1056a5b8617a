"""Fleet burst: N gateways ask for a certificate at once; the cloud daemon works at IoT's 15 TPS.

Run ``python -m bench.fleet [--quick] [--json]`` (or the whole suite, ``python -m bench``).

What runs, all on loopback:

- one sandbox (:class:`~sandbox.world.Sandbox`: brokers, moto with IoT throttling **on** at
  15 TPS per API, as AWS's quota, and the AirVantage emulator) in this process;
- one real ``ztp-cloud run`` process (its production rate limiter: 15 TPS per IoT API);
- the device side in one child process (``python -m bench.fleet devices``): N real device
  daemons' supervisors (:func:`ztp_daemon.supervisor.serve`: the provisioning machine, the
  AirVantage MQTT link, the key store, state file and bundle store on disk), each with its own
  serial, broker account and state directory, started together on one event loop. The child
  times each gateway from the burst's start to its ``provisioned`` state (certificate verified
  and stored), from the daemon's own log event.

The figure is ``fleet_quota_ratio`` = wall time ÷ (N / 15 s): 1.0 means the fleet provisioned
as fast as IoT's quota allows (CreateCertificateFromCsr, CreateThing, AttachThingPrincipal and
AttachPolicy each at most 15 per second); the goal is ≤ 1.05 with no failure. The cloud
daemon's CPU time over the burst (``/proc/<pid>/stat``) is reported per provisioned gateway for
:mod:`bench.cloud_cpu`.

The child is driven over stdin/stdout with JSON lines, so the same warm child also serves
:mod:`bench.single` (one gateway at a time).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import structlog

from bench.common import cpu_seconds, median
from sandbox.moto_fidelity import FidelityConfig
from sandbox.world import DeviceCredentials, Sandbox

__all__ = [
    "IOT_TPS",
    "CloudDaemon",
    "DeviceFleet",
    "FleetResult",
    "bench_sandbox",
    "cloud_timeline",
    "main",
    "quiet_logs",
    "run_fleet",
]

IOT_TPS: Final = 15.0
_PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
_READY_TIMEOUT: Final = 60.0
_PROVISIONED: Final = "provisioned"
_ADDRESS: Final = re.compile(r"0x[0-9a-f]+")
_STOP_TIMEOUT: Final = 30.0  # seconds the supervisors of a burst get to stop after it


# --------------------------------------------------------------------------------------------
# The device side, in a child process


@dataclass(frozen=True, slots=True)
class _BurstOutcome:
    began: float
    provisioned: dict[str, float]
    failed: dict[str, str]
    cpu_seconds: float


class _Watch:
    """A structlog processor: notes when each gateway reaches ``provisioned``, drops the rest."""

    def __init__(self) -> None:
        self.provisioned: dict[str, float] = {}
        self.expected: set[str] = set()
        self.done = asyncio.Event()
        self.warnings: dict[str, int] = {}

    def __call__(
        self, _logger: object, method: str, event: MutableMapping[str, Any]
    ) -> Mapping[str, Any]:
        if event.get("event") == "provisioning.state" and event.get("state") == _PROVISIONED:
            serial = str(event.get("serial"))
            self.provisioned.setdefault(serial, time.time())
            if self.expected <= self.provisioned.keys():
                self.done.set()
        elif method in {"error", "critical"}:
            sys.stderr.write(f"device: {event.get('event')} {event.get('reason', '')}\n")
        elif method == "warning":
            # Counted, not printed: how often links drop or sends are deferred says much.
            key = f"{event.get('event')}: {str(event.get('reason', ''))[:80]}"
            self.warnings[key] = self.warnings.get(key, 0) + 1
        raise structlog.DropEvent


def _device_config(spec: Mapping[str, Any], serial: str, password: str, root: Path) -> Any:
    from shared.config import Secret
    from ztp_daemon.config import (
        AirVantageSection,
        DeviceConfig,
        DeviceSection,
        LogSection,
        PublisherSection,
        RetrySection,
        VerificationSection,
    )

    return DeviceConfig(
        airvantage=AirVantageSection(
            password=Secret(password),
            host=spec["host"],
            port=int(spec["port"]),
            tls=False,
            connect_timeout=30.0,
            backoff_base=0.2,
            backoff_cap=5.0,
            min_connect_interval=0.2,
        ),
        device=DeviceSection(serial=serial, state_dir=root / serial),
        verification=VerificationSection(check_cn=True, ca_bundle=Path(spec["ca_file"])),
        # The last of N gateways waits N/15 s for its turn at IoT: no re-send before that.
        retry=RetrySection(first=float(spec["retry_first"]), cap=float(spec["retry_first"]) * 2),
        publisher=PublisherSection(enabled=False),
        log=LogSection(),
    )


async def _burst(
    spec: Mapping[str, Any], devices: Sequence[Sequence[str]], watch: _Watch, within: float
) -> _BurstOutcome:
    from ztp_daemon.supervisor import serve

    root = Path(spec["root"])
    configs = [_device_config(spec, serial, password, root) for serial, password in devices]
    watch.provisioned.clear()
    watch.expected = {serial for serial, _ in devices}
    watch.done.clear()
    stop = asyncio.Event()

    async def shutdown() -> None:
        await stop.wait()

    failed: dict[str, str] = {}
    cpu = time.process_time()
    began = time.time()

    async def one(config: Any, serial: str) -> None:
        try:
            await serve(config, shutdown=shutdown, serial=serial)
        except Exception as exc:  # noqa: BLE001 - one gateway's failure is a figure, not a crash
            failed[serial] = f"{type(exc).__name__}: {exc}"

    async with asyncio.TaskGroup() as group:
        tasks = [
            group.create_task(one(config, serial), name=f"bench.device.{serial}")
            for config, (serial, _) in zip(configs, devices, strict=True)
        ]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await watch.done.wait()
        cpu = time.process_time() - cpu
        stop.set()
        # The figures are taken: a supervisor that does not stop in time must not hang the
        # benchmark (it is named on stderr, a device-side finding of its own).
        _, late = await asyncio.wait(tasks, timeout=_STOP_TIMEOUT)
        if late:
            names = sorted(task.get_name() for task in late)
            sys.stderr.write(
                f"device: {len(late)} supervisors did not stop within {_STOP_TIMEOUT:g} s after"
                f" shutdown, cancelled: {', '.join(names[:5])}\n"
            )
            _dump_pending_tasks(sys.stderr)
            for task in late:
                task.cancel("bench: the supervisor did not stop after shutdown")
    for key, count in sorted(watch.warnings.items()):
        sys.stderr.write(f"device: {count} x warning {key}\n")
    watch.warnings.clear()
    for serial, _ in devices:
        if serial not in watch.provisioned and serial not in failed:
            failed[serial] = f"not provisioned within {within:g} s"
    return _BurstOutcome(began, dict(watch.provisioned), failed, cpu)


def _await_chain(task: asyncio.Task[Any]) -> list[str]:
    """Where a task waits: every coroutine of its await chain, innermost last.

    ``Task.print_stack`` shows only the task's own frame; a hang sits several awaits deeper.
    For a frame of an aiomqtt client (``self`` is one), the state of its paho client and
    whether the loop still watches its socket are added: the evidence a lost write needs.
    """
    lines: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            lines.append(f"  awaits {awaited!r:.200}")
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "Client" and hasattr(owner, "_client"):
            lines.append(f"    {_mqtt_client_state(owner)}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    return lines


def _mqtt_client_state(client: Any) -> str:
    paho = client._client  # a post-mortem reads private state
    sock = paho._sock
    fd = sock.fileno() if sock is not None else -1
    selector = getattr(asyncio.get_running_loop(), "_selector", None)
    key = None
    if selector is not None and fd >= 0:
        with contextlib.suppress(KeyError, ValueError):
            key = selector.get_key(fd)
    reader, writer = key.data if key is not None else (None, None)
    return (
        f"paho state={paho._state.name} fd={fd} out_packets={len(paho._out_packet)}"
        f" registered_write={paho._registered_write}"
        f" loop_reader={reader is not None} loop_writer={writer is not None}"
        f" pending_publishes={len(client._pending_publishes)}"
        f" disconnected={client._disconnected.done()}"
    )


def _dump_pending_tasks(out: Any) -> None:
    """Write every pending task's await chain to ``out``, identical chains once with a count."""
    chains: dict[tuple[str, ...], list[str]] = {}
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.done():
            continue
        chain = tuple(
            _ADDRESS.sub("0x…", line)
            for line in _await_chain(task)
            if not line.startswith("    paho")
        )
        chains.setdefault(chain, []).append(task.get_name())
    for chain, names in sorted(chains.items(), key=lambda item: -len(item[1])):
        out.write(f"device: {len(names)} pending task(s) {', '.join(sorted(names)[:5])}:\n")
        out.write("\n".join(chain) + "\n")
    # The aiomqtt clients' states, per task (they differ where the chains do not).
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.done():
            continue
        for line in _await_chain(task):
            if line.startswith("    paho"):
                out.write(f"device: {task.get_name()}: {line.strip()}\n")
    out.flush()


async def _device_child() -> int:
    # The supervisors' log events feed the watch and nothing else: a thousand gateways' lines
    # would cost more CPU than the gateways.
    watch = _Watch()
    structlog.configure(processors=[watch], cache_logger_on_first_use=False)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec: dict[str, Any] = {}
    _emit({"ready": True})
    while line := await reader.readline():
        command = json.loads(line)
        match command["cmd"]:
            case "setup":
                spec = command
                _emit({"ok": True})
            case "burst":
                outcome = await _burst(spec, command["devices"], watch, command["timeout"])
                _emit(
                    {
                        "began": outcome.began,
                        "provisioned": outcome.provisioned,
                        "failed": outcome.failed,
                        "cpu_seconds": outcome.cpu_seconds,
                    }
                )
            case "exit":
                return 0
    return 0


def _emit(message: Mapping[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True, slots=True)
class BurstResult:
    """One burst as the device child saw it.

    Attributes:
        began: wall-clock time the burst started (epoch seconds).
        latencies: seconds from the burst's start to each provisioned gateway's ``provisioned``.
        failed: each gateway that did not make it, and why.
        device_cpu_seconds: CPU the device child used over the burst.
    """

    began: float
    latencies: dict[str, float]
    failed: dict[str, str]
    device_cpu_seconds: float

    @property
    def wall_seconds(self) -> float:
        """From the burst's start to the last gateway provisioned."""
        return max(self.latencies.values(), default=math.nan)


class DeviceFleet:
    """The device child process: many gateways' supervisors on one event loop.

    Args:
        sandbox: the running sandbox (device broker, CA).
        root: where the gateways' state directories go.
        retry_first: seconds a gateway waits for its certificate before sending again.
    """

    def __init__(self, sandbox: Sandbox, root: Path, *, retry_first: float = 120.0) -> None:
        self._sandbox = sandbox
        self._root = root
        self._retry_first = retry_first
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.fleet",
            "devices",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=_PROJECT_ROOT,
            env={**os.environ, "PYTHONPATH": str(_PROJECT_ROOT)},
            limit=64 * 1024 * 1024,
        )
        await self._read()
        broker = self._sandbox.device_broker.address
        await self._call(
            {
                "cmd": "setup",
                "host": broker.host,
                "port": broker.port,
                "ca_file": str(self._sandbox.pki.ca_file),
                "root": str(self._root),
                "retry_first": self._retry_first,
            }
        )
        return self

    async def _read(self) -> dict[str, Any]:
        assert self._process is not None
        assert self._process.stdout is not None
        line = await self._process.stdout.readline()
        if not line:
            code = await self._process.wait()
            msg = f"the device child exited with status {code}"
            raise RuntimeError(msg)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _call(self, command: Mapping[str, Any]) -> dict[str, Any]:
        assert self._process is not None
        assert self._process.stdin is not None
        self._process.stdin.write((json.dumps(command) + "\n").encode())
        await self._process.stdin.drain()
        return await self._read()

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self._process is not None
        return self._process.pid

    async def burst(self, devices: Sequence[DeviceCredentials], *, within: float) -> BurstResult:
        """Start every gateway at once; return when all are provisioned or ``timeout`` passed.

        Args:
            devices: registered gateways, each used once.
            within: seconds to wait for the last one.

        Returns:
            Each gateway's latency, the failures, the child's CPU time.
        """
        answer = await self._call(
            {
                "cmd": "burst",
                "devices": [[d.serial, d.password] for d in devices],
                "timeout": within,
            }
        )
        began = float(answer["began"])
        return BurstResult(
            began=began,
            latencies={s: t - began for s, t in answer["provisioned"].items()},
            failed=dict(answer["failed"]),
            device_cpu_seconds=float(answer["cpu_seconds"]),
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is None:
            return
        if process.returncode is None and process.stdin is not None:
            with contextlib.suppress(ConnectionError):
                process.stdin.write(b'{"cmd": "exit"}\n')
                await process.stdin.drain()
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------------------------
# The cloud daemon, a real process


class CloudDaemon:
    """``ztp-cloud run`` against the sandbox (production rate limits), its log in a file.

    Production settings, but for two that only shorten waits when there is nothing to do: a
    dry shard is polled again after 0.2 s instead of up to 1 s (``kinesis.max_idle_wait``: a
    lone gateway's request is not left waiting), and shards are discovered every second.

    Args:
        sandbox: the running sandbox.
        directory: its store and log.
        profile: run it under cProfile timed by CPU time, writing the statistics here when it
            exits (the profiler inflates the CPU figures of such a run: use it to see where the
            time goes, not how much).
    """

    def __init__(self, sandbox: Sandbox, directory: Path, *, profile: Path | None = None) -> None:
        self._sandbox = sandbox
        self._directory = directory
        self._profile = profile
        self._process: asyncio.subprocess.Process | None = None
        self._log: Any = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._directory.mkdir(parents=True, exist_ok=True)
        description = self._sandbox.description
        access = description.airvantage
        secret = self._directory / "client-secret"
        secret.write_text(access.client_secret + "\n")
        secret.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ZTP_", "AWS_"))}
        env |= {
            "PYTHONPATH": str(_PROJECT_ROOT),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "ZTP_CLOUD_AWS_ENDPOINT_URL": description.aws_endpoint_url,
            "ZTP_CLOUD_AWS_REGION": description.region,
            "ZTP_CLOUD_AWS_MAX_ATTEMPTS": "1",
            "ZTP_CLOUD_KINESIS_STREAM": description.kinesis_stream,
            "ZTP_CLOUD_KINESIS_WORKER_ID": "ztp-bench-cloud",
            "ZTP_CLOUD_KINESIS_MAX_IDLE_WAIT": "0.2",
            "ZTP_CLOUD_KINESIS_DISCOVERY_INTERVAL": "1",
            "ZTP_CLOUD_AIRVANTAGE_API_URL": access.api_url,
            "ZTP_CLOUD_AIRVANTAGE_CLIENT_ID": access.client_id,
            "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE": str(secret),
            "ZTP_CLOUD_STORE_PATH": str(self._directory / "store"),
            "ZTP_CLOUD_HTTP_HOST": "127.0.0.1",
            "ZTP_CLOUD_HTTP_PORT": "0",
            "ZTP_CLOUD_IOT_TPS": f"{IOT_TPS:g}",
        }
        self._log = (self._directory / "cloud.log").open("ab")
        command = ["-m", "cloud_daemon", "run"]
        if self._profile is not None:
            # cProfile's own command line times with the wall clock; this one with CPU time.
            command = ["-m", "bench.cloud_cpu", "profiled-cloud", "--out", str(self._profile)]
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=_PROJECT_ROOT,
        )
        async with asyncio.timeout(_READY_TIMEOUT):
            while True:
                assert self._process.stdout is not None
                line = await self._process.stdout.readline()
                if not line:
                    msg = f"ztp-cloud exited; see {self._directory / 'cloud.log'}"
                    raise RuntimeError(msg)
                self._log.write(line)
                event = json.loads(line)
                if event.get("event") == "service.ready":
                    self.port = int(event["port"])
                    break
        # From here on its stdout goes straight on into the file, read by nobody.
        self._copy = asyncio.create_task(self._drain(), name="bench.cloud-log")
        return self

    async def _drain(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        while line := await self._process.stdout.readline():
            self._log.write(line)

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self._process is not None
        return self._process.pid

    def cpu_seconds(self) -> float:
        """CPU seconds the daemon has used so far."""
        return cpu_seconds(self.pid)

    def events(self, since: float) -> list[dict[str, Any]]:
        """The daemon's JSON log events logged at or after ``since`` (epoch seconds)."""
        self._log.flush()
        found = []
        with (self._directory / "cloud.log").open("rb") as lines:
            for line in lines:
                try:
                    event = json.loads(line)
                    moment = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
                except (ValueError, KeyError, TypeError):
                    continue
                if moment >= since:
                    event["at"] = moment
                    found.append(event)
        return found

    async def metric(self, name: str) -> float:
        """The sum of a counter's samples in ``/metrics``."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/metrics") as response,
        ):
            text = await response.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process = self._process
        if process is not None:
            if process.returncode is None:
                process.terminate()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
            await self._copy
        if self._log is not None:
            self._log.close()


@contextlib.asynccontextmanager
async def bench_sandbox(directory: Path) -> Any:
    """A sandbox with IoT throttling on at 15 TPS per API, as AWS's quota."""
    fidelity = FidelityConfig(iot_throttling=True, iot_tps=IOT_TPS)
    async with Sandbox(directory, fidelity=fidelity, redelivery_interval=30.0) as sandbox:
        yield sandbox


# --------------------------------------------------------------------------------------------
# The benchmark


def cloud_timeline(
    events: Sequence[Mapping[str, Any]], *, began: float, ended: float
) -> dict[str, float | None]:
    """Where the cloud daemon's time per gateway goes, from its own log events.

    The handler works through a shard's records one at a time: the period between two
    certificates minted bounds the fleet's rate. It splits into the AirVantage delivery of one
    gateway (``issuance.minted`` → ``airvantage.delivery_sent``) and what comes before the next
    one is minted (``airvantage.delivery_sent`` → next ``issuance.minted``: reading and checking
    the next request, the ledger, the four rate-limited IoT calls).

    The wall time splits into: until the first certificate is minted, the minting span (first
    to last), and the tail (last minted to the last gateway provisioned); stalls are periods
    over 0.5 s between two mintings (a throttled call's backoff, a retried record).

    Args:
        events: the daemon's log events with an ``at`` epoch time, in order.
        began: the burst's start (epoch seconds).
        ended: the last gateway's ``provisioned`` (epoch seconds).

    Returns:
        Medians in milliseconds and the split in seconds (None when too few events).
    """
    minted = [e["at"] for e in events if e.get("event") == "issuance.minted"]
    sent = [e["at"] for e in events if e.get("event") == "airvantage.delivery_sent"]
    periods = [b - a for a, b in itertools.pairwise(minted)]
    delivery = [s - m for m, s in zip(minted, sent, strict=False) if s >= m]
    before_next = [m - s for s, m in zip(sent, minted[1:], strict=False) if m >= s]

    def ms(values: Sequence[float]) -> float | None:
        return round(median(values) * 1000, 1) if values else None

    stalls = [p for p in periods if p > 0.5]
    slot = 1 / IOT_TPS
    # Time the minting lost beyond the quota's pace, and the periods that lost it.
    excess = [p - slot for p in periods if p > slot * 1.5]
    return {
        "cloud_first_minted_s": round(minted[0] - began, 2) if minted else None,
        "cloud_minting_span_s": round(minted[-1] - minted[0], 2) if minted else None,
        "cloud_tail_s": round(ended - minted[-1], 2) if minted else None,
        "cloud_mean_period_ms": (
            round((minted[-1] - minted[0]) / (len(minted) - 1) * 1000, 1)
            if len(minted) > 1
            else None
        ),
        "cloud_slow_periods": len(excess),
        "cloud_slow_periods_lost_s": round(sum(excess), 2),
        "cloud_stalls": len(stalls),
        "cloud_stall_s": round(sum(stalls), 2),
        "cloud_period_ms": ms(periods),
        "cloud_delivery_ms": ms(delivery),
        "cloud_until_next_minted_ms": ms(before_next),
    }


@dataclass(frozen=True, slots=True)
class FleetResult:
    """The fleet burst's figures."""

    devices: int
    provisioned: int
    failures: int
    failure_examples: dict[str, str]
    wall_seconds: float
    quota_seconds: float
    fleet_quota_ratio: float
    latency_p50_seconds: float
    latency_max_seconds: float
    cloud_cpu_seconds: float
    cloud_cpu_ms_per_device: float
    device_cpu_ms_per_device: float
    iot_throttled: float
    timeline: Mapping[str, float | None]

    def to_json(self) -> dict[str, Any]:
        """The figures as JSON-ready data."""
        return {
            "fleet_devices": self.devices,
            "fleet_provisioned": self.provisioned,
            "fleet_failures": self.failures,
            "fleet_failure_examples": self.failure_examples,
            "fleet_wall_seconds": round(self.wall_seconds, 2),
            "fleet_quota_seconds": round(self.quota_seconds, 2),
            "fleet_quota_ratio": round(self.fleet_quota_ratio, 3),
            "fleet_latency_p50_seconds": round(self.latency_p50_seconds, 2),
            "fleet_latency_max_seconds": round(self.latency_max_seconds, 2),
            "fleet_cloud_cpu_seconds": round(self.cloud_cpu_seconds, 2),
            "cloud_cpu_ms_per_device": round(self.cloud_cpu_ms_per_device, 2),
            "fleet_device_cpu_ms_per_device": round(self.device_cpu_ms_per_device, 2),
            "fleet_iot_throttled": self.iot_throttled,
            **{f"fleet_{k}": v for k, v in self.timeline.items()},
        }


async def run_fleet(
    sandbox: Sandbox,
    cloud: CloudDaemon,
    fleet: DeviceFleet,
    *,
    devices: int,
    log: Callable[[str], None],
) -> FleetResult:
    """Register ``devices`` gateways, start them together, wait until all are provisioned.

    Args:
        sandbox: the running sandbox (IoT throttling on).
        cloud: the running cloud daemon.
        fleet: the device child.
        devices: N.
        log: progress lines.

    Returns:
        The figures.
    """
    gateways = await sandbox.add_devices(devices)
    quota = devices / IOT_TPS
    throttled_before = await cloud.metric("ztp_cloud_throttles_total")
    cpu_before = cloud.cpu_seconds()
    log(f"fleet: {devices} gateways at once; IoT quota alone needs {quota:.1f} s")
    burst = await fleet.burst(gateways, within=max(60.0, quota * 3))
    cpu = cloud.cpu_seconds() - cpu_before
    throttled = await cloud.metric("ztp_cloud_throttles_total") - throttled_before
    provisioned = len(burst.latencies)
    wall = burst.wall_seconds if provisioned == devices else math.inf
    latencies = list(burst.latencies.values()) or [math.nan]
    result = FleetResult(
        devices=devices,
        provisioned=provisioned,
        failures=len(burst.failed),
        failure_examples=dict(list(burst.failed.items())[:3]),
        wall_seconds=wall,
        quota_seconds=quota,
        fleet_quota_ratio=wall / quota,
        latency_p50_seconds=median(latencies),
        latency_max_seconds=max(latencies),
        cloud_cpu_seconds=cpu,
        cloud_cpu_ms_per_device=cpu / max(1, provisioned) * 1000,
        device_cpu_ms_per_device=burst.device_cpu_seconds / max(1, provisioned) * 1000,
        iot_throttled=throttled,
        timeline=cloud_timeline(
            cloud.events(burst.began), began=burst.began, ended=burst.began + wall
        ),
    )
    log(
        f"fleet: {provisioned}/{devices} provisioned in {wall:.2f} s "
        f"(ratio {result.fleet_quota_ratio:.3f}), cloud CPU {result.cloud_cpu_ms_per_device:.1f}"
        f" ms/gateway, {throttled:g} IoT throttles; cloud period per gateway "
        f"{result.timeline['cloud_period_ms']} ms (quota: {1000 / IOT_TPS:.1f} ms)"
    )
    return result


async def _standalone(*, quick: bool, log: Callable[[str], None]) -> FleetResult:
    with tempfile.TemporaryDirectory(prefix="ztp-bench-fleet-", dir="/tmp") as tmp:
        work = Path(tmp)
        async with (
            bench_sandbox(work / "sandbox") as sandbox,
            CloudDaemon(sandbox, work / "cloud") as cloud,
            DeviceFleet(sandbox, work / "devices") as fleet,
        ):
            return await run_fleet(sandbox, cloud, fleet, devices=60 if quick else 1000, log=log)


def quiet_logs() -> None:
    """Only warnings, on stderr: stdout carries the figures."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )


def _logger(started: float) -> Callable[[str], None]:
    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", file=sys.stderr, flush=True)

    return log


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.fleet [--quick] [--json]`` (and the device child's ``devices`` mode).

    Returns:
        0 when every gateway provisioned, 1 otherwise.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["devices"]:
        return asyncio.run(_device_child())
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="N = 60 instead of 1,000")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    options = parser.parse_args(arguments)
    quiet_logs()
    result = asyncio.run(_standalone(quick=options.quick, log=_logger(time.monotonic())))
    print(json.dumps(result.to_json(), indent=None if options.json else 2))
    return 0 if result.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
