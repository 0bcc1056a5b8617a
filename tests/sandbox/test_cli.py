"""``ztp-sandbox up/down`` as real processes, and the orchestrator behind it.

The CLI tests start ``python -m sandbox up`` exactly as a shell would, reach every endpoint its
JSON names with the clients the daemons use (a TCP connect to both brokers, aiobotocore, aiohttp,
aiomqtt), then stop it with ``down`` or a signal and look through ``/proc`` for anything left of
that directory. The orchestrator tests use the session's sandbox (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandbox.__main__ import DESCRIPTION_FILE, PID_FILE, _claim, build_parser
from sandbox.airvantage import Faults
from sandbox.errors import BrokerStartError, SandboxUsageError
from sandbox.moto_fidelity import FidelityConfig
from sandbox.pki import SandboxPki
from sandbox.world import (
    MQTT_SOCKET_OPTIONS,
    DeviceCredentials,
    Sandbox,
    SandboxDescription,
    SandboxThread,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_BOUND = 20.0  # generous on a loaded 2-core machine; the figure itself is reported
TOP_LEVEL_KEYS = {
    "aws_endpoint_url",
    "region",
    "kinesis_stream",
    "iot_mqtt",
    "airvantage",
    "devices",
    "pids",
    "directory",
}
CHILDREN = {"device_broker", "iot_broker", "moto"}


# --------------------------------------------------------------------------------------------
# Helpers


async def start_up(directory: Path, *arguments: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox", "up", "--dir", str(directory), *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )  # fmt: skip


async def run_cli(*arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sandbox", *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def read_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(60):
        line = await process.stdout.readline()
    if not line:
        assert process.stderr is not None
        err = await process.stderr.read()
        pytest.fail(f"ztp-sandbox up printed nothing; stderr: {err.decode()[-2000:]}")
    return line.decode()


def processes_of(directory: Path) -> dict[int, str]:
    """Every live process whose command line names ``directory`` (ours excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\x00", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(directory) in command and state != "Z":
            found[int(entry.name)] = command
    return found


def pid_alive(pid: int, directory: Path) -> bool:
    # A pid may be reused after its process ended: only one naming the directory counts.
    return pid in processes_of(directory)


async def stop_everything(process: asyncio.subprocess.Process, directory: Path) -> None:
    """Clean-up after a failed test: no process of the directory may survive it."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    for pid in processes_of(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def tcp_connects(host: str, port: int) -> bool:
    async with asyncio.timeout(5):
        _, writer = await asyncio.open_connection(host, port)
    writer.close()
    await writer.wait_closed()
    return True


def aws_client(described: dict[str, Any], service: str) -> Any:
    return get_session().create_client(
        service,
        endpoint_url=described["aws_endpoint_url"],
        region_name=described["region"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=AioConfig(retries={"total_max_attempts": 1}),
    )


async def airvantage_token(airvantage: dict[str, Any]) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{airvantage['api_url']}/api/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": airvantage["client_id"],
                "client_secret": airvantage["client_secret"],
            },
        ) as response,
    ):
        assert response.status == 200
        body = await response.json()
    token: str = body["access_token"]
    return token


async def systems_named(airvantage: dict[str, Any], token: str, serial: str) -> list[Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{airvantage['api_url']}/api/v1/systems",
            params={"gateway": f"serialNumber:{serial}", "fields": "uid"},
            headers={"Authorization": f"Bearer {token}"},
        ) as response,
    ):
        assert response.status == 200
        items: list[Any] = (await response.json())["items"]
        return items


def device_client(host: str, port: int, serial: str, password: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        host,
        port,
        identifier=serial,
        username=serial,
        password=password,
        timeout=5,
        socket_options=MQTT_SOCKET_OPTIONS,
    )


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> bool:
    """Poll ``check`` until it holds: what it watches (another process's files) has no event."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - nothing to wait on but time
            await asyncio.sleep(0.05)
    return True


# --------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.slow
async def test_up_json_reaches_every_endpoint_and_down_leaves_no_process(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    began = time.monotonic()
    up = await start_up(directory, "--devices", "2", "--json")
    try:
        described = json.loads(await read_line(up))
        startup = time.monotonic() - began
        assert startup < STARTUP_BOUND

        assert set(described) == TOP_LEVEL_KEYS
        assert set(described["iot_mqtt"]) == {
            "host",
            "port",
            "ca_file",
            "observer_cert_file",
            "observer_key_file",
        }
        assert set(described["airvantage"]) == {
            "api_url",
            "mqtt_host",
            "mqtt_port",
            "client_id",
            "client_secret",
        }
        assert len(described["devices"]) == 2
        assert all(set(d) == {"serial", "password"} for d in described["devices"])
        assert set(described["pids"]) == {"sandbox"} | CHILDREN
        assert described["pids"]["sandbox"] == up.pid
        assert described["directory"] == str(directory)
        children = {described["pids"][name] for name in CHILDREN}
        assert all(pid_alive(pid, directory) for pid in children)

        # The same description on disk, private, and the pid file names the process.
        description_file = directory / DESCRIPTION_FILE
        assert json.loads(description_file.read_text()) == described
        assert description_file.stat().st_mode & 0o777 == 0o600
        assert int((directory / PID_FILE).read_text()) == up.pid

        # Every endpoint answers.
        iot, airvantage = described["iot_mqtt"], described["airvantage"]
        assert await tcp_connects(iot["host"], iot["port"])
        assert await tcp_connects(airvantage["mqtt_host"], airvantage["mqtt_port"])
        async with aws_client(described, "kinesis") as kinesis:
            streams = await kinesis.list_streams()
        assert described["kinesis_stream"] in streams["StreamNames"]
        token = await airvantage_token(airvantage)
        # Each registered device is a system of the emulator and has a broker account.
        for device in described["devices"]:
            assert len(await systems_named(airvantage, token, device["serial"])) == 1
            async with device_client(
                airvantage["mqtt_host"],
                airvantage["mqtt_port"],
                device["serial"],
                device["password"],
            ):
                pass
        # The IoT broker speaks mutual TLS with the sandbox CA; the observer may connect.
        context = ssl.create_default_context(cafile=iot["ca_file"])
        context.load_cert_chain(iot["observer_cert_file"], iot["observer_key_file"])
        async with aiomqtt.Client(
            iot["host"],
            iot["port"],
            tls_context=context,
            timeout=5,
            socket_options=MQTT_SOCKET_OPTIONS,
        ) as observer:
            await observer.subscribe("dt/#")
        # The description reads back as what was printed.
        assert SandboxDescription.from_json(described).to_json() == described

        # A second 'up' on the same directory is refused, and changes nothing.
        code, out, err = await run_cli("up", "--dir", str(directory), "--json")
        assert code == 1
        assert out == ""
        assert "already running" in err
        assert int((directory / PID_FILE).read_text()) == up.pid

        code, _, err = await run_cli("down", "--dir", str(directory))
        assert code == 0, err
        # 'down' returns once the process has exited.
        assert not pid_alive(up.pid, directory)
        async with asyncio.timeout(5):
            assert await up.wait() == 0
        assert up.stdout is not None
        assert await up.stdout.read() == b""  # --json: exactly one line, ever
        assert processes_of(directory) == {}
        assert not (directory / PID_FILE).exists()
        assert not description_file.exists()
        # No secret reached a log: the sandbox's own, moto's or the brokers'.
        logs = {path: path.read_text() for path in directory.rglob("*.log")}
        assert directory / "sandbox.log" in logs
        assert "sandbox.started" in logs[directory / "sandbox.log"]
        secrets = [airvantage["client_secret"], *(d["password"] for d in described["devices"])]
        for path, text in logs.items():
            assert not [secret for secret in secrets if secret in text], path
    finally:
        await stop_everything(up, directory)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_stops_every_child_and_the_summary_is_readable(
    tmp_path: Path, signum: signal.Signals
) -> None:
    directory = tmp_path / "sb"
    up = await start_up(directory, "--devices", "0")
    try:
        summary = []
        while not summary or not summary[-1].startswith("stop with:"):
            summary.append(await read_line(up))
        text = "".join(summary)
        described = json.loads((directory / DESCRIPTION_FILE).read_text())
        assert f"{described['iot_mqtt']['host']}:{described['iot_mqtt']['port']}" in text
        assert described["aws_endpoint_url"] in text
        assert described["airvantage"]["api_url"] in text
        assert described["airvantage"]["client_secret"] not in text  # secrets stay in the file
        assert f"ztp-sandbox down --dir {directory}" in text
        children = {described["pids"][name] for name in CHILDREN}
        assert all(pid_alive(pid, directory) for pid in children)

        up.send_signal(signum)
        async with asyncio.timeout(15):
            assert await up.wait() == 0
        assert processes_of(directory) == {}
        assert not (directory / PID_FILE).exists()
    finally:
        await stop_everything(up, directory)


@pytest.mark.slow
async def test_down_after_up_was_killed_kills_what_it_left(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    up = await start_up(directory, "--devices", "0", "--json")
    try:
        described = json.loads(await read_line(up))
        up.kill()  # SIGKILL: no chance to stop its children
        await up.wait()
        brokers = {described["pids"]["device_broker"], described["pids"]["iot_broker"]}
        assert brokers <= set(processes_of(directory))

        code, _, err = await run_cli("down", "--dir", str(directory))
        assert code == 1
        assert "killed" in err

        async def nothing_left() -> bool:
            return not processes_of(directory)

        assert await eventually(nothing_left)
        assert not (directory / PID_FILE).exists()
        assert not (directory / DESCRIPTION_FILE).exists()
        code, _, err = await run_cli("down", "--dir", str(directory))
        assert (code, "no sandbox running" in err) == (0, True)
    finally:
        await stop_everything(up, directory)


async def test_help_down_without_sandbox_and_bad_arguments(tmp_path: Path) -> None:
    code, out, _ = await run_cli("--help")
    assert code == 0
    for word in ("up", "down", "--devices", "aws_endpoint_url", "sandbox.json"):
        assert word in out
    code, out, _ = await run_cli("up", "--help")
    assert code == 0
    for word in ("--dir", "--devices", "--json", "--stream"):
        assert word in out
    code, _, err = await run_cli("down", "--dir", str(tmp_path / "nothing"))
    assert code == 0
    assert "no sandbox running" in err
    code, _, err = await run_cli("up", "--dir", str(tmp_path / "x"), "--devices", "many")
    assert code == 2
    assert "--devices" in err
    assert not (tmp_path / "x").exists()
    # mosquitto cannot be configured with such paths: a clear refusal, nothing left running.
    spaced = tmp_path / "with space"
    code, out, err = await run_cli("up", "--dir", str(spaced), "--json")
    assert (code, out) == (1, "")
    assert "whitespace" in err
    assert processes_of(spaced) == {}
    assert not (spaced / PID_FILE).exists()


def test_pid_file_is_claimed_once_and_a_stale_one_taken_over(tmp_path: Path) -> None:
    pid_file = tmp_path / PID_FILE
    assert _claim(pid_file) is None
    assert int(pid_file.read_text()) == os.getpid()
    # A pid file naming no live sandbox (here: this test process) is taken over.
    pid_file.write_text("999999999\n")
    assert _claim(pid_file) is None
    assert int(pid_file.read_text()) == os.getpid()
    # One naming a live sandbox process is not.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "ztp-sandbox", "up"],
        stdin=subprocess.DEVNULL,
    )
    try:
        # Popen returns before the kernel has set the new command line: wait for it.
        deadline = time.monotonic() + 5
        while "ztp-sandbox" not in Path(f"/proc/{holder.pid}/cmdline").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        pid_file.write_text(f"{holder.pid}\n")
        assert _claim(pid_file) == holder.pid
        assert int(pid_file.read_text()) == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_parser_reads_what_the_help_says() -> None:
    args = build_parser().parse_args(["up", "--dir", "d", "--devices", "3", "--json"])
    assert (args.command, args.dir, args.devices, args.json) == ("up", Path("d"), 3, True)
    args = build_parser().parse_args(["down", "--dir", "d"])
    assert (args.command, args.timeout) == ("down", 30.0)


# --------------------------------------------------------------------------------------------
# The orchestrator


def break_iot_broker_certificate(directory: Path) -> None:
    """Leave an unusable IoT broker certificate where the PKI reuses it: mosquitto will exit."""
    pki = SandboxPki.load_or_create(directory / "pki")
    (pki.directory / "iot-broker.pem").write_text("not a certificate\n")
    (pki.directory / "iot-broker.key").write_text("not a key\n")


async def test_cancelled_start_leaves_no_process(tmp_path: Path) -> None:
    directory = tmp_path / "sb"

    async def enter() -> None:
        async with Sandbox(directory):
            pytest.fail("the start should have been cancelled")

    starting = asyncio.create_task(enter())
    # Cancel once a child process of the directory exists, in the middle of the start.
    async with asyncio.timeout(30):
        while not processes_of(directory):  # noqa: ASYNC110 - /proc has no event to await
            await asyncio.sleep(0.005)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert processes_of(directory) == {}


async def test_failed_start_stops_what_did_start(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    break_iot_broker_certificate(directory)
    with pytest.raises(BrokerStartError):
        async with Sandbox(directory):
            pytest.fail("the start should have failed")
    assert processes_of(directory) == {}


def test_description_files_that_do_not_describe_a_sandbox_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SandboxUsageError, match="cannot read"):
        SandboxDescription.load(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SandboxUsageError, match="JSON object"):
        SandboxDescription.load(tmp_path / "list.json")
    good = {
        "directory": "/d",
        "aws_endpoint_url": "http://127.0.0.1:1",
        "region": "us-east-1",
        "kinesis_stream": "s",
        "iot_mqtt": {
            "host": "127.0.0.1",
            "port": 2,
            "ca_file": "/d/ca.pem",
            "observer_cert_file": "/d/o.pem",
            "observer_key_file": "/d/o.key",
        },
        "airvantage": {
            "api_url": "http://127.0.0.1:3",
            "mqtt_host": "127.0.0.1",
            "mqtt_port": 4,
            "client_id": "c",
            "client_secret": "s",
        },
        "devices": [{"serial": "SN1", "password": "p"}],
        "pids": {"sandbox": 5},
    }
    assert SandboxDescription.from_json(good).to_json() == good
    for broken, where in (
        ({**good, "pids": {"sandbox": True}}, "pids"),
        ({**good, "iot_mqtt": {**good["iot_mqtt"], "port": "2"}}, "iot_mqtt.port"),
        ({**good, "airvantage": {**good["airvantage"], "client_secret": None}}, "client_secret"),
        ({**good, "devices": [{"serial": "SN1"}]}, "devices[].password"),
    ):
        with pytest.raises(SandboxUsageError, match=re.escape(where)):
            SandboxDescription.from_json(broken)


def test_device_credentials_keep_the_password_out_of_repr() -> None:
    device = DeviceCredentials("SN1", "hunter2-secret")
    assert "hunter2-secret" not in repr(device)
    assert device.to_json() == {"serial": "SN1", "password": "hunter2-secret"}


async def test_registered_device_talks_to_the_emulator_and_reaches_kinesis(
    sandbox: SandboxThread, sandbox_device: DeviceCredentials
) -> None:
    described = sandbox.description.to_json()
    airvantage = described["airvantage"]
    token = await airvantage_token(airvantage)
    [system] = await systems_named(airvantage, token, sandbox_device.serial)
    async with device_client(
        airvantage["mqtt_host"],
        airvantage["mqtt_port"],
        sandbox_device.serial,
        sandbox_device.password,
    ) as gateway:
        await gateway.publish(
            f"{sandbox_device.serial}/messages/json", json.dumps({"ztp.status": "up"}), qos=1
        )
    async with aws_client(described, "kinesis") as kinesis:
        shard = (await kinesis.list_shards(StreamName=described["kinesis_stream"]))["Shards"][0]
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=described["kinesis_stream"],
                ShardId=shard["ShardId"],
                ShardIteratorType="TRIM_HORIZON",
            )
        )["ShardIterator"]
        envelopes: list[dict[str, Any]] = []

        async def arrived() -> bool:
            nonlocal iterator
            page = await kinesis.get_records(ShardIterator=iterator, Limit=100)
            iterator = page["NextShardIterator"]
            envelopes.extend(json.loads(r["Data"]) for r in page["Records"])
            return bool(envelopes)

        assert await eventually(arrived)
    [envelope] = envelopes
    assert envelope["name"] == "event.system.incoming.communication"
    assert envelope["content"]["system.id"] == system["uid"]
    assert envelope["content"]["communication.id"] == sandbox_device.serial


async def test_reset_restores_knobs_faults_and_an_empty_stream(sandbox: SandboxThread) -> None:
    described = sandbox.description.to_json()
    stream = described["kinesis_stream"]

    async def disturb(world: Sandbox) -> None:
        await world.aws.configure(kinesis_throttling=True)
        world.emulator.faults.update({"rate_limit_next": 3, "latency": 0.5})

    await sandbox.run(disturb)
    async with aws_client(described, "kinesis") as kinesis:
        await kinesis.put_record(StreamName=stream, Data=b"left over", PartitionKey="k")

    await sandbox.run(Sandbox.reset)

    async def state(world: Sandbox) -> tuple[FidelityConfig, dict[str, Any]]:
        return await world.aws.config(), world.emulator.faults.to_json()

    config, faults = await sandbox.run(state)
    assert config == FidelityConfig()
    assert faults == Faults().to_json()
    async with aws_client(described, "kinesis") as kinesis:
        shard = (await kinesis.list_shards(StreamName=stream))["Shards"][0]
        iterator = (
            await kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
            )
        )["ShardIterator"]
        assert (await kinesis.get_records(ShardIterator=iterator))["Records"] == []


