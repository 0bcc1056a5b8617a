"""The AWS-fidelity patch layer applied to moto 5.2.5 before its server starts.

Stock moto deviates from AWS where this project depends on AWS (DESIGN.md §5). Each function named
``_restore_*`` below restores one documented AWS behaviour by replacing one or two moto methods;
:func:`install` applies them all, after :func:`check_moto_version` has refused any other moto.
The patched methods run inside moto's threaded server; :class:`SerialisingApp` serialises the
requests of each AWS service, so the models never see two requests at once.

Runtime knobs (throttling on or off, iterator lifetime, IoT rates) live in :class:`FidelityConfig`,
an immutable value that :class:`SandboxState` swaps whole when a test posts a new one.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sandbox.brokers import log_shows_reload, log_size
from sandbox.pki import SandboxPki
from shared.errors import ConfigError

__all__ = [
    "AWS_CERTIFICATE_STATUSES",
    "MOTO_VERSION",
    "FidelityConfig",
    "RateWindow",
    "SandboxState",
    "SerialisingApp",
    "check_moto_version",
    "install",
]

MOTO_VERSION: Final = "5.2.5"

#: Every value of IoT's CertificateStatus enum (UpdateCertificate rejects anything else).
AWS_CERTIFICATE_STATUSES: Final = frozenset(
    {"ACTIVE", "INACTIVE", "REVOKED", "PENDING_TRANSFER", "REGISTER_INACTIVE", "PENDING_ACTIVATION"}
)
# AWS documents that setting these two through UpdateCertificate throws: IoT uses them internally.
_INTERNAL_STATUSES: Final = frozenset({"PENDING_TRANSFER", "PENDING_ACTIVATION"})
_GET_RECORDS_MAX: Final = 10_000
_GET_RECORDS_MAX_BYTES: Final = 10 * 1024 * 1024
_LIST_SHARDS_PAGE_MAX: Final = 1000  # AWS returns at most 1,000 shards per page
_EC_CURVES: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
# A reload shows in mosquitto's log within one turn of its loop (at most about 100 ms when idle).
_RESIGNAL_SECONDS: Final = 0.25
_RELOAD_CONFIRM_SECONDS: Final = 10.0

_log = structlog.get_logger()


def check_moto_version() -> None:
    """Refuse to patch a moto other than the one the layer was written against.

    Raises:
        ConfigError: the installed moto is not :data:`MOTO_VERSION`.
    """
    import moto  # noqa: PLC0415 - imported late so a missing moto fails here, with context

    if moto.__version__ != MOTO_VERSION:
        raise ConfigError(
            "moto",
            f"the sandbox fidelity layer is pinned to moto {MOTO_VERSION}, found "
            f"{moto.__version__}: re-check every _restore_* function before moving the pin",
        )


@dataclass(frozen=True, slots=True)
class FidelityConfig:
    """The sandbox's fault knobs; the defaults are AWS's published quotas with faults off.

    Attributes:
        kinesis_throttling: raise ProvisionedThroughputExceededException past the shard quotas.
        get_records_per_second: GetRecords calls per shard per second (AWS: 5).
        write_records_per_second: records written per shard per second (AWS: 1,000).
        write_bytes_per_second: bytes written per shard per second (AWS: 1 MiB).
        iterator_lifetime: seconds a shard iterator stays valid (AWS: 300); 0 disables expiry.
        list_shards_token_lifetime: seconds a ListShards ``NextToken`` stays valid (AWS: 300);
            0 disables expiry.
        iot_throttling: raise ThrottlingException past ``iot_tps`` per IoT API.
        iot_tps: default transactions per second per IoT API (AWS: 15 for the calls we make).
        iot_tps_per_api: per-API overrides, by operation name (``CreateCertificateFromCsr``).
    """

    kinesis_throttling: bool = False
    get_records_per_second: int = 5
    write_records_per_second: int = 1000
    write_bytes_per_second: int = 1024 * 1024
    iterator_lifetime: float = 300.0
    list_shards_token_lifetime: float = 300.0
    iot_throttling: bool = False
    iot_tps: float = 15.0
    iot_tps_per_api: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "get_records_per_second",
            "write_records_per_second",
            "write_bytes_per_second",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(name, "must be an integer >= 1")
        for name in ("kinesis_throttling", "iot_throttling"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, "must be a boolean")
        for name in ("iterator_lifetime", "list_shards_token_lifetime"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ConfigError(name, "must be a number of seconds >= 0")
        rates = {"iot_tps": self.iot_tps, **self.iot_tps_per_api}
        for name, rate in rates.items():
            # The window is one second wide: a rate below 1 would never admit anything.
            if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 1:
                raise ConfigError(name, "must be at least 1 transaction per second")
        # A private copy: the frozen value must not change under a caller's dict.
        object.__setattr__(self, "iot_tps_per_api", dict(self.iot_tps_per_api))

    def tps_for(self, api: str) -> float:
        """The IoT rate in force for ``api``."""
        return self.iot_tps_per_api.get(api, self.iot_tps)

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON-ready data (what ``/_sandbox/config`` answers)."""
        data = asdict(self)
        data["iot_tps_per_api"] = dict(self.iot_tps_per_api)
        return data

    def updated(self, changes: Mapping[str, Any]) -> FidelityConfig:
        """Return a copy with ``changes`` applied.

        Raises:
            ConfigError: an unknown knob, or a value the knob does not accept.
        """
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(unknown[0], f"unknown sandbox knob; known: {sorted(known)}")
        return replace(self, **changes)


