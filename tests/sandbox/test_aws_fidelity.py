"""The moto sandbox behaves as AWS documents, where the project depends on it.

Each test asserts AWS's documented behaviour against the patched moto server, through
aiobotocore, so a moto upgrade that breaks a correction fails here loudly. One server serves the
module; the ``aws`` fixture resets it before each test.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import os
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sandbox.aws import MotoSandbox
from sandbox.brokers import ClientCertificate, IotBroker, client_tls_context
from sandbox.moto_fidelity import (
    MOTO_VERSION,
    FidelityConfig,
    RateWindow,
    SandboxState,
    check_moto_version,
)
from sandbox.pki import SandboxPki
from shared.errors import ConfigError, TransportError
from tests.sandbox import aws_fixtures
from tests.sandbox.aws_fixtures import IOT_ENDPOINT_HOST, HangupCounter
from tests.sandbox.conftest import handshake_refused

# The fixtures of aws_fixtures, bound here so pytest finds them (until a conftest provides them).
aws_pki = aws_fixtures.aws_pki
aws_broker_pid_file = aws_fixtures.aws_broker_pid_file
moto_sandbox = aws_fixtures.moto_sandbox
aws = aws_fixtures.aws
kinesis = aws_fixtures.kinesis
iot = aws_fixtures.iot
dynamodb = aws_fixtures.dynamodb
hangup_counter = aws_fixtures.hangup_counter

# Async tests share the module's event loop with the module-scoped server fixture.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

ACCOUNT = "123456789012"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def error_code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def make_csr(
    common_name: str = "SN0001", *, key: Any = None
) -> tuple[str, x509.CertificateSigningRequest]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztp test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode(), csr


def revoked_serials(pki: SandboxPki) -> set[int]:
    crl = x509.load_pem_x509_crl(pki.crl_file.read_bytes())
    assert crl.is_signature_valid(pki.ca_cert.public_key())  # type: ignore[arg-type]
    return {entry.serial_number for entry in crl}


async def create_certificate(iot: Any, *, active: bool = True) -> tuple[str, x509.Certificate]:
    pem, _ = make_csr()
    created = await iot.create_certificate_from_csr(
        certificateSigningRequest=pem, setAsActive=active
    )
    cert = x509.load_pem_x509_certificate(created["certificatePem"].encode())
    return created["certificateId"], cert


async def cert_status(iot: Any, certificate_id: str) -> str:
    described = await iot.describe_certificate(certificateId=certificate_id)
    return str(described["certificateDescription"]["status"])


# --------------------------------------------------------------------------------------------
# The pin and the pure pieces.


def test_moto_is_the_pinned_version() -> None:
    import moto

    assert moto.__version__ == MOTO_VERSION
    check_moto_version()


def test_rate_window_admits_within_both_budgets_and_slides() -> None:
    window = RateWindow()
    assert window.admit(0.0, count=3, size=10, max_count=5, max_size=100)
    assert window.admit(0.5, count=2, size=10, max_count=5, max_size=100)
    assert not window.admit(0.9, count=1, size=0, max_count=5, max_size=100)
    assert window.admit(1.01, count=3, size=0, max_count=5, max_size=100)  # the t=0 event left
    # 10 bytes remain in the window (from t=0.5): 91 more break the size budget, 90 do not.
    assert not window.admit(1.2, count=0, size=91, max_count=5, max_size=100)
    assert window.admit(1.2, count=0, size=90, max_count=5, max_size=100)


@pytest.mark.parametrize(
    "changes",
    [
        {"no_such_knob": 1},
        {"iot_tps": 0},
        {"iot_tps_per_api": {"CreateThing": -1}},
        {"get_records_per_second": 0},
        {"iterator_lifetime": -1},
        {"kinesis_throttling": "yes"},
    ],
)
def test_fidelity_config_rejects_bad_knobs(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        FidelityConfig().updated(changes)


def test_fidelity_config_round_trips_through_json() -> None:
    config = FidelityConfig(iot_throttling=True, iot_tps_per_api={"CreateThing": 2.0})
    assert FidelityConfig().updated(config.to_json()) == config
    assert config.tps_for("CreateThing") == 2.0
    assert config.tps_for("AttachPolicy") == 15.0


def test_state_writes_crl_only_for_its_own_issuer(tmp_path: Any) -> None:
    pki = SandboxPki.load_or_create(tmp_path / "pki")
    other = SandboxPki.load_or_create(tmp_path / "other")
    state = SandboxState(pki=pki)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    ours = pki.sign(key.public_key(), name)
    theirs = other.sign(key.public_key(), name)
    pem = serialization.Encoding.PEM
    state.set_refused("arn:ours", ours.public_bytes(pem).decode(), refused=True)
    state.set_refused("arn:theirs", theirs.public_bytes(pem).decode(), refused=True)
    assert revoked_serials(pki) == {ours.serial_number}
    state.set_refused("arn:ours", ours.public_bytes(pem).decode(), refused=False)
    assert revoked_serials(pki) == set()


# --------------------------------------------------------------------------------------------
# Process life cycle and control.


@on_module_loop
async def test_control_endpoint_switches_knobs_until_reset(aws: MotoSandbox) -> None:
    changed = await aws.configure(kinesis_throttling=True, iterator_lifetime=2.5)
    assert changed.kinesis_throttling
    assert changed.iterator_lifetime == 2.5
    assert await aws.config() == changed
    with pytest.raises(ConfigError) as error:
        await aws.configure(no_such_knob=True)
    assert error.value.key == "no_such_knob"
    assert await aws.config() == changed  # a refused change changes nothing
    await aws.reset()
    assert await aws.config() == FidelityConfig()


@on_module_loop
async def test_start_failure_is_bounded_and_leaves_no_process(
    tmp_path: Any, aws_pki: SandboxPki
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sandbox = MotoSandbox(tmp_path, pki=aws_pki, port=taken.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(TransportError):
            await sandbox.start()
    assert time.monotonic() - started < 20
    assert sandbox.pid is None
    await sandbox.stop()  # stopping a stopped sandbox is harmless


@on_module_loop
async def test_stop_ends_the_child_process(tmp_path: Any, aws_pki: SandboxPki) -> None:
    async with MotoSandbox(tmp_path, pki=aws_pki) as sandbox:
        pid = sandbox.pid
        assert pid is not None
        os.kill(pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaps counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


_ORPHANING_PARENT = """
import asyncio, sys
from pathlib import Path
from sandbox.aws import MotoSandbox
from sandbox.pki import SandboxPki