async def test_describe_endpoint_and_revocation_reach_the_iot_broker(
    sandbox: SandboxThread, tmp_path: Path
) -> None:
    described = sandbox.description.to_json()
    iot_mqtt = described["iot_mqtt"]
    thing = f"thing-{uuid.uuid4().hex[:10]}"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, thing)]))
        .sign(key, hashes.SHA256())
    )
    async with aws_client(described, "iot") as iot:
        endpoint = await iot.describe_endpoint(endpointType="iot:Data-ATS")
        assert endpoint["endpointAddress"] == iot_mqtt["host"]
        created = await iot.create_certificate_from_csr(
            certificateSigningRequest=csr.public_bytes(serialization.Encoding.PEM).decode(),
            setAsActive=True,
        )
        cert_file, key_file = tmp_path / "thing.pem", tmp_path / "thing.key"
        cert_file.write_text(created["certificatePem"])
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        # TLS 1.2: a refused client certificate fails the handshake itself.
        context = ssl.create_default_context(cafile=iot_mqtt["ca_file"])
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)

        async def handshake_ok() -> bool:
            try:
                async with asyncio.timeout(3):
                    _, writer = await asyncio.open_connection(
                        iot_mqtt["host"], iot_mqtt["port"], ssl=context
                    )
            except ssl.SSLError:
                return False
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()
            return True

        assert await handshake_ok()
        await iot.update_certificate(certificateId=created["certificateId"], newStatus="REVOKED")

        async def refused() -> bool:
            return not await handshake_ok()

        assert await eventually(refused)
        with pytest.raises(ClientError):
            await iot.update_certificate(certificateId=created["certificateId"], newStatus="ACTIVE")
    # A reset forgets every certificate and empties the CRL; the broker has reloaded on return.
    await sandbox.run(Sandbox.reset)
    assert await handshake_ok()


def test_sandbox_thread_reports_a_failed_start(tmp_path: Path) -> None:
    directory = tmp_path / "sb"
    break_iot_broker_certificate(directory)
    thread = SandboxThread(directory)
    with pytest.raises(BrokerStartError):
        thread.start()
    assert processes_of(directory) == {}