class RateWindow:
    """Events admitted over the last second, against a count and a size budget.

    Pure: the caller passes the clock reading, so tests drive it without sleeping.
    """

    __slots__ = ("_count", "_events", "_size")

    def __init__(self) -> None:
        self._events: deque[tuple[float, int, int]] = deque()
        self._count = 0
        self._size = 0

    def admit(
        self, now: float, *, count: int, size: int, max_count: float, max_size: float
    ) -> bool:
        """Record the event and return True if it fits both budgets; otherwise change nothing."""
        while self._events and self._events[0][0] <= now - 1.0:
            _, old_count, old_size = self._events.popleft()
            self._count -= old_count
            self._size -= old_size
        if self._count + count > max_count or self._size + size > max_size:
            return False
        self._events.append((now, count, size))
        self._count += count
        self._size += size
        return True


class SandboxState:
    """What the patches share: the CA, the knobs, rate windows and the revocation list.

    Every mutation happens under :class:`SerialisingApp`'s per-service lock, or under
    :attr:`lock` for the state shared by several services (the rate windows, the CRL).

    Args:
        pki: the sandbox CA that signs certificates and the CRL.
        iot_endpoint_host: what DescribeEndpoint answers for the data endpoint.
        iot_broker_pid_file: the IoT broker's pid file, signalled (SIGHUP) after a CRL change.
        config: the knobs in force at start and after every reset.
        clock: a monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        pki: SandboxPki,
        iot_endpoint_host: str = "localhost",
        iot_broker_pid_file: Path | None = None,
        config: FidelityConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pki = pki
        self.iot_endpoint_host = iot_endpoint_host
        self.iot_broker_pid_file = iot_broker_pid_file
        self.initial_config = config or FidelityConfig()
        self.config = self.initial_config
        self.clock = clock
        self.lock = threading.Lock()
        self._windows: dict[tuple[str, ...], RateWindow] = {}
        # Certificate ARN -> serial, for every sandbox-issued certificate that must not connect:
        # not ACTIVE, or deleted (a deleted certificate is unknown to IoT, so it is refused too).
        self._refused: dict[str, int] = {}

    def reset(self) -> None:
        """Forget rate windows and refusals, restore the start-up knobs, rewrite an empty CRL."""
        with self.lock:
            self.config = self.initial_config
            self._windows.clear()
            self._refused.clear()
        self._publish_crl()

    def admit(
        self,
        key: tuple[str, ...],
        *,
        count: int,
        size: int,
        max_count: float,
        max_size: float = float("inf"),
    ) -> bool:
        """Charge one event to the rate window ``key``; False when the budget is spent."""
        with self.lock:
            window = self._windows.setdefault(key, RateWindow())
            return window.admit(
                self.clock(), count=count, size=size, max_count=max_count, max_size=max_size
            )

    def set_refused(self, arn: str, certificate_pem: str, *, refused: bool) -> None:
        """Record whether a certificate may connect, and republish the CRL if that changed."""
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        try:
            cert.verify_directly_issued_by(self.pki.ca_cert)
        except (InvalidSignature, ValueError, TypeError):
            return  # a CRL only speaks for its own issuer's serials
        with self.lock:
            before = self._refused.get(arn)
            if refused:
                self._refused[arn] = cert.serial_number
            else:
                self._refused.pop(arn, None)
            changed = before != self._refused.get(arn)
        if changed:
            self._publish_crl()

    def _publish_crl(self) -> None:
        with self.lock:
            serials = sorted(self._refused.values())
            self.pki.write_crl(serials)
        _log.info("sandbox.crl_written", revoked=len(serials))
        self._signal_broker()

    def _signal_broker(self) -> None:
        """SIGHUP the IoT broker so it reloads the CRL (mosquitto rereads ``crlfile`` on HUP).

        mosquitto loses a SIGHUP that arrives while it is already reloading, so a thread watches
        the broker's log and signals again until a reload that began after the CRL was written
        shows there.
        """
        if self.iot_broker_pid_file is None:
            return
        # The broker writes its log beside its pid file, under the same name (sandbox.brokers).
        log_file = self.iot_broker_pid_file.with_suffix(".log")
        offset = log_size(log_file)
        try:
            pid = int(self.iot_broker_pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            # The broker may not be running (yet): the CRL file is still right for its next start.
            _log.warning("sandbox.broker_not_signalled", error=str(exc))
            return
        _log.info("sandbox.broker_signalled", pid=pid)
        threading.Thread(
            target=_confirm_reload, args=(pid, log_file, offset), name="crl-reload", daemon=True
        ).start()


def _confirm_reload(pid: int, log_file: Path, offset: int) -> None:
    """Signal ``pid`` again until its log shows a reload past ``offset`` (bounded)."""
    deadline = time.monotonic() + _RELOAD_CONFIRM_SECONDS
    while time.monotonic() < deadline:
        time.sleep(_RESIGNAL_SECONDS)
        if log_shows_reload(log_file, offset):
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError:
            return  # the broker is gone; its next start reads the CRL as written
    _log.warning("sandbox.broker_reload_unconfirmed", pid=pid, seconds=_RELOAD_CONFIRM_SECONDS)


def _replace(owner: type, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Put ``function`` in place of ``owner.name`` and return what was there.

    Raises:
        ConfigError: moto no longer has that attribute (a moto change the pin did not catch).
    """
    original = getattr(owner, name, None)
    if original is None:
        raise ConfigError("moto", f"{owner.__qualname__}.{name} is gone: re-check the patch layer")
    setattr(owner, name, function)
    return original  # type: ignore[no-any-return]


