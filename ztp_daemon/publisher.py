"""The device daemon's MQTT publisher: outbox → AWS IoT Core over mutual TLS, reconnecting.

Theory of operation
===================

:class:`Publisher` is an async context manager owning one :class:`asyncio.TaskGroup`:

- ``publisher.connection`` connects, serves the connection, and reconnects after any loss with
  exponential backoff and full jitter (``uniform(0, min(cap, base * 2**n))``), never starting two
  CONNECTs for the client id less than ``min_connect_interval`` (≥ 1 s, AWS's limit) apart. Each
  attempt is logged with its number and, when it fails, the reason.
- ``publisher.credentials`` polls the :class:`CredentialSource` and, when the credentials change
  (a new certificate in the bundle), asks the connection to drain and reconnect with them.

While connected, a second TaskGroup runs ``publisher.watch`` (ends the connection when aiomqtt
reports the disconnect), ``publisher.control`` (a stop or a credentials change: drain, then end
the connection) and ``publisher.send-N`` — one sender per in-flight slot (100 by default, AWS's
limit of unacknowledged QoS 1 messages). A sender takes the next message from the
:class:`~ztp_daemon.outbox.Outbox`, publishes it at QoS 1 and, when ``publish`` returns (the PUBACK
arrived), acks it, which deletes its row. If the connection ends first, the message is released
back to the head of the outbox and sent again on the next connection: at least once, never lost.

Every message carries its stable outbox id as the MQTT 5 user property ``message_id_property``
(``ztp-id`` by default) so consumers can drop QoS 1 duplicates; with ``message_id_property=None``
the publisher speaks MQTT 3.1.1 and sends payloads only.

Watchdog: :meth:`Publisher.attach_watchdog` registers two loops with the systemd
:class:`~ztp_daemon.sdnotify.Watchdog`, ``publisher.connection`` and ``publisher.send``, and
unregisters them when the publisher stops. Both are beaten from one *pulse*, passed by the
connection loop on every wake of its waits (backoff, connect pacing) and by ``publisher.control``,
which wakes every ``beat_period`` while connected, also when nothing is sent. The pulse always
beats ``publisher.connection``; it beats ``publisher.send`` only when the senders are healthy:
nothing is in flight, or a PUBACK arrived since the previous pulse. So a connection loop stuck on
an await (a TLS set-up, a disconnect that never returns) and senders stuck on PUBACKs that never
come (a broker that stopped answering on a live socket) both stop the ``WATCHDOG=1`` pings. A
connect and a drain run without pulses; both are bounded (``connect_timeout``, ``drain_timeout``),
and the loops' allowance covers them.

Shutdown (``__aexit__``) stops taking messages, waits up to ``drain_timeout`` for the PUBACKs of
those in flight, then disconnects; anything still unacked stays in the outbox for the next start.

Failures: anything that ends a connection (refused, TLS, CONNACK, a dropped socket, a ping
timeout) is logged with its reason and retried; a failure of the outbox itself (a
:class:`~ztp_daemon.errors.StorageError` reading payloads back) is not retried here: it ends the
publisher's TaskGroup and reaches whoever entered the publisher.

aiomqtt's exceptions are translated here and nowhere else; they never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol, Self

import aiomqtt
import structlog
from paho.mqtt.properties import Properties

from shared.backoff import full_jitter_delay
from shared.errors import ConfigError, TransportError, UsageError
from ztp_daemon.bundle import BundleStore
from ztp_daemon.errors import DeviceError
from ztp_daemon.mqtt_wire import utf8_string, variable_byte_integer
from ztp_daemon.outbox import Outbox
from ztp_daemon.sdnotify import Watchdog
from ztp_daemon.tls import server_verifying_context

__all__ = [
    "AWS_ALPN_PROTOCOL",
    "CONNECTION_LOOP",
    "SEND_LOOP",
    "Backoff",
    "BundleCredentials",
    "ClientCredentials",
    "ConnectError",
    "CredentialSource",
    "FileCredentials",
    "Publisher",
    "PublisherConfig",
    "PublisherStats",
    "RatePacer",
    "build_tls_context",
    "message_id_properties",
]

AWS_ALPN_PROTOCOL: Final = "x-amzn-mqtt-ca"
_AWS_MIN_CONNECT_INTERVAL: Final = 1.0
_ALPN_PORT: Final = 443
#: The loop names the publisher registers with the systemd watchdog.
CONNECTION_LOOP: Final = "publisher.connection"
SEND_LOOP: Final = "publisher.send"

_log = structlog.get_logger()


class ConnectError(DeviceError, TransportError):
    """A connection to the IoT endpoint failed or was lost (the publisher retries by itself).

    Attributes:
        reason: a short description (connection refused, CONNACK code, TLS failure, ...).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"IoT connection: {reason}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What one connection needs from the credential bundle.

    Attributes:
        cert_file: the client certificate (PEM).
        key_file: its private key (PEM).
        endpoint: the IoT data endpoint host name.
        version: changes whenever the credentials change (compared, never parsed).
    """

    cert_file: Path
    key_file: Path
    endpoint: str
    version: str

    def __post_init__(self) -> None:
        if not self.endpoint:
            raise UsageError("credentials: the endpoint must not be empty")


class CredentialSource(Protocol):
    """Where the publisher reads its credentials: at each connect, and when polling for change."""

    def current(self) -> ClientCredentials | None:
        """The credentials to use now, or None when there are none yet."""
        ...


class BundleCredentials:
    """Credentials from the device daemon's :class:`~ztp_daemon.bundle.BundleStore`.

    Args:
        store: the bundle store; its current version is the credentials' version.
    """

    def __init__(self, store: BundleStore) -> None:
        self._store = store

    def current(self) -> ClientCredentials | None:
        """The current bundle's certificate, key and endpoint, or None before the first one.

        Raises:
            UsageError: the bundle's key is not a file (a key store the publisher cannot use).
            StorageError: the bundle cannot be read.
        """
        bundle = self._store.current()
        if bundle is None:
            return None
        if bundle.key_path is None:
            raise UsageError(
                f"bundle v{bundle.version}: the key is not a file ({bundle.key_reference})"
            )
        return ClientCredentials(
            cert_file=bundle.certificate_path,
            key_file=bundle.key_path,
            endpoint=bundle.endpoint,
            version=f"bundle-{bundle.version}",
        )


class FileCredentials:
    """Credentials from fixed files; the version follows the files' identity and mtime.

    Args:
        cert_file: the certificate file (replaced atomically when it changes).
        key_file: the key file.
        endpoint: the IoT data endpoint host name.
    """

    def __init__(self, cert_file: Path, key_file: Path, endpoint: str) -> None:
        self._cert_file = cert_file
        self._key_file = key_file
        self._endpoint = endpoint

    def current(self) -> ClientCredentials | None:
        """The files and their version, or None while either file is missing."""
        parts = []
        for path in (self._cert_file, self._key_file):
            try:
                st = path.stat()
            except FileNotFoundError:
                return None
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}")
        return ClientCredentials(self._cert_file, self._key_file, self._endpoint, "/".join(parts))


@dataclass(frozen=True, slots=True)
class PublisherConfig:
    """How the publisher connects and behaves.

    Attributes:
        thing_name: the client id (AWS: the thing name, which the policy scopes topics to).
        port: 8883 (MQTT over TLS), or 443 with ALPN ``x-amzn-mqtt-ca``.
        host: overrides the credentials' endpoint (the sandbox's loopback broker).
        ca_file: the CA to trust; None uses the system trust store (Amazon Root CA 1 is there).
        alpn: send ALPN ``x-amzn-mqtt-ca``; None means "when the port is 443".
        keepalive: MQTT keep-alive in seconds (AWS: 30..1200).
        connect_timeout: bound on TCP + TLS + CONNACK, seconds.
        backoff_base: first backoff ceiling, seconds.
        backoff_cap: largest backoff ceiling, seconds.
        min_connect_interval: least time between two CONNECTs (AWS: 1 per second per client id).
        drain_timeout: how long shutdown or a credentials change waits for in-flight PUBACKs.
        credentials_poll_interval: how often the credential source is checked for a change.
        publish_rate: most publishes per second per connection (AWS: 100), None for no pacing.
        message_id_property: the MQTT 5 user property carrying the message id; None for MQTT
            3.1.1 without ids.
    """

    thing_name: str
    port: int = 8883
    host: str | None = None
    ca_file: Path | None = None
    alpn: bool | None = None
    keepalive: int = 300
    connect_timeout: float = 10.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    min_connect_interval: float = _AWS_MIN_CONNECT_INTERVAL
    drain_timeout: float = 5.0
    credentials_poll_interval: float = 5.0
    publish_rate: float | None = 100.0
    message_id_property: str | None = "ztp-id"

    def __post_init__(self) -> None:
        if not self.thing_name or len(self.thing_name) > 128:
            raise ConfigError("publisher.thing_name", "1..128 characters")
        if not 0 < self.port < 65536:
            raise ConfigError("publisher.port", f"must be in 1..65535, got {self.port}")
        if not 30 <= self.keepalive <= 1200:
            raise ConfigError("publisher.keepalive", f"must be in 30..1200 s, got {self.keepalive}")
        if self.min_connect_interval < _AWS_MIN_CONNECT_INTERVAL:
            raise ConfigError(
                "publisher.min_connect_interval",
                f"must be >= {_AWS_MIN_CONNECT_INTERVAL} s (1 CONNECT per second per client id)",
            )
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ConfigError("publisher.backoff_base", "must be > 0 and <= backoff_cap")
        for name in ("connect_timeout", "drain_timeout", "credentials_poll_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"publisher.{name}", "must be > 0")
        if self.publish_rate is not None and self.publish_rate <= 0:
            raise ConfigError("publisher.publish_rate", "must be > 0, or None for no pacing")
        if self.message_id_property is not None and not self.message_id_property:
            raise ConfigError("publisher.message_id_property", "must not be empty")

    @property
    def use_alpn(self) -> bool:
        """Whether ALPN ``x-amzn-mqtt-ca`` is offered."""
        return self.alpn if self.alpn is not None else self.port == _ALPN_PORT


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter *(pure)*: attempt n waits U(0, min(cap, base·2^n)).

    Args:
        base: the first ceiling, seconds.
        cap: the largest ceiling, seconds.
        rng: the random source (seeded in tests).
    """

    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0 for the first attempt)."""
        if attempt <= 0:
            return 0.0
        return full_jitter_delay(attempt, base=self.base, cap=self.cap, rand=self.rng.random())


@dataclass(slots=True)
class RatePacer:
    """Spaces events ``1/rate`` apart *(pure)*: :meth:`reserve` says how long to wait.

    Args:
        rate: events per second.
    """

    rate: float
    _next: float = -math.inf

    def reserve(self, now: float) -> float:
        """Book the next slot at or after ``now``; return the seconds to wait for it."""
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.rate
        return slot - now


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counters since start.

    Attributes:
        connected: whether a connection is up now.
        connects: successful connections.
        attempts: connection attempts.
        published: messages acknowledged by the broker.
        last_error: the reason the last attempt or connection ended, if any.
    """

    connected: bool
    connects: int
    attempts: int
    published: int
    last_error: str | None


