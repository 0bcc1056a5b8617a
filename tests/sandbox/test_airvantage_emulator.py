"""The AirVantage emulator against real peers: mosquitto, moto over HTTP, an aiohttp client.

The device is a plain aiomqtt client speaking DESIGN.md §3's shapes written out by hand here, so
the emulator's codecs are checked against the spec rather than against themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
import structlog.testing

from sandbox.airvantage import (
    AirVantageEmulator,
    ApplicationModel,
    Faults,
    OperationState,
)
from sandbox.brokers import DeviceBroker
from sandbox.pki import SandboxPki
from sandbox.world import SandboxThread
from shared import messages
from shared.errors import ConfigError, TransportError, UsageError
from tests.sandbox.airvantage_fixtures import (
    REGION,
    Broker,
    create_stream,
    read_stream,
    run_mosquitto,
)

CLIENT_ID = "ztp-cloud"
CLIENT_SECRET = "cloud-secret-1"
USER = ("ops@example.com", "user-password-1")
WAIT = 5.0
# paho leaves Nagle on: each QoS 1 exchange would stall ~44 ms on delayed ACKs.
NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


# --------------------------------------------------------------------------------------------
# Peers and helpers


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


@pytest.fixture
def moto_endpoint(sandbox: SandboxThread) -> str:
    """The session sandbox's moto server, reset for the test (each test makes its stream)."""
    return sandbox.description.aws_endpoint_url


@pytest.fixture
async def stream(moto_endpoint: str) -> str:
    name = f"av-{uuid.uuid4().hex[:12]}"
    await create_stream(moto_endpoint, name)
    return name


Factory = Callable[..., AirVantageEmulator]

#: Setting keys for the tests of settings operations. The shipped model declares none (the
#: daemons exchange data paths and one command only); these tests use a model of their own.
SETTING_KEYS = ("/ztp/ztp/endpoint", "/ztp/ztp/cert1")


def model_with_settings() -> ApplicationModel:
    """The shipped model plus :data:`SETTING_KEYS`, for tests of settings operations."""
    shipped = ApplicationModel.load()
    return ApplicationModel(
        app_type=shipped.app_type,
        variables=shipped.variables,
        settings=frozenset(SETTING_KEYS),
        commands=shipped.commands,
    )


@pytest.fixture
def make_emulator(broker: Broker, moto_endpoint: str, stream: str) -> Factory:
    """Build an emulator on the test's peers; keyword arguments override the defaults."""

    def factory(**overrides: Any) -> AirVantageEmulator:
        options: dict[str, Any] = {
            "broker_host": broker.host,
            "broker_port": broker.port,
            "admin_username": None,
            "admin_password": None,
            "aws_endpoint_url": moto_endpoint,
            "region": REGION,
            "stream_name": stream,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "model": ApplicationModel.load(),
            "users": {USER[0]: USER[1]},
            "redelivery_interval": None,
            "activity_gap": 0.2,
        }
        options.update(overrides)
        return AirVantageEmulator(**options)

    return factory


@pytest.fixture
async def emulator(make_emulator: Factory) -> AsyncIterator[AirVantageEmulator]:
    async with make_emulator() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def new_serial() -> str:
    return f"SN{uuid.uuid4().hex[:10].upper()}"


async def get_token(http: aiohttp.ClientSession, emulator: AirVantageEmulator) -> str:
    async with http.post(
        f"{emulator.api_url}/api/oauth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
        },
    ) as response:
        assert response.status == 200
        body = await response.json()
    token: str = body["access_token"]
    return token


async def api(
    http: aiohttp.ClientSession,
    emulator: AirVantageEmulator,
    method: str,
    path: str,
    token: str | None,
    *,
    body: Any = None,
    params: dict[str, str] | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(
        method, f"{emulator.api_url}{path}", json=body, params=params, headers=headers
    ) as response:
        return response.status, await response.json(), response.headers


@contextlib.asynccontextmanager
async def device(broker: Broker, serial: str) -> AsyncIterator[aiomqtt.Client]:
    """A gateway on the device broker, subscribed to its tasks as DESIGN.md §3 says."""
    async with aiomqtt.Client(
        broker.host, broker.port, identifier=serial, username=serial, socket_options=NODELAY
    ) as c:
        await c.subscribe(f"{serial}/tasks/json", qos=1)
        yield c


async def next_tasks(client: aiomqtt.Client) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT):
        message = await anext(aiter(client.messages))
    assert isinstance(message.payload, bytes)
    tasks: list[dict[str, Any]] = json.loads(message.payload)
    return tasks


async def ack(client: aiomqtt.Client, serial: str, acks: list[dict[str, Any]]) -> None:
    await client.publish(f"{serial}/acks/json", json.dumps(acks), qos=1)


async def command(
    http: aiohttp.ClientSession,
    emulator: AirVantageEmulator,
    token: str,
    uids: list[str],
    params: dict[str, Any] | None = None,
) -> str:
    status, body, _ = await api(
        http,
        emulator,
        "POST",
        "/api/v1/operations/systems/command",
        token,
        body={"systems": {"uids": uids}, "commandId": "ztp.deliver", "parameters": params or {}},
    )
    assert status == 200, body
    operation: str = body["operation"]
    return operation


