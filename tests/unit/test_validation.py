"""CSR validation: every refusal reason, the order of checks, and no exception for any input."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_daemon.validation import (
    CsrPolicy,
    CsrRefused,
    RefusalReason,
    ValidCsr,
    public_key_sha256,
    validate_csr,
)
from shared.errors import UsageError
from shared.messages import Rejected

SERIAL = "SN0001"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@pytest.fixture(scope="module")
def rsa2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa1024() -> rsa.RSAPrivateKey:
    # The weak key is what these tests refuse.
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: PrivateKey, *cns: str, extra_ou: str | None = None) -> str:
    names = [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]
    if extra_ou is not None:
        names.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, extra_ou))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tamper_signature(pem: str) -> str:
    """Flip the last byte of the DER (inside the signature): parses, does not verify."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    body = base64.encodebytes(bytes(der)).decode().replace("\n", "")
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n"


def refused(result: ValidCsr | CsrRefused) -> RefusalReason:
    assert isinstance(result, CsrRefused), result
    return result.reason_code


def test_valid_rsa_csr(rsa2048: rsa.RSAPrivateKey) -> None:
    pem = make_csr(rsa2048, SERIAL)
    result = validate_csr(pem, serial=SERIAL)
    assert isinstance(result, ValidCsr)
    assert result.common_name == SERIAL
    assert result.key_type == "RSA-2048"
    assert result.key_sha256 == public_key_sha256(rsa2048.public_key())
    assert result.csr_pem == pem
    assert pem not in repr(result)


@pytest.mark.parametrize(
    ("curve", "name"), [(ec.SECP256R1(), "secp256r1"), (ec.SECP384R1(), "secp384r1")]
)
def test_valid_ec_csr(curve: ec.EllipticCurve, name: str) -> None:
    key = ec.generate_private_key(curve)
    result = validate_csr(make_csr(key, SERIAL), serial=SERIAL)
    assert isinstance(result, ValidCsr)
    assert result.key_type == f"EC-{name}"


def test_key_digest_is_the_same_for_two_csrs_of_one_key(p256: ec.EllipticCurvePrivateKey) -> None:
    first = validate_csr(make_csr(p256, SERIAL), serial=SERIAL)
    second = validate_csr(make_csr(p256, SERIAL, extra_ou="again"), serial=SERIAL)
    assert isinstance(first, ValidCsr)
    assert isinstance(second, ValidCsr)
    assert first.key_sha256 == second.key_sha256


def test_cn_of_another_device_is_refused(p256: ec.EllipticCurvePrivateKey) -> None:
    result = validate_csr(make_csr(p256, "SN0002"), serial=SERIAL)
    assert refused(result) is RefusalReason.CN_MISMATCH
    assert isinstance(result, CsrRefused)
    assert "SN0002" in result.detail
    assert SERIAL in result.detail


@pytest.mark.parametrize("cns", [(), ("SN0001", "SN0001"), ("sn0001",), ("SN0001 ",)])
def test_cn_must_be_exactly_one_equal_value(
    p256: ec.EllipticCurvePrivateKey, cns: tuple[str, ...]
) -> None:
    assert refused(validate_csr(make_csr(p256, *cns), serial=SERIAL)) is RefusalReason.CN_MISMATCH


def test_rsa_1024_is_weak(rsa1024: rsa.RSAPrivateKey) -> None:
    result = validate_csr(make_csr(rsa1024, SERIAL), serial=SERIAL)
    assert refused(result) is RefusalReason.WEAK_KEY
    assert isinstance(result, CsrRefused)
    assert "RSA-1024" in result.detail


def test_rsa_above_the_bound_is_refused(rsa2048: rsa.RSAPrivateKey) -> None:
    policy = CsrPolicy(min_rsa_bits=1024, max_rsa_bits=1536)
    assert refused(validate_csr(make_csr(rsa2048, SERIAL), serial=SERIAL, policy=policy)) is (
        RefusalReason.WEAK_KEY
    )


def test_weak_key_is_reported_before_a_cn_mismatch(rsa1024: rsa.RSAPrivateKey) -> None:
    result = validate_csr(make_csr(rsa1024, "SN0002"), serial=SERIAL)
    assert refused(result) is RefusalReason.WEAK_KEY


