"""The cloud daemon's configuration: a schema of frozen dataclasses, loaded by ``shared.config``.

Environment variables ``ZTP_CLOUD_<SECTION>_<FIELD>`` (the ECS way), optionally over a TOML
file (``--config FILE`` or ``ZTP_CLOUD_CONFIG``), checked at start-up so a bad setting stops the
daemon before it opens a connection, with an error naming the key::

    [aws]
    region = "eu-west-1"
    endpoint_url = "http://127.0.0.1:5000"   # the sandbox's moto server; unset for AWS
    max_attempts = 1                          # botocore attempts; unset for botocore's default

    [kinesis]
    stream = "ztp-connector"
    start = "TRIM_HORIZON"                    # or LATEST, AT_TIMESTAMP (with start_timestamp)
    worker_id = "ztp-cloud-1"                 # default: hostname and pid

    [store]
    kind = "sqlite"                           # or dynamodb (lease_table, ledger_table)
    path = "/var/lib/ztp-cloud"               # SQLite files and the dead-letter file

    [iot]
    thing_name_template = "ztp-{serial}"
    policy_name = "ztp-device"
    tps = 15.0
    tps_per_api = ["CreateThing=100"]

    [airvantage]
    api_url = "https://eu.airvantage.net"
    client_id = "..."
    client_secret_file = "/run/secrets/airvantage"   # or ZTP_CLOUD_AIRVANTAGE_CLIENT_SECRET(_FILE)

    [http]
    host = "0.0.0.0"
    port = 8080

    [log]
    level = "info"

AWS credentials are not configuration here: botocore reads them from its usual chain (the ECS
task role, ``AWS_ACCESS_KEY_ID``...). The AirVantage client secret and password are
:class:`~shared.config.Secret`: they never print, and never appear in an error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cloud_daemon.airvantage import AirVantageClientConfig, AirVantageCredentials
from cloud_daemon.consumer import ConsumerConfig, StartPosition
from cloud_daemon.issuer import IssuerConfig
from shared.config import Secret, load_config
from shared.config import environment_help as shared_environment_help
from shared.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "ENV_PREFIX",
    "AirVantageSection",
    "AwsSection",
    "CloudConfig",
    "HttpSection",
    "IotSection",
    "KinesisSection",
    "LogLevel",
    "LogSection",
    "StoreKind",
    "StoreSection",
    "config_summary",
    "environment_help",
    "load_cloud_config",
]

ENV_PREFIX: Final = "ZTP_CLOUD"
CONFIG_ENV: Final = "ZTP_CLOUD_CONFIG"
_POSITIVE: Final = {"min": 0.001}
_MASK: Final = "[redacted]"


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class AwsSection:
    """Where AWS is.

    Attributes:
        region: the region; ``None`` for botocore's own default (``AWS_REGION``...).
        endpoint_url: one endpoint for every service (the sandbox's moto server).
        max_attempts: botocore's total attempts per call; ``None`` keeps botocore's default
            retries (production). The sandbox sets 1: moto answers 500 for what it lacks.
    """

    region: str | None = None
    endpoint_url: str | None = None
    max_attempts: int | None = field(default=None, metadata={"min": 1, "max": 20})

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError("aws.endpoint_url", "must be an http(s) URL")


@dataclass(frozen=True, slots=True)
class KinesisSection:
    """The stream the AirVantage connector writes into, and how it is read.

    Attributes:
        stream: the stream name.
        start: where a shard without a checkpoint starts.
        start_timestamp: ISO-8601 time with a zone, for ``AT_TIMESTAMP``.
        worker_id: this instance's name in the lease table and ledger (unique per instance).
        batch_limit: records per GetRecords call.
        poll_interval: least seconds between GetRecords calls on one shard (>= 0.2).
        max_idle_wait: the longest wait on a caught-up shard.
        retry_attempts: handler attempts for a failing record before it is dead-lettered.
        lease_duration: seconds a shard lease lasts without renewal.
        discovery_interval: seconds between shard listings.
        drain_timeout: on shutdown, seconds readers may take to finish their batch.
    """

    stream: str = field(metadata={"min_length": 1, "max_length": 128})
    start: StartPosition = StartPosition.TRIM_HORIZON
    start_timestamp: str | None = None
    worker_id: str = field(
        default_factory=_default_worker_id, metadata={"min_length": 1, "max_length": 128}
    )
    batch_limit: int = field(default=500, metadata={"min": 1, "max": 10_000})
    poll_interval: float = field(default=0.2, metadata={"min": 0.2})
    max_idle_wait: float = field(default=1.0, metadata={"min": 0.2})
    retry_attempts: int = field(default=5, metadata={"min": 1})
    lease_duration: float = field(default=10.0, metadata=_POSITIVE)
    discovery_interval: float = field(default=10.0, metadata=_POSITIVE)
    drain_timeout: float = field(default=5.0, metadata={"min": 0.0, "max": 12.0})

    def __post_init__(self) -> None:
        if self.start is StartPosition.AT_TIMESTAMP:
            if self.start_timestamp is None:
                raise ConfigError("kinesis.start_timestamp", "required with AT_TIMESTAMP")
            when = self.start_datetime
            if when is None or when.tzinfo is None:
                raise ConfigError("kinesis.start_timestamp", "must be ISO-8601 with a zone")
        if self.max_idle_wait < self.poll_interval:
            raise ConfigError("kinesis.max_idle_wait", "must be >= poll_interval")

    @property
    def start_datetime(self) -> dt.datetime | None:
        """``start_timestamp`` parsed, or ``None``.

        Raises:
            ConfigError: the text is not an ISO-8601 time.
        """
        if self.start_timestamp is None:
            return None
        try:
            return dt.datetime.fromisoformat(self.start_timestamp)
        except ValueError:
            raise ConfigError("kinesis.start_timestamp", "not an ISO-8601 time") from None


class StoreKind(enum.Enum):
    """Where leases, checkpoints and the issuance ledger live."""

    SQLITE = "sqlite"
    DYNAMODB = "dynamodb"


@dataclass(frozen=True, slots=True)
class StoreSection:
    """Leases, checkpoints, the issuance ledger and dead letters.

    Attributes:
        kind: ``sqlite`` (one instance) or ``dynamodb`` (several instances).
        path: a directory: the SQLite files (``leases.sqlite3``, ``ledger.sqlite3``) and
            ``dead-letters.jsonl`` go there.
        lease_table: the DynamoDB lease table (``dynamodb``).
        ledger_table: the DynamoDB ledger table (``dynamodb``).
        create_tables: create the DynamoDB tables at start when missing (sandbox, first run).
    """

    kind: StoreKind = StoreKind.SQLITE
    path: Path = Path("/var/lib/ztp-cloud")
    lease_table: str | None = None
    ledger_table: str | None = None
    create_tables: bool = False

    def __post_init__(self) -> None:
        if self.kind is StoreKind.DYNAMODB:
            for name in ("lease_table", "ledger_table"):
                if not getattr(self, name):
                    raise ConfigError(f"store.{name}", "required when store.kind is dynamodb")


@dataclass(frozen=True, slots=True)
class IotSection:
    """How certificates are issued in AWS IoT.

    Attributes:
        thing_name_template: the thing name, ``{serial}`` its only field.
        policy_name: the IoT policy attached to every certificate.
        endpoint: the data endpoint to announce instead of asking DescribeEndpoint.
        tps: calls per second per IoT API (AWS: 15).
        tps_per_api: overrides, ``Api=rate`` items (``CreateThing=100``).
        tps_margin: how far under each rate to pace, as a fraction (0.005 = 0.5 %), so clock
            jitter never puts one call too many into a second.
        intent_timeout: seconds after which an unresolved issuance intent is abandoned.
    """

    thing_name_template: str = "{serial}"
    policy_name: str = "ztp-device"
    endpoint: str | None = None
    tps: float = field(default=15.0, metadata=_POSITIVE)
    tps_per_api: tuple[str, ...] = ()
    tps_margin: float = field(default=0.005, metadata={"min": 0.0, "max": 0.5})
    intent_timeout: float = field(default=60.0, metadata=_POSITIVE)

    def __post_init__(self) -> None:
        self.rates()

    def rates(self) -> dict[str, float]:
        """``tps_per_api`` as a mapping.

        Raises:
            ConfigError: an item is not ``Api=positive number``.
        """
        rates: dict[str, float] = {}
        for item in self.tps_per_api:
            api, sep, text = item.partition("=")
            try:
                rate = float(text) if sep else 0.0
            except ValueError:
                rate = 0.0
            if not api.strip().isalnum() or not rate > 0:
                raise ConfigError("iot.tps_per_api", f"expected Api=rate, got {item[:40]!r}")
            rates[api.strip()] = rate
        return rates


@dataclass(frozen=True, slots=True)
class AirVantageSection:
    """The AirVantage REST API.

    Attributes:
        api_url: ``https://eu.airvantage.net`` (or the sandbox emulator).
        client_id: the OAuth client id.
        client_secret: its secret (or ``client_secret_file``).
        username: for the password grant, with ``password``; unset for client credentials.
        password: the user's password (or ``password_file``).
        company: the tenant uid, if any.
        request_timeout: seconds for one HTTP exchange.
        poll_interval: first seconds before a failed operation send is tried again (doubling).
        first_poll: seconds before an operation is first polled (doubling while pending): the
            device's status, read from the stream, normally settles the delivery before; a
            minute covers the backlog of a thousand gateways at IoT's quota.
        operation_timeout: seconds a delivery may stay pending before it is sent again.
        delivery_attempts: operations created for one delivery before giving up.
    """

    api_url: str
    client_id: str = field(metadata={"min_length": 1})
    client_secret: Secret = field(metadata={"min_length": 1})
    username: str | None = None
    password: Secret | None = None
    company: str | None = None
    request_timeout: float = field(default=15.0, metadata=_POSITIVE)
    poll_interval: float = field(default=2.0, metadata=_POSITIVE)
    first_poll: float = field(default=60.0, metadata=_POSITIVE)
    operation_timeout: float = field(default=600.0, metadata=_POSITIVE)
    delivery_attempts: int = field(default=3, metadata={"min": 1, "max": 100})

    def __post_init__(self) -> None:
        if not self.api_url.startswith(("http://", "https://")):
            raise ConfigError("airvantage.api_url", "must be an http(s) URL")
        if (self.username is None) != (self.password is None):
            raise ConfigError("airvantage.username", "username and password go together")


@dataclass(frozen=True, slots=True)
class HttpSection:
    """The health and metrics server.

    Attributes:
        host: the address to bind.
        port: the port (0 picks a free one; the ``service.ready`` event says which).
        probe_timeout: seconds one readiness probe of AWS or AirVantage may take.
    """

    host: str = "0.0.0.0"  # noqa: S104 - a container's probes come from outside it
    port: int = field(default=8080, metadata={"min": 0, "max": 65535})
    probe_timeout: float = field(default=3.0, metadata=_POSITIVE)


class LogLevel(enum.Enum):
    """The lowest level logged."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class LogSection:
    """Logging (JSON lines on stdout).

    Attributes:
        level: the lowest level logged.
    """

    level: LogLevel = LogLevel.INFO


@dataclass(frozen=True, slots=True)
class CloudConfig:
    """Everything ``ztp-cloud`` needs.

    Attributes:
        kinesis: the stream.
        airvantage: the REST API.
        aws: where AWS is.
        store: leases, checkpoints, ledger.
        iot: issuance.
        http: health and metrics.
        log: logging.
        shutdown_timeout: seconds from SIGTERM to exit, at most (30 at the very most).
    """

    kinesis: KinesisSection
    airvantage: AirVantageSection
    aws: AwsSection = field(default_factory=AwsSection)
    store: StoreSection = field(default_factory=StoreSection)
    iot: IotSection = field(default_factory=IotSection)
    http: HttpSection = field(default_factory=HttpSection)
    log: LogSection = field(default_factory=LogSection)
    shutdown_timeout: float = field(default=25.0, metadata={"min": 1.0, "max": 30.0})

    def __post_init__(self) -> None:
        # The consumer may wait drain_timeout for discovery, then again for its readers.
        if 2 * self.kinesis.drain_timeout >= self.shutdown_timeout:
            raise ConfigError("kinesis.drain_timeout", "twice it must be < shutdown_timeout")
        # Build the components' own settings once, so their checks run at start too.
        self.consumer_config()
        self.issuer_config()
        self.airvantage_config()

    def consumer_config(self) -> ConsumerConfig:
        """The Kinesis consumer's settings.

        Raises:
            ConfigError: a setting the consumer refuses.
        """
        section = self.kinesis
        return ConsumerConfig(
            stream_name=section.stream,
            worker_id=section.worker_id,
            start=section.start,
            start_timestamp=section.start_datetime,
            batch_limit=section.batch_limit,
            poll_interval=section.poll_interval,
            max_idle_wait=section.max_idle_wait,
            retry_attempts=section.retry_attempts,
            lease_duration=section.lease_duration,
            discovery_interval=section.discovery_interval,
            drain_timeout=section.drain_timeout,
        )

    def issuer_config(self) -> IssuerConfig:
        """The IoT issuer's settings.

        Raises:
            ConfigError: a template or name the issuer refuses.
        """
        return IssuerConfig(
            worker_id=self.kinesis.worker_id,
            thing_name_template=self.iot.thing_name_template,
            policy_name=self.iot.policy_name,
            endpoint_override=self.iot.endpoint,
            intent_timeout=self.iot.intent_timeout,
        )

    def airvantage_config(self) -> AirVantageClientConfig:
        """The AirVantage client's settings.

        Raises:
            ConfigError: a setting the client refuses.
        """
        section = self.airvantage
        return AirVantageClientConfig(
            base_url=section.api_url,
            credentials=AirVantageCredentials(
                section.client_id, section.client_secret, section.username, section.password
            ),
            company=section.company,
            request_timeout=section.request_timeout,
            poll_interval=section.poll_interval,
            operation_timeout=section.operation_timeout,
            delivery_attempts=section.delivery_attempts,
        )


def load_cloud_config(path: Path | None, env: Mapping[str, str]) -> CloudConfig:
    """Load and check the configuration.

    Args:
        path: the TOML file, or ``None`` for the environment alone.
        env: the environment.

    Returns:
        The checked configuration.

    Raises:
        ConfigError: a key is unknown, missing or invalid (the error names it).
    """
    return load_config(
        CloudConfig, path=path, env=env, env_prefix=ENV_PREFIX, ignore_env=(CONFIG_ENV,)
    )


def environment_help() -> str:
    """The environment variables, one per line with the key each sets (for ``--help``)."""
    return shared_environment_help(CloudConfig, env_prefix=ENV_PREFIX, config_env=CONFIG_ENV)


def _plain(value: Any) -> Any:
    if isinstance(value, Secret):
        return _MASK
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def config_summary(config: CloudConfig) -> dict[str, Any]:
    """The configuration as JSON-ready data, every secret masked (for ``check-config``).

    Args:
        config: the loaded configuration.

    Returns:
        Nested dicts keyed like the TOML file.
    """

    def section(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for fld in dataclasses.fields(obj):
            value = getattr(obj, fld.name)
            is_section = dataclasses.is_dataclass(value) and not isinstance(value, type)
            out[fld.name] = section(value) if is_section else _plain(value)
        return out

    return section(config)
