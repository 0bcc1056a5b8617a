"""Checks a delivered certificate and endpoint before anything is stored (pure: no I/O, no clock).

The order of the checks is the order of what matters most:

1. the certificate parses (one PEM X.509 certificate);
2. it carries *our* public key, the binding that matters: a certificate for any other key is
   useless to this gateway, whoever signed it;
3. ``now`` is inside its validity window, widened by a small allowed clock skew (gateways often
   boot with a poor clock);
4. when configured, its subject CN equals the gateway's serial (AWS keeps the CSR's subject, but a
   CA that rewrites subjects is possible, so the check can be switched off);
5. when configured (a non-empty CA bundle), it chains to one of the trusted certificates;
6. the endpoint looks like a host name (RFC 1123 labels, no scheme, no port, no path).

Each failure raises a :class:`~ztp_daemon.errors.VerificationError` subclass whose ``reason`` is a
stable code for acks and status reports. The caller passes the CA bundle already parsed, so this
module reads no file.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from ztp_daemon.errors import (
    BadEndpointError,
    ExpiredError,
    MalformedCertificateError,
    NotYetValidError,
    SubjectMismatchError,
    UntrustedChainError,
    WrongKeyError,
)

__all__ = [
    "DEFAULT_CLOCK_SKEW",
    "VerifyPolicy",
    "check_endpoint",
    "public_key_der",
    "verify_certificate",
]

DEFAULT_CLOCK_SKEW = dt.timedelta(minutes=5)
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_HOST_CHARS = 253


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    """What a delivered certificate must satisfy beyond carrying our key and being valid now.

    Attributes:
        check_subject_cn: require the subject CN to equal the gateway's serial.
        trust_anchors: the CA bundle the certificate must chain to; empty turns the check off.
        clock_skew: how far outside the validity window ``now`` may be and still pass.
    """

    check_subject_cn: bool = True
    trust_anchors: tuple[x509.Certificate, ...] = ()
    clock_skew: dt.timedelta = DEFAULT_CLOCK_SKEW

    def __post_init__(self) -> None:
        if self.clock_skew < dt.timedelta(0):
            msg = "clock_skew must not be negative"
            raise ValueError(msg)
        if not all(isinstance(anchor, x509.Certificate) for anchor in self.trust_anchors):
            msg = "trust_anchors must be parsed x509.Certificate objects"
            raise TypeError(msg)


def public_key_der(key: PublicKeyTypes) -> bytes:
    """Return the DER SubjectPublicKeyInfo of ``key``: the form in which two keys are compared."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_endpoint(endpoint: str) -> None:
    """Check that ``endpoint`` looks like a host name (``abc123-ats.iot.eu-west-1.amazonaws.com``).

    Args:
        endpoint: the delivered IoT data endpoint.

    Raises:
        BadEndpointError: a scheme, port, path, empty label or character outside RFC 1123.
    """
    if not endpoint or len(endpoint) > _MAX_HOST_CHARS:
        raise BadEndpointError(f"host name of {len(endpoint)} characters (1..253 allowed)")
    for label in endpoint.split("."):
        if not _LABEL.fullmatch(label):
            raise BadEndpointError(f"label {label[:70]!r} is not an RFC 1123 host name label")


def _load(certificate_pem: str) -> x509.Certificate:
    text = certificate_pem.strip()
    if text.count("-----BEGIN CERTIFICATE-----") != 1:
        raise MalformedCertificateError("expected exactly one PEM certificate")
    try:
        return x509.load_pem_x509_certificate(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise MalformedCertificateError(f"does not parse: {type(exc).__name__}") from exc


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        return None
    value = names[0].value
    return value if isinstance(value, str) else None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_chain(
    cert: x509.Certificate, anchors: tuple[x509.Certificate, ...], now: dt.datetime
) -> None:
    """Require a bundle certificate, valid at ``now``, to have signed ``cert`` directly.

    Only the leaf is delivered, so there are no intermediates to walk: every certificate in the
    bundle is a trust anchor (an operator who trusts an intermediate puts it in the bundle).
    """
    for anchor in anchors:
        if (
            anchor.subject == cert.issuer
            and anchor.not_valid_before_utc <= now <= anchor.not_valid_after_utc
            and _issued_by(cert, anchor)
        ):
            return
    raise UntrustedChainError(
        f"no valid certificate in the CA bundle signed it (issuer {cert.issuer.rfc4514_string()!r})"
    )


def verify_certificate(
    certificate_pem: str,
    *,
    endpoint: str,
    public_key: PublicKeyTypes,
    serial: str,
    now: dt.datetime,
    policy: VerifyPolicy,
) -> x509.Certificate:
    """Run every check on a delivered certificate and endpoint.

    Args:
        certificate_pem: the delivered certificate, PEM.
        endpoint: the delivered IoT data endpoint host name.
        public_key: our public key (the one whose CSR was sent).
        serial: the gateway's serial, which the subject CN must equal when checked.
        now: the current time, timezone-aware.
        policy: the switchable checks and the CA bundle.

    Returns:
        The parsed certificate.

    Raises:
        MalformedCertificateError, WrongKeyError, NotYetValidError, ExpiredError,
        SubjectMismatchError, UntrustedChainError, BadEndpointError: the first check that failed,
            in the order given in the module's documentation.
    """
    if now.tzinfo is None:
        msg = "now must be timezone-aware"
        raise ValueError(msg)
    cert = _load(certificate_pem)
    if public_key_der(cert.public_key()) != public_key_der(public_key):
        raise WrongKeyError("the certificate carries another public key than ours")
    if now + policy.clock_skew < cert.not_valid_before_utc:
        raise NotYetValidError(f"valid from {cert.not_valid_before_utc.isoformat()}")
    if now - policy.clock_skew > cert.not_valid_after_utc:
        raise ExpiredError(f"valid until {cert.not_valid_after_utc.isoformat()}")
    if policy.check_subject_cn:
        cn = _common_name(cert)
        if cn != serial:
            raise SubjectMismatchError(f"subject CN {cn!r} is not the serial {serial!r}")
    if policy.trust_anchors:
        _check_chain(cert, policy.trust_anchors, now)
    check_endpoint(endpoint)
    return cert
