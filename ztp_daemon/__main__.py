"""``ztp-daemon``: the device daemon's command line.

``ztp-daemon run --config FILE`` runs the daemon until SIGTERM or SIGINT (which only set an
event; the supervisor then shuts down in order). ``ztp-daemon status`` reads the state directory
and says where provisioning stands, for a person on the gateway (or ``--json`` for a script):
the certificate in use and its expiry, when its renewal is due, and whether one is under way.

Exit statuses: 0 done, 1 a runtime failure (unreadable state, storage), 2 a usage or
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from shared.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    failure_exit_status,
    first_ztp_error,
    stop_on_signals,
)
from shared.config import read_toml
from shared.errors import ConfigError, ZtpError
from shared.logs import LogDestination, LogStyle, configure_logging
from ztp_daemon.bundle import Bundle, BundleStore
from ztp_daemon.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    DeviceConfig,
    LogDestinationChoice,
    LogStyleChoice,
    environment_help,
    load_device_config,
)
from ztp_daemon.errors import StorageError
from ztp_daemon.keystore import FileKeyStore
from ztp_daemon.machine import StateRecord
from ztp_daemon.sdnotify import Notifier
from ztp_daemon.state import DEFAULT_STATE_DIRECTORY, StateFile, ensure_private_directory
from ztp_daemon.supervisor import BUNDLE_DIRECTORY, PublisherFactory, serve

__all__ = ["main", "status_report"]

SYSLOG_IDENT: Final = "ztp"
_STYLES: Final[Mapping[LogStyleChoice, LogStyle]] = {
    LogStyleChoice.KEYVALUE: "keyvalue",
    LogStyleChoice.JSON: "json",
}
_DESTINATIONS: Final[Mapping[LogDestinationChoice, LogDestination]] = {
    LogDestinationChoice.SYSLOG: "syslog",
    LogDestinationChoice.STDERR: "stderr",
    LogDestinationChoice.STDOUT: "stdout",
}

_DESCRIPTION = """\
Zero-touch provisioning of this gateway into AWS IoT Core through AirVantage.

The daemon makes the gateway's key once, sends its certificate request over AirVantage's MQTT
API, checks and stores the certificate the cloud delivers, then publishes to AWS IoT Core. It
renews the certificate (a new key and request) once renewal.at_fraction of its lifetime has
passed, or when an operator sends the AirVantage command ztp.renew, publishing on the old one
until the new one is installed. It resumes where it stopped after any restart.
"""

_EPILOG = """\
configuration:
  A TOML file (--config, or $ZTP_CONFIG, or /etc/ztp/ztp.toml), overridden by environment
  variables. The AirVantage password belongs in a file (password_file, or
  ZTP_AIRVANTAGE_PASSWORD_FILE), never on the command line.

examples:
  ztp-daemon run --config /etc/ztp/ztp.toml
  ztp-daemon status
  ztp-daemon status --json --state-dir /var/lib/ztp
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztp-daemon",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the daemon until SIGTERM/SIGINT",
        description="Run the device daemon in the foreground until SIGTERM or SIGINT.",
        epilog="environment variables (each overrides the key shown):\n" + environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"the TOML configuration file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG_PATH})",
    )
    status = commands.add_parser(
        "status",
        help="show where provisioning stands",
        description=(
            "Show the provisioning state, serial, certificate id and expiry, when its renewal "
            "is due and whether one is under way, IoT endpoint and last error, read from the "
            "state directory. Needs no password."
        ),
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--config", type=Path, metavar="FILE", help="read the state directory from this file"
    )
    where.add_argument("--state-dir", type=Path, metavar="DIR", help="the state directory itself")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _config_path(given: Path | None, env: Mapping[str, str]) -> Path | None:
    if given is not None:
        return given
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


