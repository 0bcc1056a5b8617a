"""The certificate signing request: subject from the gateway's serial, SHA-256 signature.

The subject is ``CN=<serial>`` with optional ``O`` and ``OU``: every gateway asks for a certificate
that names it (the PoC asked for ``CN=ztp.semtech.com`` on every device). AWS IoT keeps the CSR's
subject in the certificate it issues, which is what lets the device check the CN on delivery.

The serial comes from the configuration, or from a file (``/sys/...``, a factory partition) or a
command (``cm info serial``); :func:`read_serial` reads it once at start-up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from shared.errors import ConfigError

__all__ = ["MAX_SERIAL_CHARS", "CsrSubject", "build_csr", "read_serial"]

#: X.520's upper bound for a common name.
MAX_SERIAL_CHARS = 64
_SERIAL_FORBIDDEN = frozenset("/+#")


def _printable(name: str, value: str, *, forbidden: frozenset[str] = frozenset()) -> None:
    if not 1 <= len(value) <= MAX_SERIAL_CHARS:
        raise ValueError(f"{name} must be 1..{MAX_SERIAL_CHARS} characters, got {len(value)}")
    bad = [c for c in value if not c.isprintable() or c in forbidden or c.isspace()]
    if bad:
        raise ValueError(f"{name} contains characters not allowed: {''.join(sorted(set(bad)))!r}")


@dataclass(frozen=True, slots=True)
class CsrSubject:
    """The subject of the CSR.

    Attributes:
        serial: the gateway's serial: the CN, and the AirVantage MQTT username and topic prefix,
            so no spaces and none of ``/ + #``.
        organization: the optional ``O``.
        organizational_unit: the optional ``OU``.
    """

    serial: str
    organization: str | None = None
    organizational_unit: str | None = None

    def __post_init__(self) -> None:
        _printable("serial", self.serial, forbidden=_SERIAL_FORBIDDEN)
        for name, value in (("organization", self.organization), ("ou", self.organizational_unit)):
            if value is not None and not (
                1 <= len(value) <= MAX_SERIAL_CHARS and value.isprintable()
            ):
                raise ValueError(f"{name} must be 1..{MAX_SERIAL_CHARS} printable characters")

    def name(self) -> x509.Name:
        """The X.509 name: ``O``, ``OU`` (when given), then ``CN``."""
        attributes = []
        if self.organization is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization))
        if self.organizational_unit is not None:
            attributes.append(
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.organizational_unit)
            )
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, self.serial))
        return x509.Name(attributes)


def build_csr(
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, subject: CsrSubject
) -> str:
    """Sign a CSR for ``subject`` with ``private_key`` (SHA-256).

    Args:
        private_key: an EC (P-256, P-384) or RSA (2048, 3072) private key.
        subject: the CSR's subject.

    Returns:
        The CSR in PEM, ending with a newline.
    """
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject.name())
        .sign(private_key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def read_serial(
    *,
    value: str | None = None,
    file: Path | None = None,
    command: Sequence[str] | None = None,
    timeout: float = 10.0,
) -> str:
    """Read the gateway's serial from exactly one source.

    Args:
        value: the serial itself, from the configuration.
        file: a file holding the serial (surrounding whitespace is stripped).
        command: a command (argument list, no shell) printing the serial on stdout.
        timeout: seconds the command may take.

    Returns:
        The serial, validated as a CSR subject CN.

    Raises:
        ConfigError: no source or several, an unreadable file, a failing command, or a serial
            that is not a valid CN (key ``device.serial``).
    """
    sources = [s for s in (value, file, command) if s is not None]
    if len(sources) != 1:
        raise ConfigError(
            "device.serial", "give exactly one of serial, serial_file, serial_command"
        )
    if file is not None:
        try:
            serial = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("device.serial_file", f"cannot read {file}: {exc}") from exc
    elif command is not None:
        serial = _run(list(command), timeout)
    else:
        serial = (value or "").strip()
    try:
        CsrSubject(serial)
    except ValueError as exc:
        raise ConfigError("device.serial", str(exc)) from exc
    return serial


def _run(argv: list[str], timeout: float) -> str:
    if not argv:
        raise ConfigError("device.serial_command", "empty command")
    try:
        # The command comes from the operator's own configuration file, never from a peer.
        done = subprocess.run(  # noqa: S603
            argv, capture_output=True, timeout=timeout, check=False, text=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError("device.serial_command", f"cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        raise ConfigError(
            "device.serial_command", f"{argv[0]} exited with status {done.returncode}"
        )
    return done.stdout.strip()
