"""The device daemon's configuration: a schema of frozen dataclasses, loaded by ``shared.config``.

One TOML file (``/etc/ztp/ztp.toml``) and ``ZTP_*`` environment overrides, checked at start-up
so a bad setting stops the daemon before it makes a key or opens a socket::

    [device]
    serial = "SN123"                 # or serial_file = "/sys/..." or serial_command = ["cm", ...]
    state_dir = "/var/lib/ztp"
    key_type = "ec-p256"             # ec-p384, rsa-2048, rsa-3072
    csr_organization = "Example"     # optional O and OU of the CSR
    csr_organizational_unit = "Gateways"

    [airvantage]
    host = "eu.airvantage.net"
    port = 8883
    tls = true
    ca_file = "/etc/ssl/certs/ca-certificates.crt"
    password_file = "/etc/ztp/airvantage-password"   # or ZTP_AIRVANTAGE_PASSWORD(_FILE)

    [verification]
    check_cn = true
    ca_bundle = "/etc/ztp/aws-issuer.pem"   # optional: the certificate must chain to it

    [retry]
    first = 60.0                     # seconds to wait for a delivery after the first send
    cap = 3600.0                     # the longest wait between sends

    [renewal]                        # certificate rotation (the ztp.renew command works anyway)
    enabled = true                   # renew automatically
    at_fraction = 0.6667             # once this fraction of the certificate's lifetime has passed
    jitter_fraction = 0.05           # plus or minus this fraction of the lifetime, per gateway

    [publisher]                      # the IoT publisher (#5); more keys may come
    enabled = true
    port = 8883
    ca_file = "/etc/ztp/AmazonRootCA1.pem"

    [log]
    style = "keyvalue"               # or json
    destination = "syslog"           # or stderr, stdout

Every environment variable is ``ZTP_<SECTION>_<FIELD>`` (``ZTP_AIRVANTAGE_PASSWORD_FILE``, as the
systemd unit sets it); ``ZTP_CONFIG`` names the file itself. The password is a
:class:`~shared.config.Secret`: it never prints, and never appears in an error.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509

from shared.airvantage import validate_serial
from shared.config import Secret, load_config
from shared.config import environment_help as shared_environment_help
from shared.errors import ConfigError, InvalidValueError
from ztp_daemon.csr import CsrSubject, read_serial
from ztp_daemon.keystore import KeyType
from ztp_daemon.machine import RenewalPolicy
from ztp_daemon.state import DEFAULT_STATE_DIRECTORY
from ztp_daemon.verify import VerifyPolicy

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "AirVantageSection",
    "DeviceConfig",
    "DeviceSection",
    "LogDestinationChoice",
    "LogSection",
    "LogStyleChoice",
    "PublisherSection",
    "RenewalSection",
    "RetrySection",
    "VerificationSection",
    "environment_help",
    "load_device_config",
]

ENV_PREFIX: Final = "ZTP"
CONFIG_ENV: Final = "ZTP_CONFIG"
DEFAULT_CONFIG_PATH: Final = Path("/etc/ztp/ztp.toml")
_PORT: Final = {"min": 1, "max": 65535}


class LogStyleChoice(enum.Enum):
    """How log lines look."""

    KEYVALUE = "keyvalue"
    JSON = "json"


class LogDestinationChoice(enum.Enum):
    """Where log lines go."""

    SYSLOG = "syslog"
    STDERR = "stderr"
    STDOUT = "stdout"


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """The gateway itself.

    Attributes:
        serial: the serial (CN of the CSR, AirVantage username and topic prefix).
        serial_file: a file holding the serial, instead of ``serial``.
        serial_command: a command (argument list, no shell) printing it, instead.
        state_dir: where the key, the state record and the credential bundles live (0700).
        key_type: the type of a new key (an existing key is kept, whatever its type).
        csr_organization: the CSR's optional ``O``.
        csr_organizational_unit: the CSR's optional ``OU``.
    """

    serial: str | None = None
    serial_file: Path | None = None
    serial_command: tuple[str, ...] | None = None
    state_dir: Path = DEFAULT_STATE_DIRECTORY
    key_type: KeyType = KeyType.EC_P256
    csr_organization: str | None = field(default=None, metadata={"max_length": 64})
    csr_organizational_unit: str | None = field(default=None, metadata={"max_length": 64})

    def __post_init__(self) -> None:
        given = [s for s in (self.serial, self.serial_file, self.serial_command) if s is not None]
        if len(given) > 1:
            raise ConfigError(
                "device.serial", "give only one of serial, serial_file, serial_command"
            )
        if self.serial_command is not None and not self.serial_command:
            raise ConfigError("device.serial_command", "must name a command")


@dataclass(frozen=True, slots=True)
class AirVantageSection:
    """The AirVantage device MQTT API.

    Attributes:
        host: the broker (``eu.airvantage.net`` or ``na.airvantage.net``).
        port: 8883 for TLS, 1883 plain.
        tls: use TLS (always, in production; plain MQTT is for the sandbox).
        ca_file: the CA to verify the broker with; the system trust store when unset.
        password: the system's MQTT password (or ``password_file``).
        keepalive: MQTT keep-alive, seconds.
        connect_timeout: bound on one connection attempt, seconds.
        publish_timeout: bound on one publish (until its PUBACK), seconds; past it the connection
            is dropped and made again.
        backoff_base: the first reconnect backoff ceiling, seconds.
        backoff_cap: the largest reconnect backoff ceiling, seconds.
        min_connect_interval: the least time between two connection attempts, seconds.
    """

    password: Secret = field(metadata={"min_length": 1, "max_length": 255})
    host: str = "eu.airvantage.net"
    port: int = field(default=8883, metadata=_PORT)
    tls: bool = True
    ca_file: Path | None = None
    keepalive: int = field(default=60, metadata={"min": 5, "max": 3600})
    connect_timeout: float = field(default=10.0, metadata={"min": 0.1, "max": 300})
    publish_timeout: float = field(default=10.0, metadata={"min": 0.1, "max": 300})
    backoff_base: float = field(default=1.0, metadata={"min": 0.01, "max": 3600})
    backoff_cap: float = field(default=300.0, metadata={"min": 0.01, "max": 86400})
    min_connect_interval: float = field(default=1.0, metadata={"min": 0.0, "max": 3600})

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("airvantage.host", "must not be empty")
        if self.backoff_base > self.backoff_cap:
            raise ConfigError("airvantage.backoff_base", "must not exceed backoff_cap")
        if self.ca_file is not None and not self.tls:
            raise ConfigError("airvantage.ca_file", "set only with tls = true")


@dataclass(frozen=True, slots=True)
class VerificationSection:
    """The switchable checks on a delivered certificate (key binding and validity always apply).

    Attributes:
        check_cn: require the certificate's subject CN to equal the serial.
        ca_bundle: a PEM bundle the certificate must chain to; unset turns the check off.
        clock_skew: seconds the validity window is widened by (gateways boot with poor clocks).
    """

    check_cn: bool = True
    ca_bundle: Path | None = None
    clock_skew: float = field(default=300.0, metadata={"min": 0.0, "max": 86400})


@dataclass(frozen=True, slots=True)
class RetrySection:
    """When the request is sent again.

    Attributes:
        first: seconds to wait for a delivery after the first send.
        cap: the longest wait between later sends (exponential backoff, full jitter).
    """

    first: float = field(default=60.0, metadata={"min": 0.01, "max": 86400})
    cap: float = field(default=3600.0, metadata={"min": 0.01, "max": 7 * 86400})

    def __post_init__(self) -> None:
        if self.first > self.cap:
            raise ConfigError("retry.first", "must not exceed retry.cap")


@dataclass(frozen=True, slots=True)
class RenewalSection:
    """Automatic certificate renewal (rotation); the operator's ``ztp.renew`` works regardless.

    Attributes:
        enabled: renew automatically once ``at_fraction`` of the certificate's lifetime has
            passed (AWS IoT certificates are valid for decades, so this matters for private CAs).
        at_fraction: the fraction of the lifetime (``not_before`` to ``not_after``) after which
            renewal is due, in (0, 1); 2/3 as step-ca.
        jitter_fraction: plus or minus this fraction of the lifetime, drawn once per certificate,
            so gateways provisioned together do not renew together.
    """

    enabled: bool = True
    at_fraction: float = field(default=2 / 3, metadata={"min": 0.0, "max": 1.0})
    jitter_fraction: float = field(default=0.05, metadata={"min": 0.0, "max": 0.5})

    def __post_init__(self) -> None:
        if not 0 < self.at_fraction < 1:
            raise ConfigError("renewal.at_fraction", "must be between 0 and 1, both excluded")
        if self.jitter_fraction >= min(self.at_fraction, 1 - self.at_fraction):
            raise ConfigError(
                "renewal.jitter_fraction",
                "must be smaller than at_fraction and than 1 - at_fraction "
                "(the due time must stay inside the lifetime)",
            )

    def policy(self) -> RenewalPolicy | None:
        """The machine's renewal policy, or ``None`` when automatic renewal is off."""
        if not self.enabled:
            return None
        return RenewalPolicy(at_fraction=self.at_fraction, jitter_fraction=self.jitter_fraction)