# --------------------------------------------------------------------------------------------
# Requests: one at a time per service.


def _service_of(environ: Mapping[str, Any]) -> str:
    """The SigV4 signing service of a request (``kinesis``, ``dynamodb``, ``iot``) or ``other``."""
    auth = str(environ.get("HTTP_AUTHORIZATION", ""))
    try:
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0]
        return scope.split("/")[3].lower()
    except IndexError:
        return "other"


class SerialisingApp:
    """WSGI middleware: one request at a time per AWS service, control routes under ``/_sandbox``.

    moto's server is threaded and its models are not thread-safe: two concurrent PutRecords read
    the same "last sequence number" and one overwrites the other, and a DynamoDB conditional put
    can check a condition another thread is about to falsify. AWS serialises per key; serialising
    per service is coarser but exact.

    Args:
        moto_app: moto's ``DomainDispatcherApplication``.
        control: handles ``/_sandbox/...``: ``(method, path, body) -> (status, json data)``.
    """

    def __init__(
        self,
        moto_app: Callable[..., Iterable[bytes]],
        control: Callable[[str, str, bytes], tuple[int, object]],
    ) -> None:
        self._moto_app = moto_app
        self._control = control
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, service: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(service, threading.Lock())

    def all_locks(self) -> Iterator[threading.Lock]:
        """Every service lock, in a fixed order (a reset takes them all)."""
        with self._locks_guard:
            for name in ("dynamodb", "iot", "kinesis", "other"):
                self._locks.setdefault(name, threading.Lock())
            return iter([self._locks[name] for name in sorted(self._locks)])

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        """Serve one request (the WSGI entry point)."""
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith("/_sandbox/"):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            status, data = self._control(str(environ["REQUEST_METHOD"]), path, body)
            payload = json.dumps(data).encode()
            start_response(
                f"{status} {'OK' if status == 200 else 'Error'}",
                [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
            )
            return [payload]
        with self._lock(_service_of(environ)):
            # Drain the response inside the lock: moto renders lazily.
            return list(self._moto_app(environ, start_response))


# --------------------------------------------------------------------------------------------
# IoT.


def _restore_csr_signing(state: SandboxState) -> None:
    """CreateCertificateFromCsr signs the CSR's own key and subject with the sandbox CA.

    moto signs a fresh throw-away RSA key under an issuer that exists nowhere, ignores an invalid
    CSR, and ids the certificate by a hash of its PEM text. AWS keeps the CSR's key and subject,
    refuses CSRs that are malformed, badly signed or of an unsupported key type, ids the
    certificate by the SHA-256 of its DER encoding, and honours ``setAsActive`` (default false).
    """
    from moto.iot import models  # noqa: PLC0415 - moto loads only in the server process
    from moto.iot.exceptions import InvalidRequestException  # noqa: PLC0415

    def compute_cert_id(self: Any, certificate_pem: str) -> str:
        return str(self.compute_der_cert_id(certificate_pem))

    def create_certificate_from_csr(self: Any, csr: str, set_as_active: object) -> Any:
        try:
            request = x509.load_pem_x509_csr(str(csr).encode())
        except ValueError:
            raise InvalidRequestException("The certificate signing request is not valid.") from None
        if not request.is_signature_valid:
            raise InvalidRequestException("The certificate signing request signature is invalid.")
        key = request.public_key()
        supported = (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048) or (
            isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES)
        )
        if not supported:
            raise InvalidRequestException(
                "The CSR's key type is not supported: use RSA >= 2048 or EC P-256/P-384/P-521."
            )
        issued = state.pki.sign(key, request.subject)
        pem = issued.public_bytes(serialization.Encoding.PEM).decode()
        active = set_as_active is True or str(set_as_active).lower() == "true"
        cert = models.FakeCertificate(
            pem, "ACTIVE" if active else "INACTIVE", self.account_id, self.region_name
        )
        cert.validity_not_before = issued.not_valid_before_utc
        cert.validity_not_after = issued.not_valid_after_utc
        self.certificates[cert.certificate_id] = cert
        if not active:
            state.set_refused(cert.arn, pem, refused=True)
        return cert

    _replace(models.FakeCertificate, "compute_cert_id", compute_cert_id)
    _replace(models.IoTBackend, "create_certificate_from_csr", create_certificate_from_csr)


