"""The AWS IoT adapter: idempotent certificate issuance, the least-privilege policy, confirmation.

Theory of operation
-------------------
:class:`Issuer` receives an aiobotocore IoT client, an
:class:`~cloud_daemon.ledger.IssuanceLedger` and a :class:`~cloud_daemon.ratelimit.RateLimiter`
through its constructor. Every IoT call waits for room in its API's window first; a
``ThrottlingException`` holds the API's next call back by one slot, doubling on each further
throttle of the same call (:class:`~cloud_daemon.ratelimit.ThrottleRetry`), and is logged with
the API and the quota (``iot.throttled``). Botocore exceptions are translated once, here, into
:mod:`cloud_daemon.errors` types.

:meth:`Issuer.issue` for a vetted CSR of serial ``S``:

1. The thing name is ``thing_name_template.format(serial=S)``; the ledger key is that name and
   the SHA-256 of the CSR's public key.
2. :meth:`~cloud_daemon.ledger.IssuanceLedger.begin` writes the intent, conditionally.

   - An entry with a certificate: a redelivery. Nothing is minted; the stored certificate is
     returned (``reused=True``), attached first if the previous attempt stopped before that.
   - A fresh intent of another attempt: :class:`~cloud_daemon.errors.IssuanceInProgressError`
     (the consumer retries the record later).
   - An intent older than ``intent_timeout``: its worker died between the two writes. The
     intent is taken over (fencing the dead worker), certificates minted for this key in the
     last ``recovery_window`` seconds (found among the thing's principals and the account's
     newest certificates, matched by public key) are deactivated, and issuance starts afresh.

3. CreateThing (attributes ``serial`` and ``system_uid``), the policy created if missing,
   CreateCertificateFromCsr(``setAsActive``), the result written to the ledger at once
   (``MINTED``), then AttachThingPrincipal and AttachPolicy, and ``ISSUED``. A failure before
   the mint, or AWS refusing it, withdraws the intent (nothing was minted); a transport error
   or a cancellation during the mint leaves it for recovery.

:meth:`Issuer.confirm` runs when the device reports ``provisioned``: the entry becomes
``CONFIRMED`` and every other active certificate attached to the thing is deactivated, so a
thing has one active certificate. Finding them takes ListThingPrincipals, skipped only when
the thing is known to hold nothing else: this process's CreateThing succeeded for it (AWS
answers ResourceAlreadyExistsException for a thing of another configuration, so it was new or
one ztp made for the same serial and system, whose certificates the ledger holds), attached the
confirmed certificate to it, and the ledger has no other entry for it (any other issuance for
the thing writes its entry before it touches AWS). After a restart, for a thing that existed
with other attributes, or with a second key in the ledger, the principals are listed as ever.

The policy comes from a shipped JSON template (``cloud_daemon/policy/iot-policy.json``) using
policy variables: a certificate can connect only as its own thing
(``${iot:Connection.Thing.ThingName}``, attached) and publish/subscribe only under its own
topics. DescribeEndpoint(``iot:Data-ATS``) is called once and cached, unless an endpoint is
configured.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import re
import string
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cloud_daemon.errors import (
    AwsServiceError,
    IssuanceInProgressError,
    LedgerConflictError,
    ResourceNotFoundError,
    ThrottledError,
)
from cloud_daemon.leases import aws_errors
from cloud_daemon.ledger import IssuanceLedger, IssuanceState, LedgerEntry
from cloud_daemon.ratelimit import RateLimiter, ThrottleRetry
from cloud_daemon.validation import ValidCsr, public_key_sha256
from shared.errors import ConfigError, DecodeError, ZtpError

__all__ = [
    "DEFAULT_POLICY_NAME",
    "MAX_POLICY_CHARS",
    "Confirmation",
    "Issued",
    "Issuer",
    "IssuerConfig",
    "load_policy_template",
]

_log = structlog.get_logger()

DEFAULT_POLICY_NAME: Final = "ztp-device"
MAX_POLICY_CHARS: Final = 2048
"""AWS IoT's bound on one policy document."""
_ENDPOINT_TYPE: Final = "iot:Data-ATS"
_THING_RE: Final = re.compile(r"[A-Za-z0-9:_-]{1,128}")
_ATTRIBUTE_RE: Final = re.compile(r"[A-Za-z0-9_.,@/:#=\[\]-]{1,800}")
_POLICY_NAME_RE: Final = re.compile(r"[\w+=,.@-]{1,128}")
_CAMEL_RE: Final = re.compile(r"(?<!^)(?=[A-Z])")
_FRESH_THINGS: Final = 100_000
"""Things created and not yet confirmed that are remembered (the oldest are listed instead)."""


