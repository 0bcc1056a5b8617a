"""The AirVantage link against a real device broker (mosquitto, per-device passwords and ACL).

The test plays AirVantage through the broker's privileged account: it publishes tasks on
``{serial}/tasks/json`` and reads what the device publishes on ``{serial}/messages/json`` and
``{serial}/acks/json``. The configuration tests at the end follow the link's settings from the
TOML file and the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import pytest

from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from shared.airvantage import Ack, CommandTask, DataPoint, OtherTask
from shared.config import Secret
from shared.errors import ConfigError, TransportError
from tests.sandbox.conftest import running_on_private_loops
from ztp_daemon.config import load_device_config
from ztp_daemon.errors import LinkError
from ztp_daemon.keystore import KeyType
from ztp_daemon.link import (
    AirVantageLink,
    Connected,
    Disconnected,
    LinkEvent,
    LinkSettings,
    TaskArrived,
    backoff_delay,
)
from ztp_daemon.supervisor import link_settings

T = TypeVar("T")
WAIT = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SandboxPki:
    return SandboxPki.load_or_create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, pki: SandboxPki) -> Iterator[DeviceBroker]:
    with running_on_private_loops(
        DeviceBroker(tmp_path_factory.mktemp("device-broker"), pki=pki)
    ) as running:
        yield running


class Device:
    """A registered serial with its password, and the events its link reported."""

    def __init__(self, serial: str, password: str) -> None:
        self.serial = serial
        self.password = password
        self.events: list[LinkEvent] = []
        self._changed = asyncio.Event()

    def record(self, event: LinkEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def count(self, kind: type) -> int:
        return sum(isinstance(event, kind) for event in self.events)

    def tasks(self) -> list[CommandTask | OtherTask]:
        return [event.task for event in self.events if isinstance(event, TaskArrived)]


@pytest.fixture
async def device(broker: DeviceBroker) -> Device:
    serial = f"SN{uuid.uuid4().hex[:12].upper()}"
    password = f"pw-{uuid.uuid4().hex}"
    await broker.add_device(serial, password)
    return Device(serial, password)


def settings_for(broker: DeviceBroker, device: Device, **overrides: Any) -> LinkSettings:
    options: dict[str, Any] = {
        "serial": device.serial,
        "password": Secret(device.password),
        "host": broker.address.host,
        "port": broker.address.port,
        "tls": False,
        "connect_timeout": 2.0,
        "publish_timeout": 2.0,
        "backoff_base": 0.05,
        "backoff_cap": 0.2,
        "min_connect_interval": 0.05,
    }
    options.update(overrides)
    return LinkSettings(**options)


@contextlib.asynccontextmanager
async def admin(broker: DeviceBroker, *topics: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        broker.address.host,
        broker.address.port,
        username=broker.admin_username,
        password=broker.admin_password,
        identifier=f"test-admin-{uuid.uuid4().hex[:8]}",
    ) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        yield client


async def next_payload(client: aiomqtt.Client) -> Any:
    async with asyncio.timeout(WAIT):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            return json.loads(message.payload)
    raise AssertionError("no message")


def task_payload(uid: str, command: str = "ztp.deliver", **params: str) -> bytes:
    return json.dumps(
        [{"uid": uid, "timestamp": 1, "command": {"id": command, "params": params}}]
    ).encode()


# --- pure parts ---------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap() -> None:
    rng = random.Random(7)
    assert backoff_delay(0, base=1.0, cap=10.0, rng=rng) == 0.0
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 10.0), (500, 10.0)):
        delays = [backoff_delay(attempt, base=1.0, cap=10.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # Full jitter spreads over the whole range, not just near the ceiling.
        assert min(delays) < ceiling * 0.1
        assert max(delays) > ceiling * 0.9


def test_settings_validate_and_hide_the_password() -> None:
    good = {"serial": "SN1", "password": Secret("hunter2-secret"), "host": "localhost"}
    settings = LinkSettings(**good)  # type: ignore[arg-type]
    assert "hunter2" not in repr(settings)
    for change, key in (
        ({"serial": "SN/1"}, "device.serial"),
        ({"serial": "+"}, "device.serial"),
        ({"password": Secret("")}, "airvantage.password"),
        ({"port": 0}, "airvantage.port"),
        ({"tls": False, "ca_file": Path("/x")}, "airvantage.ca_file"),
        ({"backoff_base": 5.0, "backoff_cap": 1.0}, "airvantage.backoff_base"),
        ({"publish_timeout": 0.0}, "airvantage.publish_timeout"),
    ):
        with pytest.raises(ConfigError) as caught:
            LinkSettings(**{**good, **change})  # type: ignore[arg-type]
        assert caught.value.key == key
        assert "hunter2" not in str(caught.value)


# --- against mosquitto -------------------------------------------------------------------------


async def test_connects_subscribes_and_carries_tasks_data_and_acks(
    broker: DeviceBroker, device: Device
) -> None:
    topics = (f"{device.serial}/messages/json", f"{device.serial}/acks/json")
    async with (
        admin(broker, *topics) as cloud,
        AirVantageLink(settings_for(broker, device), on_event=device.record) as link,
    ):
        await device.wait_for(lambda: device.count(Connected) == 1)
        assert link.connected
        assert device.events[0] == Connected(attempt=1)

        await cloud.publish(f"{device.serial}/tasks/json", task_payload("t-1", f01="Z1.abc"), qos=1)
        await device.wait_for(lambda: len(device.tasks()) == 1)
        assert device.tasks() == [CommandTask("t-1", 1, "ztp.deliver", {"f01": "Z1.abc"})]

        await link.publish_data([DataPoint("ztp.request", "frag-0", 1000)])
        assert await next_payload(cloud) == [
            {"ztp.request": [{"timestamp": 1000, "value": "frag-0"}]}
        ]
        await link.ack([Ack.ok("t-1"), Ack.error("t-2", "unknown command 'x'")])
        assert await next_payload(cloud) == [
            {"uid": "t-1", "status": "OK"},
            {"uid": "t-2", "status": "ERROR", "message": "unknown command 'x'"},
        ]


async def test_bad_payloads_are_dropped_and_other_tasks_reported(
    broker: DeviceBroker, device: Device
) -> None:
    async with (
        admin(broker) as cloud,
        AirVantageLink(settings_for(broker, device), on_event=device.record),
    ):
        await device.wait_for(lambda: device.count(Connected) == 1)
        topic = f"{device.serial}/tasks/json"
        await cloud.publish(topic, b"{not json", qos=1)
        await cloud.publish(topic, json.dumps([{"timestamp": 3}]).encode(), qos=1)
        await cloud.publish(
            topic, json.dumps([{"uid": "s-1", "settings": [{"key": "k"}]}]).encode(), qos=1
        )
        await cloud.publish(topic, task_payload("t-9", "ztp.reboot"), qos=1)
        await device.wait_for(lambda: len(device.tasks()) == 2)
        assert device.tasks() == [
            OtherTask("s-1", None, ("settings",)),
            CommandTask("t-9", 1, "ztp.reboot", {}),
        ]
        assert device.count(Disconnected) == 0


async def test_wrong_password_retries_with_backoff_and_never_reports_connected(
    broker: DeviceBroker, device: Device
) -> None:
    device.password = "not-the-password"
    link = AirVantageLink(settings_for(broker, device), on_event=device.record)
    async with link:
        await asyncio.sleep(0.6)
        assert not link.connected
        with pytest.raises(LinkError) as caught:
            await link.publish_data([DataPoint("ztp.status", "x", 1)])
        assert isinstance(caught.value, TransportError)
    assert device.events == []


async def test_resubscribes_after_a_takeover_and_keeps_receiving(
    broker: DeviceBroker, device: Device
) -> None:
    async with (
        admin(broker) as cloud,
        AirVantageLink(settings_for(broker, device), on_event=device.record) as link,
    ):
        await device.wait_for(lambda: device.count(Connected) == 1)
        # Another client with the device's client id makes mosquitto drop the link's connection.
        async with aiomqtt.Client(
            broker.address.host,
            broker.address.port,
            username=device.serial,
            password=device.password,
            identifier=device.serial,
        ):
            await device.wait_for(lambda: device.count(Disconnected) == 1)
        await device.wait_for(lambda: device.count(Connected) >= 2)
        assert link.connected
        # The subscription was made again on the new connection.
        await cloud.publish(f"{device.serial}/tasks/json", task_payload("t-after"), qos=1)
        await device.wait_for(lambda: len(device.tasks()) == 1)
        assert device.tasks()[0].uid == "t-after"


# A refused handshake is not tested here: paho leaves its SSL socket unclosed when the handshake
# fails, and the ResourceWarning would fail whichever test the garbage collector runs in.
async def test_tls_with_a_configured_ca(tmp_path: Path, pki: SandboxPki, device: Device) -> None:
    tls_broker = DeviceBroker(tmp_path / "tls-broker", pki=pki, tls=True)
    (tmp_path / "tls-broker").mkdir()
    async with tls_broker:
        await tls_broker.add_device(device.serial, device.password)
        settings = settings_for(tls_broker, device, tls=True, ca_file=pki.ca_file)
        async with AirVantageLink(settings, on_event=device.record) as link:
            await device.wait_for(lambda: device.count(Connected) == 1)
            await link.ack([Ack.ok("t-tls")])


# --- configuration → link settings ---------------------------------------------------------------


def test_device_config_from_toml_env_and_password_file(tmp_path: Path, pki: SandboxPki) -> None:
    password_file = tmp_path / "av-password"
    password_file.write_text("file-password-123\n")
    config_file = tmp_path / "ztp.toml"
    config_file.write_text(
        f"""