@dataclass(frozen=True, slots=True)
class PublisherSection:
    """The IoT publisher started once provisioned (owned by #5; more keys may come).

    Attributes:
        enabled: start the publisher once provisioned.
        host: connect here instead of the delivered endpoint (the sandbox's broker).
        port: 8883, or 443 (ALPN ``x-amzn-mqtt-ca``).
        ca_file: the CA to trust for the IoT endpoint; the system trust store when unset.
        thing_name: the MQTT client id; the serial when unset.
        ingest_socket: the Unix socket other gateway programs write JSON lines to;
            ``<state_dir>/ingest.sock`` when unset.
        heartbeat_interval: seconds between health messages on ``dt/<thing>/health``; 0 turns
            the heartbeat off.
    """

    enabled: bool = True
    host: str | None = None
    port: int = field(default=8883, metadata=_PORT)
    ca_file: Path | None = None
    thing_name: str | None = field(default=None, metadata={"min_length": 1, "max_length": 128})
    ingest_socket: Path | None = None
    heartbeat_interval: float = field(default=60.0, metadata={"min": 0, "max": 86400})


@dataclass(frozen=True, slots=True)
class LogSection:
    """Logging.

    Attributes:
        style: ``keyvalue`` (syslog lines) or ``json``.
        destination: ``syslog`` (ident ``ztp``; stderr when there is no syslog socket),
            ``stderr`` or ``stdout``.
        level: debug, info, warning, error or critical.
        syslog_address: the syslog socket.
    """

    style: LogStyleChoice = LogStyleChoice.KEYVALUE
    destination: LogDestinationChoice = LogDestinationChoice.SYSLOG
    level: str = "info"
    syslog_address: Path = Path("/dev/log")

    def __post_init__(self) -> None:
        if self.level not in {"debug", "info", "warning", "error", "critical"}:
            raise ConfigError("log.level", "one of debug, info, warning, error, critical")


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The whole device daemon configuration.

    Attributes:
        airvantage: the AirVantage link (required: it holds the password).
        device: the gateway's identity and state directory.
        verification: certificate checks.
        retry: request retry timings.
        renewal: automatic certificate renewal.
        publisher: the IoT publisher.
        log: logging.
    """

    airvantage: AirVantageSection
    device: DeviceSection = field(default_factory=DeviceSection)
    verification: VerificationSection = field(default_factory=VerificationSection)
    retry: RetrySection = field(default_factory=RetrySection)
    renewal: RenewalSection = field(default_factory=RenewalSection)
    publisher: PublisherSection = field(default_factory=PublisherSection)
    log: LogSection = field(default_factory=LogSection)

    def read_serial(self) -> str:
        """Read the serial from the one configured source (runs ``serial_command``, if set).

        Returns:
            The serial, valid as a CN and as an MQTT username and topic level.

        Raises:
            ConfigError: no source, an unreadable file, a failing command, or a bad serial.
        """
        device = self.device
        serial = read_serial(
            value=device.serial, file=device.serial_file, command=device.serial_command
        )
        # read_serial checks the CN rules; the link needs the stricter topic-level alphabet.
        try:
            validate_serial(serial)
        except InvalidValueError as exc:
            raise ConfigError("device.serial", f"{exc.expected}") from exc
        return serial

    def csr_subject(self, serial: str) -> CsrSubject:
        """The CSR subject for ``serial`` with the configured O and OU.

        Raises:
            ConfigError: O or OU is not printable.
        """
        try:
            return CsrSubject(
                serial, self.device.csr_organization, self.device.csr_organizational_unit
            )
        except ValueError as exc:
            raise ConfigError("device.csr_organization", str(exc)) from exc

    def verify_policy(self) -> VerifyPolicy:
        """The verification policy, with the CA bundle read and parsed (blocking: reads a file).

        Raises:
            ConfigError: the CA bundle cannot be read or holds no certificate.
        """
        section = self.verification
        anchors: tuple[x509.Certificate, ...] = ()
        if section.ca_bundle is not None:
            try:
                anchors = tuple(x509.load_pem_x509_certificates(section.ca_bundle.read_bytes()))
            except OSError as exc:
                raise ConfigError(
                    "verification.ca_bundle", f"cannot read {section.ca_bundle}: {exc.strerror}"
                ) from exc
            except ValueError as exc:
                raise ConfigError(
                    "verification.ca_bundle", f"{section.ca_bundle} holds no PEM certificate"
                ) from exc
        return VerifyPolicy(
            check_subject_cn=section.check_cn,
            trust_anchors=anchors,
            clock_skew=dt.timedelta(seconds=section.clock_skew),
        )


def load_device_config(path: Path | None, env: Mapping[str, str] | None = None) -> DeviceConfig:
    """Load the configuration from a TOML file and ``ZTP_*`` environment variables.

    Args:
        path: the TOML file, or ``None`` for the environment alone.
        env: the environment; ``os.environ`` by default.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: the file is unreadable or invalid, a key is unknown, missing, of the wrong
            type or out of bounds, or a secret file cannot be read.
    """
    return load_config(
        DeviceConfig,
        path=path,
        env=os.environ if env is None else env,
        env_prefix=ENV_PREFIX,
        ignore_env=(CONFIG_ENV,),
    )


def environment_help() -> str:
    """One line per environment variable the configuration reads, for ``--help``."""
    return shared_environment_help(DeviceConfig, env_prefix=ENV_PREFIX, config_env=CONFIG_ENV)