def load_policy_template() -> str:
    """Return the shipped least-privilege policy document (JSON text)."""
    return resources.files("cloud_daemon").joinpath("policy/iot-policy.json").read_text("utf-8")


def _compact_policy(text: str) -> str:
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigError("iot.policy_document", f"not JSON: {exc}") from exc
    if not isinstance(document, dict) or "Statement" not in document:
        raise ConfigError("iot.policy_document", "must be a JSON policy with a Statement")
    compact = json.dumps(document, separators=(",", ":"))
    if len(compact) > MAX_POLICY_CHARS:
        raise ConfigError(
            "iot.policy_document", f"{len(compact)} characters, AWS allows {MAX_POLICY_CHARS}"
        )
    return compact


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """How certificates are issued.

    Attributes:
        worker_id: this instance's name in the ledger (unique per instance).
        thing_name_template: the thing name, with ``{serial}`` the only placeholder.
        policy_name: the IoT policy attached to every certificate.
        policy_document: the policy JSON; ``None`` for the shipped template.
        endpoint_override: the data endpoint to announce instead of asking DescribeEndpoint.
        intent_timeout: seconds after which an unresolved intent counts as abandoned.
        recovery_window: how far back (seconds) to look for orphans of an abandoned intent.
        throttle: the wait after ThrottlingException (``attempts`` tries in all).

    Raises:
        ConfigError: a template, name or bound is invalid.
    """

    worker_id: str
    thing_name_template: str = "{serial}"
    policy_name: str = DEFAULT_POLICY_NAME
    policy_document: str | None = None
    endpoint_override: str | None = None
    intent_timeout: float = 60.0
    recovery_window: float = 900.0
    throttle: ThrottleRetry = field(default_factory=ThrottleRetry)
    compact_policy: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        if not self.worker_id:
            raise ConfigError("iot.worker_id", "must not be empty")
        fields = [name for _, name, _, _ in string.Formatter().parse(self.thing_name_template)]
        if [name for name in fields if name is not None] != ["serial"]:
            raise ConfigError(
                "iot.thing_name_template", "must contain {serial} once and no other field"
            )
        if not _THING_RE.fullmatch(self.thing_name_template.replace("{serial}", "x")):
            raise ConfigError(
                "iot.thing_name_template", "must yield 1-128 characters of [A-Za-z0-9:_-]"
            )
        if not _POLICY_NAME_RE.fullmatch(self.policy_name):
            raise ConfigError("iot.policy_name", "must be 1-128 characters of [\\w+=,.@-]")
        if not (self.intent_timeout > 0 and self.recovery_window > 0):
            raise ConfigError("iot.intent_timeout", "timeouts must be positive")
        if self.endpoint_override is not None and not self.endpoint_override.strip():
            raise ConfigError("iot.endpoint_override", "must not be blank")
        text = self.policy_document if self.policy_document is not None else None
        object.__setattr__(self, "compact_policy", _compact_policy(text or load_policy_template()))

    def thing_name(self, serial: str) -> str:
        """The thing name for a serial.

        Raises:
            DecodeError: the serial makes an invalid thing name (a peer's fault).
        """
        name = self.thing_name_template.format(serial=serial)
        if not _THING_RE.fullmatch(name):
            raise DecodeError("serial", "characters valid in a thing name", serial)
        return name


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate ready to deliver.

    Attributes:
        thing_name: the thing it is attached to.
        certificate_id: its id (64 hex digits).
        certificate_arn: its ARN.
        certificate_pem: its PEM.
        endpoint: the IoT data endpoint host to announce.
        reused: ``True`` when no certificate was minted (a redelivery re-sends the stored one).
        entry: the ledger entry as now stored.
    """

    thing_name: str
    certificate_id: str
    certificate_arn: str
    certificate_pem: str = field(repr=False)
    endpoint: str
    reused: bool
    entry: LedgerEntry = field(repr=False)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What :meth:`Issuer.confirm` did.

    Attributes:
        thing_name: the thing.
        certificate_id: the certificate the device installed.
        known: whether the ledger knew the certificate (nothing is deactivated otherwise).
        deactivated: the other certificates of the thing made INACTIVE.
    """

    thing_name: str
    certificate_id: str
    known: bool
    deactivated: tuple[str, ...] = ()


