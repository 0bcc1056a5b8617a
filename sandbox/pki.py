"""The sandbox's public-key infrastructure, made with ``cryptography``.

One sandbox CA stands in for the CA behind AWS IoT certificates: the moto fidelity layer signs
every CreateCertificateFromCsr result with it, and the sandbox IoT broker trusts it. The same CA
signs the brokers' server certificates (SAN ``localhost`` and ``127.0.0.1``) and the certificate
revocation list the IoT broker reloads when a certificate is deactivated or revoked.

Files are written once into the sandbox directory and reused on the next start, so a sandbox
restarted over the same directory keeps trusting the certificates it issued before.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["SandboxPki", "issue_certificate", "write_atomic"]

_VALIDITY = dt.timedelta(days=3650)
# Backdated so a certificate is valid at once, whatever small skew the clock has.
_BACKDATE = dt.timedelta(minutes=5)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` and permission bits ``mode``, atomically.

    Written to a temporary file beside it, fsynced and renamed over it, so a reader (mosquitto
    reloading, a test) sees the old file or the new one, never a torn one. The sandbox's private
    keys and password files go through here with 0600.

    Args:
        path: the file to replace.
        data: its new content.
        mode: its permission bits.

    Raises:
        OSError: a step failed; ``path`` is then unchanged.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.chmod(mode)  # O_CREAT's mode is filtered by the umask, and a stale file keeps its own
    tmp.replace(path)


def _write_private(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o644)


def issue_certificate(
    *,
    public_key: CertificatePublicKeyTypes,
    subject: x509.Name,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
    validity: dt.timedelta = _VALIDITY,
    server_names: Iterable[str] = (),
    client: bool = True,
) -> x509.Certificate:
    """Sign ``public_key`` under ``subject`` with the sandbox CA.

    Args:
        public_key: the subject's public key (any key type ``cryptography`` can sign for).
        subject: the subject name; AWS keeps the CSR's subject, and so does the sandbox.
        ca_cert: the issuing CA certificate.
        ca_key: the issuing CA's private key.
        now: the issuing time (the certificate is valid from a few minutes before it).
        validity: how long the certificate is valid.
        server_names: DNS names or IP addresses for a server certificate's SAN.
        client: whether the certificate may authenticate a TLS client.
    """
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    names = list(server_names)
    if names:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class SandboxPki:
    """The sandbox CA and the files derived from it, in one directory.

    Attributes:
        directory: where every file lives.
        ca_cert: the CA certificate.
        ca_key: the CA private key.
    """

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def ca_file(self) -> Path:
        """The CA certificate in PEM: what clients of either broker trust."""
        return self.directory / "ca.pem"

    @property
    def ca_key_file(self) -> Path:
        """The CA private key in PEM (0600): only the moto fidelity layer reads it."""
        return self.directory / "ca.key"

    @property
    def crl_file(self) -> Path:
        """The CRL in PEM that the IoT broker loads."""
        return self.directory / "crl.pem"

    @classmethod
    def load_or_create(cls, directory: Path, *, now: dt.datetime | None = None) -> SandboxPki:
        """Load the CA from ``directory``, or make a new one there (and an empty CRL)."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "ca.pem", directory / "ca.key"
        if cert_path.exists() and key_path.exists():
            ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                msg = f"{key_path} is not an EC private key"
                raise TypeError(msg)
            pki = cls(directory, ca_cert, loaded)
        else:
            pki = cls._create(directory, now or dt.datetime.now(dt.UTC))
        if not pki.crl_file.exists():
            pki.write_crl(())
        return pki

    @classmethod
    def _create(cls, directory: Path, now: dt.datetime) -> SandboxPki:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztp sandbox"),
                x509.NameAttribute(NameOID.COMMON_NAME, "ztp sandbox CA"),
            ]
        )
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        key_pem = ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(directory / "ca.key", key_pem)
        _write_public(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, ca_cert, ca_key)

    def server_certificate(self, name: str, *, now: dt.datetime | None = None) -> tuple[Path, Path]:
        """Make (or reuse) a broker server certificate with SAN localhost and 127.0.0.1.

        Returns:
            The certificate and key file paths, ``{name}.pem`` and ``{name}.key``.
        """
        cert_path, key_path = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        if cert_path.exists() and key_path.exists():
            return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_certificate(
            public_key=key.public_key(),
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
            now=now or dt.datetime.now(dt.UTC),
            server_names=("localhost", "127.0.0.1"),
            client=False,
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(key_path, key_pem)
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def sign(
        self,
        public_key: CertificatePublicKeyTypes,
        subject: x509.Name,
        *,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a client certificate for ``public_key`` under ``subject`` (what IoT issues)."""
        return issue_certificate(
            public_key=public_key,
            subject=subject,
            ca_cert=self.ca_cert,
            ca_key=self.ca_key,
            now=now or dt.datetime.now(dt.UTC),
        )

    def write_crl(self, revoked_serials: Iterable[int], *, now: dt.datetime | None = None) -> Path:
        """Rewrite the CRL with exactly ``revoked_serials`` and return its path.

        mosquitto reads the CRL at start and on SIGHUP; the caller sends the signal.
        """
        moment = now or dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.ca_cert.subject)
            .last_update(moment - _BACKDATE)
            .next_update(moment + dt.timedelta(days=30))
        )
        for serial in sorted(set(revoked_serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(moment - _BACKDATE)
                .build()
            )
        crl = builder.sign(self.ca_key, hashes.SHA256())
        _write_public(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_file
