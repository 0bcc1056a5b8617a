"""The sandbox's mosquitto brokers, exercised with aiomqtt over loopback.

"Not delivered" is never asserted with a sleep: the forbidden message is sent first, then an
allowed marker on the same path; mosquitto keeps order per connection, so if the forbidden one had
got through it would arrive before the marker. Negative TLS cases cap the client at TLS 1.2, where
a refused certificate fails the handshake itself.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import ssl
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
import structlog.testing

from sandbox.brokers import (
    DEFAULT_ADMIN_USERNAME,
    OBSERVER_COMMON_NAME,
    BrokerAddress,
    ClientCertificate,
    DeviceBroker,
    IotBroker,
    client_tls_context,
    log_shows_reload,
    log_size,
    mosquitto_password_hash,
    write_client_certificate,
)
from sandbox.errors import BrokerStartError, SandboxUsageError
from sandbox.moto_fidelity import _confirm_reload
from sandbox.pki import SandboxPki, write_atomic
from tests.sandbox.conftest import handshake_refused

TLS12 = ssl.TLSVersion.TLSv1_2


def mqtt_client(
    address: BrokerAddress,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: ssl.SSLContext | None = None,
    timeout: float = 3.0,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        address.host,
        address.port,
        username=username,
        password=password,
        identifier=f"{username or 'client'}-{uuid.uuid4().hex[:6]}",
        protocol=aiomqtt.ProtocolVersion.V311,
        tls_context=tls,
        timeout=timeout,
    )


def admin_client(broker: DeviceBroker) -> aiomqtt.Client:
    return mqtt_client(
        broker.address, username=broker.admin_username, password=broker.admin_password
    )


def thing_client(
    broker: IotBroker, cert: ClientCertificate, *, maximum_version: ssl.TLSVersion | None = None
) -> aiomqtt.Client:
    tls = client_tls_context(broker.address, cert, maximum_version=maximum_version)
    return mqtt_client(broker.address, tls=tls)


def observer_client(broker: IotBroker) -> aiomqtt.Client:
    return thing_client(broker, broker.observer)


async def next_message(client: aiomqtt.Client) -> aiomqtt.Message:
    async with asyncio.timeout(3.0):
        return await anext(client.messages)


async def refused(client: aiomqtt.Client) -> bool:
    """Whether the broker refuses the connection (CONNACK refusal or failed TLS handshake)."""
    try:
        async with client:
            pass
    except aiomqtt.MqttError:
        return True
    return False


def tls12(broker: IotBroker, cert: ClientCertificate | None) -> ssl.SSLContext:
    return client_tls_context(broker.address, cert, maximum_version=TLS12)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- device broker -----------------------------------------------------------------------------


async def test_device_with_right_password_connects_and_wrong_one_is_refused(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    await device_broker.add_device(unique_serial, "right-password")
    address = device_broker.address
    assert address.ca_file is None
    assert address.host == "127.0.0.1"

    async with mqtt_client(address, username=unique_serial, password="right-password") as device:
        await device.subscribe(f"{unique_serial}/tasks/json", qos=1)
        await device.publish(f"{unique_serial}/tasks/json", b"echo", qos=1)
        assert (await next_message(device)).payload == b"echo"

    assert await refused(mqtt_client(address, username=unique_serial, password="wrong-password"))
    assert await refused(mqtt_client(address, username=f"{unique_serial}X", password="x"))
    assert await refused(mqtt_client(address))  # anonymous


async def test_device_cannot_publish_under_another_serial(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    other = f"{unique_serial}B"
    await device_broker.add_devices({unique_serial: "pw-a", other: "pw-b"})
    address = device_broker.address
    async with (
        mqtt_client(address, username=unique_serial, password="pw-a") as device,
        mqtt_client(address, username=other, password="pw-b") as victim,
        admin_client(device_broker) as admin,
    ):
        await victim.subscribe(f"{other}/#", qos=1)
        await admin.subscribe("#", qos=1)
        # QoS 1: each PUBACK means mosquitto has dispatched (or dropped) that publish.
        await device.publish(f"{other}/tasks/json", b"forged", qos=1)
        await device.publish(f"{unique_serial}/messages/json", b"own", qos=1)
        await admin.publish(f"{other}/tasks/json", b"marker", qos=1)

        seen_by_admin = await next_message(admin)
        assert (seen_by_admin.topic.value, seen_by_admin.payload) == (
            f"{unique_serial}/messages/json",
            b"own",
        )
        assert (await next_message(victim)).payload == b"marker"


async def test_device_cannot_subscribe_to_another_serial(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    other = f"{unique_serial}B"
    await device_broker.add_device(unique_serial, "pw-a")
    async with (
        mqtt_client(device_broker.address, username=unique_serial, password="pw-a") as device,
        admin_client(device_broker) as admin,
    ):
        # mosquitto grants the SUBACK of a denied filter: only what arrives counts.
        await device.subscribe(f"{other}/#", qos=1)
        await device.subscribe("#", qos=1)
        await device.subscribe(f"{unique_serial}/tasks/json", qos=1)
        await admin.publish(f"{other}/tasks/json", b"not yours", qos=1)
        await admin.publish(f"{unique_serial}/tasks/json", b"yours", qos=1)
        message = await next_message(device)
        assert (message.topic.value, message.payload) == (f"{unique_serial}/tasks/json", b"yours")


async def test_admin_reads_and_writes_every_device_topic(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    await device_broker.add_device(unique_serial, "pw")
    assert device_broker.admin_username == DEFAULT_ADMIN_USERNAME
    async with (
        mqtt_client(device_broker.address, username=unique_serial, password="pw") as device,
        admin_client(device_broker) as admin,
    ):
        await admin.subscribe(f"{unique_serial}/acks/json", qos=1)
        await device.subscribe(f"{unique_serial}/tasks/json", qos=1)
        await admin.publish(f"{unique_serial}/tasks/json", b'[{"uid": "t1"}]', qos=1)
        assert (await next_message(device)).payload == b'[{"uid": "t1"}]'
        await device.publish(
            f"{unique_serial}/acks/json", b'[{"uid": "t1", "status": "OK"}]', qos=1
        )
        assert (await next_message(admin)).payload == b'[{"uid": "t1", "status": "OK"}]'


async def test_add_device_is_effective_on_return_and_can_change_or_remove_it(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    address = device_broker.address
    assert await refused(mqtt_client(address, username=unique_serial, password="first"))

    await device_broker.add_device(unique_serial, "first")
    assert unique_serial in device_broker.devices
    assert not await refused(mqtt_client(address, username=unique_serial, password="first"))

    await device_broker.add_device(unique_serial, "second")
    assert await refused(mqtt_client(address, username=unique_serial, password="first"))
    assert not await refused(mqtt_client(address, username=unique_serial, password="second"))

    await device_broker.remove_device(unique_serial)
    assert await refused(mqtt_client(address, username=unique_serial, password="second"))


async def test_add_devices_registers_many_with_one_reload(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    credentials = {f"{unique_serial}-{index:03d}": f"pw-{index}" for index in range(200)}
    reloads_before = device_broker.log_file.read_bytes().count(b"Reloading config.")
    await device_broker.add_devices(credentials)
    assert device_broker.log_file.read_bytes().count(b"Reloading config.") == reloads_before + 1
    for serial in (f"{unique_serial}-000", f"{unique_serial}-117"):
        client = mqtt_client(device_broker.address, username=serial, password=credentials[serial])
        assert not await refused(client)
    text = device_broker.password_file.read_text()
    assert "pw-117" not in text  # only hashes are written
    assert device_broker.password_file.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("serial", ["", "a/b", "a+b", "a#", "a:b", "a b", "-x", "x" * 200])
async def test_unusable_serials_are_refused_before_anything_changes(
    device_broker: DeviceBroker, serial: str
) -> None:
    before = device_broker.password_file.read_bytes()
    with pytest.raises(SandboxUsageError):
        await device_broker.add_devices({"SNGOOD0001": "pw", serial: "pw"})
    assert device_broker.password_file.read_bytes() == before
    assert "SNGOOD0001" not in device_broker.devices


async def test_unusable_passwords_are_refused(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    for password in ("", "x" * 256, "a\x00b"):
        with pytest.raises(SandboxUsageError) as caught:
            await device_broker.add_device(unique_serial, password)
        if password:
            assert password not in str(caught.value)
    with pytest.raises(SandboxUsageError):
        await device_broker.add_device(device_broker.admin_username, "pw")


def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    password_file = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(password_file), "SN1", "s3cret pass"],
        check=True,
        capture_output=True,
    )
    written = password_file.read_text().strip().split(":", 1)[1]
    _, scheme, iterations, salt_b64, _ = written.split("$")
    assert (scheme, iterations) == ("7", "101")
    ours = mosquitto_password_hash("s3cret pass", salt=base64.b64decode(salt_b64))
    assert ours == written


@pytest.mark.parametrize("mode", [0o600, 0o644])
def test_atomic_write_sets_the_exact_mode_over_a_stale_temporary_file(
    tmp_path: Path, mode: int
) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    stale = tmp_path / ".key.pem.tmp"  # left by a writer killed mid-way, too wide
    stale.write_bytes(b"torn")
    stale.chmod(0o666)
    previous = os.umask(0o077)
    try:
        write_atomic(target, b"new" * 10_000, mode)
    finally:
        os.umask(previous)
    assert target.read_bytes() == b"new" * 10_000
    assert target.stat().st_mode & 0o777 == mode
    assert not stale.exists()


async def test_tls_device_broker_connects_with_the_sandbox_ca(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_serial: str
) -> None:
    async with DeviceBroker(tmp_path, pki=sandbox_pki, tls=True) as broker:
        await broker.add_device(unique_serial, "pw")
        address = broker.address
        assert address.ca_file == sandbox_pki.ca_file
        tls = client_tls_context(address)
        async with mqtt_client(address, username=unique_serial, password="pw", tls=tls) as device:
            await device.subscribe(f"{unique_serial}/tasks/json", qos=1)
            await device.publish(f"{unique_serial}/tasks/json", b"over tls", qos=1)
            assert (await next_message(device)).payload == b"over tls"
        # A plain client cannot talk to the TLS listener (it never gets a CONNACK).
        plain = mqtt_client(address, username=unique_serial, password="pw", timeout=0.5)
        assert await refused(plain)


# -- IoT broker ----------------------------------------------------------------------------------


async def test_thing_publishes_under_its_prefix_and_the_observer_receives(
    iot_broker: IotBroker, unique_thing: ClientCertificate
) -> None:
    thing = unique_thing.common_name
    async with (
        observer_client(iot_broker) as observer,
        thing_client(iot_broker, unique_thing) as client,
    ):
        await observer.subscribe("#", qos=1)
        await observer.subscribe("$aws/#", qos=1)
        for topic in (
            "dt/other-thing/telemetry",
            "cmd/other-thing/x",
            "$aws/things/other-thing/shadow/update",
            "elsewhere/telemetry",
            f"{thing}/telemetry",
        ):
            await client.publish(topic, b"forbidden", qos=1)
        await client.publish(f"dt/{thing}/telemetry", b"1", qos=1)
        await client.publish(f"$aws/things/{thing}/shadow/update", b"2", qos=1)
        first, second = await next_message(observer), await next_message(observer)
        assert [(m.topic.value, m.payload) for m in (first, second)] == [
            (f"dt/{thing}/telemetry", b"1"),
            (f"$aws/things/{thing}/shadow/update", b"2"),
        ]


async def test_thing_cannot_receive_another_things_commands(
    iot_broker: IotBroker, client_certificate: Callable[[str], ClientCertificate]
) -> None:
    suffix = uuid.uuid4().hex[:8]
    mine, theirs = client_certificate(f"mine-{suffix}"), client_certificate(f"theirs-{suffix}")
    async with (
        thing_client(iot_broker, mine) as client,
        thing_client(iot_broker, theirs) as other,
    ):
        await client.subscribe(f"cmd/{theirs.common_name}/#", qos=1)
        await client.subscribe(f"cmd/{mine.common_name}/#", qos=1)
        await other.publish(f"cmd/{theirs.common_name}/reboot", b"theirs", qos=1)
        await client.publish(f"cmd/{mine.common_name}/marker", b"mine", qos=1)
        message = await next_message(client)
        assert message.payload == b"mine"


async def test_observer_cannot_publish(
    iot_broker: IotBroker, unique_thing: ClientCertificate
) -> None:
    thing = unique_thing.common_name
    assert iot_broker.observer.common_name == OBSERVER_COMMON_NAME
    cert_file, key_file = iot_broker.observer_certificate()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert cert_file.exists()
    async with (
        observer_client(iot_broker) as observer,
        thing_client(iot_broker, unique_thing) as client,
    ):
        await client.subscribe(f"cmd/{thing}/#", qos=1)
        await observer.publish(f"cmd/{thing}/forged", b"forged", qos=1)
        await client.publish(f"cmd/{thing}/marker", b"marker", qos=1)
        assert (await next_message(client)).payload == b"marker"


async def test_connection_without_client_certificate_is_refused(iot_broker: IotBroker) -> None:
    assert await handshake_refused(iot_broker.address, tls12(iot_broker, None))
    assert await refused(mqtt_client(iot_broker.address, timeout=0.5))  # no TLS at all


async def test_certificate_from_another_ca_is_refused(
    iot_broker: IotBroker, tmp_path: Path
) -> None:
    stranger_ca = SandboxPki.load_or_create(tmp_path / "stranger-ca")
    stranger = write_client_certificate(stranger_ca, "stranger-thing", tmp_path / "stranger")
    assert await handshake_refused(iot_broker.address, tls12(iot_broker, stranger))


async def test_revoked_certificate_is_refused_after_reload_crl(
    iot_broker: IotBroker, client_certificate: Callable[[str], ClientCertificate]
) -> None:
    suffix = uuid.uuid4().hex[:8]
    revoked, kept = client_certificate(f"revoked-{suffix}"), client_certificate(f"kept-{suffix}")
    address = iot_broker.address
    assert not await refused(thing_client(iot_broker, revoked, maximum_version=TLS12))
    try:
        await iot_broker.reload_crl([revoked.serial])
        assert await handshake_refused(address, tls12(iot_broker, revoked))
        assert not await handshake_refused(address, tls12(iot_broker, kept))
        assert not await refused(thing_client(iot_broker, kept))
    finally:
        await iot_broker.reload_crl([])
    assert not await refused(thing_client(iot_broker, revoked, maximum_version=TLS12))


async def test_external_sighup_through_the_pid_file_reloads_the_crl(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_thing: ClientCertificate
) -> None:
    # What the moto fidelity layer does: rewrite the CRL, then signal the pid in the pid file.
    async with IotBroker(tmp_path, pki=sandbox_pki) as broker:
        assert int(broker.pid_file.read_text()) == broker.pid
        assert not await refused(thing_client(broker, unique_thing, maximum_version=TLS12))
        reloads = broker.log_file.read_bytes().count(b"Reloading config.")
        sandbox_pki.write_crl([unique_thing.serial])
        os.kill(int(broker.pid_file.read_text()), signal.SIGHUP)
        async with asyncio.timeout(3.0):
            while broker.log_file.read_bytes().count(b"Reloading config.") == reloads:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # another process's signal: its log is all we can watch
        assert await handshake_refused(broker.address, tls12(broker, unique_thing))
        sandbox_pki.write_crl([])


async def test_reload_sends_sighup_again_when_mosquitto_lost_it(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_thing: ClientCertificate
) -> None:
    # mosquitto clears its reload flag when a reload ends, so a SIGHUP landing during another
    # process's reload is lost. Stand-in for that race: the broker's first SIGHUP goes nowhere.
    async with IotBroker(tmp_path, pki=sandbox_pki) as broker:
        child = broker._child
        assert child is not None
        real_send_signal = child.send_signal
        dropped: list[int] = []

        def lose_the_first_sighup(signum: int) -> None:
            if signum == signal.SIGHUP and not dropped:
                dropped.append(signum)
                return
            real_send_signal(signum)

        child.send_signal = lose_the_first_sighup  # type: ignore[method-assign]
        reloads = broker.log_file.read_bytes().count(b"Reloading config.")
        await broker.reload_crl([unique_thing.serial])
        assert dropped == [signal.SIGHUP]
        assert broker.log_file.read_bytes().count(b"Reloading config.") > reloads
        assert await handshake_refused(broker.address, tls12(broker, unique_thing))
        sandbox_pki.write_crl([])


async def test_fidelity_layer_signals_until_the_reload_shows_in_the_log(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_thing: ClientCertificate
) -> None:
    # The moto fidelity layer's watcher, given a signal that was lost (none sent at all here):
    # it signals on its own until a reload past the offset is in the log.
    async with IotBroker(tmp_path, pki=sandbox_pki) as broker:
        assert broker.pid is not None
        sandbox_pki.write_crl([unique_thing.serial])
        offset = log_size(broker.log_file)
        assert not log_shows_reload(broker.log_file, offset)
        await asyncio.to_thread(_confirm_reload, broker.pid, broker.log_file, offset)
        assert log_shows_reload(broker.log_file, offset)
        assert await handshake_refused(broker.address, tls12(broker, unique_thing))
        sandbox_pki.write_crl([])


async def test_restart_keeps_the_port_and_clients_reconnect(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_thing: ClientCertificate
) -> None:
    thing = unique_thing.common_name
    async with IotBroker(tmp_path, pki=sandbox_pki) as broker:
        address, first_pid = broker.address, broker.pid
        assert first_pid is not None
        async with thing_client(broker, unique_thing) as client:
            await broker.restart()
            with pytest.raises(aiomqtt.MqttError):
                await client.publish(f"dt/{thing}/lost", b"x", qos=1, timeout=2)
        assert broker.address == address
        assert broker.pid not in (None, first_pid)
        assert process_gone(first_pid)
        async with (
            observer_client(broker) as observer,
            thing_client(broker, unique_thing) as client,
        ):
            await observer.subscribe(f"dt/{thing}/#", qos=1)
            await client.publish(f"dt/{thing}/back", b"after restart", qos=1)
            assert (await next_message(observer)).payload == b"after restart"


async def test_stop_leaves_no_process_and_no_pid_file(
    tmp_path: Path, sandbox_pki: SandboxPki
) -> None:
    broker = DeviceBroker(tmp_path, pki=sandbox_pki)
    await broker.start()
    pid = broker.pid
    assert pid is not None
    running = [broker.running]
    await broker.stop()
    running.append(broker.running)
    assert running == [True, False]
    assert process_gone(pid)
    assert broker.pid is None
    assert not broker.pid_file.exists()
    await broker.stop()  # idempotent


async def test_error_inside_the_context_still_stops_the_broker(
    tmp_path: Path, sandbox_pki: SandboxPki
) -> None:
    pids: list[int | None] = []

    async def fail_inside(broker: IotBroker) -> None:
        async with broker:
            pids.append(broker.pid)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await fail_inside(IotBroker(tmp_path, pki=sandbox_pki))
    [pid] = pids
    assert pid is not None
    assert process_gone(pid)


async def test_cancelled_start_leaves_no_process(tmp_path: Path, sandbox_pki: SandboxPki) -> None:
    broker = DeviceBroker(tmp_path, pki=sandbox_pki)
    task = asyncio.create_task(broker.start())
    await asyncio.sleep(0)  # start() runs until its first wait: the child exists by then
    pid = broker.pid
    assert pid is not None
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert process_gone(pid)
    assert not broker.running


async def test_taken_fixed_port_fails_with_mosquittos_own_words(
    tmp_path: Path, sandbox_pki: SandboxPki
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = DeviceBroker(tmp_path, pki=sandbox_pki, port=port)
        with pytest.raises(BrokerStartError) as caught:
            await broker.start()
    assert caught.value.broker == "device-broker"
    assert "in use" in str(caught.value)
    assert "Address already in use" in caught.value.log_tail
    assert broker.admin_password not in str(caught.value)
    assert not broker.running


def test_address_and_arguments_are_validated(tmp_path: Path, sandbox_pki: SandboxPki) -> None:
    with pytest.raises(SandboxUsageError):
        BrokerAddress("127.0.0.1", 0, None)
    with pytest.raises(SandboxUsageError):
        DeviceBroker(tmp_path, pki=sandbox_pki, port=70000)
    with pytest.raises(SandboxUsageError):
        DeviceBroker(tmp_path / "with space", pki=sandbox_pki)
    with pytest.raises(SandboxUsageError):
        _ = DeviceBroker(tmp_path, pki=sandbox_pki).address  # no port before the first start
    with pytest.raises(SandboxUsageError):
        client_tls_context(BrokerAddress("127.0.0.1", 1883, None))


async def test_devices_added_before_start_can_connect_once_started(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_serial: str
) -> None:
    broker = DeviceBroker(tmp_path, pki=sandbox_pki)
    await broker.add_device(unique_serial, "early")  # no process yet: only the file is written
    async with broker:
        client = mqtt_client(broker.address, username=unique_serial, password="early")
        assert not await refused(client)


async def test_concurrent_additions_are_all_effective(
    device_broker: DeviceBroker, unique_serial: str
) -> None:
    serials = [f"{unique_serial}-{index}" for index in range(6)]
    await asyncio.gather(*(device_broker.add_device(serial, f"pw-{serial}") for serial in serials))
    for serial in serials:
        client = mqtt_client(device_broker.address, username=serial, password=f"pw-{serial}")
        assert not await refused(client)


async def test_log_events_carry_no_password(
    tmp_path: Path, sandbox_pki: SandboxPki, unique_serial: str
) -> None:
    with structlog.testing.capture_logs() as events:
        async with DeviceBroker(tmp_path, pki=sandbox_pki) as broker:
            await broker.add_device(unique_serial, "device-secret-1")
            await broker.restart()
            admin_password = broker.admin_password
    assert {event["event"] for event in events} >= {
        "broker.started",
        "broker.reloaded",
        "broker.devices_added",
        "broker.stopped",
    }
    rendered = repr(events)
    assert "device-secret-1" not in rendered
    assert admin_password not in rendered