def _restore_stable_endpoint(state: SandboxState) -> None:
    """DescribeEndpoint answers the same host on every call: the sandbox IoT broker's.

    moto makes a new random host per call; AWS's endpoint is fixed per account, and a host only
    (the port is the protocol's: 8883, or 443 with ALPN).
    """
    from moto.iot import models  # noqa: PLC0415

    def endpoint_init(self: Any, endpoint_type: str, region_name: str) -> None:
        original_init(self, endpoint_type, region_name)  # keeps moto's type validation
        if endpoint_type in ("iot:Data-ATS", "iot:Data"):
            self.endpoint = state.iot_endpoint_host
        else:
            kind = endpoint_type.split(":", 1)[1].lower()
            self.endpoint = f"sandbox.{kind}.iot.{region_name}.amazonaws.com"

    original_init = _replace(models.FakeEndpoint, "__init__", endpoint_init)


def _restore_certificate_statuses(state: SandboxState) -> None:
    """UpdateCertificate takes only AWS's statuses, REVOKED is terminal, and the broker follows.

    moto accepts any string and lets REVOKED become ACTIVE again. AWS rejects unknown statuses and
    the two it reserves (PENDING_TRANSFER, PENDING_ACTIVATION), answers CertificateStateException
    for a move out of REVOKED, and refuses connections with a certificate that is not ACTIVE: the
    sandbox publishes that as a CRL and SIGHUPs the IoT broker. Deleting a certificate keeps its
    serial refused, as IoT no longer knows it.
    """
    from moto.core.utils import utcnow  # noqa: PLC0415
    from moto.iot import models  # noqa: PLC0415
    from moto.iot.exceptions import (  # noqa: PLC0415
        CertificateStateException,
        InvalidRequestException,
    )

    def update_certificate(self: Any, certificate_id: str, new_status: str) -> None:
        if new_status not in AWS_CERTIFICATE_STATUSES or new_status in _INTERNAL_STATUSES:
            raise InvalidRequestException(f"Invalid certificate status: {new_status!r}.")
        cert = self.describe_certificate(certificate_id)
        if cert.status == "REVOKED" and new_status != "REVOKED":
            raise CertificateStateException(
                "The certificate is revoked; its status can no longer change.", certificate_id
            )
        cert.status = new_status
        cert.last_modified_date = utcnow()
        state.set_refused(cert.arn, cert.certificate_pem, refused=new_status != "ACTIVE")

    def delete_certificate(self: Any, certificate_id: str, force_delete: bool) -> None:  # noqa: FBT001 - moto's signature
        cert = self.describe_certificate(certificate_id)
        original_delete(self, certificate_id, force_delete)
        state.set_refused(cert.arn, cert.certificate_pem, refused=True)

    _replace(models.IoTBackend, "update_certificate", update_certificate)
    original_delete = _replace(models.IoTBackend, "delete_certificate", delete_certificate)


def _restore_iot_throttling(state: SandboxState) -> None:
    """IoT answers ThrottlingException (HTTP 429) past its per-API rate, when switched on.

    moto never throttles; AWS IoT's control plane allows 15 TPS for CreateCertificateFromCsr,
    CreateThing, AttachThingPrincipal and AttachPolicy (DESIGN.md §4).
    """
    from moto.core.exceptions import JsonRESTError  # noqa: PLC0415
    from moto.iot.responses import IoTResponse  # noqa: PLC0415

    def call_action(self: Any) -> Any:
        config = state.config
        if config.iot_throttling:
            api = str(self._get_action())
            if not state.admit(("iot", api), count=1, size=0, max_count=config.tps_for(api)):
                error = JsonRESTError("ThrottlingException", "Rate exceeded")
                error.code = 429
                return 429, dict(error.get_headers()), error.description
        return original_call_action(self)

    original_call_action = _replace(IoTResponse, "call_action", call_action)