# --- run ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _local_services(
    config: DeviceConfig, serial: str
) -> AsyncIterator[PublisherFactory | None]:
    """The outbox and the ingestion socket, open from start-up; yields the publisher to start.

    Gateway programs may hand messages in while the gateway still waits for its certificate:
    they wait in the durable outbox, and the IoT publisher (#5) sends them once provisioned.
    Yields ``None`` when the publisher is disabled (provisioning only: no outbox, no socket).
    """
    if not config.publisher.enabled:
        yield None
        return
    # Imported here: a provisioning-only daemon never loads SQLite or the MQTT publisher.
    from ztp_daemon.heartbeat import Heartbeat  # noqa: PLC0415
    from ztp_daemon.ingest import IngestConfig, IngestServer  # noqa: PLC0415
    from ztp_daemon.outbox import Outbox  # noqa: PLC0415
    from ztp_daemon.publisher import BundleCredentials, Publisher, PublisherConfig  # noqa: PLC0415

    section = config.publisher
    state_dir = config.device.state_dir
    thing = section.thing_name or serial
    publisher_config = PublisherConfig(
        thing_name=thing,
        port=section.port,
        host=section.host,
        ca_file=section.ca_file,
    )
    ingest_socket = section.ingest_socket or state_dir / "ingest.sock"
    await asyncio.to_thread(ensure_private_directory, state_dir)
    async with (
        Outbox(state_dir / "outbox.sqlite3") as outbox,
        IngestServer(config=IngestConfig.for_thing(ingest_socket, thing), outbox=outbox),
    ):

        @contextlib.asynccontextmanager
        async def open_publisher(bundle: Bundle) -> AsyncIterator[object]:
            del bundle  # the publisher follows the bundle store itself, new versions included
            credentials = BundleCredentials(BundleStore(state_dir / BUNDLE_DIRECTORY))
            async with contextlib.AsyncExitStack() as stack:
                publisher = await stack.enter_async_context(
                    Publisher(config=publisher_config, outbox=outbox, credentials=credentials)
                )
                if section.heartbeat_interval > 0:
                    await stack.enter_async_context(
                        Heartbeat(
                            outbox=outbox,
                            topic=f"dt/{thing}/health",
                            interval=section.heartbeat_interval,
                            credentials=credentials,
                            publisher=publisher,
                        )
                    )
                yield publisher

        yield open_publisher


async def _run_daemon(config: DeviceConfig, notifier: Notifier) -> None:
    async with stop_on_signals() as stop:

        async def shutdown() -> None:
            await stop.wait()

        serial = await asyncio.to_thread(config.read_serial)
        async with _local_services(config, serial) as publisher_factory:
            await serve(
                config,
                shutdown=shutdown,
                publisher_factory=publisher_factory,
                notifier=notifier,
                serial=serial,
            )


def _run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        config = load_device_config(_config_path(args.config, env), env)
    except ConfigError as exc:
        sys.stderr.write(f"ztp-daemon: {exc}\n")
        return EXIT_USAGE
    section = config.log
    configure_logging(
        style=_STYLES[section.style],
        destination=_DESTINATIONS[section.destination],
        ident=SYSLOG_IDENT,
        level=section.level,
        syslog_address=section.syslog_address,
        cache_loggers=True,
    )
    failure: ZtpError | None = None
    try:
        notifier = Notifier.from_env(env)
        asyncio.run(_run_daemon(config, notifier))
    except* ZtpError as group:
        # Raised directly or inside a task group (the supervisor's, the link's): the first one.
        failure = first_ztp_error(group)
    if failure is None:
        return EXIT_OK
    return failure_exit_status(failure, event="daemon.failed")


# --- status ------------------------------------------------------------------------------------


def _state_dir(args: argparse.Namespace, env: Mapping[str, str]) -> Path:
    """The state directory, without loading the whole configuration (no password needed)."""
    if args.state_dir is not None:
        return Path(args.state_dir)
    if env.get("ZTP_DEVICE_STATE_DIR"):
        return Path(env["ZTP_DEVICE_STATE_DIR"])
    path = _config_path(args.config, env)
    if path is None:
        return DEFAULT_STATE_DIRECTORY
    document = read_toml(path)
    device = document.get("device", {})
    value = device.get("state_dir") if isinstance(device, dict) else None
    if value is None:
        return DEFAULT_STATE_DIRECTORY
    if not isinstance(value, str) or not value:
        raise ConfigError("device.state_dir", "expected a path")
    return Path(value)


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(dt.UTC).isoformat(timespec="seconds")


def _serial_of(csr_pem: str) -> str | None:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else None
    return value if isinstance(value, str) else None


def _renewal_fields(record: StateRecord | None) -> dict[str, Any]:
    due = None
    if record is not None and record.renew_at is not None:
        due = dt.datetime.fromtimestamp(record.renew_at, dt.UTC)
    return {
        "renewal_due": _iso(due),
        "renewal_in_progress": record is not None and record.renewing,
    }


