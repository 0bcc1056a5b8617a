"""The file key store and the CSR, on a real file system."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from structlog.testing import capture_logs

from shared.errors import ConfigError
from ztp_daemon.csr import CsrSubject, build_csr, read_serial
from ztp_daemon.errors import StorageError
from ztp_daemon.keystore import FileKeyStore, KeyType
from ztp_daemon.state import atomic_write
from ztp_daemon.verify import public_key_der


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_made_once_0600_and_reused(tmp_path: Path, key_type: KeyType) -> None:
    directory = tmp_path / "keys"
    store = FileKeyStore(directory, key_type=key_type)
    assert store.load() is None
    handle = store.load_or_create()
    assert handle.key_type is key_type
    assert mode(directory) == 0o700
    assert mode(store.path) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["pending.key"], "temporary file left"
    # A new store over the same directory (a restart) hands back the same key.
    again = FileKeyStore(directory, key_type=key_type).load_or_create()
    assert public_key_der(again.public_key) == public_key_der(handle.public_key)
    loaded = serialization.load_pem_private_key(store.path.read_bytes(), password=None)
    assert public_key_der(loaded.public_key()) == public_key_der(handle.public_key)


@pytest.mark.parametrize(
    ("key_type", "check"),
    [
        (
            KeyType.EC_P256,
            lambda k: isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == "secp256r1",
        ),
        (
            KeyType.EC_P384,
            lambda k: isinstance(k, ec.EllipticCurvePublicKey) and k.curve.name == "secp384r1",
        ),
        (KeyType.RSA_2048, lambda k: isinstance(k, rsa.RSAPublicKey) and k.key_size == 2048),
        (KeyType.RSA_3072, lambda k: isinstance(k, rsa.RSAPublicKey) and k.key_size == 3072),
    ],
)
def test_csr_for_each_key_type(tmp_path: Path, key_type: KeyType, check: object) -> None:
    handle = FileKeyStore(tmp_path, key_type=key_type).load_or_create()
    pem = handle.sign_csr(CsrSubject("SN-0001", organization="Acme", organizational_unit="Plant 4"))
    csr = x509.load_pem_x509_csr(pem.encode("ascii"))
    assert csr.is_signature_valid
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    assert callable(check)
    assert check(csr.public_key())
    assert public_key_der(csr.public_key()) == public_key_der(handle.public_key)
    subject = {a.oid: a.value for a in csr.subject}
    assert subject == {
        NameOID.COMMON_NAME: "SN-0001",
        NameOID.ORGANIZATION_NAME: "Acme",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "Plant 4",
    }


def test_csr_without_o_and_ou_names_only_the_serial() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(build_csr(key, CsrSubject("SN-2")).encode("ascii"))
    assert csr.subject.rfc4514_string() == "CN=SN-2"


@pytest.mark.parametrize("serial", ["", "a/b", "a+b", "a#b", "with space", "x" * 65, "tab\there"])
def test_bad_serials_are_refused(serial: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the rule broken
        CsrSubject(serial)


def test_existing_key_of_another_type_is_kept_with_a_warning(tmp_path: Path) -> None:
    first = FileKeyStore(tmp_path, key_type=KeyType.EC_P256).load_or_create()
    with capture_logs() as logs:
        second = FileKeyStore(tmp_path, key_type=KeyType.RSA_2048).load_or_create()
    assert second.key_type is KeyType.EC_P256
    assert public_key_der(second.public_key) == public_key_der(first.public_key)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["key_type_differs"]


@pytest.mark.parametrize(
    "content",
    [b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_unreadable_key_is_a_storage_error_not_a_new_key(tmp_path: Path, content: bytes) -> None:
    store = FileKeyStore(tmp_path)
    store.path.write_bytes(content)
    with pytest.raises(StorageError) as caught:
        store.load_or_create()
    assert caught.value.operation == "parse"
    assert store.path.read_bytes() == content, "the stored key must never be replaced"


def test_unsupported_key_is_refused(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    key = ec.generate_private_key(ec.SECP521R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    store.path.write_bytes(pem)
    with pytest.raises(StorageError, match="not an EC"):
        store.load()


def test_discard_is_idempotent(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path)
    store.load_or_create()
    store.discard()
    store.discard()
    assert store.load() is None


def test_no_private_key_in_logs_or_repr(tmp_path: Path) -> None:
    with capture_logs() as logs:
        store = FileKeyStore(tmp_path / "k")
        handle = store.load_or_create()
        store.load_or_create()
        store.discard()
    pem = handle.private_key_pem().decode("ascii")
    body = "".join(pem.splitlines()[1:-1])
    rendered = repr(logs) + repr(handle)
    assert "PRIVATE KEY" not in rendered
    assert body[:40] not in rendered
    assert {e["event"] for e in logs} == {"key_created", "key_reused", "key_discarded"}


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "missing-directory" / "file"
    with pytest.raises(StorageError):
        atomic_write(target, b"data")
    assert not target.parent.exists()
    # An existing file is replaced whole, with the mode asked for.
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    atomic_write(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


# --- the serial --------------------------------------------------------------------------------


def test_serial_from_value_file_and_command(tmp_path: Path) -> None:
    assert read_serial(value=" SN-1 ") == "SN-1"
    file = tmp_path / "serial"
    file.write_text("SN-2\n")
    assert read_serial(file=file) == "SN-2"
    assert read_serial(command=[sys.executable, "-c", "print('SN-3')"]) == "SN-3"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({}, "device.serial"),
        ({"value": "a", "file": Path("/nonexistent")}, "device.serial"),
        ({"file": Path("/nonexistent/serial")}, "device.serial_file"),
        ({"command": [sys.executable, "-c", "raise SystemExit(3)"]}, "device.serial_command"),
        ({"command": ["/nonexistent/command"]}, "device.serial_command"),
        ({"command": []}, "device.serial_command"),
        ({"command": [sys.executable, "-c", "print('has space')"]}, "device.serial"),
        ({"value": "a/b"}, "device.serial"),
    ],
)
def test_serial_errors_name_the_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_serial(**kwargs)  # type: ignore[arg-type]
    assert caught.value.key == key


def test_serial_command_timeout() -> None:
    with pytest.raises(ConfigError, match="cannot run"):
        read_serial(command=[sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