def _restore_thing_idempotence() -> None:
    """CreateThing on an existing name returns that thing, or refuses another configuration.

    moto replaces the thing: a new thingId, the type and attributes overwritten, the version back
    to 1, while its attached principals keep pointing at the replaced object. AWS documents that
    repeating CreateThing with the same name and configuration (thing type and attributes)
    succeeds and answers the existing thing (same ARN and id, nothing changed), and that the same
    name with another configuration raises ResourceAlreadyExistsException (HTTP 409).
    """
    from moto.iot import models  # noqa: PLC0415
    from moto.iot.exceptions import ResourceAlreadyExistsException  # noqa: PLC0415

    def create_thing(
        self: Any,
        thing_name: str,
        thing_type_name: str | None,
        attribute_payload: dict[str, Any] | None,
        billing_group_name: str | None = None,
    ) -> Any:
        existing = next((t for t in self.things.values() if t.thing_name == thing_name), None)
        if existing is None:
            return original_create_thing(
                self, thing_name, thing_type_name, attribute_payload, billing_group_name
            )
        # moto stores no payload as no attributes and no type as None: compare on those terms.
        attributes = (attribute_payload or {}).get("attributes") or {}
        current_type = existing.thing_type.thing_type_name if existing.thing_type else None
        if (thing_type_name or None) == current_type and attributes == existing.attributes:
            return existing
        raise ResourceAlreadyExistsException(
            f"Thing {thing_name} already exists in account with different attributes",
            existing.thing_id,
            existing.arn,
        )

    original_create_thing = _replace(models.IoTBackend, "create_thing", create_thing)


# --------------------------------------------------------------------------------------------
# Kinesis.


def _kinesis_error(error_type: str, message: str) -> Exception:
    """An error in AWS's JSON shape (``__type`` and ``message``), so botocore names the code."""
    from moto.core.exceptions import JsonRESTError  # noqa: PLC0415

    return JsonRESTError(error_type, message)


def _sequence_index(shard: Any) -> list[int]:
    """A shard's sequence numbers in order, kept beside moto's dict for bisecting."""
    index: list[int] | None = getattr(shard, "_sandbox_sequences", None)
    if index is None:
        index = list(shard.records)
        shard._sandbox_sequences = index
    return index


