"""The exception hierarchy of the ``cloud_daemon`` package.

A leaf module: it imports only :mod:`shared.errors` (itself a leaf), so that one ``except
ZtpError`` catches every error of the project, and every module here can import this one.

The classes are split by who is at fault:

- :class:`CloudUsageError` (a :class:`shared.errors.UsageError`): our own side asked for
  something impossible, such as a stream that does not exist or a lease table with the wrong
  key schema. Fix the configuration; retrying will not help.
- :class:`AwsServiceError` (a :class:`shared.errors.PeerError`): AWS answered, and the answer is
  a refusal. Its subclasses name the refusals the consumer acts on: :class:`ThrottledError`
  (back off and retry), :class:`IteratorExpiredError` (get a fresh iterator from the checkpoint).
- :class:`AwsTransportError` (a :class:`shared.errors.TransportError`): the path to AWS failed
  (connection refused, timeout). Retry with backoff.
- :class:`LeaseError`: coordination between consumer instances. :class:`LeaseLostError` means
  another instance owns the shard now (stop reading it, never checkpoint it again);
  :class:`LeaseTakenError` means an attempt to take a lease lost a race (try another shard).

Issuance (``issuer.py``, ``ledger.py``):

- :class:`IssuanceInProgressError` (a transport error: retry later): another worker holds a
  fresh intent to issue this certificate; its ``retry_after`` says when it may be taken over.
- :class:`LedgerConflictError`: a conditional ledger write lost a race (the entry moved).

Delivery (``airvantage.py``):

- :class:`AirVantageApiError` (a peer error), AirVantage answered with an error; its subclasses
  :class:`AirVantageRateLimitedError` (429, honour ``retry_after``),
  :class:`AirVantageServerError` (5xx, back off) and :class:`AirVantageAuthError` (our
  credentials or a fresh token refused).
- :class:`AirVantageTransportError`: the path to AirVantage failed; retry with backoff.
- :class:`SystemNotFoundError`: AirVantage knows no system with that serial.
- :class:`DeliveryFailedError`: a ``ztp.deliver`` operation kept failing or never finished.

The service (``handler.py``) catches :class:`~shared.errors.ZtpError` per record and hands it to
the consumer as a record failure (retry, then dead letter).

Botocore and aiohttp exceptions are translated into these once, in the adapters
(``consumer.py``, ``leases.py``, ``issuer.py``, ``airvantage.py``), with ``raise ... from exc``.
No message carries a secret.
"""

from __future__ import annotations

from shared.errors import PeerError, TransportError, UsageError, ZtpError

__all__ = [
    "AirVantageApiError",
    "AirVantageAuthError",
    "AirVantageRateLimitedError",
    "AirVantageServerError",
    "AirVantageTransportError",
    "AwsServiceError",
    "AwsTransportError",
    "CloudDaemonError",
    "CloudUsageError",
    "DeliveryFailedError",
    "IssuanceInProgressError",
    "IteratorExpiredError",
    "LeaseError",
    "LeaseLostError",
    "LeaseTakenError",
    "LedgerConflictError",
    "ResourceNotFoundError",
    "SystemNotFoundError",
    "ThrottledError",
]


class CloudDaemonError(ZtpError):
    """Base of every error raised by the ``cloud_daemon`` package."""


class CloudUsageError(CloudDaemonError, UsageError):
    """Local misuse: a bad argument or a configuration that names something impossible."""


class ResourceNotFoundError(CloudUsageError):
    """A stream or table named by our configuration does not exist.

    Attributes:
        operation: the AWS operation that was refused (``ListShards``).
        resource: the name we asked for.
    """

    def __init__(self, operation: str, resource: str) -> None:
        super().__init__(f"{operation}: {resource!r} does not exist")
        self.operation = operation
        self.resource = resource


class AwsServiceError(CloudDaemonError, PeerError):
    """AWS refused a call.

    Attributes:
        operation: the AWS operation (``GetRecords``).
        code: the AWS error code (``InternalFailure``).
    """

    def __init__(self, operation: str, code: str, detail: str = "") -> None:
        text = f"{operation} refused: {code}"
        super().__init__(f"{text} ({detail})" if detail else text)
        self.operation = operation
        self.code = code


class ThrottledError(AwsServiceError):
    """AWS throttled a call: back off with jitter, then retry.

    Attributes:
        limit_name: which limit was hit (``GetRecords per shard``, ``ListShards per stream``).
        retry_after: seconds to wait when AWS said so, else ``None`` (use our own backoff).
    """

    def __init__(
        self, operation: str, code: str, *, limit_name: str, retry_after: float | None = None
    ) -> None:
        super().__init__(operation, code, f"limit {limit_name}")
        self.limit_name = limit_name
        self.retry_after = retry_after


