"""The gateway's private key, behind a small interface.

A :class:`KeyStore` makes the key once and hands the same key back on every later start, until
provisioning is done and the credential bundle holds it (then :meth:`KeyStore.discard`). The
provisioning machine never sees the key: it asks for :class:`~ztp_daemon.machine.MakeKey` and gets
a CSR back, so a hardware-backed store (a TPM, a secure element, PKCS#11) can replace
:class:`FileKeyStore` without touching it. Such a store returns handles whose
:meth:`KeyHandle.private_key_pem` is ``None`` and whose :attr:`KeyHandle.reference` names the key
for the TLS stack.

:class:`FileKeyStore` keeps the key as unencrypted PKCS#8 PEM in ``<directory>/pending.key``,
0600 in a 0700 directory, written atomically (temporary file, fsync, rename, fsync of the
directory), so a kill at any moment leaves either no key or the whole key.
"""

from __future__ import annotations

import abc
import enum
from pathlib import Path
from typing import TypeAlias

import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from ztp_daemon.csr import CsrSubject, build_csr
from ztp_daemon.errors import StorageError
from ztp_daemon.state import atomic_write, ensure_private_directory, read_if_present

__all__ = ["FileKeyHandle", "FileKeyStore", "KeyHandle", "KeyStore", "KeyType"]

_log = structlog.get_logger()

_PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class KeyType(enum.Enum):
    """The key types AWS IoT accepts in a CSR that this daemon can make."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    def generate(self) -> _PrivateKey:
        """Make a new private key of this type."""
        match self:
            case KeyType.EC_P256:
                return ec.generate_private_key(ec.SECP256R1())
            case KeyType.EC_P384:
                return ec.generate_private_key(ec.SECP384R1())
            case KeyType.RSA_2048:
                return rsa.generate_private_key(public_exponent=65537, key_size=2048)
            case KeyType.RSA_3072:
                return rsa.generate_private_key(public_exponent=65537, key_size=3072)

    @classmethod
    def of(cls, key: object) -> KeyType | None:
        """The type of an existing private key, or ``None`` if it is none of ours."""
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return {"secp256r1": cls.EC_P256, "secp384r1": cls.EC_P384}.get(key.curve.name)
        if isinstance(key, rsa.RSAPrivateKey):
            return {2048: cls.RSA_2048, 3072: cls.RSA_3072}.get(key.key_size)
        return None


class KeyHandle(abc.ABC):
    """One private key held by a store."""

    @property
    @abc.abstractmethod
    def key_type(self) -> KeyType:
        """The key's type."""

    @property
    @abc.abstractmethod
    def public_key(self) -> PublicKeyTypes:
        """The public half, which the certificate must carry."""

    @property
    @abc.abstractmethod
    def reference(self) -> str:
        """Where the key lives (a path, a ``pkcs11:`` URI): what a TLS stack is given."""

    @abc.abstractmethod
    def sign_csr(self, subject: CsrSubject) -> str:
        """Sign a CSR for ``subject`` with this key (SHA-256) and return it in PEM."""

    @abc.abstractmethod
    def private_key_pem(self) -> bytes | None:
        """The key as PKCS#8 PEM to copy into a bundle, or ``None`` if it cannot leave its store."""

    def __repr__(self) -> str:
        # Never print key material, whatever a subclass holds.
        return f"<{type(self).__name__} {self.key_type.value} at {self.reference}>"


class KeyStore(abc.ABC):
    """Makes the gateway's key once and keeps it until provisioning is done."""

    @abc.abstractmethod
    def load(self) -> KeyHandle | None:
        """Return the stored key, or ``None`` if there is none.

        Raises:
            StorageError: a key is stored but cannot be read or is not a usable key.
        """

    @abc.abstractmethod
    def load_or_create(self) -> KeyHandle:
        """Return the stored key, making and storing a new one only if there is none.

        Raises:
            StorageError: the key cannot be read, made or stored.
        """

    @abc.abstractmethod
    def discard(self) -> None:
        """Remove the stored key (it now lives in a committed bundle); idempotent.

        Raises:
            StorageError: it exists but cannot be removed.
        """


class FileKeyHandle(KeyHandle):
    """A key loaded from (or written to) a PEM file.

    Args:
        key: the private key.
        path: the file it is stored in.
    """

    __slots__ = ("_key", "_path", "_type")

    def __init__(self, key: _PrivateKey, path: Path) -> None:
        key_type = KeyType.of(key)
        if key_type is None:
            raise ValueError("unsupported key type")
        self._key = key
        self._path = path
        self._type = key_type

    @property
    def key_type(self) -> KeyType:
        """The key's type."""
        return self._type

    @property
    def public_key(self) -> PublicKeyTypes:
        """The public half."""
        return self._key.public_key()

    @property
    def reference(self) -> str:
        """The key file's path."""
        return str(self._path)

    def sign_csr(self, subject: CsrSubject) -> str:
        """Sign a CSR for ``subject`` (SHA-256)."""
        return build_csr(self._key, subject)

    def private_key_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM (for the bundle, written 0600)."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class FileKeyStore(KeyStore):
    """The key in a 0600 PEM file in a 0700 directory.

    Args:
        directory: where the key file lives (the state directory, or a directory under it).
        key_type: the type of a new key; an existing key of another type is kept (with a warning),
            because replacing it would orphan a request already sent for it.
        file_name: the key file's name.
    """

    def __init__(
        self,
        directory: Path,
        *,
        key_type: KeyType = KeyType.EC_P256,
        file_name: str = "pending.key",
    ) -> None:
        self._directory = directory
        self._key_type = key_type
        self._path = directory / file_name

    @property
    def path(self) -> Path:
        """The key file."""
        return self._path

    def load(self) -> FileKeyHandle | None:
        """Return the stored key, or ``None``; see :meth:`KeyStore.load`."""
        data = read_if_present(self._path)
        if data is None:
            return None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # The library's message says nothing about the content; keep it anyway short.
            raise StorageError(str(self._path), "parse", "not an unencrypted PEM key") from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) or (
            KeyType.of(key) is None
        ):
            raise StorageError(
                str(self._path), "parse", "not an EC P-256/P-384 or RSA 2048/3072 key"
            )
        handle = FileKeyHandle(key, self._path)
        if handle.key_type is not self._key_type:
            _log.warning(
                "key_type_differs",
                path=str(self._path),
                stored=handle.key_type.value,
                configured=self._key_type.value,
            )
        return handle

    def load_or_create(self) -> FileKeyHandle:
        """Return the stored key, or make, store and return a new one."""
        existing = self.load()
        if existing is not None:
            _log.info("key_reused", path=str(self._path), key_type=existing.key_type.value)
            return existing
        ensure_private_directory(self._directory)
        handle = FileKeyHandle(self._key_type.generate(), self._path)
        atomic_write(self._path, handle.private_key_pem(), mode=0o600)
        _log.info("key_created", path=str(self._path), key_type=self._key_type.value)
        return handle

    def discard(self) -> None:
        """Remove the key file if it exists."""
        try:
            self._path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(str(self._path), "remove", exc.strerror or str(exc)) from exc
        _log.info("key_discarded", path=str(self._path))