def _restore_reshard_routing() -> None:
    """Writes go to the open shard whose (inclusive) hash range holds the key; resharding moves
    no records.

    moto routes by the first shard in creation order, open or closed, so writes keep landing in a
    closed parent; its ranges exclude the ending hash key; SplitShard re-puts the parent's records
    and MergeShards copies both parents' records into the child. AWS leaves records where they
    were written (consumers read parents before children) and numbers records so a child's come
    after its parents'.
    """
    from moto.kinesis import models  # noqa: PLC0415
    from moto.kinesis.exceptions import InvalidArgumentError  # noqa: PLC0415
    from moto.utilities.utils import md5_hash  # noqa: PLC0415

    def get_shard_for_key(self: Any, partition_key: str, explicit_hash_key: str | None) -> Any:
        if not isinstance(partition_key, str) or not 1 <= len(partition_key) <= 256:
            raise InvalidArgumentError("PartitionKey must be 1 to 256 characters.")
        if explicit_hash_key:
            key = int(explicit_hash_key)
            if not 0 <= key < 2**128:
                raise InvalidArgumentError("ExplicitHashKey must be in [0, 2^128).")
        else:
            key = int(md5_hash(partition_key.encode()).hexdigest(), 16)
        for shard in self.shards.values():
            if shard.is_open and shard.starting_hash <= key <= shard.ending_hash:
                return shard
        raise InvalidArgumentError(f"No open shard holds hash key {key}.")

    def put_record(
        self: Any, partition_key: str, explicit_hash_key: str | None, data: str
    ) -> tuple[str, str]:
        shard = self.get_shard_for_key(partition_key, explicit_hash_key)
        sequence = getattr(self, "_sandbox_last_sequence", 0) + 1
        self._sandbox_last_sequence = sequence
        index = _sequence_index(shard)  # before the insert, or a fresh index holds it twice
        shard.records[sequence] = models.Record(
            partition_key, data, sequence, explicit_hash_key or ""
        )
        index.append(sequence)
        return str(sequence), shard.shard_id

    def next_shard_number(stream: Any) -> int:
        return int(max(s._shard_id for s in stream.shards.values())) + 1

    def split_shard(self: Any, shard_to_split: str, new_starting_hash_key: str) -> None:
        parent = self.shards[shard_to_split]
        new_start = int(new_starting_hash_key)
        # AWS's bound, as its error message words it: above StartingHashKey + 1, below the end.
        if not parent.starting_hash + 1 < new_start < parent.ending_hash:
            raise InvalidArgumentError(
                f"NewStartingHashKey {new_start} is not inside shard {shard_to_split}'s range."
            )
        if not parent.is_open:
            raise InvalidArgumentError(f"Shard {shard_to_split} has already been split or merged.")
        number = next_shard_number(self)
        for offset, (start, end) in enumerate(
            ((parent.starting_hash, new_start - 1), (new_start, parent.ending_hash))
        ):
            child = models.Shard(number + offset, start, end, parent=parent.shard_id)
            self.shards[child.shard_id] = child
        parent.is_open = False

    def merge_shards(self: Any, shard_to_merge: str, adjacent_shard_to_merge: str) -> None:
        first, second = self.shards[shard_to_merge], self.shards[adjacent_shard_to_merge]
        low, high = sorted((first, second), key=lambda s: s.starting_hash)
        if low.ending_hash + 1 != high.starting_hash:
            raise InvalidArgumentError(
                f"Shards {shard_to_merge} and {adjacent_shard_to_merge} are not adjacent."
            )
        if not (first.is_open and second.is_open):
            raise InvalidArgumentError("A shard to merge has already been split or merged.")
        child = models.Shard(
            next_shard_number(self),
            low.starting_hash,
            high.ending_hash,
            parent=first.shard_id,
            adjacent_parent=second.shard_id,
        )
        self.shards[child.shard_id] = child
        first.is_open = False
        second.is_open = False

    _replace(models.Stream, "get_shard_for_key", get_shard_for_key)
    _replace(models.Stream, "put_record", put_record)
    _replace(models.Stream, "split_shard", split_shard)
    _replace(models.Stream, "merge_shards", merge_shards)


def _encode_iterator(stream_name: str, shard_id: str, after: int, issued: float) -> str:
    raw = f"{stream_name}:{shard_id}:{after}:{issued!r}".encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_iterator(iterator: str) -> tuple[str, str, int, float]:
    try:
        stream_name, shard_id, after, issued = (
            base64.urlsafe_b64decode(iterator.encode()).decode().split(":")
        )
        return stream_name, shard_id, int(after), float(issued)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _kinesis_error(
            "InvalidArgumentException", "ShardIterator is not a valid shard iterator."
        ) from None


def _within_bytes(records: list[Any], budget: int) -> list[Any]:
    """The longest prefix of ``records`` whose data fits ``budget`` bytes (at least one record)."""
    # moto keeps data base64-encoded: 4 characters per 3 bytes.
    if sum(len(r.data) for r in records) * 3 // 4 <= budget:
        return records
    size = 0
    for count, record in enumerate(records):
        size += len(record.data) * 3 // 4
        if count and size > budget:
            return records[:count]
    return records