def status_report(state_dir: Path, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """Read where provisioning stands from the state directory.

    Args:
        state_dir: the daemon's state directory.
        now: the current time (for "expires in"), timezone-aware; the clock by default.

    Returns:
        A JSON-ready mapping: ``state``, ``serial``, ``request_id``, ``attempts``,
        ``next_retry_at``, ``last_error``, ``certificate_id``, ``certificate_expires`` (the
        certificate in use's not_after), ``certificate_expired``, ``renewal_due`` (when its
        automatic renewal is due, ``None`` when off or unknown), ``renewal_in_progress``,
        ``endpoint``, ``bundle_version``, ``pending_key``, ``state_dir``. While a renewal is
        under way, ``request_id`` and ``attempts`` are the renewal's and the certificate fields
        describe the bundle still in use.

    Raises:
        StorageError: the state file or the bundle exists but cannot be read.
    """
    moment = now or dt.datetime.now(dt.UTC)
    record = StateFile(state_dir).load()
    bundle = BundleStore(state_dir / BUNDLE_DIRECTORY).current()
    expires: dt.datetime | None = None
    if bundle is not None:
        try:
            certificate = x509.load_pem_x509_certificate(bundle.certificate_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise StorageError(str(bundle.certificate_path), "parse", "not a certificate") from exc
        expires = certificate.not_valid_after_utc
    next_retry = None
    if record is not None and record.next_retry_at is not None:
        next_retry = dt.datetime.fromtimestamp(record.next_retry_at, dt.UTC)
    return {
        **_renewal_fields(record),
        "state": "fresh" if record is None else record.state.value,
        "serial": None if record is None else _serial_of(record.csr_pem),
        "request_id": None if record is None else record.request_id,
        "attempts": 0 if record is None else record.attempts,
        "next_retry_at": _iso(next_retry),
        "last_error": None if record is None else record.last_error,
        "certificate_id": bundle.certificate_id if bundle is not None else None,
        "certificate_expires": _iso(expires),
        "certificate_expired": None if expires is None else expires <= moment,
        "endpoint": bundle.endpoint if bundle is not None else None,
        "bundle_version": bundle.version if bundle is not None else None,
        "pending_key": FileKeyStore(state_dir).path.exists(),
        "state_dir": str(state_dir),
    }


_MEANINGS: Final = {
    "fresh": "no key yet: the daemon has not started provisioning",
    "key_ready": "key and certificate request made, not sent yet",
    "request_sent": "certificate request sent, waiting for the certificate",
    "waiting_retry": "the last delivery failed; the request will be sent again",
    "provisioned": "certificate installed; publishing to AWS IoT",
    "renew_key_ready": "renewing: new key and certificate request made, not sent yet",
    "renew_sent": "renewing: new certificate request sent; publishing with the current one",
    "renew_waiting": "renewing: the last delivery failed; the request will be sent again",
}


def _human(report: Mapping[str, Any], now: dt.datetime) -> str:
    def show(value: object) -> str:
        return "-" if value is None else str(value)

    state = report["state"]
    lines = [
        f"state:               {state} ({_MEANINGS.get(state, '')})",
        f"serial:              {show(report['serial'])}",
    ]
    if report["request_id"] is not None:
        lines.append(f"request:             {report['request_id']} (sent {report['attempts']}x)")
    if report["next_retry_at"] is not None:
        lines.append(f"next request at:     {report['next_retry_at']}")
    lines.append(f"certificate id:      {show(report['certificate_id'])}")
    expires = report["certificate_expires"]
    if expires is not None:
        days = (dt.datetime.fromisoformat(expires) - now).days
        when = "EXPIRED" if report["certificate_expired"] else f"in {days} days"
        lines.append(f"certificate expires: {expires} ({when})")
    else:
        lines.append("certificate expires: -")
    if report["renewal_in_progress"]:
        lines.append("renewal:             in progress (the certificate above stays in use)")
    elif report["renewal_due"] is not None:
        lines.append(f"renewal due:         {report['renewal_due']}")
    lines += [
        f"endpoint:            {show(report['endpoint'])}",
        f"last error:          {show(report['last_error'])}",
        f"state directory:     {report['state_dir']}",
    ]
    return "\n".join(lines)


def _status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    # stdout is the report; the stores' own log events go to stderr, and only if they matter.
    configure_logging(style="keyvalue", destination="stderr", ident=SYSLOG_IDENT, level="warning")
    try:
        state_dir = _state_dir(args, env)
        now = dt.datetime.now(dt.UTC)
        report = status_report(state_dir, now=now)
    except ConfigError as exc:
        sys.stderr.write(f"ztp-daemon: {exc}\n")
        return EXIT_USAGE
    except StorageError as exc:
        sys.stderr.write(f"ztp-daemon: cannot read the state: {exc}\n")
        return EXIT_FAILURE
    text = json.dumps(report, sort_keys=True) if args.json else _human(report, now)
    sys.stdout.write(text + "\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ztp-daemon`` entry point.

    Args:
        argv: the arguments (``sys.argv[1:]`` by default).

    Returns:
        The exit status: 0 done, 1 a runtime failure, 2 a usage or configuration error.
    """
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    if args.command == "run":
        return _run(args, env)
    return _status(args, env)


if __name__ == "__main__":
    sys.exit(main())
