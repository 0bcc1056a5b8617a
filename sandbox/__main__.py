"""``ztp-sandbox``: start and stop the whole local cloud from a shell.

``ztp-sandbox up --dir DIR`` starts a :class:`~sandbox.world.Sandbox` in ``DIR`` (PKI, device
broker, IoT broker, moto, AirVantage emulator), prints how to reach it (one JSON line with
``--json``), writes the same JSON to ``DIR/sandbox.json`` (0600: it holds the client secret and
the device passwords) and its pid to ``DIR/ztp-sandbox.pid``, and then runs until SIGTERM or
SIGINT, which stop every child process it started. ``ztp-sandbox down --dir DIR`` sends that
SIGTERM and waits for the process to end. ``ztp-sandbox demo`` provisions a fleet of gateways
(real ``ztp-daemon`` and ``ztp-cloud`` processes) in a sandbox of its own (:mod:`sandbox.demo`).

Logs go to ``DIR/sandbox.log``, never to stdout: stdout carries the description only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import structlog

from sandbox.errors import SandboxError
from shared.errors import ZtpError
from shared.logs import configure_logging

if TYPE_CHECKING:
    from sandbox.world import SandboxDescription

__all__ = [
    "DESCRIPTION_FILE",
    "LOG_FILE",
    "PID_FILE",
    "build_parser",
    "down",
    "main",
    "serve_up",
]

DESCRIPTION_FILE: Final = "sandbox.json"
PID_FILE: Final = "ztp-sandbox.pid"
LOG_FILE: Final = "sandbox.log"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

_DOWN_TIMEOUT: Final = 30.0
_KILL_WAIT: Final = 5.0

_log = structlog.get_logger()

_EPILOG = """\
examples:
  ztp-sandbox up --dir /tmp/sb --devices 3 --json > /tmp/sb.json &
  ztp-sandbox down --dir /tmp/sb

what 'up' starts, all on 127.0.0.1 and all in DIR:
  pki/       the sandbox CA (ca.pem), its CRL, the brokers' server certificates
  brokers/   the AirVantage device broker (plain MQTT, one password per device) and the
             AWS IoT Core broker (mutual TLS, CN = thing name, CRL), both mosquitto
  aws/       moto in server mode with the project's AWS-fidelity fixes (Kinesis, IoT,
             DynamoDB); DescribeEndpoint answers the IoT broker's host
  and, in the 'up' process itself, the AirVantage emulator (REST API, device tasks, and the
  Kinesis connector writing device data into the stream).

the JSON (stdout, and DIR/sandbox.json, 0600) has: aws_endpoint_url, region, kinesis_stream,
iot_mqtt {host, port, ca_file}, airvantage {api_url, mqtt_host, mqtt_port, client_id,
client_secret}, devices [{serial, password}], pids {sandbox, device_broker, iot_broker, moto},
directory.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``ztp-sandbox`` argument parser (``up`` and ``down``)."""
    parser = argparse.ArgumentParser(
        prog="ztp-sandbox",
        description=(
            "Run the whole cloud of the ztp project on loopback: mosquitto brokers for "
            "AirVantage and AWS IoT Core, moto for AWS, and an AirVantage emulator."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{up,down,demo}")
    up = commands.add_parser(
        "up",
        help="start a sandbox and run until 'down', SIGTERM or Ctrl-C",
        description=(
            "Start a sandbox in DIR, print how to reach it, and run until 'ztp-sandbox down "
            "--dir DIR', SIGTERM or SIGINT, which stop every process it started."
        ),
    )
    up.add_argument("--dir", type=Path, required=True, help="the sandbox directory (created)")
    up.add_argument(
        "--devices",
        type=_count,
        default=1,
        metavar="N",
        help="gateways to register (serial + random password) (default: 1)",
    )
    up.add_argument(
        "--json",
        action="store_true",
        help="print the description as exactly one JSON line instead of a summary",
    )
    up.add_argument(
        "--stream",
        default=None,
        help="the Kinesis stream the AirVantage connector writes into (default: ztp-sandbox)",
    )
    up.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help=f"level of DIR/{LOG_FILE} (default: info)",
    )
    down_parser = commands.add_parser(
        "down",
        help="stop the sandbox running in DIR and wait until it has",
        description=(
            "Send SIGTERM to the 'up' process of DIR and wait until it has stopped every "
            "process it started. After the timeout, kill it and its recorded children."
        ),
    )
    down_parser.add_argument("--dir", type=Path, required=True, help="the sandbox directory")
    down_parser.add_argument(
        "--timeout",
        type=float,
        default=_DOWN_TIMEOUT,
        help=f"seconds to wait before killing (default: {_DOWN_TIMEOUT:g})",
    )
    _add_demo_parser(commands)
    return parser


def _add_demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="provision a fleet of gateways end to end and show it",
        description=(
            "Start a sandbox, one ztp-cloud process and N ztp-daemon processes (each its own "
            "serial, state directory and configuration), show their progress, then a summary: "
            "gateways provisioned, certificates in IoT and duplicates, messages received at the "
            "IoT broker, wall time, p50/p99 provisioning latency. Exits 1 naming any gateway "
            "that failed, and stops every process it started (also on Ctrl-C)."
        ),
    )
    demo.add_argument(
        "--devices", type=_count, default=10, metavar="N", help="gateways (default: 10)"
    )
    demo.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the live view"
    )
    demo.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds before the run gives up on the gateways (default: 120)",
    )
    demo.add_argument(
        "--crash",
        type=_count,
        default=0,
        metavar="K",
        help="SIGKILL K gateways once mid-provisioning and start them again (default: 0)",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="working directory, kept (default: a new one under /tmp, removed on success)",
    )


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be in 0..10000, got {value}")
    return value


# --------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # noqa: PTH101 - the umask filtered O_CREAT's mode; set it exactly
    tmp.replace(path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _command_line(pid: int) -> str:
    """The process's command line, or empty if it is gone (or not ours to read)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\x00", b" ").decode(errors="replace")