[device]
serial_file = "{tmp_path / "serial"}"
key_type = "rsa-2048"

[airvantage]
host = "na.airvantage.net"
password_file = "{password_file}"
ca_file = "{pki.ca_file}"

[verification]
check_cn = false
ca_bundle = "{pki.ca_file}"
"""
    )
    (tmp_path / "serial").write_text("SN-FROM-FILE\n")
    config = load_device_config(
        config_file, {"ZTP_RETRY_FIRST": "5", "ZTP_AIRVANTAGE_PORT": "8884"}
    )
    assert config.device.key_type is KeyType.RSA_2048
    assert config.retry.first == 5.0
    assert config.read_serial() == "SN-FROM-FILE"
    policy = config.verify_policy()
    assert policy.check_subject_cn is False
    assert policy.trust_anchors == (pki.ca_cert,)
    settings = link_settings(config, "SN-FROM-FILE")
    assert (settings.host, settings.port, settings.tls) == ("na.airvantage.net", 8884, True)
    assert settings.password.reveal() == "file-password-123"
    assert "file-password-123" not in repr(config)


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({}, "airvantage.password"),
        (
            {
                "ZTP_AIRVANTAGE_PASSWORD": "p",
                "ZTP_DEVICE_SERIAL": "A",
                "ZTP_DEVICE_SERIAL_FILE": "/f",
            },
            "device.serial",
        ),
        (
            {"ZTP_AIRVANTAGE_PASSWORD": "p", "ZTP_RETRY_FIRST": "10", "ZTP_RETRY_CAP": "5"},
            "retry.first",
        ),
        (
            {
                "ZTP_AIRVANTAGE_PASSWORD": "p",
                "ZTP_AIRVANTAGE_TLS": "no",
                "ZTP_AIRVANTAGE_CA_FILE": "/ca.pem",
            },
            "airvantage.ca_file",
        ),
        ({"ZTP_AIRVANTAGE_PASSWORD": "p", "ZTP_LOG_LEVEL": "chatty"}, "log.level"),
        ({"ZTP_AIRVANTAGE_PASSWORD": "p", "ZTP_DEVICE_NAME": "x"}, "ZTP_DEVICE_NAME"),
    ],
)
def test_device_config_refuses_bad_settings_by_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_device_config(None, env)
    assert caught.value.key == key


def test_serial_must_suit_a_topic_and_the_ca_bundle_must_load(tmp_path: Path) -> None:
    env = {"ZTP_AIRVANTAGE_PASSWORD": "secret-pw-9", "ZTP_DEVICE_SERIAL": "SN:1"}
    with pytest.raises(ConfigError) as caught:
        load_device_config(None, env).read_serial()
    assert caught.value.key == "device.serial"
    with pytest.raises(ConfigError) as caught:
        load_device_config(None, {"ZTP_AIRVANTAGE_PASSWORD": "x"}).read_serial()
    assert caught.value.key == "device.serial"
    (tmp_path / "empty.pem").write_text("nothing here\n")
    for bundle in (tmp_path / "missing.pem", tmp_path / "empty.pem"):
        config = load_device_config(
            None, {"ZTP_AIRVANTAGE_PASSWORD": "x", "ZTP_VERIFICATION_CA_BUNDLE": str(bundle)}
        )
        with pytest.raises(ConfigError) as caught:
            config.verify_policy()
        assert caught.value.key == "verification.ca_bundle"


async def test_a_publish_left_without_puback_drops_the_connection_and_reconnects(
    tmp_path: Path, pki: SandboxPki, device: Device
) -> None:
    (tmp_path / "stalled").mkdir()
    async with DeviceBroker(tmp_path / "stalled", pki=pki) as stalled:
        await stalled.add_device(device.serial, device.password)
        settings = settings_for(stalled, device, publish_timeout=0.3)
        async with AirVantageLink(settings, on_event=device.record) as link:
            await device.wait_for(lambda: device.count(Connected) == 1)
            pid = stalled.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            try:
                with pytest.raises(LinkError, match="no PUBACK"):
                    await link.ack([Ack.ok("t-stalled")])
                await device.wait_for(lambda: device.count(Disconnected) == 1)
                assert not link.connected
            finally:
                os.kill(pid, signal.SIGCONT)
            await device.wait_for(lambda: device.count(Connected) == 2)
            await link.ack([Ack.ok("t-after")])
    assert device.events[1] == Disconnected("no PUBACK within 0.3 s")
