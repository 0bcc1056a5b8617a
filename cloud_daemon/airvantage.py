"""The AirVantage REST adapter: OAuth2 token, system lookup, ``ztp.deliver`` operations.

Theory of operation
-------------------
:class:`AirVantageClient` is an async context manager around one :class:`aiohttp.ClientSession`.

- **Token.** ``POST /api/oauth/token`` with ``grant_type=client_credentials`` (or ``password``
  when a username and password are configured), ``company`` as a query parameter when set. The
  token is cached and refreshed ``refresh_margin`` seconds before it expires, and at once when
  a call answers 401 (once per call: a fresh token refused again is an
  :class:`~cloud_daemon.errors.AirVantageAuthError`). The token and the credentials are held as
  :class:`~shared.config.Secret` and never logged or put into an exception message.
- **Retries.** Every request is retried up to ``retry.attempts`` times: on 429 after the
  server's ``Retry-After`` (seconds or an HTTP date; capped), on 5xx and on network errors
  after exponential backoff with full jitter. Other 4xx answers are final. Each retry is logged
  (``airvantage.retry``) with the operation, the status and the wait.
- **Delivery.** :meth:`AirVantageClient.deliver` cuts a
  :class:`~shared.messages.CertificateDelivery` or :class:`~shared.messages.Rejected` into
  fragments (``delivery_params``: ``f01``, ``f02``, ... each at most 255 characters), creates a
  ``ztp.deliver`` command operation on the system, and polls ``GET /api/v1/operations/{uid}``
  until its counters say SUCCESS or FAILURE (FINISHED alone says nothing). A failed or timed
  out operation is redelivered as a new operation, up to ``delivery_attempts`` times; the same
  fragments (same transfer id and seq) go each time, so a device that got the first copy
  recognises the second as a duplicate and simply acknowledges it.

aiohttp exceptions are translated here, once, into :mod:`cloud_daemon.errors` types carrying
``retry_after``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import enum
import math
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

import aiohttp
import structlog

from cloud_daemon.errors import (
    AirVantageApiError,
    AirVantageAuthError,
    AirVantageRateLimitedError,
    AirVantageServerError,
    AirVantageTransportError,
    DeliveryFailedError,
    SystemNotFoundError,
)
from cloud_daemon.ratelimit import Backoff
from shared.config import Secret
from shared.errors import ConfigError, DecodeError
from shared.messages import DELIVER_COMMAND, DeliveryMessage, delivery_params

__all__ = [
    "AirVantageClient",
    "AirVantageClientConfig",
    "AirVantageCredentials",
    "Delivered",
    "OperationOutcome",
    "OperationStatus",
    "parse_retry_after",
]

_log = structlog.get_logger()

_OAUTH_PATH: Final = "/api/oauth/token"
_SYSTEMS_PATH: Final = "/api/v1/systems"
_COMMAND_PATH: Final = "/api/v1/operations/systems/command"
_OPERATION_PATH: Final = "/api/v1/operations/{uid}"
_DEFAULT_EXPIRES_IN: Final = 3600.0
_SYSTEM_CACHE: Final = 10_000


@dataclass(frozen=True, slots=True)
class AirVantageCredentials:
    """Who we are to AirVantage.

    Attributes:
        client_id: the API client id.
        client_secret: its secret.
        username: for the password grant (with ``password``); ``None`` for client credentials.
        password: the user's password.

    Raises:
        ConfigError: an empty client id, or only one of username and password.
    """

    client_id: str
    client_secret: Secret
    username: str | None = None
    password: Secret | None = None

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigError("airvantage.client_id", "must not be empty")
        if not isinstance(self.client_secret, Secret):
            raise ConfigError("airvantage.client_secret", "must be a Secret")
        if (self.username is None) != (self.password is None):
            raise ConfigError("airvantage.username", "username and password go together")

    @property
    def grant_type(self) -> str:
        """``password`` when a user is configured, else ``client_credentials``."""
        return "client_credentials" if self.username is None else "password"


@dataclass(frozen=True, slots=True)
class AirVantageClientConfig:
    """Where AirVantage is and how patient to be with it.

    Attributes:
        base_url: ``https://eu.airvantage.net`` (or the sandbox emulator's URL).
        credentials: the OAuth credentials.
        company: the tenant uid (``company=`` query parameter), if any.
        request_timeout: seconds for one HTTP exchange.
        retry: backoff for 5xx and network errors (``attempts`` tries per request in all).
        max_retry_after: the longest ``Retry-After`` honoured, in seconds.
        refresh_margin: refresh the token this many seconds before it expires.
        poll_interval: seconds between operation status polls.
        operation_timeout: how long one delivery operation may take before it is redelivered.
        delivery_attempts: operations created for one delivery before giving up.

    Raises:
        ConfigError: a bad URL or a non-positive bound.
    """

    base_url: str
    credentials: AirVantageCredentials
    company: str | None = None
    request_timeout: float = 15.0
    retry: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0, attempts=8))
    max_retry_after: float = 300.0
    refresh_margin: float = 300.0
    poll_interval: float = 2.0
    operation_timeout: float = 600.0
    delivery_attempts: int = 3

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("airvantage.base_url", "must be an http(s) URL")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        for name in (
            "request_timeout",
            "max_retry_after",
            "poll_interval",
            "operation_timeout",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"airvantage.{name}", "must be a positive number of seconds")
        if not (isinstance(self.refresh_margin, int | float) and self.refresh_margin >= 0):
            raise ConfigError("airvantage.refresh_margin", "must be >= 0 seconds")
        if isinstance(self.delivery_attempts, bool) or self.delivery_attempts < 1:
            raise ConfigError("airvantage.delivery_attempts", "must be >= 1")


class OperationOutcome(enum.Enum):
    """What an operation's counters say."""

    PENDING = "pending"
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class OperationStatus:
    """An operation as ``GET /api/v1/operations/{uid}`` shows it.

    Attributes:
        uid: the operation.
        state: SCHEDULED, IN_PROGRESS or FINISHED.
        counters: tasks per state (``SUCCESS``, ``FAILURE``, ``PENDING``...).
    """

    uid: str
    state: str
    counters: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "counters", MappingProxyType(dict(self.counters)))

    @property
    def outcome(self) -> OperationOutcome:
        """FAILURE as soon as one task failed; SUCCESS once finished with successes only."""
        if self.counters.get("FAILURE", 0) > 0 or self.counters.get("CANCELLED", 0) > 0:
            return OperationOutcome.FAILURE
        if self.state == "FINISHED":
            succeeded = self.counters.get("SUCCESS", 0) > 0
            return OperationOutcome.SUCCESS if succeeded else OperationOutcome.FAILURE
        return OperationOutcome.PENDING


