"""The IoT issuer against the patched moto server: idempotency, recovery, policy, throttling."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from cloud_daemon.errors import (
    IssuanceInProgressError,
    LedgerConflictError,
    ThrottledError,
)
from cloud_daemon.issuer import (
    MAX_POLICY_CHARS,
    Issuer,
    IssuerConfig,
    load_policy_template,
)
from cloud_daemon.ledger import IssuanceState, LedgerEntry, SqliteLedger
from cloud_daemon.ratelimit import Backoff, RateLimiter
from cloud_daemon.validation import ValidCsr, public_key_sha256, validate_csr
from sandbox.aws import MotoSandbox
from shared.errors import ConfigError, DecodeError
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
        throttle=Backoff(base=0.2, cap=1.0, attempts=10),
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
        throttle=Backoff(base=0.01, cap=0.02, attempts=3),
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
