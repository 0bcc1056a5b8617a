"""CSR validation: the pure decision whether a device's CSR may become a certificate.

Theory of operation
-------------------
:func:`validate_csr` takes the CSR text a device sent and the serial AirVantage authenticated
for the message (``communication.id``), and returns either a :class:`ValidCsr` (what the issuer
needs: the PEM, the subject CN and the SHA-256 of the public key) or a :class:`CsrRefused`
naming the reason. It never raises for anything a device can send, and it does no I/O.

The checks run cheapest first, and the first failure decides:

=======================  =========================================================
reason                   refused when
=======================  =========================================================
``too_large``            the text is longer than ``max_pem_chars`` (before parsing)
``unparseable``          not exactly one PEM CSR block, or its DER does not parse
``unsupported_key_type`` neither RSA nor EC, or an EC curve outside the allowed set
``weak_key``             RSA below ``min_rsa_bits`` (or above ``max_rsa_bits``)
``bad_signature``        the CSR's self-signature does not verify with its own key
``cn_mismatch``          the subject has not exactly one CN, equal to the serial
=======================  =========================================================

The last rule is the security property: a device authenticated as serial ``S`` can only obtain
a certificate whose subject says ``S``, and (by the issuer's thing naming and the policy's
``${iot:Connection.Thing.ThingName}``) only for its own thing.

A refusal's ``detail`` is for logs and for the device: short, printable, never the CSR itself.
"""

from __future__ import annotations

import enum
import hashlib
import re
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shared.errors import UsageError
from shared.messages import MAX_CSR_PEM_CHARS, sanitize_reason

__all__ = [
    "DEFAULT_CSR_POLICY",
    "CsrPolicy",
    "CsrRefused",
    "RefusalReason",
    "ValidCsr",
    "public_key_sha256",
    "validate_csr",
]

_PEM_BLOCK: Final = re.compile(
    r"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----\r?\n[A-Za-z0-9+/=\r\n]+"
    r"-----END (?:NEW )?CERTIFICATE REQUEST-----"
)
_PEM_MARKER: Final = re.compile(r"-----BEGIN [A-Z ]+-----")
_DETAIL_CHARS: Final = 100


class RefusalReason(enum.StrEnum):
    """Why a CSR was refused (the ``reason_code`` of :class:`CsrRefused`)."""

    TOO_LARGE = "too_large"
    UNPARSEABLE = "unparseable"
    UNSUPPORTED_KEY_TYPE = "unsupported_key_type"
    WEAK_KEY = "weak_key"
    BAD_SIGNATURE = "bad_signature"
    CN_MISMATCH = "cn_mismatch"


@dataclass(frozen=True, slots=True)
class CsrRefused:
    """A CSR the cloud will not sign, and why.

    Attributes:
        reason_code: the rule that refused it.
        detail: a short, printable explanation (at most 100 characters, never the CSR).

    Raises:
        UsageError: ``reason_code`` is not a :class:`RefusalReason`.
    """

    reason_code: RefusalReason
    detail: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason_code, RefusalReason):
            raise UsageError(
                f"CsrRefused.reason_code must be a RefusalReason: {self.reason_code!r}"
            )
        object.__setattr__(self, "detail", _clean(self.detail))

    @property
    def reason(self) -> str:
        """The refusal as one line for the device's :class:`~shared.messages.Rejected`."""
        return sanitize_reason(f"{self.reason_code.value}: {self.detail}")


@dataclass(frozen=True, slots=True)
class ValidCsr:
    """A CSR that passed every check.

    Attributes:
        csr_pem: the PEM text to hand to CreateCertificateFromCsr.
        common_name: the subject CN (equal to the authenticated serial).
        key_type: ``RSA-2048``, ``EC-secp256r1``...
        key_sha256: hex SHA-256 of the public key's DER SubjectPublicKeyInfo; with the thing
            name, the idempotency key of the issuance.
    """

    csr_pem: str = field(repr=False)
    common_name: str
    key_type: str
    key_sha256: str