def build_tls_context(
    credentials: ClientCredentials, *, ca_file: Path | None, alpn: bool
) -> ssl.SSLContext:
    """A client context for mutual TLS with the IoT endpoint (blocking: reads files).

    Args:
        credentials: the certificate and key to present.
        ca_file: the CA to trust, or None for the system trust store.
        alpn: offer ALPN ``x-amzn-mqtt-ca`` (AWS IoT's MQTT on port 443).

    Returns:
        A context verifying the server certificate and host name, TLS 1.2 or later.

    Raises:
        ssl.SSLError: the certificate or key does not load (or do not match).
        OSError: a file cannot be read.
    """
    context = server_verifying_context(ca_file)
    context.load_cert_chain(str(credentials.cert_file), str(credentials.key_file))
    if alpn:
        context.set_alpn_protocols([AWS_ALPN_PROTOCOL])
    return context


_USER_PROPERTY_ID: Final = 0x26  # MQTT 5 "User Property": a UTF-8 string pair


class _PackedProperties(Properties):
    """PUBLISH properties already packed: paho only ever calls :meth:`pack` on a PUBLISH's
    properties (and formats them in debug logs), so they need no more than their bytes.

    paho's general :class:`Properties` costs ~30 µs per message to build and pack, a third of
    the per-message budget at 100 in flight. ``Properties.__init__`` is skipped on purpose
    (nothing of it is used) and ``Properties.__setattr__`` only admits MQTT property names, so
    the packed bytes go in a slot of our own, set through its descriptor.
    """

    __slots__ = ("_packed",)

    _packed: bytes

    def pack(self) -> bytes:
        """The properties as sent on the wire (length, then the properties)."""
        return self._packed

    def __str__(self) -> str:
        return f"[UserProperty: {self._packed!r}]"

    __repr__ = __str__


