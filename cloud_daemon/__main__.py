"""``ztp-cloud``: the cloud daemon's command line.

``ztp-cloud [run]`` reads the configuration from the environment (and ``--config FILE`` or
``$ZTP_CLOUD_CONFIG`` when given), logs JSON lines on stdout, and runs until SIGTERM or SIGINT,
which only set an event; the service then stops in order within ``shutdown_timeout``.
``ztp-cloud check-config`` prints the checked configuration as JSON, secrets masked.

Exit statuses: 0 done, 1 a runtime failure, 2 a usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import structlog

from cloud_daemon.config import (
    CONFIG_ENV,
    CloudConfig,
    config_summary,
    environment_help,
    load_cloud_config,
)
from cloud_daemon.service import serve
from shared.errors import ConfigError, UsageError, ZtpError
from shared.logs import configure_logging

__all__ = ["main"]

_IDENT: Final = "ztp-cloud"
_EXIT_OK: Final = 0
_EXIT_FAILURE: Final = 1
_EXIT_USAGE: Final = 2

_DESCRIPTION = """\
The ZTP cloud daemon: reads the AirVantage connector's Kinesis stream, vets certificate
requests, issues certificates in AWS IoT once per device key, and delivers them to the gateways
through AirVantage. Serves /healthz, /readyz and /metrics over HTTP.

commands:
  run            run the daemon until SIGTERM/SIGINT (the default)
  check-config   print the checked configuration, secrets masked, and exit
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_IDENT,
        description=_DESCRIPTION,
        epilog="environment variables (each sets the key shown):\n" + environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"a TOML file under the environment (default: ${CONFIG_ENV}, if set)",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=("run", "check-config"),
        help="what to do (default: run)",
    )
    return parser


def _load(args: argparse.Namespace, env: Mapping[str, str]) -> CloudConfig:
    path = args.config
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    return load_cloud_config(path, env)


async def _run_service(config: CloudConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(config, shutdown=stop.wait)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _first_ztp_error(error: BaseException) -> ZtpError | None:
    if isinstance(error, ZtpError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_ztp_error(inner)
            if found is not None:
                return found
    return None


def _run(config: CloudConfig) -> int:
    configure_logging(
        style="json",
        destination="stdout",
        ident=_IDENT,
        level=config.log.level.value,
        cache_loggers=True,
    )
    failure: ZtpError | None = None
    try:
        asyncio.run(_run_service(config))
    except (ZtpError, BaseExceptionGroup) as exc:
        failure = _first_ztp_error(exc)
        if failure is None:
            raise
    except TimeoutError:
        failure = ZtpError(f"the service did not stop within {config.shutdown_timeout:g} s")
    if failure is not None:
        # The reason says it all; a traceback would only bury it.
        structlog.get_logger().error(
            "service.failed", error=type(failure).__name__, reason=str(failure)
        )
        return _EXIT_USAGE if isinstance(failure, UsageError) else _EXIT_FAILURE
    return _EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ztp-cloud`` entry point.

    Args:
        argv: the arguments (``sys.argv[1:]`` by default).

    Returns:
        The exit status: 0 done, 1 a runtime failure, 2 a usage or configuration error.
    """
    args = _parser().parse_args(argv)
    try:
        config = _load(args, dict(os.environ))
    except ConfigError as exc:
        sys.stderr.write(f"{_IDENT}: {exc}\n")
        return _EXIT_USAGE
    if args.command == "check-config":
        sys.stdout.write(json.dumps(config_summary(config), indent=2, sort_keys=True) + "\n")
        return _EXIT_OK
    return _run(config)


if __name__ == "__main__":
    sys.exit(main())