async def main():
    pki = SandboxPki.load_or_create(Path(sys.argv[1]) / "pki")
    sandbox = MotoSandbox(Path(sys.argv[1]), pki=pki)
    await sandbox.start()
    print("child-pid", sandbox.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@on_module_loop
async def test_server_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ORPHANING_PARENT, str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        cwd=PROJECT_ROOT,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        async with asyncio.timeout(30):
            line = b""
            while not line.startswith(b"child-pid "):  # structlog prints to stdout too
                line = await parent.stdout.readline()
        child = int(line.split()[1])
        assert not process_gone(child)
    finally:
        parent.kill()  # no cleanup runs: the child must notice on its own
        await parent.wait()
    for _ in range(50):
        if process_gone(child):
            break
        await asyncio.sleep(0.1)
    assert process_gone(child)


@on_module_loop
async def test_missing_operation_fails_fast_without_retries(aws: MotoSandbox) -> None:
    # moto answers 500 for what it lacks; with client_kwargs() botocore does not retry it.
    async with get_session().create_client("kinesis", **aws.client_kwargs()) as client:
        started = time.monotonic()
        with pytest.raises(ClientError) as error:
            await client.describe_account_settings()
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] >= 500
    assert error.value.response["ResponseMetadata"]["RetryAttempts"] == 0
    assert time.monotonic() - started < 10  # no hang; RetryAttempts above is the real check


# --------------------------------------------------------------------------------------------
# IoT.