_new_properties = object.__new__
_SET_PACKED = _PackedProperties.__dict__["_packed"].__set__


def message_id_properties(name: str) -> Callable[[str], Properties]:
    """A builder of the PUBLISH properties carrying a message id as MQTT 5 user property ``name``.

    The publisher sends every message with one (``PublisherConfig.message_id_property``); the
    outbox benchmark's raw aiomqtt baseline sends the same bytes built the same way.

    Args:
        name: the user property's name (``ztp-id`` by default).

    Returns:
        A function of the message id returning the properties for ``aiomqtt.Client.publish``;
        they pack to exactly what paho's own ``Properties`` would.

    Raises:
        UsageError: ``name`` is empty.
        OverflowError: ``name`` is longer than 65,535 UTF-8 bytes.
    """
    if not name:
        raise UsageError("a user property needs a name")
    prefix = bytes((_USER_PROPERTY_ID,)) + utf8_string(name)
    # Ids this short (the outbox's are ~20 bytes) have one-byte lengths: the properties' length
    # (< 128) and the high byte of the value's (0); one formatting operation packs them.
    short = 127 - len(prefix) - 2
    fixed = len(prefix) + 2

    def build(message_id: str) -> Properties:
        raw = message_id.encode()
        size = len(raw)
        if size <= short:
            packed = b"%c%b\x00%c%b" % (fixed + size, prefix, size, raw)
        else:
            head = variable_byte_integer(fixed + size)
            packed = b"".join((head, prefix, size.to_bytes(2, "big"), raw))
        properties = _new_properties(_PackedProperties)
        _SET_PACKED(properties, packed)
        return properties

    return build