def _as_datetime(value: object) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value, tz=dt.UTC)
    return None


def _certificate(entry: LedgerEntry) -> tuple[str, str, str]:
    """The certificate id, ARN and PEM of an entry past ``INTENT``."""
    if entry.certificate_id is None or entry.certificate_arn is None:
        raise LedgerConflictError(entry.thing_name, entry.key_sha256, "a certificate")
    if entry.certificate_pem is None:
        raise LedgerConflictError(entry.thing_name, entry.key_sha256, "a certificate")
    return entry.certificate_id, entry.certificate_arn, entry.certificate_pem


class Issuer:
    """Issues certificates through AWS IoT, at most one per (thing, key).

    Args:
        iot: an aiobotocore IoT client (owned by the caller; configure it without botocore
            retries, as throttling is handled here).
        ledger: the issuance ledger.
        limiter: the per-API rate limiter.
        config: names, templates and timeouts.
        clock: wall clock in seconds (ledger times).
        rand: uniform draws in [0, 1) for the throttle jitter.
    """

    def __init__(
        self,
        *,
        iot: Any,
        ledger: IssuanceLedger,
        limiter: RateLimiter,
        config: IssuerConfig,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._iot = iot
        self._ledger = ledger
        self._limiter = limiter
        self._config = config
        self._clock = clock
        self._rand = rand
        self._endpoint: str | None = config.endpoint_override
        self._policy_ready = False
        self._lock = asyncio.Lock()
        self._methods: dict[str, Callable[..., Any]] = {}
        # thing -> the one certificate it holds, for things this process created (see confirm).
        self._fresh: OrderedDict[str, str] = OrderedDict()

    # -- IoT calls --------------------------------------------------------------------------

    async def _call(self, api: str, **kwargs: Any) -> Mapping[str, Any]:
        """Call one IoT API within its rate, retrying throttles with backoff."""
        method = self._methods.get(api)
        if method is None:
            method = getattr(self._iot, _CAMEL_RE.sub("_", api).lower())
            self._methods[api] = method
        retry = self._config.throttle
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._limiter.call(api), aws_errors(api):
                    response: Mapping[str, Any] = await method(**kwargs)
                    return response
            except ThrottledError as exc:
                limit = f"{api} {self._limiter.limit_for(api):g} TPS"
                if attempt >= retry.attempts:
                    _log.error("iot.throttled", api=api, limit=limit, attempt=attempt, gave_up=True)
                    raise ThrottledError(api, exc.code, limit_name=limit) from exc
                # The next limiter.call() waits this out: the slot after the window frees up.
                delay = self._limiter.throttled(
                    api, attempt=attempt, retry=retry, rand=self._rand()
                )
                _log.warning("iot.throttled", api=api, limit=limit, attempt=attempt, retry_in=delay)

    async def endpoint(self) -> str:
        """The IoT data endpoint host (``iot:Data-ATS``), asked once and cached.

        Raises:
            AwsServiceError: IoT refused.
            AwsTransportError: IoT could not be reached.
        """
        if self._endpoint is None:
            async with self._lock:
                if self._endpoint is None:
                    response = await self._call("DescribeEndpoint", endpointType=_ENDPOINT_TYPE)
                    self._endpoint = str(response["endpointAddress"])
                    _log.info("iot.endpoint", endpoint=self._endpoint)
        return self._endpoint

    async def ensure_policy(self) -> None:
        """Create the device policy from the template unless it exists (checked once).

        Raises:
            AwsServiceError: IoT refused.
            AwsTransportError: IoT could not be reached.
        """
        if self._policy_ready:
            return
        name = self._config.policy_name
        try:
            await self._call("GetPolicy", policyName=name)
        except ResourceNotFoundError:
            try:
                await self._call(
                    "CreatePolicy", policyName=name, policyDocument=self._config.compact_policy
                )
                _log.info("iot.policy_created", policy=name)
            except AwsServiceError as exc:
                if exc.code != "ResourceAlreadyExistsException":
                    raise
        self._policy_ready = True

    async def _ensure_thing(self, thing_name: str, serial: str, system_uid: str) -> bool:
        """Create the thing, or update its attributes; whether it was created (so held nothing)."""
        for name, value in (("serial", serial), ("system_uid", system_uid)):
            if not _ATTRIBUTE_RE.fullmatch(value):
                raise DecodeError(name, "characters valid in a thing attribute", value)
        payload = {"attributes": {"serial": serial, "system_uid": system_uid}}
        try:
            await self._call("CreateThing", thingName=thing_name, attributePayload=payload)
        except AwsServiceError as exc:
            if exc.code != "ResourceAlreadyExistsException":
                raise
            # The thing exists with other attributes (the system was re-registered).
            await self._call(
                "UpdateThing", thingName=thing_name, attributePayload={**payload, "merge": True}
            )
            return False
        return True

    async def deactivate(self, certificate_id: str) -> bool:
        """Make a certificate INACTIVE if it is ACTIVE.

        Args:
            certificate_id: the certificate.

        Returns:
            Whether its status changed.

        Raises:
            AwsServiceError: IoT refused.
            AwsTransportError: IoT could not be reached.
        """
        described = await self._call("DescribeCertificate", certificateId=certificate_id)
        if described["certificateDescription"].get("status") != "ACTIVE":
            return False
        await self._call("UpdateCertificate", certificateId=certificate_id, newStatus="INACTIVE")
        return True

    async def _thing_certificates(self, thing_name: str) -> list[str]:
        try:
            response = await self._call("ListThingPrincipals", thingName=thing_name)
        except ResourceNotFoundError:
            return []
        arns = [str(p) for p in response.get("principals", []) if ":cert/" in str(p)]
        return [arn.rsplit("/", 1)[1] for arn in arns]

    async def _recent_certificates(self, since: dt.datetime) -> list[str]:
        found: list[str] = []
        marker: str | None = None
        while True:
            extra = {"marker": marker} if marker else {}
            page = await self._call("ListCertificates", ascendingOrder=False, **extra)
            older = False
            for cert in page.get("certificates", []):
                created = _as_datetime(cert.get("creationDate"))
                if created is not None and created < since:
                    older = True
                    continue
                found.append(str(cert["certificateId"]))
            marker = page.get("nextMarker")
            if not marker or older:
                return found

    async def _deactivate_orphans(self, thing_name: str, key_sha256: str) -> list[str]:
        since = dt.datetime.fromtimestamp(self._clock() - self._config.recovery_window, dt.UTC)
        candidates = dict.fromkeys(
            [*await self._thing_certificates(thing_name), *await self._recent_certificates(since)]
        )
        deactivated: list[str] = []
        for certificate_id in candidates:
            described = await self._call("DescribeCertificate", certificateId=certificate_id)
            description = described["certificateDescription"]
            try:
                cert = x509.load_pem_x509_certificate(str(description["certificatePem"]).encode())
                key = cert.public_key()
            except (ValueError, KeyError, TypeError):
                continue  # not a certificate of ours: another key type or no PEM
            if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
                continue
            if public_key_sha256(key) != key_sha256:
                continue
            if description.get("status") == "ACTIVE":
                await self._call(
                    "UpdateCertificate", certificateId=certificate_id, newStatus="INACTIVE"
                )
                deactivated.append(certificate_id)
                _log.warning(
                    "issuance.orphan_deactivated", thing=thing_name, certificate_id=certificate_id
                )
        return deactivated

    # -- issuance ---------------------------------------------------------------------------

    async def issue(
        self, *, serial: str, system_uid: str, request_id: str, csr: ValidCsr
    ) -> Issued:
        """Issue the certificate for a vetted CSR, or return the one already issued for it.

        Args:
            serial: the authenticated serial (names the thing).
            system_uid: AirVantage's system uid (a thing attribute).
            request_id: the device's request id (recorded with the entry).
            csr: the CSR, vetted by :func:`~cloud_daemon.validation.validate_csr`.

        Returns:
            The certificate to deliver.

        Raises:
            IssuanceInProgressError: another attempt holds a fresh intent; retry later.
            LedgerConflictError: another worker moved the entry concurrently; retry.
            ThrottledError: IoT kept throttling past the configured attempts.
            AwsServiceError: IoT refused (for example, a CSR it will not sign).
            AwsTransportError: IoT could not be reached.
            DecodeError: the serial or system uid cannot name a thing or attribute.
        """
        thing = self._config.thing_name(serial)
        entry, created = await self._ledger.begin(
            thing, csr.key_sha256, request_id=request_id, owner=self._config.worker_id,
            now=self._clock(),
        )  # fmt: skip
        if not created and entry.has_certificate:
            return await self._reuse(entry)
        if not created:
            entry = await self._take_over(entry, request_id)
        self._fresh.pop(thing, None)  # another certificate is on its way to this thing
        try:
            created = await self._ensure_thing(thing, serial, system_uid)
            await self.ensure_policy()
            endpoint = await self.endpoint()
        except BaseException:
            # Nothing was minted: withdraw the intent so a retry need not wait it out.
            await asyncio.shield(self._release(entry))
            raise
        try:
            response = await self._call(
                "CreateCertificateFromCsr", certificateSigningRequest=csr.csr_pem, setAsActive=True
            )
        except AwsServiceError:
            # A refusal (throttling included) mints nothing. A transport error or a
            # cancellation may have minted, so that intent stays for recovery.
            await asyncio.shield(self._release(entry))
            raise
        certificate_id = str(response["certificateId"])
        try:
            entry = await self._ledger.record_minted(
                entry,
                certificate_id=certificate_id,
                certificate_arn=str(response["certificateArn"]),
                certificate_pem=str(response["certificatePem"]),
                now=self._clock(),
            )
        except LedgerConflictError:
            # We were presumed dead and fenced off: our certificate must not stay active.
            await self.deactivate(certificate_id)
            _log.warning("issuance.fenced", thing=thing, certificate_id=certificate_id)
            raise
        _log.info("issuance.minted", thing=thing, certificate_id=certificate_id)
        entry = await self._attach(entry)
        if created:
            self._fresh[thing] = certificate_id
            while len(self._fresh) > _FRESH_THINGS:
                self._fresh.popitem(last=False)
        return self._issued(entry, endpoint, reused=False)

    async def _release(self, entry: LedgerEntry) -> None:
        try:
            released = await self._ledger.release(entry)
        except ZtpError as exc:
            # The intent stays; it will be presumed abandoned after intent_timeout.
            _log.warning("issuance.release_failed", thing=entry.thing_name, error=str(exc))
            return
        _log.info("issuance.intent_released", thing=entry.thing_name, released=released)

    async def _take_over(self, entry: LedgerEntry, request_id: str) -> LedgerEntry:
        age = self._clock() - entry.updated_at
        if age < self._config.intent_timeout:
            raise IssuanceInProgressError(
                entry.thing_name, retry_after=self._config.intent_timeout - age
            )
        taken = await self._ledger.take_over(
            entry, request_id=request_id, owner=self._config.worker_id, now=self._clock()
        )
        _log.warning(
            "issuance.intent_abandoned",
            thing=entry.thing_name,
            previous_owner=entry.owner,
            attempt=taken.attempt,
        )
        await self._deactivate_orphans(entry.thing_name, entry.key_sha256)
        return taken

    async def _attach(self, entry: LedgerEntry) -> LedgerEntry:
        _, arn, _ = _certificate(entry)
        await self._call("AttachThingPrincipal", thingName=entry.thing_name, principal=arn)
        await self.ensure_policy()
        await self._call("AttachPolicy", policyName=self._config.policy_name, target=arn)
        return await self._ledger.advance(entry, IssuanceState.ISSUED, now=self._clock())

    async def _reuse(self, entry: LedgerEntry) -> Issued:
        if entry.state is IssuanceState.MINTED:
            entry = await self._attach(entry)
        _log.info(
            "issuance.reused",
            thing=entry.thing_name,
            certificate_id=entry.certificate_id,
            state=entry.state.value,
        )
        return self._issued(entry, await self.endpoint(), reused=True)

    @staticmethod
    def _issued(entry: LedgerEntry, endpoint: str, *, reused: bool) -> Issued:
        certificate_id, arn, pem = _certificate(entry)
        return Issued(
            thing_name=entry.thing_name,
            certificate_id=certificate_id,
            certificate_arn=arn,
            certificate_pem=pem,
            endpoint=endpoint,
            reused=reused,
            entry=entry,
        )

    async def record_delivery(self, issued: Issued, *, request_id: str, operation_uid: str) -> None:
        """Remember the AirVantage operation that carries a certificate to its device.

        Args:
            issued: what :meth:`issue` returned.
            request_id: the request answered.
            operation_uid: the ``ztp.deliver`` operation.

        Raises:
            LedgerConflictError: the entry moved in a way that forbids it (never expected).
        """
        entry: LedgerEntry | None = issued.entry
        for _ in range(2):
            if entry is None or not entry.has_certificate:
                break
            target = (
                IssuanceState.CONFIRMED
                if entry.state is IssuanceState.CONFIRMED
                else IssuanceState.ISSUED
            )
            try:
                await self._ledger.advance(
                    entry, target, now=self._clock(), request_id=request_id,
                    operation_uid=operation_uid,
                )  # fmt: skip
            except LedgerConflictError:
                # The entry moved since issue() returned (confirmed meanwhile): read it again.
                entry = await self._ledger.get(issued.thing_name, issued.entry.key_sha256)
            else:
                return
        raise LedgerConflictError(issued.thing_name, issued.entry.key_sha256, "a certificate")

    async def confirm(self, *, serial: str, certificate_id: str) -> Confirmation:
        """The device installed ``certificate_id``: mark it, deactivate the thing's others.

        Args:
            serial: the authenticated serial.
            certificate_id: the certificate the device reports in use.

        Returns:
            What was done. An unknown certificate changes nothing (``known=False``).

        Raises:
            AwsServiceError: IoT refused.
            AwsTransportError: IoT could not be reached.
            DecodeError: the serial cannot name a thing.
        """
        thing = self._config.thing_name(serial)
        entries = await self._ledger.entries_for_thing(thing)
        entry = next((e for e in entries if e.certificate_id == certificate_id), None)
        if entry is None:
            _log.warning("issuance.confirm_unknown", thing=thing, certificate_id=certificate_id)
            return Confirmation(thing, certificate_id, known=False)
        if entry.state is not IssuanceState.CONFIRMED:
            await self._ledger.advance(entry, IssuanceState.CONFIRMED, now=self._clock())
        deactivated = []
        alone = self._fresh.pop(thing, None) == certificate_id and len(entries) == 1
        for other in [] if alone else await self._thing_certificates(thing):
            if other != certificate_id and await self.deactivate(other):
                deactivated.append(other)
                _log.info("issuance.superseded_deactivated", thing=thing, certificate_id=other)
        _log.info("issuance.confirmed", thing=thing, certificate_id=certificate_id)
        return Confirmation(thing, certificate_id, known=True, deactivated=tuple(deactivated))
