"""The IoT issuer against the patched moto server: idempotency, recovery, policy, throttling."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import pytest_asyncio
import structlog
from aiobotocore.session import get_session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from cloud_daemon.airvantage import (
    AirVantageClient,
    AirVantageClientConfig,
    AirVantageCredentials,
)
from cloud_daemon.errors import (
    IssuanceInProgressError,
    LedgerConflictError,
    ThrottledError,
)
from cloud_daemon.intake import Confirm, Intake, Issue, Refuse
from cloud_daemon.issuer import (
    MAX_POLICY_CHARS,
    Issuer,
    IssuerConfig,
    load_policy_template,
)
from cloud_daemon.ledger import IssuanceState, LedgerEntry, SqliteLedger
from cloud_daemon.ratelimit import Backoff, RateLimiter, ThrottleRetry
from cloud_daemon.validation import ValidCsr, public_key_sha256, validate_csr
from sandbox.airvantage import AirVantageEmulator, ApplicationModel
from sandbox.aws import MotoSandbox
from shared.airvantage import (
    Ack,
    CommandTask,
    DataPoint,
    DataShape,
    acks_topic,
    encode_acks,
    encode_device_message,
    messages_topic,
    parse_tasks,
    tasks_topic,
)
from shared.config import Secret
from shared.errors import ConfigError, DecodeError
from shared.fragments import Completed, Reassembler, split
from shared.messages import (
    REQUEST_PATH,
    STATUS_PATH,
    CertificateDelivery,
    CertificateRequest,
    DeliveryMessage,
    Provisioned,
    Rejected,
    decode_delivery,
    fragments_from_params,
    request_data_points,
    status_data_point,
)
from tests.sandbox.airvantage_fixtures import Broker, run_mosquitto
from tests.sandbox.aws_fixtures import (
    IOT_ENDPOINT_HOST,
    aws,
    aws_broker_pid_file,
    aws_pki,
    iot,
    moto_sandbox,
)

__all__ = ["aws", "aws_broker_pid_file", "aws_pki", "iot", "moto_sandbox"]  # fixtures

pytestmark = pytest.mark.asyncio(loop_scope="module")


def new_serial() -> str:
    return f"SN{uuid.uuid4().hex[:10].upper()}"


def vetted(serial: str, key: ec.EllipticCurvePrivateKey | None = None) -> ValidCsr:
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, serial)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    result = validate_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), serial=serial)
    assert isinstance(result, ValidCsr)
    return result


@pytest_asyncio.fixture(loop_scope="module")
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.sqlite3") as opened:
        yield opened


def make_issuer(iot: Any, ledger: Any, **overrides: Any) -> Issuer:
    limiter = overrides.pop("limiter", RateLimiter(default_tps=1000.0))
    config = IssuerConfig(**{"worker_id": "w1", "thing_name_template": "ztp-{serial}", **overrides})
    return Issuer(iot=iot, ledger=ledger, limiter=limiter, config=config)


async def certificates(iot: Any) -> list[dict[str, Any]]:
    return list((await iot.list_certificates())["certificates"])


async def active_for_key(iot: Any, key_sha256: str) -> list[str]:
    found = []
    for cert in await certificates(iot):
        description = (await iot.describe_certificate(certificateId=cert["certificateId"]))[
            "certificateDescription"
        ]
        pem = x509.load_pem_x509_certificate(description["certificatePem"].encode())
        key = pem.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        if description["status"] == "ACTIVE" and public_key_sha256(key) == key_sha256:
            found.append(cert["certificateId"])
    return found


async def active_for_thing(iot: Any, thing: str) -> list[str]:
    arns = (await iot.list_thing_principals(thingName=thing))["principals"]
    ids = [arn.rsplit("/", 1)[1] for arn in arns]
    statuses = [
        (await iot.describe_certificate(certificateId=i))["certificateDescription"]["status"]
        for i in ids
    ]
    return [i for i, status in zip(ids, statuses, strict=True) if status == "ACTIVE"]


async def test_issue_mints_attaches_and_names_the_thing(iot: Any, ledger: SqliteLedger) -> None:
    serial = new_serial()
    csr = vetted(serial)
    issued = await make_issuer(iot, ledger).issue(
        serial=serial, system_uid="sysuid1", request_id="r1", csr=csr
    )
    assert not issued.reused
    assert issued.thing_name == f"ztp-{serial}"
    assert issued.endpoint == IOT_ENDPOINT_HOST
    cert = x509.load_pem_x509_certificate(issued.certificate_pem.encode())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert public_key_sha256(key) == csr.key_sha256  # the device's own key was signed
    thing = await iot.describe_thing(thingName=issued.thing_name)
    assert thing["attributes"] == {"serial": serial, "system_uid": "sysuid1"}
    assert await active_for_thing(iot, issued.thing_name) == [issued.certificate_id]
    policies = await iot.list_attached_policies(target=issued.certificate_arn)
    assert [p["policyName"] for p in policies["policies"]] == ["ztp-device"]
    entry = await ledger.get(issued.thing_name, csr.key_sha256)
    assert entry is not None
    assert (entry.state, entry.certificate_id) == (IssuanceState.ISSUED, issued.certificate_id)


async def test_the_policy_is_least_privilege_and_created_once(
    iot: Any, ledger: SqliteLedger
) -> None:
    issuer = make_issuer(iot, ledger)
    await issuer.ensure_policy()
    await make_issuer(iot, ledger).ensure_policy()  # another instance: exists, not an error
    policy = await iot.get_policy(policyName="ztp-device")
    document = json.loads(policy["policyDocument"])
    text = json.dumps(document)
    assert len(policy["policyDocument"]) <= MAX_POLICY_CHARS
    assert "${iot:Connection.Thing.ThingName}" in text
    assert '"*"' not in text  # no allow-all resource
    actions = {
        a
        for s in document["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    }
    assert actions <= {
        "iot:Connect",
        "iot:Publish",
        "iot:Receive",
        "iot:RetainPublish",
        "iot:Subscribe",
    }
    for statement in document["Statement"]:
        resources = statement["Resource"]
        for resource in [resources] if isinstance(resources, str) else resources:
            assert resource.endswith(
                ("/${iot:Connection.Thing.ThingName}", "/${iot:Connection.Thing.ThingName}/*")
            )


async def test_a_redelivered_request_resends_the_stored_certificate(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    csr = vetted(serial)
    issuer = make_issuer(iot, ledger)
    first = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=csr)
    second = await issuer.issue(serial=serial, system_uid="s1", request_id="r2", csr=csr)
    other_instance = await make_issuer(iot, ledger, worker_id="w2").issue(
        serial=serial, system_uid="s1", request_id="r3", csr=csr
    )
    assert second.reused
    assert other_instance.reused
    assert second.certificate_id == first.certificate_id == other_instance.certificate_id
    assert second.certificate_pem == first.certificate_pem
    assert len(await certificates(iot)) == 1
    assert await active_for_key(iot, csr.key_sha256) == [first.certificate_id]


async def test_concurrent_requests_for_one_key_mint_once(iot: Any, ledger: SqliteLedger) -> None:
    serial = new_serial()
    csr = vetted(serial)
    issuers = [make_issuer(iot, ledger, worker_id=f"w{i}") for i in range(4)]
    results = await asyncio.gather(
        *(i.issue(serial=serial, system_uid="s1", request_id="r1", csr=csr) for i in issuers),
        return_exceptions=True,
    )
    minted = [r for r in results if not isinstance(r, BaseException)]
    busy = [r for r in results if isinstance(r, IssuanceInProgressError)]
    assert len(minted) + len(busy) == 4
    assert len(minted) >= 1
    assert len({r.certificate_id for r in minted}) == 1
    assert all(0 < b.retry_after <= 60 for b in busy)
    assert len(await certificates(iot)) == 1


async def test_a_fresh_intent_elsewhere_means_retry_later(iot: Any, ledger: SqliteLedger) -> None:
    serial = new_serial()
    csr = vetted(serial)
    issuer = make_issuer(iot, ledger, intent_timeout=30.0)
    await ledger.begin(f"ztp-{serial}", csr.key_sha256, request_id="r0", owner="w0", now=_now())
    with pytest.raises(IssuanceInProgressError) as caught:
        await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=csr)
    assert 25 < caught.value.retry_after <= 30
    assert await certificates(iot) == []


def _now() -> float:
    return time.time()


@pytest.mark.parametrize("attached", [True, False], ids=["orphan-attached", "orphan-detached"])
async def test_crash_between_intent_and_result_leaves_one_active_certificate(
    iot: Any, ledger: SqliteLedger, attached: bool
) -> None:
    serial = new_serial()
    csr = vetted(serial)
    thing = f"ztp-{serial}"
    # The worker that crashed: it wrote the intent, minted, and died before recording it.
    await ledger.begin(thing, csr.key_sha256, request_id="r1", owner="dead", now=_now() - 120)
    orphan = await iot.create_certificate_from_csr(
        certificateSigningRequest=csr.csr_pem, setAsActive=True
    )
    if attached:
        await iot.create_thing(thingName=thing)
        await iot.attach_thing_principal(thingName=thing, principal=orphan["certificateArn"])
    # An unrelated certificate of another key must be left alone.
    bystander = await iot.create_certificate_from_csr(
        certificateSigningRequest=vetted(new_serial()).csr_pem, setAsActive=True
    )
    with capture_logs() as logs:
        issued = await make_issuer(iot, ledger, worker_id="w2").issue(
            serial=serial, system_uid="s1", request_id="r1", csr=csr
        )
    assert issued.certificate_id != orphan["certificateId"]
    assert await active_for_key(iot, csr.key_sha256) == [issued.certificate_id]
    assert await active_for_thing(iot, thing) == [issued.certificate_id]
    described = await iot.describe_certificate(certificateId=bystander["certificateId"])
    assert described["certificateDescription"]["status"] == "ACTIVE"
    events = [e["event"] for e in logs]
    assert "issuance.intent_abandoned" in events
    assert "issuance.orphan_deactivated" in events
    entry = await ledger.get(thing, csr.key_sha256)
    assert entry is not None
    assert (entry.attempt, entry.owner) == (2, "w2")


async def test_crash_after_minting_attaches_on_replay(iot: Any, ledger: SqliteLedger) -> None:
    serial = new_serial()
    csr = vetted(serial)
    thing = f"ztp-{serial}"
    intent, _ = await ledger.begin(thing, csr.key_sha256, request_id="r1", owner="dead", now=_now())
    await iot.create_thing(thingName=thing)
    minted = await iot.create_certificate_from_csr(
        certificateSigningRequest=csr.csr_pem, setAsActive=True
    )
    await ledger.record_minted(
        intent,
        certificate_id=minted["certificateId"],
        certificate_arn=minted["certificateArn"],
        certificate_pem=minted["certificatePem"],
        now=_now(),
    )
    issued = await make_issuer(iot, ledger).issue(
        serial=serial, system_uid="s1", request_id="r2", csr=csr
    )
    assert issued.reused
    assert issued.certificate_id == minted["certificateId"]
    assert await active_for_thing(iot, thing) == [issued.certificate_id]
    policies = await iot.list_attached_policies(target=issued.certificate_arn)
    assert [p["policyName"] for p in policies["policies"]] == ["ztp-device"]


class FencingLedger(SqliteLedger):
    """Another worker takes the intent over while our CreateCertificateFromCsr is in flight."""

    async def record_minted(self, entry: LedgerEntry, **kwargs: Any) -> LedgerEntry:
        await self.take_over(entry, request_id="r9", owner="thief", now=_now())
        return await super().record_minted(entry, **kwargs)


async def test_a_fenced_worker_deactivates_what_it_minted(iot: Any, tmp_path: Path) -> None:
    serial = new_serial()
    csr = vetted(serial)
    async with FencingLedger(tmp_path / "fenced.sqlite3") as fenced:
        with pytest.raises(LedgerConflictError):
            await make_issuer(iot, fenced).issue(
                serial=serial, system_uid="s1", request_id="r1", csr=csr
            )
    assert await active_for_key(iot, csr.key_sha256) == []


async def test_confirmation_deactivates_the_things_other_certificates(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    issuer = make_issuer(iot, ledger)
    old = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    new = await issuer.issue(serial=serial, system_uid="s1", request_id="r2", csr=vetted(serial))
    assert sorted(await active_for_thing(iot, old.thing_name)) == sorted(
        [old.certificate_id, new.certificate_id]
    )
    await issuer.record_delivery(new, request_id="r2", operation_uid="op-1")
    confirmation = await issuer.confirm(serial=serial, certificate_id=new.certificate_id)
    assert confirmation.known
    assert confirmation.deactivated == (old.certificate_id,)
    assert await active_for_thing(iot, old.thing_name) == [new.certificate_id]
    entry = await ledger.get(new.thing_name, new.entry.key_sha256)
    assert entry is not None
    assert (entry.state, entry.operation_uid) == (IssuanceState.CONFIRMED, "op-1")
    again = await issuer.confirm(serial=serial, certificate_id=new.certificate_id)
    assert again.known
    assert again.deactivated == ()


class CallLog:
    """The real IoT client, noting the name of every call made through it."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(**kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(**kwargs)

        return call