@dataclass(frozen=True, slots=True)
class CsrPolicy:
    """What the cloud accepts.

    Attributes:
        max_pem_chars: the largest CSR text looked at (an RSA-4096 CSR is ~1.7 KB).
        min_rsa_bits: the smallest RSA modulus.
        max_rsa_bits: the largest RSA modulus (bounds the cost of verifying a signature).
        ec_curves: the EC curve names accepted (``secp256r1``, ``secp384r1``).

    Raises:
        UsageError: a bound is not positive or the RSA bounds are crossed.
    """

    max_pem_chars: int = MAX_CSR_PEM_CHARS
    min_rsa_bits: int = 2048
    max_rsa_bits: int = 4096
    ec_curves: frozenset[str] = frozenset({"secp256r1", "secp384r1"})

    def __post_init__(self) -> None:
        for name in ("max_pem_chars", "min_rsa_bits", "max_rsa_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"CsrPolicy.{name} must be a positive integer")
        if self.min_rsa_bits > self.max_rsa_bits:
            raise UsageError("CsrPolicy.min_rsa_bits must not exceed max_rsa_bits")
        object.__setattr__(self, "ec_curves", frozenset(self.ec_curves))


DEFAULT_CSR_POLICY: Final = CsrPolicy()


def _clean(text: str) -> str:
    printable = "".join(c if " " <= c <= "~" else "?" for c in text)
    return printable if len(printable) <= _DETAIL_CHARS else f"{printable[: _DETAIL_CHARS - 3]}..."


def public_key_sha256(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """Return the hex SHA-256 of a public key's DER SubjectPublicKeyInfo.

    Args:
        key: the key (from a CSR or a certificate).

    Returns:
        64 lowercase hex digits; a certificate and the CSR it was made from give the same value.
    """
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _check_key(
    key: object, policy: CsrPolicy
) -> tuple[str, rsa.RSAPublicKey | ec.EllipticCurvePublicKey] | CsrRefused:
    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < policy.min_rsa_bits:
            return CsrRefused(
                RefusalReason.WEAK_KEY, f"RSA-{bits} is below RSA-{policy.min_rsa_bits}"
            )
        if bits > policy.max_rsa_bits:
            return CsrRefused(
                RefusalReason.WEAK_KEY, f"RSA-{bits} is above the RSA-{policy.max_rsa_bits} bound"
            )
        return f"RSA-{bits}", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve.name
        if curve not in policy.ec_curves:
            allowed = ", ".join(sorted(policy.ec_curves))
            return CsrRefused(
                RefusalReason.UNSUPPORTED_KEY_TYPE, f"EC curve {curve} is not one of {allowed}"
            )
        return f"EC-{curve}", key
    return CsrRefused(
        RefusalReason.UNSUPPORTED_KEY_TYPE,
        f"{type(key).__name__.lstrip('_')} keys are not accepted",
    )


def _check_subject(csr: x509.CertificateSigningRequest, serial: str) -> str | CsrRefused:
    try:
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return CsrRefused(RefusalReason.UNPARSEABLE, "the subject does not decode")
    if len(names) != 1:
        return CsrRefused(
            RefusalReason.CN_MISMATCH, f"the subject has {len(names)} CNs, expected exactly one"
        )
    value = names[0].value
    common_name = value if isinstance(value, str) else value.decode("latin-1")
    if common_name != serial:
        return CsrRefused(
            RefusalReason.CN_MISMATCH,
            f"subject CN {common_name[:40]!r} is not the authenticated serial {serial[:40]!r}",
        )
    return common_name


def _parse(
    csr_pem: str, policy: CsrPolicy
) -> tuple[x509.CertificateSigningRequest, object] | CsrRefused:
    if len(csr_pem) > policy.max_pem_chars:
        return CsrRefused(
            RefusalReason.TOO_LARGE, f"{len(csr_pem)} characters, limit {policy.max_pem_chars}"
        )
    if not csr_pem.isascii():
        return CsrRefused(RefusalReason.UNPARSEABLE, "the text is not ASCII PEM")
    blocks = _PEM_BLOCK.findall(csr_pem)
    if len(blocks) != 1 or len(_PEM_MARKER.findall(csr_pem)) != 1:
        return CsrRefused(
            RefusalReason.UNPARSEABLE, f"expected one PEM CSR block, found {len(blocks)}"
        )
    try:
        csr = x509.load_pem_x509_csr(blocks[0].encode("ascii"))
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm, TypeError):
        return CsrRefused(RefusalReason.UNPARSEABLE, "the PEM block is not a valid PKCS#10 CSR")
    return csr, key


def validate_csr(
    csr_pem: str, *, serial: str, policy: CsrPolicy = DEFAULT_CSR_POLICY
) -> ValidCsr | CsrRefused:
    """Decide whether a device's CSR may be signed.

    Args:
        csr_pem: the CSR text as the device sent it.
        serial: the serial AirVantage authenticated for the message (``communication.id``).
        policy: the bounds and key types accepted.

    Returns:
        :class:`ValidCsr`, or :class:`CsrRefused` with the first rule broken (see the module
        doc for the order).

    Raises:
        UsageError: ``csr_pem`` or ``serial`` is not a string (a caller bug, not a device's).
    """
    if not isinstance(csr_pem, str) or not isinstance(serial, str):
        raise UsageError("validate_csr takes the CSR and the serial as strings")
    parsed = _parse(csr_pem, policy)
    if isinstance(parsed, CsrRefused):
        return parsed
    csr, key = parsed
    checked = _check_key(key, policy)
    if isinstance(checked, CsrRefused):
        return checked
    key_type, public_key = checked
    try:
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        signed = False
    if not signed:
        return CsrRefused(
            RefusalReason.BAD_SIGNATURE, "the CSR's signature does not verify with its own key"
        )
    subject = _check_subject(csr, serial)
    if isinstance(subject, CsrRefused):
        return subject
    return ValidCsr(
        csr_pem=csr_pem,
        common_name=subject,
        key_type=key_type,
        key_sha256=public_key_sha256(public_key),
    )