@dataclass(frozen=True, slots=True)
class Delivered:
    """A delivery the device acknowledged.

    Attributes:
        operation_uid: the operation that succeeded.
        attempts: how many operations it took.
    """

    operation_uid: str
    attempts: int


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """Read a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: the header, or ``None``.
        now: the current time, for a date (default: now, UTC).

    Returns:
        Seconds to wait (never negative), or ``None`` when absent or unreadable.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    reference = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - reference).total_seconds())


def _error_code(body: object) -> str:
    if isinstance(body, dict):
        code = body.get("error")
        if isinstance(code, str):
            return code[:80]
    return ""


class AirVantageClient:
    """The REST API of AirVantage, for the cloud daemon.

    Args:
        config: the endpoint, credentials and patience.
        clock: a monotonic clock in seconds (token expiry, operation deadlines).
        sleep: how to wait between retries and polls.
        rand: uniform draws in [0, 1) for backoff jitter.

    Use as ``async with AirVantageClient(config) as client: ...``.
    """

    def __init__(
        self,
        config: AirVantageClientConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._session: aiohttp.ClientSession | None = None
        self._token: Secret | None = None
        self._token_expires_at = 0.0
        self._token_lock = asyncio.Lock()
        self._systems: OrderedDict[str, str] = OrderedDict()
        self.token_fetches = 0
        """How many tokens were obtained (for metrics and tests; never the token itself)."""

    async def __aenter__(self) -> Self:
        timeout = aiohttp.ClientTimeout(total=self._config.request_timeout)
        self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        self._token = None
        if session is not None:
            await asyncio.shield(session.close())

    # -- one exchange -----------------------------------------------------------------------

    async def _exchange(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        token: Secret | None,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
        form: Mapping[str, str] | None = None,
    ) -> Any:
        """One HTTP exchange; raises typed errors, returns the decoded JSON body."""
        if self._session is None:
            raise RuntimeError("AirVantageClient used outside 'async with'")
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token.reveal()}"
        url = f"{self._config.base_url}{path}"
        try:
            async with self._session.request(
                method, url, params=params, json=json_body, data=form, headers=headers
            ) as response:
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                try:
                    body: Any = await response.json(content_type=None)
                except ValueError:
                    body = None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # The exception text may carry the URL (never a secret: credentials go in the
            # form and the header), but keep only its type to stay short.
            raise AirVantageTransportError(operation, type(exc).__name__) from exc
        if status < 400:
            return body
        code = _error_code(body)
        if status == 429:
            raise AirVantageRateLimitedError(operation, status, code, retry_after=retry_after)
        if status >= 500:
            raise AirVantageServerError(operation, status, code, retry_after=retry_after)
        if status in (401, 403) and path == _OAUTH_PATH:
            raise AirVantageAuthError(operation, status, code)
        raise AirVantageApiError(operation, status, code)

    async def _with_retries(
        self, operation: str, attempt_once: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run ``attempt_once`` until it succeeds or fails for good."""
        backoff = self._config.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_once()
            except (
                AirVantageRateLimitedError,
                AirVantageServerError,
                AirVantageTransportError,
            ) as exc:
                if attempt >= backoff.attempts:
                    raise
                delay = backoff.delay(attempt, rand=self._rand())
                if exc.retry_after is not None:
                    delay = min(exc.retry_after, self._config.max_retry_after)
                _log.warning(
                    "airvantage.retry",
                    operation=operation,
                    status=getattr(exc, "status", None),
                    error=type(exc).__name__,
                    attempt=attempt,
                    retry_in=round(delay, 3),
                    retry_after=exc.retry_after,
                )
                await self._sleep(delay)

    # -- token ------------------------------------------------------------------------------

    async def _access_token(self, *, renew: bool = False) -> Secret:
        async with self._token_lock:
            if (
                not renew
                and self._token is not None
                and self._clock() < self._token_expires_at - self._config.refresh_margin
            ):
                return self._token
            # No retry loop here: the caller's loop (one per API call) covers the token too,
            # so retries do not multiply.
            self._token = await self._fetch_token()
            return self._token

    async def _fetch_token(self) -> Secret:
        credentials = self._config.credentials
        form = {
            "grant_type": credentials.grant_type,
            "client_id": credentials.client_id,
            "client_secret": credentials.client_secret.reveal(),
        }
        if credentials.username is not None and credentials.password is not None:
            form["username"] = credentials.username
            form["password"] = credentials.password.reveal()
        params = {"company": self._config.company} if self._config.company else None
        body = await self._exchange(
            "token", "POST", _OAUTH_PATH, token=None, params=params, form=form
        )
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise DecodeError("access_token", "a token in the token response", "none")
        expires_in = body.get("expires_in", _DEFAULT_EXPIRES_IN)
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
            expires_in = _DEFAULT_EXPIRES_IN
        self._token_expires_at = self._clock() + float(expires_in)
        self.token_fetches += 1
        _log.info("airvantage.token_obtained", grant=credentials.grant_type, expires_in=expires_in)
        return Secret(body["access_token"])

    async def _api(
        self,
        operation: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
    ) -> Any:
        """An authenticated call: retried, with one token refresh on 401."""
        refreshed = False

        async def once() -> Any:
            nonlocal refreshed
            token = await self._access_token()
            try:
                return await self._exchange(
                    operation, method, path, token=token, params=params, json_body=json_body
                )
            except AirVantageApiError as exc:
                if exc.status != 401 or isinstance(exc, AirVantageAuthError):
                    raise
                if refreshed:
                    raise AirVantageAuthError(operation, exc.status, exc.code) from exc
                refreshed = True
                _log.info("airvantage.token_refused", operation=operation)
                token = await self._access_token(renew=True)
                return await self._exchange(
                    operation, method, path, token=token, params=params, json_body=json_body
                )

        return await self._with_retries(operation, once)

    # -- API --------------------------------------------------------------------------------

    async def system_uid(self, serial: str) -> str:
        """The uid of the system whose gateway has ``serial`` (cached).

        Raises:
            SystemNotFoundError: no such system.
            AirVantageApiError: AirVantage refused for good.
            AirVantageTransportError: AirVantage stayed unreachable.
        """
        cached = self._systems.get(serial)
        if cached is not None:
            self._systems.move_to_end(serial)
            return cached
        body = await self._api(
            "systems",
            "GET",
            _SYSTEMS_PATH,
            params={"gateway": f"serialNumber:{serial}", "fields": "uid"},
        )
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise SystemNotFoundError(serial)
        uid = items[0].get("uid") if isinstance(items[0], dict) else None
        if not isinstance(uid, str) or not uid:
            raise DecodeError("items[0].uid", "a system uid", uid)
        self._systems[serial] = uid
        if len(self._systems) > _SYSTEM_CACHE:
            self._systems.popitem(last=False)
        return uid

    async def send_command(
        self, system_uid: str, command_id: str, parameters: Mapping[str, str]
    ) -> str:
        """Create a command operation on one system.

        Returns:
            The operation uid.

        Raises:
            AirVantageApiError: AirVantage refused for good.
            AirVantageTransportError: AirVantage stayed unreachable.
        """
        body = await self._api(
            "command",
            "POST",
            _COMMAND_PATH,
            json_body={
                "systems": {"uids": [system_uid]},
                "commandId": command_id,
                "parameters": dict(parameters),
            },
        )
        uid = body.get("operation") if isinstance(body, dict) else None
        if not isinstance(uid, str) or not uid:
            raise DecodeError("operation", "an operation uid", uid)
        return uid

    async def operation(self, uid: str) -> OperationStatus:
        """The state and counters of an operation.

        Raises:
            AirVantageApiError: AirVantage refused for good (404: no such operation).
            AirVantageTransportError: AirVantage stayed unreachable.
        """
        body = await self._api("operation", "GET", _OPERATION_PATH.format(uid=uid))
        if not isinstance(body, dict) or not isinstance(body.get("state"), str):
            raise DecodeError("state", "an operation state", body)
        counters: dict[str, int] = {}
        raw = body.get("counters", [])
        for item in raw if isinstance(raw, list) else []:
            if isinstance(item, dict) and isinstance(item.get("state"), str):
                count = item.get("count", 0)
                if isinstance(count, int) and not isinstance(count, bool):
                    counters[item["state"]] = counters.get(item["state"], 0) + count
        return OperationStatus(uid, body["state"], counters)

    async def wait_for_operation(self, uid: str, *, within: float | None = None) -> OperationStatus:
        """Poll an operation until its counters say success or failure.

        Args:
            uid: the operation.
            within: seconds to wait (default ``operation_timeout``).

        Returns:
            The final status (outcome SUCCESS or FAILURE), or the last one seen (PENDING) when
            the time ran out.

        Raises:
            AirVantageApiError: AirVantage refused for good.
            AirVantageTransportError: AirVantage stayed unreachable.
        """
        deadline = self._clock() + (within or self._config.operation_timeout)
        while True:
            status = await self.operation(uid)
            if status.outcome is not OperationOutcome.PENDING:
                return status
            remaining = deadline - self._clock()
            if remaining <= 0:
                return status
            await self._sleep(min(self._config.poll_interval, remaining))

    async def send_delivery(
        self,
        system_uid: str,
        message: DeliveryMessage,
        *,
        transfer_id: str,
        seq: int = 0,
        attempt: int = 1,
    ) -> str:
        """Create one ``ztp.deliver`` operation and return at once (no waiting for the device).

        For a caller that tracks the operation itself (from ``event.operation.state.change``
        records, or :meth:`wait_for_operation` in a task of its own) rather than holding a
        Kinesis shard while a device is offline.

        Args:
            system_uid: the device's system.
            message: a delivery or a refusal.
            transfer_id: the fragment transfer id (keep it for redeliveries).
            seq: the fragment sequence number.
            attempt: the attempt number, for the log.

        Returns:
            The operation uid.

        Raises:
            AirVantageApiError: AirVantage refused for good.
            AirVantageTransportError: AirVantage stayed unreachable.
            UsageError: the message does not fit the command's parameters.
        """
        params = delivery_params(message, transfer_id=transfer_id, seq=seq)
        uid = await self.send_command(system_uid, DELIVER_COMMAND, params)
        _log.info(
            "airvantage.delivery_sent",
            system_uid=system_uid,
            operation=uid,
            fragments=len(params),
            attempt=attempt,
        )
        return uid

    async def deliver(
        self, system_uid: str, message: DeliveryMessage, *, transfer_id: str, seq: int = 0
    ) -> Delivered:
        """Carry a delivery (or a refusal) to a device as ``ztp.deliver`` fragments.

        Args:
            system_uid: the device's system.
            message: a :class:`~shared.messages.CertificateDelivery` or
                :class:`~shared.messages.Rejected`.
            transfer_id: the fragment transfer id (the same on every redelivery).
            seq: the fragment sequence number.

        Returns:
            The operation the device acknowledged.

        Raises:
            DeliveryFailedError: every attempt failed on the device or timed out.
            AirVantageApiError: AirVantage refused for good.
            AirVantageTransportError: AirVantage stayed unreachable.
            UsageError: the message does not fit the command's parameters.
        """
        attempts = self._config.delivery_attempts
        last = ""
        reason = "failure"
        for attempt in range(1, attempts + 1):
            last = await self.send_delivery(
                system_uid, message, transfer_id=transfer_id, seq=seq, attempt=attempt
            )
            status = await self.wait_for_operation(last)
            if status.outcome is OperationOutcome.SUCCESS:
                _log.info("airvantage.delivery_done", system_uid=system_uid, operation=last)
                return Delivered(last, attempt)
            reason = "timeout" if status.outcome is OperationOutcome.PENDING else "failure"
            _log.warning(
                "airvantage.delivery_failed",
                system_uid=system_uid,
                operation=last,
                reason=reason,
                counters=dict(status.counters),
                attempt=attempt,
            )
        raise DeliveryFailedError(last, attempts=attempts, reason=reason)