async def test_confirming_a_thing_this_process_created_lists_nothing(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    counted = CallLog(iot)
    issuer = make_issuer(counted, ledger)
    issued = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    once = {"get_policy", "create_policy", "describe_endpoint"}  # asked once per process
    assert [c for c in counted.calls if c not in once] == [
        "create_thing",
        "create_certificate_from_csr",
        "attach_thing_principal",
        "attach_policy",
    ]
    counted.calls.clear()
    confirmation = await issuer.confirm(serial=serial, certificate_id=issued.certificate_id)
    assert confirmation.known
    assert confirmation.deactivated == ()
    assert counted.calls == []  # the thing was created empty and holds the one certificate
    assert await active_for_thing(iot, issued.thing_name) == [issued.certificate_id]
    again = await issuer.confirm(serial=serial, certificate_id=issued.certificate_id)
    assert again.known
    assert counted.calls == ["list_thing_principals"]  # remembered once, then listed as ever


async def test_confirming_a_thing_that_existed_still_deactivates_its_other_certificates(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    thing = f"ztp-{serial}"
    # The thing was made before this ledger knew it, by another tool: other attributes.
    await iot.create_thing(thingName=thing, attributePayload={"attributes": {"owner": "x"}})
    stray = await iot.create_certificate_from_csr(
        certificateSigningRequest=vetted(serial).csr_pem, setAsActive=True
    )
    await iot.attach_thing_principal(thingName=thing, principal=stray["certificateArn"])
    issuer = make_issuer(iot, ledger)
    issued = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    confirmation = await issuer.confirm(serial=serial, certificate_id=issued.certificate_id)
    assert confirmation.deactivated == (stray["certificateId"],)
    assert await active_for_thing(iot, thing) == [issued.certificate_id]


async def test_confirming_after_a_restart_still_deactivates_the_things_other_certificates(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    old = await make_issuer(iot, ledger).issue(
        serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial)
    )
    # A second key for the same thing, then a restart: the new process knows nothing in memory.
    new = await make_issuer(iot, ledger).issue(
        serial=serial, system_uid="s1", request_id="r2", csr=vetted(serial)
    )
    confirmation = await make_issuer(iot, ledger).confirm(
        serial=serial, certificate_id=new.certificate_id
    )
    assert confirmation.deactivated == (old.certificate_id,)
    assert await active_for_thing(iot, new.thing_name) == [new.certificate_id]


async def test_a_second_key_for_a_created_thing_is_still_found_at_confirmation(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    issuer = make_issuer(iot, ledger)
    first = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    # Another worker issues for a second key of the same thing before the first is confirmed.
    second = await make_issuer(iot, ledger, worker_id="w2").issue(
        serial=serial, system_uid="s1", request_id="r2", csr=vetted(serial)
    )
    confirmation = await issuer.confirm(serial=serial, certificate_id=first.certificate_id)
    assert confirmation.deactivated == (second.certificate_id,)
    assert await active_for_thing(iot, first.thing_name) == [first.certificate_id]


async def test_a_delivery_recorded_after_the_confirmation_keeps_it_confirmed(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    issuer = make_issuer(iot, ledger)
    issued = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    await issuer.confirm(serial=serial, certificate_id=issued.certificate_id)
    # The delivery task records its operation after the device already confirmed.
    await issuer.record_delivery(issued, request_id="r1", operation_uid="op-late")
    entry = await ledger.get(issued.thing_name, issued.entry.key_sha256)
    assert entry is not None
    assert (entry.state, entry.operation_uid) == (IssuanceState.CONFIRMED, "op-late")


async def test_confirming_an_unknown_certificate_changes_nothing(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    issuer = make_issuer(iot, ledger)
    issued = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=vetted(serial))
    confirmation = await issuer.confirm(serial=serial, certificate_id="ff" * 32)
    assert not confirmation.known
    assert await active_for_thing(iot, issued.thing_name) == [issued.certificate_id]


async def test_endpoint_is_asked_once_or_configured(iot: Any, ledger: SqliteLedger) -> None:
    issuer = make_issuer(iot, ledger)
    assert await asyncio.gather(issuer.endpoint(), issuer.endpoint()) == [IOT_ENDPOINT_HOST] * 2
    overridden = make_issuer(iot, ledger, endpoint_override="abc-ats.iot.example.com")
    assert await overridden.endpoint() == "abc-ats.iot.example.com"


async def test_a_limiter_at_the_limit_is_never_throttled(
    aws: MotoSandbox, iot: Any, ledger: SqliteLedger
) -> None:
    await aws.configure(iot_throttling=True, iot_tps=3.0)
    # The sandbox serialises IoT requests, so queued calls reach its rate window bunched up:
    # the limiter runs with a margin under the 3 TPS window.
    issuer = make_issuer(iot, ledger, limiter=RateLimiter(default_tps=2.0))
    serials = [new_serial() for _ in range(4)]
    with capture_logs() as logs:
        await asyncio.gather(
            *(
                issuer.issue(serial=s, system_uid="s1", request_id="r", csr=vetted(s))
                for s in serials
            )
        )
    assert [e for e in logs if e["event"] == "iot.throttled"] == []


async def test_throttling_backs_off_and_names_the_api_and_limit(
    aws: MotoSandbox, iot: Any, ledger: SqliteLedger
) -> None:
    await aws.configure(iot_throttling=True, iot_tps_per_api={"CreateThing": 2.0})
    issuer = make_issuer(
        iot,
        ledger,
        limiter=RateLimiter(default_tps=100.0),
        throttle=ThrottleRetry(attempts=10, cap=1.0),
    )
    serials = [new_serial() for _ in range(5)]
    with capture_logs() as logs:
        issued = await asyncio.gather(
            *(
                issuer.issue(serial=s, system_uid="s1", request_id="r", csr=vetted(s))
                for s in serials
            )
        )
    assert len({i.certificate_id for i in issued}) == 5
    throttled = [e for e in logs if e["event"] == "iot.throttled"]
    assert throttled
    assert {e["api"] for e in throttled} == {"CreateThing"}
    assert all(e["limit"] == "CreateThing 100 TPS" for e in throttled)


async def test_throttling_past_the_attempts_raises_with_the_limit(
    aws: MotoSandbox, iot: Any, ledger: SqliteLedger
) -> None:
    await aws.configure(iot_throttling=True, iot_tps_per_api={"DescribeEndpoint": 1.0})
    issuer = make_issuer(
        iot,
        ledger,
        limiter=RateLimiter(default_tps=100.0),
        throttle=ThrottleRetry(attempts=3, cap=0.02),
    )
    await iot.describe_endpoint(endpointType="iot:Data-ATS")  # uses up the one call allowed
    with pytest.raises(ThrottledError) as caught:
        await issuer.endpoint()
    assert caught.value.operation == "DescribeEndpoint"
    assert caught.value.limit_name == "DescribeEndpoint 100 TPS"


@pytest.mark.parametrize(
    "overrides",
    [
        {"thing_name_template": "ztp"},
        {"thing_name_template": "{serial}-{other}"},
        {"thing_name_template": "bad name {serial}"},
        {"policy_name": "bad name"},
        {"policy_document": "not json"},
        {"policy_document": json.dumps({"Statement": [{"Sid": "x" * 3000}]})},
        {"intent_timeout": 0},
        {"worker_id": ""},
    ],
)
async def test_config_validates(overrides: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        IssuerConfig(**{"worker_id": "w1", **overrides})


async def test_thing_name_from_the_template() -> None:
    config = IssuerConfig(worker_id="w", thing_name_template="gw_{serial}")
    assert config.thing_name("SN1") == "gw_SN1"
    with pytest.raises(DecodeError):
        config.thing_name("SN.1")  # '.' is valid in a serial, not in a thing name
    assert len(load_policy_template()) > 0
    assert replace(config, policy_name="other").policy_name == "other"


# --------------------------------------------------------------------------------------------
# End to end through the sandbox: device -> AirVantage emulator -> Kinesis -> intake ->
# validation -> issuer -> AirVantage REST -> device tasks. The glue below (``Pipeline``) is the
# test's stand-in for the service's Kinesis handler, which is the next step.

CLIENT_ID = "ztp-cloud"
CLIENT_SECRET = "e2e-client-secret-31b7"
DEVICE_PASSWORD = "e2e-device-password-9a2c"
E2E_WAIT = 20.0

_e2e_log = structlog.get_logger()


@pytest.fixture(scope="module")
def device_broker_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with run_mosquitto(tmp_path_factory.mktemp("e2e-mosquitto")) as running:
        yield running


def e2e_model() -> ApplicationModel:
    shipped = ApplicationModel.load()
    # The request and status paths of docs/messages.md (the shipped model may lag behind).
    return ApplicationModel(
        app_type=shipped.app_type,
        variables=shipped.variables | {REQUEST_PATH, STATUS_PATH},
        settings=shipped.settings,
        commands=shipped.commands,
    )


async def open_cloud_peers(
    stack: contextlib.AsyncExitStack,
    aws: MotoSandbox,
    broker: Broker,
    *,
    stream: str,
    **emulator_options: Any,
) -> tuple[Any, Any, AirVantageEmulator]:
    """The cloud daemon's peers, closed with ``stack``: Kinesis and IoT clients on the moto
    server, ``stream`` (one shard), and the AirVantage emulator putting device messages into it.

    Returns:
        (kinesis client, IoT client, emulator).
    """
    session = get_session()
    kinesis = await stack.enter_async_context(
        session.create_client("kinesis", **aws.client_kwargs())
    )
    iot = await stack.enter_async_context(session.create_client("iot", **aws.client_kwargs()))
    await kinesis.create_stream(StreamName=stream, ShardCount=1)
    emulator = await stack.enter_async_context(
        AirVantageEmulator(
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
            **emulator_options,
        )
    )
    return kinesis, iot, emulator


def transfer_for(request_id: str) -> str:
    return "d-" + hashlib.sha256(request_id.encode()).hexdigest()[:24]


class StreamReader:
    """Reads every record of a one-shard stream, from the start, as the consumer would."""

    def __init__(self, kinesis: Any, stream: str) -> None:
        self.kinesis = kinesis
        self.stream = stream
        self.iterator: str | None = None

    async def next_batch(self) -> list[bytes]:
        if self.iterator is None:
            shard = (await self.kinesis.list_shards(StreamName=self.stream))["Shards"][0]
            self.iterator = (
                await self.kinesis.get_shard_iterator(
                    StreamName=self.stream,
                    ShardId=shard["ShardId"],
                    ShardIteratorType="TRIM_HORIZON",
                )
            )["ShardIterator"]
        page = await self.kinesis.get_records(ShardIterator=self.iterator, Limit=100)
        self.iterator = page["NextShardIterator"]
        return [record["Data"] for record in page["Records"]]


class Pipeline:
    """Intake, issuer and AirVantage client glued as the service's handler will glue them."""

    def __init__(self, *, intake: Intake, issuer: Issuer, client: AirVantageClient) -> None:
        self.intake = intake
        self.issuer = issuer
        self.client = client
        self.confirmations: list[str] = []

    async def handle(self, data: bytes) -> None:
        for action in self.intake.receive(data, now=time.monotonic()):
            match action:
                case Issue():
                    issued = await self.issuer.issue(
                        serial=action.serial,
                        system_uid=action.system_uid,
                        request_id=action.request_id,
                        csr=action.csr,
                    )
                    message = CertificateDelivery(
                        action.request_id,
                        issued.certificate_id,
                        issued.endpoint,
                        issued.certificate_pem,
                    )
                    delivered = await self.client.deliver(
                        action.system_uid, message, transfer_id=transfer_for(action.request_id)
                    )
                    await self.issuer.record_delivery(
                        issued, request_id=action.request_id, operation_uid=delivered.operation_uid
                    )
                case Refuse():
                    _e2e_log.warning(
                        "csr.refused",
                        serial=action.serial,
                        request_id=action.request_id,
                        reason=action.refusal.reason_code.value,
                        detail=action.refusal.detail,
                    )
                    await self.client.deliver(
                        action.system_uid,
                        Rejected(action.request_id, action.refusal.reason),
                        transfer_id=transfer_for(action.request_id),
                    )
                case Confirm():
                    await self.issuer.confirm(
                        serial=action.serial, certificate_id=action.certificate_id
                    )
                    self.confirmations.append(action.certificate_id)
                case _:
                    pass

    async def run_until(self, reader: StreamReader, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(E2E_WAIT):
            while not done():
                for data in await reader.next_batch():
                    await self.handle(data)
                await asyncio.sleep(0.05)


class E2EDevice:
    """A gateway: publishes its request, takes deliver tasks, verifies, reports its status."""

    def __init__(self, broker: Broker, serial: str, key: Any) -> None:
        self.broker = broker
        self.serial = serial
        self.key = key
        self.reassembler = Reassembler()
        self.received: list[DeliveryMessage] = []
        self.tasks: list[CommandTask] = []
        self.ready = asyncio.Event()
        self.client: aiomqtt.Client | None = None

    async def run(self) -> None:
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=self.serial
        ) as client:
            self.client = client
            await client.subscribe(tasks_topic(self.serial), qos=1)
            self.ready.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                for task in parse_tasks(message.payload):
                    assert isinstance(task, CommandTask)
                    await self.on_task(client, task)

    async def on_task(self, client: aiomqtt.Client, task: CommandTask) -> None:
        self.tasks.append(task)
        for text in fragments_from_params(task.params):
            outcome = self.reassembler.receive(text, now=time.monotonic())
            if isinstance(outcome, Completed):
                delivery = decode_delivery(outcome.payload)
                self.received.append(delivery)
                if isinstance(delivery, CertificateDelivery):
                    cert = x509.load_pem_x509_certificate(delivery.certificate_pem.encode())
                    if cert.public_key() == self.key.public_key():
                        status = Provisioned(delivery.request_id, delivery.certificate_id)
                        await client.publish(
                            messages_topic(self.serial),
                            encode_device_message(
                                [status_data_point(status)], shape=DataShape.PLAIN
                            ),
                            qos=1,
                        )
        await client.publish(acks_topic(self.serial), encode_acks([Ack.ok(task.uid)]), qos=1)

    async def send(self, points: Iterable[DataPoint]) -> None:
        assert self.client is not None
        await self.client.publish(messages_topic(self.serial), encode_device_message(points), qos=1)


def request_csr(key: Any, cn: str) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def request_points(request_id: str, serial: str, csr_pem: str) -> tuple[DataPoint, ...]:
    return request_data_points(
        CertificateRequest(request_id, serial, csr_pem),
        transfer_id=request_id,
        now_ms=int(time.time() * 1000),
    )


class E2E:
    """Everything one end-to-end test needs, started and stopped together."""

    def __init__(self, aws: MotoSandbox, broker: Broker, ledger_path: Path) -> None:
        self.aws = aws
        self.broker = broker
        self.ledger_path = ledger_path
        self.stream = f"e2e-{uuid.uuid4().hex[:8]}"
        self.stack = contextlib.AsyncExitStack()
        self.tokens: list[str] = []

    async def __aenter__(self) -> E2E:
        stack = self.stack
        self.kinesis, self.iot, self.emulator = await open_cloud_peers(
            stack, self.aws, self.broker, stream=self.stream
        )
        self.ledger = await stack.enter_async_context(SqliteLedger(self.ledger_path))
        self.client = await stack.enter_async_context(
            TokenRecordingClient(
                AirVantageClientConfig(
                    base_url=self.emulator.api_url,
                    credentials=AirVantageCredentials(CLIENT_ID, Secret(CLIENT_SECRET)),
                    retry=Backoff(base=0.05, cap=0.5, attempts=6),
                    poll_interval=0.05,
                    operation_timeout=10.0,
                ),
                sink=self.tokens,
            )
        )
        self.pipeline = self.new_pipeline()
        return self

    def new_pipeline(self, **issuer_options: Any) -> Pipeline:
        """A fresh pipeline, as after a restart (new intake memory, same ledger and IoT)."""
        return Pipeline(
            intake=Intake(),
            issuer=make_issuer(self.iot, self.ledger, **issuer_options),
            client=self.client,
        )

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stack.aclose()

    async def device(self, serial: str, key: Any) -> E2EDevice:
        await self.emulator.register_system(serial, DEVICE_PASSWORD)
        device = E2EDevice(self.broker, serial, key)
        self.stack.callback(lambda: None)
        task = asyncio.get_running_loop().create_task(device.run(), name=f"device-{serial}")
        self.stack.push_async_callback(_cancel, task)
        async with asyncio.timeout(5):
            await device.ready.wait()
        return device


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel("test over")
    with contextlib.suppress(asyncio.CancelledError):
        await task


class TokenRecordingClient(AirVantageClient):
    """Notes each token obtained, so the test can search the logs for it."""

    def __init__(self, config: AirVantageClientConfig, *, sink: list[str]) -> None:
        super().__init__(config)
        self.sink = sink

    async def _fetch_token(self) -> Secret:
        token = await super()._fetch_token()
        self.sink.append(token.reveal())
        return token


def assert_no_secrets(
    logs: list[dict[str, Any]], caplog: pytest.LogCaptureFixture, *secrets_: str
) -> None:
    text = json.dumps(logs, default=str) + caplog.text
    assert "PRIVATE KEY" not in text
    for secret in (CLIENT_SECRET, DEVICE_PASSWORD, *secrets_):
        assert secret not in text


def private_pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


async def test_e2e_certificate_reaches_the_device_despite_airvantage_faults(
    aws: MotoSandbox,
    device_broker_address: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    with capture_logs() as logs:
        async with E2E(aws, device_broker_address, tmp_path / "ledger.sqlite3") as e2e:
            device = await e2e.device(serial, key)
            # AirVantage misbehaves: a 429 with Retry-After, then a 500, then an expired token.
            e2e.emulator.faults.update(
                {"rate_limit_next": 1, "retry_after": 1, "server_error_next": 1,
                 "server_error_status": 500}
            )  # fmt: skip
            await e2e.client.system_uid(serial)  # takes the 429 and the 500, obtains a token
            e2e.emulator.expire_tokens()
            await device.send(request_points("req-e2e-1", serial, request_csr(key, serial)))
            reader = StreamReader(e2e.kinesis, e2e.stream)
            await e2e.pipeline.run_until(reader, lambda: bool(e2e.pipeline.confirmations))
            [delivery] = device.received
            assert isinstance(delivery, CertificateDelivery)
            cert = x509.load_pem_x509_certificate(delivery.certificate_pem.encode())
            assert cert.public_key() == key.public_key()  # the reassembled certificate fits
            assert delivery.endpoint == IOT_ENDPOINT_HOST
            thing = f"ztp-{serial}"
            assert await active_for_thing(e2e.iot, thing) == [delivery.certificate_id]
            entry = await e2e.ledger.entries_for_thing(thing)
            assert [e.state for e in entry] == [IssuanceState.CONFIRMED]
            assert e2e.client.token_fetches == 2
            tokens = list(e2e.tokens)
    events = [e["event"] for e in logs]
    assert [e.get("status") for e in logs if e["event"] == "airvantage.retry"] == [429, 500]
    assert "airvantage.token_refused" in events
    assert_no_secrets(logs, caplog, private_pem(key), *tokens)


async def test_e2e_the_same_record_twice_leaves_one_active_certificate(
    aws: MotoSandbox,
    device_broker_address: Broker,
    tmp_path: Path,
) -> None:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    async with E2E(aws, device_broker_address, tmp_path / "ledger.sqlite3") as e2e:
        device = await e2e.device(serial, key)
        await device.send(request_points("req-dup", serial, request_csr(key, serial)))
        reader = StreamReader(e2e.kinesis, e2e.stream)
        records: list[bytes] = []
        async with asyncio.timeout(E2E_WAIT):
            while not records:
                records = await reader.next_batch()
        [record] = records
        # Delivered twice: once to this instance, once to a restarted one (no intake memory).
        await e2e.pipeline.handle(record)
        await e2e.new_pipeline(worker_id="w2").handle(record)
        # Two deliveries of the same fragments: the device reassembled one certificate and
        # took the second copy for the duplicate it is.
        assert len(device.tasks) == 2
        assert device.tasks[0].params == device.tasks[1].params
        [first] = device.received
        assert isinstance(first, CertificateDelivery)
        thing = f"ztp-{serial}"
        assert await active_for_thing(e2e.iot, thing) == [first.certificate_id]
        assert len(await certificates(e2e.iot)) == 1


_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])
_KILLED_WORKER = """
import asyncio, os, signal, sys
from pathlib import Path
from aiobotocore.session import get_session
from aiobotocore.config import AioConfig
from cloud_daemon.intake import Intake, Issue
from cloud_daemon.issuer import Issuer, IssuerConfig
from cloud_daemon.ledger import IssuanceState, SqliteLedger
from cloud_daemon.ratelimit import RateLimiter

endpoint, ledger_path, record_path, where = sys.argv[1:5]

class Dying(SqliteLedger):
    async def record_minted(self, entry, **kwargs):
        if where == "before-result":
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().record_minted(entry, **kwargs)

    async def advance(self, entry, to, **kwargs):
        stored = await super().advance(entry, to, **kwargs)
        if where == "after-issue" and to is IssuanceState.ISSUED:
            os.kill(os.getpid(), signal.SIGKILL)
        return stored

async def main():
    [action] = Intake().receive(Path(record_path).read_bytes(), now=0.0)
    assert isinstance(action, Issue), action
    async with get_session().create_client(
        "iot", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
        aws_secret_access_key="testing", config=AioConfig(retries={"total_max_attempts": 1}),
    ) as iot, Dying(Path(ledger_path)) as ledger:
        issuer = Issuer(iot=iot, ledger=ledger, limiter=RateLimiter(default_tps=1000.0),
                        config=IssuerConfig(worker_id="doomed", thing_name_template="ztp-{serial}"))
        await issuer.issue(serial=action.serial, system_uid=action.system_uid,
                           request_id=action.request_id, csr=action.csr)

asyncio.run(main())
"""


@pytest.mark.parametrize("where", ["before-result", "after-issue"])
async def test_e2e_sigkill_between_issuance_and_checkpoint(
    aws: MotoSandbox,
    device_broker_address: Broker,
    tmp_path: Path,
    where: str,
) -> None:
    serial = new_serial()
    key = ec.generate_private_key(ec.SECP256R1())
    ledger_path = tmp_path / "ledger.sqlite3"
    async with E2E(aws, device_broker_address, ledger_path) as e2e:
        device = await e2e.device(serial, key)
        await device.send(request_points("req-kill", serial, request_csr(key, serial)))
        reader = StreamReader(e2e.kinesis, e2e.stream)
        records: list[bytes] = []
        async with asyncio.timeout(E2E_WAIT):
            while not records:
                records = await reader.next_batch()
        [record] = records
        record_path = tmp_path / "record.json"
        record_path.write_bytes(record)
        # A worker takes the record, gets as far as `where`, and is SIGKILLed before it
        # could checkpoint (the checkpoint never moved: the record will be delivered again).
        script = tmp_path / "worker.py"
        script.write_text(_KILLED_WORKER)
        env = {**os.environ, "PYTHONPATH": _PROJECT_ROOT}
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(script), aws.endpoint_url, str(ledger_path), str(record_path),
            where, env=env,
        )  # fmt: skip
        assert await child.wait() == -signal.SIGKILL
        # The restarted daemon reads the record again from the unmoved checkpoint.
        restarted = e2e.new_pipeline(worker_id="w-restarted", intent_timeout=0.2)
        await asyncio.sleep(0.3)  # the dead worker's intent is now abandoned
        await restarted.handle(record)
        [delivery] = device.received
        assert isinstance(delivery, CertificateDelivery)
        cert = x509.load_pem_x509_certificate(delivery.certificate_pem.encode())
        assert cert.public_key() == key.public_key()
        thing = f"ztp-{serial}"
        assert await active_for_thing(e2e.iot, thing) == [delivery.certificate_id]
        key_digest = validate_csr(request_csr(key, serial), serial=serial)
        assert isinstance(key_digest, ValidCsr)
        assert await active_for_key(e2e.iot, key_digest.key_sha256) == [delivery.certificate_id]


def _hostile_points(serial: str, case: str) -> tuple[DataPoint, ...]:
    if case == "cn-of-another-device":
        key = ec.generate_private_key(ec.SECP256R1())
        return request_points("req-cn", serial, request_csr(key, "SN-SOMEONE-ELSE"))
    if case == "rsa-1024":
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - hostile input
        return request_points("req-rsa", serial, request_csr(weak, serial))
    if case == "bad-signature":
        strong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = request_csr(strong, serial)
        der = bytearray(
            x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
        )
        der[-1] ^= 0x01
        body = base64.encodebytes(bytes(der)).decode()
        tampered = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
        return request_points("req-sig", serial, tampered)
    if case == "garbage":
        junk = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        return request_points("req-junk", serial, junk)
    # 100 KB: no valid CertificateRequest can hold it, so build the wire message by hand.
    payload = json.dumps(
        {"v": 1, "t": "req", "rid": "req-big", "sn": serial, "csr": "A" * 100_000}
    ).encode()
    now_ms = int(time.time() * 1000)
    return tuple(
        DataPoint(REQUEST_PATH, text, now_ms + index)
        for index, text in enumerate(split(payload, transfer_id="req-big"))
    )


async def test_e2e_hostile_csrs_are_refused_with_their_reasons(
    aws: MotoSandbox,
    device_broker_address: Broker,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = {
        "cn-of-another-device": "cn_mismatch",
        "rsa-1024": "weak_key",
        "bad-signature": "bad_signature",
        "garbage": "unparseable",
        "100-kb": "too_large",
    }
    with capture_logs() as logs:
        async with E2E(aws, device_broker_address, tmp_path / "ledger.sqlite3") as e2e:
            devices = {}
            for case in expected:
                serial = new_serial()
                devices[case] = await e2e.device(serial, ec.generate_private_key(ec.SECP256R1()))
                await devices[case].send(_hostile_points(serial, case))
            reader = StreamReader(e2e.kinesis, e2e.stream)
            await e2e.pipeline.run_until(reader, lambda: all(d.received for d in devices.values()))
            for case, reason in expected.items():
                [answer] = devices[case].received
                assert isinstance(answer, Rejected), case
                assert answer.reason.startswith(f"{reason}: "), (case, answer.reason)
            assert await certificates(e2e.iot) == []
            tokens = list(e2e.tokens)
    refused = {e["reason"] for e in logs if e["event"] == "csr.refused"}
    assert refused == set(expected.values())
    assert_no_secrets(logs, caplog, *tokens)


async def test_a_failure_before_minting_withdraws_the_intent(
    iot: Any, ledger: SqliteLedger
) -> None:
    serial = new_serial()
    csr = vetted(serial)
    issuer = make_issuer(iot, ledger)
    with pytest.raises(DecodeError):
        await issuer.issue(serial=serial, system_uid="not a valid uid!", request_id="r1", csr=csr)
    assert await ledger.get(f"ztp-{serial}", csr.key_sha256) is None
    # The retry does not have to wait for the intent timeout.
    issued = await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=csr)
    assert not issued.reused


async def test_a_refused_mint_withdraws_the_intent(
    aws: MotoSandbox, iot: Any, ledger: SqliteLedger
) -> None:
    await aws.configure(iot_throttling=True, iot_tps_per_api={"CreateCertificateFromCsr": 1.0})
    serial = new_serial()
    csr = vetted(serial)
    await iot.create_certificate_from_csr(  # spends the one call allowed this second
        certificateSigningRequest=vetted(new_serial()).csr_pem, setAsActive=False
    )
    issuer = make_issuer(iot, ledger, throttle=ThrottleRetry(attempts=2, cap=0.02))
    with pytest.raises(ThrottledError):
        await issuer.issue(serial=serial, system_uid="s1", request_id="r1", csr=csr)
    assert await ledger.get(f"ztp-{serial}", csr.key_sha256) is None
    assert await active_for_key(iot, csr.key_sha256) == []