def counters(body: dict[str, Any]) -> dict[str, int]:
    return {c["state"]: c["count"] for c in body["counters"]}


async def stream_envelopes(
    emulator: AirVantageEmulator, moto_endpoint: str, stream: str, count: int
) -> list[tuple[str, dict[str, Any]]]:
    await emulator.wait_until(lambda: len(emulator.records_put) >= count)
    return await read_stream(moto_endpoint, stream)


# --------------------------------------------------------------------------------------------
# Tokens


async def test_client_credentials_grant_in_form_and_basic_auth(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    url = f"{emulator.api_url}/api/oauth/token"
    basic_credentials = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    async with http.post(
        url,
        data={"grant_type": "client_credentials"},
        params={"company": "c0ffee"},
        headers={"Authorization": f"Basic {basic_credentials}"},
    ) as response:
        assert response.status == 200
        basic = await response.json()
    assert basic["token_type"] == "bearer"
    assert basic["expires_in"] == 86400
    form_token = await get_token(http, emulator)
    for token in (basic["access_token"], form_token):
        status, body, _ = await api(http, emulator, "GET", "/api/v1/systems", token)
        assert status == 200
        assert body["items"] == []


async def test_password_grant_and_bad_credentials(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    url = f"{emulator.api_url}/api/oauth/token"
    good = {
        "grant_type": "password",
        "username": USER[0],
        "password": USER[1],
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
    }
    async with http.post(url, data=good) as response:
        assert response.status == 200
        assert (await response.json())["access_token"]
    cases = [
        ({**good, "password": "wrong"}, 401, "invalid_grant"),
        ({**good, "username": "nobody"}, 401, "invalid_grant"),
        ({**good, "client_secret": "wrong"}, 401, "invalid_client"),
        ({**good, "grant_type": "client_credentials", "client_id": "other"}, 401, "invalid_client"),
        ({**good, "grant_type": "implicit"}, 400, "unsupported_grant_type"),
        ({k: v for k, v in good.items() if k != "grant_type"}, 400, "invalid_request"),
    ]
    for data, status, code in cases:
        async with http.post(url, data=data) as response:
            assert response.status == status, code
            body = await response.json()
        assert body["error"] == code
        assert isinstance(body["errorParameters"], list)
        # The refused secret never comes back.
        assert "wrong" not in json.dumps(body)


async def test_missing_or_unknown_token_is_401(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    for token in (None, "not-a-token"):
        status, body, headers = await api(http, emulator, "GET", "/api/v1/systems", token)
        assert status == 401
        assert body == {"error": "invalid_token", "errorParameters": []}
        assert "Bearer" in headers["WWW-Authenticate"]


async def test_token_expires_after_its_lifetime(
    make_emulator: Factory, http: aiohttp.ClientSession
) -> None:
    now = [1_000_000.0]
    async with make_emulator(token_lifetime=60, clock=lambda: now[0]) as emulator:
        token = await get_token(http, emulator)
        now[0] += 59
        assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 200
        now[0] += 1
        status, body, _ = await api(http, emulator, "GET", "/api/v1/systems", token)
        assert status == 401
        assert body["error"] == "invalid_token"


# --------------------------------------------------------------------------------------------
# Systems and operations


async def test_systems_lookup_by_serial(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    serial, other = new_serial(), new_serial()
    uid = await emulator.register_system(serial, "device-password")
    await emulator.register_system(other, "device-password")
    token = await get_token(http, emulator)
    params = {"gateway": f"serialNumber:{serial}", "fields": "uid"}
    status, body, _ = await api(http, emulator, "GET", "/api/v1/systems", token, params=params)
    assert status == 200
    assert body["items"] == [{"uid": uid}]
    params = {"gateway": "serialNumber:NOPE"}
    status, body, _ = await api(http, emulator, "GET", "/api/v1/systems", token, params=params)
    assert (status, body["items"]) == (200, [])
    status, body, _ = await api(
        http, emulator, "GET", "/api/v1/systems", token, params={"gateway": "imsi:1"}
    )
    assert status == 400
    assert body == {"error": "request.invalid", "errorParameters": ["gateway"]}


async def test_register_system_calls_back_and_validates(make_emulator: Factory) -> None:
    accounts: list[tuple[str, str]] = []

    async def on_register(serial: str, password: str) -> None:
        accounts.append((serial, password))

    async with make_emulator(on_register=on_register) as emulator:
        serial = new_serial()
        uid = await emulator.register_system(serial, "pw-1")
        assert accounts == [(serial, "pw-1")]
        assert emulator.system_uid(serial) == uid
        with pytest.raises(UsageError, match="already registered"):
            await emulator.register_system(serial, "pw-2")
        for bad_serial in ("", "a/b", "a+b", "a#", "x" * 65):
            with pytest.raises(UsageError):
                await emulator.register_system(bad_serial, "pw")
        with pytest.raises(UsageError):
            await emulator.register_system(new_serial(), "p" * 256)
        assert len(accounts) == 1


async def test_command_round_trip_success(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    async with device(broker, serial) as gateway:
        before = int(time.time() * 1000)
        params = {"f01": "ztp1:abc", "f02": "ztp1:def"}
        operation = await command(http, emulator, token, [uid], params)
        [task] = await next_tasks(gateway)
        assert set(task) == {"uid", "timestamp", "command"}
        assert task["command"] == {"id": "ztp.deliver", "params": params}
        assert isinstance(task["timestamp"], int)
        assert task["timestamp"] >= before - 1000
        path = f"/api/v1/operations/{operation}"
        status, body, _ = await api(http, emulator, "GET", path, token)
        assert status == 200
        assert body["state"] == "IN_PROGRESS"
        assert counters(body)["IN_PROGRESS"] == 1
        assert counters(body)["SUCCESS"] == 0
        await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
        await emulator.wait_until(
            lambda: emulator.operation(operation).state is OperationState.FINISHED
        )
    status, body, _ = await api(http, emulator, "GET", path, token)
    assert body["state"] == "FINISHED"
    assert counters(body) == {"PENDING": 0, "IN_PROGRESS": 0, "SUCCESS": 1, "FAILURE": 0}
    async with http.get(f"{emulator.api_url}/_emulator/operations") as response:
        assert [op["uid"] for op in (await response.json())["items"]] == [operation]
    assert [(a.serial, a.uid, a.status) for a in emulator.acks_seen] == [
        (serial, task["uid"], "OK")
    ]


async def test_error_ack_counts_as_failure_and_first_ack_wins(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    async with device(broker, serial) as gateway:
        operation = await command(http, emulator, token, [uid])
        [task] = await next_tasks(gateway)
        await ack(gateway, serial, [{"uid": task["uid"], "status": "ERROR", "message": "bad"}])
        await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
        await emulator.wait_until(lambda: len(emulator.acks_seen) == 2)
    status, body, _ = await api(http, emulator, "GET", f"/api/v1/operations/{operation}", token)
    assert (status, body["state"]) == (200, "FINISHED")
    assert counters(body)["FAILURE"] == 1
    assert counters(body)["SUCCESS"] == 0


async def test_operation_errors_in_airvantage_shape(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    uid = await emulator.register_system(new_serial(), "device-password")
    token = await get_token(http, emulator)
    cases = [
        ({"systems": {"uids": [uid]}, "commandId": "ztp.reboot"}, "command.unknown", "ztp.reboot"),
        ({"systems": {"uids": ["f" * 32]}, "commandId": "ztp.deliver"}, "system.not.found", None),
        ({"systems": {}, "commandId": "ztp.deliver"}, "request.invalid", "systems.uids"),
        ({"systems": {"uids": [uid]}, "commandId": "ztp.deliver", "parameters": {"f01": [1]}},
         "request.invalid", "parameters"),
    ]  # fmt: skip
    for body, code, parameter in cases:
        status, answer, _ = await api(
            http, emulator, "POST", "/api/v1/operations/systems/command", token, body=body
        )
        assert status == 400
        assert answer["error"] == code
        assert answer["errorParameters"] == [parameter or "f" * 32]
    status, answer, _ = await api(http, emulator, "GET", "/api/v1/operations/nope", token)
    assert (status, answer) == (404, {"error": "operation.not.found", "errorParameters": ["nope"]})
    status, answer, _ = await api(http, emulator, "GET", "/api/v1/nothing", token)
    assert (status, answer) == (404, {"error": "not.found", "errorParameters": ["/api/v1/nothing"]})
    status, answer, _ = await api(http, emulator, "DELETE", "/api/v1/systems", token)
    assert (status, answer["error"]) == (405, "method.not.allowed")
    assert emulator.operations() == []


async def test_command_parameters_checked_when_the_model_declares_them(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    # The shipped model declares ztp.deliver's parameters f01..f99 and nothing else.
    uid = await emulator.register_system(new_serial(), "device-password")
    token = await get_token(http, emulator)
    for parameters, unknown in (
        ({"f01": "a", "x": "1"}, ["x"]),
        ({"f00": "a", "f100": "b", "f99": "c"}, ["f00", "f100"]),
        ({"fragment": "a"}, ["fragment"]),
    ):
        body = {"systems": {"uids": [uid]}, "commandId": "ztp.deliver", "parameters": parameters}
        status, answer, _ = await api(
            http, emulator, "POST", "/api/v1/operations/systems/command", token, body=body
        )
        assert (status, answer["error"], answer["errorParameters"]) == (
            400,
            "command.parameter.unknown",
            unknown,
        )
    assert emulator.operations() == []


async def test_settings_operation_becomes_a_settings_task(
    make_emulator: Factory, http: aiohttp.ClientSession, broker: Broker
) -> None:
    async with make_emulator(model=model_with_settings()) as emulator:
        await settings_round_trip(emulator, http, broker)


async def settings_round_trip(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    settings = [{"key": "/ztp/ztp/endpoint", "value": "a1.iot.example"}]
    async with device(broker, serial) as gateway:
        status, body, _ = await api(
            http,
            emulator,
            "POST",
            "/api/v1/operations/systems/settings",
            token,
            body={"systems": {"uids": [uid]}, "settings": settings, "reboot": False},
        )
        assert status == 200
        [task] = await next_tasks(gateway)
        assert set(task) == {"uid", "timestamp", "settings"}
        assert task["settings"] == settings
        await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
        await emulator.wait_until(
            lambda: emulator.operation(body["operation"]).counters["SUCCESS"] == 1
        )
    status, answer, _ = await api(
        http,
        emulator,
        "POST",
        "/api/v1/operations/systems/settings",
        token,
        body={"systems": {"uids": [uid]}, "settings": [{"key": "/ztp/ztp/cert9", "value": "x"}]},
    )
    assert (status, answer["error"], answer["errorParameters"]) == (
        400,
        "setting.unknown",
        ["/ztp/ztp/cert9"],
    )


async def test_shipped_model_refuses_every_settings_operation(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    uid = await emulator.register_system(new_serial(), "device-password")
    token = await get_token(http, emulator)
    for key in (*SETTING_KEYS, "/ztp/ztp/cert6"):
        status, answer, _ = await api(
            http,
            emulator,
            "POST",
            "/api/v1/operations/systems/settings",
            token,
            body={"systems": {"uids": [uid]}, "settings": [{"key": key, "value": "x"}]},
        )
        assert (status, answer["error"], answer["errorParameters"]) == (
            400,
            "setting.unknown",
            [key],
        )
    assert emulator.operations() == []


# --------------------------------------------------------------------------------------------
# Redelivery


async def test_pending_task_redelivered_when_device_comes_back(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    async with device(broker, serial) as gateway:
        await gateway.publish(f"{serial}/messages/json", json.dumps({"ztp.status": "up"}), qos=1)
        await emulator.wait_until(lambda: len(emulator.records_put) == 1)
        operation = await command(http, emulator, token, [uid])
        [first] = await next_tasks(gateway)
    # Gone without acking; back after a gap, re-subscribed, and it speaks first.
    await asyncio.sleep(0.3)
    async with device(broker, serial) as gateway:
        await gateway.publish(f"{serial}/messages/json", json.dumps({"ztp.status": "up"}), qos=1)
        [again] = await next_tasks(gateway)
        assert again == first
        await ack(gateway, serial, [{"uid": again["uid"], "status": "OK"}])
        await emulator.wait_until(
            lambda: emulator.operation(operation).state is OperationState.FINISHED
        )
    assert [p.task_uid for p in emulator.tasks_published] == [first["uid"]] * 2


async def test_unacked_task_redelivered_on_timer_until_acked(
    make_emulator: Factory, http: aiohttp.ClientSession, broker: Broker
) -> None:
    async with make_emulator(redelivery_interval=0.2) as emulator:
        serial = new_serial()
        uid = await emulator.register_system(serial, "device-password")
        token = await get_token(http, emulator)
        async with device(broker, serial) as gateway:
            operation = await command(http, emulator, token, [uid])
            first = await next_tasks(gateway)
            second = await next_tasks(gateway)
            assert first == second
            await ack(gateway, serial, [{"uid": first[0]["uid"], "status": "OK"}])
            await emulator.wait_until(
                lambda: emulator.operation(operation).state is OperationState.FINISHED
            )
            sent = len(emulator.tasks_published)
            await asyncio.sleep(0.5)
            assert len(emulator.tasks_published) == sent


# --------------------------------------------------------------------------------------------
# Kinesis connector


async def test_each_data_shape_reaches_kinesis_nested_undeclared_dropped(
    emulator: AirVantageEmulator, broker: Broker, moto_endpoint: str, stream: str
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    shapes = [
        {"ztp.request": "CSR-A", "other.path": "dropped"},
        {"1349907137000": {"ztp.request": "CSR-B", "ztp.csr": "the PoC's path: dropped"}},
        [{"ztp.request": [{"timestamp": 1416324560869, "value": "CSR-C"}]}],
        {"undeclared.only": "nothing left", "ztp.request_id": "r-1", "ztp.error": "e"},
    ]
    before = int(time.time() * 1000)
    async with device(broker, serial) as gateway:
        for shape in shapes:
            await gateway.publish(f"{serial}/messages/json", json.dumps(shape), qos=1)
        records = await stream_envelopes(emulator, moto_endpoint, stream, 3)
    assert [key for key, _ in records] == [uid] * 3
    for _, envelope in records:
        assert envelope["name"] == "event.system.incoming.communication"
        assert envelope["date"] >= before - 1000
        content = envelope["content"]
        assert content["system.id"] == uid
        assert content["communication.id"] == serial
        assert len(content["message.id"]) == 32
    data = [
        {k: v for k, v in envelope["content"].items() if k[0].isdigit()} for _, envelope in records
    ]
    [stamped] = data[0]
    assert int(stamped) >= before - 1000
    assert data[0][stamped] == {"ztp.request": "CSR-A"}
    assert data[1] == {"1349907137000": {"ztp.request": "CSR-B"}}
    assert data[2] == {"1416324560869": {"ztp.request": "CSR-C"}}
    assert len({envelope["content"]["message.id"] for _, envelope in records}) == 3


async def test_flat_envelopes_and_unknown_senders(
    make_emulator: Factory, broker: Broker, moto_endpoint: str, stream: str
) -> None:
    async with make_emulator(envelope_style="flat") as emulator:
        serial = new_serial()
        uid = await emulator.register_system(serial, "device-password")
        async with device(broker, serial) as gateway:
            stranger = new_serial()
            await gateway.publish(f"{stranger}/messages/json", '{"ztp.request": "x"}', qos=1)
            await gateway.publish(f"{serial}/messages/json", b"{not json", qos=1)
            await gateway.publish(f"{serial}/acks/json", '{"uid": "x"}', qos=1)
            series = [
                {
                    "ztp.request": [
                        {"timestamp": 2, "value": "late"},
                        {"timestamp": 1, "value": "early"},
                    ],
                    "ztp.status": [{"timestamp": 1, "value": "requested"}],
                }
            ]
            await gateway.publish(f"{serial}/messages/json", json.dumps(series), qos=1)
            records = await stream_envelopes(emulator, moto_endpoint, stream, 2)
        contents = [
            {k: v for k, v in envelope["content"].items() if "." in k and not k[0].isdigit()}
            for _, envelope in records
        ]
        assert [c["ztp.request"] for c in contents] == ["early", "late"]
        assert contents[0]["ztp.status"] == "requested"
        assert all(key == uid for key, _ in records)
        reasons = dict(emulator.rejected)
        assert reasons[f"{stranger}/messages/json"] == "unknown system"
        assert "JSON" in reasons[f"{serial}/messages/json"]
        assert "a list" in reasons[f"{serial}/acks/json"]


async def test_operation_state_changes_reach_kinesis_when_enabled(
    make_emulator: Factory,
    http: aiohttp.ClientSession,
    broker: Broker,
    moto_endpoint: str,
    stream: str,
) -> None:
    async with make_emulator(operation_events=True) as emulator:
        serial = new_serial()
        uid = await emulator.register_system(serial, "device-password")
        token = await get_token(http, emulator)
        async with device(broker, serial) as gateway:
            operation = await command(http, emulator, token, [uid])
            [task] = await next_tasks(gateway)
            await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
            records = await stream_envelopes(emulator, moto_endpoint, stream, 2)
    assert [(key, envelope["name"]) for key, envelope in records] == [
        (operation, "event.operation.state.change")
    ] * 2
    assert [r["content"]["operation.state.new"] for _, r in records] == [
        "IN_PROGRESS",
        "FINISHED",
    ]
    assert {"state": "SUCCESS", "count": 1} in records[1][1]["content"]["operation.counters"]


# --------------------------------------------------------------------------------------------
# Fault knobs


async def test_rate_limit_and_server_error_faults(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    token = await get_token(http, emulator)
    emulator.faults.update({"rate_limit_next": 2, "retry_after": 7})
    for _ in range(2):
        status, body, headers = await api(http, emulator, "GET", "/api/v1/systems", token)
        assert (status, body["error"], headers["Retry-After"]) == (429, "too.many.requests", "7")
    assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 200
    async with http.post(
        f"{emulator.api_url}/_emulator/faults",
        json={"server_error_next": 1, "server_error_status": 502},
    ) as response:
        assert response.status == 200
        assert (await response.json())["server_error_next"] == 1
    status, body, _ = await api(http, emulator, "GET", "/api/v1/systems", token)
    assert (status, body["error"]) == (502, "service.unavailable")
    assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 200
    # The token route is behind the same faults.
    emulator.faults.update({"server_error_next": 1, "server_error_status": 500})
    async with http.post(f"{emulator.api_url}/api/oauth/token", data={}) as response:
        assert response.status == 500


async def test_latency_fault(emulator: AirVantageEmulator, http: aiohttp.ClientSession) -> None:
    token = await get_token(http, emulator)
    emulator.faults.latency = 0.3
    started = time.monotonic()
    assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 200
    assert time.monotonic() - started >= 0.3
    emulator.faults.latency = 0.0
    assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 200


async def test_expire_tokens_fault_through_control_route(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    token = await get_token(http, emulator)
    async with http.post(
        f"{emulator.api_url}/_emulator/faults", json={"expire_tokens": True}
    ) as response:
        assert response.status == 200
    assert (await api(http, emulator, "GET", "/api/v1/systems", token))[0] == 401
    fresh = await get_token(http, emulator)
    assert (await api(http, emulator, "GET", "/api/v1/systems", fresh))[0] == 200


async def test_control_route_refuses_bad_knobs(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession
) -> None:
    for change in ({"no_such_knob": 1}, {"rate_limit_next": -1}, {"server_error_status": 404}):
        async with http.post(f"{emulator.api_url}/_emulator/faults", json=change) as response:
            assert response.status == 400
            assert (await response.json())["error"] == "request.invalid"
    assert emulator.faults == Faults()
    async with http.get(f"{emulator.api_url}/_emulator/faults") as response:
        assert await response.json() == Faults().to_json()


async def test_duplicated_task_delivery(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    emulator.faults.duplicate_tasks = 1
    async with device(broker, serial) as gateway:
        await command(http, emulator, token, [uid])
        first = await next_tasks(gateway)
        second = await next_tasks(gateway)
        assert first == second
        await command(http, emulator, token, [uid])
        third = await next_tasks(gateway)
        assert third[0]["uid"] != first[0]["uid"]
    assert emulator.faults.duplicate_tasks == 0


async def test_reordered_task_delivery_across_operations(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    emulator.faults.reorder_tasks = 3
    async with device(broker, serial) as gateway:
        operations = [
            await command(http, emulator, token, [uid], {"f01": str(i)}) for i in range(2)
        ]
        # Held tasks are not yet delivered: the operations are still SCHEDULED.
        status, body, _ = await api(
            http, emulator, "GET", f"/api/v1/operations/{operations[0]}", token
        )
        assert (status, body["state"]) == (200, "SCHEDULED")
        assert counters(body)["PENDING"] == 1
        operations.append(await command(http, emulator, token, [uid], {"f01": "2"}))
        received = [(await next_tasks(gateway))[0]["command"]["params"]["f01"] for _ in range(3)]
    assert received == ["2", "1", "0"]


async def test_release_held_tasks(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serial = new_serial()
    uid = await emulator.register_system(serial, "device-password")
    token = await get_token(http, emulator)
    emulator.faults.reorder_tasks = 5
    async with device(broker, serial) as gateway:
        operations = [
            await command(http, emulator, token, [uid], {"f01": str(i)}) for i in range(2)
        ]
        assert {emulator.operation(o).state for o in operations} == {OperationState.SCHEDULED}
        async with http.post(
            f"{emulator.api_url}/_emulator/faults", json={"release_held_tasks": True}
        ) as response:
            assert (await response.json())["reorder_tasks"] == 0
        received = [(await next_tasks(gateway))[0]["command"]["params"]["f01"] for _ in range(2)]
    assert received == ["1", "0"]
    assert {emulator.operation(o).state for o in operations} == {OperationState.IN_PROGRESS}


async def test_duplicated_connector_records(
    emulator: AirVantageEmulator, broker: Broker, moto_endpoint: str, stream: str
) -> None:
    serial = new_serial()
    await emulator.register_system(serial, "device-password")
    emulator.faults.duplicate_records = 1
    async with device(broker, serial) as gateway:
        for csr in ("one", "two"):
            await gateway.publish(
                f"{serial}/messages/json", json.dumps({"ztp.request": csr}), qos=1
            )
        records = await stream_envelopes(emulator, moto_endpoint, stream, 3)
    assert records[0] == records[1]
    csrs = [
        next(v for k, v in r["content"].items() if k[0].isdigit())["ztp.request"]
        for _, r in records
    ]
    assert csrs == ["one", "one", "two"]


# --------------------------------------------------------------------------------------------
# Lifecycle


async def test_shutdown_cancels_named_tasks(make_emulator: Factory) -> None:
    emulator = make_emulator(redelivery_interval=1.0)
    async with emulator:
        names = {t.get_name() for t in asyncio.all_tasks()}
        assert {
            "airvantage-emulator.mqtt",
            "airvantage-emulator.connector",
            "airvantage-emulator.redelivery",
            "airvantage-emulator.mqtt-publish",
        } <= names
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert not any(name.startswith("airvantage-emulator") for name in names)
    with pytest.raises(UsageError):
        _ = emulator.api_url


async def test_unreachable_broker_fails_entry(make_emulator: Factory, tmp_path: Path) -> None:
    with socket_bound() as port:
        emulator = make_emulator(broker_port=port, connect_timeout=0.5)
        with pytest.raises(TransportError, match="not reachable"):
            async with emulator:
                pass


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    """A port that is bound but not listening: connections to it are refused."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# With the sandbox's own device broker: TLS, per-device passwords, the admin account


async def test_round_trip_through_the_sandbox_device_broker_over_tls(
    make_emulator: Factory,
    http: aiohttp.ClientSession,
    sandbox_pki: SandboxPki,
    tmp_path: Path,
) -> None:
    async with DeviceBroker(tmp_path, pki=sandbox_pki, tls=True) as device_broker:
        address = device_broker.address
        assert address.ca_file is not None
        async with make_emulator(
            broker_host=address.host,
            broker_port=address.port,
            broker_ca_file=address.ca_file,
            admin_username=device_broker.admin_username,
            admin_password=device_broker.admin_password,
            on_register=device_broker.add_device,
        ) as emulator:
            serial = new_serial()
            uid = await emulator.register_system(serial, "tls-device-password")
            assert serial in device_broker.devices
            token = await get_token(http, emulator)
            tls = ssl.create_default_context(cafile=str(address.ca_file))
            async with aiomqtt.Client(
                address.host,
                address.port,
                identifier=serial,
                username=serial,
                password="tls-device-password",
                tls_context=tls,
                socket_options=NODELAY,
            ) as gateway:
                await gateway.subscribe(f"{serial}/tasks/json", qos=1)
                operation = await command(http, emulator, token, [uid], {"f01": "f"})
                [task] = await next_tasks(gateway)
                await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
                await emulator.wait_until(
                    lambda: emulator.operation(operation).state is OperationState.FINISHED
                )
            assert emulator.operation(operation).counters["SUCCESS"] == 1


async def test_no_secret_reaches_a_log_event(
    make_emulator: Factory, http: aiohttp.ClientSession, broker: Broker
) -> None:
    device_password = "device-pw-" + uuid.uuid4().hex
    with structlog.testing.capture_logs() as events:
        async with make_emulator() as emulator:
            serial = new_serial()
            uid = await emulator.register_system(serial, device_password)
            token = await get_token(http, emulator)
            async with http.post(
                f"{emulator.api_url}/api/oauth/token",
                data={
                    "grant_type": "password",
                    "username": USER[0],
                    "password": USER[1] + "-wrong",
                    "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET,
                },
            ) as response:
                assert response.status == 401
            async with device(broker, serial) as gateway:
                await command(http, emulator, token, [uid])
                [task] = await next_tasks(gateway)
                await ack(gateway, serial, [{"uid": task["uid"], "status": "OK"}])
                await emulator.wait_until(lambda: len(emulator.acks_seen) == 1)
    text = json.dumps(events, default=str)
    assert "airvantage_emulator.token_issued" in text
    for secret in (device_password, token, CLIENT_SECRET, USER[1]):
        assert secret not in text


# --------------------------------------------------------------------------------------------
# Interoperability with the project's own codec (shared/airvantage.py): two independent
# implementations of DESIGN.md §3 must understand each other.


@pytest.mark.parametrize("style", ["nested", "flat"])
async def test_shared_codec_and_emulator_understand_each_other(
    *,
    make_emulator: Factory,
    http: aiohttp.ClientSession,
    broker: Broker,
    moto_endpoint: str,
    stream: str,
    style: str,
) -> None:
    from shared import airvantage as wire

    async with make_emulator(
        envelope_style=style, operation_events=True, model=model_with_settings()
    ) as emulator:
        serial = new_serial()
        uid = await emulator.register_system(serial, "device-password")
        token = await get_token(http, emulator)
        sent = [
            (wire.DataShape.PLAIN, [wire.DataPoint("ztp.request", "P")]),
            (wire.DataShape.TIMESTAMPED, [wire.DataPoint("ztp.request", "T", 1_700_000_000_000)]),
            (
                wire.DataShape.ARRAY,
                [
                    wire.DataPoint("ztp.request", "A", 1_700_000_000_001),
                    wire.DataPoint("ztp.status", "s-1", 1_700_000_000_001),
                    wire.DataPoint("not.declared", 1, 1_700_000_000_001),
                ],
            ),
        ]
        async with device(broker, serial) as gateway:
            for shape, points in sent:
                payload = wire.encode_device_message(points, shape=shape)
                await gateway.publish(wire.messages_topic(serial), payload, qos=1)
            await emulator.wait_until(lambda: len(emulator.records_put) == 3)
            params = {"f01": "f", "f02": "g"}
            operation = await command(http, emulator, token, [uid], params)
            [task] = wire.parse_tasks(await next_tasks_raw(gateway))
            assert isinstance(task, wire.CommandTask)
            assert (task.command_id, dict(task.params)) == ("ztp.deliver", params)
            await gateway.publish(
                wire.acks_topic(serial), wire.encode_acks([wire.Ack.ok(task.uid)]), qos=1
            )
            status, body, _ = await api(
                http,
                emulator,
                "POST",
                "/api/v1/operations/systems/settings",
                token,
                body={
                    "systems": {"uids": [uid]},
                    "settings": [{"key": "/ztp/ztp/cert1", "value": "c"}],
                },
            )
            assert status == 200
            [settings_task] = wire.parse_tasks(await next_tasks_raw(gateway))
            assert isinstance(settings_task, wire.OtherTask)
            assert settings_task.kinds == ("settings",)
            await gateway.publish(
                wire.acks_topic(serial),
                wire.encode_acks([wire.Ack.error(settings_task.uid, "settings unsupported")]),
                qos=1,
            )
            await emulator.wait_until(
                lambda: emulator.operation(body["operation"]).counters["FAILURE"] == 1
            )
            await emulator.wait_until(lambda: len(emulator.records_put) == 7)
        records = await read_stream(moto_endpoint, stream)
    events = [wire.parse_envelope(json.dumps(envelope)) for _, envelope in records]
    incoming = [e for e in events if isinstance(e, wire.IncomingCommunication)]
    changes = [e for e in events if isinstance(e, wire.OperationStateChange)]
    assert len(incoming) == 3
    assert {(e.system_uid, e.serial) for e in incoming} == {(uid, serial)}
    values = [{(p.path, p.value, p.timestamp_ms) for p in e.points} for e in incoming]
    if style == "flat":
        # Flat records carry no timestamps of their own.
        assert values[1] == {("ztp.request", "T", None)}
        assert values[2] == {("ztp.request", "A", None), ("ztp.status", "s-1", None)}
    else:
        assert values[1] == {("ztp.request", "T", 1_700_000_000_000)}
        assert values[2] == {
            ("ztp.request", "A", 1_700_000_000_001),
            ("ztp.status", "s-1", 1_700_000_000_001),
        }
    assert [(c.operation_uid, c.new_state) for c in changes if c.operation_uid == operation] == [
        (operation, "IN_PROGRESS"),
        (operation, "FINISHED"),
    ]
    assert changes[1].counters["SUCCESS"] == 1


async def next_tasks_raw(client: aiomqtt.Client) -> bytes:
    async with asyncio.timeout(WAIT):
        message = await anext(aiter(client.messages))
    assert isinstance(message.payload, bytes)
    return message.payload


async def test_emulator_reconnects_after_a_broker_restart_and_redelivers(
    make_emulator: Factory,
    http: aiohttp.ClientSession,
    sandbox_pki: SandboxPki,
    tmp_path: Path,
) -> None:
    async with DeviceBroker(tmp_path, pki=sandbox_pki) as device_broker:
        address = device_broker.address
        async with make_emulator(
            broker_host=address.host,
            broker_port=address.port,
            admin_username=device_broker.admin_username,
            admin_password=device_broker.admin_password,
            on_register=device_broker.add_device,
            redelivery_interval=0.3,
        ) as emulator:
            serial = new_serial()
            uid = await emulator.register_system(serial, "restart-password")
            token = await get_token(http, emulator)

            def gateway() -> aiomqtt.Client:
                return aiomqtt.Client(
                    address.host,
                    address.port,
                    identifier=serial,
                    username=serial,
                    password="restart-password",
                    socket_options=NODELAY,
                )

            async with gateway() as client:
                await client.subscribe(f"{serial}/tasks/json", qos=1)
                operation = await command(http, emulator, token, [uid])
                [first] = await next_tasks(client)
                await device_broker.restart()
            async with gateway() as client:
                await client.subscribe(f"{serial}/tasks/json", qos=1)
                [again] = await next_tasks(client)
                assert again["uid"] == first["uid"]
                await ack(client, serial, [{"uid": again["uid"], "status": "OK"}])
                await emulator.wait_until(
                    lambda: emulator.operation(operation).state is OperationState.FINISHED
                )


async def test_reordered_task_delivery_within_one_operation(
    emulator: AirVantageEmulator, http: aiohttp.ClientSession, broker: Broker
) -> None:
    serials = [new_serial() for _ in range(3)]
    uids = [await emulator.register_system(serial, "device-password") for serial in serials]
    token = await get_token(http, emulator)
    emulator.faults.reorder_tasks = 3
    async with aiomqtt.Client(broker.host, broker.port, socket_options=NODELAY) as observer:
        for serial in serials:
            await observer.subscribe(f"{serial}/tasks/json", qos=1)
        operation = await command(http, emulator, token, uids)
        topics = []
        async with asyncio.timeout(WAIT):
            async for message in observer.messages:
                topics.append(message.topic.value.split("/")[0])
                if len(topics) == 3:
                    break
    assert topics == serials[::-1]
    assert emulator.operation(operation).counters["IN_PROGRESS"] == 3


# --------------------------------------------------------------------------------------------
# The application model and the knobs, without peers


def test_shipped_model_declares_exactly_what_the_daemons_exchange() -> None:
    model = ApplicationModel.load()
    assert model.variables == {messages.REQUEST_PATH, messages.STATUS_PATH}
    assert model.settings == frozenset()
    assert set(model.commands) == {messages.DELIVER_COMMAND, messages.RENEW_COMMAND}
    count = messages.MAX_DELIVERY_FRAGMENTS
    assert model.commands[messages.DELIVER_COMMAND].parameters == {
        f"f{i:02d}" for i in range(1, count + 1)
    }
    assert model.commands[messages.RENEW_COMMAND].parameters == frozenset()
    assert model.app_type == "io.ztp.gateway"


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"type": ""},
        {"type": "t", "variables": [{"no_path": 1}]},
        {"type": "t", "variables": [{"path": "nodot"}]},
        {"type": "t", "commands": [{"id": "nodot"}]},
        {"type": "t", "commands": ["ztp.deliver"]},
    ],
)
def test_malformed_models_are_refused(document: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        ApplicationModel.from_json(document)


def test_model_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ApplicationModel.load(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError):
        ApplicationModel.load(tmp_path / "list.json")


def test_faults_validate_and_update_all_or_nothing() -> None:
    faults = Faults()
    faults.update({"latency": 0.25, "rate_limit_next": 2})
    assert (faults.latency, faults.rate_limit_next) == (0.25, 2)
    for bad in ({"rate_limit_next": 1.5}, {"duplicate_tasks": True}, {"latency": -1}):
        with pytest.raises(UsageError):
            faults.update({"retry_after": 9, **bad})
        assert faults.retry_after == 1
