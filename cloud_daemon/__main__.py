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
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from cloud_daemon.config import (
    CONFIG_ENV,
    CloudConfig,
    config_summary,
    environment_help,
    load_cloud_config,
)
from cloud_daemon.service import serve
from shared.cli import EXIT_OK, EXIT_USAGE, failure_exit_status, first_ztp_error, stop_on_signals
from shared.errors import ConfigError, ZtpError
from shared.logs import configure_logging

__all__ = ["main"]

_IDENT: Final = "ztp-cloud"

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
    async with stop_on_signals() as stop:
        await serve(config, shutdown=stop.wait)


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
        failure = first_ztp_error(exc)
        if failure is None:
            raise
    except TimeoutError:
        failure = ZtpError(f"the service did not stop within {config.shutdown_timeout:g} s")
    if failure is not None:
        return failure_exit_status(failure, event="service.failed")
    return EXIT_OK


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
        return EXIT_USAGE
    if args.command == "check-config":
        sys.stdout.write(json.dumps(config_summary(config), indent=2, sort_keys=True) + "\n")
        return EXIT_OK
    return _run(config)


if __name__ == "__main__":
    sys.exit(main())