@on_module_loop
@pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
async def test_certificate_from_csr_carries_csr_key_and_subject_signed_by_sandbox_ca(
    iot: Any, aws_pki: SandboxPki, key_type: str
) -> None:
    key: Any = (
        ec.generate_private_key(ec.SECP256R1())
        if key_type == "ec-p256"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    pem, csr = make_csr("SN-CSR-1", key=key)
    created = await iot.create_certificate_from_csr(certificateSigningRequest=pem, setAsActive=True)
    cert = x509.load_pem_x509_certificate(created["certificatePem"].encode())

    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert cert.public_key().public_bytes(der, fmt) == key.public_key().public_bytes(der, fmt)
    assert cert.subject == csr.subject
    assert cert.issuer == aws_pki.ca_cert.subject
    cert.verify_directly_issued_by(aws_pki.ca_cert)
    assert cert.not_valid_before_utc <= dt.datetime.now(dt.UTC) <= cert.not_valid_after_utc

    expected_id = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert created["certificateId"] == expected_id
    assert created["certificateArn"] == f"arn:aws:iot:us-east-1:{ACCOUNT}:cert/{expected_id}"
    described = (await iot.describe_certificate(certificateId=expected_id))[
        "certificateDescription"
    ]
    assert described["status"] == "ACTIVE"
    assert described["certificateArn"] == created["certificateArn"]
    assert described["certificatePem"] == created["certificatePem"]


@on_module_loop
async def test_every_call_mints_a_new_certificate_even_for_the_same_csr(iot: Any) -> None:
    pem, _ = make_csr()
    first = await iot.create_certificate_from_csr(certificateSigningRequest=pem, setAsActive=True)
    second = await iot.create_certificate_from_csr(certificateSigningRequest=pem, setAsActive=True)
    assert first["certificateId"] != second["certificateId"]
    listed = (await iot.list_certificates())["certificates"]
    assert {c["certificateId"] for c in listed} == {
        first["certificateId"],
        second["certificateId"],
    }


@on_module_loop
async def test_set_as_active_false_yields_an_inactive_refused_certificate(
    iot: Any, aws_pki: SandboxPki
) -> None:
    certificate_id, cert = await create_certificate(iot, active=False)
    assert await cert_status(iot, certificate_id) == "INACTIVE"
    assert cert.serial_number in revoked_serials(aws_pki)
    pem, _ = make_csr()
    # AWS's default for setAsActive is false.
    default = await iot.create_certificate_from_csr(certificateSigningRequest=pem)
    assert await cert_status(iot, default["certificateId"]) == "INACTIVE"


@on_module_loop
@pytest.mark.parametrize(
    "csr",
    [
        "not a csr",
        # A weak key on purpose: IoT must refuse it.
        make_csr(key=rsa.generate_private_key(public_exponent=65537, key_size=1024))[0],  # noqa: S505
        make_csr(key=ec.generate_private_key(ec.SECP256K1()))[0],
    ],
    ids=["garbage", "rsa-1024", "secp256k1"],
)
async def test_unacceptable_csr_is_refused(iot: Any, csr: str) -> None:
    with pytest.raises(ClientError) as error:
        await iot.create_certificate_from_csr(certificateSigningRequest=csr, setAsActive=True)
    assert error_code(error) == "InvalidRequestException"
    assert (await iot.list_certificates())["certificates"] == []


@on_module_loop
async def test_describe_endpoint_is_stable_and_names_the_sandbox_broker(iot: Any) -> None:
    first = await iot.describe_endpoint(endpointType="iot:Data-ATS")
    second = await iot.describe_endpoint(endpointType="iot:Data-ATS")
    assert first["endpointAddress"] == second["endpointAddress"] == IOT_ENDPOINT_HOST
    assert ":" not in first["endpointAddress"]  # an endpoint is a host, never host:port


@on_module_loop
@pytest.mark.parametrize("status", ["BOGUS", "active", "PENDING_TRANSFER", "PENDING_ACTIVATION"])
async def test_update_certificate_accepts_only_settable_aws_statuses(iot: Any, status: str) -> None:
    certificate_id, _ = await create_certificate(iot)
    with pytest.raises(ClientError) as error:
        await iot.update_certificate(certificateId=certificate_id, newStatus=status)
    assert error_code(error) == "InvalidRequestException"
    assert await cert_status(iot, certificate_id) == "ACTIVE"


@on_module_loop
async def test_revoked_is_terminal(iot: Any) -> None:
    certificate_id, _ = await create_certificate(iot)
    await iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
    await iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")  # idempotent
    for status in ("ACTIVE", "INACTIVE"):
        with pytest.raises(ClientError) as error:
            await iot.update_certificate(certificateId=certificate_id, newStatus=status)
        assert error_code(error) == "CertificateStateException"
        assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 406
    assert await cert_status(iot, certificate_id) == "REVOKED"


@on_module_loop
async def test_crl_follows_certificate_statuses_and_the_broker_is_signalled(
    iot: Any, aws_pki: SandboxPki, hangup_counter: HangupCounter
) -> None:
    kept_id, kept = await create_certificate(iot)
    certificate_id, cert = await create_certificate(iot)
    assert revoked_serials(aws_pki) == set()

    await iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
    await hangup_counter.wait_for(1)
    assert revoked_serials(aws_pki) == {cert.serial_number}

    await iot.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")
    await hangup_counter.wait_for(2)
    assert revoked_serials(aws_pki) == set()

    await iot.update_certificate(certificateId=certificate_id, newStatus="REVOKED")
    await hangup_counter.wait_for(3)
    assert revoked_serials(aws_pki) == {cert.serial_number}

    # A deleted certificate is unknown to IoT: it stays refused.
    await iot.delete_certificate(certificateId=certificate_id)
    assert revoked_serials(aws_pki) == {cert.serial_number}
    assert await cert_status(iot, kept_id) == "ACTIVE"
    assert kept.serial_number not in revoked_serials(aws_pki)


async def eventually(condition: Callable[[], Awaitable[bool]]) -> bool:
    """Poll ``condition`` for up to 5 s: mosquitto reloads its CRL a moment after SIGHUP."""
    for _ in range(50):
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return False


@on_module_loop
async def test_real_iot_broker_refuses_a_deactivated_certificate(
    tmp_path: Path, aws_pki: SandboxPki
) -> None:
    # A broker and a sandbox of their own: the module's sandbox signals a stand-in process.
    broker = IotBroker(tmp_path / "broker", pki=aws_pki)
    await broker.start()
    try:
        async with (
            MotoSandbox(tmp_path / "aws", pki=aws_pki, iot_broker_pid_file=broker.pid_file) as aws,
            get_session().create_client("iot", **aws.client_kwargs()) as iot,
        ):
            key = ec.generate_private_key(ec.SECP256R1())
            pem, _ = make_csr("thing-e2e", key=key)
            created = await iot.create_certificate_from_csr(
                certificateSigningRequest=pem, setAsActive=True
            )
            cert_file, key_file = tmp_path / "thing.pem", tmp_path / "thing.key"
            cert_file.write_text(created["certificatePem"])
            key_file.touch(mode=0o600)
            key_file.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            serial = x509.load_pem_x509_certificate(cert_file.read_bytes()).serial_number
            thing = ClientCertificate("thing-e2e", cert_file, key_file, serial)
            tls = client_tls_context(broker.address, thing, maximum_version=ssl.TLSVersion.TLSv1_2)
            certificate_id = created["certificateId"]

            assert not await handshake_refused(broker.address, tls)
            await iot.update_certificate(certificateId=certificate_id, newStatus="INACTIVE")
            assert await eventually(lambda: handshake_refused(broker.address, tls))
            await iot.update_certificate(certificateId=certificate_id, newStatus="ACTIVE")

            async def accepted() -> bool:
                return not await handshake_refused(broker.address, tls)

            assert await eventually(accepted)
    finally:
        await broker.stop()


@on_module_loop
async def test_iot_throttling_per_api(aws: MotoSandbox, iot: Any) -> None:
    await aws.configure(iot_throttling=True, iot_tps_per_api={"DescribeEndpoint": 3})
    for _ in range(3):
        await iot.describe_endpoint(endpointType="iot:Data-ATS")
    with pytest.raises(ClientError) as error:
        await iot.describe_endpoint(endpointType="iot:Data-ATS")
    assert error_code(error) == "ThrottlingException"
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    # Another API has its own budget (15 by default).
    await iot.create_thing(thingName="thing-1")
    await asyncio.sleep(1.05)
    await iot.describe_endpoint(endpointType="iot:Data-ATS")


@on_module_loop
async def test_iot_default_rate_is_fifteen_per_second(aws: MotoSandbox, iot: Any) -> None:
    await aws.configure(iot_throttling=True)
    outcomes = await asyncio.gather(
        *(iot.create_thing(thingName=f"thing-{n}") for n in range(20)), return_exceptions=True
    )
    throttled = [o for o in outcomes if isinstance(o, ClientError)]
    assert len(outcomes) - len(throttled) == 15
    assert {o.response["Error"]["Code"] for o in throttled} == {"ThrottlingException"}


async def describe_thing(iot: Any, name: str) -> dict[str, Any]:
    described = await iot.describe_thing(thingName=name)
    return {k: described.get(k) for k in ("thingId", "thingArn", "thingTypeName", "attributes")}


@on_module_loop
async def test_create_thing_again_with_the_same_configuration_answers_the_existing_thing(
    iot: Any,
) -> None:
    await iot.create_thing_type(thingTypeName="gateway")
    config = {"thingTypeName": "gateway", "attributePayload": {"attributes": {"serial": "SN1"}}}
    first = await iot.create_thing(thingName="thing-same", **config)
    certificate_id, _ = await create_certificate(iot)
    arn = (await iot.describe_certificate(certificateId=certificate_id))["certificateDescription"][
        "certificateArn"
    ]
    await iot.attach_thing_principal(thingName="thing-same", principal=arn)
    before = await describe_thing(iot, "thing-same")

    again = await iot.create_thing(thingName="thing-same", **config)
    assert (again["thingName"], again["thingArn"], again["thingId"]) == (
        first["thingName"],
        first["thingArn"],
        first["thingId"],
    )
    assert await describe_thing(iot, "thing-same") == before
    assert (await iot.list_thing_principals(thingName="thing-same"))["principals"] == [arn]

    # A thing made with no type and no attributes repeats the same way.
    bare = await iot.create_thing(thingName="thing-bare")
    assert (await iot.create_thing(thingName="thing-bare"))["thingId"] == bare["thingId"]
    repeated = await iot.create_thing(thingName="thing-bare", attributePayload={"attributes": {}})
    assert repeated["thingId"] == bare["thingId"]


@on_module_loop
@pytest.mark.parametrize(
    "config",
    [
        {"thingTypeName": "gateway", "attributePayload": {"attributes": {"serial": "SN2"}}},
        {"thingTypeName": "gateway", "attributePayload": {"attributes": {"owner": "x"}}},
        {
            "thingTypeName": "gateway",
            "attributePayload": {"attributes": {"serial": "SN1", "owner": "x"}},
        },
        {"thingTypeName": "gateway"},
        {"thingTypeName": "router", "attributePayload": {"attributes": {"serial": "SN1"}}},
        {"attributePayload": {"attributes": {"serial": "SN1"}}},
        {},
    ],
    ids=[
        "other-value",
        "other-name",
        "one-more",
        "no-attributes",
        "other-type",
        "no-type",
        "nothing",
    ],
)
async def test_create_thing_again_with_another_configuration_is_refused_and_changes_nothing(
    iot: Any, config: dict[str, Any]
) -> None:
    for type_name in ("gateway", "router"):
        await iot.create_thing_type(thingTypeName=type_name)
    created = await iot.create_thing(
        thingName="thing-taken",
        thingTypeName="gateway",
        attributePayload={"attributes": {"serial": "SN1"}},
    )
    before = await describe_thing(iot, "thing-taken")

    with pytest.raises(ClientError) as error:
        await iot.create_thing(thingName="thing-taken", **config)
    assert error_code(error) == "ResourceAlreadyExistsException"
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409
    assert error.value.response.get("resourceArn") == created["thingArn"]
    assert await describe_thing(iot, "thing-taken") == before


# --------------------------------------------------------------------------------------------
# Kinesis.
# --------------------------------------------------------------------------------------------
# Kinesis.


async def create_stream(kinesis: Any, name: str, shards: int) -> list[str]:
    await kinesis.create_stream(StreamName=name, ShardCount=shards)
    listed = await kinesis.list_shards(StreamName=name)
    return [shard["ShardId"] for shard in listed["Shards"]]


async def put(kinesis: Any, stream: str, tags: Sequence[str]) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for start in range(0, len(tags), 500):
        batch = tags[start : start + 500]
        answer = await kinesis.put_records(
            StreamName=stream, Records=[{"Data": t.encode(), "PartitionKey": t} for t in batch]
        )
        assert answer["FailedRecordCount"] == 0
        results += answer["Records"]
    return results


async def read_shard(
    kinesis: Any, stream: str, shard_id: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a shard from TRIM_HORIZON until it is dry (open) or ended (closed)."""
    iterator = (
        await kinesis.get_shard_iterator(
            StreamName=stream, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
        )
    )["ShardIterator"]
    records: list[dict[str, Any]] = []
    while True:
        answer = await kinesis.get_records(ShardIterator=iterator)
        records += answer["Records"]
        if "NextShardIterator" not in answer or not answer["Records"]:
            return records, answer
        iterator = answer["NextShardIterator"]


def hash_key(partition_key: str) -> int:
    return int(hashlib.md5(partition_key.encode()).hexdigest(), 16)  # noqa: S324 - Kinesis's hash


@on_module_loop
async def test_split_routes_new_records_to_children_and_parent_ends_with_child_shards(
    kinesis: Any,
) -> None:
    (parent,) = await create_stream(kinesis, "split", 1)
    before = [f"before-{n}" for n in range(100)]
    await put(kinesis, "split", before)
    await kinesis.split_shard(
        StreamName="split", ShardToSplit=parent, NewStartingHashKey=str(2**127)
    )
    after = [f"after-{n}" for n in range(200)]
    written = await put(kinesis, "split", after)

    shards = {s["ShardId"]: s for s in (await kinesis.list_shards(StreamName="split"))["Shards"]}
    children = sorted(set(shards) - {parent})
    assert len(children) == 2
    assert {shards[c]["ParentShardId"] for c in children} == {parent}
    assert "EndingSequenceNumber" in shards[parent]["SequenceNumberRange"]
    assert parent not in {w["ShardId"] for w in written}

    parent_records, last = await read_shard(kinesis, "split", parent)
    assert [r["Data"].decode() for r in parent_records] == before  # not moved, not copied
    assert "NextShardIterator" not in last
    assert sorted(c["ShardId"] for c in last["ChildShards"]) == children
    assert all(c["ParentShards"] == [parent] for c in last["ChildShards"])

    # Sequence numbers keep increasing across the reshard: children's come after the parent's.
    parent_last = max(int(r["SequenceNumber"]) for r in parent_records)
    assert min(int(w["SequenceNumber"]) for w in written) > parent_last

    seen: list[str] = []
    for child in children:
        low = int(shards[child]["HashKeyRange"]["StartingHashKey"])
        high = int(shards[child]["HashKeyRange"]["EndingHashKey"])
        records, answer = await read_shard(kinesis, "split", child)
        assert "NextShardIterator" in answer  # an open shard never ends
        assert all(low <= hash_key(r["PartitionKey"]) <= high for r in records)
        seen += [r["Data"].decode() for r in records]
    assert sorted(seen) == sorted(after)


@on_module_loop
async def test_merge_copies_nothing_and_both_parents_end_with_the_child(kinesis: Any) -> None:
    first, second = await create_stream(kinesis, "merge", 2)
    before = [f"before-{n}" for n in range(60)]
    await put(kinesis, "merge", before)
    await kinesis.merge_shards(StreamName="merge", ShardToMerge=first, AdjacentShardToMerge=second)
    listed = (await kinesis.list_shards(StreamName="merge"))["Shards"]
    (child,) = {s["ShardId"] for s in listed} - {first, second}
    after = [f"after-{n}" for n in range(50)]
    written = await put(kinesis, "merge", after)
    assert {w["ShardId"] for w in written} == {child}
    child_records, _ = await read_shard(kinesis, "merge", child)
    assert sorted(r["Data"].decode() for r in child_records) == sorted(after)  # nothing copied

    old: list[str] = []
    for parent in (first, second):
        records, last = await read_shard(kinesis, "merge", parent)
        old += [r["Data"].decode() for r in records]
        assert "NextShardIterator" not in last
        assert [c["ShardId"] for c in last["ChildShards"]] == [child]
        assert last["ChildShards"][0]["ParentShards"] == [first, second]
    assert sorted(old) == sorted(before)


@on_module_loop
async def test_update_shard_count_reshards_without_moving_records(kinesis: Any) -> None:
    await create_stream(kinesis, "scaled", 1)
    before = [f"before-{n}" for n in range(40)]
    await put(kinesis, "scaled", before)
    await kinesis.update_shard_count(
        StreamName="scaled", TargetShardCount=2, ScalingType="UNIFORM_SCALING"
    )
    shards = (await kinesis.list_shards(StreamName="scaled"))["Shards"]
    open_shards = {
        s["ShardId"] for s in shards if "EndingSequenceNumber" not in s["SequenceNumberRange"]
    }
    assert len(open_shards) == 2
    written = await put(kinesis, "scaled", [f"after-{n}" for n in range(40)])
    assert {w["ShardId"] for w in written} == open_shards
    records, last = await read_shard(kinesis, "scaled", "shardId-000000000000")
    assert [r["Data"].decode() for r in records] == before
    assert {c["ShardId"] for c in last["ChildShards"]} == open_shards


@pytest.mark.slow  # 40,000 records through moto's JSON both ways: about 6 s on two cores
@on_module_loop
async def test_concurrent_writers_lose_nothing_and_get_records_caps_at_10000(
    kinesis: Any,
) -> None:
    (shard,) = await create_stream(kinesis, "busy", 1)
    writers, per_writer = 8, 5000

    async def writer(n: int) -> list[dict[str, Any]]:
        return await put(kinesis, "busy", [f"w{n}-{i}" for i in range(per_writer)])

    written = [r for batch in await asyncio.gather(*map(writer, range(writers))) for r in batch]
    sequences = [w["SequenceNumber"] for w in written]
    assert len(set(sequences)) == writers * per_writer

    iterator = (
        await kinesis.get_shard_iterator(
            StreamName="busy", ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )
    )["ShardIterator"]
    first = await kinesis.get_records(ShardIterator=iterator)  # no Limit: at most 10,000
    assert len(first["Records"]) == 10_000
    limited = await kinesis.get_records(ShardIterator=first["NextShardIterator"], Limit=7)
    assert len(limited["Records"]) == 7
    data = {r["Data"] for r in first["Records"] + limited["Records"]}
    iterator = limited["NextShardIterator"]
    while True:
        answer = await kinesis.get_records(ShardIterator=iterator, Limit=10_000)
        if not answer["Records"]:
            break
        data |= {r["Data"] for r in answer["Records"]}
        iterator = answer["NextShardIterator"]
    assert len(data) == writers * per_writer
    with pytest.raises(ClientError) as error:
        await kinesis.get_records(ShardIterator=iterator, Limit=10_001)
    assert error_code(error) == "ValidationException"


@on_module_loop
async def test_get_records_returns_at_most_10_mib(kinesis: Any) -> None:
    (shard,) = await create_stream(kinesis, "large", 1)
    record = 700 * 1024  # under aiohttp's 1 MiB raw-body bound once base64-encoded
    for n in range(16):
        await kinesis.put_record(StreamName="large", Data=bytes([n]) * record, PartitionKey="k")
    iterator = (
        await kinesis.get_shard_iterator(
            StreamName="large", ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )
    )["ShardIterator"]
    first = await kinesis.get_records(ShardIterator=iterator)
    assert len(first["Records"]) == (10 * 1024 * 1024) // record  # 14 records fit, 15 do not
    rest = await kinesis.get_records(ShardIterator=first["NextShardIterator"])
    assert [r["Data"][0] for r in first["Records"] + rest["Records"]] == list(range(16))


@on_module_loop
async def test_get_records_throttles_past_five_calls_per_second_per_shard(
    aws: MotoSandbox, kinesis: Any
) -> None:
    first, second = await create_stream(kinesis, "reads", 2)
    await aws.configure(kinesis_throttling=True)
    iterators = {
        shard: (
            await kinesis.get_shard_iterator(
                StreamName="reads", ShardId=shard, ShardIteratorType="LATEST"
            )
        )["ShardIterator"]
        for shard in (first, second)
    }
    for _ in range(5):
        await kinesis.get_records(ShardIterator=iterators[first])
    with pytest.raises(ClientError) as error:
        await kinesis.get_records(ShardIterator=iterators[first])
    assert error_code(error) == "ProvisionedThroughputExceededException"
    assert error.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    await kinesis.get_records(ShardIterator=iterators[second])  # another shard, another budget


@on_module_loop
async def test_writes_throttle_past_1000_records_per_second_per_shard(
    aws: MotoSandbox, kinesis: Any
) -> None:
    await create_stream(kinesis, "writes", 1)
    await aws.configure(kinesis_throttling=True)
    await put(kinesis, "writes", [f"a{n}" for n in range(900)])
    answer = await kinesis.put_records(
        StreamName="writes",
        Records=[{"Data": b"x", "PartitionKey": f"b{n}"} for n in range(200)],
    )
    # PutRecords fails entries, not the call: the first 100 fit the budget, the rest do not.
    assert answer["FailedRecordCount"] == 100
    assert all("SequenceNumber" in r for r in answer["Records"][:100])
    assert {r.get("ErrorCode") for r in answer["Records"][100:]} == {
        "ProvisionedThroughputExceededException"
    }
    with pytest.raises(ClientError) as error:
        await kinesis.put_record(StreamName="writes", Data=b"x", PartitionKey="c")
    assert error_code(error) == "ProvisionedThroughputExceededException"


@on_module_loop
async def test_writes_throttle_past_one_mib_per_second_per_shard(
    aws: MotoSandbox, kinesis: Any
) -> None:
    await create_stream(kinesis, "bytes", 1)
    await aws.configure(kinesis_throttling=True)
    # Small bodies: aiohttp refuses raw bodies over 1 MiB on the event loop.
    for n in range(5):
        await kinesis.put_record(StreamName="bytes", Data=b"x" * 180_000, PartitionKey=f"p{n}")
    with pytest.raises(ClientError) as error:  # 6 x 180,000 bytes > 1 MiB
        await kinesis.put_record(StreamName="bytes", Data=b"x" * 180_000, PartitionKey="more")
    assert error_code(error) == "ProvisionedThroughputExceededException"


@on_module_loop
async def test_iterators_expire_after_their_lifetime(aws: MotoSandbox, kinesis: Any) -> None:
    (shard,) = await create_stream(kinesis, "expiry", 1)
    assert (await aws.config()).iterator_lifetime == 300.0  # AWS's five minutes by default
    await aws.configure(iterator_lifetime=0.5)
    iterator = (
        await kinesis.get_shard_iterator(
            StreamName="expiry", ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        )
    )["ShardIterator"]
    fresh = (await kinesis.get_records(ShardIterator=iterator))["NextShardIterator"]
    await asyncio.sleep(0.7)
    for stale in (iterator, fresh):
        with pytest.raises(ClientError) as error:
            await kinesis.get_records(ShardIterator=stale)
        assert error_code(error) == "ExpiredIteratorException"


@on_module_loop
async def test_malformed_iterator_is_an_invalid_argument(kinesis: Any) -> None:
    await create_stream(kinesis, "bad", 1)
    with pytest.raises(ClientError) as error:
        await kinesis.get_records(ShardIterator=base64.b64encode(b"nonsense").decode())
    assert error_code(error) == "InvalidArgumentException"


async def list_pages(kinesis: Any, first: dict[str, Any], page: int) -> list[list[str]]:
    """Every page of shard ids, following NextToken alone (as AWS requires) after ``first``."""
    answer = await kinesis.list_shards(**first, MaxResults=page)
    pages = [[s["ShardId"] for s in answer["Shards"]]]
    while "NextToken" in answer:
        answer = await kinesis.list_shards(NextToken=answer["NextToken"], MaxResults=page)
        pages.append([s["ShardId"] for s in answer["Shards"]])
    return pages


@on_module_loop
async def test_list_shards_pages_follow_the_token_alone(kinesis: Any) -> None:
    await kinesis.create_stream(StreamName="paged", ShardCount=5)
    everything = (await kinesis.list_shards(StreamName="paged"))["Shards"]
    ids = [s["ShardId"] for s in everything]
    assert len(ids) == 5
    assert await list_pages(kinesis, {"StreamName": "paged"}, 1) == [[i] for i in ids]
    assert await list_pages(kinesis, {"StreamName": "paged"}, 2) == [ids[:2], ids[2:4], ids[4:]]
    # The stream's ARN names it as well as its name; the token still suffices afterwards.
    arn = (await kinesis.describe_stream_summary(StreamName="paged"))["StreamDescriptionSummary"][
        "StreamARN"
    ]
    assert await list_pages(kinesis, {"StreamARN": arn}, 3) == [ids[:3], ids[3:]]
    # ExclusiveStartShardId starts after the named shard.
    after = await kinesis.list_shards(StreamName="paged", ExclusiveStartShardId=ids[1])
    assert [s["ShardId"] for s in after["Shards"]] == ids[2:]
    assert "NextToken" not in after


@on_module_loop
async def test_list_shards_token_names_its_own_stream(kinesis: Any) -> None:
    await kinesis.create_stream(StreamName="paged-a", ShardCount=2)
    await kinesis.create_stream(StreamName="paged-b", ShardCount=3)
    a = await list_pages(kinesis, {"StreamName": "paged-a"}, 1)
    b = await list_pages(kinesis, {"StreamName": "paged-b"}, 1)
    assert len(a) == 2
    assert len(b) == 3


@on_module_loop
@pytest.mark.parametrize(
    "extra",
    [
        {"StreamName": "paged"},
        {"StreamARN": "arn:aws:kinesis:us-east-1:123456789012:stream/paged"},
        {"ExclusiveStartShardId": "shardId-000000000000"},
    ],
)
async def test_list_shards_refuses_a_token_with_another_stream_selector(
    kinesis: Any, extra: dict[str, str]
) -> None:
    await kinesis.create_stream(StreamName="paged", ShardCount=2)
    token = (await kinesis.list_shards(StreamName="paged", MaxResults=1))["NextToken"]
    with pytest.raises(ClientError) as error:
        await kinesis.list_shards(NextToken=token, **extra)
    assert error_code(error) == "InvalidArgumentException"


@on_module_loop
async def test_list_shards_tokens_expire_and_malformed_ones_are_refused(
    aws: MotoSandbox, kinesis: Any
) -> None:
    await kinesis.create_stream(StreamName="paged", ShardCount=2)
    assert (await aws.config()).list_shards_token_lifetime == 300.0  # AWS's 300 s by default
    await aws.configure(list_shards_token_lifetime=0.3)
    token = (await kinesis.list_shards(StreamName="paged", MaxResults=1))["NextToken"]
    await asyncio.sleep(0.5)
    with pytest.raises(ClientError) as expired:
        await kinesis.list_shards(NextToken=token)
    assert error_code(expired) == "ExpiredNextTokenException"
    with pytest.raises(ClientError) as malformed:
        await kinesis.list_shards(NextToken=base64.b64encode(b"nonsense").decode())
    assert error_code(malformed) == "InvalidArgumentException"


@on_module_loop
async def test_list_shards_pages_hold_at_most_1000_shards(kinesis: Any) -> None:
    await kinesis.create_stream(StreamName="wide", ShardCount=1001)
    first = await kinesis.list_shards(StreamName="wide", MaxResults=10_000)
    assert len(first["Shards"]) == 1000
    default = await kinesis.list_shards(StreamName="wide")
    assert len(default["Shards"]) == 1000
    rest = await kinesis.list_shards(NextToken=first["NextToken"])
    assert [s["ShardId"] for s in rest["Shards"]] == ["shardId-000000001000"]
    assert "NextToken" not in rest


# --------------------------------------------------------------------------------------------
# DynamoDB.


@on_module_loop
async def test_dynamodb_conditional_writes_hold_under_concurrency(dynamodb: Any) -> None:
    await dynamodb.create_table(
        TableName="leases",
        KeySchema=[{"AttributeName": "lease_key", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "lease_key", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )

    async def take(owner: int) -> str:
        try:
            await dynamodb.put_item(
                TableName="leases",
                Item={"lease_key": {"S": "shardId-0"}, "owner": {"N": str(owner)}},
                ConditionExpression="attribute_not_exists(lease_key)",
            )
        except ClientError as exc:
            return f"refused: {exc.response['Error']['Code']}"
        return "taken"

    outcomes = await asyncio.gather(*map(take, range(16)))
    assert sorted(set(outcomes)) == ["refused: ConditionalCheckFailedException", "taken"]
    assert outcomes.count("taken") == 1

    async def advance(worker: int) -> int:
        """Compare-and-set a checkpoint counter until one write lands."""
        for _ in range(200):
            item = await dynamodb.get_item(
                TableName="leases", Key={"lease_key": {"S": "shardId-0"}}, ConsistentRead=True
            )
            seen = int(item["Item"].get("checkpoint", {"N": "0"})["N"])
            try:
                await dynamodb.update_item(
                    TableName="leases",
                    Key={"lease_key": {"S": "shardId-0"}},
                    UpdateExpression="SET checkpoint = :new",
                    ConditionExpression="attribute_not_exists(checkpoint) OR checkpoint = :seen",
                    ExpressionAttributeValues={
                        ":new": {"N": str(seen + 1)},
                        ":seen": {"N": str(seen)},
                    },
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                continue  # another worker moved it first: read again
            return worker
        raise AssertionError("no write landed")

    await asyncio.gather(*(advance(w) for w in range(8)))
    item = await dynamodb.get_item(TableName="leases", Key={"lease_key": {"S": "shardId-0"}})
    assert item["Item"]["checkpoint"]["N"] == "8"
