"""``ztp-cloud`` as a real process against the sandbox: probes, provisioning, SIGTERM, config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.session import get_session
from cryptography.hazmat.primitives.asymmetric import ec

from cloud_daemon.leases import SqliteLeaseStore
from sandbox.airvantage import AirVantageEmulator
from sandbox.aws import MotoSandbox
from shared.messages import CertificateDelivery
from tests.adapters.test_issuer import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_PASSWORD,
    E2EDevice,
    active_for_thing,
    e2e_model,
    new_serial,
    private_pem,
    request_csr,
    request_points,
)
from tests.sandbox.airvantage_fixtures import Broker, run_mosquitto
from tests.sandbox.aws_fixtures import aws, aws_broker_pid_file, aws_pki, moto_sandbox

__all__ = ["aws", "aws_broker_pid_file", "aws_pki", "moto_sandbox"]  # fixtures

ROOT = Path(__file__).resolve().parents[2]
WAIT = 30.0
COMMAND = [sys.executable, "-m", "cloud_daemon"]


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any ZTP_CLOUD_* leftovers, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZTP_CLOUD_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], env=base_env(**env), capture_output=True, text=True, timeout=30,
        check=False, cwd=ROOT,
    )  # fmt: skip


MINIMAL = {
    "ZTP_CLOUD_KINESIS_STREAM": "ztp",
    "ZTP_CLOUD_AIRVANTAGE_API_URL": "https://eu.airvantage.net",
    "ZTP_CLOUD_AIRVANTAGE_CLIENT_ID": CLIENT_ID,
    "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET": CLIENT_SECRET,
}


# --- the command line without a sandbox ------------------------------------------------------


def test_help_lists_the_environment_variables() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    for name in (
        "ZTP_CLOUD_KINESIS_STREAM",
        "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE",
        "ZTP_CLOUD_STORE_KIND",
        "ZTP_CLOUD_HTTP_PORT",
    ):
        assert name in done.stdout


def test_check_config_prints_it_with_secrets_masked() -> None:
    done = run_cli("check-config", **MINIMAL, ZTP_CLOUD_IOT_TPS="20")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["airvantage"]["client_secret"] == "[redacted]"
    assert shown["iot"]["tps"] == 20.0
    assert shown["kinesis"]["stream"] == "ztp"
    assert CLIENT_SECRET not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"ZTP_CLOUD_KINESIS_STREAM": ""}, "kinesis.stream"),
        ({"ZTP_CLOUD_HTTP_PORT": "eighty"}, "ZTP_CLOUD_HTTP_PORT"),
        ({"ZTP_CLOUD_STORE_KIND": "dynamodb"}, "store.lease_table"),
        ({"ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE": "/nonexistent/secret"},
         "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET"),
    ],
)  # fmt: skip
def test_bad_configuration_exits_2_naming_the_key(changes: dict[str, str], named: str) -> None:
    env = {k: v for k, v in {**MINIMAL, **changes}.items() if v}
    done = run_cli("run", **env)
    assert done.returncode == 2
    assert named in done.stderr
    assert done.stderr.startswith("ztp-cloud: ")
    assert CLIENT_SECRET not in done.stdout + done.stderr


def test_check_config_refuses_a_bad_configuration_too() -> None:
    both = {**MINIMAL, "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE": "/run/secrets/x"}
    done = run_cli("check-config", **both)
    assert done.returncode == 2
    assert "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET" in done.stderr
    assert CLIENT_SECRET not in done.stdout + done.stderr


# --- the daemon against the sandbox ----------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("cloud-mosquitto")) as running:
        yield running


class Daemon:
    """``ztp-cloud run`` in a child process, its stdout read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode()
            self.lines.append(line)
            self.events.append(json.loads(line))  # every stdout line is a JSON log event
            self.changed.set()

    async def event(self, name: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                found = [e for e in self.events if e.get("event") == name]
                if found:
                    return found[0]
                if self.process.returncode is not None:
                    raise AssertionError(f"ztp-cloud exited with {self.process.returncode}")
                self.changed.clear()
                await self.changed.wait()


STREAM = f"cloud-{uuid.uuid4().hex[:8]}"


@pytest_asyncio.fixture(loop_scope="module")
async def emulator(aws: MotoSandbox, broker: Broker) -> AsyncIterator[AirVantageEmulator]:
    stream = STREAM
    async with get_session().create_client("kinesis", **aws.client_kwargs()) as kinesis:
        await kinesis.create_stream(StreamName=stream, ShardCount=1)
    async with AirVantageEmulator(
        broker_host=broker.host,
        broker_port=broker.port,
        admin_username=None,
        admin_password=None,
        aws_endpoint_url=aws.endpoint_url,
        region=aws.region,
        stream_name=stream,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        model=e2e_model(),
        redelivery_interval=None,
    ) as running:
        yield running


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_ztp_cloud_serves_provisions_and_stops_on_sigterm(
    aws: MotoSandbox, broker: Broker, emulator: AirVantageEmulator, tmp_path: Path
) -> None:
    secret_file = tmp_path / "client-secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    secret_file.chmod(0o600)
    state = tmp_path / "state"
    env = base_env(
        ZTP_CLOUD_KINESIS_STREAM=STREAM,
        ZTP_CLOUD_KINESIS_WORKER_ID="cloud-e2e",
        ZTP_CLOUD_KINESIS_DISCOVERY_INTERVAL="0.5",
        ZTP_CLOUD_KINESIS_MAX_IDLE_WAIT="0.4",
        ZTP_CLOUD_KINESIS_DRAIN_TIMEOUT="3",
        ZTP_CLOUD_AIRVANTAGE_API_URL=emulator.api_url,
        ZTP_CLOUD_AIRVANTAGE_CLIENT_ID=CLIENT_ID,
        ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE=str(secret_file),
        ZTP_CLOUD_AIRVANTAGE_POLL_INTERVAL="0.1",
        ZTP_CLOUD_AWS_ENDPOINT_URL=aws.endpoint_url,
        ZTP_CLOUD_AWS_REGION=aws.region,
        ZTP_CLOUD_AWS_MAX_ATTEMPTS="1",
        ZTP_CLOUD_STORE_PATH=str(state),
        ZTP_CLOUD_IOT_THING_NAME_TEMPLATE="ztp-{serial}",
        ZTP_CLOUD_HTTP_HOST="127.0.0.1",
        ZTP_CLOUD_HTTP_PORT="0",
        ZTP_CLOUD_HTTP_PROBE_TIMEOUT="1",
        ZTP_CLOUD_LOG_LEVEL="debug",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    process = await asyncio.create_subprocess_exec(
        *COMMAND, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    daemon = Daemon(process)
    reader = asyncio.get_running_loop().create_task(daemon.read(), name="ztp-cloud-stdout")
    key = ec.generate_private_key(ec.SECP256R1())
    device_task: asyncio.Task[None] | None = None
    try:
        port = (await daemon.event("service.ready"))["port"]
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> tuple[int, Any]:
                async with http.get(base + path) as response:
                    if response.content_type == "application/json":
                        return response.status, await response.json()
                    return response.status, await response.text()

            assert (await get("/healthz"))[0] == 200
            status, body = await get("/readyz")
            assert status == 200, body

            serial = new_serial()
            await emulator.register_system(serial, DEVICE_PASSWORD)
            device = E2EDevice(broker, serial, key)
            device_task = asyncio.get_running_loop().create_task(device.run(), name="device")
            async with asyncio.timeout(5):
                await device.ready.wait()
            await device.send(request_points("req-cloud", serial, request_csr(key, serial)))
            await daemon.event("issuance.confirmed")
            [answer] = device.received
            assert isinstance(answer, CertificateDelivery)
            async with get_session().create_client("iot", **aws.client_kwargs()) as iot:
                assert await active_for_thing(iot, f"ztp-{serial}") == [answer.certificate_id]

            _, metrics = await get("/metrics")
            for line in (
                "ztp_cloud_issuances_total 1.0",
                "ztp_cloud_deliveries_total 1.0",
                "ztp_cloud_confirmations_total 1.0",
                "ztp_cloud_redeliveries_total 0.0",
            ):
                assert line in metrics, line
            assert "ztp_cloud_millis_behind_latest{" in metrics
            assert "ztp_cloud_dead_letters_total{" in metrics

            emulator.faults.update({"server_error_next": 1000})
            status, body = await get("/readyz")
            assert status == 503
            assert body["reason"].startswith("airvantage: ")
            emulator.faults.update({"server_error_next": 0})
            assert (await get("/readyz"))[0] == 200

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            returncode = await process.wait()
        stopped_in = time.monotonic() - started
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if device_task is not None:
            device_task.cancel("test over")
            with contextlib.suppress(asyncio.CancelledError):
                await device_task
        await reader
    assert process.stderr is not None
    stderr = (await process.stderr.read()).decode()
    assert returncode == 0, stderr
    assert stopped_in < 30
    print(f"SIGTERM to exit: {stopped_in:.2f} s")
    events = [e["event"] for e in daemon.events]
    assert events[-1] == "service.stopped"
    assert "consumer.lease_released" in events
    async with SqliteLeaseStore(state / "leases.sqlite3") as leases:
        [lease] = (await leases.list_leases()).values()
    assert lease.owner is None
    output = "".join(daemon.lines) + stderr
    # The tokens the daemon was given: the emulator has no public accessor for them.
    tokens = list(emulator._ledger.tokens)
    assert tokens
    for secret in (CLIENT_SECRET, DEVICE_PASSWORD, private_pem(key), *tokens):
        assert secret not in output
    assert "PRIVATE KEY" not in output


@pytest.mark.asyncio(loop_scope="module")
async def test_a_missing_stream_ends_ztp_cloud_with_status_2(
    aws: MotoSandbox, tmp_path: Path
) -> None:
    env = base_env(
        **{**MINIMAL, "ZTP_CLOUD_KINESIS_STREAM": f"missing-{uuid.uuid4().hex[:8]}"},
        ZTP_CLOUD_AWS_ENDPOINT_URL=aws.endpoint_url,
        ZTP_CLOUD_AWS_REGION=aws.region,
        ZTP_CLOUD_AWS_MAX_ATTEMPTS="1",
        ZTP_CLOUD_STORE_PATH=str(tmp_path / "state"),
        ZTP_CLOUD_HTTP_HOST="127.0.0.1",
        ZTP_CLOUD_HTTP_PORT="0",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    process = await asyncio.create_subprocess_exec(
        *COMMAND, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT):
        stdout, stderr = await process.communicate()
    assert process.returncode == 2, stderr.decode()
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    [failed] = [e for e in events if e["event"] == "service.failed"]
    assert failed["error"] == "ResourceNotFoundError"
    assert "does not exist" in failed["reason"]
    assert CLIENT_SECRET not in stdout.decode() + stderr.decode()
