"""The state record's renewal fields on disk, and what ``ztp-daemon status`` makes of them."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztp_daemon.__main__ import status_report
from ztp_daemon.bundle import BundleStore
from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.errors import StorageError
from ztp_daemon.machine import State, StateRecord, request_id_for
from ztp_daemon.state import StateFile, record_from_json, record_to_json
from ztp_daemon.supervisor import BUNDLE_DIRECTORY

SERIAL = "SN-RENEW-STATE"
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
KEY = ec.generate_private_key(ec.SECP256R1())
CSR = build_csr(KEY, CsrSubject(SERIAL))
KEY2 = ec.generate_private_key(ec.SECP256R1())
CSR2 = build_csr(KEY2, CsrSubject(SERIAL))
CERT_ID = "a" * 64


def provisioned(**changes: object) -> StateRecord:
    base: dict[str, object] = {
        "state": State.PROVISIONED,
        "request_id": request_id_for(CSR),
        "csr_pem": CSR,
        "attempts": 1,
        "bundle_version": 1,
        "certificate_id": CERT_ID,
        "not_before": NOW.timestamp() - 86400,
        "not_after": NOW.timestamp() + 364 * 86400,
        "renew_at": NOW.timestamp() + 200 * 86400,
    }
    return StateRecord(**(base | changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        provisioned(),
        provisioned(
            state=State.RENEW_SENT, request_id=request_id_for(CSR2), csr_pem=CSR2, attempts=2
        ),
        provisioned(
            state=State.RENEW_WAITING,
            request_id=request_id_for(CSR2),
            csr_pem=CSR2,
            next_retry_at=NOW.timestamp() + 60,
            last_error="refused by the cloud: no",
        ),
    ],
    ids=["provisioned", "renew-sent", "renew-waiting"],
)
def test_renewal_records_survive_the_round_trip(record: StateRecord, tmp_path: Path) -> None:
    assert record_from_json(record_to_json(record)) == record
    store = StateFile(tmp_path)
    store.save(record)
    assert store.load() == record


def test_a_record_written_before_renewal_existed_reads_without_validity() -> None:
    document = json.loads(record_to_json(provisioned()))
    for key in ("not_before", "not_after", "renew_at"):
        del document[key]
    record = record_from_json(json.dumps(document).encode())
    assert (record.not_before, record.not_after, record.renew_at) == (None, None, None)
    assert record.bundle_version == 1


def test_a_renewal_record_without_the_bundle_in_use_is_refused_on_read() -> None:
    document = json.loads(record_to_json(provisioned(state=State.RENEW_SENT)))
    document["bundle_version"] = None
    with pytest.raises(ValueError, match="bundle_version"):
        record_from_json(json.dumps(document).encode())


def _commit(directory: Path, *, days: int) -> str:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERIAL)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=days))
        .sign(ca_key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    BundleStore(directory / BUNDLE_DIRECTORY).commit(
        certificate_pem=pem,
        endpoint="iot.example.com",
        certificate_id=CERT_ID,
        key_pem=KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return pem


def test_status_shows_expiry_due_time_and_no_renewal_under_way(tmp_path: Path) -> None:
    _commit(tmp_path, days=364)
    StateFile(tmp_path).save(provisioned())
    report = status_report(tmp_path, now=NOW)
    assert report["certificate_expires"] == "2027-05-31T00:00:00+00:00"
    assert report["renewal_due"] == "2026-12-18T00:00:00+00:00"
    assert report["renewal_in_progress"] is False
    assert report["bundle_version"] == 1


def test_status_during_a_renewal_describes_the_bundle_still_in_use(tmp_path: Path) -> None:
    _commit(tmp_path, days=364)
    renewing = provisioned(
        state=State.RENEW_SENT, request_id=request_id_for(CSR2), csr_pem=CSR2, attempts=3
    )
    StateFile(tmp_path).save(renewing)
    report = status_report(tmp_path, now=NOW)
    assert report["state"] == "renew_sent"
    assert report["renewal_in_progress"] is True
    assert report["request_id"] == request_id_for(CSR2)
    assert report["attempts"] == 3
    assert report["certificate_id"] == CERT_ID
    assert report["serial"] == SERIAL


def test_status_of_a_legacy_or_disabled_record_has_no_due_time(tmp_path: Path) -> None:
    _commit(tmp_path, days=30)
    StateFile(tmp_path).save(provisioned(renew_at=None))
    report = status_report(tmp_path, now=NOW)
    assert report["renewal_due"] is None
    assert report["renewal_in_progress"] is False


def test_status_refuses_an_unreadable_record(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"format": 1, "state": "renew_sent"}')
    with pytest.raises(StorageError):
        status_report(tmp_path, now=NOW)