class IteratorExpiredError(AwsServiceError):
    """A shard iterator is older than five minutes: get a new one from the checkpoint.

    Attributes:
        shard_id: the shard whose iterator expired.
    """

    def __init__(self, operation: str, code: str, *, shard_id: str) -> None:
        super().__init__(operation, code, f"shard {shard_id}")
        self.shard_id = shard_id


class AwsTransportError(CloudDaemonError, TransportError):
    """The path to AWS failed (connection refused, reset, timeout): retry with backoff.

    Attributes:
        operation: the AWS operation that was under way.
    """

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"{operation}: {reason}")
        self.operation = operation


class LeaseError(CloudDaemonError):
    """A shard lease could not be taken or kept.

    Attributes:
        shard_id: the shard the lease is for.
        owner: the worker that tried (us), never a secret.
    """

    def __init__(self, shard_id: str, owner: str, reason: str) -> None:
        super().__init__(f"lease on {shard_id} for {owner}: {reason}")
        self.shard_id = shard_id
        self.owner = owner


class LeaseLostError(LeaseError):
    """We no longer own a lease we held: stop reading the shard, never checkpoint it again."""


class LeaseTakenError(LeaseError):
    """Taking a lease lost a race with another worker (its counter or owner changed)."""


# --- issuance and delivery (issuer.py, ledger.py, airvantage.py) ---------------------------


class IssuanceInProgressError(CloudDaemonError, TransportError):
    """Another worker recorded the intent to issue this certificate moments ago: retry later.

    Raised instead of minting a second certificate; once ``retry_after`` has passed without a
    result, the intent counts as abandoned (its worker crashed) and the next attempt recovers.

    Attributes:
        thing_name: the thing the certificate is for.
        retry_after: seconds until the intent may be taken over.
    """

    def __init__(self, thing_name: str, *, retry_after: float) -> None:
        super().__init__(
            f"issuance for thing {thing_name!r} in progress elsewhere; retry in {retry_after:.1f} s"
        )
        self.thing_name = thing_name
        self.retry_after = retry_after


class LedgerConflictError(CloudDaemonError):
    """A conditional write to the issuance ledger lost a race: the entry moved under us.

    Attributes:
        thing_name: the entry's thing.
        key_sha256: the entry's public-key digest (hex; not a secret).
        expected: what the write was conditional on.
    """

    def __init__(self, thing_name: str, key_sha256: str, expected: str) -> None:
        super().__init__(
            f"ledger entry {thing_name}/{key_sha256[:16]}: condition failed, expected {expected}"
        )
        self.thing_name = thing_name
        self.key_sha256 = key_sha256
        self.expected = expected


class AirVantageApiError(CloudDaemonError, PeerError):
    """The AirVantage REST API answered with an error.

    Attributes:
        operation: what we asked (``token``, ``systems``, ``command``, ``operation``).
        status: the HTTP status.
        code: AirVantage's ``error`` member, or ``""`` when the body had none.
        retry_after: seconds the server asked us to wait (``Retry-After``), else ``None``.
    """

    def __init__(
        self, operation: str, status: int, code: str = "", *, retry_after: float | None = None
    ) -> None:
        text = f"AirVantage {operation}: HTTP {status}"
        super().__init__(f"{text} {code}" if code else text)
        self.operation = operation
        self.status = status
        self.code = code
        self.retry_after = retry_after


class AirVantageRateLimitedError(AirVantageApiError):
    """HTTP 429: wait ``retry_after`` seconds (or back off) and retry."""


class AirVantageServerError(AirVantageApiError):
    """HTTP 5xx: back off and retry."""


class AirVantageAuthError(AirVantageApiError):
    """The token endpoint refused our credentials, or a fresh token was refused too."""


class SystemNotFoundError(CloudDaemonError, PeerError):
    """AirVantage knows no system with this gateway serial.

    Attributes:
        serial: the serial looked up.
    """

    def __init__(self, serial: str) -> None:
        super().__init__(f"AirVantage has no system with serial {serial!r}")
        self.serial = serial


class AirVantageTransportError(CloudDaemonError, TransportError):
    """The path to AirVantage failed (refused, reset, timeout): retry with backoff.

    Attributes:
        operation: what we asked.
        retry_after: always ``None`` (no server said anything); present so callers can read
            ``retry_after`` on every retryable AirVantage error alike.
    """

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(f"AirVantage {operation}: {reason}")
        self.operation = operation
        self.retry_after: float | None = None


class DeliveryFailedError(CloudDaemonError, PeerError):
    """A ``ztp.deliver`` operation kept failing on the device, or never finished in time.

    Attributes:
        operation_uid: the last operation tried.
        attempts: how many operations were created.
        reason: ``failure`` (the counters said so) or ``timeout``.
    """

    def __init__(self, operation_uid: str, *, attempts: int, reason: str) -> None:
        super().__init__(f"delivery {operation_uid}: {reason} after {attempts} attempt(s)")
        self.operation_uid = operation_uid
        self.attempts = attempts
        self.reason = reason
