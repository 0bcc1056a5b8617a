"""AWS on loopback: a moto server, patched for fidelity, in a child process of its own.

The daemons reach it through aiobotocore with ``endpoint_url``, exactly as they reach AWS. It runs
as a child process so its request threads have a GIL of their own, and the patch layer
(:mod:`sandbox.moto_fidelity`) is applied in that process before the server binds.

Parent side: :class:`MotoSandbox`, an async context manager::

    async with MotoSandbox(tmp_path / "aws", pki=pki) as aws:
        session = aiobotocore.session.get_session()
        async with session.create_client("kinesis", **aws.client_kwargs()) as kinesis:
            ...
        await aws.configure(kinesis_throttling=True, iterator_lifetime=1.0)
        await aws.reset()

Child side: ``python -m sandbox.aws serve --port P --pki-dir DIR [--iot-endpoint-host H]
[--iot-broker-pidfile F] [--config JSON]`` prints one JSON line ``{"event": "ready", "port": ...}``
on stdout once it accepts connections, then logs to stderr.

Control routes, served by the same process: ``GET /_sandbox/config`` and ``POST /_sandbox/config``
(a JSON object of knobs to change, see :class:`~sandbox.moto_fidelity.FidelityConfig`),
``POST /_sandbox/reset`` (moto's reset plus the fidelity layer's own state), ``GET
/_sandbox/health``.

Clients must not retry against the sandbox: an operation moto lacks answers HTTP 500, which
botocore's default policy retries for about 11 s. :meth:`MotoSandbox.client_kwargs` sets
``retries={"total_max_attempts": 1}`` (botocore's ``max_attempts`` counts retries, so
``max_attempts: 1`` still retries once); a client built by hand should do the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiohttp
import structlog

from sandbox.errors import SandboxUsageError
from sandbox.moto_fidelity import FidelityConfig, SandboxState, SerialisingApp, install
from sandbox.pki import SandboxPki
from shared.errors import ConfigError, TransportError

__all__ = ["REGION", "MotoSandbox", "main", "serve"]

REGION: Final = "us-east-1"
_PROJECT_ROOT: Final = Path(__file__).resolve().parents[1]
_STOP_GRACE: Final = 5.0
_log = structlog.get_logger()


# --------------------------------------------------------------------------------------------
# Child process.


class _Control:
    """The ``/_sandbox`` routes: read or change the knobs, reset, health."""

    def __init__(self, state: SandboxState) -> None:
        self.state = state
        self.app: SerialisingApp | None = None

    def __call__(self, method: str, path: str, body: bytes) -> tuple[int, object]:
        match method, path:
            case "GET", "/_sandbox/health":
                return 200, {"status": "ok"}
            case "GET", "/_sandbox/config":
                return 200, self.state.config.to_json()
            case "POST", "/_sandbox/config":
                return self._configure(body)
            case "POST", "/_sandbox/reset":
                self._reset()
                return 200, {"status": "ok"}
            case _:
                return 404, {"error": f"no route {method} {path}"}

    def _configure(self, body: bytes) -> tuple[int, object]:
        try:
            changes = json.loads(body or b"{}")
        except ValueError as exc:
            return 400, {"error": f"not JSON: {exc}", "key": "body"}
        if not isinstance(changes, dict):
            return 400, {"error": "must be a JSON object of knobs", "key": "body"}
        try:
            with self.state.lock:
                self.state.config = self.state.config.updated(changes)
        except ConfigError as exc:
            return 400, {"error": str(exc), "key": exc.key}
        except (ValueError, TypeError) as exc:
            return 400, {"error": f"invalid configuration: {exc}", "key": "body"}
        _log.info("sandbox.configured", **changes)
        return 200, self.state.config.to_json()

    def _reset(self) -> None:
        from moto.moto_api._internal.models import moto_api_backend  # noqa: PLC0415

        assert self.app is not None
        with contextlib.ExitStack() as held:
            # No request may run while the models are replaced.
            for lock in self.app.all_locks():
                held.enter_context(lock)
            moto_api_backend.reset()
            self.state.reset()
        _log.info("sandbox.reset")


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone, so a killed test run never leaves a server behind."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_on_signal(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def serve(argv: Sequence[str]) -> int:
    """Run the patched moto server until SIGTERM (the child process's entry point).

    Args:
        argv: the arguments after ``serve``.

    Returns:
        The process exit status.

    Raises:
        ConfigError: bad ``--config`` JSON or the wrong moto version.
    """
    parser = argparse.ArgumentParser(prog="python -m sandbox.aws serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pki-dir", type=Path, required=True)
    parser.add_argument("--iot-endpoint-host", default="localhost")
    parser.add_argument("--iot-broker-pidfile", type=Path, default=None)
    parser.add_argument("--config", default="{}", help="JSON object of fidelity knobs")
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)

    # stdout carries the ready line only; everything else (structlog prints) goes to stderr.
    ready_pipe = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # werkzeug logs every request at INFO: too much for a sandbox serving thousands per second.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        changes = json.loads(args.config)
    except ValueError as exc:
        raise ConfigError("--config", f"not JSON: {exc}") from exc
    config = FidelityConfig().updated(changes)
    state = SandboxState(
        pki=SandboxPki.load_or_create(args.pki_dir),
        iot_endpoint_host=args.iot_endpoint_host,
        iot_broker_pid_file=args.iot_broker_pidfile,
        config=config,
    )
    install(state)
    # Imported after install() so nothing binds moto's classes before they are patched.
    from moto.moto_server.werkzeug_app import (  # noqa: PLC0415
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server  # noqa: PLC0415

    control = _Control(state)
    app = SerialisingApp(DomainDispatcherApplication(create_backend_app), control)
    control.app = app
    # Certificates of a previous run are unknown to this fresh moto: start from an empty CRL.
    state.reset()
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler
    )
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if args.parent_pid is not None:
        threading.Thread(
            target=_watch_parent, args=(args.parent_pid,), name="parent-watch", daemon=True
        ).start()
    with ready_pipe:
        print(
            json.dumps({"event": "ready", "port": server.server_port, "pid": os.getpid()}),
            file=ready_pipe,
        )
    _log.info("sandbox.aws_ready", port=server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sandbox.aws serve ...``.

    Args:
        argv: the command line without the program name (default: ``sys.argv[1:]``).

    Returns:
        The process exit status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] != "serve":
        print("usage: python -m sandbox.aws serve --pki-dir DIR [options]", file=sys.stderr)
        return 2
    try:
        return serve(arguments[1:])
    except ConfigError as exc:
        print(f"sandbox.aws: {exc}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# Parent side.


class MotoSandbox:
    """The patched moto server as a child process, owned by an async context manager.

    Args:
        directory: where the server's log (``moto.log``) goes.
        pki: the sandbox CA (its directory is handed to the child, which signs with it).
        port: the port to listen on; 0 picks a free one.
        host: the address to bind.
        iot_endpoint_host: what DescribeEndpoint answers for ``iot:Data-ATS``.
        iot_broker_pid_file: the IoT broker's pid file; the server SIGHUPs that process after
            each CRL change.
        config: the fault knobs in force at start and after every :meth:`reset`.
        start_timeout: seconds to wait for the server to accept connections.
    """

    region: Final = REGION

    def __init__(
        self,
        directory: Path,
        *,
        pki: SandboxPki,
        port: int = 0,
        host: str = "127.0.0.1",
        iot_endpoint_host: str = "localhost",
        iot_broker_pid_file: Path | None = None,
        config: FidelityConfig | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.directory = directory
        self.pki = pki
        self.host = host
        self.iot_endpoint_host = iot_endpoint_host
        self.iot_broker_pid_file = iot_broker_pid_file
        self.initial_config = config or FidelityConfig()
        self.start_timeout = start_timeout
        self._requested_port = port
        self._port: int | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def log_file(self) -> Path:
        """The child's log (stderr)."""
        return self.directory / "moto.log"

    @property
    def port(self) -> int:
        """The port the server listens on.

        Raises:
            SandboxUsageError: the sandbox is not started.
        """
        if self._port is None:
            raise SandboxUsageError("MotoSandbox is not started")
        return self._port

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def endpoint_url(self) -> str:
        """What aiobotocore clients pass as ``endpoint_url``."""
        return f"http://{self.host}:{self.port}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``session.create_client(service, **kwargs)`` against the sandbox.

        Retries are off: moto answers HTTP 500 for an operation it lacks, which botocore would
        otherwise retry for about 11 s.
        """
        from aiobotocore.config import AioConfig  # noqa: PLC0415

        return {
            "endpoint_url": self.endpoint_url,
            "region_name": self.region,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            # total_max_attempts counts the first attempt: 1 means no retry at all.
            "config": AioConfig(retries={"total_max_attempts": 1, "mode": "standard"}),
        }

    async def start(self) -> None:
        """Start the server and wait, bounded, until it accepts connections.

        Raises:
            SandboxUsageError: already started.
            TransportError: the server exited or did not become ready in time.
        """
        if self._process is not None:
            raise SandboxUsageError("MotoSandbox is already started")
        self.directory.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        command = [
            sys.executable, "-m", "sandbox.aws", "serve",
            "--host", self.host,
            "--port", str(self._requested_port),
            "--pki-dir", str(self.pki.directory),
            "--iot-endpoint-host", self.iot_endpoint_host,
            "--config", json.dumps(self.initial_config.to_json()),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if self.iot_broker_pid_file is not None:
            command += ["--iot-broker-pidfile", str(self.iot_broker_pid_file)]
        with self.log_file.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *command,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                # Its own session: a terminal's Ctrl-C reaches the test runner, which stops it.
                start_new_session=True,
            )
        try:
            self._port = await self._await_ready(self._process)
        except BaseException:
            await asyncio.shield(self._terminate())
            raise
        _log.info("sandbox.aws_started", port=self._port, pid=self._process.pid)

    async def _await_ready(self, process: asyncio.subprocess.Process) -> int:
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self.start_timeout):
                line = await process.stdout.readline()
        except TimeoutError:
            raise TransportError(
                f"moto sandbox not ready within {self.start_timeout} s; see {self.log_file}"
            ) from None
        try:
            ready = json.loads(line)
            return int(ready["port"])
        except (ValueError, KeyError, TypeError):
            raise TransportError(
                f"moto sandbox exited before it was ready; see {self.log_file}"
            ) from None

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period); safe to call twice."""
        await asyncio.shield(self._terminate())

    async def _terminate(self) -> None:
        process, self._process, self._port = self._process, None, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                async with asyncio.timeout(_STOP_GRACE):
                    await process.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        _log.info("sandbox.aws_stopped", returncode=process.returncode)

    async def _call(self, method: str, route: str, payload: object = None) -> Any:
        url = f"{self.endpoint_url}/_sandbox/{route}"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
                session.request(method, url, json=payload) as response,
            ):
                data = await response.json()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransportError(f"moto sandbox control call {route} failed: {exc}") from exc
        if status == 400:
            raise ConfigError(str(data.get("key", route)), str(data.get("error", "rejected")))
        if status != 200:
            raise TransportError(f"moto sandbox control call {route} answered {status}")
        return data

    async def reset(self) -> None:
        """Empty every moto backend and the fidelity layer's state; restore the start knobs.

        The CRL is rewritten empty and the IoT broker signalled.
        """
        await self._call("POST", "reset")

    async def configure(self, **changes: Any) -> FidelityConfig:
        """Change fault knobs at run time (until the next :meth:`reset`).

        Args:
            **changes: knob names of :class:`~sandbox.moto_fidelity.FidelityConfig` and values.

        Returns:
            The configuration now in force.

        Raises:
            ConfigError: an unknown knob or a bad value (nothing is changed).
        """
        return FidelityConfig().updated(await self._call("POST", "config", changes))

    async def config(self) -> FidelityConfig:
        """The configuration in force."""
        return FidelityConfig().updated(await self._call("GET", "config"))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


if __name__ == "__main__":
    sys.exit(main())