@pytest.mark.parametrize(
    "make_key",
    [
        lambda: ec.generate_private_key(ec.SECP521R1()),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        ed25519.Ed25519PrivateKey.generate,
    ],
    ids=["p521", "secp256k1", "ed25519"],
)
def test_unsupported_key_types(make_key: Callable[[], PrivateKey]) -> None:
    result = validate_csr(make_csr(make_key(), SERIAL), serial=SERIAL)
    assert refused(result) is RefusalReason.UNSUPPORTED_KEY_TYPE


def test_p521_can_be_allowed_by_policy() -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    policy = CsrPolicy(ec_curves=frozenset({"secp256r1", "secp521r1"}))
    assert isinstance(validate_csr(make_csr(key, SERIAL), serial=SERIAL, policy=policy), ValidCsr)


def test_bad_signature(rsa2048: rsa.RSAPrivateKey) -> None:
    pem = tamper_signature(make_csr(rsa2048, SERIAL))
    x509.load_pem_x509_csr(pem.encode())  # still parses: only the signature is wrong
    assert refused(validate_csr(pem, serial=SERIAL)) is RefusalReason.BAD_SIGNATURE


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\u00e9\n-----END CERTIFICATE REQUEST-----\n",
    ],
    ids=["empty", "garbage", "bad-der", "bad-base64", "certificate", "non-ascii"],
)
def test_unparseable(text: str) -> None:
    assert refused(validate_csr(text, serial=SERIAL)) is RefusalReason.UNPARSEABLE


def test_two_blocks_are_unparseable(p256: ec.EllipticCurvePrivateKey) -> None:
    pem = make_csr(p256, SERIAL)
    assert refused(validate_csr(pem + pem, serial=SERIAL)) is RefusalReason.UNPARSEABLE


def test_a_private_key_block_alongside_is_unparseable(p256: ec.EllipticCurvePrivateKey) -> None:
    private = p256.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    result = validate_csr(make_csr(p256, SERIAL) + private, serial=SERIAL)
    assert refused(result) is RefusalReason.UNPARSEABLE
    assert isinstance(result, CsrRefused)
    assert "PRIVATE" not in result.detail


def test_100_kb_is_too_large_before_parsing(p256: ec.EllipticCurvePrivateKey) -> None:
    text = make_csr(p256, SERIAL) + "A" * 100_000
    result = validate_csr(text, serial=SERIAL)
    assert refused(result) is RefusalReason.TOO_LARGE
    assert isinstance(result, CsrRefused)
    assert "4096" in result.detail


def test_refusal_reason_fits_a_rejection() -> None:
    refusal = CsrRefused(RefusalReason.CN_MISMATCH, 'CN "x\u00e9y" ' + "z" * 300)
    assert len(refusal.detail) <= 100
    assert refusal.detail.isascii()
    rejected = Rejected("req-1", refusal.reason)
    assert rejected.reason.startswith("cn_mismatch: ")


def test_refusal_needs_a_reason_code() -> None:
    with pytest.raises(UsageError):
        CsrRefused("cn_mismatch", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pem_chars": 0}, {"min_rsa_bits": 4096, "max_rsa_bits": 2048}, {"min_rsa_bits": True}],
)
def test_policy_validates(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        CsrPolicy(**kwargs)  # type: ignore[arg-type]


def test_non_string_input_is_a_caller_bug() -> None:
    with pytest.raises(UsageError):
        validate_csr(b"bytes", serial=SERIAL)  # type: ignore[arg-type]


_PEM_ALPHABET = st.sampled_from(
    [
        "-----BEGIN CERTIFICATE REQUEST-----\n",
        "-----END CERTIFICATE REQUEST-----\n",
        "MIIB",
        "AAAA",
        "\n",
        "=",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(_PEM_ALPHABET, max_size=12).map("".join)))
def test_any_text_is_refused_without_raising(text: str) -> None:
    result = validate_csr(text, serial=SERIAL)
    assert isinstance(result, CsrRefused)
    assert re.fullmatch(r"[ -~]*", result.detail)


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda pem: pem.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
        lambda pem: pem.replace("\n", "\r\n"),
    ],
    ids=["new-header", "crlf"],
)
def test_legacy_pem_spellings_are_accepted(
    p256: ec.EllipticCurvePrivateKey, rewrite: Callable[[str], str]
) -> None:
    assert isinstance(validate_csr(rewrite(make_csr(p256, SERIAL)), serial=SERIAL), ValidCsr)