def _is_sandbox(pid: int) -> bool:
    # A pid file outliving its process (SIGKILL) may name a pid reused by anything else.
    return pid != os.getpid() and "sandbox" in _command_line(pid)


def _seconds_since_process_start() -> float | None:
    """Time since this process was created (interpreter start and imports included)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, uptime - started)


# --------------------------------------------------------------------------------------------
# up


def _summary(description: SandboxDescription, startup: float | None) -> str:
    directory = description.directory
    took = f" in {startup:.2f} s" if startup is not None else ""
    lines = [
        f"ztp sandbox up{took}: {directory}",
        f"  AWS (moto)         {description.aws_endpoint_url}  region {description.region}",
        f"  Kinesis stream     {description.kinesis_stream}",
        f"  IoT Core (mTLS)    {description.iot_mqtt.host}:{description.iot_mqtt.port}"
        f"  CA {description.iot_mqtt.ca_file}",
        f"  AirVantage REST    {description.airvantage.api_url}"
        f"  client_id {description.airvantage.client_id}",
        f"  AirVantage MQTT    {description.airvantage.mqtt_host}:"
        f"{description.airvantage.mqtt_port}",
        f"  devices            {', '.join(d.serial for d in description.devices) or 'none'}",
        f"  secrets and JSON   {directory / DESCRIPTION_FILE}",
        f"  logs               {directory / LOG_FILE}",
        f"stop with: ztp-sandbox down --dir {directory}  (or Ctrl-C)",
    ]
    return "\n".join(lines)


async def serve_up(
    directory: Path,
    *,
    devices: int,
    stream: str | None = None,
    shutdown: Callable[[], Awaitable[object]],
    announce: Callable[[SandboxDescription], None],
) -> None:
    """Start a sandbox in ``directory``, describe it, and run until ``shutdown`` returns.

    Args:
        directory: the sandbox directory.
        devices: gateways to register at start-up.
        stream: the Kinesis stream name (None: the sandbox's default).
        shutdown: awaited once the sandbox runs; the sandbox stops when it returns.
        announce: called with the description once ``DIR/sandbox.json`` is written.

    Raises:
        SandboxError: a part of the sandbox did not start or stop.
        ZtpError: another failure of the sandbox's parts.
    """
    # Imported here: aiobotocore, aiohttp and moto's client side take ~0.5 s to import, which
    # 'down' and '--help' need not pay.
    from sandbox.world import DEFAULT_STREAM, Sandbox  # noqa: PLC0415

    description_file = directory / DESCRIPTION_FILE
    try:
        async with Sandbox(
            directory, devices=devices, stream_name=stream or DEFAULT_STREAM
        ) as sandbox:
            description = sandbox.description
            _write_atomic(description_file, json.dumps(description.to_json(), indent=2), 0o600)
            announce(description)
            await shutdown()
            _log.info("sandbox.shutting_down")
    finally:
        description_file.unlink(missing_ok=True)


def _claim(pid_file: Path) -> int | None:
    """Create the pid file with our pid; return the pid of a live sandbox holding it instead.

    Created exclusively, so of two ``up`` started together on one directory only one runs. A
    pid file left by a process that is gone (SIGKILL) is taken over.
    """
    for _ in range(2):
        try:
            fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_pid(pid_file)
            if holder is not None and _is_sandbox(holder):
                return holder
            pid_file.unlink(missing_ok=True)
            continue
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
        return None
    return _read_pid(pid_file) or -1


def _up(args: argparse.Namespace, out: TextIO) -> int:
    directory: Path = args.dir.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    pid_file = directory / PID_FILE
    # Claimed before anything starts, so 'down' also stops a sandbox still starting.
    running = _claim(pid_file)
    if running is not None:
        print(f"ztp-sandbox: already running in {directory} (pid {running})", file=sys.stderr)
        return EXIT_FAILED
    with (directory / LOG_FILE).open("a", encoding="utf-8") as log_stream:
        configure_logging(
            style="keyvalue",
            destination="stderr",
            ident="ztp-sandbox",
            level=args.log_level,
            stream=log_stream,
        )
        try:
            return asyncio.run(_up_main(args, directory, out))
        finally:
            if _read_pid(pid_file) == os.getpid():
                pid_file.unlink(missing_ok=True)


async def _up_main(args: argparse.Namespace, directory: Path, out: TextIO) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def announce(description: SandboxDescription) -> None:
        startup = _seconds_since_process_start()
        _log.info("sandbox.up", startup_ms=None if startup is None else round(startup * 1000))
        if args.json:
            out.write(json.dumps(description.to_json(), separators=(",", ":")) + "\n")
        else:
            out.write(_summary(description, startup) + "\n")
        out.flush()

    try:
        await serve_up(
            directory,
            devices=args.devices,
            stream=args.stream,
            shutdown=stop.wait,
            announce=announce,
        )
    except (ZtpError, SandboxError) as exc:
        _log.error("sandbox.failed", error=str(exc))
        print(f"ztp-sandbox: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# down


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (not our child) has exited; True if it did within ``timeout``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(pidfd)


def _recorded_children(directory: Path) -> list[int]:
    try:
        pids = json.loads((directory / DESCRIPTION_FILE).read_text())["pids"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [int(pid) for name, pid in pids.items() if name != "sandbox"]


def _kill_leftovers(directory: Path) -> int:
    """SIGKILL the recorded children of ``directory`` still alive; return how many there were.

    Only a process whose command line names the directory is killed: a recorded pid may have
    been reused by an unrelated process since.
    """
    killed = 0
    for child in _recorded_children(directory):
        if str(directory) in _command_line(child):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
                killed += 1
    return killed


def down(directory: Path, *, timeout: float = _DOWN_TIMEOUT, err: TextIO = sys.stderr) -> int:
    """Stop the sandbox running in ``directory``: SIGTERM, then wait until it has exited.

    If it has not exited after ``timeout`` seconds, it and the child processes its description
    records (those whose command line names ``directory``) are killed. If the ``up`` process is
    already gone (killed with SIGKILL, it could not stop its children), the children it leaves
    behind are killed and its files removed.

    Args:
        directory: the sandbox directory given to ``up``.
        timeout: seconds to wait for a clean stop.
        err: where to report.

    Returns:
        0 when the sandbox stopped (or none was running), 1 when something had to be killed.
    """
    directory = directory.absolute()
    pid_file = directory / PID_FILE
    pid = _read_pid(pid_file)
    if pid is None or not _is_sandbox(pid):
        leftovers = _kill_leftovers(directory)
        pid_file.unlink(missing_ok=True)
        (directory / DESCRIPTION_FILE).unlink(missing_ok=True)
        if leftovers:
            print(f"ztp-sandbox: killed {leftovers} process(es) left in {directory}", file=err)
            return EXIT_FAILED
        print(f"ztp-sandbox: no sandbox running in {directory}", file=err)
        return EXIT_OK
    began = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        print(f"ztp-sandbox: stopped in {time.monotonic() - began:.2f} s", file=err)
        return EXIT_OK
    print(f"ztp-sandbox: pid {pid} still running after {timeout:g} s: killing", file=err)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, _KILL_WAIT)
    _kill_leftovers(directory)
    pid_file.unlink(missing_ok=True)
    (directory / DESCRIPTION_FILE).unlink(missing_ok=True)
    return EXIT_FAILED


# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ztp-sandbox`` entry point.

    Args:
        argv: the arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 failure, 2 usage error.
    """
    args = build_parser().parse_args(argv)
    match args.command:
        case "up":
            return _up(args, sys.stdout)
        case "down":
            return down(args.dir, timeout=args.timeout)
        case "demo":
            # Imported here: the demo pulls in the whole sandbox and the device daemon.
            from sandbox.demo import demo_main  # noqa: PLC0415

            return demo_main(
                devices=args.devices,
                as_json=args.json,
                timeout=args.timeout,
                directory=args.dir,
                crash=args.crash,
            )
        case _:  # pragma: no cover - argparse allows only the commands above
            return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
