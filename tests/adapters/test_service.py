"""The cloud service in process: configuration, health, readiness, metrics, shutdown.

``serve`` runs in a task of the test against the moto sandbox, the AirVantage emulator and
mosquitto; a device is provisioned through the whole service (Kinesis consumer, handler,
delivery follow-up), then the service is stopped through the shutdown it was handed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiobotocore.session import get_session
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from cloud_daemon.config import (
    CloudConfig,
    StoreKind,
    config_summary,
    environment_help,
    load_cloud_config,
)
from cloud_daemon.leases import DynamoLeaseStore, SqliteLeaseStore
from cloud_daemon.service import serve
from sandbox.aws import MotoSandbox
from shared.errors import ConfigError
from shared.messages import CertificateDelivery
from tests.adapters.test_issuer import (
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_PASSWORD,
    E2EDevice,
    active_for_thing,
    new_serial,
    open_cloud_peers,
    request_csr,
    request_points,
)
from tests.sandbox.airvantage_fixtures import Broker, run_mosquitto
from tests.sandbox.aws_fixtures import aws, aws_broker_pid_file, aws_pki, moto_sandbox

__all__ = ["aws", "aws_broker_pid_file", "aws_pki", "moto_sandbox"]  # fixtures

module_loop = pytest.mark.asyncio(loop_scope="module")
WAIT = 20.0

BASE_ENV = {
    "ZTP_CLOUD_KINESIS_STREAM": "ztp",
    "ZTP_CLOUD_AIRVANTAGE_API_URL": "http://127.0.0.1:1",
    "ZTP_CLOUD_AIRVANTAGE_CLIENT_ID": CLIENT_ID,
    "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET": CLIENT_SECRET,
}


# --- configuration --------------------------------------------------------------------------


def test_the_environment_alone_configures_the_service(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    env = {k: v for k, v in BASE_ENV.items() if k != "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET"}
    env |= {
        "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE": str(secret_file),
        "ZTP_CLOUD_STORE_KIND": "dynamodb",
        "ZTP_CLOUD_STORE_LEASE_TABLE": "leases",
        "ZTP_CLOUD_STORE_LEDGER_TABLE": "ledger",
        "ZTP_CLOUD_IOT_TPS_PER_API": "CreateThing=100, AttachPolicy=50",
        "ZTP_CLOUD_KINESIS_START": "AT_TIMESTAMP",
        "ZTP_CLOUD_KINESIS_START_TIMESTAMP": "2026-01-01T00:00:00+00:00",
    }
    config = load_cloud_config(None, env)
    assert config.store.kind is StoreKind.DYNAMODB
    assert config.iot.rates() == {"CreateThing": 100.0, "AttachPolicy": 50.0}
    assert config.airvantage.client_secret.reveal() == CLIENT_SECRET
    assert config.consumer_config().start_timestamp is not None
    assert config.http.port == 8080
    assert "-" in config.kinesis.worker_id  # hostname and pid
    summary = config_summary(config)
    assert summary["airvantage"]["client_secret"] == "[redacted]"
    assert CLIENT_SECRET not in repr(summary)
    assert "ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET_FILE" in environment_help()


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"ZTP_CLOUD_KINESIS_STREAM": None}, "kinesis.stream"),
        ({"ZTP_CLOUD_AIRVANTAGE_API_URL": "ftp://x"}, "airvantage.api_url"),
        ({"ZTP_CLOUD_STORE_KIND": "dynamodb"}, "store.lease_table"),
        ({"ZTP_CLOUD_IOT_TPS_PER_API": "CreateThing"}, "iot.tps_per_api"),
        ({"ZTP_CLOUD_IOT_THING_NAME_TEMPLATE": "bad name {serial}"}, "iot.thing_name_template"),
        ({"ZTP_CLOUD_KINESIS_START": "AT_TIMESTAMP"}, "kinesis.start_timestamp"),
        ({"ZTP_CLOUD_KINESIS_POLL_INTERVAL": "0.1"}, "ZTP_CLOUD_KINESIS_POLL_INTERVAL"),
        ({"ZTP_CLOUD_HTTP_PORT": "70000"}, "ZTP_CLOUD_HTTP_PORT"),
        ({"ZTP_CLOUD_AIRVANTAGE_FIRST_POLL": "0"}, "ZTP_CLOUD_AIRVANTAGE_FIRST_POLL"),
        ({"ZTP_CLOUD_IOT_TPS_MARGIN": "0.9"}, "ZTP_CLOUD_IOT_TPS_MARGIN"),
        ({"ZTP_CLOUD_KINESIS_DRAIN_TIMEOUT": "12", "ZTP_CLOUD_SHUTDOWN_TIMEOUT": "20"},
         "kinesis.drain_timeout"),
        ({"ZTP_CLOUD_AIRVANTAGE_USERNAME": "ops"}, "airvantage.username"),
        ({"ZTP_CLOUD_AWS_ENDPOINT_URL": "localhost:5000"}, "aws.endpoint_url"),
        ({"ZTP_CLOUD_NO_SUCH_KEY": "1"}, "ZTP_CLOUD_NO_SUCH_KEY"),
    ],
)  # fmt: skip
def test_bad_configuration_names_the_key(changes: Mapping[str, str | None], key: str) -> None:
    env = {**BASE_ENV, **changes}
    with pytest.raises(ConfigError) as caught:
        load_cloud_config(None, {k: v for k, v in env.items() if v is not None})
    assert caught.value.key == key
    assert CLIENT_SECRET not in str(caught.value)


# --- the service against the sandbox ---------------------------------------------------------


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's credential chain finds these, as it finds the task role's on ECS."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("service-mosquitto")) as running:
        yield running


class Running:
    """One service in a task, with its sandbox peers."""

    def __init__(self, aws: MotoSandbox, broker: Broker, tmp_path: Path, **env: str) -> None:
        self.aws = aws
        self.broker = broker
        self.tmp_path = tmp_path
        self.extra_env = env
        self.stream = f"svc-{uuid.uuid4().hex[:8]}"
        self.stack = contextlib.AsyncExitStack()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.port = 0

    def config(self) -> CloudConfig:
        env = {
            **BASE_ENV,
            "ZTP_CLOUD_KINESIS_STREAM": self.stream,
            "ZTP_CLOUD_KINESIS_WORKER_ID": "svc-test",
            "ZTP_CLOUD_KINESIS_DISCOVERY_INTERVAL": "0.5",
            "ZTP_CLOUD_KINESIS_MAX_IDLE_WAIT": "0.4",
            "ZTP_CLOUD_KINESIS_DRAIN_TIMEOUT": "2",
            "ZTP_CLOUD_AIRVANTAGE_API_URL": self.emulator.api_url,
            "ZTP_CLOUD_AIRVANTAGE_POLL_INTERVAL": "0.1",
            "ZTP_CLOUD_AWS_ENDPOINT_URL": self.aws.endpoint_url,
            "ZTP_CLOUD_AWS_REGION": self.aws.region,
            "ZTP_CLOUD_AWS_MAX_ATTEMPTS": "1",
            "ZTP_CLOUD_STORE_PATH": str(self.tmp_path / "state"),
            "ZTP_CLOUD_IOT_THING_NAME_TEMPLATE": "ztp-{serial}",
            "ZTP_CLOUD_IOT_TPS": "1000",
            "ZTP_CLOUD_HTTP_HOST": "127.0.0.1",
            "ZTP_CLOUD_HTTP_PORT": "0",
            "ZTP_CLOUD_HTTP_PROBE_TIMEOUT": "1",
            **self.extra_env,
        }
        return load_cloud_config(None, env)

    async def __aenter__(self) -> Running:
        stack = self.stack
        self.kinesis, self.iot, self.emulator = await open_cloud_peers(
            stack, self.aws, self.broker, stream=self.stream
        )
        self.http = await stack.enter_async_context(aiohttp.ClientSession())
        return self

    async def start(self) -> None:
        """Start the service and wait until it is ready (its port comes from its log)."""
        config = self.config()
        with capture_logs() as self.logs:
            self.task = asyncio.get_running_loop().create_task(
                serve(config, shutdown=self.stop.wait, ready=self.ready), name="ztp-cloud"
            )
            self.stack.push_async_callback(self.finish)
            async with asyncio.timeout(WAIT):
                await self.ready.wait()
        [event] = [e for e in self.logs if e["event"] == "service.ready"]
        self.port = event["port"]

    async def finish(self) -> None:
        self.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stack.aclose()

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(f"http://127.0.0.1:{self.port}{path}") as response:
            return response.status, await response.text()

    async def get_json(self, path: str) -> tuple[int, dict[str, Any]]:
        async with self.http.get(f"http://127.0.0.1:{self.port}{path}") as response:
            return response.status, await response.json()

    async def device(self, serial: str, key: Any) -> E2EDevice:
        await self.emulator.register_system(serial, DEVICE_PASSWORD)
        device = E2EDevice(self.broker, serial, key)
        task = asyncio.get_running_loop().create_task(device.run(), name=f"device-{serial}")

        async def cancel() -> None:
            task.cancel("test over")
            with contextlib.suppress(asyncio.CancelledError):
                await task

        self.stack.push_async_callback(cancel)
        async with asyncio.timeout(5):
            await device.ready.wait()
        return device

    async def metric(self, name: str) -> float:
        _, text = await self.get("/metrics")
        for line in text.splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    async def wait_metric(self, name: str, value: float) -> None:
        async with asyncio.timeout(WAIT):
            while True:
                if await self.metric(name) >= value:
                    return
                await asyncio.sleep(0.1)


@pytest_asyncio.fixture(loop_scope="module")
async def running(aws: MotoSandbox, broker: Broker, tmp_path: Path) -> AsyncIterator[Running]:
    async with Running(aws, broker, tmp_path) as opened:
        yield opened


async def provision(service: Running) -> tuple[str, CertificateDelivery]:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    device = await service.device(serial, key)
    await device.send(request_points("req-svc", serial, request_csr(key, serial)))
    await service.wait_metric("ztp_cloud_confirmations_total", 1)
    [answer] = device.received
    assert isinstance(answer, CertificateDelivery)
    assert await active_for_thing(service.iot, f"ztp-{serial}") == [answer.certificate_id]
    return serial, answer


@module_loop
async def test_health_readiness_metrics_provisioning_and_stop(running: Running) -> None:
    await running.start()
    status, body = await running.get_json("/healthz")
    assert (status, body["alive"]) == (200, True)
    status, body = await running.get_json("/readyz")
    assert (status, body["ready"]) == (200, True), body
    await provision(running)
    metrics = (await running.get("/metrics"))[1]
    for name in (
        "ztp_cloud_issuances_total 1.0",
        "ztp_cloud_deliveries_total 1.0",
        "ztp_cloud_confirmations_total 1.0",
        "ztp_cloud_reused_total 0.0",
        "ztp_cloud_redeliveries_total 0.0",
        'ztp_cloud_shard_owned{shard="shardId-000000000000"} 1.0',
        'ztp_cloud_millis_behind_latest{shard="shardId-000000000000"}',
        'ztp_cloud_dead_letters_total{shard="shardId-000000000000"} 0.0',
        'ztp_cloud_kinesis_throttles_total{shard="shardId-000000000000"} 0.0',
    ):
        assert name in metrics, name
    assert await running.metric("ztp_cloud_records_total") >= 2  # request and status
    # AirVantage fails: not ready, and the body says why; healthy all the same.
    running.emulator.faults.update({"server_error_next": 1000})
    status, body = await running.get_json("/readyz")
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["stream"] == "ok"
    assert body["reason"].startswith("airvantage: ")
    assert (await running.get_json("/healthz"))[0] == 200
    running.emulator.faults.update({"server_error_next": 0})
    assert (await running.get_json("/readyz"))[0] == 200
    # Stop: the hand-off releases the lease and leaves a checkpoint.
    running.stop.set()
    async with asyncio.timeout(10):
        await running.task
    async with SqliteLeaseStore(running.tmp_path / "state" / "leases.sqlite3") as leases:
        [lease] = (await leases.list_leases()).values()
    assert lease.owner is None
    assert lease.checkpoint is not None


@module_loop
async def test_readiness_fails_when_the_stream_is_gone(
    aws: MotoSandbox, broker: Broker, tmp_path: Path
) -> None:
    # No second listing before the probe: a vanished stream ends the consumer at its next one.
    async with Running(aws, broker, tmp_path, ZTP_CLOUD_KINESIS_DISCOVERY_INTERVAL="60") as service:
        await service.start()
        await service.wait_metric("ztp_cloud_shard_owned", 1)
        await service.kinesis.delete_stream(StreamName=service.stream)
        status, body = await service.get_json("/readyz")
        assert status == 503
        assert body["checks"]["stream"].startswith("ResourceNotFoundError")
        assert body["checks"]["airvantage"] == "ok"


@module_loop
async def test_dynamodb_stores_created_and_shared(
    aws: MotoSandbox, broker: Broker, tmp_path: Path
) -> None:
    tables = {
        "ZTP_CLOUD_STORE_KIND": "dynamodb",
        "ZTP_CLOUD_STORE_LEASE_TABLE": f"leases-{uuid.uuid4().hex[:6]}",
        "ZTP_CLOUD_STORE_LEDGER_TABLE": f"ledger-{uuid.uuid4().hex[:6]}",
        "ZTP_CLOUD_STORE_CREATE_TABLES": "true",
    }
    async with Running(aws, broker, tmp_path, **tables) as service:
        await service.start()
        await provision(service)
        service.stop.set()
        async with asyncio.timeout(10):
            await service.task
        async with get_session().create_client("dynamodb", **aws.client_kwargs()) as dynamodb:
            store = DynamoLeaseStore(dynamodb, tables["ZTP_CLOUD_STORE_LEASE_TABLE"])
            [lease] = (await store.list_leases()).values()
            assert lease.owner is None
            ledger = await dynamodb.scan(TableName=tables["ZTP_CLOUD_STORE_LEDGER_TABLE"])
            assert ledger["Count"] == 1


@pytest.mark.slow
@module_loop
async def test_iot_throttles_are_counted_by_api(
    aws: MotoSandbox, broker: Broker, tmp_path: Path
) -> None:
    await aws.configure(iot_throttling=True, iot_tps_per_api={"CreateThing": 1.0})
    async with Running(aws, broker, tmp_path) as service:
        await service.start()
        keys = {new_serial(): ec.generate_private_key(ec.SECP256R1()) for _ in range(3)}
        devices = [await service.device(serial, key) for serial, key in keys.items()]
        for device, (serial, key) in zip(devices, keys.items(), strict=True):
            await device.send(request_points("req-thr", serial, request_csr(key, serial)))
        await service.wait_metric("ztp_cloud_confirmations_total", 3)
        _, metrics = await service.get("/metrics")
    throttled = [
        line for line in metrics.splitlines()
        if line.startswith('ztp_cloud_throttles_total{api="CreateThing"}')
    ]  # fmt: skip
    assert throttled
    assert float(throttled[0].rsplit(" ", 1)[1]) >= 1
    assert "ztp_cloud_issuances_total 3.0" in metrics