class _EndConnectionError(Exception):
    """Raised inside the connection's TaskGroup to end it on purpose (stop, new credentials)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Publisher:
    """Publishes the outbox to the IoT endpoint; reconnects by itself. An async context manager.

    Args:
        config: connection and behaviour settings.
        outbox: the open outbox to publish from.
        credentials: where the certificate, key and endpoint come from.
        rng: the random source for backoff jitter.
        clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        config: PublisherConfig,
        outbox: Outbox,
        credentials: CredentialSource,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._outbox = outbox
        self._credentials = credentials
        self._clock = clock
        self._backoff = Backoff(config.backoff_base, config.backoff_cap, rng or random.Random())  # noqa: S311 - jitter, not secrecy
        self._stack = contextlib.AsyncExitStack()
        self._stopping = asyncio.Event()
        self._change = asyncio.Event()
        self._change_reason = ""
        # Set after _stopping or _change, or on attach_watchdog: wakes whichever loop waits.
        self._nudge = asyncio.Event()
        self._connected = asyncio.Event()
        self._paused = False
        self._resume = asyncio.Event()
        self._current_version: str | None = None
        self._last_connect = -math.inf
        self._connects = 0
        self._attempts = 0
        self._published = 0
        self._last_error: str | None = None
        self._entered = False
        self._tasks: list[asyncio.Task[None]] = []
        self._watchdog: Watchdog | None = None
        self._pulse_published = 0
        self._log = _log.bind(thing=config.thing_name)

    # -- life cycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Start connecting (in the background); return at once.

        Raises:
            UsageError: entered twice.
        """
        if self._entered:
            raise UsageError("a Publisher is not reentrant")
        self._entered = True
        group = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [
            group.create_task(self._connection_loop(), name="publisher.connection"),
            group.create_task(self._credentials_loop(), name="publisher.credentials"),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Drain in-flight publishes (bounded by ``drain_timeout``), disconnect, stop the tasks."""
        self._stopping.set()
        self._nudge.set()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            # Stopping on purpose: the bounded drain that follows is not a wedge.
            watchdog.unregister(CONNECTION_LOOP)
            watchdog.unregister(SEND_LOOP)
        self._tasks[1].cancel("publisher stopping")
        await self._stack.__aexit__(exc_type, exc, tb)

    def attach_watchdog(self, watchdog: Watchdog) -> None:
        """Have the systemd watchdog watch the connection loop and the senders until stop.

        Registers ``publisher.connection`` and ``publisher.send`` (see the module docstring for
        when each beats); :meth:`__aexit__` unregisters them. Their allowance is the watchdog's
        interval, widened to cover a connect and a drain, which run without beats.

        Args:
            watchdog: the daemon's watchdog (entered or not).

        Raises:
            UsageError: a watchdog is already attached, or the publisher is not running.
        """
        if self._watchdog is not None:
            raise UsageError("a watchdog is already attached to this publisher")
        if not self._entered or self._stopping.is_set():
            raise UsageError("attach a watchdog to a running publisher")
        within = None
        interval, period = watchdog.interval, watchdog.beat_period
        if interval is not None and period is not None:
            config = self._config
            # aiomqtt bounds both the CONNECT and the DISCONNECT by connect_timeout.
            silent = config.drain_timeout + 2 * config.connect_timeout + period
            within = max(interval, silent)
        watchdog.register(CONNECTION_LOOP, within=within)
        try:
            watchdog.register(SEND_LOOP, within=within)
        except UsageError:
            watchdog.unregister(CONNECTION_LOOP)
            raise
        self._watchdog = watchdog
        self._pulse_published = self._published
        self._nudge.set()  # the waits re-read their wake period

    def _pulse(self) -> None:
        """Beat the watched loops: the connection always, the senders only while healthy."""
        watchdog = self._watchdog
        if watchdog is None:
            return
        watchdog.beat(CONNECTION_LOOP)
        published = self._published
        if published != self._pulse_published or self._outbox.stats().in_flight == 0:
            watchdog.beat(SEND_LOOP)
        self._pulse_published = published

    def _pulse_period(self) -> float | None:
        return self._watchdog.beat_period if self._watchdog is not None else None

    # -- introspection -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is up now."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until a connection is up."""
        await self._connected.wait()

    def stats(self) -> PublisherStats:
        """Counters since start."""
        return PublisherStats(
            connected=self._connected.is_set(),
            connects=self._connects,
            attempts=self._attempts,
            published=self._published,
            last_error=self._last_error,
        )

    def request_reconnect(self, reason: str) -> None:
        """Drain and reconnect (re-reading the credentials), e.g. after a bundle commit."""
        self._change_reason = reason
        self._change.set()
        self._nudge.set()

    # -- the connection loop -------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            wait = max(
                self._backoff.delay(failures),
                self._last_connect + self._config.min_connect_interval - self._clock(),
            )
            if wait > 0 and await self._stop_within(wait):
                return
            self._change.clear()
            self._pulse()
            try:
                credentials = self._credentials.current()
            except (UsageError, DeviceError) as exc:
                failures += 1
                self._failed(f"credentials unusable: {exc}", failures)
                continue
            if credentials is None:
                failures += 1
                self._failed("no credentials yet", failures)
                continue
            self._last_connect = self._clock()
            self._attempts += 1
            host = self._config.host or credentials.endpoint
            self._log.info(
                "publisher.connecting",
                attempt=failures + 1,
                host=host,
                port=self._config.port,
                credentials=credentials.version,
            )
            connects = self._connects
            try:
                reason = await self._connect_and_serve(credentials, host)
            except ConnectError as exc:
                # A connection that came up resets the backoff: this loss is failure 1.
                failures = 1 if self._connects > connects else failures + 1
                self._failed(exc.reason, failures)
                continue
            failures = 0
            self._log.info("publisher.disconnected", reason=reason)

    def _failed(self, reason: str, failures: int) -> None:
        self._last_error = reason
        self._log.warning("publisher.connect_failed", attempt=failures, reason=reason)

    async def _stop_within(self, seconds: float) -> bool:
        """Sleep ``seconds`` unless stopping first, pulsing meanwhile; True if stopping."""
        deadline = self._clock() + seconds
        while True:
            self._pulse()
            remaining = deadline - self._clock()
            if self._stopping.is_set() or remaining <= 0:
                return self._stopping.is_set()
            period = self._pulse_period()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining if period is None else min(remaining, period)):
                    await self._nudge.wait()
            self._nudge.clear()  # the flags it stands for are read at the top

    async def _connect_and_serve(self, credentials: ClientCredentials, host: str) -> str:
        """One connection, start to end.

        Returns:
            Why it ended on purpose (stop, credentials changed).

        Raises:
            ConnectError: it could not be made, or it was lost.
        """
        config = self._config
        try:
            context = await asyncio.to_thread(
                build_tls_context, credentials, ca_file=config.ca_file, alpn=config.use_alpn
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConnectError(f"TLS set-up failed: {type(exc).__name__}: {exc}") from exc
        client = aiomqtt.Client(
            host,
            config.port,
            identifier=config.thing_name,
            protocol=(
                aiomqtt.ProtocolVersion.V5
                if config.message_id_property is not None
                else aiomqtt.ProtocolVersion.V311
            ),
            tls_context=context,
            keepalive=config.keepalive,
            timeout=config.connect_timeout,
            max_inflight_messages=self._outbox.limits.max_in_flight,
        )
        # aiomqtt warns on every publish past 10 pending calls; ours are bounded by design.
        client.pending_calls_threshold = self._outbox.limits.max_in_flight + 1
        try:
            async with client:
                self._connects += 1
                self._current_version = credentials.version
                self._connected.set()
                self._log.info("publisher.connected", credentials=credentials.version)
                try:
                    return await self._serve(client)
                finally:
                    self._connected.clear()
        except aiomqtt.MqttError as exc:
            raise ConnectError(_describe_mqtt_error(exc)) from exc

    async def _serve(self, client: aiomqtt.Client) -> str:
        """Run the senders until the connection ends.

        Returns:
            Why it ended on purpose.

        Raises:
            ConnectError: the connection was lost.
        """
        self._paused = False
        # One pacer per connection: AWS limits publishes per second per connection.
        rate = self._config.publish_rate
        pacer = RatePacer(rate) if rate is not None else None
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._watch(client), name="publisher.watch")
                group.create_task(self._control(), name="publisher.control")
                for index in range(self._outbox.limits.max_in_flight):
                    group.create_task(
                        self._send_loop(client, pacer), name=f"publisher.send-{index}"
                    )
        except BaseExceptionGroup as group:
            ended, rest = group.split(_EndConnectionError)
            lost, other = rest.split(aiomqtt.MqttError) if rest is not None else (None, None)
            if other is not None:
                raise
            if ended is not None:
                return _first_leaf(ended).args[0] if _first_leaf(ended).args else "ended"
            if lost is not None:
                raise ConnectError(_describe_mqtt_error(_first_leaf(lost))) from group
            raise
        return "ended"  # the senders only end by exception: not reached

    async def _watch(self, client: aiomqtt.Client) -> None:
        # aiomqtt ends its message iterator with MqttError when the connection drops; the
        # publisher subscribes to nothing, so this is its disconnect notification.
        async for _message in client.messages:
            pass

    async def _control(self) -> None:
        # Wakes every beat period while connected, idle or not: the watchdog's pulse.
        while True:
            self._pulse()
            if self._stopping.is_set() or self._change.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._pulse_period()):
                    await self._nudge.wait()
            self._nudge.clear()  # the flags it stands for are read at the top
        reason = "stopping" if self._stopping.is_set() else self._change_reason
        await self._drain()
        raise _EndConnectionError(reason)

    async def _drain(self) -> None:
        self._paused = True
        began = self._clock()
        in_flight = self._outbox.stats().in_flight
        try:
            async with asyncio.timeout(self._config.drain_timeout):
                await self._outbox.wait_idle()
        except TimeoutError:
            self._log.warning(
                "publisher.drain_timeout",
                in_flight=self._outbox.stats().in_flight,
                timeout_s=self._config.drain_timeout,
            )
        else:
            self._log.info(
                "publisher.drained",
                in_flight_at_start=in_flight,
                elapsed_ms=round((self._clock() - began) * 1000, 1),
            )

    async def _send_loop(self, client: aiomqtt.Client, pacer: RatePacer | None) -> None:
        outbox = self._outbox
        take_nowait, ack = outbox.take_nowait, outbox.ack
        publish = client.publish
        property_name = self._config.message_id_property
        properties_of = message_id_properties(property_name) if property_name else None
        while True:
            message = take_nowait()
            if message is None:
                message = await outbox.next_message()
            if self._paused:
                outbox.release(message.seq)
                await self._resume.wait()  # never set: the connection ends after a drain
                continue
            properties = properties_of(message.message_id) if properties_of is not None else None
            try:
                if pacer is not None:
                    wait = pacer.reserve(self._clock())
                    if wait > 0:
                        await asyncio.sleep(wait)
                # Bounded by the connection, not a timer: when it drops, _watch ends the group.
                await publish(
                    message.topic,
                    message.payload,
                    qos=1,
                    properties=properties,
                    timeout=math.inf,
                )
            except BaseException:
                outbox.release(message.seq)
                raise
            ack(message.seq)
            self._published += 1

    # -- credentials ---------------------------------------------------------------------------

    async def _credentials_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.credentials_poll_interval)
            try:
                credentials = self._credentials.current()
            except (UsageError, DeviceError) as exc:
                self._log.warning("publisher.credentials_unreadable", error=str(exc))
                continue
            if (
                credentials is not None
                and self._connected.is_set()
                and credentials.version != self._current_version
            ):
                self._log.info(
                    "publisher.credentials_changed",
                    old=self._current_version,
                    new=credentials.version,
                )
                self.request_reconnect("credentials changed")


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _describe_mqtt_error(exc: BaseException) -> str:
    """A short reason for a log line; aiomqtt's messages name the cause, never a secret."""
    if isinstance(exc, aiomqtt.MqttCodeError):
        return f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({type(cause).__name__}: {cause})"
    return text