def _restore_shard_iterators(state: SandboxState) -> None:
    """GetRecords: iterators expire, a closed shard ends, reads are bounded and may be throttled.

    moto's iterators never expire, a closed shard always hands out a NextShardIterator and never
    names its ChildShards, GetRecords without Limit returns the whole shard, and nothing is ever
    throttled. AWS expires an iterator 5 minutes after it was returned (ExpiredIteratorException),
    ends a closed shard read to its end with no NextShardIterator and its ChildShards, returns at
    most 10,000 records or 10 MiB per call, and throttles past 5 calls per second per shard.
    """
    from moto.core.responses import ActionResult  # noqa: PLC0415
    from moto.kinesis import models  # noqa: PLC0415
    from moto.kinesis.responses import KinesisResponse  # noqa: PLC0415

    def get_shard_iterator(self: Any, *args: Any, **kwargs: Any) -> str:
        moto_iterator = original_get_shard_iterator(self, *args, **kwargs)
        stream_name, shard_id, after = (
            base64.decodebytes(moto_iterator.encode()).decode().split(":")
        )
        return _encode_iterator(stream_name, shard_id, int(after), state.clock())

    def get_records(
        self: Any, stream_arn: str | None, shard_iterator: str, limit: int | None
    ) -> tuple[str | None, list[Any], int, list[dict[str, Any]]]:
        config = state.config
        stream_name, shard_id, after, issued = _decode_iterator(shard_iterator)
        now = state.clock()
        if config.iterator_lifetime and now - issued > config.iterator_lifetime:
            raise _kinesis_error(
                "ExpiredIteratorException",
                f"Iterator expired: it is older than {config.iterator_lifetime * 1000:.0f} ms.",
            )
        if limit is not None and not 1 <= limit <= _GET_RECORDS_MAX:
            raise _kinesis_error(
                "ValidationException",
                f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy "
                f"constraint: Member must have value between 1 and {_GET_RECORDS_MAX}",
            )
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        shard = stream.get_shard(shard_id)
        if config.kinesis_throttling and not state.admit(
            ("read", stream.stream_name, shard_id),
            count=1,
            size=0,
            max_count=config.get_records_per_second,
        ):
            raise _kinesis_error(
                "ProvisionedThroughputExceededException",
                f"Rate exceeded for shard {shard_id} in stream {stream.stream_name}.",
            )
        index = _sequence_index(shard)
        start = bisect.bisect_right(index, after)
        stored = shard.records
        records = [stored[n] for n in index[start : start + (limit or _GET_RECORDS_MAX)]]
        records = _within_bytes(records, _GET_RECORDS_MAX_BYTES)
        last = records[-1].sequence_number if records else after
        behind = 0
        if records and index:
            behind = int((shard.records[index[-1]].created_at - records[-1].created_at) * 1000)
        if not shard.is_open and start + len(records) >= len(index):
            children = [
                {
                    "ShardId": child.shard_id,
                    "ParentShards": [p for p in (child.parent, child.adjacent_parent) if p],
                    "HashKeyRange": {
                        "StartingHashKey": str(child.starting_hash),
                        "EndingHashKey": str(child.ending_hash),
                    },
                }
                for child in stream.shards.values()
                if shard_id in (child.parent, child.adjacent_parent)
            ]
            return None, records, 0, children
        return _encode_iterator(stream.stream_name, shard_id, last, now), records, behind, []

    def get_records_response(self: Any) -> Any:
        next_iterator, records, behind, children = self.kinesis_backend.get_records(
            self._get_param("StreamARN"),
            self._get_param("ShardIterator"),
            self._get_param("Limit"),
        )
        body: dict[str, Any] = {
            "Records": [record.to_json() for record in records],
            "MillisBehindLatest": behind,
        }
        if next_iterator is not None:
            body["NextShardIterator"] = next_iterator
        if children:
            body["ChildShards"] = children
        return ActionResult(body)

    original_get_shard_iterator = _replace(
        models.KinesisBackend, "get_shard_iterator", get_shard_iterator
    )
    _replace(models.KinesisBackend, "get_records", get_records)
    _replace(KinesisResponse, "get_records", get_records_response)


