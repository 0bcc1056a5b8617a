"""The AirVantage link: the device daemon's MQTT connection to AirVantage's device broker.

Theory of operation
===================

:class:`AirVantageLink` is an async context manager owning one :class:`asyncio.TaskGroup` with one
task, ``link.connection``, which connects, subscribes to ``{serial}/tasks/json`` (QoS 1), reads
tasks until the connection ends, and connects again, for as long as the link is open:

- Identity: username and client id are the gateway's serial, the password comes from the
  configuration (a :class:`~shared.config.Secret`, revealed only to the MQTT client). TLS with a
  configurable CA in production; plain MQTT for the sandbox.
- The subscription is made on *every* connection (AirVantage keeps no subscription for a clean
  session), and only once it is acknowledged does the link report :class:`Connected`.
- Reconnects back off exponentially with full jitter, ``uniform(0, min(cap, base * 2**(n-1)))``
  before the n-th retry, and never start two attempts less than ``min_connect_interval`` apart
  (one client id, one connection). Each attempt and each loss is logged with its reason.
- Incoming task payloads are decoded with :func:`shared.airvantage.parse_tasks`; each task is
  reported as a :class:`TaskArrived`. A payload that does not decode is logged and dropped: with
  no readable uid there is nothing to acknowledge.

The link reports what happens through the ``on_event`` callback given to its constructor
(:class:`Connected`, :class:`Disconnected`, :class:`TaskArrived`), synchronously, from its own
task: the callback must not block (the supervisor puts the event in its inbox).

Sending (:meth:`AirVantageLink.publish_data`, :meth:`AirVantageLink.ack`) publishes at QoS 1 on
``{serial}/messages/json`` and ``{serial}/acks/json`` and returns once the broker has acknowledged
the message. When the link is down, or the publish does not complete within ``publish_timeout``,
it raises :class:`~ztp_daemon.errors.LinkError`; the caller decides whether to send again after
the next :class:`Connected`. A publish left without PUBACK also ends the connection at once (the
tasks ``link.read`` and ``link.drop`` serve each connection): a connection that no longer
acknowledges is reconnected rather than trusted.

Closing cancels ``link.connection``, and the link makes sure the cancellation wins: aiomqtt
waits for its acknowledgements with Python 3.11's ``asyncio.wait_for``, which returns normally
when a cancellation arrives together with the result, and its teardown replaces a cancellation
with ``MqttError`` when the DISCONNECT cannot be written within ``connect_timeout``. So
publishes and the subscription are awaited without aiomqtt's timeout (``timeout=inf``, bounded
by the link's own ``asyncio.timeout``), and the connection loop re-raises the cancellation
wherever a library may have swallowed it; a closed link never reconnects. A connection's
client is withdrawn as soon as the connection ends, so publishes fail at once instead of
queueing on a connection being torn down.

aiomqtt's exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeAlias

import aiomqtt
import structlog

from shared.airvantage import (
    Ack,
    CommandTask,
    DataPoint,
    DataShape,
    OtherTask,
    acks_topic,
    encode_acks,
    encode_device_message,
    messages_topic,
    parse_tasks,
    tasks_topic,
    validate_serial,
)
from shared.backoff import full_jitter_delay
from shared.config import Secret
from shared.errors import ConfigError, InvalidValueError, PeerError, UsageError
from ztp_daemon.errors import LinkError
from ztp_daemon.tls import server_verifying_context

__all__ = [
    "CONNECTION_TASK_NAME",
    "AirVantageLink",
    "Connected",
    "Disconnected",
    "LinkEvent",
    "LinkSettings",
    "TaskArrived",
    "backoff_delay",
]

CONNECTION_TASK_NAME: Final = "link.connection"
_log = structlog.get_logger()


def backoff_delay(attempt: int, *, base: float, cap: float, rng: random.Random) -> float:
    """The wait before retry number ``attempt`` *(pure)*: full jitter, exponential, capped.

    Args:
        attempt: 1 for the first retry after a failure; 0 or less waits nothing.
        base: the first ceiling, seconds.
        cap: the largest ceiling, seconds.
        rng: the random source.

    Returns:
        ``uniform(0, min(cap, base * 2**(attempt - 1)))``.
    """
    if attempt <= 0:
        return 0.0
    return full_jitter_delay(attempt, base=base, cap=cap, rand=rng.random())


@dataclass(frozen=True, slots=True)
class LinkSettings:
    """How the link connects.

    Attributes:
        serial: the gateway's serial: username, client id and topic prefix.
        password: the system's MQTT password.
        host: the broker's host.
        port: the broker's port.
        tls: speak TLS (verifying the broker's certificate and host name).
        ca_file: the CA to trust; the system trust store when ``None``.
        keepalive: MQTT keep-alive, seconds.
        connect_timeout: bound on one connection attempt (TCP, TLS, CONNACK, SUBACK), seconds.
        publish_timeout: bound on one publish (until the PUBACK), seconds.
        backoff_base: the first reconnect backoff ceiling, seconds.
        backoff_cap: the largest reconnect backoff ceiling, seconds.
        min_connect_interval: the least time between two connection attempts, seconds.

    Raises:
        ConfigError: a value out of range or a serial unfit for a topic.
    """

    serial: str
    password: Secret = field(repr=False)
    host: str
    port: int = 8883
    tls: bool = True
    ca_file: Path | None = None
    keepalive: int = 60
    connect_timeout: float = 10.0
    publish_timeout: float = 10.0
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    min_connect_interval: float = 1.0

    def __post_init__(self) -> None:
        try:
            validate_serial(self.serial)
        except InvalidValueError as exc:
            raise ConfigError("device.serial", exc.expected) from exc
        if not isinstance(self.password, Secret) or not 0 < len(self.password) <= 255:
            raise ConfigError("airvantage.password", "a secret of 1..255 characters")
        if not self.host:
            raise ConfigError("airvantage.host", "must not be empty")
        if not 0 < self.port < 65536:
            raise ConfigError("airvantage.port", f"must be in 1..65535, got {self.port}")
        if self.ca_file is not None and not self.tls:
            raise ConfigError("airvantage.ca_file", "set only with TLS")
        for name in ("connect_timeout", "publish_timeout", "backoff_base", "backoff_cap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"airvantage.{name}", f"must be > 0, got {value}")
        if self.backoff_base > self.backoff_cap:
            raise ConfigError("airvantage.backoff_base", "must not exceed backoff_cap")
        if not (math.isfinite(self.min_connect_interval) and self.min_connect_interval >= 0):
            raise ConfigError("airvantage.min_connect_interval", "must be >= 0")
        if self.keepalive < 1:
            raise ConfigError("airvantage.keepalive", "must be >= 1")


@dataclass(frozen=True, slots=True)
class Connected:
    """The link is connected and subscribed to tasks.

    Attributes:
        attempt: how many attempts this connection took (1: at the first try).
    """

    attempt: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection that had been reported :class:`Connected` ended.

    Attributes:
        reason: why, as far as the client knows.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class TaskArrived:
    """A task arrived on ``{serial}/tasks/json``.

    Attributes:
        task: the decoded task (a command, or another kind to refuse by its uid).
    """

    task: CommandTask | OtherTask


LinkEvent: TypeAlias = Connected | Disconnected | TaskArrived


class AirVantageLink:
    """The MQTT connection to AirVantage; reconnects by itself. An async context manager.

    Args:
        settings: where and as whom to connect.
        on_event: called, from the link's task, with each :data:`LinkEvent`; must not block.
        rng: the source of backoff jitter.
        clock: a monotonic clock in seconds.
    """

    def __init__(
        self,
        settings: LinkSettings,
        *,
        on_event: Callable[[LinkEvent], None],
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._on_event = on_event
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrecy
        self._clock = clock
        self._client: aiomqtt.Client | None = None
        self._stack = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None
        self._entered = False
        self._closing = False
        self._tls_context: ssl.SSLContext | None = None
        self._drop = asyncio.Event()
        self._drop_reason = ""
        self._topics = (
            tasks_topic(settings.serial),
            messages_topic(settings.serial),
            acks_topic(settings.serial),
        )
        self._log = _log.bind(serial=settings.serial)

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start connecting in the background and return at once.

        Raises:
            UsageError: entered twice.
            ConfigError: the CA file cannot be loaded.
        """
        if self._entered:
            raise UsageError("an AirVantageLink is not reentrant")
        self._entered = True
        if self._settings.tls:
            self._tls_context = _tls_context(self._settings.ca_file)
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._task = group.create_task(self._connection_loop(), name=CONNECTION_TASK_NAME)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the connection task; the client disconnects as its context closes."""
        self._closing = True
        if self._task is not None:
            self._task.cancel("link closing")
        await self._stack.__aexit__(exc_type, exc, tb)

    @property
    def connected(self) -> bool:
        """Whether the link is connected and subscribed now."""
        return self._client is not None

    # -- sending -------------------------------------------------------------------------------

    async def publish_data(
        self, points: Sequence[DataPoint], *, shape: DataShape = DataShape.ARRAY
    ) -> None:
        """Publish data points on ``{serial}/messages/json`` at QoS 1.

        Args:
            points: the points of one message.
            shape: the payload shape (the array shape carries several values of one path).

        Raises:
            LinkError: the link is down, or the broker did not acknowledge in time.
            InvalidValueError: the points cannot be carried in ``shape``.
        """
        await self._publish(self._topics[1], encode_device_message(points, shape=shape))

    async def ack(self, acks: Sequence[Ack]) -> None:
        """Acknowledge tasks on ``{serial}/acks/json`` at QoS 1.

        Raises:
            LinkError: the link is down, or the broker did not acknowledge in time.
        """
        await self._publish(self._topics[2], encode_acks(acks))

    async def _publish(self, topic: str, payload: bytes) -> None:
        client = self._client
        if client is None:
            raise LinkError("not connected")
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                # timeout=inf: aiomqtt then awaits the PUBACK directly instead of through
                # Python 3.11's asyncio.wait_for, which returns the result, swallowing a
                # cancellation, when the PUBACK and the cancellation arrive together (a daemon
                # stopped mid-send then never stops). The bound is ours, around the call.
                await client.publish(topic, payload, qos=1, timeout=math.inf)
        except TimeoutError as exc:
            reason = f"no PUBACK within {self._settings.publish_timeout} s"
            # A connection that stops acknowledging is dead in all but name: reconnect now, so
            # the caller's "send again after the next Connected" happens soon.
            if self._client is client:
                self._drop_connection(reason)
            raise LinkError(reason) from exc
        except aiomqtt.MqttError as exc:
            raise LinkError(f"publish failed: {_describe(exc)}") from exc

    # -- the connection loop -------------------------------------------------------------------

    def _client_for(self) -> aiomqtt.Client:
        settings = self._settings
        return aiomqtt.Client(
            settings.host,
            settings.port,
            username=settings.serial,
            password=settings.password.reveal(),
            identifier=settings.serial,
            tls_context=self._tls_context,
            keepalive=settings.keepalive,
            timeout=settings.connect_timeout,
            # Tasks are few and small; the defaults of paho are ample, but be explicit.
            max_inflight_messages=20,
        )

    async def _connection_loop(self) -> None:
        settings = self._settings
        failures = 0
        attempt = 0
        last_start = -math.inf
        while True:
            wait = backoff_delay(
                failures, base=settings.backoff_base, cap=settings.backoff_cap, rng=self._rng
            )
            wait = max(wait, last_start + settings.min_connect_interval - self._clock())
            if wait > 0:
                await asyncio.sleep(wait)
            attempt += 1
            last_start = self._clock()
            self._log.info(
                "link.connecting",
                host=settings.host,
                port=settings.port,
                tls=settings.tls,
                attempt=attempt,
            )
            reported = False
            try:
                async with self._client_for() as client:
                    # aiomqtt waits for the CONNACK with asyncio.wait_for, which can swallow
                    # a cancellation that arrives with it (Python 3.11).
                    self._raise_if_closing()
                    async with asyncio.timeout(settings.connect_timeout):
                        await client.subscribe(self._topics[0], qos=1, timeout=math.inf)
                    self._client = client
                    reported = True
                    self._log.info("link.connected", attempt=attempt)
                    self._on_event(Connected(attempt))
                    failures = 0
                    attempt = 0
                    try:
                        reason = await self._serve(client)
                    finally:
                        # From here on a publish fails at once ("not connected") rather than
                        # queueing on a connection that is being torn down.
                        self._client = None
                    # A connection that ends as the link closes: the task group in _serve
                    # gives the connection's error priority over the cancellation.
                    self._raise_if_closing()
            except (aiomqtt.MqttError, OSError) as exc:
                # aiomqtt's teardown raises MqttError ("Operation timed out") when the
                # DISCONNECT cannot be written in time, replacing a cancellation in flight.
                self._raise_if_closing()
                reason = _describe(exc)
            except TimeoutError:
                self._raise_if_closing()
                reason = f"no SUBACK within {settings.connect_timeout} s"
            finally:
                self._client = None
            failures += 1
            retry_ceiling = min(settings.backoff_cap, settings.backoff_base * 2.0 ** (failures - 1))
            if reported:
                self._log.warning("link.disconnected", reason=reason, retry_within=retry_ceiling)
                self._on_event(Disconnected(reason))
            else:
                self._log.warning(
                    "link.connect_failed",
                    reason=reason,
                    attempt=attempt,
                    retry_within=retry_ceiling,
                )

    async def _serve(self, client: aiomqtt.Client) -> str:
        """Read tasks until the connection is lost or dropped on purpose; return why it ended."""
        drop = self._drop = asyncio.Event()

        async def read() -> None:
            async for message in client.messages:
                self._on_message(message)
            raise _EndConnectionError("message stream ended")

        async def watch() -> None:
            await drop.wait()
            raise _EndConnectionError(self._drop_reason)

        reason = "connection ended"
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(read(), name="link.read")
                group.create_task(watch(), name="link.drop")
        except* _EndConnectionError as ended:
            reason = _first_reason(ended)
        except* aiomqtt.MqttError as lost:
            reason = _first_reason(lost)
        return reason

    def _raise_if_closing(self) -> None:
        """Re-raise the link's own cancellation where a library may have swallowed it.

        Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses for the CONNACK and the
        disconnect) returns normally when a cancellation arrives with its result; aiomqtt's
        teardown replaces a cancellation with ``MqttError`` when its DISCONNECT cannot be
        written in time; a task group whose child failed as its parent was cancelled raises the
        child's error. Any of them would keep the link reconnecting after it was closed, and
        its owner would never stop. ``Task.cancelling()`` cannot tell (3.11's task groups leave
        it raised after a child fails), so the link remembers that it is closing.

        Raises:
            asyncio.CancelledError: the link is closing.
        """
        if self._closing:
            raise asyncio.CancelledError("link closing")

    def _drop_connection(self, reason: str) -> None:
        """End the current connection (the loop reconnects): it no longer carries publishes."""
        self._drop_reason = reason
        self._drop.set()

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        if topic != self._topics[0]:
            self._log.warning("link.unexpected_topic", topic=topic)
            return
        try:
            tasks = parse_tasks(bytes(message.payload))
        except PeerError as exc:
            # No uid can be read, so there is nothing to acknowledge; AirVantage will time out.
            self._log.warning("link.tasks_undecodable", reason=str(exc))
            return
        for task in tasks:
            self._on_event(TaskArrived(task))


class _EndConnectionError(Exception):
    """Raised inside a connection's task group to end it (stream ended, or dropped on purpose)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _first_reason(group: BaseExceptionGroup[BaseException]) -> str:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    if isinstance(leaf, _EndConnectionError):
        return leaf.reason
    return _describe(leaf)


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    try:
        return server_verifying_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("airvantage.ca_file", f"cannot load {ca_file}: {exc}") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else f"{text[:197]}..."
