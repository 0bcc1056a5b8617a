"""The checks on a delivered certificate and endpoint (ztp_daemon.verify), table-driven."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from sandbox.pki import issue_certificate
from shared.errors import PeerError
from ztp_daemon.errors import (
    BadEndpointError,
    DeviceError,
    ExpiredError,
    MalformedCertificateError,
    NotYetValidError,
    SubjectMismatchError,
    UntrustedChainError,
    VerificationError,
    WrongKeyError,
)
from ztp_daemon.verify import VerifyPolicy, check_endpoint, verify_certificate

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
SERIAL = "4B1234567890"
ENDPOINT = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"


def make_ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=365))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


CA = make_ca("test CA")
OTHER_CA = make_ca("test CA")  # the same name, another key: only the signature tells them apart
OUR_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def certificate(
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = OUR_KEY,
    cn: str = SERIAL,
    issued_at: dt.datetime = NOW,
    validity: dt.timedelta = dt.timedelta(days=365),
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] = CA,
) -> str:
    cert = issue_certificate(
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]),
        ca_cert=ca[0],
        ca_key=ca[1],
        now=issued_at,
        validity=validity,
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


DEFAULT_POLICY = VerifyPolicy()


@dataclass(frozen=True)
class Case:
    name: str
    pem: str
    endpoint: str = ENDPOINT
    policy: VerifyPolicy = DEFAULT_POLICY
    error: type[VerificationError] | None = None


CHAINED = VerifyPolicy(trust_anchors=(CA[0],))
CASES = [
    Case("own key, defaults", certificate()),
    Case("other key", certificate(key=OTHER_KEY), error=WrongKeyError),
    Case(
        "other key even when everything else is right",
        certificate(key=OTHER_KEY),
        policy=CHAINED,
        error=WrongKeyError,
    ),
    Case(
        "expired",
        certificate(issued_at=NOW - dt.timedelta(days=10), validity=dt.timedelta(days=1)),
        error=ExpiredError,
    ),
    Case(
        "not yet valid",
        certificate(issued_at=NOW + dt.timedelta(days=2)),
        error=NotYetValidError,
    ),
    Case(
        "starts within the clock skew",
        # issue_certificate backdates 5 minutes; 8 minutes ahead starts 3 minutes from now.
        certificate(issued_at=NOW + dt.timedelta(minutes=8)),
    ),
    Case(
        "starts just beyond the clock skew",
        certificate(issued_at=NOW + dt.timedelta(minutes=11)),
        error=NotYetValidError,
    ),
    Case("CN mismatch, check on", certificate(cn="someone-else"), error=SubjectMismatchError),
    Case(
        "CN mismatch, check off",
        certificate(cn="someone-else"),
        policy=VerifyPolicy(check_subject_cn=False),
    ),
    Case("chains to the bundle", certificate(), policy=CHAINED),
    Case(
        "signed by another CA of the same name",
        certificate(ca=OTHER_CA),
        policy=CHAINED,
        error=UntrustedChainError,
    ),
    Case("chain check off by default", certificate(ca=OTHER_CA)),
    Case(
        "bundle with both CAs",
        certificate(ca=OTHER_CA),
        policy=VerifyPolicy(trust_anchors=(CA[0], OTHER_CA[0])),
    ),
    Case("endpoint localhost", certificate(), endpoint="localhost"),
    Case("endpoint with scheme", certificate(), endpoint="https://x.io", error=BadEndpointError),
    Case("endpoint with port", certificate(), endpoint="x.example:8883", error=BadEndpointError),
    Case("endpoint empty", certificate(), endpoint="", error=BadEndpointError),
    Case("endpoint with space", certificate(), endpoint="a b.example", error=BadEndpointError),
    Case("endpoint empty label", certificate(), endpoint="a..example", error=BadEndpointError),
    Case("endpoint hyphen edge", certificate(), endpoint="-a.example", error=BadEndpointError),
    Case("endpoint too long", certificate(), endpoint="a." * 127 + "ab", error=BadEndpointError),
    Case("not PEM", "hello", error=MalformedCertificateError),
    Case("two certificates", certificate() + certificate(), error=MalformedCertificateError),
    Case(
        "garbage inside PEM",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        error=MalformedCertificateError,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verification_table(case: Case) -> None:
    def run() -> x509.Certificate:
        return verify_certificate(
            case.pem,
            endpoint=case.endpoint,
            public_key=OUR_KEY.public_key(),
            serial=SERIAL,
            now=NOW,
            policy=case.policy,
        )

    if case.error is None:
        assert run().subject.rfc4514_string().startswith("CN=")
    else:
        with pytest.raises(case.error) as caught:
            run()
        assert isinstance(caught.value, DeviceError)
        assert isinstance(caught.value, PeerError)
        assert caught.value.reason == case.error.reason
        assert str(caught.value).startswith(case.error.reason)


def test_rsa_key_binding() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = certificate(key=rsa_key)
    verify_certificate(
        pem,
        endpoint=ENDPOINT,
        public_key=rsa_key.public_key(),
        serial=SERIAL,
        now=NOW,
        policy=CHAINED,
    )
    with pytest.raises(WrongKeyError):
        verify_certificate(
            pem,
            endpoint=ENDPOINT,
            public_key=OUR_KEY.public_key(),
            serial=SERIAL,
            now=NOW,
            policy=VerifyPolicy(),
        )


def test_reason_codes_are_distinct() -> None:
    reasons = [
        cls.reason
        for cls in (
            MalformedCertificateError,
            WrongKeyError,
            NotYetValidError,
            ExpiredError,
            SubjectMismatchError,
            UntrustedChainError,
            BadEndpointError,
        )
    ]
    assert len(set(reasons)) == len(reasons)


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        verify_certificate(
            certificate(),
            endpoint=ENDPOINT,
            public_key=OUR_KEY.public_key(),
            serial=SERIAL,
            now=NOW.replace(tzinfo=None),
            policy=VerifyPolicy(),
        )


def test_policy_validates() -> None:
    with pytest.raises(ValueError, match="clock_skew"):
        VerifyPolicy(clock_skew=dt.timedelta(seconds=-1))
    with pytest.raises(TypeError):
        VerifyPolicy(trust_anchors=("not a certificate",))  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "a-b.c-d.example", "x" * 63 + ".io"])
def test_good_endpoints(host: str) -> None:
    check_endpoint(host)


def test_label_of_64_characters_is_refused() -> None:
    with pytest.raises(BadEndpointError):
        check_endpoint("x" * 64 + ".io")