def _encode_page_token(stream_arn: str, after_shard: str, issued: float) -> str:
    raw = json.dumps({"stream": stream_arn, "after": after_shard, "issued": issued})
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_page_token(token: str) -> tuple[str, str, float]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(data["stream"]), str(data["after"]), float(data["issued"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        raise _kinesis_error(
            "InvalidArgumentException", "NextToken is not a valid ListShards token."
        ) from None


def _restore_list_shards_pagination(state: SandboxState) -> None:
    """ListShards pages with a ``NextToken`` that alone names the stream and the position.

    moto's paginator checks each token against the request's other parameters, so a follow-up
    call must repeat ``StreamName`` and one that sends the token alone (as AWS requires) fails
    with ``InvalidToken: Input inconsistent with page token``; moto also ignores
    ``ExclusiveStartShardId``, returns up to 10,000 shards per page and never expires a token.
    AWS refuses ``StreamName``/``StreamARN``/``ExclusiveStartShardId`` together with
    ``NextToken`` (InvalidArgumentException), returns at most 1,000 shards per page (also the
    default), starts after ``ExclusiveStartShardId`` when given, and expires a token 300 s after
    it was returned (ExpiredNextTokenException).
    """
    from moto.core.responses import ActionResult  # noqa: PLC0415
    from moto.kinesis.responses import KinesisResponse  # noqa: PLC0415

    def list_shards_response(self: Any) -> Any:
        stream_arn = self._get_param("StreamARN")
        stream_name = self._get_param("StreamName")
        token = self._get_param("NextToken")
        after = self._get_param("ExclusiveStartShardId")
        page = min(
            int(self._get_param("MaxResults") or _LIST_SHARDS_PAGE_MAX), _LIST_SHARDS_PAGE_MAX
        )
        now = state.clock()
        if token is not None:
            if stream_arn or stream_name or after:
                raise _kinesis_error(
                    "InvalidArgumentException",
                    "NextToken cannot be combined with StreamName, StreamARN or "
                    "ExclusiveStartShardId: the token names the stream.",
                )
            stream_arn, after, issued = _decode_page_token(str(token))
            lifetime = state.config.list_shards_token_lifetime
            if lifetime and now - issued > lifetime:
                raise _kinesis_error(
                    "ExpiredNextTokenException",
                    f"NextToken expired: it is older than {lifetime * 1000:.0f} ms.",
                )
        stream = self.kinesis_backend.describe_stream(
            stream_arn=stream_arn, stream_name=stream_name
        )
        shards = sorted(stream.shards.values(), key=lambda shard: shard.shard_id)
        if after:
            shards = [shard for shard in shards if shard.shard_id > after]
        body: dict[str, Any] = {"Shards": [shard.to_json() for shard in shards[:page]]}
        if len(shards) > page:
            body["NextToken"] = _encode_page_token(stream.arn, shards[page - 1].shard_id, now)
        return ActionResult(body)

    _replace(KinesisResponse, "list_shards", list_shards_response)


def _restore_write_throttling(state: SandboxState) -> None:
    """PutRecord/PutRecords are throttled past 1,000 records or 1 MiB per second per shard.

    moto never throttles. AWS raises ProvisionedThroughputExceededException from PutRecord, and
    fails individual entries of PutRecords (``ErrorCode``, ``FailedRecordCount``) while writing
    the others.
    """
    from moto.kinesis import models  # noqa: PLC0415
    from moto.kinesis.exceptions import (  # noqa: PLC0415
        RecordSizeExceedsLimit,
        TooManyRecords,
        TotalRecordsSizeExceedsLimit,
    )

    def admitted(stream: Any, shard: Any, size: int) -> bool:
        config = state.config
        if not config.kinesis_throttling:
            return True
        return state.admit(
            ("write", stream.stream_name, shard.shard_id),
            count=1,
            size=size,
            max_count=config.write_records_per_second,
            max_size=config.write_bytes_per_second,
        )

    def record_size(data: str, partition_key: str) -> int:
        return len(base64.b64decode(data or "")) + len(partition_key or "")

    def put_record(  # noqa: PLR0917 - moto's positional signature
        self: Any,
        stream_arn: str | None,
        stream_name: str | None,
        partition_key: str,
        explicit_hash_key: str | None,
        data: str,
    ) -> tuple[str, str]:
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        shard = stream.get_shard_for_key(partition_key, explicit_hash_key)
        if not admitted(stream, shard, record_size(data, partition_key)):
            raise _kinesis_error(
                "ProvisionedThroughputExceededException",
                f"Rate exceeded for shard {shard.shard_id} in stream {stream.stream_name}.",
            )
        result: tuple[str, str] = stream.put_record(partition_key, explicit_hash_key, data)
        return result

    def put_records(
        self: Any, stream_arn: str | None, stream_name: str | None, records: list[dict[str, Any]]
    ) -> dict[str, Any]:
        stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
        if len(records) > 500:
            raise TooManyRecords
        sizes = [record_size(r.get("Data", ""), r.get("PartitionKey", "")) for r in records]
        if sum(sizes) > 5 * 1024 * 1024:
            raise TotalRecordsSizeExceedsLimit
        for position, size in enumerate(sizes, start=1):
            if size > 1024 * 1024:
                raise RecordSizeExceedsLimit(position=position)
        results: list[dict[str, str]] = []
        for record, size in zip(records, sizes, strict=True):
            key, hash_key = record.get("PartitionKey", ""), record.get("ExplicitHashKey")
            shard = stream.get_shard_for_key(key, hash_key)
            if admitted(stream, shard, size):
                sequence, shard_id = stream.put_record(key, hash_key, record.get("Data", ""))
                results.append({"SequenceNumber": sequence, "ShardId": shard_id})
            else:
                results.append(
                    {
                        "ErrorCode": "ProvisionedThroughputExceededException",
                        "ErrorMessage": f"Rate exceeded for shard {shard.shard_id} in stream "
                        f"{stream.stream_name}.",
                    }
                )
        failed = sum(1 for r in results if "ErrorCode" in r)
        return {"FailedRecordCount": failed, "Records": results}

    _replace(models.KinesisBackend, "put_record", put_record)
    _replace(models.KinesisBackend, "put_records", put_records)


def install(state: SandboxState) -> None:
    """Apply every correction to moto's classes (once per process, before the server starts).

    Args:
        state: what the patched methods consult: the CA, the knobs, the broker's pid file.

    Raises:
        ConfigError: the installed moto is not the pinned version.
    """
    check_moto_version()
    _restore_csr_signing(state)
    _restore_stable_endpoint(state)
    _restore_certificate_statuses(state)
    _restore_iot_throttling(state)
    _restore_thing_idempotence()
    _restore_reshard_routing()
    _restore_shard_iterators(state)
    _restore_list_shards_pagination(state)
    _restore_write_throttling(state)
